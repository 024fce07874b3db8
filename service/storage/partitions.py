"""Time partitions of ``points``: which to create, creating them, retention, and what exists (``storage status``).

Partitions are ranges of device time, ``width`` wide, aligned on the Unix epoch (UTC midnight for whole days).
The writer creates the partition of a row's time on first sight when that time is inside the *managed
window* — from ``now - backfill`` (or ``now - retention`` when that is shorter) to ``partitions_ahead``
widths past now — and a maintenance pass creates the ones ahead and drops those past ``retention``. Rows
outside the window land in ``points_default``. A range that already has rows in the default partition is
created by moving them into the new partition in the same transaction (the default may not overlap it).

Planning is pure (`plan_gaps`, `bucket_range`, `managed_buckets`, `expired`); the SQL around it is small.
DDL runs with a lock timeout, so a long analytics query holding the table can delay partition work but never
stall the writers queued behind a waiting ``CREATE``/``DROP``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from service.errors import ConfigError
from service.settings import Settings

PARENT = "points"
DEFAULT_PARTITION = "points_default"
_LOCK_KEY = int.from_bytes(hashlib.sha256(b"pointgate.partitions").digest()[:8], "big", signed=True)
_LOCK_TIMEOUT = "1s"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MS_PER_HOUR = 3_600_000
MS_PER_DAY = 24 * MS_PER_HOUR


@dataclass(frozen=True, slots=True)
class Policy:
    """How the points table is partitioned and kept (from the settings)."""

    width: timedelta = timedelta(days=1)
    ahead: int = 3
    backfill: timedelta = timedelta(days=365)
    retention: timedelta | None = None

    def __post_init__(self) -> None:
        width_ms = _ms(self.width)
        if width_ms < MS_PER_HOUR or width_ms % MS_PER_HOUR:
            raise ValueError("partition width must be a whole number of hours, at least one")
        if self.ahead < 1:
            raise ValueError("partitions ahead must be at least 1")
        if self.retention is not None and self.retention < self.width:
            raise ValueError("retention must be at least one partition width")

    @property
    def width_ms(self) -> int:
        """The partition width in milliseconds."""
        return _ms(self.width)


@dataclass(frozen=True, slots=True)
class Partition:
    """One partition of ``points``: its table and its range [lo, hi) in epoch milliseconds (None: default)."""

    name: str
    lo_ms: int | None
    hi_ms: int | None

    @property
    def is_default(self) -> bool:
        """Whether this is the default partition (it has no range)."""
        return self.lo_ms is None


def _ms(value: timedelta) -> int:
    return (value.days * 86_400 + value.seconds) * 1000 + value.microseconds // 1000


def to_datetime(ms: int) -> datetime:
    """Epoch milliseconds as an aware UTC datetime."""
    return _EPOCH + timedelta(milliseconds=ms)


def to_ms(moment: datetime) -> int:
    """An aware datetime as epoch milliseconds."""
    return _ms(moment - _EPOCH)


def bucket_range(bucket: int, width_ms: int) -> tuple[int, int]:
    """The [lo, hi) milliseconds of partition bucket number ``bucket``."""
    return bucket * width_ms, (bucket + 1) * width_ms


def partition_name(lo_ms: int) -> str:
    """``points_pYYYYMMDD`` for a range starting at midnight UTC, else ``points_pYYYYMMDD_HHMM``."""
    start = to_datetime(lo_ms)
    suffix = start.strftime("%Y%m%d") if lo_ms % MS_PER_DAY == 0 else start.strftime("%Y%m%d_%H%M")
    return f"{PARENT}_p{suffix}"


def managed_buckets(policy: Policy, now_ms: int) -> tuple[int, int]:
    """The first and last bucket the service keeps partitions for (both included)."""
    width = policy.width_ms
    back = policy.backfill if policy.retention is None else min(policy.backfill, policy.retention)
    first = (now_ms - _ms(back)) // width
    current = now_ms // width
    return first, current + policy.ahead


def plan_gaps(existing: Iterable[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """The parts of [lo, hi) no existing range covers, in order (so mixed widths never overlap)."""
    gaps: list[tuple[int, int]] = []
    cursor = lo
    for start, end in sorted(existing):
        if end <= cursor or start >= hi:
            continue
        if start > cursor:
            gaps.append((cursor, start))
        cursor = max(cursor, end)
        if cursor >= hi:
            break
    if cursor < hi:
        gaps.append((cursor, hi))
    return gaps


def expired(partitions: Iterable[Partition], policy: Policy, now_ms: int) -> list[Partition]:
    """Partitions whose whole range is older than the retention (none when retention is off; never the default)."""
    if policy.retention is None:
        return []
    cutoff = now_ms - _ms(policy.retention)
    return [p for p in partitions if p.hi_ms is not None and p.hi_ms <= cutoff]


_LIST = """
SELECT c.relname AS name,
       m[1]::timestamptz AS lo,
       m[2]::timestamptz AS hi
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
CROSS JOIN LATERAL (
    SELECT regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']+)''\\) TO \\(''([^'']+)''\\)') AS m
) b
WHERE i.inhparent = to_regclass($1)
ORDER BY m[1]::timestamptz NULLS FIRST
"""


async def list_partitions(conn: asyncpg.Connection) -> list[Partition]:
    """Every partition of ``points``, default first, then by time."""
    records = await conn.fetch(_LIST, PARENT)
    return [
        Partition(
            r["name"],
            None if r["lo"] is None else to_ms(r["lo"]),
            None if r["hi"] is None else to_ms(r["hi"]),
        )
        for r in records
    ]


def _literal(ms: int) -> str:
    return to_datetime(ms).strftime("'%Y-%m-%d %H:%M:%S+00'")


async def natively_partitioned(conn: asyncpg.Connection) -> bool:
    """Whether ``points`` is pointgate's native partitioned table (not, e.g., a TimescaleDB hypertable)."""
    return bool(await conn.fetchval("SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass($1)", PARENT))


async def ensure_buckets(conn: asyncpg.Connection, buckets: Iterable[int], width_ms: int) -> list[Partition]:
    """Create whatever part of these buckets no partition covers yet; return the partitions created.

    Safe with several writers and instances: one transaction under an advisory lock re-reads what exists.
    Does nothing when ``points`` is not natively partitioned (a hypertable manages its own chunks).
    """
    wanted = sorted(set(buckets))
    if not wanted or not await natively_partitioned(conn):
        return []
    created: list[Partition] = []
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        ranges = [
            (p.lo_ms, p.hi_ms) for p in await list_partitions(conn) if p.lo_ms is not None and p.hi_ms is not None
        ]
        for bucket in wanted:
            lo, hi = bucket_range(bucket, width_ms)
            for gap_lo, gap_hi in plan_gaps(ranges, lo, hi):
                created.append(await _create(conn, gap_lo, gap_hi))
                ranges.append((gap_lo, gap_hi))
    return created


_IN_DEFAULT = "SELECT EXISTS (SELECT 1 FROM points_default WHERE ts >= $1 AND ts < $2)"
_MOVE_FROM_DEFAULT = """
WITH moved AS (DELETE FROM points_default WHERE ts >= $1 AND ts < $2 RETURNING *)
INSERT INTO "{name}" SELECT * FROM moved
"""


async def _create(conn: asyncpg.Connection, lo: int, hi: int) -> Partition:
    name = partition_name(lo)
    bounds = f"FROM ({_literal(lo)}) TO ({_literal(hi)})"
    span = (to_datetime(lo), to_datetime(hi))
    in_default = await conn.fetchval(_IN_DEFAULT, *span)
    if not in_default:
        await conn.execute(f'CREATE TABLE "{name}" PARTITION OF {PARENT} FOR VALUES {bounds}')
        return Partition(name, lo, hi)
    # the default partition already holds rows of this range: move them, then attach (one transaction)
    await conn.execute(f'CREATE TABLE "{name}" (LIKE {PARENT} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)')
    await conn.execute(_MOVE_FROM_DEFAULT.replace("{name}", name), *span)
    await conn.execute(f'ALTER TABLE {PARENT} ATTACH PARTITION "{name}" FOR VALUES {bounds}')
    return Partition(name, lo, hi)


async def drop_expired(conn: asyncpg.Connection, policy: Policy, now_ms: int) -> list[Partition]:
    """Drop every partition past the retention (DROP TABLE: no DELETE, no bloat); return those dropped."""
    dropped: list[Partition] = []
    if policy.retention is None or not await natively_partitioned(conn):
        return dropped
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        for partition in expired(await list_partitions(conn), policy, now_ms):
            await conn.execute(f'DROP TABLE "{partition.name}"')
            dropped.append(partition)
    return dropped


async def maintain(conn: asyncpg.Connection, policy: Policy, now_ms: int) -> tuple[list[Partition], list[Partition]]:
    """One maintenance pass: create the current and ahead partitions, drop the expired ones."""
    current = now_ms // policy.width_ms
    created = await ensure_buckets(conn, range(current, current + policy.ahead + 1), policy.width_ms)
    dropped = await drop_expired(conn, policy, now_ms)
    return created, dropped


@dataclass(frozen=True, slots=True)
class PartitionStatus:
    """One row of ``pointgate storage status``."""

    name: str
    lo_ms: int | None
    hi_ms: int | None
    bytes: int
    rows_estimate: int | None


async def status(conn: asyncpg.Connection) -> list[PartitionStatus]:
    """Each partition with its size on disk (table + indexes) and the planner's row estimate (None: never analysed)."""
    partitions = await list_partitions(conn)
    if not partitions:
        return []
    records = await conn.fetch(
        "SELECT c.relname, pg_total_relation_size(c.oid) AS bytes, c.reltuples::int8 AS rows"
        " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass($1)",
        PARENT,
    )
    sizes = {r["relname"]: (r["bytes"], r["rows"]) for r in records}
    result = []
    for p in partitions:
        size, rows = sizes.get(p.name, (0, -1))
        result.append(PartitionStatus(p.name, p.lo_ms, p.hi_ms, size, None if rows < 0 else rows))
    return result


def policy_from_settings(settings: Settings) -> Policy:
    """The partition policy the settings describe, or `ConfigError` naming the setting that is wrong."""
    try:
        return Policy(
            width=settings.partition_width,
            ahead=settings.partitions_ahead,
            backfill=settings.partition_backfill,
            retention=settings.retention,
        )
    except ValueError as exc:
        raise ConfigError(f"invalid settings: partition_width/retention: {exc}") from None
