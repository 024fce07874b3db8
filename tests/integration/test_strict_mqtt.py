"""Issue 8: strict MQTT 3.1.1 framing and bounded resources per connection, against a real pointgate.

Each test reproduces one finding the way a broken or hostile device would (raw bytes over a real socket) and
asserts what the specification asks: the connection is closed at once (nothing after the offending packet is
acted on), the socket is released, and other devices notice nothing.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from service.ops import metrics
from tests.integration._login import PK, Login, login, register
from tests.integration._mqtt import (
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBREC,
    SUBACK,
    RawClient,
    connect_packet,
    frame,
    publish_packet,
    subscribe_packet,
)
from tests.support import SAMPLE, Device, RunningService, fetch, resume_topic

DISCONNECT = frame(0xE0, b"")


def _field(data: str | bytes) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return len(raw).to_bytes(2, "big") + raw


def limit_hits(limit: str) -> float:
    value = metrics.REGISTRY.get_sample_value("pointgate_limit_hits_total", {"limit": limit})
    return value or 0.0


def stored_rows(dsn: str, device_key: str) -> int:
    return int(fetch(dsn, "SELECT count(*) FROM measurepoints WHERE device_key = $1", device_key)[0][0])


def sign_in(service: RunningService, dk: str) -> Login:
    secret = f"secret-of-{dk}"
    register(service, dk, secret)
    return login(dk, secret)


def close_wait_sockets(port: int) -> int:
    """Sockets of this host on local ``port`` in CLOSE_WAIT (the peer left, we never closed)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "08":
                count += 1
    return count


def other_device_served(service: RunningService, dk: str = "bystander") -> int:
    """A well-behaved device's request, after the misbehaving one: its reply code."""
    dev = Device(service.port, dk)
    try:
        assert dev.connect() == 0
        return int(dev.request(resume_topic(dk=dk), SAMPLE)["code"])
    finally:
        dev.close()


# --- 1. a CONNECT body under another packet type: closed, socket released ----------------------------------------
@pytest.mark.parametrize("first_byte", [0x30, 0xC0], ids=["as-publish", "as-pingreq"])
def test_connect_under_another_packet_type_is_closed_and_released(service: RunningService, first_byte: int) -> None:
    """The connection is closed at once, and no socket is left in CLOSE_WAIT when the clients leave."""
    body = connect_packet("leak")[2:]  # the CONNECT's body (its remaining length is one byte here)
    clients = [RawClient(service.port) for _ in range(20)]
    try:
        for raw in clients:
            raw.send(frame(first_byte, body))
        for raw in clients:
            assert raw.wait_closed(10.0) is not None
    finally:
        for raw in clients:
            raw.close()
    deadline = time.monotonic() + 1.0
    while close_wait_sockets(service.port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert close_wait_sockets(service.port) == 0


# --- 2. nothing after DISCONNECT, nothing after a packet that closes ------------------------------------------------
def test_nothing_after_disconnect_is_answered(service: RunningService) -> None:
    """DISCONNECT then PINGREQ in one write: no PINGRESP, the connection closes at once."""
    raw = RawClient(service.port)
    try:
        assert raw.connect(connect_packet("bye")) == 0
        raw.send(DISCONNECT + PINGREQ)
        assert raw.wait_closed(10.0) is not None
        assert raw.received(PINGRESP) == []
    finally:
        raw.close()


def test_request_after_disconnect_is_not_stored(service: RunningService, migrated_dsn: str) -> None:
    """With keep-alive 0, a request sent after DISCONNECT is neither acknowledged nor stored."""
    raw = RawClient(service.port)
    try:
        assert raw.connect(connect_packet("after-bye", keepalive=0)) == 0
        request = publish_packet(resume_topic(dk="after-bye"), json.dumps(SAMPLE).encode(), qos=1, packet_id=3)
        raw.send(DISCONNECT + request)
        assert raw.wait_closed(10.0) is not None
        assert raw.received(PUBACK) == []
    finally:
        raw.close()
    assert other_device_served(service) == 200  # a commit after it has happened, so it would have been stored
    assert stored_rows(migrated_dsn, "after-bye") == 0


# --- 3. a topic that is not UTF-8: closed, the payload never parsed as packets ------------------------------------
def test_topic_not_utf8_closes_without_reading_the_payload_as_packets(service: RunningService) -> None:
    """The payload of a PUBLISH with a non-UTF-8 topic carries a PINGREQ; it must never be answered."""
    raw = RawClient(service.port)
    try:
        assert raw.connect(connect_packet("utf8")) == 0
        body = _field(b"/sys/a/\xff\xfe") + PINGREQ * 4
        raw.send(frame(0x30, body) + PINGREQ)
        assert raw.wait_closed(10.0) is not None
        assert raw.received(PINGRESP) == []
    finally:
        raw.close()


# --- 4. malformed packets close the connection -----------------------------------------------------------------
MALFORMED = {
    "subscribe-qos-3": subscribe_packet(1, [("/sys/a/b", 3)]),
    "subscribe-no-filter": frame(0x82, (1).to_bytes(2, "big")),
    "unsubscribe-no-filter": frame(0xA2, (1).to_bytes(2, "big")),
    "subscribe-wrong-flags": frame(0x80, (1).to_bytes(2, "big") + _field("/sys/a/b") + b"\x01"),
    "pubrel-wrong-flags": frame(0x60, (1).to_bytes(2, "big")),
    "filter-not-utf8": frame(0x82, (1).to_bytes(2, "big") + _field(b"/sys/\xc3\x28") + b"\x01"),
    "filter-runs-past-packet": frame(0x82, (1).to_bytes(2, "big") + (40).to_bytes(2, "big") + b"/sys/a\x01"),
    "connack-from-client": frame(0x20, b"\x00\x00"),
    "suback-from-client": frame(0x90, b"\x00\x01\x00"),
    "pingresp-from-client": frame(0xD0, b""),
}


@pytest.mark.parametrize("packet", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_packet_closes_instead_of_being_answered(service: RunningService, packet: bytes) -> None:
    """Each packet MQTT 3.1.1 calls malformed (or a client may not send) closes the connection; nothing is answered."""
    raw = RawClient(service.port)
    try:
        assert raw.connect(connect_packet("malformed")) == 0
        raw.send(packet + PINGREQ)
        assert raw.wait_closed(10.0) is not None
        assert [kind for kind, _ in raw.packets[1:]] == []  # no SUBACK, UNSUBACK, PUBCOMP or PINGRESP
    finally:
        raw.close()


def test_qos1_publish_with_packet_id_0_is_neither_acknowledged_nor_stored(
    service: RunningService, migrated_dsn: str
) -> None:
    """Packet identifier 0 is malformed [MQTT-2.3.1-1]: closed, no PUBACK, nothing stored."""
    raw = RawClient(service.port)
    try:
        assert raw.connect(connect_packet("pid0")) == 0
        raw.send(publish_packet(resume_topic(dk="pid0"), json.dumps(SAMPLE).encode(), qos=1, packet_id=0))
        assert raw.wait_closed(10.0) is not None
        assert raw.received(PUBACK) == []
    finally:
        raw.close()
    assert other_device_served(service) == 200
    assert stored_rows(migrated_dsn, "pid0") == 0


# --- 5. and 6.: limits per connection ----------------------------------------------------------------------------
def subscribe_until_closed(port: int, connect: bytes, filters: list[str]) -> tuple[int, bool]:
    """Connect with ``connect``, SUBSCRIBE to ``filters`` one packet each: (SUBACKs received, connection closed)."""
    raw = RawClient(port)
    try:
        assert raw.connect(connect) == 0
        for index, topic_filter in enumerate(filters, start=1):
            if not raw.send(subscribe_packet(index, [(topic_filter, 1)])):
                break
            packet = raw.read_packet(2.0)
            if packet is None:
                break
        raw.wait_closed(1.0)
        return len(raw.received(SUBACK)), raw.closed
    finally:
        raw.close()


def test_wildcard_subscriptions_past_the_limit_disconnect(start_service: Callable[..., RunningService]) -> None:
    """A device piling wildcard filters into its own tree is disconnected at the limit; others are served."""
    service = start_service(max_wildcard_subscriptions=5)
    creds = sign_in(service, "wild")
    before = limit_hits("wildcard_subscriptions")
    filters = [f"/sys/{PK}/wild/thing/+/{i}/#" for i in range(50)]
    acked, closed = subscribe_until_closed(service.port, connect_packet(creds.client_id, creds), filters)
    assert (acked, closed) == (5, True)
    assert limit_hits("wildcard_subscriptions") == before + 1
    bystander = sign_in(service, "bystander")
    dev = Device(service.port, bystander.client_id, username=bystander.username, password=bystander.password)
    try:
        assert dev.connect() == 0
        assert dev.request(resume_topic(dk="bystander"), SAMPLE)["code"] == 200
    finally:
        dev.close()


def test_subscriptions_past_the_limit_disconnect(start_service: Callable[..., RunningService]) -> None:
    """More subscriptions than ``max_subscriptions`` in one session disconnect the device."""
    service = start_service(max_subscriptions=8)
    before = limit_hits("subscriptions")
    filters = [f"/sys/{PK}/x/a/{i}" for i in range(30)]
    acked, closed = subscribe_until_closed(service.port, connect_packet("x"), filters)
    assert (acked, closed) == (8, True)
    assert limit_hits("subscriptions") == before + 1


def test_device_that_never_reads_is_disconnected_and_others_unaffected(
    start_service: Callable[..., RunningService],
) -> None:
    """A device publishing to its own subscribed topic without reading is cut off near max_queued_bytes."""
    service = start_service(max_queued_bytes=65536)
    before = limit_hits("queued_bytes")
    topic = f"/sys/{PK}/sink/thing/service/x_reply"
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", service.port))
    sent = 0
    try:
        sock.sendall(connect_packet("sink") + subscribe_packet(1, [(topic, 0)]))
        chunk = publish_packet(topic, b"x" * 65536) * 16  # 1 MiB of QoS 0 publishes, echoed back to us
        while sent < 256 << 20:
            try:
                sock.sendall(chunk)
            except OSError:
                break
            sent += len(chunk)
    finally:
        sock.close()
    assert sent < 256 << 20, "never disconnected"
    assert limit_hits("queued_bytes") == before + 1
    assert other_device_served(service) == 200


def test_qos2_in_flight_past_the_limit_disconnects(start_service: Callable[..., RunningService]) -> None:
    """QoS 2 PUBLISHes never released are bounded: past max_qos2_inflight the device is disconnected."""
    service = start_service(max_qos2_inflight=4)
    before = limit_hits("qos2_inflight")
    raw = RawClient(service.port)
    try:
        assert raw.connect(connect_packet("q2")) == 0
        for packet_id in range(1, 11):
            raw.send(publish_packet(f"/sys/{PK}/q2/thing/service/x_reply", b"y" * 1000, qos=2, packet_id=packet_id))
        assert raw.wait_closed(10.0) is not None
        assert len(raw.received(PUBREC)) == 4
    finally:
        raw.close()
    assert limit_hits("qos2_inflight") == before + 1


def test_qos2_on_a_request_topic_is_refused(service: RunningService, migrated_dsn: str) -> None:
    """The SDKs publish requests at QoS 1; QoS 2 on a request topic disconnects, nothing stored."""
    raw = RawClient(service.port)
    try:
        assert raw.connect(connect_packet("q2req")) == 0
        raw.send(publish_packet(resume_topic(dk="q2req"), json.dumps(SAMPLE).encode(), qos=2, packet_id=1))
        assert raw.wait_closed(10.0) is not None
        assert raw.received(PUBREC) == []
    finally:
        raw.close()
    assert other_device_served(service) == 200
    assert stored_rows(migrated_dsn, "q2req") == 0


def test_persistent_session_of_a_device_that_never_returns_expires(
    start_service: Callable[..., RunningService],
) -> None:
    """A persistent session is dropped session_expiry seconds after its device left; it returns to a new one."""
    service = start_service(session_expiry=1.0)
    before = limit_hits("session_expiry")
    raw = RawClient(service.port)
    try:
        assert raw.connect(connect_packet("gone", clean=False)) == 0
        raw.send(subscribe_packet(1, [(f"/sys/{PK}/gone/thing/service/x_reply", 1)]))
        assert raw.read_packet(2.0) is not None
    finally:
        raw.close()
    broker = service.service.broker
    assert broker is not None
    deadline = time.monotonic() + 5.0
    while any(cid.endswith("gone") for cid in broker.sessions) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(cid.endswith("gone") for cid in broker.sessions)
    assert limit_hits("session_expiry") == before + 1
    again = RawClient(service.port)
    try:
        again.send(connect_packet("gone", clean=False))
        connack = again.read_packet(2.0)
        assert connack is not None and connack[1] == b"\x00\x00"  # session-present 0
    finally:
        again.close()


# --- 7. a value nested too deep is refused with 1204, never reaches the writer ------------------------------------
def test_deeply_nested_value_is_refused_with_1204(
    start_service: Callable[..., RunningService], tmp_path: Path, migrated_dsn: str
) -> None:
    """A point outside a ``validate: false`` model nested 300 levels deep gets 1204 (it used to be a 500)."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "loose01.json").write_text(json.dumps({"productKey": "loose01", "validate": False, "measurepoints": {}}))
    service = start_service(models=models)
    value: object = 1
    for _ in range(300):
        value = [value]
    dev = Device(service.port, "deep")
    try:
        assert dev.connect() == 0
        body = dict(SAMPLE, params={"measurepoints": {"deep": value}, "time": 1700000000000})
        reply = dev.request(resume_topic("loose01", "deep"), body)
        assert reply["code"] == 1204, reply
        assert "nested" in reply["message"]
    finally:
        dev.close()
    assert stored_rows(migrated_dsn, "deep") == 0
