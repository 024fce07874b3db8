"""The event writer against real PostgreSQL: committed before its future resolves, idempotent, behind ``events``."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from service.events import EventRow
from service.storage.events import EventWriter, event_columns


def ev(dk: str, event: str, time_ms: int, values: dict[str, object], event_type: str | None = "WARN") -> EventRow:
    return EventRow("pk", dk, event, event_type, time_ms, values, 1_700_000_000_000)


def test_columns_keep_the_last_of_a_repeated_key() -> None:
    """Two events with one (device, event, ts) in a batch become one row, the later values."""
    cols = event_columns([ev("d", "e", 1, {"a": 1}), ev("d", "f", 1, {"b": 2}), ev("d", "e", 1, {"a": 3})])
    assert cols[2] == ["e", "f"] and cols[6] == ['{"a":3}', '{"b":2}']


async def test_events_are_committed_before_their_futures_resolve(migrated_dsn: str) -> None:
    """Each future resolves only once its event can be read back from the ``events`` view, by another connection."""
    writer = EventWriter(migrated_dsn)
    writer.start()
    reader = await asyncpg.connect(migrated_dsn)
    try:
        futures = [writer.submit(ev("d1", "overTemp", 1_700_000_000_000 + i, {"temp": 80.0 + i})) for i in range(3)]
        futures.append(writer.submit(ev("d2", "anything", 1_700_000_000_000, {"x": [1, "a"]}, None)))
        for future in futures:
            await asyncio.wait_for(future, 10)
            # the view answers from a different connection: the row is committed, not merely sent
        rows = await reader.fetch("SELECT * FROM events ORDER BY device_key, ts")
        assert [(r["device_key"], r["event_id"], r["event_type"], r["output"]) for r in rows] == [
            ("d1", "overTemp", "WARN", '{"temp": 80.0}'),
            ("d1", "overTemp", "WARN", '{"temp": 81.0}'),
            ("d1", "overTemp", "WARN", '{"temp": 82.0}'),
            ("d2", "anything", None, '{"x": [1, "a"]}'),
        ]
        assert rows[0]["ts"].timestamp() == 1_700_000_000 and rows[0]["received_at"].timestamp() == 1_700_000_000
        assert list(rows[0].keys()) == [
            "product_key",
            "device_key",
            "event_id",
            "event_type",
            "ts",
            "output",
            "received_at",
        ]
        # a re-send of the same event at the same time replaces it (last write wins)
        await asyncio.wait_for(writer.submit(ev("d1", "overTemp", 1_700_000_000_000, {"temp": 99.0})), 10)
        again = await reader.fetch("SELECT output FROM events WHERE device_key = 'd1' ORDER BY ts")
        assert [r["output"] for r in again] == ['{"temp": 99.0}', '{"temp": 81.0}', '{"temp": 82.0}']
        assert await writer.drain(5) and writer.queued == 0
    finally:
        await reader.close()
        await writer.close()


async def test_analytics_role_reads_events_and_writes_nothing(migrated_dsn: str) -> None:
    """pointgate_analytics may SELECT the ``events`` view, not the table under it, and may not write."""
    writer = EventWriter(migrated_dsn)
    writer.start()
    try:
        await asyncio.wait_for(writer.submit(ev("d1", "overTemp", 5, {"temp": 1.0})), 10)
    finally:
        await writer.close()
    conn = await asyncpg.connect(migrated_dsn)
    try:
        await conn.execute("SET ROLE pointgate_analytics")
        assert await conn.fetchval("SELECT count(*) FROM events") == 1
        for statement in ("DELETE FROM device_events", "SELECT count(*) FROM device_events"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()


async def test_an_event_the_database_refuses_fails_alone(migrated_dsn: str) -> None:
    """An event PostgreSQL refuses (here an event type outside the constraint) fails its own future, not its batch's."""
    writer = EventWriter(migrated_dsn)
    bad = writer.submit(ev("d1", "x", 1, {"a": 1}, "FATAL"))
    good = writer.submit(ev("d1", "x", 2, {"a": 2}))
    writer.start()  # both wait in one batch
    try:
        await asyncio.wait_for(good, 10)
        with pytest.raises(asyncpg.CheckViolationError):
            await asyncio.wait_for(bad, 10)
    finally:
        await writer.close()
