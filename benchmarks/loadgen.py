"""The load generator: processes of raw MQTT clients under uvloop, driven by the benchmark over a pipe.

A generator process connects its devices (CONNECT, SUBSCRIBE to the reply topic), reports ``ready``, waits
for ``go`` (a monotonic start time shared by all generator processes), then runs closed loop (each device
refills its window on the reply or on the PUBACK) or open loop (``rate`` msg/s in total, spread evenly over
the devices on a 1 ms tick, still capped by the window) until every device has sent its messages, or until
``duration`` seconds, and every request it sent has been answered. It sends back the per-message send,
reply and PUBACK times and its own CPU time. An idle holder process only opens subscribed connections and
keeps them until told to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import resource
import signal
import time
from array import array
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from benchmarks.client import TICK_S, Client, GenState
from benchmarks.wire import DISCONNECT, Requests, connect_packet, reply_topic, subscribe_packet

# connections being opened at once; more only queue inside pointgate, whose CONNECT timeout (10 s) then fires
CONNECT_CONCURRENCY = 64


async def _open(
    factory: Callable[[], Client], host: str, port: int, hello: bytes, limit: asyncio.Semaphore, timeout: float
) -> Client:
    async with limit:
        transport, client = await asyncio.get_running_loop().create_connection(factory, host, port)
        client.transport = transport  # uvloop may call connection_made only after this returns
        transport.write(hello)
        await asyncio.wait_for(client.ready, timeout)
        return client


async def _pace(clients: list[Client], deadline: float, stop_at: float) -> None:
    """Open loop: every tick, send whatever each device has due, as far as its window allows."""
    active = [c for c in clients if c.packets]
    while active and time.monotonic() < deadline:
        now = time.monotonic()
        for client in active:
            if now >= stop_at:
                client.stop()
                continue
            due = min(len(client.packets), int((now - client.t0) / client.period) + 1) if now >= client.t0 else 0
            room = client.window - client.in_flight
            if due - client.sent > room and client.state is not None:
                client.state.window_full += 1
            client.send_now(min(due - client.sent, room), now)
        active = [c for c in active if not c.stopped]
        await asyncio.sleep(TICK_S)


async def _stop_all_at(clients: list[Client], stop_at: float) -> None:
    await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
    for client in clients:
        client.stop()


async def _generate(conn: Connection, spec: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    host, port, points, qos, window = spec["host"], spec["port"], spec["points"], spec["qos"], spec["window"]
    stock = spec["mode"] == "stock"
    refill = spec["refill"]
    devices: list[tuple[int, str, int]] = spec["devices"]  # (global index, device key, messages)
    total = sum(m for _, _, m in devices)
    state = GenState(
        send=array("d", bytes(8 * total)),
        recv=array("d", bytes(8 * total)),
        ack=array("d", bytes(8 * total)),
        senders=len(devices),
        finished=loop.create_future(),
        sub_expected=spec["subscriber_expect"],
    )
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)
    timeout = spec["connect_timeout"]
    sustained = spec["duration"] > 0
    tasks = []
    base = 0
    for _, device_key, messages in devices:
        packets = Requests(
            device_key, messages, time_base_ms=spec["time_base_ms"], points=points, qos=qos, eager=not sustained
        )
        hello = connect_packet(f"bench-{device_key}")
        if not stock:
            hello += subscribe_packet(1, reply_topic(device_key), 1)

        def factory(b: int = base, p: Requests = packets) -> Client:
            # stock amqtt: no reply subscription (it would only slow stock down), so CONNACK ends the handshake
            # and the PUBACK completes a request
            return Client(
                state,
                base=b,
                packets=p,
                window=window,
                refill="puback" if stock else refill,
                expect_reply=not stock,
                expect_ack=qos == 1,
                expect_suback=not stock,
            )

        tasks.append(_open(factory, host, port, hello, limit, timeout))
        base += messages
    if state.sub_expected:

        def sub_factory() -> Client:
            return Client(state, subscriber=True, expect_reply=False, expect_ack=False)

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
    stop_at = go + spec["duration"] if sustained else float("inf")
    for client, (index, _, _) in zip(senders, devices, strict=True):
        client.stop_at = stop_at
        if rate > 0:
            client.closed_loop = False
            client.period = n_total / rate
            client.t0 = go + (index / n_total) * client.period  # devices' schedules spread evenly
    await asyncio.sleep(max(0.0, go - time.monotonic()))
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    deadline = go + spec["timeout"]
    background: list[asyncio.Task[None]] = []
    if rate > 0:
        background.append(asyncio.create_task(_pace(senders, deadline, stop_at)))
    else:
        now = time.monotonic()
        for client in senders:
            client.send_now(min(window, len(client.packets)), now)
    if sustained:
        background.append(asyncio.create_task(_stop_all_at(senders, stop_at)))
    state.check_finished()  # nothing to do at all
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(state.finished), max(0.0, deadline - time.monotonic()))
    finished = time.monotonic()
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    for task in background:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    result = {
        "send": state.send,
        "recv": state.recv,
        "ack": state.ack,
        "sub_recv": state.sub_recv,
        "sent": [c.sent for c in senders],
        "replies": state.replies,
        "acks": state.acks,
        "codes": dict(state.codes),
        "errors": dict(state.errors),  # a copy: closing the connections below must not add to it
        "puback_before_reply": state.puback_before_reply,
        "cpu_s": (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime),
        "finished": finished,
        "timed_out": not state.finished.done(),
        "late_sends": state.late_sends,
        "max_lag": state.max_lag,
        "window_full": state.window_full,
    }
    for client in clients:
        client.drained = True  # closing is not a lost connection
        if client.transport is not None and not client.transport.is_closing():
            client.transport.write(DISCONNECT)
            client.transport.close()
    await asyncio.sleep(0.05)
    return result


async def _hold_idle(conn: Connection, spec: dict[str, Any]) -> dict[str, Any]:
    """Open one connection per device key, each subscribed to its reply topic; hold them until told to stop."""
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)
    began = time.monotonic()
    tasks = []
    for device_key in spec["device_keys"]:
        hello = connect_packet(f"bench-{device_key}") + subscribe_packet(1, reply_topic(device_key), 1)
        tasks.append(_open(lambda: Client(None), spec["host"], spec["port"], hello, limit, spec["connect_timeout"]))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    clients = [r for r in results if isinstance(r, Client)]
    failures = Counter(type(r).__name__ for r in results if not isinstance(r, Client))
    conn.send(("ready", {"connect_s": time.monotonic() - began, "clients": len(clients), "failures": dict(failures)}))
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    for client in clients:
        if client.transport is not None and not client.transport.is_closing():
            client.transport.write(DISCONNECT)
            client.transport.close()
    await asyncio.sleep(0.2)
    return {"closed": len(clients)}


def child_main(kind: str, conn: Connection, spec: dict[str, Any]) -> None:
    """Entry point of a generator (``generate``) or idle-holder (``hold``) process."""
    import uvloop

    try:
        result = uvloop.run(_generate(conn, spec) if kind == "generate" else _hold_idle(conn, spec))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    conn.send(("done", result))


Child = tuple[BaseProcess, Connection]


def spawn(kind: str, spec: dict[str, Any]) -> Child:
    """Start a generator or holder process (spawned: no state inherited from the benchmark)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=child_main, args=(kind, child, spec), daemon=True)
    proc.start()
    child.close()
    return proc, parent


def receive(child: Child, timeout: float, what: str) -> Any:
    """The next message from a child, or a RuntimeError naming what it was doing."""
    proc, conn = child
    if not conn.poll(timeout):
        raise RuntimeError(f"{what}: no answer from generator pid {proc.pid} within {timeout:.0f}s")
    kind, payload = conn.recv()
    if kind == "error":
        raise RuntimeError(f"{what}: generator pid {proc.pid} failed: {payload}")
    return payload


def stop_children(children: list[Child]) -> None:
    """Join each child; SIGTERM (by PID) one that has not exited within 5 s."""
    for proc, conn in children:
        proc.join(5)
        if proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.join(5)
        conn.close()
