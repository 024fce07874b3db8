"""Refused requests, kept: what `pointgate rejected list/show/replay` and the status page read.

Every request a device got a refusal code for is kept in ``rejected_messages``: topic, device, client id,
code, reason, receive time and the payload up to ``rejected_payload_bytes`` (longer ones are kept truncated,
and cannot be replayed). The broker hands each refusal to `RejectedStore.record` (synchronous, cheap: a bounded
queue); a background task inserts them in batches and prunes the table to ``rejected_max_count`` rows and
``rejected_max_age``. With ``keep_rejected = false`` nothing is written (deployments that must not keep
payloads); the in-memory counts and latest examples of the status page carry no payload either way.

`replay` runs kept requests through the pipeline again, against the thing models as they are now: what passes
is stored (with the original receive time) and marked replayed; what still fails gets its new code and reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from service.model.thingmodel import ThingModel
from service.ops.logs import get_logger
from service.pipeline import handle
from service.protocol.replies import ReplyCode
from service.protocol.topics import RequestTopic, parse_request_topic
from service.storage.writer import PointWriter

log = get_logger("pointgate.rejected")

_MAX_PENDING = 10_000  # refusals waiting for the database; beyond it the oldest are not kept (and counted)
_BATCH = 500
_PRUNE_EVERY_S = 60.0
_EXAMPLES_PER_CODE = 5


@dataclass(frozen=True, slots=True)
class Refusal:
    """One refused request as the broker saw it."""

    received_at: datetime
    topic: str
    product_key: str
    device_key: str
    client_id: str | None
    code: int
    reason: str
    payload: bytes
    payload_bytes: int


@dataclass(frozen=True, slots=True)
class Kept:
    """A refused request as kept in the database."""

    id: int
    received_at: datetime
    topic: str
    product_key: str
    device_key: str
    client_id: str | None
    code: int
    reason: str
    payload: bytes | None
    payload_bytes: int
    truncated: bool
    replayed_at: datetime | None
    replay_code: int | None
    replay_reason: str | None


class RejectedStore:
    """Keeps refusals: counts and latest examples in memory, the requests themselves in PostgreSQL."""

    def __init__(
        self,
        pool: asyncpg.Pool | None,
        *,
        keep: bool,
        payload_bytes: int,
        max_count: int,
        max_age_hours: float,
        schema_ready: asyncio.Event,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._pool = pool
        self.keep = keep and pool is not None
        self._payload_bytes = payload_bytes
        self._max_count = max_count
        self._max_age_hours = max_age_hours
        self._schema_ready = schema_ready
        self._pending: deque[Refusal] = deque(maxlen=_MAX_PENDING)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.counts: Counter[int] = Counter()
        self.latest: dict[int, deque[Refusal]] = {}
        self.dropped = 0
        self._closed = False

    def start(self) -> None:
        """Start the task that writes and prunes."""
        if self.keep:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Write what is pending (briefly), then stop."""
        if self._task is None:
            return
        self._closed = True  # the driver may turn a cancellation into its own error: the loop checks this too
        self._task.cancel()
        await asyncio.wait({self._task}, timeout=2)
        if self._schema_ready.is_set():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flush(), 2)

    def record(self, refusal: Refusal) -> None:
        """The broker's hook for each refused request; never blocks, never raises."""
        self.counts[refusal.code] += 1
        examples = self.latest.setdefault(refusal.code, deque(maxlen=_EXAMPLES_PER_CODE))
        examples.appendleft(dataclasses.replace(refusal, payload=b""))  # the page shows no payloads
        if not self.keep:
            return
        if len(self._pending) == self._pending.maxlen:
            self.dropped += 1
        self._pending.append(refusal)
        self._wake.set()

    def refused(self, client_id: str, topic: RequestTopic, code: int, reason: str, payload: bytes, size: int) -> None:
        """The broker's hook (Ingest.on_reject): one refused request on ``topic`` from ``client_id``."""
        prefix = f"{topic.product_key}/{topic.device_key}/"
        self.record(
            Refusal(
                received_at=datetime.now(UTC),
                topic=topic.topic,
                product_key=topic.product_key,
                device_key=topic.device_key,
                client_id=client_id.removeprefix(prefix) if client_id else None,
                code=code,
                reason=reason,
                payload=payload[: self._payload_bytes] if self.keep else b"",
                payload_bytes=size,
            )
        )

    async def _run(self) -> None:
        await self._schema_ready.wait()
        loop = asyncio.get_running_loop()
        next_prune = loop.time()
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _PRUNE_EVERY_S)
            self._wake.clear()
            try:
                await self._flush()
                if loop.time() >= next_prune:
                    await self._prune()
                    next_prune = loop.time() + _PRUNE_EVERY_S
            except Exception as exc:  # the database is away: keep what is pending (bounded), try again
                log.warning("could not keep refused requests", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(1.0)
                self._wake.set()

    async def _flush(self) -> None:
        assert self._pool is not None
        while self._pending:
            batch = [self._pending[i] for i in range(min(_BATCH, len(self._pending)))]
            limit = self._payload_bytes
            await self._pool.executemany(
                """
                INSERT INTO rejected_messages (received_at, topic, product_key, device_key, client_id, code, reason,
                                               payload, payload_bytes, truncated)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                """,
                [
                    (
                        r.received_at,
                        r.topic,
                        r.product_key,
                        r.device_key,
                        r.client_id,
                        r.code,
                        r.reason,
                        r.payload[:limit] if limit else None,
                        r.payload_bytes,
                        r.payload_bytes > min(limit, len(r.payload)) or not limit,
                    )
                    for r in batch
                ],
            )
            for _ in batch:
                self._pending.popleft()

    async def _prune(self) -> None:
        assert self._pool is not None
        await self._pool.execute(
            "DELETE FROM rejected_messages WHERE received_at < now() - make_interval(secs => $1)",
            self._max_age_hours * 3600,
        )
        await self._pool.execute(
            """
            DELETE FROM rejected_messages WHERE id <= (
                SELECT id FROM rejected_messages ORDER BY id DESC OFFSET $1 LIMIT 1
            )
            """,
            self._max_count,
        )


# -- reading and replaying (the command line) ---------------------------------------------------------------

_SELECT = """
    SELECT id, received_at, topic, product_key, device_key, client_id, code, reason, payload, payload_bytes,
           truncated, replayed_at, replay_code, replay_reason
    FROM rejected_messages
"""


def _kept(row: asyncpg.Record) -> Kept:
    return Kept(**dict(row.items()))


async def list_kept(
    conn: asyncpg.Connection,
    *,
    code: int | None = None,
    product_key: str | None = None,
    device_key: str | None = None,
    pending_only: bool = False,
    limit: int = 50,
) -> list[Kept]:
    """The newest kept refusals first, filtered."""
    rows = await conn.fetch(
        _SELECT
        + """
        WHERE ($1::int IS NULL OR code = $1) AND ($2::text IS NULL OR product_key = $2)
          AND ($3::text IS NULL OR device_key = $3) AND (NOT $4 OR replay_code IS DISTINCT FROM 200)
        ORDER BY id DESC LIMIT $5
        """,
        code,
        product_key,
        device_key,
        pending_only,
        limit,
    )
    return [_kept(row) for row in rows]


async def get_kept(conn: asyncpg.Connection, ids: Sequence[int]) -> list[Kept]:
    """The kept refusals with these ids, oldest first."""
    rows = await conn.fetch(_SELECT + " WHERE id = ANY($1::bigint[]) ORDER BY id", list(ids))
    return [_kept(row) for row in rows]


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What one kept request became when run through the pipeline again."""

    id: int
    code: int
    reason: str
    points: int


async def replay(
    conn: asyncpg.Connection,
    dsn: str,
    kept: Sequence[Kept],
    models: Mapping[str, ThingModel],
    *,
    max_payload_bytes: int,
    dry_run: bool = False,
) -> list[ReplayResult]:
    """Run kept requests through the pipeline with ``models``; store what passes, record every result."""
    relations = await conn.fetch(
        "SELECT gateway_product_key, gateway_device_key, product_key, device_key FROM devices"
        " WHERE gateway_product_key IS NOT NULL AND enabled"
    )
    sub_devices = {((r[0], r[1]), (r[2], r[3])) for r in relations}
    registered = {(r[0], r[1]) for r in await conn.fetch("SELECT product_key, device_key FROM devices")}
    writer = PointWriter(dsn) if not dry_run else None
    results: list[ReplayResult] = []
    try:
        if writer is not None:
            writer.start()
        for item in kept:
            result = await _replay_one(
                item, models, writer, sub_devices, registered, max_payload_bytes=max_payload_bytes
            )
            results.append(result)
            if not dry_run:
                await conn.execute(
                    "UPDATE rejected_messages SET replayed_at = now(), replay_code = $2, replay_reason = $3"
                    " WHERE id = $1",
                    item.id,
                    result.code,
                    result.reason,
                )
    finally:
        if writer is not None:
            await writer.close()
    return results


async def _replay_one(
    item: Kept,
    models: Mapping[str, ThingModel],
    writer: PointWriter | None,
    sub_devices: set[tuple[tuple[str, str], tuple[str, str]]],
    registered: set[tuple[str, str]],
    *,
    max_payload_bytes: int,
) -> ReplayResult:
    if item.payload is None or item.truncated:
        return ReplayResult(item.id, item.code, "payload not kept whole: cannot replay", 0)
    topic = parse_request_topic(item.topic)
    if topic is None:
        return ReplayResult(item.id, item.code, f"not a request topic: {item.topic}", 0)
    gateway = (topic.product_key, topic.device_key)
    signed_in = gateway in registered  # an anonymous (development) sender had no identity to check

    def sub_device_ok(gw: tuple[str, str], sub: tuple[str, str]) -> bool:
        return not signed_in or (gw, sub) in sub_devices

    outcome = handle(
        topic,
        item.payload,
        models=models,
        received_ms=int(item.received_at.timestamp() * 1000),
        max_bytes=max_payload_bytes,
        sub_device_ok=sub_device_ok,
    )
    if not outcome.accepted:
        return ReplayResult(item.id, int(outcome.code), outcome.message, 0)
    if writer is not None:
        await asyncio.wait_for(writer.submit(outcome.rows), 60)
    return ReplayResult(item.id, int(ReplyCode.OK), outcome.message, len(outcome.rows))
