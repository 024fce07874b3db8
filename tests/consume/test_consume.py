"""`pointgate consume` against a real mosquitto: shared load, replies after commit, acks that let nothing loop."""

from __future__ import annotations

import functools
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.consume.conftest import Mosquitto, RunningConsumer
from tests.support import SAMPLE, Device, fetch, free_port, resume_topic

TOPIC = resume_topic()


def readyz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def request(index: int, value: float | str = 1.0, *, point: str = "temp") -> dict[str, Any]:
    return {
        "id": str(index),
        "version": "1.0",
        "method": "thing.measurepoint.resume",
        "params": {"measurepoints": {point: value}, "time": 1_700_000_000_000 + index},
    }


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_request_is_committed_then_answered(
    broker: Mosquitto, start_consumer: Callable[..., RunningConsumer], migrated_dsn: str, protocol: str
) -> None:
    """A device's request through mosquitto is stored and answered 200 by the consumer, on MQTT 5 and 3.1.1."""
    start_consumer(broker.url, broker_protocol=protocol)
    dev = Device(broker.port, "dev1")
    assert dev.connect() == 0
    reply = dev.request(TOPIC, SAMPLE)
    assert reply == {"id": "123", "code": 200, "message": "", "data": {}}
    rows = fetch(migrated_dsn, "SELECT point, value_num FROM measurepoints WHERE device_key = 'dev1' ORDER BY point")
    assert [(r["point"], r["value_num"]) for r in rows] == [("Power", 1.0), ("branchCurr", None), ("temp", 1.02)]
    dev.close()


def _has_replies(dev: Device, topic: str, count: int) -> bool:
    return len(replies_by_id(dev, topic)) >= count


def replies_by_id(dev: Device, topic: str) -> dict[str, int]:
    """The reply codes a device received on ``topic``'s reply topic, by request id."""
    return {
        str(json.loads(body)["id"]): json.loads(body)["code"]
        for t, body, _ in list(dev.messages)
        if t == topic + "_reply"
    }


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_two_consumers_share_the_load_and_each_reply_reaches_its_device(
    broker: Mosquitto, start_consumer: Callable[..., RunningConsumer], migrated_dsn: str
) -> None:
    """Two consumers in one group: both get work, every point is stored once, every device gets its own replies."""
    consumers = [start_consumer(broker.url), start_consumer(broker.url, broker_protocol="3.1.1")]
    devices = {f"dev{d}": Device(broker.port, f"dev{d}") for d in range(8)}
    per_device = 40
    for key, dev in devices.items():
        assert dev.connect() == 0
        dev.subscribe(resume_topic(dk=key) + "_reply")
    for index in range(per_device):
        for d, (key, dev) in enumerate(devices.items()):
            dev.publish(resume_topic(dk=key), request(d * 1000 + index, float(index)))
    for d, (key, dev) in enumerate(devices.items()):
        topic = resume_topic(dk=key)
        wait_for(functools.partial(_has_replies, dev, topic, per_device), 30, f"{key}'s replies")
        # exactly its own requests, each answered 200, none of another device's
        assert replies_by_id(dev, topic) == {str(d * 1000 + i): 200 for i in range(per_device)}
    total = per_device * len(devices)
    assert [c.received > 0 for c in consumers] == [True, True], "the broker did not share the subscription"
    assert sum(c.received for c in consumers) == total
    rows = fetch(
        migrated_dsn, "SELECT device_key, count(*) AS n, count(DISTINCT ts) AS t FROM measurepoints GROUP BY 1"
    )
    assert {r["device_key"]: (r["n"], r["t"]) for r in rows} == {key: (per_device, per_device) for key in devices}
    for dev in devices.values():
        dev.close()


def test_undecodable_payload_is_answered_and_acknowledged(
    broker: Mosquitto, start_consumer: Callable[..., RunningConsumer]
) -> None:
    """Garbage gets 1220 and its PUBACK: with a window of one message, the next request could not arrive otherwise."""
    consumer = start_consumer(broker.url, consume_max_in_flight=1)
    dev = Device(broker.port, "dev1")
    assert dev.connect() == 0
    dev.subscribe(TOPIC + "_reply")
    dev.publish(TOPIC, b"\xff not json")
    dev.publish(TOPIC, request(7))
    wait_for(lambda: "7" in replies_by_id(dev, TOPIC), 10, "the reply to the request after the garbage")
    codes = [json.loads(body)["code"] for t, body, _ in dev.messages if t == TOPIC + "_reply"]
    assert codes == [1220, 200]
    assert consumer.received == 2  # the garbage was not redelivered
    dev.close()


def test_message_the_database_refuses_is_answered_500_once(
    broker: Mosquitto, start_consumer: Callable[..., RunningConsumer], migrated_dsn: str
) -> None:
    """Data that passes the model but PostgreSQL refuses (here a CHECK constraint) gets one 500 and its PUBACK."""
    fetch(migrated_dsn, "ALTER TABLE points ADD CONSTRAINT refuse_666 CHECK (value_num IS DISTINCT FROM 666)")
    consumer = start_consumer(broker.url, consume_max_in_flight=1)
    dev = Device(broker.port, "dev1")
    assert dev.connect() == 0
    dev.subscribe(TOPIC + "_reply")
    dev.publish(TOPIC, request(1, 666.0))
    dev.publish(TOPIC, request(2, 2.0))
    wait_for(lambda: "2" in replies_by_id(dev, TOPIC), 15, "the reply to the request after the refused one")
    assert replies_by_id(dev, TOPIC) == {"1": 500, "2": 200}
    assert consumer.received == 2  # acknowledged, so not redelivered
    rows = fetch(migrated_dsn, "SELECT value_num FROM measurepoints")
    assert [r["value_num"] for r in rows] == [2.0]
    dev.close()


def test_broker_unreachable_at_start_then_found(
    make_broker: Callable[..., Mosquitto], start_consumer: Callable[..., RunningConsumer]
) -> None:
    """No broker at start: the consumer starts, /readyz says why (503), and it connects once the broker is up."""
    port = free_port()
    consumer = start_consumer(f"mqtt://127.0.0.1:{port}", wait=False)
    status, body = readyz(consumer.http_port)
    assert status == 503 and body["checks"]["broker"] != "ok"
    assert f"127.0.0.1:{port}" in body["checks"]["broker"]
    broker = make_broker(port).start()
    consumer.wait_subscribed(timeout=20)
    wait_for(lambda: readyz(consumer.http_port)[0] == 200, 10, "readiness")
    dev = Device(broker.port, "dev1")
    assert dev.connect() == 0
    assert dev.request(TOPIC, SAMPLE)["code"] == 200
    dev.close()


def test_consumer_serves_the_auth_endpoints_over_mtls(
    broker: Mosquitto, start_consumer: Callable[..., RunningConsumer], scratch: Path
) -> None:
    """`--auth-bind` with a client CA: the broker's certificate gets an answer, a caller without one gets no TLS."""
    ca = trustme.CA()
    server_cert, client_cert = ca.issue_cert("127.0.0.1"), ca.issue_cert("emqx-node-1")
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(scratch / "server.pem"))
    ca.cert_pem.write_to_path(str(scratch / "ca.pem"))
    consumer = start_consumer(
        broker.url,
        auth_bind="127.0.0.1:0",
        auth_tls_certfile=scratch / "server.pem",
        auth_tls_keyfile=scratch / "server.pem",
        auth_tls_client_cafile=scratch / "ca.pem",
    )
    assert consumer.service.auth_server is not None
    url = f"https://127.0.0.1:{consumer.service.auth_server.port}/auth/emqx/authz"
    body = json.dumps({"username": "dev1&inverter01", "topic": "/sys/inverter01/dev1/x", "action": "publish"})
    request = urllib.request.Request(url, data=body.encode(), headers={"content-type": "application/json"})
    with_cert = ssl.create_default_context()
    ca.configure_trust(with_cert)
    client_cert.configure_cert(with_cert)
    with urllib.request.urlopen(request, timeout=5, context=with_cert) as response:  # noqa: S310 - https loopback
        assert json.loads(response.read()) == {"result": "allow"}
    without_cert = ssl.create_default_context()
    ca.configure_trust(without_cert)
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(request, timeout=5, context=without_cert).read()  # noqa: S310


def test_consumer_reconnects_after_the_broker_restarts(
    broker: Mosquitto, start_consumer: Callable[..., RunningConsumer]
) -> None:
    """The broker goes away and comes back: readiness drops, the consumer reconnects and re-subscribes by itself."""
    consumer = start_consumer(broker.url)
    broker.stop()
    wait_for(lambda: readyz(consumer.http_port)[0] == 503, 10, "readiness to notice the lost broker")
    broker.start()
    consumer.wait_subscribed(timeout=30)
    dev = Device(broker.port, "dev1")
    assert dev.connect() == 0
    assert dev.request(TOPIC, SAMPLE)["code"] == 200
    assert readyz(consumer.http_port)[0] == 200
    dev.close()


def test_replies_stay_within_the_brokers_receive_maximum(
    make_broker: Callable[..., Mosquitto], start_consumer: Callable[..., RunningConsumer]
) -> None:
    """mosquitto announces Receive Maximum 5: the consumer never has more than 5 replies unacknowledged."""
    broker = make_broker(max_inflight_messages="5").start()
    consumer = start_consumer(broker.url)
    link = consumer.service.link
    assert link is not None and link.reply_window == 5
    dev = Device(broker.port, "dev1")
    assert dev.connect() == 0
    dev.subscribe(TOPIC + "_reply")
    for index in range(300):
        dev.publish(TOPIC, request(index, float(index)))
    wait_for(lambda: len(replies_by_id(dev, TOPIC)) == 300, 60, "300 replies")
    assert set(replies_by_id(dev, TOPIC).values()) == {200}
    # reached and held: commits release replies in batches far larger than 5, so without the gate it exceeds 5
    assert link.replies_in_flight_peak == 5
    dev.close()
