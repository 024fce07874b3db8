"""Measurement-point requests inside the broker: pipeline decision, commit, then reply and PUBACK.

The order is the delivery guarantee: a request the pipeline accepts is submitted to the point sink (the
writer); only when its rows are committed is its ticket answered, which sends the 200 reply and releases the
PUBACK. A refused request is answered at once; nothing of it is stored. If the commit cannot happen (the
database is down) the ticket is never answered: the device gets neither reply nor PUBACK, and re-sends.

`Ingest` depends only on two small protocols, so the decision path runs in unit tests with fakes: a
`PointSink` (where points go: ``submit(rows) -> Future``) and a `Ticket` (where one request's answer goes).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Container, Mapping, Sequence
from functools import partial
from typing import Any, Protocol

import structlog

from service.broker.acl import Identity
from service.model.thingmodel import ThingModel
from service.ops import metrics
from service.pipeline import Outcome, Row, allow_all_sub_devices, handle
from service.protocol import replies
from service.protocol.replies import ReplyCode
from service.protocol.topics import RequestTopic

log = structlog.get_logger("pointgate.ingest")


class PointSink(Protocol):
    """Where accepted points go (service.storage.writer.PointWriter)."""

    def submit(self, rows: Sequence[Row]) -> asyncio.Future[None]:
        """Queue ``rows``; the future resolves once they are committed."""


class Ticket(Protocol):
    """Where one request's answer goes (the device's connection, in arrival order)."""

    def answer(self, reply: bytes) -> None:
        """Send ``reply`` (an encoded reply payload), then release the request's PUBACK."""

    def abandon(self) -> None:
        """The request will never be answered (shutting down): no reply, no PUBACK."""


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch: a request's receive time."""
    return math.floor(time.time() * 1000)


class Ingest:
    """The broker's handler for ``/sys/+/+/thing/measurepoint/...`` requests."""

    def __init__(
        self,
        points: PointSink,
        models: Mapping[str, ThingModel],
        *,
        max_payload_bytes: int,
        clock: Any = now_ms,
    ) -> None:
        self._points = points
        self.models = models
        self._max_bytes = max_payload_bytes
        self._clock = clock
        # (gateway, sub-device) pairs from the registry, refreshed by the service (app.py)
        self.sub_devices: frozenset[tuple[tuple[str, str], tuple[str, str]]] = frozenset()
        self._counters: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        # ops hook (service/ops/rejected.py): each refused request (client id, topic, code, reason, payload, size)
        self.on_reject: Callable[[str, RequestTopic, int, str, bytes, int], None] | None = None

    def _registered_sub_device(self, gateway: tuple[str, str], sub_device: tuple[str, str]) -> bool:
        return (gateway, sub_device) in self.sub_devices

    def accept(
        self,
        topic: RequestTopic,
        payload: bytes,
        ticket: Ticket,
        *,
        device: Identity,
        client_id: str,
        online: Container[tuple[str, str]] = frozenset(),
    ) -> None:
        """Decide on one request; answer it now (refused) or after its rows are committed (accepted).

        ``online``: the sub-devices logged in through the publishing connection (their batch items need no
        ``allowOfflineSubDevice``).
        """
        outcome = handle(
            topic,
            payload,
            models=self.models,
            received_ms=self._clock(),
            max_bytes=self._max_bytes,
            # a signed-in gateway writes only for sub-devices registered under it; anonymous sessions
            # (development mode) have no identity to check, so the request's own flag decides
            sub_device_ok=allow_all_sub_devices if device is None else self._registered_sub_device,
            online=online,
        )
        if not outcome.accepted:
            self._log_rejection(client_id, topic, outcome.code, outcome.message)
            self._count(topic, "rejected", outcome.code)
            if self.on_reject is not None:
                self.on_reject(client_id, topic, int(outcome.code), outcome.message, payload, len(payload))
            ticket.answer(outcome.reply())
            return
        committed = self._points.submit(outcome.rows)
        committed.add_done_callback(partial(self._on_commit, topic, outcome, ticket))

    def reject_oversize(
        self, topic: RequestTopic, size: int, ticket: Ticket, *, client_id: str, request_id: Any = None
    ) -> None:
        """A request too large to read: 1008 on its reply topic, echoing the id found in its first bytes (or null)."""
        detail = replies.too_large(size, self._max_bytes, what="packet")
        self._log_rejection(client_id, topic, ReplyCode.MESSAGE_TOO_LARGE, detail)
        self._count(topic, "rejected", ReplyCode.MESSAGE_TOO_LARGE)
        if self.on_reject is not None:
            self.on_reject(client_id, topic, int(ReplyCode.MESSAGE_TOO_LARGE), detail, b"", size)
        ticket.answer(replies.encode(request_id, ReplyCode.MESSAGE_TOO_LARGE, detail))

    def _on_commit(self, topic: RequestTopic, outcome: Outcome, ticket: Ticket, done: asyncio.Future[None]) -> None:
        if done.cancelled():
            # shutting down before the commit: no reply, no PUBACK; the device keeps the data and re-sends
            metrics.MESSAGES.labels(api=topic.name, outcome="failed", code="none").inc()
            ticket.abandon()
            return
        if done.exception() is not None:
            self._count(topic, "failed", ReplyCode.INTERNAL_ERROR)
            ticket.answer(replies.encode(outcome.request_id, ReplyCode.INTERNAL_ERROR, replies.not_stored()))
            return
        self._count(topic, "accepted", ReplyCode.OK)
        ticket.answer(outcome.reply())

    def _count(self, topic: RequestTopic, result: metrics.MessageOutcome, code: ReplyCode) -> None:
        """Count a message and its reply (``result`` is the metrics outcome label); label lookups cached."""
        key = (topic.name, result, int(code))
        counters = self._counters.get(key)
        if counters is None:
            counters = self._counters[key] = (
                metrics.MESSAGES.labels(api=topic.name, outcome=result, code=str(int(code))),
                metrics.REPLIES.labels(code=str(int(code))),
            )
        counters[0].inc()
        counters[1].inc()

    @staticmethod
    def _log_rejection(client_id: str, topic: RequestTopic, code: ReplyCode, reason: str) -> None:
        # one line per rejected message; a device fault, so INFO, never ERROR, and never the payload itself
        log.info(
            "request rejected",
            product=topic.product_key,
            device=topic.device_key,
            topic=topic.topic,
            client_id=client_id,
            code=int(code),
            reason=reason,
        )
