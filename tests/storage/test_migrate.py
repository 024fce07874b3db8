"""The migration runner against a real PostgreSQL: order, idempotence, concurrency, edits and failures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from service.errors import MigrationError
from service.resources import migrations_dir
from service.storage.migrate import apply_migrations, discover, pending_migrations

FIRST = "CREATE TABLE a (id int PRIMARY KEY);\n"
SECOND = "CREATE TABLE b (id int PRIMARY KEY, a_id int REFERENCES a (id));\nINSERT INTO a VALUES (1);\n"


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(sql)
    return directory


@pytest.fixture
def two(tmp_path: Path) -> Path:
    return write(tmp_path / "migrations", {"0001_a.sql": FIRST, "0002_b.sql": SECOND})


@pytest_asyncio.fixture
async def conn(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(pg_dsn)
    yield connection
    await connection.close()


async def test_applies_all_in_order(conn: asyncpg.Connection, two: Path) -> None:
    """Every file is applied in version order and recorded with the sha256 of its bytes."""
    applied = await apply_migrations(conn, two)
    assert [m.version for m in applied] == [1, 2]
    assert await conn.fetchval("SELECT count(*) FROM a") == 1
    rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations ORDER BY version")
    assert [(r["version"], r["name"], r["checksum"]) for r in rows] == [
        (m.version, m.name, m.checksum) for m in applied
    ]


async def test_second_run_applies_nothing(conn: asyncpg.Connection, two: Path) -> None:
    """Running again is a no-op: nothing re-applied, nothing recorded twice."""
    await apply_migrations(conn, two)
    assert await apply_migrations(conn, two) == []
    assert await conn.fetchval("SELECT count(*) FROM a") == 1


async def test_concurrent_runs_apply_each_file_once(pg_dsn: str, tmp_path: Path) -> None:
    """Two runners started together apply each file exactly once between them, without errors."""
    # the sleep keeps the first runner inside the lock while the second arrives
    directory = write(tmp_path / "m", {"0001_a.sql": "SELECT pg_sleep(0.3);\n" + FIRST, "0002_b.sql": SECOND})
    first, second = await asyncpg.connect(pg_dsn), await asyncpg.connect(pg_dsn)
    try:
        results = await asyncio.gather(apply_migrations(first, directory), apply_migrations(second, directory))
        assert sorted(m.version for result in results for m in result) == [1, 2]
        assert await first.fetchval("SELECT count(*) FROM schema_migrations") == 2
    finally:
        await first.close()
        await second.close()


async def test_edited_migration_is_refused(conn: asyncpg.Connection, two: Path) -> None:
    """A file changed after it was applied stops both apply and pending, naming the file."""
    await apply_migrations(conn, two)
    (two / "0001_a.sql").write_text(FIRST + "-- tweaked\n")
    (two / "0003_c.sql").write_text("CREATE TABLE c (id int);\n")
    with pytest.raises(MigrationError, match=r"0001_a\.sql was edited"):
        await apply_migrations(conn, two)
    with pytest.raises(MigrationError, match=r"0001_a\.sql"):
        await pending_migrations(conn, two)
    assert await conn.fetchval("SELECT to_regclass('c')") is None


async def test_broken_file_applies_nothing_of_itself(conn: asyncpg.Connection, two: Path) -> None:
    """A failing file raises with its name, line and PostgreSQL's message; none of it stays applied."""
    write(two, {"0003_broken.sql": "CREATE TABLE half (id int);\nSELEC 1;\n"})
    with pytest.raises(MigrationError, match=r'0003_broken\.sql line 2: 42601 syntax error at or near "SELEC"'):
        await apply_migrations(conn, two)
    assert await conn.fetchval("SELECT to_regclass('half')") is None
    assert await conn.fetchval("SELECT array_agg(version ORDER BY version) FROM schema_migrations") == [1, 2]
    assert await conn.fetchval("SELECT pg_try_advisory_lock(1)"), "the runner released its lock"


async def test_pending_reports_new_files(conn: asyncpg.Connection, two: Path) -> None:
    """pending_migrations lists all files on an empty database, then only the ones added since."""
    assert [m.version for m in await pending_migrations(conn, two)] == [1, 2]
    await apply_migrations(conn, two)
    assert await pending_migrations(conn, two) == []
    write(two, {"0003_c.sql": "CREATE TABLE c (id int);\n"})
    assert [m.name for m in await pending_migrations(conn, two)] == ["c"]


@pytest.mark.parametrize("name", ["1_points.sql", "0001-points.sql", "0001_.sql", "points.sql", "0001_a b.sql"])
def test_discover_rejects_bad_names(tmp_path: Path, name: str) -> None:
    """A .sql file not named NNNN_name.sql is an error, not silently skipped."""
    write(tmp_path, {"0001_ok.sql": FIRST, name: FIRST})
    with pytest.raises(MigrationError, match=r"NNNN_name\.sql"):
        discover(tmp_path)


def test_discover_rejects_duplicate_versions(tmp_path: Path) -> None:
    """Two files with the same version number are refused, naming both."""
    write(tmp_path, {"0001_a.sql": FIRST, "00001_b.sql": FIRST})
    with pytest.raises(MigrationError, match="version 1 is also") as caught:
        discover(tmp_path)
    assert "0001_a.sql" in str(caught.value) and "00001_b.sql" in str(caught.value)


def test_discover_sorts_by_version_and_ignores_other_files(tmp_path: Path) -> None:
    """Versions sort numerically (0010 after 0009) and non-SQL files are ignored."""
    write(tmp_path, {"0010_j.sql": "", "0009_i.sql": "", "README.md": "notes"})
    assert [(m.version, m.name) for m in discover(tmp_path)] == [(9, "i"), (10, "j")]


async def test_repository_migrations_apply_cleanly(migrated_dsn: str) -> None:
    """The shipped migrations/ apply on an empty database and leave nothing pending."""
    conn = await asyncpg.connect(migrated_dsn)
    try:
        assert await pending_migrations(conn, migrations_dir()) == []
        recorded = await conn.fetchval("SELECT count(*) FROM schema_migrations")
        assert recorded == len(discover(migrations_dir()))
    finally:
        await conn.close()
