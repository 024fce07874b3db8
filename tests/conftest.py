"""A real PostgreSQL for the test session, and a fresh database per test.

By default the session starts its own server with pointgate's `EmbeddedPostgres` (durability off, on its socket
and on a loopback TCP port, under a temporary directory the unprivileged user can enter when we are root) and
stops it at the end. With ``POINTGATE_TEST_DATABASE_URL`` set, tests use that server instead (its user needs
CREATEDB).

The fixtures are synchronous, so sync and async tests can both use them; each database operation runs on a
private event loop that never touches the loop pytest-asyncio gives the test.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from service.resources import migrations_dir
from service.storage.embedded import EmbeddedPostgres
from service.storage.migrate import apply_migrations
from tests.support import free_port

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    # a loop_factory keeps asyncio.Runner from installing (and later clearing) the thread's current loop
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        return runner.run(coro)


def with_database(dsn: str, name: str) -> str:
    """``dsn`` pointing at database ``name`` instead (works for host/port and socket-directory DSNs)."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def _create(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        # FORCE (PostgreSQL 13+) ends connections a failed test left open
        force = " WITH (FORCE)" if conn.get_server_version().major >= 13 else ""
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"{force}')
    finally:
        await conn.close()


async def _migrate(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await apply_migrations(conn, migrations_dir())
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The admin DSN of the session's PostgreSQL."""
    external = os.environ.get("POINTGATE_TEST_DATABASE_URL")
    if external:
        yield external
        return
    tmp = Path(tempfile.mkdtemp(prefix="pointgate-test-"))
    tmp.chmod(0o755)  # ours: as root, the PostgreSQL user must be able to enter it
    # on its socket and on a loopback TCP port too: a container on the host's network reaches it there
    server = EmbeddedPostgres(tmp / "data", durable=False, port=free_port())
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def pg_dsn(pg_server: str) -> Iterator[str]:
    """A DSN to a new, empty database, dropped after the test."""
    name = f"t_{uuid.uuid4().hex}"
    _run(_create(pg_server, name))
    try:
        yield with_database(pg_server, name)
    finally:
        _run(_drop(pg_server, name))


@pytest.fixture
def migrated_dsn(pg_dsn: str) -> str:
    """Like `pg_dsn`, with every migration in ``migrations/`` applied."""
    _run(_migrate(pg_dsn))
    return pg_dsn
