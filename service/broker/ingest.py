"""Measurement-point requests inside the broker: pipeline decision, commit, then reply and PUBACK.

The order is the delivery guarantee: a request the pipeline accepts is queued on the writer; only when its
rows are committed does the 200 reply go out and the PUBACK get released. A refused request is answered (and
acknowledged) at once; nothing of it is stored. If the commit cannot happen (the database is down) the device
gets neither, and re-sends after reconnecting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING

import structlog
from amqtt.session import Session

from service.broker.overrides import AckedMessage, now_ms
from service.model.thingmodel import ThingModel
from service.ops import metrics
from service.pipeline import Outcome, allow_all_sub_devices, handle
from service.protocol import replies
from service.protocol.replies import ReplyCode
from service.protocol.topics import RequestTopic
from service.storage.writer import PointWriter

if TYPE_CHECKING:
    from service.broker.overrides import PointgateBroker

log = structlog.get_logger("pointgate.ingest")


class Ingest:
    """The broker's handler for ``/sys/+/+/thing/measurepoint/...`` requests."""

    def __init__(
        self,
        broker: PointgateBroker,
        writer: PointWriter,
        models: Mapping[str, ThingModel],
        *,
        max_payload_bytes: int,
    ) -> None:
        self._broker = broker
        self._writer = writer
        self.models = models
        self._max_bytes = max_payload_bytes
        # (gateway, sub-device) pairs from the registry, refreshed by the service (app.py)
        self.sub_devices: frozenset[tuple[tuple[str, str], tuple[str, str]]] = frozenset()

    def _registered_sub_device(self, gateway: tuple[str, str], sub_device: tuple[str, str]) -> bool:
        return (gateway, sub_device) in self.sub_devices

    def accept(self, session: Session, topic: RequestTopic, message: AckedMessage) -> None:
        """Decide on one request; answer it now (refused) or after its rows are committed (accepted)."""
        outcome = handle(
            topic,
            bytes(message.data),
            models=self.models,
            received_ms=now_ms(),
            max_bytes=self._max_bytes,
            # a signed-in gateway writes only for sub-devices registered under it; anonymous sessions
            # (development mode) have no identity to check, so the request's own flag decides
            sub_device_ok=allow_all_sub_devices if "device" not in session.attributes else self._registered_sub_device,
        )
        if not outcome.accepted:
            self._log_rejection(session, topic, outcome.code, outcome.message)
            self._answer(topic, outcome.reply(), outcome.code, message, "rejected")
            return
        committed = self._writer.submit(outcome.rows)
        committed.add_done_callback(lambda done: self._on_commit(done, topic, outcome, message))

    def reject_oversize(self, session: Session, topic: RequestTopic, size: int, packet_id: int | None) -> None:
        """A request too large to read: 1008 on its reply topic (its id is unknown: null)."""
        detail = replies.too_large(size, self._max_bytes, what="packet")
        self._log_rejection(session, topic, ReplyCode.MESSAGE_TOO_LARGE, detail)
        reply = replies.encode(None, ReplyCode.MESSAGE_TOO_LARGE, detail)
        self._answer(topic, reply, ReplyCode.MESSAGE_TOO_LARGE, None, "rejected")

    def _on_commit(
        self, done: asyncio.Future[None], topic: RequestTopic, outcome: Outcome, message: AckedMessage
    ) -> None:
        if done.cancelled():
            # shutting down before the commit: no reply, no PUBACK; the device keeps the data and re-sends
            metrics.MESSAGES.labels(api=topic.name, outcome="failed", code="none").inc()
            return
        if done.exception() is not None:
            reply = replies.encode(outcome.request_id, ReplyCode.INTERNAL_ERROR, replies.not_stored())
            self._answer(topic, reply, ReplyCode.INTERNAL_ERROR, message, "failed")
            return
        self._answer(topic, outcome.reply(), ReplyCode.OK, message, "accepted")

    def _answer(
        self, topic: RequestTopic, payload: bytes, code: ReplyCode, message: AckedMessage | None, result: str
    ) -> None:
        """Count, publish the reply, release the PUBACK. ``result`` is the metrics outcome label."""
        metrics.MESSAGES.labels(api=topic.name, outcome=result, code=str(int(code))).inc()
        metrics.REPLIES.labels(code=str(int(code))).inc()
        self._broker.publish_reply(topic.reply_topic, payload)
        if message is not None:
            message.ack(True)

    @staticmethod
    def _log_rejection(session: Session, topic: RequestTopic, code: ReplyCode, reason: str) -> None:
        # one line per rejected message; a device fault, so INFO, never ERROR, and never the payload itself
        log.info(
            "request rejected",
            product=topic.product_key,
            device=topic.device_key,
            topic=topic.topic,
            client_id=session.client_id,
            code=int(code),
            reason=reason,
        )
