"""The running service keeps the points table: partitions ahead at start-up, retention from the settings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncpg

from service.storage.partitions import MS_PER_DAY, ensure_buckets, partition_name
from tests.support import SAMPLE, Device, RunningService, fetch, resume_topic


async def create_partition(dsn: str, day_ms: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await ensure_buckets(conn, [day_ms // MS_PER_DAY], MS_PER_DAY)
    finally:
        await conn.close()


def partitions(dsn: str) -> set[str]:
    return {
        r["relname"]
        for r in fetch(
            dsn,
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'points'::regclass",
        )
    }


def test_serve_creates_partitions_ahead_and_applies_retention(
    start_service: Callable[..., RunningService], migrated_dsn: str
) -> None:
    """At start-up the service creates today's and the next partitions and drops those past retention; a
    device's point of two days ago gets its own partition (created on demand) and its 200."""
    today = int(time.time() * 1000) // MS_PER_DAY * MS_PER_DAY
    old_day = today - 40 * MS_PER_DAY
    asyncio.run(create_partition(migrated_dsn, old_day))
    assert partition_name(old_day) in partitions(migrated_dsn)
    service = start_service(partitions_ahead=2, retention="30d")
    expected = {partition_name(today + d * MS_PER_DAY) for d in range(3)}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and partition_name(old_day) in partitions(migrated_dsn):
        time.sleep(0.1)
    assert expected <= partitions(migrated_dsn)
    assert partition_name(old_day) not in partitions(migrated_dsn), "dropped past retention"

    dev = Device(service.port, "dev1")
    assert dev.connect() == 0
    try:
        request = {**SAMPLE, "params": {"measurepoints": {"temp": 7.5}, "time": today - 2 * MS_PER_DAY + 1}}
        assert dev.request(resume_topic(), request)["code"] == 200
    finally:
        dev.close()
    assert partition_name(today - 2 * MS_PER_DAY) in partitions(migrated_dsn)
    stored = fetch(migrated_dsn, "SELECT value_num FROM measurepoints_latest WHERE device_key = 'dev1'")
    assert [r["value_num"] for r in stored] == [7.5]
