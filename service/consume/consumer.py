"""One message from the cluster broker, start to PUBACK: decide, commit, reply, acknowledge in order.

The same steps as ``serve`` (service/broker/ingest.py), with the broker on the other side of a client
connection: the pipeline decides; an accepted request is queued on the writer; only when its rows are
committed is the reply published on the request's ``_reply`` topic and the PUBACK released to the broker.
A refused request (bad payload, model violation, …) is answered and acknowledged at once, so it is never
redelivered; a request the database refuses gets a 500 reply and is acknowledged too (redelivering it would
fail the same way, forever).

PUBACKs leave in the order the messages arrived ([MQTT-4.6.0-2]): a refused message that overtook an accepted
one waits for that one's commit. At most ``max_in_flight`` messages are held between receipt and PUBACK; at
the bound the link stops reading and TCP flow control holds the broker back (on MQTT 5 the broker already
honours the same number as our Receive Maximum). Reading also stops while the writer is full: its bound counts
points, so a few very large messages cannot fill memory either.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from service.model.thingmodel import ThingModel
from service.ops import metrics
from service.ops.logs import get_logger
from service.pipeline import Outcome, handle
from service.protocol import replies
from service.protocol.replies import ReplyCode
from service.protocol.topics import RequestTopic, parse_request_topic
from service.storage.writer import PointWriter

from .link import Delivery

log = get_logger("pointgate.consume")


class Link(Protocol):
    """What the consumer needs from the broker connection (`BrokerLink`, or a test double)."""

    def ack(self, generation: int, mid: int, qos: int) -> bool: ...
    def publish(self, topic: str, payload: bytes) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...


@dataclass(slots=True)
class _Held:
    delivery: Delivery
    settled: bool = False  # answered (or given up): its PUBACK may go when every earlier one has
    acknowledge: bool = True  # False when its commit was abandoned at shutdown: the broker must redeliver it


class Consumer:
    """Turns deliveries into commits, replies and in-order PUBACKs."""

    def __init__(
        self,
        link: Link,
        writer: PointWriter,
        models: Mapping[str, ThingModel],
        *,
        max_payload_bytes: int,
        max_in_flight: int,
    ) -> None:
        self._link = link
        self._writer = writer
        self.models = models
        self._max_bytes = max_payload_bytes
        self._max_in_flight = max_in_flight
        self._held: deque[_Held] = deque()
        self._holding: dict[tuple[int, int], _Held] = {}  # (generation, packet id) -> held message
        self._idle = asyncio.Event()
        self._idle.set()
        self._paused = False
        self._room: asyncio.Task[None] | None = None  # waiting for the writer to have room again
        # (gateway, sub-device) pairs from the registry, refreshed by the service
        self.sub_devices: frozenset[tuple[tuple[str, str], tuple[str, str]]] = frozenset()
        self.received = 0
        self.acknowledged = 0

    @property
    def in_flight(self) -> int:
        """Messages received and not yet acknowledged."""
        return len(self._held)

    async def wait_idle(self, seconds: float) -> bool:
        """Wait until nothing is held; False if ``seconds`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), seconds)
        except TimeoutError:
            return False
        return True

    def _sub_device_ok(self, gateway: tuple[str, str], sub_device: tuple[str, str]) -> bool:
        return (gateway, sub_device) in self.sub_devices

    def on_delivery(self, delivery: Delivery) -> None:
        """Handle one PUBLISH from the broker (called by the link, on the event loop)."""
        key = (delivery.generation, delivery.mid)
        if delivery.qos > 0 and key in self._holding:
            # the broker re-sent (DUP) a message we are still committing: one commit, one PUBACK
            return
        self.received += 1
        held = _Held(delivery)
        self._held.append(held)
        if delivery.qos > 0:
            self._holding[key] = held
        self._idle.clear()
        if len(self._held) >= self._max_in_flight:
            # every time, not once: a reconnect resumes reading (the CONNACK must be read) behind our back
            self._paused = True
            self._link.pause()

        topic = parse_request_topic(delivery.topic)
        if topic is None:
            # only reachable with a custom filter wider than the request topics (such as measurepoint/#)
            log.warning("not a measurepoint request, acknowledged and ignored", topic=delivery.topic)
            self._settle(held)
            return
        outcome = handle(
            topic,
            delivery.payload,
            models=self.models,
            received_ms=time.time_ns() // 1_000_000,
            max_bytes=self._max_bytes,
            sub_device_ok=self._sub_device_ok,
        )
        if not outcome.accepted:
            log.info(
                "request rejected",
                product=topic.product_key,
                device=topic.device_key,
                topic=topic.topic,
                code=int(outcome.code),
                reason=outcome.message,
            )
            self._answer(topic, outcome.reply(), outcome.code, "rejected")
            self._settle(held)
            return
        committed = self._writer.submit(outcome.rows)
        committed.add_done_callback(lambda done: self._on_commit(done, topic, outcome, held))
        if self._writer.full and self._room is None:
            # few messages but many points each: the writer's own bound (in points) holds reading back too
            self._link.pause()
            self._room = asyncio.create_task(self._resume_when_room())

    async def _resume_when_room(self) -> None:
        await self._writer.wait_for_room()
        self._room = None
        if len(self._held) < self._max_in_flight:
            self._paused = False
            self._link.resume()

    def _on_commit(self, done: asyncio.Future[None], topic: RequestTopic, outcome: Outcome, held: _Held) -> None:
        if done.cancelled():
            # shutting down before the commit: no reply, no PUBACK; the broker redelivers or the device re-sends
            metrics.MESSAGES.labels(api=topic.name, outcome="failed", code="none").inc()
            held.acknowledge = False
        elif done.exception() is not None:
            reply = replies.encode(outcome.request_id, ReplyCode.INTERNAL_ERROR, replies.not_stored())
            self._answer(topic, reply, ReplyCode.INTERNAL_ERROR, "failed")
        else:
            self._answer(topic, outcome.reply(), ReplyCode.OK, "accepted")
        self._settle(held)

    def _answer(self, topic: RequestTopic, payload: bytes, code: ReplyCode, result: metrics.MessageOutcome) -> None:
        metrics.MESSAGES.labels(api=topic.name, outcome=result, code=str(int(code))).inc()
        metrics.REPLIES.labels(code=str(int(code))).inc()
        self._link.publish(topic.reply_topic, payload)

    def _settle(self, held: _Held) -> None:
        held.settled = True
        # PUBACKs in arrival order: release every settled message at the head of the line
        while self._held and self._held[0].settled:
            first = self._held.popleft()
            d = first.delivery
            if d.qos > 0:
                self._holding.pop((d.generation, d.mid), None)
            if first.acknowledge and self._link.ack(d.generation, d.mid, d.qos):
                self.acknowledged += 1
        if self._paused and len(self._held) < self._max_in_flight and self._room is None:
            self._paused = False
            self._link.resume()
        if not self._held:
            self._idle.set()
