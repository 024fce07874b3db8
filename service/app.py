"""The composition root: start-up order, readiness, and the drain on shutdown, top to bottom.

Start-up: thing models (refuse to start on a bad one) → database (embedded or the operator's) → migrations →
writer → broker listeners → ops endpoint. The database may be down at start: the service starts anyway,
keeps devices connected, answers no 200, and catches up by itself when PostgreSQL returns.

With ``--workers N`` (N > 1) `serve` hands over to the supervisor (service/supervisor.py), which runs N of these
services as worker processes sharing the MQTT port, and owns the embedded database and the ops endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from aiohttp import web

from service import __version__
from service.broker.config import broker_config
from service.broker.connection import Limits
from service.broker.events import EventIngest
from service.broker.gateways import Gateways, SubDeviceSessions
from service.broker.ingest import Ingest
from service.broker.overrides import PointgateBroker, SessionEvents
from service.broker.requests import Requests, handlers
from service.devices import registry
from service.devices.auth import DeviceAuthenticator
from service.devices.brokerauth import AuthServer, check_auth_settings, endpoints
from service.devices.presence import Presence
from service.devices.secretbox import SecretBox, key_path, load_or_create_key
from service.errors import ConfigError, DatabaseError, MigrationError, ModelError
from service.model.reload import RELOAD_CHANNEL, RELOAD_RESULT_CHANNEL
from service.model.thingmodel import ThingModel, check_paths, load_models
from service.ops import metrics
from service.ops.http import Check, OpsServer
from service.ops.logs import get_logger
from service.ops.rejected import RejectedStore
from service.ops.status import EXAMPLES, Example, ModelRow, Parts, Rates, Snapshot, read_figures
from service.ops.status import render as render_status
from service.resources import migrations_dir
from service.settings import Settings, parse_bind
from service.storage.database import announce_serve, classify, database_dsn, retract_serve
from service.storage.embedded import psql_command
from service.storage.events import EventWriter
from service.storage.migrate import apply_migrations, pending_migrations
from service.storage.partitions import policy_from_settings
from service.storage.writer import PointWriter

log = get_logger("pointgate")

HANDLED_SIGNALS = (
    signal.SIGINT,  # Ctrl+C
    signal.SIGTERM,  # docker stop, kill, Kubernetes
)
_DB_RETRY_SECONDS = 1.0
_TOPOLOGY_REFRESH_SECONDS = 2.0


@dataclass
class State:
    """What readiness looks at."""

    models: dict[str, ThingModel]
    migrated: bool = False
    schema_ready: asyncio.Event = field(default_factory=asyncio.Event)
    draining: bool = False
    problems: dict[str, str] = field(default_factory=dict)


class Service:
    """pointgate assembled: `start` brings it up, `stop` drains it. `serve` adds the signal handling.

    With ``session_events`` it is one worker of several (service/supervisor.py): its listeners share their ports
    with the other workers (SO_REUSEPORT), device sessions are reported to ``session_events``, and it serves no
    ops endpoint (the supervisor does, from `readiness_checks` and the workers' metrics).
    """

    def __init__(self, settings: Settings, *, session_events: SessionEvents | None = None) -> None:
        self.settings = settings
        self.session_events = session_events
        self._stack = contextlib.AsyncExitStack()
        self.state: State | None = None
        self.broker: PointgateBroker | None = None
        self.writer: PointWriter | None = None
        self.event_writer: EventWriter | None = None
        self.event_ingest: EventIngest | None = None
        self.ops: OpsServer | None = None
        self.auth_server: AuthServer | None = None
        self.dsn = ""
        self._pool: asyncpg.Pool | None = None
        self._migrator: asyncio.Task[None] | None = None
        self._topology: asyncio.Task[None] | None = None
        self.gateways: Gateways | None = None
        self._announced: Path | None = None
        self.presence: Presence | None = None
        self.rejected: RejectedStore | None = None
        self.ingest: Ingest | None = None
        self.rates = Rates(metrics.REGISTRY)
        self._sampler: asyncio.Task[None] | None = None
        self._started_at = time.monotonic()
        self._reloading = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self._listening = False

    @property
    def mqtt_port(self) -> int:
        """The plain MQTT listener's real port (useful with port 0)."""
        return self._port("default")

    @property
    def mqtts_port(self) -> int:
        """The TLS listener's real port."""
        return self._port("tls")

    def _port(self, listener: str) -> int:
        assert self.broker is not None
        return self.broker.listener_port(listener)

    async def start(self) -> None:
        """Start everything, in dependency order."""
        settings = self.settings
        models = load_all_models(settings.models)  # malformed models stop start-up here, every one of them named
        metrics.MODELS_LOADED.set(len(models))
        self.state = state = State(models)
        config = broker_config(settings)  # refuses a bad TLS setup before anything is started
        check_auth_settings(settings)
        policy = policy_from_settings(settings)  # and a partition width / retention that cannot work

        if warning := anonymous_warning(settings):
            log.warning(warning, mqtt=settings.mqtt_bind)
        # whatever embedded server this finds (its own, or one a killed pointgate left running), it stops on exit
        self.dsn = dsn = await self._stack.enter_async_context(database_dsn(settings, own_server=True))
        self._announced = announce_serve(settings)
        self._stack.callback(retract_serve, self._announced)
        # after the embedded server prepared the data directory (its modes matter to the PostgreSQL user)
        box = SecretBox(load_or_create_key(key_path(settings)))
        self._pool = pool = await asyncpg.create_pool(dsn, min_size=0, max_size=2, timeout=5)
        self.writer = writer = PointWriter(
            dsn,
            batch_points=settings.write_batch_points,
            connections=settings.write_connections,
            schema_ready=state.schema_ready,
            policy=policy,
        )
        self.event_writer = event_writer = EventWriter(dsn, schema_ready=state.schema_ready)
        self.broker = broker = PointgateBroker(
            config,
            connect_timeout=settings.connect_timeout,
            max_packet_bytes=settings.max_payload_bytes + 65539,
            limits=Limits(
                max_inflight=settings.max_inflight_requests,
                max_queued_bytes=settings.max_queued_bytes,
                max_subscriptions=settings.max_subscriptions,
                max_wildcard_subscriptions=settings.max_wildcard_subscriptions,
                max_qos2_inflight=settings.max_qos2_inflight,
            ),
            session_expiry=settings.session_expiry,
            reuse_port=self.session_events is not None,
        )
        broker.session_events = self.session_events
        broker.authenticator = authenticator = DeviceAuthenticator(pool, box, allow_anonymous=settings.allow_anonymous)
        self.presence = presence = Presence(dsn, pool, broker, authenticator, schema_ready=state.schema_ready)
        presence.channels[RELOAD_CHANNEL] = self.reload_requested
        self.rejected = rejected = RejectedStore(
            pool,
            keep=settings.keep_rejected,
            payload_bytes=settings.rejected_payload_bytes,
            max_count=settings.rejected_max_count,
            max_age_hours=settings.rejected_max_age.total_seconds() / 3600,
            schema_ready=state.schema_ready,
        )
        self.ingest = ingest = Ingest(writer, models, max_payload_bytes=settings.max_payload_bytes)
        ingest.on_reject = rejected.refused
        broker.ingest = ingest
        broker.points = writer  # while the writer is full, devices' sockets are not read
        # topology, sub-device sessions and events; every other request on a device topic is answered 1009
        sessions = SubDeviceSessions(settings.max_sub_devices_per_gateway)
        broker.gateway_sessions = sessions
        self.gateways = gateways = Gateways(
            pool, box, sessions, ingest=ingest, max_payload_bytes=settings.max_payload_bytes
        )
        self.event_ingest = events = EventIngest(event_writer, models, max_payload_bytes=settings.max_payload_bytes)
        broker.requests = Requests(handlers(gateways, events))
        # A wrong password, a missing database, a host that does not resolve or an edited migration cannot get
        # better by waiting: they stop start-up here with one line. A database that is merely down (refused,
        # timed out, starting) does not hold start-up: the migrator keeps trying and readiness says why.
        if not await migrate_once(dsn, state, fatal_only=True):
            log.warning("database not ready, waiting for it", reason=state.problems.get("migrations"))
        self._migrator = asyncio.create_task(_migrate_when_reachable(dsn, state))
        self._topology = asyncio.create_task(_refresh_sub_devices(pool, ingest, sessions, state))
        writer.start()
        event_writer.start()
        http = None
        if self.session_events is None:  # a worker's supervisor serves these for all workers
            # the ops listener first: a busy --http-bind fails before any device can connect
            host, port = parse_bind(settings.http_bind, default_host="127.0.0.1")
            # the broker auth endpoints (docs/scale-out.md), for a cluster broker in front: off unless guarded
            routes, self.auth_server = endpoints(
                settings, DeviceAuthenticator(pool, box, allow_anonymous=False, allow_activation=False)
            )
            self.ops = ops = OpsServer(
                host,
                port,
                self.readiness_checks(),
                routes=routes,
                notes=self.notes,
                status_page=self._status_page,
            )
            try:
                await ops.start()
            except OSError as exc:
                raise ConfigError(f"--http-bind {host}:{port}: cannot listen: {bind_reason(exc)}") from None
            self._stack.push_async_callback(ops.stop)
            if self.auth_server is not None:
                await self.auth_server.start()
            http = f"{host}:{ops.port}"
        await listen(broker.start(), settings)
        self._listening = True
        presence.start()
        rejected.start()
        if self.session_events is None:  # a worker's figures are added up by its supervisor, which samples them
            self._sampler = asyncio.create_task(self.rates.run())
        log.info(
            "pointgate started" if self.session_events is None else "worker listening",
            version=__version__,
            mqtt=f"{parse_bind(settings.mqtt_bind)[0]}:{self.mqtt_port}",
            mqtts=settings.mqtts_bind,
            http=http,
            database="embedded" if settings.database_url is None else "external",
            psql=f"{psql_command()} '{dsn}'" if settings.database_url is None else None,
            models=len(models),
            anonymous=settings.allow_anonymous,
        )

    async def abort(self) -> None:
        """Release what a failed `start` left open (the embedded database among it)."""
        await self._stack.aclose()

    def notes(self) -> dict[str, str]:
        """What readiness shows beside its checks without failing them (a refused model reload)."""
        assert self.state is not None
        return {k: v for k, v in self.state.problems.items() if k == "models_reload"}

    def readiness_checks(self) -> dict[str, Check]:
        """What ``/readyz`` asks: the database answers, migrations are applied, models are loaded, MQTT listens."""
        assert self._pool is not None and self.state is not None
        pool, state, dsn = self._pool, self.state, self.dsn

        async def database_check() -> str | None:
            try:
                async with pool.acquire(timeout=1) as conn:
                    await conn.fetchval("SELECT 1")
            except Exception as exc:  # say which database and why, not just the driver's exception
                return classify(exc, dsn).message
            return None

        async def migrations_check() -> str | None:
            return None if state.migrated else state.problems.get("migrations", "migrations not applied yet")

        async def models_check() -> str | None:
            return None if state.models else "no thing models loaded"

        async def listener_check() -> str | None:
            return None if self._listening else "MQTT listeners not started"

        return {
            "database": database_check,
            "migrations": migrations_check,
            "models": models_check,
            "mqtt": listener_check,
        }

    async def reload_models(self) -> tuple[bool, str]:
        """Re-read the thing models; a valid set replaces the old one, an invalid one is refused and the old kept.

        Connections and queued messages are untouched: a request is decided against the models of the moment it
        arrives, and what was already accepted is committed as it was.
        """
        assert self.state is not None and self.ingest is not None
        state, ingest = self.state, self.ingest
        async with self._reloading:
            try:
                models = await asyncio.to_thread(load_all_models, self.settings.models)
            except ConfigError as exc:
                reason = f"reload refused, previous models kept: {exc}".replace("\n", "; ")
                state.problems["models_reload"] = reason
                log.error("thing models reload refused; previous models kept", reason=str(exc).replace("\n", "; "))
                return False, reason
            ingest.models = state.models = models
            if self.event_ingest is not None:
                self.event_ingest.models = models  # event posts are checked against the same models
            metrics.MODELS_LOADED.set(len(models))
            state.problems.pop("models_reload", None)
            log.info("thing models reloaded", models=len(models), products=sorted(models))
            return True, f"{len(models)} thing model(s) loaded"

    def reload_requested(self, payload: str) -> None:
        """``pointgate model reload`` (or another tool) asked every serve to reload: do it and answer."""

        async def run() -> None:
            ok, message = await self.reload_models()
            if self._pool is not None and self.presence is not None:
                instance = self.presence.instance  # the same host:pid the device sessions name
                answer = json.dumps(
                    {"request": payload, "instance": instance, "ok": ok, "message": message}, sort_keys=True
                )
                with contextlib.suppress(Exception):
                    await self._pool.execute("SELECT pg_notify($1, $2)", RELOAD_RESULT_CHANNEL, answer)

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def page_parts(self) -> Parts:
        """What this serve knows for the status page: its refusals, reload notes and models."""
        assert self.state is not None
        rejected = self.rejected
        examples = {
            code: [
                Example(r.received_at.isoformat(timespec="seconds"), r.product_key, r.device_key, r.topic, r.reason)
                for r in list(refusals)[:EXAMPLES]
            ]
            for code, refusals in (rejected.latest.items() if rejected is not None else ())
        }
        return Parts(
            rejections=dict(rejected.counts) if rejected is not None else {},
            examples=examples,
            notes=self.notes(),
            models=[
                ModelRow(m.product_key, len(m.points), m.path)
                for m in sorted(self.state.models.values(), key=lambda m: m.product_key)
            ],
        )

    async def _status_page(self, request: web.Request) -> web.Response:
        assert self.ops is not None
        msg_rate, point_rate = self.rates.per_second()
        snapshot = Snapshot(
            version=__version__,
            uptime_s=time.monotonic() - self._started_at,
            figures=read_figures(metrics.REGISTRY),
            messages_per_s=msg_rate,
            points_per_s=point_rate,
            checks=await self.ops.check_results(),
            parts=self.page_parts(),
            keeping_rejected=self.settings.keep_rejected,
        )
        return web.Response(text=render_status(snapshot), content_type="text/html", charset="utf-8")

    async def stop(self) -> None:
        """Drain and stop, in order; each step says why it is where it is."""
        assert self.broker is not None and self.writer is not None and self.state is not None
        assert self.event_writer is not None
        broker, writer, event_writer, ops = self.broker, self.writer, self.event_writer, self.ops
        # 1. Readiness goes false first, so load balancers stop sending new devices here.
        self.state.draining = True
        metrics.DRAINING.set(1)
        if ops is not None:
            ops.set_draining()
        log.info("draining", deadline_s=self.settings.drain_timeout)
        # 2. Stop accepting connections; connected devices stay until their data is answered.
        broker.stop_accepting()
        # 3. Commit what is queued; its replies and PUBACKs go out as each commit lands.
        drained = await asyncio.gather(
            writer.drain(self.settings.drain_timeout), event_writer.drain(self.settings.drain_timeout)
        )
        if not all(drained):
            log.warning(
                "drain deadline passed; unanswered data stays with the devices",
                points=writer.queued_points,
                events=event_writer.queued,
            )
        # 4. Let the replies those commits queued reach the devices before their connections close.
        await _flush_replies(broker, deadline=1.0)
        # 5. Close device connections and the broker.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(broker.shutdown(), 5)
        # 6. The database last: migrations task, writer, login pool, then the embedded server.
        for task in (self._migrator, self._topology):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.gateways is not None:
            await self.gateways.close()
        await writer.close()
        await event_writer.close()
        if self.presence is not None:
            await self.presence.stop()
        if self.rejected is not None:
            await self.rejected.stop()
        if self._sampler is not None:
            self._sampler.cancel()
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 2)
        if self.auth_server is not None:
            await self.auth_server.stop()
        if ops is not None:
            await ops.stop()
        await self._stack.aclose()
        log.info("pointgate stopped")


async def serve(settings: Settings) -> int:
    """Run pointgate until SIGTERM/SIGINT; return the process exit code."""
    if settings.workers > 1:
        from service.supervisor import supervise

        return await supervise(settings)
    service = Service(settings)
    stop = install_signal_handlers()
    try:
        await service.start()
    except BaseException:
        await service.abort()
        raise
    # everything built at start-up lives until exit: keep it out of the collector's way, so full collections
    # (29-102 ms measured under load) stop landing in the reply-latency tail
    gc.freeze()
    # SIGHUP re-reads the thing models (as `pointgate model reload` does through the database)
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, service.reload_requested, "SIGHUP")
    await stop.wait()
    await service.stop()
    return 0


async def migrate_once(dsn: str, state: State, *, fatal_only: bool = False) -> bool:
    """Connect and apply migrations once; True when the schema is current.

    A transient failure is recorded for readiness and returns False. A fatal one (`classify`) or a
    MigrationError raises with ``fatal_only`` (start-up), and is recorded (and logged as an error) otherwise.
    """
    try:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            applied = await apply_migrations(conn, migrations_dir())
            if await pending_migrations(conn, migrations_dir()):
                raise MigrationError("migrations still pending after applying")
        finally:
            await conn.close()
    except MigrationError as exc:
        state.problems["migrations"] = f"migrations refused: {exc}"
        if fatal_only:
            raise
        log.error("migrations refused", error=str(exc))
        return False
    except Exception as exc:
        failure = classify(exc, dsn)
        state.problems["migrations"] = f"database not reachable: {failure.message}"
        if failure.fatal:
            if fatal_only:
                raise DatabaseError(failure.message) from None
            log.error("database refuses pointgate", reason=failure.message)
        return False
    for migration in applied:
        log.info("migration applied", version=migration.version, name=migration.name)
    state.migrated = True
    state.schema_ready.set()
    state.problems.pop("migrations", None)
    return True


async def _migrate_when_reachable(dsn: str, state: State) -> None:
    # the database may still be starting (compose) or down: keep trying, readiness says why meanwhile
    last = ""
    while not state.migrated:
        if await migrate_once(dsn, state):
            log.info("database reachable, schema current")
            return
        reason = state.problems.get("migrations", "")
        if reason != last:  # one line per change of reason, not one per second
            log.warning("database not ready, retrying", reason=reason, every_s=_DB_RETRY_SECONDS)
            last = reason
        await asyncio.sleep(_DB_RETRY_SECONDS)


async def listen(start: Awaitable[None], settings: Settings) -> None:
    """Start the MQTT listeners; a port in use is one line naming the option and the address."""
    quiet = _Quiet()
    amqtt_log = logging.getLogger("amqtt.broker")
    amqtt_log.addFilter(quiet)  # amqtt logs its own traceback before raising; the error below says it all
    try:
        await start
    except Exception as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
        text = str(cause)
        option, bind = "--mqtt-bind", settings.mqtt_bind
        if settings.mqtts_bind:
            _, tls_port = parse_bind(settings.mqtts_bind)
            if f", {tls_port})" in text:
                option, bind = "--mqtts-bind", settings.mqtts_bind
        raise ConfigError(f"{option} {bind}: cannot listen: {bind_reason(cause)}") from None
    finally:
        amqtt_log.removeFilter(quiet)


def bind_reason(exc: BaseException) -> str:
    """Why a listener could not bind, in the words an operator searches for."""
    text = str(exc)
    for known in ("address already in use", "cannot assign requested address", "permission denied"):
        if known in text.lower():
            return known
    strerror = getattr(exc, "strerror", None)
    return str(strerror) if strerror else text


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def anonymous_warning(settings: Settings) -> str | None:
    """The warning `--allow-anonymous` deserves on a listener other machines can reach, or None."""
    if not settings.allow_anonymous or _loopback(settings.mqtt_bind):
        return None
    return "anonymous devices allowed on a public listener: anyone who can reach it may publish (development only)"


def _loopback(bind: str) -> bool:
    host, _ = parse_bind(bind)
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def load_all_models(directory: Path) -> dict[str, ThingModel]:
    """Every model in ``directory``; a bad set raises ConfigError naming every problem of every file."""
    try:
        return load_models(directory)
    except ModelError:
        errors = check_paths([directory])
        if not errors:
            raise
        raise ConfigError("\n".join(str(e) for e in errors)) from None


async def _refresh_sub_devices(pool: asyncpg.Pool, ingest: Ingest, sessions: SubDeviceSessions, state: State) -> None:
    # the pipeline is pure and synchronous, so it consults a snapshot of the gateway relations rather
    # than the database; a registry change takes effect within one refresh period, and so does the end of
    # a sub-device session whose sub-device was disabled or left the gateway's topology
    while True:
        if state.migrated:
            try:
                mark = sessions.mark()
                ingest.sub_devices = pairs = await registry.sub_device_pairs(pool)
                sessions.prune(pairs, mark)
            except Exception as exc:
                log.warning("could not refresh sub-devices", error=str(exc) or type(exc).__name__)
        await asyncio.sleep(_TOPOLOGY_REFRESH_SECONDS)


def install_signal_handlers(
    signals: tuple[signal.Signals, ...] = HANDLED_SIGNALS, *, on_second: Callable[[], None] | None = None
) -> asyncio.Event:
    """An event set by the first of ``signals``; a second one calls ``on_second`` and ends the process (exit 1)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            # a second signal: the operator wants out now, drain or not
            log.warning("second signal, exiting immediately", signal=sig.name)
            if on_second is not None:
                on_second()
            os._exit(1)
        log.info("signal received", signal=sig.name)
        stop.set()

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    return stop


async def _flush_replies(broker: PointgateBroker, *, deadline: float) -> None:
    # amqtt signals nothing when a reply has left, so look every 10 ms, for at most ``deadline`` seconds
    for _ in range(int(deadline / 0.01)):
        if not broker.replies_pending():
            return
        await asyncio.sleep(0.01)
