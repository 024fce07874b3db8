"""One event post, start to decision: topic → envelope → the product's event definition → a row, or a refusal.

The event counterpart of ``service/pipeline.py``, and as pure: the broker layer feeds it a PUBLISH on
``/sys/{pk}/{dk}/thing/event/{eventId}/post`` and gets back an `EventOutcome`; the event writer stores its row
and only then is the 200 reply sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from service.errors import DeviceFault
from service.model.thingmodel import ThingModel
from service.protocol import replies
from service.protocol.envelope import decode_event
from service.protocol.replies import ReplyCode
from service.protocol.topics import EventTopic


class EventRow(NamedTuple):
    """One event to store: who, which event, when, its output values as sent, and when it arrived."""

    product_key: str
    device_key: str
    event_id: str
    event_type: str | None  # INFO, WARN or ERROR from the model; None for an event outside a non-validating one
    time_ms: int
    values: dict[str, Any]
    received_ms: int


@dataclass(frozen=True, slots=True)
class EventOutcome:
    """What to store (``row``, when accepted) and what to answer."""

    request_id: Any
    code: ReplyCode
    message: str = ""
    row: EventRow | None = None

    @property
    def accepted(self) -> bool:
        """True when the row must be committed before the (200) reply goes out."""
        return self.code is ReplyCode.OK

    def reply(self) -> bytes:
        """The reply payload, as for measurement points."""
        return replies.encode(self.request_id, self.code, self.message)


def handle_event(
    topic: EventTopic,
    payload: bytes,
    *,
    models: Mapping[str, ThingModel],
    received_ms: int,
    max_bytes: int,
) -> EventOutcome:
    """Decide what an event post on ``topic`` becomes.

    An event the product's model does not define (or a product without a model) is a 1204 naming it, as EnOS
    answers an event that does not match the model; with ``validate: false`` it is stored as sent.
    """
    try:
        request = decode_event(payload, topic, received_ms=received_ms, max_bytes=max_bytes)
    except DeviceFault as fault:
        return EventOutcome(fault.request_id, fault.code, fault.text)
    model = models.get(topic.product_key)
    if model is None:
        reason = f"{topic.event_id}: product {topic.product_key!r} has no thing model"
        return EventOutcome(request.id, ReplyCode.MODEL_VALIDATE_FAILED, replies.model_invalid([reason]))
    issues = model.check_event(topic.event_id, request.values)
    if issues:
        lines = [f"event {topic.event_id}: {issue}" for issue in issues]
        return EventOutcome(request.id, ReplyCode.MODEL_VALIDATE_FAILED, replies.model_invalid(lines))
    spec = model.events.get(topic.event_id)
    row = EventRow(
        topic.product_key,
        topic.device_key,
        topic.event_id,
        spec.event_type if spec is not None else None,
        request.time_ms,
        request.values,
        received_ms,
    )
    return EventOutcome(request.id, ReplyCode.OK, "", row)
