"""The migration runner: applies ``migrations/NNNN_name.sql`` in order, each exactly once.

* Idempotent, and safe when several run at once: everything happens under a session advisory lock held on
  the one connection given, so a second runner waits, then finds nothing left to do.
* One transaction per file: a file that fails leaves nothing of itself behind (so a migration cannot use
  ``CREATE INDEX CONCURRENTLY`` or its own ``BEGIN``/``COMMIT``).
* ``schema_migrations`` records each applied file with the sha256 of its bytes; a file edited after it was
  applied is refused, since the database would silently differ from what the file says.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from service.errors import MigrationError

# Any fixed bigint works; this one is the first 8 bytes of sha256("pointgate.migrate"), so it will not
# collide with another application's advisory locks by accident.
_LOCK_KEY = int.from_bytes(hashlib.sha256(b"pointgate.migrate").digest()[:8], "big", signed=True)
_NAME = re.compile(r"(\d{4,})_([A-Za-z0-9_]+)\.sql")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    """One migration file: ``0001_points.sql`` is version 1, name ``points``."""

    version: int
    name: str
    path: Path
    checksum: str


def discover(directory: Path) -> list[Migration]:
    """The ``*.sql`` migrations in ``directory``, by version; other files are ignored."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.fullmatch(path.name)
        if match is None:
            raise MigrationError(f"{path}: a migration is named NNNN_name.sql (e.g. 0001_points.sql)")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"{path}: version {version} is also {found[version].path.name}")
        checksum = hashlib.sha256(path.read_bytes()).hexdigest()
        found[version] = Migration(version, match.group(2), path, checksum)
    return [found[v] for v in sorted(found)]


async def apply_migrations(conn: asyncpg.Connection, directory: Path) -> list[Migration]:
    """Apply every migration not applied yet, in order; return those applied by this call."""
    migrations = discover(directory)
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        # created under the lock: two concurrent CREATE TABLE IF NOT EXISTS can still collide
        await conn.execute(_CREATE_TABLE)
        applied = await _applied(conn)
        todo = _unapplied(migrations, applied)
        for migration in todo:
            await _apply(conn, migration)
        return todo
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


async def pending_migrations(conn: asyncpg.Connection, directory: Path) -> list[Migration]:
    """The migrations not applied yet (all of them on an empty database); refuses an edited one."""
    migrations = discover(directory)
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    applied = await _applied(conn) if exists else {}
    return _unapplied(migrations, applied)


async def _applied(conn: asyncpg.Connection) -> dict[int, str]:
    rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
    return {row["version"]: row["checksum"] for row in rows}


def _unapplied(migrations: list[Migration], applied: dict[int, str]) -> list[Migration]:
    for migration in migrations:
        recorded = applied.get(migration.version)
        if recorded is not None and recorded != migration.checksum:
            raise MigrationError(
                f"{migration.path.name} was edited after it was applied (checksum {migration.checksum[:12]}… "
                f"differs from the recorded {recorded[:12]}…); add a new migration instead of editing it"
            )
    return [m for m in migrations if m.version not in applied]


async def _apply(conn: asyncpg.Connection, migration: Migration) -> None:
    sql = migration.path.read_bytes()
    if hashlib.sha256(sql).hexdigest() != migration.checksum:
        raise MigrationError(f"{migration.path.name} changed while migrations were running")
    try:
        text = sql.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MigrationError(f"{migration.path.name}: not UTF-8 ({exc})") from exc
    try:
        async with conn.transaction():
            await conn.execute(text)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
    except asyncpg.PostgresError as exc:
        raise MigrationError(f"{migration.path.name}{_where(text, exc)}: {_describe(exc)}") from exc


def _describe(exc: asyncpg.PostgresError) -> str:
    detail = getattr(exc, "detail", None)
    return f"{exc.sqlstate} {exc}" + (f" ({detail})" if detail else "")


def _where(text: str, exc: asyncpg.PostgresError) -> str:
    # PostgreSQL reports syntax errors as a 1-based character offset into the file
    position = getattr(exc, "position", None)
    if not position or not str(position).isdigit():
        return ""
    return f" line {text.count(chr(10), 0, int(position) - 1) + 1}"
