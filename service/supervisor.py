"""``pointgate serve --workers N``: N worker processes on one MQTT port, under one supervising parent.

One asyncio event loop uses one core, and the broker's per-message work is Python, so using every core takes
several processes. They share the listening ports with SO_REUSEPORT: each worker binds its own socket to the same
port and the kernel spreads new connections over them by a hash of each connection's addresses.

The supervisor (the parent process):

- checks what it can before anything starts (thing models, TLS files) and reserves the ports: it binds a socket of
  its own to each with SO_REUSEPORT but never listens on it, so port 0 becomes one concrete port for every worker
  and the port stays pointgate's while a worker restarts (a bound socket that does not listen gets no connections);
- starts the embedded PostgreSQL once (when there is no ``--database-url``) and creates the secret key once; the
  workers get the DSN. Migrations run in the workers under the runner's advisory lock: each is applied once;
- serves the one ops endpoint (and the broker auth endpoints, when configured), the status page at ``/`` among it
  (the workers' figures added up, their refusals merged); SIGHUP is passed on to every worker; ``/readyz`` is
  ready only when every worker is (each reports its own checks every second, which is also its heartbeat);
  ``/metrics`` adds the workers' metrics up (prometheus-client multiprocess mode, in a private temporary directory
  removed at exit)
  beside the supervisor's own;
- restarts a worker that dies, after a backoff that doubles while it keeps dying young (within 30 s of starting).
  Five such deaths in a row are a crash loop: logged as an error, shown by ``/readyz``, retried at most every 30 s;
  a worker that stops reporting for 30 s is killed and restarted the same way;
- on SIGTERM or SIGINT marks itself draining, sends SIGTERM to every worker and waits for them to drain (each
  stops accepting, commits what it took, answers, closes); exit 0 when all drained. A second signal ends
  everything at once (exit 1). A worker ignores SIGINT and any SIGTERM after its first: a whole process group
  (Ctrl+C, systemd, ``timeout``) may get the operator's signal beside the one the supervisor forwards.

Take-over across workers. One connection per client id: a new CONNECT closes the old connection [MQTT-3.1.4-2].
Inside a worker the broker does that (overrides.py, B3); across workers the supervisor relays it. A worker reports
"session K connected (its connection number n)" and "… ended"; the supervisor remembers which worker holds K, and
when K connects on another worker it tells the previous one to evict connection n. The number makes a late eviction
harmless: a worker evicts only the connection it was told about, never a newer one. So a device that reconnects
and lands on another worker works at once, and its old connection is closed within milliseconds, well inside a
keep-alive period. A persistent session does not move between workers: the device gets session-present 0 and
subscribes again.

Control socket: a socketpair per worker, one JSON object per line.

- supervisor → worker: ``{"t": "settings", "settings": {...}}`` (the first line), ``{"t": "evict", "key", "serial"}``
- worker → supervisor: ``{"t": "started"}``, ``{"t": "status", "ready", "checks", "parts"}`` (every second; parts:
  the worker's refusals, notes and models for the status page, ops/status.py),
  ``{"t": "up", "key", "serial", "clean"}``, ``{"t": "down", "key", "serial", "clean"}``

End of file means the other side is gone: a worker whose supervisor died drains and exits by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from aiohttp import web
from prometheus_client import multiprocess
from pydantic import SecretStr

from service import __version__
from service.app import (
    Service,
    State,
    anonymous_warning,
    bind_reason,
    install_signal_handlers,
    load_all_models,
    migrate_once,
)
from service.broker.config import broker_config
from service.broker.overrides import PointgateBroker
from service.devices.auth import DeviceAuthenticator
from service.devices.brokerauth import check_auth_settings, endpoints
from service.devices.secretbox import SecretBox, key_path, load_or_create_key
from service.errors import ConfigError, PointgateError, ServiceFault
from service.ops.http import Check, OpsServer, run_checks
from service.ops.logs import configure_logging, get_logger
from service.ops.metrics import SupervisorMetrics
from service.ops.status import Parts, Rates, Snapshot, merge, read_figures
from service.ops.status import render as render_status
from service.settings import Settings, parse_bind
from service.storage.database import announce_serve, database_dsn, retract_serve
from service.storage.embedded import psql_command

__all__ = ["supervise", "worker_main"]

log = get_logger("pointgate.supervisor")

_WORKER_ENTRY = "from service.supervisor import worker_main; worker_main()"
_LINE_LIMIT = 1 << 20  # a client id may be 64 KiB; a control line is one id and a few fields
_STATUS_SECONDS = 1.0  # a worker reports its readiness this often (its heartbeat)
_STATUS_STALE_SECONDS = 5.0  # no report for this long: not ready
_HUNG_SECONDS = 30.0  # no report for this long: killed and restarted
_STARTUP_SECONDS = 120.0  # every worker must have started within this, at start-up
_STABLE_SECONDS = 30.0  # a worker that dies younger than this died young
_BACKOFF_FIRST = 0.2
_BACKOFF_MAX = 30.0
_CRASH_LOOP = 5  # deaths in a row, each young
_EXIT_GRACE = 6.0  # beyond drain_timeout: the replies' flush and the broker's shutdown (app.Service.stop)


# --- the supervisor -------------------------------------------------------------------------------------------


async def supervise(settings: Settings) -> int:
    """Run ``settings.workers`` workers until SIGTERM/SIGINT, then drain them; return the exit code."""
    load_all_models(settings.models)  # a bad model or TLS setup stops start-up here, once, naming every file
    broker_config(settings)
    check_auth_settings(settings)
    _remove_stale_metrics_dirs()
    metrics_dir = tempfile.mkdtemp(prefix=f"pointgate-metrics-{os.getpid()}-")  # mode 0700: ours alone
    clean = False
    try:
        supervisor = Supervisor(settings, metrics_dir)

        def on_second_signal() -> None:
            supervisor.kill_now()
            shutil.rmtree(metrics_dir, ignore_errors=True)

        async with contextlib.AsyncExitStack() as stack:
            mqtt_bind = _reserve(settings.mqtt_bind, stack, "--mqtt-bind")
            mqtts_bind = _reserve(settings.mqtts_bind, stack, "--mqtts-bind") if settings.mqtts_bind else None
            stop = install_signal_handlers(on_second=on_second_signal)
            if warning := anonymous_warning(settings):
                log.warning(warning, mqtt=settings.mqtt_bind)
            # whatever embedded server this finds (its own, or one a killed pointgate left running), it stops on exit
            dsn = await stack.enter_async_context(database_dsn(settings, own_server=True))
            stack.callback(retract_serve, announce_serve(settings))
            box = SecretBox(load_or_create_key(key_path(settings)))  # once, before workers would race to create it
            # a wrong password, a missing database or an edited migration stop start-up here with one line; a
            # database that is merely down does not (the workers wait for it, and readiness says why)
            if not await migrate_once(dsn, State({}), fatal_only=True):
                log.warning("database not ready, the workers wait for it")
            supervisor.worker_settings = {
                **_plain(settings),
                "mqtt_bind": mqtt_bind,
                "mqtts_bind": mqtts_bind,
                "database_url": dsn,
                "workers": 1,
            }
            # the broker auth endpoints (docs/scale-out.md) are served here too, off unless configured
            pool = await asyncpg.create_pool(dsn, min_size=0, max_size=2, timeout=5)
            stack.push_async_callback(_close_pool, pool)
            routes, auth_server = endpoints(
                settings, DeviceAuthenticator(pool, box, allow_anonymous=False, allow_activation=False)
            )
            host, port = parse_bind(settings.http_bind, default_host="127.0.0.1")
            ops = OpsServer(
                host,
                port,
                supervisor.readiness_checks(),
                render=supervisor.metrics.render,
                routes=routes,
                notes=lambda: supervisor.parts().notes,
                status_page=supervisor.status_page,
            )
            supervisor.ops = ops
            try:  # before the workers: a busy --http-bind fails before any device can connect
                await ops.start()
            except OSError as exc:
                raise ConfigError(f"--http-bind {host}:{port}: cannot listen: {bind_reason(exc)}") from None
            stack.push_async_callback(ops.stop)
            stack.push_async_callback(supervisor.kill)  # whatever happens below, no worker outlives us
            await supervisor.start()
            if auth_server is not None:
                await auth_server.start()
                stack.push_async_callback(auth_server.stop)
            # SIGHUP re-reads the thing models in every worker (`pointgate model reload` reaches them directly)
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, supervisor.forward, signal.SIGHUP)
            rates = asyncio.create_task(supervisor.rates.run())
            log.info(
                "pointgate started",
                version=__version__,
                workers=settings.workers,
                pids=[w.pid for w in supervisor.workers],
                mqtt=mqtt_bind,
                mqtts=mqtts_bind,
                http=f"{host}:{ops.port}",
                database="embedded" if settings.database_url is None else "external",
                psql=f"{psql_command()} '{dsn}'" if settings.database_url is None else None,
            )
            await stop.wait()
            rates.cancel()
            ops.set_draining()
            log.info("draining", deadline_s=settings.drain_timeout, workers=settings.workers)
            clean = await supervisor.drain(settings.drain_timeout + _EXIT_GRACE)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("pointgate stopped", drained=clean)
    return 0 if clean else 1


def _remove_stale_metrics_dirs() -> None:
    """Remove the metrics directories of supervisors that were killed (-9) before they could clean up."""
    for path in Path(tempfile.gettempdir()).glob("pointgate-metrics-*-*"):
        pid = path.name.split("-")[2]
        try:
            if not pid.isdigit() or path.stat().st_uid != os.geteuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue  # alive under another user, or gone meanwhile


def _plain(settings: Settings) -> dict[str, Any]:
    """The settings as JSON data for a worker, secrets in clear (they travel over a private socketpair)."""
    data = settings.model_dump(mode="json")
    for name, value in settings:
        if isinstance(value, SecretStr):
            data[name] = value.get_secret_value()
    return data


async def _close_pool(pool: asyncpg.Pool) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(pool.close(), 2)


def _reserve(bind: str, stack: contextlib.AsyncExitStack, option: str) -> str:
    """Bind (never listen) a SO_REUSEPORT socket to ``bind``; return ``HOST:PORT`` with the concrete port."""
    host, port = parse_bind(bind)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"{option} {bind}: cannot listen: {bind_reason(exc)}") from None
    stack.callback(sock.close)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio's listeners do
    try:
        sock.bind(address)
    except OSError as exc:
        raise ConfigError(f"{option} {bind}: cannot listen: {bind_reason(exc)}") from None
    port = sock.getsockname()[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(eq=False)
class _Worker:
    """One worker slot: the process filling it now, and what the supervisor knows of it."""

    index: int
    process: asyncio.subprocess.Process | None = None
    control: asyncio.StreamWriter | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    started_at: float = 0.0
    ready: bool = False
    checks: dict[str, str] = field(default_factory=dict)
    status_at: float = 0.0
    devices: int = 0
    deaths: int = 0  # young deaths in a row
    parts: Parts = field(default_factory=Parts)  # what it reports for the status page
    exit_code: int | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


class Supervisor:
    """The worker processes: started, watched, restarted, drained; and the relay between them."""

    def __init__(self, settings: Settings, metrics_dir: str) -> None:
        self.settings = settings
        self.metrics_dir = metrics_dir
        self.worker_settings: dict[str, Any] = {}
        self.workers = [_Worker(index) for index in range(settings.workers)]
        self.metrics = SupervisorMetrics(metrics_dir, settings.workers)
        self.draining = False
        self._drain_started = asyncio.Event()
        # session key → (worker index, that worker's connection number): where each device is connected
        self._owners: dict[str, tuple[int, int]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.ops: OpsServer | None = None
        self.rates = Rates(self.metrics.registry)
        self._started_at = time.monotonic()

    # start-up ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every worker and wait until each has started; a worker that fails to start stops it all."""
        self._tasks = [asyncio.create_task(self._keep(worker)) for worker in self.workers]
        self._tasks.append(asyncio.create_task(self._watch_heartbeats()))
        all_started: asyncio.Task[None] = asyncio.create_task(_all_set([w.started for w in self.workers]))
        done, _ = await asyncio.wait(
            [all_started, *self._tasks], timeout=_STARTUP_SECONDS, return_when=asyncio.FIRST_COMPLETED
        )
        if all_started in done:
            return
        all_started.cancel()
        for task in done:
            failure = None if task.cancelled() else task.exception()
            if failure is not None:
                raise failure
        raise ServiceFault(f"the workers did not all start within {_STARTUP_SECONDS:.0f} s; their log lines say why")

    async def _keep(self, worker: _Worker) -> None:
        """Run a worker in this slot until the drain, replacing it whenever it dies."""
        ever_started = False
        while not self.draining:
            try:
                reader = await self._spawn(worker)
            except OSError as exc:  # out of processes or descriptors: as good as a death
                if not ever_started:
                    raise ServiceFault(f"cannot start worker {worker.index}: {exc}") from exc
                worker.process, worker.exit_code, worker.started_at = None, None, time.monotonic()
                code = None
            else:
                if not await self._listen(worker, reader) and worker.running and worker.process is not None:
                    log.error("worker broke the control protocol, killing it", worker=worker.index)
                    worker.process.kill()
                assert worker.process is not None
                code = worker.exit_code = await worker.process.wait()
                ever_started = ever_started or worker.started.is_set()
                self._forget(worker)
            if self.draining:
                return
            if not ever_started:
                raise ServiceFault(
                    f"worker {worker.index} exited ({_describe(code)}) before it started; its log lines say why"
                )
            young = time.monotonic() - worker.started_at < _STABLE_SECONDS
            worker.deaths = worker.deaths + 1 if young else 1
            delay = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** (worker.deaths - 1))
            self.metrics.worker_restarts.inc()
            if worker.deaths >= _CRASH_LOOP:
                log.error(
                    "worker crash loop",
                    worker=worker.index,
                    deaths_in_a_row=worker.deaths,
                    exit=_describe(code),
                    restart_in_s=round(delay, 1),
                )
            else:
                log.error("worker died, restarting", worker=worker.index, exit=_describe(code), restart_in_s=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drain_started.wait(), delay)

    async def _spawn(self, worker: _Worker) -> asyncio.StreamReader:
        parent_end, child_end = socket.socketpair()
        try:
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _WORKER_ENTRY,
                str(worker.index),
                str(child_end.fileno()),
                pass_fds=(child_end.fileno(),),
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir},
            )
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        reader, worker.control = await asyncio.open_unix_connection(sock=parent_end, limit=_LINE_LIMIT)
        worker.started.clear()
        worker.started_at = worker.status_at = time.monotonic()
        worker.ready, worker.checks = False, {}
        _send(worker.control, {"t": "settings", "settings": self.worker_settings})
        self._update_gauges()
        if self.draining:  # spawned while the drain began: drain it too
            worker.process.send_signal(signal.SIGTERM)
        return reader

    # the control socket -----------------------------------------------------------------------------------
    async def _listen(self, worker: _Worker, reader: asyncio.StreamReader) -> bool:
        """Act on a worker's messages until it closes its end (True) or sends nonsense (False)."""
        try:
            while line := await reader.readline():
                self._on_message(worker, json.loads(line))
        except ConnectionError:
            return True
        except (ValueError, KeyError, TypeError):  # a line over the limit, not JSON, a field missing
            return False
        return True

    def _on_message(self, worker: _Worker, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "status":
            worker.ready, worker.checks = bool(message["ready"]), dict(message["checks"])
            worker.status_at = time.monotonic()
            if "parts" in message:
                worker.parts = Parts.from_json(message["parts"], models=worker.parts.models)
        elif kind == "up":
            self._session_up(worker, str(message["key"]), int(message["serial"]))
        elif kind == "down":
            self._session_down(worker, str(message["key"]), int(message["serial"]), bool(message["clean"]))
        elif kind == "started":
            worker.started.set()
            worker.status_at = time.monotonic()
            log.info("worker started", worker=worker.index, pid=worker.pid)

    def _session_up(self, worker: _Worker, key: str, serial: int) -> None:
        previous = self._owners.get(key)
        self._owners[key] = (worker.index, serial)
        worker.devices += 1
        self.metrics.worker_devices.labels(worker=str(worker.index)).set(worker.devices)
        if previous is not None and previous[0] != worker.index:
            holder = self.workers[previous[0]]
            if holder.control is not None:
                _send(holder.control, {"t": "evict", "key": key, "serial": previous[1]})

    def _session_down(self, worker: _Worker, key: str, serial: int, clean: bool) -> None:
        worker.devices = max(0, worker.devices - 1)
        self.metrics.worker_devices.labels(worker=str(worker.index)).set(worker.devices)
        # a persistent session stays on its worker after the connection: remembered, so it can be evicted
        if clean and self._owners.get(key) == (worker.index, serial):
            del self._owners[key]

    def _forget(self, worker: _Worker) -> None:
        """A worker process ended: its sessions, its live gauges and its control socket go with it."""
        if worker.control is not None:
            worker.control.close()
            worker.control = None
        self._owners = {key: owner for key, owner in self._owners.items() if owner[0] != worker.index}
        worker.devices, worker.ready = 0, False
        self.metrics.worker_devices.labels(worker=str(worker.index)).set(0)
        if worker.pid is not None:
            multiprocess.mark_process_dead(worker.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.workers_running.set(sum(1 for w in self.workers if w.running))

    async def _watch_heartbeats(self) -> None:
        while not self.draining:
            await asyncio.sleep(_STATUS_SECONDS)
            now = time.monotonic()
            for worker in self.workers:
                hung = worker.started.is_set() and now - worker.status_at > _HUNG_SECONDS
                if hung and worker.running and worker.process is not None:
                    log.error("worker not responding, killing it", worker=worker.index, pid=worker.pid)
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()
                    worker.status_at = now

    # the status page and SIGHUP ----------------------------------------------------------------------------
    def parts(self) -> Parts:
        """The running workers' refusals, notes and models, as one."""
        return merge({f"worker {w.index}": w.parts for w in self.workers if w.running})

    async def status_page(self, request: web.Request) -> web.Response:
        """``/``: the status page, with the workers' figures added up."""
        assert self.ops is not None
        msg_rate, point_rate = self.rates.per_second()
        snapshot = Snapshot(
            version=__version__,
            uptime_s=time.monotonic() - self._started_at,
            figures=read_figures(self.metrics.registry),
            messages_per_s=msg_rate,
            points_per_s=point_rate,
            checks=await self.ops.check_results(),
            parts=self.parts(),
            keeping_rejected=self.settings.keep_rejected,
        )
        return web.Response(text=render_status(snapshot), content_type="text/html", charset="utf-8")

    def forward(self, sig: signal.Signals) -> None:
        """Pass ``sig`` on to every running worker (SIGHUP: reload the thing models)."""
        log.info("signal received, passing it to the workers", signal=sig.name)
        for worker in self.workers:
            if worker.running and worker.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(sig)

    # readiness --------------------------------------------------------------------------------------------
    def readiness_checks(self) -> dict[str, Check]:
        """One ``/readyz`` check per worker: ready when that worker says it is, and says so in time."""
        return {f"worker {w.index}": self._check(w) for w in self.workers}

    def _check(self, worker: _Worker) -> Check:
        async def check() -> str | None:
            now = time.monotonic()
            if worker.deaths >= _CRASH_LOOP and now - worker.started_at < _STABLE_SECONDS:
                return f"crash loop: died {worker.deaths} times in a row"
            if not worker.running:
                return "restarting"
            if not worker.started.is_set():
                return "starting"
            if now - worker.status_at > _STATUS_STALE_SECONDS:
                return f"no status for {now - worker.status_at:.0f} s"
            if not worker.ready:
                return "; ".join(f"{name}: {why}" for name, why in worker.checks.items() if why != "ok") or "not ready"
            return None

        return check

    # shutdown ---------------------------------------------------------------------------------------------
    async def drain(self, deadline: float) -> bool:
        """SIGTERM every worker and wait up to ``deadline`` s for all to exit; True if all drained cleanly."""
        self.draining = True
        self._drain_started.set()
        draining = [w for w in self.workers if w.running]
        for worker in draining:
            if worker.process is not None:
                worker.process.send_signal(signal.SIGTERM)
        keepers = self._tasks[: len(self.workers)]
        _, pending = await asyncio.wait(keepers, timeout=deadline)
        if pending:
            log.warning("workers still draining at the deadline, killing them", workers=len(pending))
            await self.kill()
            await asyncio.wait(pending, timeout=5)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return not pending and all(w.exit_code == 0 for w in draining)

    async def kill(self) -> None:
        """SIGKILL every worker still running and reap it (start-up failed, or the drain deadline passed)."""
        self.draining = True
        self._drain_started.set()
        self.kill_now()
        for worker in self.workers:
            if worker.process is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(worker.process.wait(), 5)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def kill_now(self) -> None:
        """SIGKILL every worker still running, without waiting (a second signal: the operator wants out now)."""
        for worker in self.workers:
            if worker.running and worker.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()


async def _all_set(events: list[asyncio.Event]) -> None:
    for event in events:
        await event.wait()


def _describe(code: int | None) -> str:
    if code is None:
        return "not started"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    if not writer.is_closing():
        writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")


# --- a worker ---------------------------------------------------------------------------------------------------


def worker_main() -> None:
    """Entry point of a worker process: ``python -c ... INDEX FD``, started by the supervisor, never by hand."""
    index, fd = int(sys.argv[1]), int(sys.argv[2])
    # Ctrl+C reaches the whole process group: the supervisor forwards it as SIGTERM
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    structlog.contextvars.bind_contextvars(worker=index)  # on every log line of this worker
    try:
        code = _run(_worker(socket.socket(fileno=fd)))
    except PointgateError as exc:
        print(f"pointgate worker {index}: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _worker(sock: socket.socket) -> int:
    """A worker's life: settings from the supervisor, start, serve, drain on SIGTERM, exit 0."""
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=_LINE_LIMIT)
    first = json.loads(await reader.readline())
    settings = Settings(**first["settings"])
    configure_logging(
        level=settings.log_level, json={"auto": None, "json": True, "console": False}[settings.log_format]
    )
    link = _Link(writer)
    service = Service(settings, session_events=link)
    # SIGTERM drains; a second one changes nothing, since a whole process group (systemd, `timeout`) may get the
    # operator's SIGTERM beside the one the supervisor forwards. "Now" is the supervisor's SIGKILL.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await service.start()
    except BaseException:
        await service.abort()
        raise
    assert service.broker is not None
    link.broker = service.broker
    gc.freeze()  # as app.serve does: what start-up built lives until exit
    link.send({"t": "started"})
    loop.add_signal_handler(signal.SIGHUP, service.reload_requested, "SIGHUP")  # forwarded by the supervisor
    tasks = [
        asyncio.create_task(link.listen(reader, stop.set)),
        asyncio.create_task(link.report(service.readiness_checks(), service.page_parts)),
    ]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await service.stop()
    # Everything committed is answered and the database is closed. Leave now: amqtt's leftover reply tasks can
    # keep the loop's final task cancellation busy for many seconds under load, past the supervisor's deadline.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


class _Link:
    """A worker's end of the control socket; the broker's `SessionEvents`."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self.broker: PointgateBroker | None = None
        self._serial = 0
        # session key → (connection number, the broker's handle of that connection)
        self._connections: dict[str, tuple[int, object]] = {}
        self.evictions: set[asyncio.Task[None]] = set()

    def send(self, message: dict[str, Any]) -> None:
        _send(self._writer, message)

    def connected(self, client_id: str, connection: object, clean: bool) -> None:
        self._serial += 1
        self._connections[client_id] = (self._serial, connection)
        self.send({"t": "up", "key": client_id, "serial": self._serial, "clean": clean})

    def disconnected(self, client_id: str, connection: object, clean: bool) -> None:
        entry = self._connections.get(client_id)
        if entry is None or entry[1] is not connection:
            return  # a newer connection of that session is already here
        if clean:
            del self._connections[client_id]
        self.send({"t": "down", "key": client_id, "serial": entry[0], "clean": clean})

    async def listen(self, reader: asyncio.StreamReader, on_eof: Callable[[], None]) -> None:
        """Act on the supervisor's messages; when it is gone, drain and exit rather than serve on alone."""
        with contextlib.suppress(ConnectionError, ValueError):
            while line := await reader.readline():
                message = json.loads(line)
                if message.get("t") == "evict":
                    self._evict(str(message["key"]), int(message["serial"]))
        log.warning("supervisor gone, draining")
        on_eof()

    def _evict(self, key: str, serial: int) -> None:
        entry = self._connections.get(key)
        if entry is None or entry[0] != serial or self.broker is None:
            return  # ended already, or reconnected here since
        task = asyncio.create_task(self._evict_now(key, entry[1]))
        self.evictions.add(task)
        task.add_done_callback(self.evictions.discard)

    async def _evict_now(self, key: str, connection: object) -> None:
        assert self.broker is not None
        await self.broker.evict_session(key, connection)
        entry = self._connections.get(key)
        if entry is not None and entry[1] is connection:
            del self._connections[key]  # a persistent session's entry: the session itself is gone now

    async def report(self, checks: dict[str, Check], parts: Callable[[], Parts]) -> None:
        """Tell the supervisor this worker's readiness every second (also its heartbeat), and its status page
        parts (the models only when they changed: a reload)."""
        sent_models: object = None
        while True:
            results = await run_checks(checks, _STATUS_SECONDS)
            ready = all(result == "ok" for result in results.values())
            now = parts()
            page = now.to_json(with_models=now.models != sent_models)
            sent_models = now.models
            self.send({"t": "status", "ready": ready, "checks": results, "parts": page})
            await asyncio.sleep(_STATUS_SECONDS)
