"""service/broker/ingest.py: the decision path, driven with a fake point sink and fake tickets (no I/O)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import pytest

from service.broker.ingest import Ingest
from service.model.thingmodel import load_models
from service.pipeline import Row
from service.protocol.topics import RequestTopic, parse_request_topic
from service.resources import schemas_dir

MODELS = load_models(schemas_dir())
TOPIC = parse_request_topic("/sys/inverter01/dev1/thing/measurepoint/resume")
BATCH = parse_request_topic("/sys/inverter01/gw/thing/measurepoint/resume/batch")
SAMPLE = {
    "id": "42",
    "version": "1.0",
    "method": "thing.measurepoint.resume",
    "params": {"measurepoints": {"temp": 1.5, "Power": {"value": 3, "quality": 9}}, "time": 1700000000000},
}


class FakeSink:
    """Keeps what it is given; the test resolves each commit."""

    def __init__(self) -> None:
        self.submitted: list[tuple[Sequence[Row], asyncio.Future[None]]] = []

    def submit(self, rows: Sequence[Row]) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.submitted.append((rows, future))
        return future


class FakeTicket:
    def __init__(self) -> None:
        self.replies: list[dict[str, Any]] = []
        self.abandoned = False
        self.settled = asyncio.Event()

    def answer(self, reply: bytes) -> None:
        self.replies.append(json.loads(reply))
        self.settled.set()

    def abandon(self) -> None:
        self.abandoned = True
        self.settled.set()


def ingest(sink: FakeSink) -> Ingest:
    return Ingest(sink, MODELS, max_payload_bytes=4096, clock=lambda: 1_800_000_000_000)


def payload(**changes: Any) -> bytes:
    return json.dumps({**SAMPLE, **changes}).encode()


def topic(value: RequestTopic | None) -> RequestTopic:
    assert value is not None
    return value


async def test_accepted_request_is_answered_only_after_its_commit() -> None:
    sink, ticket = FakeSink(), FakeTicket()
    ingest(sink).accept(topic(TOPIC), payload(), ticket, device=("inverter01", "dev1"), client_id="c")
    assert len(sink.submitted) == 1 and ticket.replies == []  # nothing said before the commit
    rows, commit = sink.submitted[0]
    assert sorted((r.point, r.value, r.quality, r.time_ms) for r in rows) == [
        ("Power", 3, 9, 1700000000000),
        ("temp", 1.5, None, 1700000000000),
    ]
    commit.set_result(None)
    await asyncio.wait_for(ticket.settled.wait(), 1)
    assert ticket.replies == [{"id": "42", "code": 200, "message": "", "data": {}}]


async def test_refused_request_is_answered_at_once_and_stores_nothing() -> None:
    sink, ticket = FakeSink(), FakeTicket()
    bad = payload(params={"measurepoints": {"temp": "warm"}, "time": 1700000000000})
    ingest(sink).accept(topic(TOPIC), bad, ticket, device=None, client_id="c")
    assert sink.submitted == []
    assert [r["code"] for r in ticket.replies] == [1204] and ticket.replies[0]["id"] == "42"


async def test_receive_time_comes_from_the_clock_when_the_request_has_none() -> None:
    sink, ticket = FakeSink(), FakeTicket()
    ingest(sink).accept(
        topic(TOPIC), payload(params={"measurepoints": {"temp": 1.0}}), ticket, device=None, client_id="c"
    )
    assert [r.time_ms for r in sink.submitted[0][0]] == [1_800_000_000_000]


async def test_failed_commit_is_answered_as_our_error() -> None:
    sink, ticket = FakeSink(), FakeTicket()
    ingest(sink).accept(topic(TOPIC), payload(), ticket, device=None, client_id="c")
    sink.submitted[0][1].set_exception(RuntimeError("refused by the database"))
    await asyncio.wait_for(ticket.settled.wait(), 1)
    assert [(r["id"], r["code"]) for r in ticket.replies] == [("42", 500)]


async def test_commit_cancelled_by_shutdown_abandons_the_ticket() -> None:
    sink, ticket = FakeSink(), FakeTicket()
    ingest(sink).accept(topic(TOPIC), payload(), ticket, device=None, client_id="c")
    sink.submitted[0][1].cancel()
    await asyncio.wait_for(ticket.settled.wait(), 1)
    assert ticket.abandoned and ticket.replies == []


@pytest.mark.parametrize(("registered", "code"), [(False, 1212), (True, None)])
async def test_signed_in_gateway_writes_only_for_its_registered_sub_devices(registered: bool, code: int | None) -> None:
    sink, ticket = FakeSink(), FakeTicket()
    handler = ingest(sink)
    if registered:
        handler.sub_devices = frozenset({(("inverter01", "gw"), ("inverter01", "sub"))})
    item = {"productKey": "inverter01", "deviceKey": "sub", "measurepoints": {"temp": 1.0}, "time": 1700000000000}
    body = payload(method="thing.measurepoint.resume.batch", params=[item], allowOfflineSubDevice=True)
    handler.accept(topic(BATCH), body, ticket, device=("inverter01", "gw"), client_id="c")
    if code is None:
        assert len(sink.submitted) == 1 and ticket.replies == []
    else:
        assert sink.submitted == [] and [r["code"] for r in ticket.replies] == [code]


async def test_oversized_request_gets_1008_with_a_null_id() -> None:
    sink, ticket = FakeSink(), FakeTicket()
    ingest(sink).reject_oversize(topic(TOPIC), 9000, ticket, client_id="c")
    assert sink.submitted == []
    assert [(r["id"], r["code"]) for r in ticket.replies] == [(None, 1008)]
    assert "9000" in ticket.replies[0]["message"]


async def test_oversized_request_echoes_the_id_found_in_its_first_bytes() -> None:
    sink, ticket = FakeSink(), FakeTicket()
    ingest(sink).reject_oversize(topic(TOPIC), 9000, ticket, client_id="c", request_id="r-7")
    assert [(r["id"], r["code"]) for r in ticket.replies] == [("r-7", 1008)]
    assert "9000" in ticket.replies[0]["message"]
