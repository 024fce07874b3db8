"""Issue 7.2: PUBACK never overtakes the reply, PUBACKs keep arrival order, and every queue is bounded.

Raw MQTT over real sockets against a real pointgate and PostgreSQL: the order of bytes on the wire is what is
asserted, not anything inside the broker.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

from service.ops import metrics
from tests.integration._mqtt import PUBACK, PUBLISH, RawClient, connect_packet, publish_packet, subscribe_packet
from tests.integration.test_hardening import closed_port
from tests.support import SAMPLE, Device, RunningService, resume_topic


def request(packet_id: int, *, valid: bool) -> bytes:
    """Request ``packet_id`` (its ``id`` is the same number as text); an invalid one is refused at once (1204)."""
    points = SAMPLE["params"]["measurepoints"] if valid else {"temp": "not a number"}  # type: ignore[index]
    body = dict(SAMPLE, id=str(packet_id), params={"measurepoints": points, "time": 1700000000000 + packet_id})
    return publish_packet(resume_topic(dk="order"), json.dumps(body).encode(), qos=1, packet_id=packet_id)


def test_pubacks_keep_arrival_order_and_never_overtake_their_reply(service: RunningService) -> None:
    """Valid (committed, answered later) and invalid (answered at once) requests interleaved in one write.

    PUBACKs come back in the order the PUBLISHes went out, and each request's reply arrives before its PUBACK,
    whichever of them the broker could answer first.
    """
    count = 30
    topic = resume_topic(dk="order")
    raw = RawClient(service.port)
    try:
        assert raw.connect(connect_packet("order")) == 0
        raw.send(subscribe_packet(1, [(topic + "_reply", 1)]))
        assert raw.read_packet(2.0) is not None
        raw.send(b"".join(request(k, valid=k % 3 != 0) for k in range(1, count + 1)))
        events: list[tuple[str, int]] = []
        deadline = time.monotonic() + 10
        while sum(1 for kind, _ in events if kind == "puback") < count and time.monotonic() < deadline:
            packet = raw.read_packet(deadline - time.monotonic())
            if packet is None:
                break
            kind, body = packet
            if kind == PUBACK:
                events.append(("puback", int.from_bytes(body[:2], "big")))
            elif kind == PUBLISH:
                topic_len = int.from_bytes(body[:2], "big")
                payload = body[2 + topic_len + 2 :]  # QoS 1: a packet id after the topic
                reply = json.loads(payload)
                events.append(("reply", int(reply["id"])))
                assert reply["code"] == (200 if int(reply["id"]) % 3 else 1204)
    finally:
        raw.close()
    pubacks = [k for kind, k in events if kind == "puback"]
    assert pubacks == list(range(1, count + 1))
    for k in range(1, count + 1):
        assert events.index(("reply", k)) < events.index(("puback", k)), f"PUBACK {k} overtook its reply"


def test_a_device_faster_than_the_database_is_not_read_further(start_service: Callable[..., RunningService]) -> None:
    """With commits not happening, a device's requests beyond max_inflight_requests stay in its socket.

    The writer is handed exactly the first four requests' points; the rest are never read, so they cost
    pointgate no memory, and the device sees it as PUBACKs that do not come.
    """
    service = start_service(
        database_url=f"postgresql://pointgate@127.0.0.1:{closed_port()}/none",
        drain_timeout=1.0,
        max_inflight_requests=4,
    )
    writer = service.service.writer
    assert writer is not None
    raw = RawClient(service.port)
    try:
        assert raw.connect(connect_packet("fast")) == 0
        raw.send(b"".join(request(k, valid=True) for k in range(1, 51)))
        deadline = time.monotonic() + 5
        while writer.queued_points < 12 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert writer.queued_points == 12  # 4 requests x 3 points
        assert raw.read_packet(0.5) is None  # no PUBACK: nothing is committed
        assert writer.queued_points == 12  # and nothing more was read meanwhile
    finally:
        raw.close()


def test_device_that_never_reads_its_replies_is_disconnected(start_service: Callable[..., RunningService]) -> None:
    """Replies pile up towards a device that does not read them only up to max_queued_bytes; then it is cut off.

    Other devices keep getting their replies.
    """
    service = start_service(max_queued_bytes=65536)
    before = metrics.REGISTRY.get_sample_value("pointgate_limit_hits_total", {"limit": "queued_bytes"}) or 0
    topic = resume_topic(dk="deaf")
    # 50 undefined points: each refusal names all of them, so every reply is ~1.5 KB
    body = dict(SAMPLE, params={"measurepoints": {f"undefined{i}": i for i in range(50)}})
    packet = publish_packet(topic, json.dumps(body).encode(), qos=0)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", service.port))
    sent = 0
    try:
        sock.sendall(connect_packet("deaf") + subscribe_packet(1, [(topic + "_reply", 1)]))
        burst = packet * 64
        while sent < 64 << 20:
            try:
                sock.sendall(burst)
            except OSError:
                break
            sent += len(burst)
    finally:
        sock.close()
    assert sent < 64 << 20, "never disconnected"
    after = metrics.REGISTRY.get_sample_value("pointgate_limit_hits_total", {"limit": "queued_bytes"})
    assert after == before + 1
    dev = Device(service.port, "listener")
    try:
        assert dev.connect() == 0
        assert dev.request(resume_topic(dk="listener"), SAMPLE)["code"] == 200
    finally:
        dev.close()
