"""service/broker/connection.py: framing, ordering and bounds of one connection, over a fake transport (no I/O)."""

from __future__ import annotations

import asyncio
from typing import Any

from service.broker.connection import Connection, Limits
from service.broker.overrides import PointgateSession
from service.protocol.topics import RequestTopic

REQUEST = "/sys/pk/dk/thing/measurepoint/resume"


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.protocol: Any = None
        self.paused = False
        self.closed = False
        self.aborted = False
        self.buffered = 0  # what get_write_buffer_size reports

    def get_protocol(self) -> Any:
        return self.protocol

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True


class FakeIngest:
    def __init__(self) -> None:
        self.tickets: list[Any] = []

    def accept(
        self, topic: RequestTopic, payload: bytes, ticket: Any, *, device: Any, client_id: str, online: Any = ()
    ) -> None:
        self.tickets.append(ticket)
        if payload == b"bad":
            ticket.answer(b"refused")

    def reject_oversize(self, topic: RequestTopic, size: int, ticket: Any, *, client_id: str) -> None:
        ticket.answer(b"too large")


class FakeHub:
    """Delivers replies to the connection when it is subscribed to ``topic``."""

    def __init__(self) -> None:
        self.ingest = FakeIngest()
        self.requests: Any = None
        self.conn: Connection | None = None
        self.subscribed: set[str] = {REQUEST + "_reply"}

    def deliver(self, topic: str, data: bytes, qos: int) -> None:
        if topic in self.subscribed and self.conn is not None:
            self.conn.send(topic, data, qos)

    def retain(self, topic: str, data: bytes, qos: int) -> None:
        pass

    def subscribe(self, session: Any, topic_filter: str, qos: int) -> int:
        return min(qos, 1)

    def unsubscribe(self, session: Any, topic_filter: str) -> None:
        pass

    def retained_for(self, topic_filter: str) -> list[tuple[str, bytes, int]]:
        return []

    full = False

    def hold_back(self, conn: Connection) -> bool:
        return self.full


class FakeWriter:
    def __init__(self, transport: FakeTransport) -> None:
        self.transport = transport


def connection(**limits: int) -> tuple[Connection, FakeHub, FakeTransport]:
    hub, transport = FakeHub(), FakeTransport()
    conn = Connection(hub, asyncio.StreamReader(), FakeWriter(transport), Limits(**limits))  # type: ignore[arg-type]
    hub.conn = conn
    session = PointgateSession()
    session.client_id = "c"
    conn.begin(session, b"CONNACK")
    transport.writes.clear()
    return conn, hub, transport


def publish(topic: str, payload: bytes, packet_id: int, qos: int = 1) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic.encode() + packet_id.to_bytes(2, "big") + payload
    return bytes([0x30 | qos << 1, len(body)]) + body


def packets(data: bytes) -> list[tuple[int, bytes]]:
    found, at = [], 0
    while at < len(data):
        length, shift, index = 0, 0, at + 1
        while True:
            byte = data[index]
            length |= (byte & 0x7F) << shift
            index += 1
            if not byte & 0x80:
                break
            shift += 7
        found.append((data[at] >> 4, data[index : index + length]))
        at = index + length
    return found


def summary(data: bytes) -> list[str]:
    """Each packet as "reply <payload>" or "puback <id>"."""
    out = []
    for kind, body in packets(data):
        if kind == 3:
            topic_end = 2 + int.from_bytes(body[:2], "big")
            out.append("reply " + body[topic_end + 2 :].decode())
        elif kind == 4:
            out.append(f"puback {int.from_bytes(body, 'big')}")
        else:
            out.append(f"type {kind}")
    return out


async def test_pubacks_wait_in_order_and_each_follows_its_reply_in_one_write() -> None:
    conn, hub, transport = connection()
    conn.data_received(publish(REQUEST, b"ok", 1) + publish(REQUEST, b"bad", 2) + publish(REQUEST, b"ok", 3))
    assert transport.writes == []  # 2 is answered, but 1 is not: nothing may overtake it
    first, _, third = hub.ingest.tickets
    third.answer(b"r3")
    first.answer(b"r1")
    conn._flush()
    assert len(transport.writes) == 1
    assert summary(transport.writes[0]) == ["reply r1", "puback 1", "reply refused", "puback 2", "reply r3", "puback 3"]


async def test_reading_pauses_at_max_inflight_and_resumes_as_answers_come() -> None:
    conn, hub, transport = connection(max_inflight=2)
    conn.data_received(b"".join(publish(REQUEST, b"ok", k) for k in range(1, 6)))
    assert len(hub.ingest.tickets) == 2 and transport.paused  # the other three wait, unparsed
    hub.ingest.tickets[0].answer(b"r1")
    conn._flush()
    assert len(hub.ingest.tickets) == 3 and transport.paused
    for ticket in hub.ingest.tickets[1:]:
        ticket.answer(b"r")
    conn._flush()
    assert len(hub.ingest.tickets) == 5 and not transport.paused  # all read: it pauses at the next packet
    conn.data_received(publish(REQUEST, b"ok", 6))
    assert len(hub.ingest.tickets) == 5 and transport.paused
    for ticket in hub.ingest.tickets[3:]:
        ticket.answer(b"r")
    conn._flush()
    assert len(hub.ingest.tickets) == 6 and not transport.paused
    hub.ingest.tickets[5].answer(b"r")
    conn._flush()
    assert [s for s in summary(b"".join(transport.writes)) if s.startswith("puback")] == [
        f"puback {k}" for k in range(1, 7)
    ]


async def test_a_device_past_max_queued_bytes_is_aborted() -> None:
    conn, _, transport = connection(max_queued_bytes=100)
    transport.buffered = 101  # the device stopped reading
    conn.data_received(publish(REQUEST, b"bad", 1))
    assert transport.aborted and conn.closing and conn.closed.done()


async def test_nothing_after_a_malformed_packet_is_acted_on() -> None:
    conn, hub, transport = connection()
    conn.data_received(b"\x82\x02\x00\x01" + publish(REQUEST, b"ok", 1))  # SUBSCRIBE without a filter
    assert transport.closed and hub.ingest.tickets == [] and transport.writes == []
    conn.data_received(b"\xc0\x00")  # and later bytes are ignored too
    assert transport.writes == []


async def test_a_packet_split_across_reads_is_parsed_once_whole() -> None:
    conn, hub, _ = connection()
    data = publish(REQUEST, b"ok", 7)
    for byte in data:
        conn.data_received(bytes([byte]))
    assert len(hub.ingest.tickets) == 1 and hub.ingest.tickets[0].packet_id == 7


async def test_a_full_writer_stops_reading_until_resumed() -> None:
    conn, hub, transport = connection()
    hub.full = True
    conn.data_received(publish(REQUEST, b"ok", 1) + publish(REQUEST, b"ok", 2))
    assert hub.ingest.tickets == [] and transport.paused
    hub.full = False
    conn.resume()
    assert len(hub.ingest.tickets) == 2 and not transport.paused


async def test_a_draining_connection_answers_what_it_took_and_reads_nothing_more() -> None:
    """stop_reading (shutdown): requests already taken are answered and acknowledged; later bytes are not parsed,
    whatever frees the window or the writer."""
    conn, hub, transport = connection()
    conn.data_received(publish(REQUEST, b"ok", 1))
    conn.stop_reading()
    assert transport.paused
    conn.data_received(publish(REQUEST, b"ok", 2))  # already in flight from the device
    conn.resume()  # the writer has room again: still nothing more is read
    hub.ingest.tickets[0].answer(b"r1")
    conn._flush()
    assert len(hub.ingest.tickets) == 1 and transport.paused
    assert summary(b"".join(transport.writes)) == ["reply r1", "puback 1"]
