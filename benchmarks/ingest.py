"""End-to-end ingest benchmark: publish → validated → committed → reply received, against a real pointgate.

What it measures (design.md, "Performance targets")
  * messages/s and points/s over the steady window (the middle 80 % of all replies, by receive time);
  * reply latency p50/p95/p99/max per message, send → reply received (messages of the middle 80 % by send
    order); with ``--rate`` the send time is the scheduled time whenever a message was held back (window full
    or generator late), so a backlog shows up as latency instead of being hidden (no coordinated omission);
  * CPU: pointgate's own process (utime+stime from /proc/<pid>/stat) per message and in cores, PostgreSQL's
    (postmaster + backends, embedded database only), the generator's own (getrusage), and "other" (the rest of
    the machine's busy time from /proc/stat: other tenants, softirq, this script);
  * pointgate's peak RSS (VmHWM), and that every message became exactly ``points`` rows (row count checked
    in PostgreSQL for the phase's own device keys: nothing lost, nothing counted twice);
  * ``--compare-stock``: stock amqtt 0.12.1 (only ``AnonymousAuthPlugin``, under uvloop) relaying the same
    publishes to one ``/sys/#`` QoS 1 subscriber: deliveries/s over the steady window;
  * ``--idle N``: throughput of ``--active`` devices alone, then again with N more connections each subscribed
    to its reply topic, and pointgate's RSS growth per idle connection.

How
  pointgate runs as ``python -m service serve`` (uvloop, anonymous devices, models from benchmarks/models,
  logs at WARNING) on free loopback ports, against its own durable (fsync on) embedded PostgreSQL started by
  this script, or ``--database-url``. The load generator is raw asyncio protocol code under uvloop in separate
  processes (``--gen-procs``): packets are pre-encoded before the clock starts (CONNECT, SUBSCRIBE to the
  device's ``…/resume_reply``, one QoS 1 PUBLISH per message with a distinct ``id`` and ``time``), and the
  parser handles just CONNACK/SUBACK/PUBACK/PUBLISH, PUBACKing the QoS 1 replies. Closed loop (default):
  each device keeps at most ``--window`` requests without a reply in flight and refills on every reply.
  Open loop (``--rate N``): N msg/s in total, spread evenly over the devices, still capped by the window.
  Every phase is bounded by ``--messages`` and ``--timeout``; every process started is stopped by its PID.

Run ``.venv/bin/python benchmarks/ingest.py --help``; results and method notes are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import json
import logging
import multiprocessing as mp
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODELS_DIR = HERE / "models"
PRODUCT_KEY = "bench01"
# the bench01 model, in payload order; --points takes the first N
POINT_NAMES = (
    "power",
    "voltage",
    "current",
    "temp",
    "frequency",
    "energy",
    "powerFactor",
    "irradiance",
    "status",
    "alarms",
)
KEEP_ALIVE_S = 300  # no PINGREQ is ever needed: every phase is far shorter than 1.5 x keep-alive
# connections being opened at once; more only queue inside pointgate, whose CONNECT timeout (10 s) then fires
CONNECT_CONCURRENCY = 64
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
TICK_S = 0.001  # open-loop pacing period
STEADY = (0.10, 0.90)
TIMELINE_S = 0.5  # the steady window: fraction of replies (by time) left out at each end

log = logging.getLogger("bench")


# ---------------------------------------------------------------------------------------------------------
# MQTT 3.1.1 packets, pre-encoded
# ---------------------------------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mqtt_str(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def connect_packet(client_id: str, keep_alive: int = KEEP_ALIVE_S) -> bytes:
    """CONNECT, clean session, no credentials (pointgate runs with allow_anonymous)."""
    body = _mqtt_str("MQTT") + bytes((4, 0x02)) + keep_alive.to_bytes(2, "big") + _mqtt_str(client_id)
    return b"\x10" + _varint(len(body)) + body


def subscribe_packet(packet_id: int, topic_filter: str, qos: int) -> bytes:
    """SUBSCRIBE to one filter."""
    body = packet_id.to_bytes(2, "big") + _mqtt_str(topic_filter) + bytes((qos,))
    return b"\x82" + _varint(len(body)) + body


def publish_packet(topic: str, payload: bytes, qos: int, packet_id: int) -> bytes:
    """PUBLISH at QoS 0 or 1."""
    body = _mqtt_str(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + payload
    return bytes((0x30 | qos << 1,)) + _varint(len(body)) + body


DISCONNECT = b"\xe0\x00"


def request_topic(device_key: str) -> str:
    """The measurement-point resume topic of one bench device."""
    return f"/sys/{PRODUCT_KEY}/{device_key}/thing/measurepoint/resume"


def request_payload(k: int, time_ms: int, points: int) -> bytes:
    """Message ``k`` of a device: ``points`` numeric values of bench01, all valid, varying with ``k``."""
    values: dict[str, Any] = {
        "power": {"value": (k * 7) % 50000, "quality": 0},
        "voltage": 230.0 + (k % 100) * 0.01,
        "current": 10.0 + (k % 50) * 0.1,
        "temp": 40.0 + (k % 30) * 0.25,
        "frequency": 50.0 + (k % 20) * 0.005,
        "energy": 1000.0 + k * 0.001,
        "powerFactor": 0.9 + (k % 10) * 0.01,
        "irradiance": 800.0 + (k % 400) * 0.5,
        "status": k % 4,
        "alarms": k % 65536,
    }
    measurepoints = {name: values[name] for name in POINT_NAMES[:points]}
    return orjson.dumps(
        {
            "id": str(k),
            "version": "1.0",
            "method": "thing.measurepoint.resume",
            "params": {"measurepoints": measurepoints, "time": time_ms},
        }
    )


# ---------------------------------------------------------------------------------------------------------
# Load generator (runs in its own processes, under uvloop)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _GenState:
    """What one generator process records, indexed by message (device base offset + k)."""

    send: array[float]
    recv: array[float]
    expected: int
    finished: asyncio.Future[None]
    completed: int = 0
    codes: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    sub_recv: array[float] = field(default_factory=lambda: array("d"))
    sub_expected: int = 0
    late_sends: int = 0  # open loop: messages sent more than 2 ticks after they were due
    max_lag: float = 0.0  # open loop: the latest of them, seconds
    window_full: int = 0  # open loop: ticks at which a device had messages due but a full window

    def complete(self, count: int) -> None:
        self.completed += count
        if self.completed >= self.expected and self._sub_done() and not self.finished.done():
            self.finished.set_result(None)

    def _sub_done(self) -> bool:
        return len(self.sub_recv) >= self.sub_expected


class Client(asyncio.Protocol):
    """One MQTT connection of the generator: a device, an idle device, or the stock-relay subscriber.

    ``reply_mode`` says what completes a request: "reply" (pointgate's reply PUBLISH, matched by id) or
    "puback" (stock amqtt, which never answers); the subscriber counts every PUBLISH it receives.
    """

    def __init__(
        self,
        state: _GenState | None,
        *,
        base: int = 0,
        packets: Sequence[bytes] = (),
        window: int = 1,
        reply_mode: str = "reply",
        subscriber: bool = False,
        expect_suback: bool = True,
    ) -> None:
        self.state = state
        self.base = base
        self.packets = packets
        self.window = window
        self.reply_mode = reply_mode
        self.subscriber = subscriber
        self.expect_suback = expect_suback
        self.sent = 0
        self.pubacks = 0
        self.done = 0
        self.closed_loop = True
        self.t0 = 0.0  # open loop: when message 0 is due
        self.period = 0.0  # open loop: seconds between this device's messages
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buf = bytearray()
        self._lost = False

    # asyncio.Protocol ----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport is not an asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("connection closed before SUBACK"))
        elif self.state is not None and (self.sent > self.done or self.done < len(self.packets)):
            self.state.errors["connection lost"] += 1

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        now = time.monotonic()
        size = len(buf)
        pos = 0
        out: list[bytes] = []
        completed = 0
        while size - pos >= 2:
            first = buf[pos]
            length, multiplier, i = 0, 1, pos + 1
            while i < size:
                byte = buf[i]
                length += (byte & 0x7F) * multiplier
                multiplier *= 128
                i += 1
                if not byte & 0x80:
                    break
            else:
                break  # the remaining length itself is incomplete
            end = i + length
            if end > size:
                break
            kind = first & 0xF0
            if kind == 0x30:
                completed += self._publish(first, buf, i, end, now, out)
            elif kind == 0x40:
                if self.reply_mode == "puback" and not self.subscriber:
                    # stock amqtt never replies: its PUBACKs, in order, complete the requests
                    self._record(self.pubacks, now)
                    self.pubacks += 1
                    completed += 1
            elif kind == 0x20:
                if buf[i + 1] != 0:
                    self._fail(f"CONNACK return code {buf[i + 1]}")
                elif not self.expect_suback and not self.ready.done():
                    self.ready.set_result(None)
            elif kind == 0x90:
                if buf[end - 1] == 0x80:
                    self._fail("SUBACK refused the subscription")
                elif not self.ready.done():
                    self.ready.set_result(None)
            pos = end
        del buf[:pos]
        if completed:
            self.done += completed
            if self.closed_loop and self.sent < len(self.packets):
                self._send(min(completed, len(self.packets) - self.sent), now, out)
            if self.state is not None:
                self.state.complete(completed)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    # ----------------------------------------------------------------------------------------------------
    def _publish(self, first: int, buf: bytearray, start: int, end: int, now: float, out: list[bytes]) -> int:
        qos = (first >> 1) & 0x03
        topic_end = start + 2 + int.from_bytes(buf[start : start + 2])
        payload_start = topic_end
        if qos:
            out.append(b"\x40\x02" + bytes(buf[topic_end : topic_end + 2]))
            payload_start += 2
        state = self.state
        if state is None:
            return 0
        if self.subscriber:
            state.sub_recv.append(now)
            if len(state.sub_recv) >= state.sub_expected:
                state.complete(0)
            return 0
        try:
            reply = orjson.loads(bytes(buf[payload_start:end]))
            k = int(reply["id"])
            code = int(reply["code"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            state.errors["unparsable reply"] += 1
            return 0
        state.codes[code] += 1
        if self.reply_mode != "reply" or not 0 <= k < len(self.packets):
            state.errors["unexpected reply"] += 1
            return 0
        self._record(k, now)
        return 1

    def _record(self, k: int, now: float) -> None:
        assert self.state is not None
        index = self.base + k
        if self.state.recv[index] == 0.0:
            self.state.recv[index] = now
        else:
            self.state.errors["duplicate reply"] += 1

    def _send(self, count: int, now: float, out: list[bytes]) -> None:
        assert self.state is not None
        send, base = self.state.send, self.base
        first = self.sent
        for k in range(first, first + count):
            if self.closed_loop:
                send[base + k] = now
            else:
                # open loop: a message held back (window full, or the generator late) counts from when it
                # was due, so a backlog is measured as latency
                due = self.t0 + k * self.period
                if now - due <= 2 * TICK_S:
                    send[base + k] = now
                else:
                    send[base + k] = due
                    self.state.late_sends += 1
                    self.state.max_lag = max(self.state.max_lag, now - due)
        out.extend(self.packets[first : first + count])
        self.sent = first + count

    def send_now(self, count: int, now: float) -> None:
        """Send the next ``count`` requests (the start of a closed loop, or a pacing tick)."""
        if count <= 0 or self.transport is None or self._lost:
            return
        out: list[bytes] = []
        self._send(count, now, out)
        self.transport.write(b"".join(out))

    def _fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        elif self.state is not None:
            self.state.errors[reason] += 1


async def _open(
    factory: Callable[[], Client], host: str, port: int, hello: bytes, limit: asyncio.Semaphore, timeout: float
) -> Client:
    async with limit:
        transport, client = await asyncio.get_running_loop().create_connection(factory, host, port)
        client.transport = transport  # uvloop may call connection_made only after this returns
        transport.write(hello)
        await asyncio.wait_for(client.ready, timeout)
        return client


async def _pace(clients: list[Client], deadline: float) -> None:
    """Open loop: every tick, send whatever each device has due, as far as its window allows."""
    active = [c for c in clients if c.packets]
    while active and time.monotonic() < deadline:
        now = time.monotonic()
        for client in active:
            due = min(len(client.packets), int((now - client.t0) / client.period) + 1) if now >= client.t0 else 0
            room = client.window - (client.sent - client.done)
            if due - client.sent > room and client.state is not None:
                client.state.window_full += 1
            client.send_now(min(due - client.sent, room), now)
        active = [c for c in active if c.sent < len(c.packets)]
        await asyncio.sleep(TICK_S)


async def _generate(conn: Connection, spec: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    host, port, points, qos, window = spec["host"], spec["port"], spec["points"], spec["qos"], spec["window"]
    stock = spec["mode"] == "stock"
    devices: list[tuple[int, str, int]] = spec["devices"]  # (global index, device key, messages)
    total = sum(m for _, _, m in devices)
    state = _GenState(
        send=array("d", bytes(8 * total)),
        recv=array("d", bytes(8 * total)),
        expected=total,
        finished=loop.create_future(),
        sub_expected=spec["subscriber_expect"],
    )
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)
    timeout = spec["connect_timeout"]
    tasks = []
    base = 0
    for _, device_key, messages in devices:
        topic = request_topic(device_key)
        packets = [
            publish_packet(topic, request_payload(k, spec["time_base_ms"] + k, points), qos, k % 65535 + 1)
            for k in range(messages)
        ]
        hello = connect_packet(f"bench-{device_key}")
        if not stock:
            hello += subscribe_packet(1, topic + "_reply", 1)

        def factory(b: int = base, p: list[bytes] = packets) -> Client:
            # stock amqtt: no reply subscription (it would only slow stock down), so CONNACK ends the handshake
            return Client(
                state,
                base=b,
                packets=p,
                window=window,
                reply_mode="puback" if stock else "reply",
                expect_suback=not stock,
            )

        tasks.append(_open(factory, host, port, hello, limit, timeout))
        base += messages
    if state.sub_expected:

        def sub_factory() -> Client:
            return Client(state, subscriber=True, reply_mode="puback")

        hello = connect_packet(f"bench-subscriber-{os.getpid()}") + subscribe_packet(1, "/sys/#", 1)
        tasks.append(_open(sub_factory, host, port, hello, limit, timeout))
    began = time.monotonic()
    clients = list(await asyncio.gather(*tasks))
    connect_s = time.monotonic() - began
    conn.send(("ready", {"connect_s": connect_s, "clients": len(clients)}))
    message = await loop.run_in_executor(None, conn.recv)
    go: float = message[1]
    rate: float = spec["rate"]
    senders = clients[: len(devices)]
    n_total = spec["n_devices_total"]
    for client, (index, _, _) in zip(senders, devices, strict=True):
        if rate > 0:
            client.closed_loop = False
            client.period = n_total / rate
            client.t0 = go + (index / n_total) * client.period  # devices' schedules spread evenly
    await asyncio.sleep(max(0.0, go - time.monotonic()))
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    deadline = go + spec["timeout"]
    pacer = None
    if rate > 0:
        pacer = asyncio.create_task(_pace(senders, deadline))
    else:
        now = time.monotonic()
        for client in senders:
            client.send_now(min(window, len(client.packets)), now)
    if total == 0 and state.sub_expected == 0:
        state.finished.set_result(None)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(state.finished), max(0.0, deadline - time.monotonic()))
    finished = time.monotonic()
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    if pacer is not None:
        pacer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pacer
    result = {
        "send": state.send,
        "recv": state.recv,
        "sub_recv": state.sub_recv,
        "sent": sum(c.sent for c in senders),
        "completed": state.completed,
        "expected": total,
        "codes": dict(state.codes),
        "errors": dict(state.errors),  # a copy: closing the connections below must not add to it
        "cpu_s": (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime),
        "finished": finished,
        "timed_out": not state.finished.done(),
        "late_sends": state.late_sends,
        "max_lag": state.max_lag,
        "window_full": state.window_full,
    }
    for client in clients:
        if client.transport is not None:
            client.transport.write(DISCONNECT)
            client.transport.close()
    await asyncio.sleep(0.05)
    return result


async def _hold_idle(conn: Connection, spec: dict[str, Any]) -> dict[str, Any]:
    """Open ``n`` device connections, each subscribed to its reply topic, and hold them until told to stop."""
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)
    began = time.monotonic()
    tasks = []
    for device_key in spec["device_keys"]:
        hello = connect_packet(f"bench-{device_key}") + subscribe_packet(1, request_topic(device_key) + "_reply", 1)
        tasks.append(_open(lambda: Client(None), spec["host"], spec["port"], hello, limit, spec["connect_timeout"]))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    clients = [r for r in results if isinstance(r, Client)]
    failures = Counter(type(r).__name__ for r in results if not isinstance(r, Client))
    conn.send(("ready", {"connect_s": time.monotonic() - began, "clients": len(clients), "failures": dict(failures)}))
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    for client in clients:
        if client.transport is not None:
            client.transport.write(DISCONNECT)
            client.transport.close()
    await asyncio.sleep(0.2)
    return {"closed": len(clients)}


def _child_main(kind: str, conn: Connection, spec: dict[str, Any]) -> None:
    """Entry point of a generator / idle-holder process."""
    import uvloop

    try:
        result = uvloop.run(_generate(conn, spec) if kind == "generate" else _hold_idle(conn, spec))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    conn.send(("done", result))


# ---------------------------------------------------------------------------------------------------------
# Process accounting (/proc)
# ---------------------------------------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """utime + stime of one process, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kb(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/<pid>/status (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def tree_cpu_s(root: int) -> float:
    """CPU of ``root`` and its live children (the postmaster and its backends)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(entry) == root or int(fields[1]) == root:
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def machine_busy_s() -> float:
    """CPU seconds all cores spent not idle since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / CLK_TCK


@dataclass
class Snapshot:
    """CPU counters at one instant."""

    wall: float
    server: float
    database: float | None
    machine: float

    @classmethod
    def take(cls, server_pid: int, pg_pid: int | None) -> Snapshot:
        return cls(
            time.monotonic(),
            proc_cpu_s(server_pid),
            tree_cpu_s(pg_pid) if pg_pid else None,
            machine_busy_s(),
        )


# ---------------------------------------------------------------------------------------------------------
# Servers under test
# ---------------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A free loopback TCP port (racy by nature, fine on an otherwise quiet box)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def stop_process(proc: subprocess.Popen[bytes], name: str, timeout: float = 20.0) -> None:
    """SIGTERM by PID, then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"  {name} (pid {proc.pid}) did not stop in {timeout:.0f}s after SIGTERM: killed", file=sys.stderr)
        proc.kill()
        proc.wait(5)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_ready_http(proc: subprocess.Popen[bytes], port: int, log_path: Path, timeout: float = 90.0) -> float:
    """Poll ``/readyz`` until it answers 200; return the seconds it took."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"pointgate exited with {proc.returncode}:\n{_tail(log_path)}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            client = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            try:
                client.request("GET", "/readyz")
                if client.getresponse().status == 200:
                    return time.monotonic() - began
            finally:
                client.close()
        time.sleep(0.1)
    raise RuntimeError(f"pointgate not ready after {timeout:.0f}s:\n{_tail(log_path)}")


def wait_port(proc: subprocess.Popen[bytes], port: int, log_path: Path, timeout: float = 30.0) -> None:
    """Wait until something accepts on ``port``."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode}:\n{_tail(log_path)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"broker not listening after {timeout:.0f}s:\n{_tail(log_path)}")


@dataclass
class Server:
    """A broker under test, running as a child process."""

    name: str
    proc: subprocess.Popen[bytes]
    mqtt_port: int
    log_path: Path
    pg_pid: int | None = None
    ready_s: float = 0.0
    http_port: int | None = None

    def metrics(self) -> dict[str, float]:
        """The writer's counters from pointgate's ``/metrics`` (empty for stock amqtt)."""
        if self.http_port is None:
            return {}
        wanted = {
            "pointgate_write_batch_points_sum": "batch_points_sum",
            "pointgate_write_batch_points_count": "batches",
            "pointgate_write_seconds_sum": "write_s",
            'pointgate_write_seconds_bucket{le="0.025"}': "writes_le_25ms",
            'pointgate_write_seconds_bucket{le="0.1"}': "writes_le_100ms",
        }
        found: dict[str, float] = {}
        with contextlib.suppress(OSError, http.client.HTTPException):
            client = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=5)
            try:
                client.request("GET", "/metrics")
                for line in client.getresponse().read().decode().splitlines():
                    name, _, value = line.partition(" ")
                    if name in wanted:
                        found[wanted[name]] = float(value)
            finally:
                client.close()
        return found


def start_pointgate(args: argparse.Namespace, workdir: Path, dsn: str, pg_pid: int | None) -> Server:
    """``python -m service serve`` with the bench models, on free loopback ports."""
    mqtt_port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POINTGATE_")}
    env.update(
        POINTGATE_DATABASE_URL=dsn,
        POINTGATE_MQTT_BIND=f"127.0.0.1:{mqtt_port}",
        POINTGATE_HTTP_BIND=f"127.0.0.1:{http_port}",
        POINTGATE_DATA_DIR=str(workdir / "pointgate"),
        POINTGATE_MODELS=str(MODELS_DIR),
        POINTGATE_ALLOW_ANONYMOUS="true",
        POINTGATE_LOG_LEVEL="WARNING",
    )
    for item in args.pointgate_env:
        key, _, value = item.partition("=")
        env[key] = value
    command = [sys.executable]
    if args.cprofile:
        command += ["-m", "cProfile", "-o", str(Path(args.cprofile).resolve())]
    command += ["-m", "service", "serve"]
    log_path = workdir / "pointgate.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server("pointgate", proc, mqtt_port, log_path, pg_pid, http_port=http_port)
    try:
        server.ready_s = wait_ready_http(proc, http_port, log_path)
    except BaseException:
        stop_process(proc, "pointgate")
        raise
    return server


def start_stock(workdir: Path) -> Server:
    """Stock amqtt 0.12.1 with nothing but AnonymousAuthPlugin, under uvloop (this file, --stock-broker-port)."""
    port = free_port()
    log_path = workdir / "amqtt.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--stock-broker-port", str(port)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server("amqtt", proc, port, log_path)
    began = time.monotonic()
    try:
        wait_port(proc, port, log_path)
    except BaseException:
        stop_process(proc, "amqtt")
        raise
    server.ready_s = time.monotonic() - began
    return server


def stock_broker_config(port: int) -> dict[str, Any]:
    """The minimal stock config: an explicit ``plugins`` mapping replaces amqtt's default set, so the only
    plugin is the auth plugin every CONNECT needs (reference/amqtt.md §1.1)."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "timeout_disconnect_delay": 0,
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


def run_stock_broker(port: int) -> None:
    """The stock broker process: runs until SIGTERM."""
    import uvloop
    from amqtt.broker import Broker

    logging.basicConfig(level=logging.WARNING)

    async def main() -> None:
        broker = Broker(stock_broker_config(port))
        await broker.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(broker.shutdown(), 5)

    uvloop.run(main())


class Database:
    """The embedded durable PostgreSQL this script starts, or the operator's (``--database-url``)."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self._server: Any = None
        self.pid: int | None = None
        if args.database_url:
            self.dsn: str = args.database_url
            self.kind = "external"
            return
        from service.storage.embedded import EmbeddedPostgres

        self._server = EmbeddedPostgres(workdir / "db", durable=True)
        self.dsn = self._server.start()
        self.kind = "embedded (durable)"
        with contextlib.suppress(OSError, ValueError, IndexError):
            self.pid = int((self._server.pgdata / "postmaster.pid").read_text().split()[0])

    def count_rows(self, device_prefix: str) -> int:
        import asyncpg

        async def count() -> int:
            conn = await asyncpg.connect(self.dsn, timeout=10)
            try:
                value: int = await conn.fetchval(
                    "SELECT count(*) FROM point_data WHERE product_key = $1 AND device_key LIKE $2",
                    PRODUCT_KEY,
                    device_prefix + "%",
                )
                return value
            finally:
                await conn.close()

        return asyncio.run(count())

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()


# ---------------------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One measured run against one server."""

    name: str
    server: str
    devices: int
    messages: int
    points: int
    window: int
    qos: int
    rate: float = 0.0
    idle_devices: int = 0
    completed: int = 0
    timed_out: bool = False
    msg_s: float = 0.0
    msg_s_overall: float = 0.0
    points_s: float = 0.0
    duration_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    server_us_per_msg: float = 0.0
    server_cores: float = 0.0
    db_us_per_msg: float | None = None
    db_cores: float | None = None
    gen_us_per_msg: float = 0.0
    gen_cores: float = 0.0
    other_cores: float = 0.0
    server_rss_mb: float = 0.0
    server_peak_rss_mb: float = 0.0
    rows_expected: int | None = None
    rows_found: int | None = None
    codes: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    connect_s: float = 0.0
    first_s: float = 0.0  # first reply (delivery) after the start
    write_batches: int | None = None  # database transactions during the phase (pointgate's /metrics)
    write_batch_points: float | None = None  # mean points per transaction
    write_ms: float | None = None  # mean INSERT + COMMIT time
    writer_busy: float | None = None  # fraction of the phase the single writer spent in a transaction
    slow_commits: dict[str, int] = field(default_factory=dict)  # transactions slower than 25 ms / 100 ms
    # open loop: how far the generator itself fell behind its schedule (its lateness counts as latency)
    gen_late_sends: int = 0
    gen_max_lag_ms: float = 0.0
    window_full_ticks: int = 0
    timeline: list[int] = field(default_factory=list)  # replies (deliveries) per TIMELINE_S since the start
    p99_timeline_ms: list[float] = field(default_factory=list)  # p99 latency of the messages sent in each bucket


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q * len(values)) - 1))]


def _steady_rate(times: list[float]) -> float:
    times.sort()
    n = len(times)
    lo, hi = int(STEADY[0] * n), int(STEADY[1] * n) - 1
    if hi <= lo or times[hi] <= times[lo]:
        return float("nan")
    return (hi - lo) / (times[hi] - times[lo])


def _spawn(kind: str, spec: dict[str, Any]) -> tuple[mp.process.BaseProcess, Connection]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child_main, args=(kind, child, spec), daemon=True)
    proc.start()
    child.close()
    return proc, parent


def _receive(conn: Connection, proc: mp.process.BaseProcess, timeout: float, what: str) -> Any:
    if not conn.poll(timeout):
        raise RuntimeError(f"{what}: no answer from generator pid {proc.pid} within {timeout:.0f}s")
    kind, payload = conn.recv()
    if kind == "error":
        raise RuntimeError(f"{what}: generator pid {proc.pid} failed: {payload}")
    return payload


def _stop_children(children: list[tuple[mp.process.BaseProcess, Connection]]) -> None:
    for proc, conn in children:
        proc.join(5)
        if proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.join(5)
        conn.close()


def run_phase(
    args: argparse.Namespace,
    server: Server,
    db: Database | None,
    name: str,
    device_keys: list[str],
    *,
    rate: float = 0.0,
    stock: bool = False,
    idle_devices: int = 0,
    holder_pid: int | None = None,
) -> Phase:
    """Drive ``device_keys`` against ``server`` with ``--messages`` in total; measure everything."""
    n = len(device_keys)
    per_device = [args.messages // n + (1 if i < args.messages % n else 0) for i in range(n)]
    messages = sum(per_device)
    procs = max(1, min(args.gen_procs, n))
    base_spec = {
        "host": "127.0.0.1",
        "port": server.mqtt_port,
        "mode": "stock" if stock else "pointgate",
        "points": args.points,
        "qos": args.qos,
        "window": args.window,
        "rate": rate,
        "n_devices_total": n,
        "timeout": args.timeout,
        "connect_timeout": 60.0,
        "time_base_ms": int(time.time() * 1000) - 86_400_000,
    }
    children = []
    for p in range(procs):
        devices = [(i, device_keys[i], per_device[i]) for i in range(p, n, procs)]
        spec = dict(base_spec, devices=devices, subscriber_expect=messages if stock and p == 0 else 0)
        children.append(_spawn("generate", spec))
    phase = Phase(
        name, server.name, n, messages, args.points, args.window, args.qos, rate=rate, idle_devices=idle_devices
    )
    try:
        ready = [_receive(c, p, 120, f"{name}: connecting") for p, c in children]
        phase.connect_s = max(r["connect_s"] for r in ready)
        go = time.monotonic() + 0.3
        metrics_before = server.metrics()
        holder_before = proc_cpu_s(holder_pid) if holder_pid else 0.0
        before = Snapshot.take(server.proc.pid, db.pid if db else None)
        for _, conn in children:
            conn.send(("go", go))
        results = [_receive(c, p, args.timeout + 30, f"{name}: running") for p, c in children]
        after = Snapshot.take(server.proc.pid, db.pid if db else None)
        holder_cpu = proc_cpu_s(holder_pid) - holder_before if holder_pid else 0.0
        metrics_after = server.metrics()
    finally:
        _stop_children(children)
    finished = max(r["finished"] for r in results)
    wall = finished - go
    codes: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    pairs: list[tuple[float, float]] = []
    done_times: list[float] = []
    for r in results:
        codes.update(r["codes"])
        errors.update(r["errors"])
        phase.timed_out |= r["timed_out"]
        phase.gen_late_sends += r["late_sends"]
        phase.gen_max_lag_ms = max(phase.gen_max_lag_ms, r["max_lag"] * 1000)
        phase.window_full_ticks += r["window_full"]
        if stock:
            done_times.extend(r["sub_recv"])
            continue
        for sent, got in zip(r["send"], r["recv"], strict=True):
            if got > 0.0:
                pairs.append((sent, got))
                done_times.append(got)
    phase.completed = len(done_times)
    if done_times:
        phase.first_s = min(done_times) - go
        buckets = Counter(int((t - go) / TIMELINE_S) for t in done_times)
        phase.timeline = [buckets.get(b, 0) for b in range(max(buckets) + 1)]
    phase.codes = {str(k): v for k, v in sorted(codes.items())}
    phase.errors = dict(errors)
    phase.msg_s = _steady_rate(done_times)
    span = max(done_times) - min(done_times) if done_times else 0.0
    phase.msg_s_overall = phase.completed / span if span > 0 else float("nan")
    if stock:
        # stock amqtt PUBACKs at once and relays from an unbounded backlog: deliveries crawl while the
        # publishers are busy and rush once they are done, so no middle window is representative. Its rate
        # is all deliveries over first → last delivery, as in reference/amqtt.md §4.1.
        phase.msg_s = phase.msg_s_overall
    phase.points_s = phase.msg_s * args.points
    phase.duration_s = wall
    if pairs:
        pairs.sort()
        lo, hi = int(STEADY[0] * len(pairs)), int(STEADY[1] * len(pairs))
        by_bucket: dict[int, list[float]] = {}
        for sent, got in pairs:
            by_bucket.setdefault(int((sent - go) / TIMELINE_S), []).append((got - sent) * 1000)
        phase.p99_timeline_ms = [
            round(_percentile(sorted(by_bucket.get(b, [])), 0.99), 1) for b in range(max(by_bucket) + 1)
        ]
        latencies = sorted((got - sent) * 1000 for sent, got in pairs[lo:hi] or pairs)
        phase.latency_ms = {
            "p50": _percentile(latencies, 0.50),
            "p95": _percentile(latencies, 0.95),
            "p99": _percentile(latencies, 0.99),
            "max": latencies[-1],
        }
    count = max(phase.completed, 1)
    cpu_wall = after.wall - before.wall
    server_cpu = after.server - before.server
    gen_cpu = sum(r["cpu_s"] for r in results)
    phase.server_us_per_msg = server_cpu / count * 1e6
    phase.server_cores = server_cpu / cpu_wall
    db_cpu = after.database - before.database if after.database is not None and before.database is not None else 0.0
    if after.database is not None and before.database is not None:
        phase.db_us_per_msg = db_cpu / count * 1e6
        phase.db_cores = db_cpu / cpu_wall
    phase.gen_us_per_msg = gen_cpu / count * 1e6
    phase.gen_cores = gen_cpu / wall if wall > 0 else 0.0
    known = server_cpu + gen_cpu + db_cpu + holder_cpu
    phase.other_cores = max(0.0, (after.machine - before.machine - known) / cpu_wall)
    delta = {k: metrics_after.get(k, 0.0) - metrics_before.get(k, 0.0) for k in metrics_after}
    if delta.get("batches"):
        phase.write_batches = int(delta["batches"])
        phase.write_batch_points = delta["batch_points_sum"] / delta["batches"]
        phase.write_ms = delta["write_s"] / delta["batches"] * 1000
        phase.writer_busy = delta["write_s"] / cpu_wall
        phase.slow_commits = {
            "over_25ms": int(delta["batches"] - delta.get("writes_le_25ms", 0)),
            "over_100ms": int(delta["batches"] - delta.get("writes_le_100ms", 0)),
        }
    phase.server_rss_mb = proc_status_kb(server.proc.pid, "VmRSS") / 1024
    phase.server_peak_rss_mb = proc_status_kb(server.proc.pid, "VmHWM") / 1024
    if db is not None and not stock:
        phase.rows_expected = phase.completed * args.points
        phase.rows_found = db.count_rows(_common_prefix(device_keys))
    return phase


def _common_prefix(keys: list[str]) -> str:
    first, last = min(keys), max(keys)
    size = 0
    while size < min(len(first), len(last)) and first[size] == last[size]:
        size += 1
    return first[:size]


@contextlib.contextmanager
def idle_connections(server: Server, keys: list[str]) -> Iterator[dict[str, Any]]:
    """Hold ``keys`` connected (each subscribed to its reply topic) in a separate process."""
    proc, conn = _spawn(
        "hold", {"host": "127.0.0.1", "port": server.mqtt_port, "device_keys": keys, "connect_timeout": 60.0}
    )
    try:
        info = _receive(conn, proc, 300, "idle connections")
        info["pid"] = proc.pid
        yield info
        conn.send(("stop", None))
        _receive(conn, proc, 60, "closing idle connections")
    finally:
        _stop_children([(proc, conn)])


# ---------------------------------------------------------------------------------------------------------
# py-spy (optional)
# ---------------------------------------------------------------------------------------------------------


def start_py_spy(binary: str, pid: int, out: Path) -> subprocess.Popen[bytes]:
    """Sample pointgate (non-blocking) until SIGINT; collapsed stacks go to ``out``."""
    return subprocess.Popen(
        [binary, "record", "--pid", str(pid), "--format", "raw", "--rate", "250", "--nonblocking", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def summarise_py_spy(path: Path, top: int = 25) -> list[str]:
    """Own and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame_name(f) for f in stack.split(";") if f and not f.startswith("process ")]
        if not frames:
            continue
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return ["(no samples)"]
    lines = [f"py-spy: {total} samples; own time (top {top}):"]
    lines += [f"  {c / total:6.1%}  {name}" for name, c in own.most_common(top)]
    lines.append(f"inclusive time (top {top}):")
    lines += [f"  {c / total:6.1%}  {name}" for name, c in inclusive.most_common(top)]
    return lines


def _frame_name(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)"
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if parts else path
    return f"{name} ({short})"


# ---------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".0f") -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return format(value, spec)


def print_table(phases: list[Phase]) -> None:
    header = (
        "phase",
        "server",
        "dev",
        "msgs",
        "msg/s",
        "points/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "srv µs/msg",
        "srv cores",
        "pg µs/msg",
        "gen µs/msg",
        "gen cores",
        "other cores",
        "peak RSS MB",
        "batch pts",
        "commit ms",
        "writer busy",
        "rows ok",
    )
    rows = []
    for p in phases:
        rows_ok = "-" if p.rows_expected is None else ("yes" if p.rows_found == p.rows_expected else "NO")
        lat = p.latency_ms
        rows.append(
            (
                p.name,
                p.server,
                str(p.devices) + (f"+{p.idle_devices}i" if p.idle_devices else ""),
                f"{p.completed}/{p.messages}",
                _fmt(p.msg_s),
                _fmt(p.points_s),
                _fmt(lat.get("p50"), ".1f"),
                _fmt(lat.get("p95"), ".1f"),
                _fmt(lat.get("p99"), ".1f"),
                _fmt(lat.get("max"), ".1f"),
                _fmt(p.server_us_per_msg),
                _fmt(p.server_cores, ".2f"),
                _fmt(p.db_us_per_msg),
                _fmt(p.gen_us_per_msg),
                _fmt(p.gen_cores, ".2f"),
                _fmt(p.other_cores, ".2f"),
                _fmt(p.server_peak_rss_mb, ".0f"),
                _fmt(p.write_batch_points),
                _fmt(p.write_ms, ".1f"),
                _fmt(p.writer_busy, ".0%"),
                rows_ok,
            )
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    for p in phases:
        problems = {k: v for k, v in p.codes.items() if k != "200"}
        if p.errors or problems or p.timed_out or (p.rows_expected is not None and p.rows_found != p.rows_expected):
            print(
                f"  ! {p.name}: timed_out={p.timed_out} errors={p.errors} non-200={problems} "
                f"rows {p.rows_found}/{p.rows_expected}"
            )


def targets(phases: list[Phase], extra: dict[str, Any]) -> dict[str, Any]:
    """The design targets this run can speak to, with the numbers behind each verdict."""
    out: dict[str, Any] = {}
    maxes = [p for p in phases if p.server == "pointgate" and p.rate == 0 and not p.idle_devices]
    if maxes:
        best = max(p.msg_s for p in maxes)
        out["throughput_10k_msg_s"] = {"best_msg_s": round(best), "ok": best >= 10_000}
    for p in phases:
        if p.server == "amqtt":
            ours = [q for q in maxes if q.devices == p.devices]
            if ours and p.msg_s > 0:
                ratio = ours[0].msg_s / p.msg_s
                out[f"vs_stock_{p.devices}dev"] = {"ratio": round(ratio, 2), "ok": ratio >= 2.0}
    for p in phases:
        if p.rate and p.latency_ms:
            out[f"p99_at_{round(p.rate)}_msg_s_{p.devices}dev"] = {
                "p99_ms": round(p.latency_ms["p99"], 1),
                "ok": p.latency_ms["p99"] < 50,
            }
    if "idle" in extra:
        idle = extra["idle"]
        out["idle_throughput_within_20pct"] = {"ratio": idle["throughput_ratio"], "ok": idle["throughput_ratio"] >= 0.8}
        out["idle_kb_per_connection"] = {"kb": idle["rss_kb_per_connection"], "ok": idle["rss_kb_per_connection"] < 20}
    return out


def raise_nofile(needed: int) -> dict[str, Any]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (children inherit it); say whether ``needed`` fits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        new = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    now_soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"soft_before": soft, "soft": now_soft, "hard": hard, "enough": now_soft >= needed}


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="End-to-end ingest benchmark for pointgate (and stock amqtt for comparison).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--devices",
        default="10",
        help="device connections; a comma list (10,100) runs one phase per count; with --idle: idle connections",
    )
    parser.add_argument("--messages", type=int, default=20000, help="requests per phase (all devices together)")
    parser.add_argument("--window", type=int, default=10, help="most requests without a reply in flight per device")
    parser.add_argument(
        "--points",
        type=int,
        default=10,
        choices=range(1, len(POINT_NAMES) + 1),
        metavar="1..10",
        help="measure points per message (bench01 has 10)",
    )
    parser.add_argument("--qos", type=int, default=1, choices=(0, 1), help="QoS of the requests")
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: total msg/s (0 = as fast as it goes)")
    parser.add_argument("--half", action="store_true", help="after each max-rate phase, rerun at half its rate")
    parser.add_argument("--database-url", help="use this PostgreSQL instead of a fresh embedded one")
    parser.add_argument("--compare-stock", action="store_true", help="also measure stock amqtt's relay rate")
    parser.add_argument("--idle", action="store_true", help="--devices are idle connections next to --active ones")
    parser.add_argument("--active", type=int, default=10, help="active devices in --idle mode")
    parser.add_argument("--gen-procs", type=int, default=1, help="generator processes")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a phase may run after its start")
    parser.add_argument("--json", help="append the JSON result line to this file instead of stdout")
    parser.add_argument(
        "--pointgate-env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for pointgate"
    )
    parser.add_argument("--py-spy", metavar="FILE", help="sample pointgate with py-spy into FILE (collapsed stacks)")
    parser.add_argument("--py-spy-bin", default=shutil.which("py-spy") or "py-spy", help="the py-spy executable")
    parser.add_argument("--cprofile", metavar="FILE", help="run pointgate under cProfile, stats to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, database)")
    parser.add_argument("--stock-broker-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device_counts = [int(v) for v in str(args.devices).split(",") if v.strip()]
    if not args.device_counts or min(args.device_counts) < 1:
        parser.error("--devices needs positive counts")
    if args.messages < (args.active if args.idle else max(args.device_counts)):
        parser.error("--messages must be at least the number of active devices")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stock_broker_port:
        run_stock_broker(args.stock_broker_port)
        return 0
    sys.path.insert(0, str(ROOT))
    from service.ops.logs import configure_logging

    configure_logging(level="WARNING", json=False, stream=sys.stderr)  # stdout is for the results
    # pointgate holds every connection (and the holder process the idle ones): that is the most one process needs
    needed = max(args.device_counts) + (args.active if args.idle else 0) + 200
    limits = raise_nofile(needed)
    if args.idle and not limits["enough"]:
        print(f"RLIMIT_NOFILE {limits['soft']} < {needed} needed for --idle; run with fewer --devices", file=sys.stderr)
        return 2
    tag = secrets.token_hex(3)
    workdir = Path(tempfile.mkdtemp(prefix="pointgate-bench-"))
    workdir.chmod(0o755)  # the embedded PostgreSQL runs as an unprivileged user when we are root
    started = dt.datetime.now(dt.UTC)
    phases: list[Phase] = []
    extra: dict[str, Any] = {"nofile": limits}
    db: Database | None = None
    servers: list[Server] = []
    spy: subprocess.Popen[bytes] | None = None
    try:
        db = Database(args, workdir)
        print(f"database: {db.kind}; work dir {workdir}", file=sys.stderr)
        server = start_pointgate(args, workdir, db.dsn, db.pid)
        servers.append(server)
        print(f"pointgate pid {server.proc.pid} ready in {server.ready_s:.1f}s on :{server.mqtt_port}", file=sys.stderr)
        if args.py_spy:
            spy = start_py_spy(args.py_spy_bin, server.proc.pid, Path(args.py_spy).resolve())
        phase_no = 0

        def keys(count: int, label: str = "") -> list[str]:
            nonlocal phase_no
            phase_no += 1
            return [f"{tag}{phase_no:02d}{label}d{i:05d}" for i in range(count)]

        def run(name: str, device_keys: list[str], target: Server = server, **kw: Any) -> Phase:
            print(f"phase {name} ({target.name}) ...", file=sys.stderr)
            phase = run_phase(args, target, db if target.name == "pointgate" else None, name, device_keys, **kw)
            phases.append(phase)
            return phase

        if args.idle:
            idle_n = args.device_counts[0]
            base = run(f"{args.active} active", keys(args.active))
            rss_before = proc_status_kb(server.proc.pid, "VmRSS")
            with idle_connections(server, keys(idle_n, "i")) as info:
                time.sleep(1.0)
                rss_after = proc_status_kb(server.proc.pid, "VmRSS")
                loaded = run(
                    f"{args.active} active + {info['clients']} idle",
                    keys(args.active),
                    idle_devices=info["clients"],
                    holder_pid=info["pid"],
                )
            extra["idle"] = {
                "idle_connections": info["clients"],
                "connect_failures": info["failures"],
                "connect_s": round(info["connect_s"], 2),
                "connects_per_s": round(info["clients"] / info["connect_s"]) if info["connect_s"] else None,
                "rss_before_mb": round(rss_before / 1024, 1),
                "rss_after_mb": round(rss_after / 1024, 1),
                "rss_kb_per_connection": round((rss_after - rss_before) / max(info["clients"], 1), 2),
                "throughput_ratio": round(loaded.msg_s / base.msg_s, 3) if base.msg_s else None,
            }
        else:
            for count in args.device_counts:
                first = run(
                    f"{count} dev" + (f" @{args.rate:.0f}/s" if args.rate else " max"), keys(count), rate=args.rate
                )
                if args.half and not args.rate and first.msg_s == first.msg_s:
                    half = round(first.msg_s / 2)
                    run(f"{count} dev @{half}/s", keys(count), rate=half)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(30)
        stop_process(server.proc, "pointgate")
        servers.remove(server)
        if args.compare_stock and not args.idle:
            stock = start_stock(workdir)
            servers.append(stock)
            print(f"stock amqtt pid {stock.proc.pid} on :{stock.mqtt_port}", file=sys.stderr)
            for count in args.device_counts:
                run(f"{count} dev relay", keys(count), target=stock, stock=True)
            stop_process(stock.proc, "amqtt")
            servers.remove(stock)
    finally:
        if spy is not None and spy.poll() is None:
            spy.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(30)
            if spy.poll() is None:
                spy.kill()
        for server in servers:
            stop_process(server.proc, server.name)
        if db is not None:
            db.stop()
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"\npointgate ingest benchmark, {started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs")
    print(
        f"window {args.window}, {args.points} points/msg, QoS {args.qos}, {args.gen_procs} generator process(es), "
        f"database {db.kind if db else '-'}"
    )
    print_table(phases)
    if "idle" in extra:
        print(f"idle: {json.dumps(extra['idle'])}")
    verdicts = targets(phases, extra)
    for key, verdict in verdicts.items():
        print(f"target {key}: {verdict}")
    if args.py_spy and Path(args.py_spy).exists():
        print("\n".join(summarise_py_spy(Path(args.py_spy))))
    record = {
        "date": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "args": {k: v for k, v in vars(args).items() if k not in ("stock_broker_port", "device_counts")},
        "database": db.kind if db else None,
        "phases": [vars(p) for p in phases],
        "extra": extra,
        "targets": verdicts,
    }
    line = json.dumps(record, default=str)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    else:
        print(line)
    ok = all(p.rows_expected is None or p.rows_found == p.rows_expected for p in phases)
    ok &= all(not p.timed_out and not p.errors for p in phases)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
