"""Which PostgreSQL pointgate talks to: the operator's (``--database-url``) or its own embedded one.

Commands that need the database (``serve``, ``migrate``, ``device …``) enter `database_dsn`; with no URL it
starts the embedded server under ``--data-dir`` (or adopts the one a running ``serve`` already started) and
stops it on exit only if it started it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from service.settings import Settings
from service.storage.embedded import EmbeddedPostgres


@asynccontextmanager
async def database_dsn(settings: Settings) -> AsyncIterator[str]:
    """Yield a DSN for the configured database, managing the embedded server's lifetime if there is one."""
    if settings.database_url is not None:
        yield settings.database_url.get_secret_value()
        return
    server = EmbeddedPostgres(settings.data_dir, run_as=settings.embedded_user, port=settings.embedded_port)
    was_running = await asyncio.to_thread(server.is_running)
    dsn = await asyncio.to_thread(server.start)
    try:
        yield dsn
    finally:
        # a `device add` next to a running `serve` must not stop the server that `serve` is using
        if not was_running:
            await asyncio.to_thread(server.stop)


@asynccontextmanager
async def connect(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """One connection to the configured database, for short command-line operations."""
    async with database_dsn(settings) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            yield conn
        finally:
            await conn.close()
