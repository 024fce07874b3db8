"""The writer against a real PostgreSQL: parallel connections, commit-then-resolve, last write wins, drain."""

from __future__ import annotations

import asyncio
import random

import asyncpg

from service.pipeline import Row
from service.storage.writer import PointWriter, shard_of


def row(dk: str, point: str, t: int, value: object) -> Row:
    return Row("inverter01", dk, point, t, value, None, 1_700_000_000_000)


async def stored(conn: asyncpg.Connection, dk: str, point: str) -> list[tuple[int, str]]:
    """(ms, value as JSON text) of one series, by time."""
    records = await conn.fetch(
        "SELECT (extract(epoch FROM ts) * 1000)::int8 AS t, value::text AS value FROM measurepoints"
        " WHERE device_key = $1 AND point = $2 ORDER BY ts",
        dk,
        point,
    )
    return [(r["t"], r["value"]) for r in records]


async def test_each_future_resolves_after_its_rows_are_committed(migrated_dsn: str) -> None:
    """200 messages from 40 devices over 4 connections: once a future resolves, its rows are visible to others."""
    writer = PointWriter(migrated_dsn, connections=4, batch_points=50)
    writer.start()
    check = await asyncpg.connect(migrated_dsn)
    try:
        jobs = [(f"d{i % 40}", i) for i in range(200)]
        futures = [writer.submit([row(dk, f"p{k}", i, float(i)) for k in range(5)]) for dk, i in jobs]
        assert writer.queued_points == 1000
        assert {shard_of("inverter01", dk, 4) for dk, _ in jobs} == {0, 1, 2, 3}, "every connection is used"
        for (dk, i), future in random.Random(1).sample(list(zip(jobs, futures, strict=True)), 30):
            await asyncio.wait_for(future, 10)
            assert (i, str(i)) in await stored(check, dk, "p0")
        await asyncio.wait_for(asyncio.gather(*futures), 10)
        assert await writer.drain(5)
        assert writer.queued_points == 0
        assert await check.fetchval("SELECT count(*) FROM measurepoints") == 1000
    finally:
        await check.close()
        await writer.close()


async def test_last_write_wins_across_concurrent_batches(migrated_dsn: str) -> None:
    """Fifty re-sends of one key, interleaved with other devices' traffic on 3 connections: the last value stays."""
    writer = PointWriter(migrated_dsn, connections=3, batch_points=7)
    writer.start()
    check = await asyncpg.connect(migrated_dsn)
    try:
        futures = []
        for version in range(50):
            futures.append(writer.submit([row("same", "temp", 1000, float(version))]))
            futures.extend(writer.submit([row(f"other{k}", "temp", version, 1.0)]) for k in range(5))
            if version % 10 == 0:
                await asyncio.sleep(0)  # let some batches start while more arrive
        await asyncio.wait_for(asyncio.gather(*futures), 10)
        assert await stored(check, "same", "temp") == [(1000, "49")]
    finally:
        await check.close()
        await writer.close()


async def test_a_message_for_several_devices_resolves_once_all_are_committed(migrated_dsn: str) -> None:
    """A gateway's batch spans shards; its one future resolves after every device's rows are in."""
    writer = PointWriter(migrated_dsn, connections=4)
    writer.start()
    check = await asyncpg.connect(migrated_dsn)
    try:
        devices = [f"sub{i}" for i in range(12)]
        assert len({shard_of("inverter01", d, 4) for d in devices}) > 1
        future = writer.submit([row(d, "temp", 5, d) for d in devices])
        await asyncio.wait_for(future, 10)
        for d in devices:
            assert await stored(check, d, "temp") == [(5, f'"{d}"')]
    finally:
        await check.close()
        await writer.close()


async def test_bad_data_fails_only_its_own_message(migrated_dsn: str) -> None:
    """A row PostgreSQL refuses fails its message; the other messages in the same batch are committed."""
    writer = PointWriter(migrated_dsn, connections=1)
    writer.start()
    try:
        good = [writer.submit([row("d1", "temp", t, 1.0)]) for t in range(3)]
        bad = writer.submit([row("d1", "temp", 10, "\x00")])  # NUL cannot be stored in text
        results = await asyncio.wait_for(asyncio.gather(*good, bad, return_exceptions=True), 10)
        assert results[:3] == [None, None, None]
        assert isinstance(results[3], asyncpg.PostgresError)
        assert await writer.drain(5)
    finally:
        await writer.close()


async def test_wait_for_room_holds_back_past_the_bound(migrated_dsn: str) -> None:
    """Past max_queued_points the writer says it is full, and wait_for_room returns once commits free room."""
    writer = PointWriter(migrated_dsn, connections=2, max_queued_points=10)
    futures = [writer.submit([row("d1", f"p{i}", 1, 1.0) for i in range(6)]) for _ in range(2)]
    assert writer.full
    waiter = asyncio.ensure_future(writer.wait_for_room())
    await asyncio.sleep(0)
    assert not waiter.done()
    writer.start()
    try:
        await asyncio.wait_for(waiter, 10)
        assert not writer.full
        await asyncio.wait_for(asyncio.gather(*futures), 10)
    finally:
        await writer.close()
