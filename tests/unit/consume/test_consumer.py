"""The consumer's bookkeeping without a broker or a database: PUBACK order, DUPs, the in-flight bound."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from service.consume.consumer import Consumer
from service.consume.link import Delivery
from service.model.thingmodel import load_models
from service.pipeline import Row
from service.resources import schemas_dir

TOPIC = "/sys/inverter01/dev1/thing/measurepoint/resume"


class FakeLink:
    """Records what the consumer asks of the broker connection."""

    def __init__(self) -> None:
        self.acks: list[int] = []
        self.replies: list[tuple[str, dict[str, Any]]] = []
        self.paused = False
        self.pauses = 0

    def ack(self, generation: int, mid: int, qos: int) -> bool:
        self.acks.append(mid)
        return True

    def publish(self, topic: str, payload: bytes) -> None:
        self.replies.append((topic, json.loads(payload)))

    def pause(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume(self) -> None:
        self.paused = False


class FakeWriter:
    """Hands out a future per submit; the test decides when each commit lands."""

    def __init__(self) -> None:
        self.futures: list[asyncio.Future[None]] = []
        self.full = False
        self.room = asyncio.Event()

    async def wait_for_room(self) -> None:
        await self.room.wait()

    def submit(self, rows: Sequence[Row]) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        return future


def delivery(mid: int, payload: bytes | None = None, *, dup: bool = False, generation: int = 1) -> Delivery:
    body = (
        payload
        if payload is not None
        else json.dumps(
            {"id": str(mid), "method": "thing.measurepoint.resume", "params": {"measurepoints": {"temp": 1.0}}}
        ).encode()
    )
    return Delivery(generation, mid, 1, dup, TOPIC, body)


def make(max_in_flight: int = 10) -> tuple[Consumer, FakeLink, FakeWriter]:
    link, writer = FakeLink(), FakeWriter()
    consumer = Consumer(
        link,
        writer,  # type: ignore[arg-type]  # a fake of PointWriter's submit()
        load_models(schemas_dir()),
        max_payload_bytes=65536,
        max_in_flight=max_in_flight,
    )
    return consumer, link, writer


async def settle() -> None:
    await asyncio.sleep(0)  # done-callbacks run on the next loop iteration


async def test_pubacks_leave_in_arrival_order() -> None:
    """A refused message that arrives after an accepted one is answered at once but acknowledged after it."""
    consumer, link, writer = make()
    consumer.on_delivery(delivery(1))
    consumer.on_delivery(delivery(2, b"not json"))
    assert [r["code"] for _, r in link.replies] == [1220]
    assert link.acks == []  # 2 waits for 1's commit
    writer.futures[0].set_result(None)
    await settle()
    assert link.acks == [1, 2]
    assert [r["code"] for _, r in link.replies] == [1220, 200]
    assert consumer.in_flight == 0


async def test_a_dup_of_a_message_still_committing_is_ignored() -> None:
    """The broker's re-send (DUP) of a message in flight gets one commit and one PUBACK, not two."""
    consumer, link, writer = make()
    consumer.on_delivery(delivery(5))
    consumer.on_delivery(delivery(5, dup=True))
    assert len(writer.futures) == 1 and consumer.received == 1
    writer.futures[0].set_result(None)
    await settle()
    assert link.acks == [5]
    consumer.on_delivery(delivery(5))  # the broker may reuse the id once it was acknowledged
    assert len(writer.futures) == 2


async def test_abandoned_commit_is_neither_answered_nor_acknowledged() -> None:
    """Shutting down before a commit: no reply, no PUBACK, so the broker keeps the message."""
    consumer, link, writer = make()
    consumer.on_delivery(delivery(1))
    writer.futures[0].cancel()
    await settle()
    assert link.acks == [] and link.replies == []
    assert consumer.in_flight == 0


async def test_refused_commit_is_answered_500_and_acknowledged() -> None:
    consumer, link, writer = make()
    consumer.on_delivery(delivery(1))
    writer.futures[0].set_exception(ValueError("refused"))
    await settle()
    assert link.acks == [1]
    assert link.replies[0][1]["code"] == 500


async def test_reading_pauses_at_the_bound_and_resumes_below_it() -> None:
    consumer, link, writer = make(max_in_flight=2)
    consumer.on_delivery(delivery(1))
    assert not link.paused
    consumer.on_delivery(delivery(2))
    assert link.paused
    writer.futures[0].set_result(None)
    await settle()
    assert not link.paused and link.pauses == 1
    link.paused = False  # a reconnect resumed reading behind the consumer's back
    consumer.on_delivery(delivery(3))  # at the bound again: asked to pause again
    assert link.paused and link.pauses == 2


async def test_reading_pauses_while_the_writer_is_full() -> None:
    """Under the message bound but over the writer's point bound: paused until the writer has room."""
    consumer, link, writer = make(max_in_flight=100)
    writer.full = True
    consumer.on_delivery(delivery(1))
    assert link.paused
    writer.futures[0].set_result(None)
    await settle()
    assert link.paused  # the message is done, but the writer still says full
    writer.full = False
    writer.room.set()
    await settle()
    await settle()
    assert not link.paused
