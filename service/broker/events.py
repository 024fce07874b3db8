"""Event posts inside the broker: decision, commit, then reply and PUBACK (``ingest.py``'s order, for events).

The request router (service/broker/requests.py) hands it every request on the ``event_post`` route.

A post on ``/sys/{pk}/{dk}/thing/event/{eventId}/post`` is decided by ``service.events.handle_event``; an
accepted one is submitted to the event sink (``service.storage.events.EventWriter``) and its ticket is answered
with the 200 only once the row is committed. A refused one is answered at once and nothing of it is stored.
If the commit cannot happen (the database is down) the ticket is never answered, and the device re-sends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from service.broker.acl import Identity
from service.broker.ingest import Ticket, now_ms
from service.events import EventOutcome, EventRow, handle_event
from service.model.thingmodel import ThingModel
from service.ops import metrics
from service.protocol import replies
from service.protocol.replies import ReplyCode
from service.protocol.topics import DeviceRequest, EventTopic

if TYPE_CHECKING:
    from service.broker.requests import Caller

log = structlog.get_logger("pointgate.events")


class EventSink(Protocol):
    """Where accepted events go (service.storage.events.EventWriter)."""

    def submit(self, row: EventRow) -> asyncio.Future[None]:
        """Queue ``row``; the future resolves once it is committed."""


class EventIngest:
    """The broker's handler for ``/sys/+/+/thing/event/+/post`` requests."""

    def __init__(
        self, events: EventSink, models: Mapping[str, ThingModel], *, max_payload_bytes: int, clock: Any = now_ms
    ) -> None:
        self._events = events
        self.models = models
        self._max_bytes = max_payload_bytes
        self._clock = clock

    def accept(self, topic: EventTopic, payload: bytes, ticket: Ticket, *, device: Identity, client_id: str) -> None:
        """Decide on one event post; answer it now (refused) or after its row is committed (accepted)."""
        outcome = handle_event(topic, payload, models=self.models, received_ms=self._clock(), max_bytes=self._max_bytes)
        if not outcome.accepted or outcome.row is None:
            _log_rejection(client_id, topic, outcome.code, outcome.message)
            _count("rejected", outcome.code)
            ticket.answer(outcome.reply())
            return
        committed = self._events.submit(outcome.row)
        committed.add_done_callback(partial(_on_commit, outcome, ticket))

    def handle(self, request: DeviceRequest, payload: bytes, ticket: Ticket, caller: Caller) -> None:
        """The ``event_post`` route's handler (service/broker/requests.py): the device, or its gateway, posts."""
        self.accept(EventTopic.of(request), payload, ticket, device=caller.identity, client_id=caller.client_id)


def _on_commit(outcome: EventOutcome, ticket: Ticket, done: asyncio.Future[None]) -> None:
    if done.cancelled():
        # shutting down before the commit: no reply, no PUBACK; the device keeps the event and re-sends
        metrics.MESSAGES.labels(api="event", outcome="failed", code="none").inc()
        ticket.abandon()
        return
    if done.exception() is not None:
        _count("failed", ReplyCode.INTERNAL_ERROR)
        ticket.answer(replies.encode(outcome.request_id, ReplyCode.INTERNAL_ERROR, replies.not_stored()))
        return
    _count("accepted", ReplyCode.OK)
    ticket.answer(outcome.reply())


def _count(result: metrics.MessageOutcome, code: ReplyCode) -> None:
    metrics.MESSAGES.labels(api="event", outcome=result, code=str(int(code))).inc()
    metrics.REPLIES.labels(code=str(int(code))).inc()


def _log_rejection(client_id: str, topic: EventTopic, code: ReplyCode, reason: str) -> None:
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
