"""The writer: rows from many messages, batched into one transaction, acknowledged only after COMMIT.

Each accepted message becomes a job (its rows and a future). One task drains the queue: it takes every job
waiting (up to ``batch_points``), upserts them in one statement, commits, and only then resolves the jobs'
futures, which is what releases the 200 reply and the PUBACK. Batches form by themselves: while one commit
is in flight the next messages queue up behind it.

A commit that fails for a transient reason (connection lost, server shutting down, too many connections) is
retried with back-off until it succeeds, so nothing acknowledged is ever lost and the service recovers by
itself when PostgreSQL returns. Upserts make a retry (or a device's re-send) idempotent: one row per
(device, point, ts), last write wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
import orjson

from service.ops import metrics
from service.ops.logs import get_logger
from service.pipeline import Row

log = get_logger(__name__)

UPSERT = """
INSERT INTO point_data (product_key, device_key, point, ts, value_num, value_text, value_bool, value_json,
                        quality, received_at)
SELECT pk, dk, p, 'epoch'::timestamptz + t * interval '1 millisecond', vn, vt, vb, vj, q,
       'epoch'::timestamptz + r * interval '1 millisecond'
FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::float8[], $6::text[], $7::bool[], $8::jsonb[],
            $9::int2[], $10::int8[]) AS u(pk, dk, p, t, vn, vt, vb, vj, q, r)
ON CONFLICT (product_key, device_key, point, ts) DO UPDATE SET
    value_num = EXCLUDED.value_num, value_text = EXCLUDED.value_text, value_bool = EXCLUDED.value_bool,
    value_json = EXCLUDED.value_json, quality = EXCLUDED.quality, received_at = EXCLUDED.received_at
"""

# SQLSTATE classes that mean "try again": connection exception, insufficient resources, operator
# intervention (shutdown), transaction rollback (deadlock, serialization)
_TRANSIENT_CLASSES = ("08", "53", "57", "40")
_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 2.0


@dataclass(slots=True)
class _Job:
    rows: Sequence[Row]
    future: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def is_transient(exc: BaseException) -> bool:
    """Whether a failed write should be retried (the database is away) rather than refused (the data is bad)."""
    if isinstance(exc, asyncpg.PostgresError):
        return str(getattr(exc, "sqlstate", "") or "").startswith(_TRANSIENT_CLASSES)
    return isinstance(exc, OSError | asyncpg.InterfaceError | TimeoutError | ConnectionError)


def to_columns(rows: Sequence[Row]) -> tuple[list[object], ...]:
    """Split rows into the ten parallel arrays of `UPSERT`, one value column set per row (by JSON type)."""
    latest: dict[tuple[str, str, str, int], Row] = {}
    for row in rows:
        # one statement may not touch a row twice (ON CONFLICT DO UPDATE), and the later write must win
        latest[(row.product_key, row.device_key, row.point, row.time_ms)] = row
    cols: tuple[list[object], ...] = tuple([] for _ in range(10))
    pk, dk, pt, ts, vn, vt, vb, vj, q, r = cols
    for row in latest.values():
        value = row.value
        pk.append(row.product_key)
        dk.append(row.device_key)
        pt.append(row.point)
        ts.append(row.time_ms)
        vn.append(float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None)
        vt.append(value if isinstance(value, str) else None)
        vb.append(value if isinstance(value, bool) else None)
        # arrays, structs and a JSON null (only possible for points outside a non-validating model)
        vj.append(orjson.dumps(value).decode() if value is None or isinstance(value, list | dict) else None)
        q.append(row.quality)
        r.append(row.received_ms)
    return cols


class PointWriter:
    """Queue of accepted messages and the task that commits them."""

    def __init__(self, dsn: str, *, batch_points: int = 5000, schema_ready: asyncio.Event | None = None) -> None:
        self._dsn = dsn
        # set once migrations are applied: writing earlier would fail on a missing table, which is not the data's fault
        self._schema_ready = schema_ready
        self._batch_points = batch_points
        self._jobs: deque[_Job] = deque()
        self._queued_points = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self.connected = False

    @property
    def queued_points(self) -> int:
        """Points accepted but not yet committed."""
        return self._queued_points

    def start(self) -> None:
        """Start the writing task (it connects, and reconnects, by itself)."""
        self._task = asyncio.create_task(self._run(), name="pointgate-writer")

    def submit(self, rows: Sequence[Row]) -> asyncio.Future[None]:
        """Queue ``rows``; the future resolves once they are committed."""
        job = _Job(rows)
        if not rows:
            job.future.set_result(None)
            return job.future
        self._jobs.append(job)
        self._queued_points += len(rows)
        metrics.WRITE_QUEUE_POINTS.set(self._queued_points)
        self._idle.clear()
        self._wake.set()
        return job.future

    async def drain(self, deadline: float) -> bool:
        """Wait until everything queued is committed; False if ``deadline`` seconds passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), deadline)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop the task and the connection. Jobs still queued stay unanswered (their devices re-send)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in self._jobs:
            if not job.future.done():
                job.future.cancel()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), 2)
            self._conn = None

    async def _run(self) -> None:
        if self._schema_ready is not None:
            await self._schema_ready.wait()
        while True:
            if not self._jobs:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._take_batch()
            await self._write_until_done(batch)
            for job in batch:
                self._queued_points -= len(job.rows)
            metrics.WRITE_QUEUE_POINTS.set(self._queued_points)

    def _take_batch(self) -> list[_Job]:
        batch = [self._jobs.popleft()]
        points = len(batch[0].rows)
        while self._jobs and points + len(self._jobs[0].rows) <= self._batch_points:
            job = self._jobs.popleft()
            batch.append(job)
            points += len(job.rows)
        return batch

    async def _write_until_done(self, batch: list[_Job]) -> None:
        delay = _BACKOFF_FIRST
        while True:
            try:
                await self._write(batch)
            except Exception as exc:
                if is_transient(exc):
                    metrics.WRITE_ERRORS.labels(reason="connection").inc()
                    log.warning("write failed, retrying", error=str(exc) or type(exc).__name__, retry_in=delay)
                    await self._disconnect()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _BACKOFF_MAX)
                    continue
                metrics.WRITE_ERRORS.labels(reason="data").inc()
                await self._isolate(batch, exc)
                return
            for job in batch:
                if not job.future.done():
                    job.future.set_result(None)
            return

    async def _isolate(self, batch: list[_Job], exc: Exception) -> None:
        # validation should make this unreachable; if PostgreSQL still refuses the data, find the job that
        # carries it so one bad message cannot block every other device's data behind it
        if len(batch) == 1:
            log.error("points refused by the database", error=str(exc), points=len(batch[0].rows))
            if not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return
        for job in batch:
            await self._write_until_done([job])

    async def _write(self, batch: list[_Job]) -> None:
        conn = await self._connection()
        rows = [row for job in batch for row in job.rows]
        started = time.perf_counter()
        async with conn.transaction():
            await conn.execute(UPSERT, *to_columns(rows))
        metrics.WRITE_SECONDS.observe(time.perf_counter() - started)
        metrics.WRITE_BATCH_POINTS.observe(len(rows))
        metrics.POINTS_WRITTEN.inc(len(rows))

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self._dsn, timeout=5)
            self.connected = True
        return self._conn

    async def _disconnect(self) -> None:
        self.connected = False
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                conn.terminate()
