"""The writer: rows from many messages, batched, written on several connections at once, acknowledged after COMMIT.

Each accepted message is a job: its rows and a future. The rows are split by device over ``connections``
shards (`shard_of`); every shard owns one PostgreSQL connection and one task that takes every part waiting
(up to ``batch_points``), writes it in one statement (atomic on its own: no BEGIN/COMMIT round trips) and
only then marks those parts committed. A job's future resolves when all of its parts are committed, which is
what releases the 200 reply and the PUBACK.

Why shards: with a window of ~100 messages in flight, throughput is in-flight ÷ round trip. One connection
commits batches one after another; with several, the next batch is built and written while the previous
one commits. Why by device: one (device, point, ts) key always goes through the same connection, in the
order it was submitted, so the last write still wins and two connections never wait on each other's rows
(no deadlocks), whatever the commit order between shards.

A write that fails for a transient reason (connection lost, server shutting down, too many connections) is
retried with back-off until it succeeds, so nothing acknowledged is ever lost and the service recovers by
itself when PostgreSQL returns. Upserts make a retry (or a device's re-send) idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import asyncpg
import orjson

from service.ops import metrics
from service.ops.logs import get_logger
from service.pipeline import Row
from service.storage.partitions import Policy, ensure_buckets, maintain, managed_buckets

log = get_logger(__name__)

# Points and latest values in one statement (one transaction, one round trip). ``u`` is read twice, so
# PostgreSQL materialises it once. The latest value moves only forward in device time: a late older point
# never replaces it, and a re-send of the same time (last write wins) does.
UPSERT = """
WITH u AS (
    SELECT s, 'epoch'::timestamptz + t * interval '1 millisecond' AS ts, vn, vt, vb, vj, q,
           'epoch'::timestamptz + r * interval '1 millisecond' AS ra, l
    FROM unnest($1::int4[], $2::int8[], $3::float8[], $4::text[], $5::bool[], $6::jsonb[], $7::int2[],
                $8::int8[], $9::bool[]) AS u(s, t, vn, vt, vb, vj, q, r, l)
), history AS (
    INSERT INTO points (series_id, quality, value_bool, ts, received_at, value_num, value_text, value_json)
    SELECT s, q, vb, ts, ra, vn, vt, vj FROM u
    ON CONFLICT (series_id, ts) DO UPDATE SET
        quality = EXCLUDED.quality, value_bool = EXCLUDED.value_bool, received_at = EXCLUDED.received_at,
        value_num = EXCLUDED.value_num, value_text = EXCLUDED.value_text, value_json = EXCLUDED.value_json
)
INSERT INTO points_latest AS cur (series_id, quality, value_bool, ts, received_at, value_num, value_text, value_json)
SELECT s, q, vb, ts, ra, vn, vt, vj FROM u WHERE l
ON CONFLICT (series_id) DO UPDATE SET
    quality = EXCLUDED.quality, value_bool = EXCLUDED.value_bool, ts = EXCLUDED.ts,
    received_at = EXCLUDED.received_at, value_num = EXCLUDED.value_num, value_text = EXCLUDED.value_text,
    value_json = EXCLUDED.value_json
WHERE cur.ts <= EXCLUDED.ts
"""

# The series dictionary: look up first (the usual case after a restart), create what is missing in key
# order (so concurrent writers lock in the same order and never deadlock), then read the new ids in a new
# statement: a concurrent writer's committed insert is invisible to the statement that skipped it.
SELECT_SERIES = """
SELECT s.id, s.product_key, s.device_key, s.point
FROM unnest($1::text[], $2::text[], $3::text[]) AS k(pk, dk, p)
JOIN series s ON s.product_key = k.pk AND s.device_key = k.dk AND s.point = k.p
"""
INSERT_SERIES = """
INSERT INTO series (product_key, device_key, point)
SELECT pk, dk, p FROM unnest($1::text[], $2::text[], $3::text[]) AS k(pk, dk, p) ORDER BY pk, dk, p
ON CONFLICT DO NOTHING
"""

SeriesKey = tuple[str, str, str]

# SQLSTATE classes that mean "try again": connection exception, insufficient resources, operator
# intervention (shutdown), transaction rollback (deadlock, serialization)
_TRANSIENT_CLASSES = ("08", "53", "57", "40")
_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 2.0
DEFAULT_CONNECTIONS = 2
DEFAULT_MAX_QUEUED_POINTS = 200_000
MAINTENANCE_SECONDS = 600.0
MAINTENANCE_RETRY_SECONDS = 30.0
PARTITION_RETRY_SECONDS = 60.0


@dataclass(slots=True, eq=False)
class _Job:
    """One submitted message: resolved when ``parts`` of it are all committed."""

    future: asyncio.Future[None]
    parts: int = 1


@dataclass(slots=True, eq=False)
class Part:
    """The rows of one job that belong to one shard."""

    job: _Job
    rows: Sequence[Row]


@dataclass(slots=True, eq=False)
class _Shard:
    index: int
    parts: deque[Part] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    conn: asyncpg.Connection | None = None
    task: asyncio.Task[None] | None = None


def is_transient(exc: BaseException) -> bool:
    """Whether a failed write should be retried (the database is away) rather than refused (the data is bad)."""
    if isinstance(exc, asyncpg.PostgresError):
        return str(getattr(exc, "sqlstate", "") or "").startswith(_TRANSIENT_CLASSES)
    return isinstance(exc, OSError | asyncpg.InterfaceError | TimeoutError | ConnectionError)


def shard_of(product_key: str, device_key: str, shards: int) -> int:
    """The shard (connection) that writes every row of this device: stable across calls and processes."""
    if shards == 1:
        return 0
    return zlib.crc32(f"{product_key}\0{device_key}".encode()) % shards


def split_by_shard(rows: Sequence[Row], shards: int) -> dict[int, list[Row]]:
    """``rows`` grouped by `shard_of` their device, each group in submission order."""
    groups: dict[int, list[Row]] = {}
    first = rows[0]
    pk, dk = first.product_key, first.device_key
    if shards == 1 or all(row.device_key == dk and row.product_key == pk for row in rows):
        # the usual message: one device, so one shard, computed once
        return {shard_of(pk, dk, shards): list(rows)}
    memo: dict[tuple[str, str], int] = {}
    for row in rows:
        key = (row.product_key, row.device_key)
        shard = memo.get(key)
        if shard is None:
            shard = memo[key] = shard_of(row.product_key, row.device_key, shards)
        groups.setdefault(shard, []).append(row)
    return groups


def take_batch(parts: deque[Part], batch_points: int) -> list[Part]:
    """Pop the oldest parts that fit in ``batch_points`` (always at least one, however large)."""
    batch = [parts.popleft()]
    points = len(batch[0].rows)
    while parts and points + len(parts[0].rows) <= batch_points:
        part = parts.popleft()
        batch.append(part)
        points += len(part.rows)
    return batch


def last_writes(rows: Sequence[Row]) -> list[Row]:
    """One row per (device, point, ts), the last one submitted: one statement may not update a row twice."""
    latest: dict[tuple[str, str, str, int], Row] = {}
    for row in rows:
        latest[(row.product_key, row.device_key, row.point, row.time_ms)] = row
    return list(latest.values()) if len(latest) != len(rows) else list(rows)


def value_columns(value: object) -> tuple[float | None, str | None, bool | None, str | None]:
    """The value in the one column its JSON type selects: (number, text, boolean, JSON)."""
    if isinstance(value, bool):
        return None, None, value, None
    if isinstance(value, int | float):
        return float(value), None, None, None
    if isinstance(value, str):
        return None, value, None, None
    # arrays, structs and a JSON null (only possible for points outside a non-validating model)
    return None, None, None, orjson.dumps(value).decode()


def to_columns(rows: Sequence[Row], series: Mapping[SeriesKey, int]) -> tuple[list[object], ...]:
    """The nine parallel arrays of `UPSERT`: series id, time, one value column set per row, quality, received
    time, and whether the row is its series' newest in this batch (the one offered to ``points_latest``).

    ``rows`` must hold one row per (device, point, ts) already (`last_writes`).
    """
    cols: tuple[list[object], ...] = tuple([] for _ in range(9))
    sid, ts, vn, vt, vb, vj, q, r, newest = cols
    latest_index: dict[int, int] = {}
    for index, row in enumerate(rows):
        series_id = series[(row.product_key, row.device_key, row.point)]
        num, text, flag, doc = value_columns(row.value)
        sid.append(series_id)
        ts.append(row.time_ms)
        vn.append(num)
        vt.append(text)
        vb.append(flag)
        vj.append(doc)
        q.append(row.quality)
        r.append(row.received_ms)
        newest.append(False)
        best = latest_index.get(series_id)
        if best is None or row.time_ms > rows[best].time_ms:
            latest_index[series_id] = index
    for index in latest_index.values():
        newest[index] = True
    return cols


def series_keys(rows: Iterable[Row]) -> set[SeriesKey]:
    """The distinct (product, device, point) keys of ``rows``."""
    return {(row.product_key, row.device_key, row.point) for row in rows}


def partition_buckets(rows: Iterable[Row], width_ms: int) -> set[int]:
    """The partition buckets (time // width) the rows fall in."""
    return {row.time_ms // width_ms for row in rows}


class PointWriter:
    """Queues of accepted messages and the tasks (one per connection) that commit them.

    Public interface (the broker and the consumer rely on it): `start`, `submit`, `drain`, `close`,
    `queued_points`, and `wait_for_room` for callers that can wait before accepting more.
    """

    def __init__(
        self,
        dsn: str,
        *,
        batch_points: int = 5000,
        connections: int = DEFAULT_CONNECTIONS,
        max_queued_points: int = DEFAULT_MAX_QUEUED_POINTS,
        schema_ready: asyncio.Event | None = None,
        policy: Policy | None = None,
        maintenance: bool = True,
    ) -> None:
        if connections < 1 or batch_points < 1 or max_queued_points < 1:
            raise ValueError("connections, batch_points and max_queued_points must be at least 1")
        self._dsn = dsn
        # set once migrations are applied: writing earlier would fail on a missing table, which is not the data's fault
        self._schema_ready = schema_ready
        self._batch_points = batch_points
        self._max_queued = max_queued_points
        self._shards = [_Shard(i) for i in range(connections)]
        self.policy = policy or Policy()
        # (product, device, point) -> series id: ids never change once created, so the cache is never stale
        self._series: dict[SeriesKey, int] = {}
        # partition buckets known to exist (created here or found), so a batch checks the catalog only once
        self._buckets: set[int] = set()
        self._partition_retry_at = 0.0
        self._maintenance = maintenance
        self._maintainer: asyncio.Task[None] | None = None
        self._queued_points = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._room = asyncio.Event()
        self._room.set()
        self.connected = False

    @property
    def connections(self) -> int:
        """How many connections (shards) write in parallel."""
        return len(self._shards)

    @property
    def queued_points(self) -> int:
        """Points accepted but not yet committed."""
        return self._queued_points

    @property
    def full(self) -> bool:
        """True while at least ``max_queued_points`` points wait: a caller that can should hold back."""
        return self._queued_points >= self._max_queued

    async def wait_for_room(self) -> None:
        """Return once fewer than ``max_queued_points`` points wait (at once when there is room)."""
        await self._room.wait()

    def start(self) -> None:
        """Start the writing tasks (each connects, and reconnects, by itself)."""
        for shard in self._shards:
            shard.task = asyncio.create_task(self._run(shard), name=f"pointgate-writer-{shard.index}")
        if self._maintenance:
            self._maintainer = asyncio.create_task(self._maintain(), name="pointgate-partitions")

    def submit(self, rows: Sequence[Row]) -> asyncio.Future[None]:
        """Queue ``rows``; the future resolves once they are all committed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not rows:
            future.set_result(None)
            return future
        groups = split_by_shard(rows, len(self._shards))
        job = _Job(future, len(groups))
        for index, group in groups.items():
            shard = self._shards[index]
            shard.parts.append(Part(job, group))
            shard.wake.set()
        self._count(len(rows))
        return future

    async def drain(self, deadline: float) -> bool:
        """Wait until everything queued is committed; False if ``deadline`` seconds passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), deadline)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop the tasks and connections. Jobs still queued stay unanswered (their devices re-send)."""
        if self._maintainer is not None:
            self._maintainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintainer
            self._maintainer = None
        for shard in self._shards:
            if shard.task is not None:
                shard.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await shard.task
                shard.task = None
        for shard in self._shards:
            for part in shard.parts:
                if not part.job.future.done():
                    part.job.future.cancel()
            shard.parts.clear()
            await self._disconnect(shard, graceful=True)

    def _count(self, points: int) -> None:
        self._queued_points += points
        metrics.WRITE_QUEUE_POINTS.set(self._queued_points)
        if self._queued_points:
            self._idle.clear()
        else:
            self._idle.set()
        if self._queued_points >= self._max_queued:
            self._room.clear()
        else:
            self._room.set()

    async def _run(self, shard: _Shard) -> None:
        if self._schema_ready is not None:
            await self._schema_ready.wait()
        while True:
            if not shard.parts:
                shard.wake.clear()
                await shard.wake.wait()
                continue
            batch = take_batch(shard.parts, self._batch_points)
            await self._write_until_done(shard, batch)
            self._count(-sum(len(part.rows) for part in batch))

    async def _write_until_done(self, shard: _Shard, batch: list[Part]) -> None:
        delay = _BACKOFF_FIRST
        while True:
            try:
                await self._write(shard, batch)
            except Exception as exc:
                if is_transient(exc):
                    metrics.WRITE_ERRORS.labels(reason="connection").inc()
                    log.warning(
                        "write failed, retrying",
                        error=str(exc) or type(exc).__name__,
                        retry_in=delay,
                        connection=shard.index,
                    )
                    await self._disconnect(shard)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _BACKOFF_MAX)
                    continue
                metrics.WRITE_ERRORS.labels(reason="data").inc()
                await self._isolate(shard, batch, exc)
                return
            for part in batch:
                _part_done(part)
            return

    async def _isolate(self, shard: _Shard, batch: list[Part], exc: Exception) -> None:
        # validation should make this unreachable; if PostgreSQL still refuses the data, find the part that
        # carries it so one bad message cannot block every other device's data behind it
        if len(batch) == 1:
            log.error("points refused by the database", error=str(exc), points=len(batch[0].rows))
            future = batch[0].job.future
            if not future.done():
                future.set_exception(exc)
            return
        for part in batch:
            await self._write_until_done(shard, [part])

    async def _write(self, shard: _Shard, batch: list[Part]) -> None:
        conn = await self._connection(shard)
        rows = last_writes([row for part in batch for row in part.rows])
        started = time.perf_counter()
        await self._resolve_series(conn, rows)
        await self._ensure_partitions(conn, rows)
        # one statement is its own transaction: committed when execute returns, and one round trip
        await conn.execute(UPSERT, *to_columns(rows, self._series))
        metrics.WRITE_SECONDS.observe(time.perf_counter() - started)
        metrics.WRITE_BATCH_POINTS.observe(len(rows))
        metrics.POINTS_WRITTEN.inc(len(rows))

    async def _resolve_series(self, conn: asyncpg.Connection, rows: Sequence[Row]) -> None:
        cache = self._series
        missing = [key for key in series_keys(rows) if key not in cache]
        if not missing:
            return
        for attempt in range(2):
            columns = [list(part) for part in zip(*missing, strict=True)]
            for record in await conn.fetch(SELECT_SERIES, *columns):
                cache[(record["product_key"], record["device_key"], record["point"])] = record["id"]
            missing = [key for key in missing if key not in cache]
            if not missing:
                return
            if attempt == 0:
                await conn.execute(INSERT_SERIES, *[list(part) for part in zip(*missing, strict=True)])
        raise RuntimeError(f"series ids could not be created for {len(missing)} keys")

    async def _ensure_partitions(self, conn: asyncpg.Connection, rows: Sequence[Row]) -> None:
        width = self.policy.width_ms
        wanted = partition_buckets(rows, width) - self._buckets
        if not wanted or time.monotonic() < self._partition_retry_at:
            return
        first, last = managed_buckets(self.policy, int(time.time() * 1000))
        # times outside the managed window go to the default partition: no partition per wrong clock
        inside = {bucket for bucket in wanted if first <= bucket <= last}
        if not inside:
            return
        try:
            created = await ensure_buckets(conn, inside, width)
        except asyncpg.PostgresError as exc:
            if is_transient(exc):
                raise
            # e.g. the lock not granted in time (a long query holds the table): the rows are stored in the
            # default partition meanwhile, and the partition (taking them over) is created on a later try
            log.warning("partition not created yet, points go to the default partition", error=str(exc))
            self._partition_retry_at = time.monotonic() + PARTITION_RETRY_SECONDS
            return
        for partition in created:
            log.info("partition created", partition=partition.name)
        self._buckets |= inside

    async def _maintain(self) -> None:
        """Create the partitions ahead and drop the expired ones, at start and every few minutes after."""
        if self._schema_ready is not None:
            await self._schema_ready.wait()
        while True:
            delay = MAINTENANCE_SECONDS
            try:
                conn = await asyncpg.connect(self._dsn, timeout=5)
                try:
                    created, dropped = await maintain(conn, self.policy, int(time.time() * 1000))
                finally:
                    await conn.close()
                for partition in created:
                    log.info("partition created", partition=partition.name)
                for partition in dropped:
                    log.info("partition dropped past retention", partition=partition.name)
                    self._buckets.discard(partition.lo_ms // self.policy.width_ms if partition.lo_ms else -1)
            except Exception as exc:
                # the database away, or a lock not granted in time: the writer is unaffected; try again soon
                log.warning("partition maintenance failed", error=str(exc) or type(exc).__name__)
                delay = MAINTENANCE_RETRY_SECONDS
            await asyncio.sleep(delay)

    async def _connection(self, shard: _Shard) -> asyncpg.Connection:
        if shard.conn is None or shard.conn.is_closed():
            shard.conn = await asyncpg.connect(self._dsn, timeout=5)
            self.connected = True
        return shard.conn

    async def _disconnect(self, shard: _Shard, *, graceful: bool = False) -> None:
        self.connected = any(s.conn is not None for s in self._shards if s is not shard)
        if shard.conn is None:
            return
        conn, shard.conn = shard.conn, None
        with contextlib.suppress(Exception):
            if graceful:
                await asyncio.wait_for(conn.close(), 2)
            else:
                conn.terminate()


def _part_done(part: Part) -> None:
    job = part.job
    job.parts -= 1
    if job.parts == 0 and not job.future.done():
        job.future.set_result(None)
