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
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
from amqtt.errors import BrokerError

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
from service.devices.secretbox import SecretBox, key_path, load_or_create_key
from service.errors import ConfigError
from service.model.thingmodel import ThingModel, load_models
from service.ops import metrics
from service.ops.http import Check, OpsServer
from service.ops.logs import get_logger
from service.resources import migrations_dir
from service.settings import Settings, parse_bind
from service.storage.database import database_dsn
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
class _State:
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
        self.state: _State | None = None
        self.broker: PointgateBroker | None = None
        self.writer: PointWriter | None = None
        self.event_writer: EventWriter | None = None
        self.ops: OpsServer | None = None
        self.auth_server: AuthServer | None = None
        self.dsn = ""
        self._pool: asyncpg.Pool | None = None
        self._migrator: asyncio.Task[None] | None = None
        self._topology: asyncio.Task[None] | None = None
        self.gateways: Gateways | None = None

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
        models = load_models(settings.models)  # a malformed model stops start-up here (ModelError)
        metrics.MODELS_LOADED.set(len(models))
        self.state = state = _State(models)
        config = broker_config(settings)  # refuses a bad TLS setup before anything is started
        check_auth_settings(settings)
        policy = policy_from_settings(settings)  # and a partition width / retention that cannot work

        self.dsn = dsn = await self._stack.enter_async_context(database_dsn(settings))
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
        broker.authenticator = DeviceAuthenticator(pool, box, allow_anonymous=settings.allow_anonymous)
        broker.ingest = ingest = Ingest(writer, models, max_payload_bytes=settings.max_payload_bytes)
        broker.points = writer  # while the writer is full, devices' sockets are not read
        # topology, sub-device sessions and events; every other request on a device topic is answered 1009
        sessions = SubDeviceSessions(settings.max_sub_devices_per_gateway)
        broker.gateway_sessions = sessions
        self.gateways = gateways = Gateways(
            pool, box, sessions, ingest=ingest, max_payload_bytes=settings.max_payload_bytes
        )
        events = EventIngest(event_writer, models, max_payload_bytes=settings.max_payload_bytes)
        broker.requests = Requests(handlers(gateways, events))
        self._migrator = asyncio.create_task(_migrate_when_reachable(dsn, state))
        self._topology = asyncio.create_task(_refresh_sub_devices(pool, ingest, sessions, state))
        writer.start()
        event_writer.start()
        # give migrations a moment, so a healthy start logs "started" with the schema in place; a database
        # that is down does not hold start-up (the migrator keeps trying and readiness says why)
        await asyncio.wait({self._migrator}, timeout=5)
        # amqtt logs its own traceback for a failed bind before raising; ours below is the one line that says it
        amqtt_log = logging.getLogger("amqtt.broker")
        amqtt_log.disabled = True
        try:
            await broker.start()
        except BrokerError as exc:
            # one line naming the options, as the multi-process supervisor says it, not amqtt's traceback
            cause = exc.__cause__
            reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(exc)
            raise ConfigError(f"cannot listen (--mqtt-bind / --mqtts-bind): {reason}") from None
        finally:
            amqtt_log.disabled = False

        http = None
        if self.session_events is None:  # a worker's supervisor serves these for all workers
            host, port = parse_bind(settings.http_bind, default_host="127.0.0.1")
            # the broker auth endpoints (docs/scale-out.md), for a cluster broker in front: off unless guarded
            routes, self.auth_server = endpoints(
                settings, DeviceAuthenticator(pool, box, allow_anonymous=False, allow_activation=False)
            )
            self.ops = ops = OpsServer(host, port, self.readiness_checks(), routes=routes)
            await ops.start()
            if self.auth_server is not None:
                await self.auth_server.start()
            http = f"{host}:{ops.port}"
        log.info(
            "pointgate started" if self.session_events is None else "worker listening",
            version=__version__,
            mqtt=f"{parse_bind(settings.mqtt_bind)[0]}:{self.mqtt_port}",
            mqtts=settings.mqtts_bind,
            http=http,
            database="embedded" if settings.database_url is None else "external",
            psql=f"psql '{dsn}'" if settings.database_url is None else None,
            models=len(models),
            anonymous=settings.allow_anonymous,
        )

    async def abort(self) -> None:
        """Release what a failed `start` left open (the embedded database among it)."""
        await self._stack.aclose()

    def readiness_checks(self) -> dict[str, Check]:
        """What ``/readyz`` asks: the database answers, migrations are applied, models are loaded."""
        assert self._pool is not None and self.state is not None
        pool, state = self._pool, self.state

        async def database_check() -> str | None:
            async with pool.acquire(timeout=1) as conn:
                await conn.fetchval("SELECT 1")
            return None

        async def migrations_check() -> str | None:
            return None if state.migrated else state.problems.get("migrations", "migrations not applied yet")

        async def models_check() -> str | None:
            return None if state.models else "no thing models loaded"

        return {"database": database_check, "migrations": migrations_check, "models": models_check}

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
    await stop.wait()
    await service.stop()
    return 0


async def _migrate_when_reachable(dsn: str, state: _State) -> None:
    # the database may still be starting (compose) or down: keep trying, readiness says why meanwhile
    while True:
        try:
            conn = await asyncpg.connect(dsn, timeout=5)
            try:
                applied = await apply_migrations(conn, migrations_dir())
                if await pending_migrations(conn, migrations_dir()):
                    raise RuntimeError("migrations still pending after applying")
            finally:
                await conn.close()
            for migration in applied:
                log.info("migration applied", version=migration.version, name=migration.name)
            state.migrated = True
            state.schema_ready.set()
            state.problems.pop("migrations", None)
            return
        except Exception as exc:
            state.problems["migrations"] = f"migrations not applied: {exc or type(exc).__name__}"
            log.warning("database not ready, retrying", error=str(exc) or type(exc).__name__)
            await asyncio.sleep(_DB_RETRY_SECONDS)


async def _refresh_sub_devices(pool: asyncpg.Pool, ingest: Ingest, sessions: SubDeviceSessions, state: _State) -> None:
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
