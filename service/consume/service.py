"""`pointgate consume` assembled: start-up order, readiness, and the drain on SIGTERM, top to bottom.

Start-up: thing models (refuse to start on a bad one) → database (the operator's, or the embedded one) →
migrations (in the background, like ``serve``; safe when several consumers start at once) → writer → the
broker link (connects and reconnects by itself: an unreachable broker does not stop start-up, readiness says
so) → ops endpoint.

Drain (SIGTERM): readiness off → UNSUBSCRIBE (the broker gives new messages to the other consumers) →
commit what is held → its replies and PUBACKs go out → DISCONNECT → database last.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable

import asyncpg
from aiohttp import web

from service import __version__
from service.devices.auth import DeviceAuthenticator
from service.devices.brokerauth import AuthServer, auth_enabled, check_auth_settings, endpoints
from service.devices.registry import sub_device_pairs
from service.devices.secretbox import SecretBox, key_path, load_or_create_key
from service.model.thingmodel import load_models
from service.ops import metrics
from service.ops.http import OpsServer
from service.ops.logs import get_logger
from service.resources import migrations_dir
from service.settings import Settings, parse_bind, parse_broker_url
from service.storage.database import database_dsn
from service.storage.migrate import apply_migrations, pending_migrations
from service.storage.partitions import policy_from_settings
from service.storage.writer import PointWriter

from .consumer import Consumer
from .link import BrokerLink, LinkOptions

log = get_logger("pointgate.consume")

_DB_RETRY_SECONDS = 1.0
_TOPOLOGY_REFRESH_SECONDS = 2.0


def link_options(settings: Settings) -> LinkOptions:
    """The broker connection the settings describe; each filter is prefixed with ``$share/<group>/``."""
    assert settings.broker_url is not None
    tls, host, port = parse_broker_url(settings.broker_url)
    group = settings.consume_group
    return LinkOptions(
        host=host,
        port=port,
        tls=tls,
        username=settings.broker_username,
        password=settings.broker_password.get_secret_value() if settings.broker_password else None,
        client_id=settings.broker_client_id or "",
        protocol=settings.broker_protocol,
        keepalive=settings.broker_keepalive,
        session_expiry=settings.broker_session_expiry,
        filters=tuple(f"$share/{group}/{topic_filter}" for topic_filter in settings.consume_filters),
        receive_maximum=settings.consume_max_in_flight,
        cafile=str(settings.broker_tls_cafile) if settings.broker_tls_cafile else None,
        certfile=str(settings.broker_tls_certfile) if settings.broker_tls_certfile else None,
        keyfile=str(settings.broker_tls_keyfile) if settings.broker_tls_keyfile else None,
    )


class ConsumeService:
    """`start` brings a consumer up, `stop` drains it; `consume` adds the signal handling."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stack = contextlib.AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []
        self._pool: asyncpg.Pool | None = None
        self._schema_ready = asyncio.Event()
        self._migration_problem: str | None = "migrations not applied yet"
        self.writer: PointWriter | None = None
        self.link: BrokerLink | None = None
        self.consumer: Consumer | None = None
        self.ops: OpsServer | None = None
        self.auth_server: AuthServer | None = None
        self.dsn = ""

    async def start(self) -> None:
        """Start everything, in dependency order."""
        settings = self.settings
        models = load_models(settings.models)  # a malformed model stops start-up here (ModelError)
        metrics.MODELS_LOADED.set(len(models))
        options = link_options(settings)
        check_auth_settings(settings)
        self.dsn = dsn = await self._stack.enter_async_context(database_dsn(settings))
        self._pool = pool = await asyncpg.create_pool(dsn, min_size=0, max_size=2, timeout=5)
        self.writer = writer = PointWriter(
            dsn,
            batch_points=settings.write_batch_points,
            connections=settings.write_connections,
            schema_ready=self._schema_ready,
            policy=policy_from_settings(settings),
        )
        self.link = link = BrokerLink(options, lambda delivery: consumer.on_delivery(delivery))
        self.consumer = consumer = Consumer(
            link,
            writer,
            models,
            max_payload_bytes=settings.max_payload_bytes,
            max_in_flight=settings.consume_max_in_flight,
        )
        writer.start()
        self._tasks = [
            asyncio.create_task(self._migrate_when_reachable(dsn), name="pointgate-migrate"),
            asyncio.create_task(self._refresh_sub_devices(pool, consumer), name="pointgate-topology"),
            asyncio.create_task(link.run(), name="pointgate-broker-link"),
        ]

        async def broker_check() -> str | None:
            return None if link.subscribed else (link.problem or "not subscribed")

        async def database_check() -> str | None:
            async with pool.acquire(timeout=1) as conn:
                await conn.fetchval("SELECT 1")
            return None

        async def migrations_check() -> str | None:
            return self._migration_problem

        checks: dict[str, Callable[[], Awaitable[str | None]]] = {
            "broker": broker_check,
            "database": database_check,
            "migrations": migrations_check,
        }
        routes: list[web.RouteDef] = []
        if auth_enabled(settings):
            # the broker logs devices in through us: the registry's secrets need the key they were sealed with
            box = SecretBox(load_or_create_key(key_path(settings)))
            routes, self.auth_server = endpoints(
                settings, DeviceAuthenticator(pool, box, allow_anonymous=False, allow_activation=False)
            )
        host, port = parse_bind(settings.http_bind, default_host="127.0.0.1")
        self.ops = ops = OpsServer(host, port, checks, routes=routes)
        await ops.start()
        if self.auth_server is not None:
            await self.auth_server.start()
        log.info(
            "pointgate consume started",
            version=__version__,
            broker=f"{options.host}:{options.port}",
            tls=options.tls,
            client_id=options.client_id or "(default)",
            filters=list(options.filters),
            http=f"{host}:{ops.port}",
            database="embedded" if settings.database_url is None else "external",
            models=len(models),
        )

    async def stop(self) -> None:
        """Drain and stop, in order."""
        assert self.link is not None and self.writer is not None and self.consumer is not None
        link, writer, consumer = self.link, self.writer, self.consumer
        deadline = self.settings.drain_timeout
        # 1. Readiness goes false first.
        if self.ops is not None:
            self.ops.set_draining()
        log.info("draining", deadline_s=deadline)
        # 2. Leave the shared subscriptions: new messages go to the other consumers from now on.
        await link.unsubscribe(min(2.0, deadline))
        # 3. Commit what is held; replies and PUBACKs go out as each commit lands.
        if not await writer.drain(deadline) or not await consumer.wait_idle(1.0):
            log.warning("drain deadline passed; unacknowledged messages stay with the broker", held=consumer.in_flight)
        # 4. Send the last replies and PUBACKs, then DISCONNECT.
        await link.close(2.0)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # 5. The database last.
        await writer.close()
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 2)
        if self.auth_server is not None:
            await self.auth_server.stop()
        if self.ops is not None:
            await self.ops.stop()
        await self._stack.aclose()
        log.info("pointgate consume stopped", received=consumer.received, acknowledged=consumer.acknowledged)

    async def aclose_after_failed_start(self) -> None:
        """Release what a failed `start` had already taken."""
        for task in self._tasks:
            task.cancel()
        for server in (self.auth_server, self.ops):
            if server is not None:
                await server.stop()
        if self.writer is not None:
            await self.writer.close()
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await self._pool.close()
        await self._stack.aclose()

    async def _migrate_when_reachable(self, dsn: str) -> None:
        # several consumers may do this at once: migrations take an advisory lock (service/storage/migrate.py)
        while True:
            try:
                conn = await asyncpg.connect(dsn, timeout=5)
                try:
                    for migration in await apply_migrations(conn, migrations_dir()):
                        log.info("migration applied", version=migration.version, name=migration.name)
                    if await pending_migrations(conn, migrations_dir()):
                        raise RuntimeError("migrations still pending after applying")
                finally:
                    await conn.close()
                self._migration_problem = None
                self._schema_ready.set()
                return
            except Exception as exc:
                self._migration_problem = f"migrations not applied: {exc or type(exc).__name__}"
                log.warning("database not ready, retrying", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(_DB_RETRY_SECONDS)

    async def _refresh_sub_devices(self, pool: asyncpg.Pool, consumer: Consumer) -> None:
        # the pipeline is pure: it consults a snapshot of the registry's gateway relations
        await self._schema_ready.wait()
        while True:
            try:
                consumer.sub_devices = await sub_device_pairs(pool)
            except Exception as exc:
                log.warning("could not refresh sub-devices", error=str(exc) or type(exc).__name__)
            await asyncio.sleep(_TOPOLOGY_REFRESH_SECONDS)


async def consume(settings: Settings) -> int:
    """Run a consumer until SIGTERM/SIGINT; return the process exit code."""
    service = ConsumeService(settings)
    stop = _stop_on_signal()
    try:
        await service.start()
    except BaseException:
        await service.aclose_after_failed_start()
        raise
    await stop.wait()
    await service.stop()
    return 0


def _stop_on_signal() -> asyncio.Event:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning("second signal, exiting immediately", signal=sig.name)
            os._exit(1)
        log.info("signal received", signal=sig.name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    return stop
