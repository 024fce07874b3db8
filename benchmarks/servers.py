"""The processes under test: pointgate (``python -m service serve``), stock amqtt, and PostgreSQL.

pointgate and stock amqtt run as child processes on free loopback ports and are stopped by their PIDs.
PostgreSQL is a durable embedded cluster in the run's work directory (``fsync`` and ``synchronous_commit``
on), or the operator's ``--database-url``. `Database` also answers what the benchmark checks afterwards:
which messages are in ``measurepoints`` with all their points, and how many bytes the points tables grew.

``python -m benchmarks.servers --stock-port PORT`` is the stock broker process itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.wire import PRODUCT_KEY

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(__file__).resolve().parent / "models"


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


# pointgate's writer metrics the report uses, by exposition line name
_WANTED_METRICS = {
    "pointgate_write_batch_points_sum": "batch_points_sum",
    "pointgate_write_batch_points_count": "batches",
    "pointgate_write_seconds_sum": "write_s",
    'pointgate_write_seconds_bucket{le="0.025"}': "writes_le_25ms",
    'pointgate_write_seconds_bucket{le="0.1"}': "writes_le_100ms",
}


@dataclass
class Server:
    """A broker under test, running as a child process (with its workers, if any, as descendants)."""

    name: str
    proc: subprocess.Popen[bytes]
    mqtt_port: int
    log_path: Path
    ready_s: float = 0.0
    http_port: int | None = None
    workers: int = 1

    def metrics(self) -> dict[str, float]:
        """The writer's counters from pointgate's ``/metrics`` (empty for stock amqtt).

        A metric exposed more than once (one series per writer or per worker) is summed.
        """
        if self.http_port is None:
            return {}
        found: dict[str, float] = {}
        with contextlib.suppress(OSError, http.client.HTTPException):
            client = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=5)
            try:
                client.request("GET", "/metrics")
                for line in client.getresponse().read().decode().splitlines():
                    name, _, value = line.rpartition(" ")
                    key = _metric_key(name)
                    if key in _WANTED_METRICS:
                        found[_WANTED_METRICS[key]] = found.get(_WANTED_METRICS[key], 0.0) + float(value)
            finally:
                client.close()
        return found


def _metric_key(name: str) -> str:
    """``metric{a="1",le="0.1"}`` → ``metric{le="0.1"}``; other labels (worker, pid) are summed over."""
    base, _, labels = name.partition("{")
    le = [part for part in labels.rstrip("}").split(",") if part.startswith("le=")]
    return base + ("{" + le[0] + "}" if le else "")


def start_pointgate(
    workdir: Path,
    dsn: str,
    *,
    workers: int,
    extra_env: Sequence[str] = (),
    cprofile: str | None = None,
) -> Server:
    """``python -m service serve --workers N`` with the bench models, on free loopback ports."""
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
    for item in extra_env:
        key, _, value = item.partition("=")
        env[key] = value
    command = [sys.executable]
    if cprofile:
        command += ["-m", "cProfile", "-o", str(Path(cprofile).resolve())]
    # --workers always explicit: serve's default is the number of cores
    command += ["-m", "service", "serve", "--workers", str(workers)]
    log_path = workdir / "pointgate.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server("pointgate", proc, mqtt_port, log_path, http_port=http_port, workers=workers)
    try:
        server.ready_s = wait_ready_http(proc, http_port, log_path)
    except BaseException:
        stop_process(proc, "pointgate")
        raise
    return server


def start_stock(workdir: Path) -> Server:
    """Stock amqtt 0.12.1 with nothing but AnonymousAuthPlugin, under uvloop (`run_stock_broker`)."""
    port = free_port()
    log_path = workdir / "amqtt.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.servers", "--stock-port", str(port)],
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
    """The embedded durable PostgreSQL the benchmark starts, or the operator's (``database_url``)."""

    def __init__(self, workdir: Path, database_url: str | None = None) -> None:
        self._server: Any = None
        self.pid: int | None = None
        if database_url:
            self.dsn: str = database_url
            self.kind = "external"
            return
        from service.storage.embedded import EmbeddedPostgres

        self._server = EmbeddedPostgres(workdir / "db", durable=True)
        self.dsn = self._server.start()
        self.kind = "embedded (durable)"
        with contextlib.suppress(OSError, ValueError, IndexError):
            self.pid = int((self._server.pgdata / "postmaster.pid").read_text().split()[0])

    async def _fetch(self, query: str, *args: object) -> list[Any]:
        import asyncpg

        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            return list(await conn.fetch(query, *args, timeout=300))
        finally:
            await conn.close()

    def version(self) -> str:
        """``server_version`` of the database."""
        rows = asyncio.run(self._fetch("SHOW server_version"))
        return str(rows[0][0])

    def table_bytes(self) -> int:
        """``pg_total_relation_size`` of the points partitions, latest values and series (heap, indexes, TOAST)."""
        rows = asyncio.run(
            self._fetch(
                "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0)"
                " + pg_total_relation_size('points_latest') + pg_total_relation_size('series')"
                " FROM pg_inherits WHERE inhparent = 'points'::regclass"
            )
        )
        return int(rows[0][0])

    def stored(self, device_prefix: str, points: int) -> tuple[int, set[tuple[str, int]]]:
        """Rows of the devices whose keys start with ``device_prefix``, and the (device key, time in ms) of
        every message that has all ``points`` rows."""
        rows = asyncio.run(
            self._fetch(
                "SELECT device_key, round(extract(epoch FROM ts) * 1000)::bigint AS ms, count(*) AS n"
                " FROM measurepoints WHERE product_key = $1 AND device_key LIKE $2 GROUP BY 1, 2",
                PRODUCT_KEY,
                device_prefix + "%",
            )
        )
        total = sum(int(r["n"]) for r in rows)
        complete = {(str(r["device_key"]), int(r["ms"])) for r in rows if int(r["n"]) >= points}
        return total, complete

    def stop(self) -> None:
        """Stop the embedded cluster (an external database is left alone)."""
        if self._server is not None:
            self._server.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.servers --stock-port PORT``: the stock amqtt broker process."""
    parser = argparse.ArgumentParser(description="Stock amqtt 0.12.1 for the benchmark's baseline.")
    parser.add_argument("--stock-port", type=int, required=True)
    run_stock_broker(parser.parse_args(argv).stock_port)


if __name__ == "__main__":
    main()
