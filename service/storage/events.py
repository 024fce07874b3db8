"""The event writer: accepted device events, batched, committed on their own connection, acknowledged after COMMIT.

The measurement-point writer (``writer.py``) is built for a hundred thousand points a second: series ids,
partitions, shards by device. Events are rare (alarms, state changes) and go to one table, so they get this
parallel path with the same guarantee instead of a branch in the points' hot loop: each submitted event is a
future that resolves only once its row is committed, which is what releases the 200 reply and the PUBACK.
Whatever waits when a write starts goes in one statement (its own transaction, one round trip).

As for points, a write that fails for a transient reason (the database away) is retried with back-off until
it succeeds, so nothing acknowledged is lost and the service recovers by itself; the upsert makes a retry or a
device's re-send idempotent. A batch PostgreSQL refuses for its data is split, so one bad event cannot hold
back the others.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import orjson

from service.events import EventRow
from service.ops import metrics
from service.ops.logs import get_logger
from service.storage.writer import is_transient

log = get_logger(__name__)

UPSERT_EVENTS = """
INSERT INTO device_events (product_key, device_key, event_id, ts, event_type, received_at, output)
SELECT pk, dk, e, 'epoch'::timestamptz + t * interval '1 millisecond', et,
       'epoch'::timestamptz + r * interval '1 millisecond', o
FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::int8[], $7::jsonb[])
     AS u(pk, dk, e, t, et, r, o)
ON CONFLICT (product_key, device_key, event_id, ts) DO UPDATE SET
    event_type = EXCLUDED.event_type, received_at = EXCLUDED.received_at, output = EXCLUDED.output
"""

_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 2.0
DEFAULT_BATCH_EVENTS = 1000


@dataclass(slots=True, eq=False)
class _Pending:
    row: EventRow
    future: asyncio.Future[None]


def event_columns(rows: Sequence[EventRow]) -> tuple[list[object], ...]:
    """The seven parallel arrays of `UPSERT_EVENTS`, one row per (device, event, ts): the last one submitted.

    One statement may not update a row twice, so a key sent twice in one batch keeps its last values.
    """
    latest: dict[tuple[str, str, str, int], EventRow] = {}
    for row in rows:
        latest[(row.product_key, row.device_key, row.event_id, row.time_ms)] = row
    cols: tuple[list[object], ...] = tuple([] for _ in range(7))
    for row in latest.values():
        for column, value in zip(
            cols,
            (
                row.product_key,
                row.device_key,
                row.event_id,
                row.time_ms,
                row.event_type,
                row.received_ms,
                orjson.dumps(row.values).decode(),
            ),
            strict=True,
        ):
            column.append(value)
    return cols


class EventWriter:
    """A queue of accepted events and the task that commits them.

    Interface (as `PointWriter`'s, which the broker and the service rely on): `start`, `submit`, `drain`,
    `close`, `queued`.
    """

    def __init__(
        self, dsn: str, *, batch_events: int = DEFAULT_BATCH_EVENTS, schema_ready: asyncio.Event | None = None
    ) -> None:
        if batch_events < 1:
            raise ValueError("batch_events must be at least 1")
        self._dsn = dsn
        self._batch = batch_events
        # set once migrations are applied: writing earlier would fail on a missing table
        self._schema_ready = schema_ready
        self._queue: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writing = 0
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        """Events accepted but not yet committed."""
        return len(self._queue) + self._writing

    def start(self) -> None:
        """Start the writing task (it connects, and reconnects, by itself)."""
        self._task = asyncio.create_task(self._run(), name="pointgate-event-writer")

    def submit(self, row: EventRow) -> asyncio.Future[None]:
        """Queue one event; the future resolves once it is committed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(row, future))
        self._idle.clear()
        self._wake.set()
        return future

    async def drain(self, deadline: float) -> bool:
        """Wait until everything queued is committed; False if ``deadline`` seconds passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), deadline)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop the task and the connection. Events still queued stay unanswered (their devices re-send)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for pending in self._queue:
            if not pending.future.done():
                pending.future.cancel()
        self._queue.clear()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)

    async def _run(self) -> None:
        if self._schema_ready is not None:
            await self._schema_ready.wait()
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = [self._queue.popleft() for _ in range(min(self._batch, len(self._queue)))]
            self._writing = len(batch)
            try:
                await self._write_until_done(batch)
            finally:
                self._writing = 0

    async def _write_until_done(self, batch: list[_Pending]) -> None:
        delay = _BACKOFF_FIRST
        while True:
            try:
                await self._write(batch)
            except Exception as exc:
                if is_transient(exc):
                    metrics.WRITE_ERRORS.labels(reason="connection").inc()
                    log.warning("event write failed, retrying", error=str(exc) or type(exc).__name__, retry_in=delay)
                    self._drop_connection()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _BACKOFF_MAX)
                    continue
                metrics.WRITE_ERRORS.labels(reason="data").inc()
                if len(batch) == 1:
                    # validation should make this unreachable; the device gets a 500, the others are unaffected
                    log.error("event refused by the database", error=str(exc), event_id=batch[0].row.event_id)
                    if not batch[0].future.done():
                        batch[0].future.set_exception(exc)
                    return
                for pending in batch:
                    await self._write_until_done([pending])
                return
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_result(None)
            return

    async def _write(self, batch: list[_Pending]) -> None:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self._dsn, timeout=5)
        # one statement is its own transaction: committed when execute returns
        columns = event_columns([pending.row for pending in batch])
        await self._conn.execute(UPSERT_EVENTS, *columns)
        metrics.EVENTS_WRITTEN.inc(len(columns[0]))

    def _drop_connection(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                conn.terminate()
