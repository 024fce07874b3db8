"""The issue-10 layout against a real PostgreSQL: same analytics answers as before, upgrade keeping every row,
latest values, the series dictionary under concurrency, partitions, retention and the analytics role."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from service.pipeline import Row
from service.resources import migrations_dir
from service.storage.migrate import apply_migrations
from service.storage.partitions import (
    MS_PER_DAY,
    Policy,
    drop_expired,
    ensure_buckets,
    list_partitions,
    partition_name,
    status,
)
from service.storage.writer import PointWriter
from tests.conftest import _create, _drop, _run, with_database
from tests.storage.legacy import old_migrations, write_old

NOW = int(time.time() * 1000)
TODAY = NOW // MS_PER_DAY * MS_PER_DAY
OLD = 1_420_070_400_000  # 2015-01-01: outside any window, goes to the default partition
FUTURE = 4_070_908_800_000  # 2099-01-01: a wrong clock
SNAPSHOT = (
    "SELECT product_key, device_key, point, ts, value::text AS value, value_num, quality, received_at"
    " FROM {view} ORDER BY product_key, device_key, point, ts"
)
COLUMNS = (
    "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = $1 ORDER BY ordinal_position"
)


@pytest.fixture
def second_dsn(pg_server: str) -> Iterator[str]:
    """Another empty database beside `pg_dsn`, dropped after the test."""
    name = f"t_{uuid.uuid4().hex}"
    _run(_create(pg_server, name))
    try:
        yield with_database(pg_server, name)
    finally:
        _run(_drop(pg_server, name))


def r(dk: str, point: str, t: int, value: object, quality: int | None = None, received: int = NOW) -> Row:
    return Row("inverter01", dk, point, t, value, quality, received)


def sample_batches() -> list[list[Row]]:
    """Every value type, quality, re-sends with other values, several days, a far past and a wrong future."""
    first = [
        r("d1", "temp", TODAY - 2 * MS_PER_DAY + 1, 20.5),
        r("d1", "temp", TODAY - MS_PER_DAY + 1, 21),
        r("d1", "temp", TODAY + 1, 22.25),
        r("d1", "Power", TODAY + 1, 7, quality=9),
        r("d1", "label", TODAY + 2, "on"),
        r("d1", "flag", TODAY + 2, True),
        r("d1", "branchCurr", TODAY + 3, ["1.02", "2.02"]),
        r("d1", "state", TODAY + 3, {"a": 1}),
        r("d2", "temp", OLD, -1.5),
        r("d2", "temp", FUTURE, 99.0),
        r("d2", "temp", TODAY + 5, 3.0),
    ]
    resend = [
        r("d1", "temp", TODAY + 1, 23.0, received=NOW + 10),  # last write wins
        r("d1", "label", TODAY + 2, "off", received=NOW + 10),
        r("d3", "temp", TODAY - MS_PER_DAY + 7, 1.0),
    ]
    late = [r("d1", "temp", TODAY - MS_PER_DAY + 2, 5.0)]  # older than d1/temp's newest: latest unchanged
    return [first, resend, late]


async def snapshot(conn: asyncpg.Connection, view: str = "measurepoints") -> list[tuple[object, ...]]:
    return [tuple(rec) for rec in await conn.fetch(SNAPSHOT.format(view=view))]


async def write_new(dsn: str, batches: Sequence[Sequence[Row]], **kwargs: object) -> None:
    writer = PointWriter(dsn, maintenance=False, **kwargs)  # type: ignore[arg-type]
    writer.start()
    try:
        for batch in batches:
            await asyncio.wait_for(writer.submit(batch), 20)
    finally:
        await writer.close()


async def test_measurepoints_returns_what_the_old_layout_returned(pg_dsn: str, second_dsn: str, tmp_path: Path) -> None:
    """Old layout + old writer, then the upgrade, then a fresh database with the new writer: one answer."""
    await write_old(pg_dsn, sample_batches(), old_migrations(tmp_path / "old"))
    conn = await asyncpg.connect(pg_dsn)
    try:
        before = await snapshot(conn)
        columns_before = [tuple(c) for c in await conn.fetch(COLUMNS, "measurepoints")]
        assert len(before) == 13
        applied = await apply_migrations(conn, migrations_dir())
        assert applied[0].version == 3
        assert await snapshot(conn) == before, "the upgrade kept every row, unchanged"
        assert [tuple(c) for c in await conn.fetch(COLUMNS, "measurepoints")] == columns_before
        assert await conn.fetchval("SELECT to_regclass('point_data')") is None
        days = {p.name for p in await list_partitions(conn)}
        assert {partition_name(TODAY), partition_name(OLD), partition_name(FUTURE)} <= days
        upgraded_latest = await snapshot(conn, "measurepoints_latest")
    finally:
        await conn.close()

    conn = await asyncpg.connect(second_dsn)
    try:
        await apply_migrations(conn, migrations_dir())
        await write_new(second_dsn, sample_batches(), connections=2)
        assert await snapshot(conn) == before, "the new writer stores what the old one did"
        assert await snapshot(conn, "measurepoints_latest") == upgraded_latest
    finally:
        await conn.close()


async def test_latest_values_move_only_forward_in_device_time(migrated_dsn: str) -> None:
    """The newest point per series; a late older point leaves it; a re-send of the same time replaces it."""
    await write_new(migrated_dsn, sample_batches())
    conn = await asyncpg.connect(migrated_dsn)
    try:
        latest = {
            (rec["device_key"], rec["point"]): (rec["ts"], rec["value"])
            for rec in await conn.fetch("SELECT device_key, point, ts, value::text FROM measurepoints_latest")
        }
        assert len(latest) == 8  # one per series
        ts, value = latest[("d1", "temp")]
        assert (int(ts.timestamp() * 1000), value) == (TODAY + 1, "23")
        assert latest[("d1", "label")][1] == '"off"'
        assert int(latest[("d2", "temp")][0].timestamp() * 1000) == FUTURE
        expected = await conn.fetch(
            "SELECT DISTINCT ON (device_key, point) device_key, point, ts, value::text FROM measurepoints"
            " ORDER BY device_key, point, ts DESC"
        )
        assert {(e[0], e[1]): (e[2], e[3]) for e in expected} == latest
    finally:
        await conn.close()


async def test_concurrent_writers_share_one_series_dictionary(migrated_dsn: str) -> None:
    """Two writers (two instances) meeting the same 300 new series at once: one id each, every point stored."""
    keys = [(f"d{i % 30}", f"p{i // 30}") for i in range(300)]
    first = [[r(dk, p, TODAY + 1, 1.0) for dk, p in keys]]
    second = [[r(dk, p, TODAY + 2, 2.0) for dk, p in reversed(keys)]]
    await asyncio.gather(write_new(migrated_dsn, first, connections=3), write_new(migrated_dsn, second, connections=2))
    conn = await asyncpg.connect(migrated_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM series") == 300
        assert await conn.fetchval("SELECT count(*) FROM measurepoints") == 600
        assert await conn.fetchval("SELECT count(*) FROM measurepoints_latest WHERE value_num = 2") == 300
    finally:
        await conn.close()


async def test_partitions_on_demand_default_for_the_rest_and_adoption(migrated_dsn: str) -> None:
    """In-window times get their partition; far past and future go to the default; creating a range that has
    rows in the default moves them into it, and nothing is lost on the way."""
    policy = Policy(width=timedelta(days=1), ahead=2, backfill=timedelta(days=30))
    await write_new(migrated_dsn, sample_batches(), policy=policy)
    conn = await asyncpg.connect(migrated_dsn)
    try:
        names = {p.name for p in await list_partitions(conn)}
        assert {partition_name(TODAY), partition_name(TODAY - MS_PER_DAY), partition_name(TODAY - 2 * MS_PER_DAY)} <= (
            names
        )
        assert partition_name(OLD) not in names and partition_name(FUTURE) not in names
        assert await conn.fetchval("SELECT count(*) FROM points_default") == 2
        before = await snapshot(conn)

        created = await ensure_buckets(conn, [OLD // MS_PER_DAY], MS_PER_DAY)
        assert [p.name for p in created] == [partition_name(OLD)]
        assert await conn.fetchval("SELECT count(*) FROM points_default") == 1
        moved = f'SELECT count(*) FROM "{partition_name(OLD)}"'  # noqa: S608 - our own partition name
        assert await conn.fetchval(moved) == 1
        assert await snapshot(conn) == before
        assert await ensure_buckets(conn, [OLD // MS_PER_DAY], MS_PER_DAY) == [], "already there: nothing to do"
    finally:
        await conn.close()


async def test_retention_drops_whole_partitions_only(migrated_dsn: str) -> None:
    """Past the retention a partition is dropped (its rows go with it, no DELETE); newer ones and the default stay."""
    await write_new(migrated_dsn, sample_batches())
    conn = await asyncpg.connect(migrated_dsn)
    try:
        two_days_ago = partition_name(TODAY - 2 * MS_PER_DAY)
        policy = Policy(retention=timedelta(days=1))
        dropped = await drop_expired(conn, policy, TODAY + 1000)
        assert [p.name for p in dropped] == [two_days_ago]
        names = {p.name for p in await list_partitions(conn)}
        assert two_days_ago not in names and "points_default" in names and partition_name(TODAY) in names
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM measurepoints WHERE ts < to_timestamp($1 / 1000.0)", TODAY - MS_PER_DAY
            )
            == 1
        )
        deletes = await conn.fetchval(
            "SELECT coalesce(sum(n_tup_del), 0) FROM pg_stat_user_tables WHERE relname LIKE 'points%'"
        )
        assert deletes == 0
    finally:
        await conn.close()


async def test_status_lists_partitions_with_sizes(migrated_dsn: str) -> None:
    """Every partition, the default first, with bytes on disk and a row estimate once analysed."""
    await write_new(migrated_dsn, sample_batches())
    conn = await asyncpg.connect(migrated_dsn)
    try:
        await conn.execute("ANALYZE points")
        rows = await status(conn)
        assert rows[0].name == "points_default" and rows[0].lo_ms is None
        today = next(p for p in rows if p.name == partition_name(TODAY))
        assert today.bytes > 0 and today.rows_estimate is not None and today.rows_estimate >= 6
    finally:
        await conn.close()


async def test_analytics_role_reads_views_and_writes_nothing(migrated_dsn: str) -> None:
    """pointgate_analytics may SELECT the views and the series; it may not write, nor read the registry."""
    await write_new(migrated_dsn, sample_batches())
    conn = await asyncpg.connect(migrated_dsn)
    try:
        await conn.execute("SET ROLE pointgate_analytics")
        assert await conn.fetchval("SELECT count(*) FROM measurepoints") == 13
        assert await conn.fetchval("SELECT count(*) FROM measurepoints_latest") == 8
        for statement in (
            "DELETE FROM points",
            "INSERT INTO series (product_key, device_key, point) VALUES ('a', 'b', 'c')",
            "SELECT count(*) FROM devices",
            "DROP TABLE points_default",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()


async def test_a_query_holding_the_table_does_not_fail_writes(migrated_dsn: str) -> None:
    """A long transaction holding ``points`` delays partition creation, never the data: the points wait in the
    default partition (the message is answered), and the partition created later takes them over."""
    day = TODAY - 5 * MS_PER_DAY
    reader = await asyncpg.connect(migrated_dsn)
    try:
        tx = reader.transaction()
        await tx.start()
        await reader.fetch("SELECT count(*) FROM measurepoints")  # holds AccessShareLock on points until commit
        await write_new(migrated_dsn, [[r("d1", "temp", day + 1, 4.5)]])
        assert await reader.fetchval("SELECT count(*) FROM points_default") == 1, "stored meanwhile"
        await tx.rollback()
        await ensure_buckets(reader, [day // MS_PER_DAY], MS_PER_DAY)
        assert await reader.fetchval("SELECT count(*) FROM points_default") == 0
        assert await reader.fetchval("SELECT value_num FROM measurepoints WHERE device_key = 'd1'") == 4.5
    finally:
        await reader.close()
