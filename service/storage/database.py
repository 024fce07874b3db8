"""Which PostgreSQL pointgate talks to: the operator's (``--database-url``) or its own embedded one.

Commands that need the database (``serve``, ``migrate``, ``device …``, ``rejected …``) enter `database_dsn`;
with no URL it starts the embedded server under ``--data-dir`` (or adopts the one a running ``serve`` already
started). ``serve`` stops whatever it started or adopted; a short command stops only what it started itself,
so a ``device add`` next to a running ``serve`` leaves that server alone.

Connection failures are sorted here into two kinds (`classify`): *transient* (the server is down, starting or
unreachable: wait for it) and *fatal* (wrong password, unknown user or database, a host name that does not
resolve: waiting cannot help, so say so and stop).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

from service.errors import ConfigError, DatabaseError
from service.settings import Settings
from service.storage.embedded import EmbeddedPostgres

_FATAL_SQLSTATES = {
    "28000": "the server refused this user",  # invalid_authorization_specification (role, pg_hba)
    "28P01": "wrong password",  # invalid_password
    "3D000": "the database does not exist",  # invalid_catalog_name
    "42501": "permission denied",  # insufficient_privilege
}


@dataclass(frozen=True)
class Failure:
    """A connection failure in words: ``fatal`` when waiting for the database cannot help."""

    fatal: bool
    message: str


def where(dsn: str) -> str:
    """The database a DSN names, without its password: ``host:port/database`` (or the socket directory)."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "the database"
    query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
    host = host or query.get("host", "") or "localhost"
    port_text = str(port or query.get("port", "") or 5432)
    name = parts.path.lstrip("/") or (parts.username or "")
    return f"{host}:{port_text}/{name}"


def classify(exc: BaseException, dsn: str = "") -> Failure:
    """Sort a connection failure into transient or fatal and word it, naming the host and database."""
    place = where(dsn) if dsn else "the database"
    if isinstance(exc, socket.gaierror):
        if exc.errno == socket.EAI_AGAIN:  # the resolver itself is unreachable: may come back
            return Failure(False, f"{place}: cannot resolve the host name right now ({exc.strerror})")
        return Failure(True, f"{place}: the host name does not resolve ({exc.strerror}); check --database-url")
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None) or ""
        if sqlstate in _FATAL_SQLSTATES:
            return Failure(True, f"{place}: {_FATAL_SQLSTATES[sqlstate]}: {exc}; check --database-url")
        return Failure(False, f"{place}: {exc}")
    if isinstance(exc, ConnectionRefusedError):
        return Failure(False, f"{place}: connection refused (is PostgreSQL running there?)")
    if isinstance(exc, TimeoutError):
        return Failure(False, f"{place}: no answer (timed out)")
    if isinstance(exc, OSError):
        return Failure(False, f"{place}: {exc.strerror or exc}")
    return Failure(False, f"{place}: {exc or type(exc).__name__}")


def describe_database_error(exc: BaseException, dsn: str = "") -> str:
    """`classify`'s words alone, for one-shot commands (which stop on any failure)."""
    return classify(exc, dsn).message


async def open_connection(dsn: str, *, connect_timeout: float = 10) -> asyncpg.Connection:
    """One connection, or a `DatabaseError` that says where and why (no driver traceback)."""
    try:
        return await asyncpg.connect(dsn, timeout=connect_timeout)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseError(describe_database_error(exc, dsn)) from None


@asynccontextmanager
async def database_dsn(settings: Settings, *, own_server: bool = False) -> AsyncIterator[str]:
    """Yield a DSN for the configured database, managing the embedded server's lifetime if there is one.

    ``own_server`` (``serve``): stop the embedded server at the end even if it was already running (a
    killed pointgate leaves it up; the next ``serve`` adopts it and so owns it). Otherwise stop it only if
    this call started it.
    """
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
        if own_server or not was_running:
            await asyncio.to_thread(server.stop)


@asynccontextmanager
async def connect(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """One connection to the configured database, for short command-line operations."""
    check_embedded_choice(settings)
    async with database_dsn(settings) as dsn:
        conn = await open_connection(dsn)
        try:
            yield conn
        finally:
            await conn.close()


# -- which embedded database a running `serve` uses ------------------------------------------------------


def _registry_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"pointgate-{os.getuid()}"


def announce_serve(settings: Settings) -> Path | None:
    """Record that this process serves the embedded database in ``data_dir`` (see `check_embedded_choice`)."""
    if settings.database_url is not None:
        return None
    directory = _registry_dir()
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        path = directory / f"serve-{os.getpid()}.json"
        path.write_text(json.dumps({"pid": os.getpid(), "data_dir": str(settings.data_dir.resolve())}))
    except OSError:
        return None  # only a convenience for the operator: never a reason not to serve
    return path


def retract_serve(path: Path | None) -> None:
    """Remove the record `announce_serve` wrote."""
    if path is not None:
        with suppress(OSError):
            path.unlink()


def running_serves() -> list[tuple[int, Path]]:
    """(pid, data dir) of every live ``serve`` of this user on the embedded database."""
    found: list[tuple[int, Path]] = []
    for path in sorted(_registry_dir().glob("serve-*.json")):
        try:
            record = json.loads(path.read_text())
            pid = int(record["pid"])
            os.kill(pid, 0)
        except ProcessLookupError:
            with suppress(OSError):
                path.unlink()  # left by a killed serve
            continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found.append((pid, Path(record["data_dir"])))
    return found


def check_embedded_choice(settings: Settings) -> None:
    """Refuse a command that would silently use another embedded database than the running ``serve``.

    Only when the data directory was not chosen (no ``--data-dir``, environment or config entry): a choice made
    on purpose is followed.
    """
    if settings.database_url is not None or "data_dir" in settings.model_fields_set:
        return
    mine = settings.data_dir.resolve()
    others = [(pid, d) for pid, d in running_serves() if d != mine]
    if others and not any(d == mine for _, d in running_serves()):
        pid, theirs = others[0]
        raise ConfigError(
            f"pointgate serve (pid {pid}) uses the embedded database in {theirs}, but this command would use "
            f"{mine}; pass --data-dir {theirs} (or --data-dir {mine} to use that one on purpose)"
        )
