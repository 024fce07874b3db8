"""Event posts end to end: the official SDK and raw clients against a real pointgate and PostgreSQL.

The SDK posts events at QoS 0 with ``params.events`` (``EventPostRequest``) and waits for the reply on
``…/thing/event/{id}/post_reply``; raw clients cover QoS 1 (reply before PUBACK), refusals and re-sends.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from enos.message.upstream.tsl.EventPostRequest import EventPostRequest

from service.storage.embedded import EmbeddedPostgres
from tests.integration._login import register
from tests.integration.test_sdk import SECRET, connected, sdk_client
from tests.support import Device, RunningService, fetch

pytestmark = [
    pytest.mark.filterwarnings("ignore:Callback API version 1 is deprecated:DeprecationWarning"),
]

TOPIC = "/sys/inverter01/dev1/thing/event/overTemp/post"


def event(
    values: dict[str, Any], *, event_id: str = "overTemp", request_id: str = "e1", **params: Any
) -> dict[str, Any]:
    return {
        "id": request_id,
        "version": "1.0",
        "method": f"thing.event.{event_id}.post",
        "params": {"events": values, **params},
    }


def stored(dsn: str) -> list[tuple[str, str, str | None, float, Any]]:
    return [
        (r["device_key"], r["event_id"], r["event_type"], r["ts"].timestamp(), json.loads(r["output"]))
        for r in fetch(dsn, "SELECT * FROM events ORDER BY device_key, event_id, ts")
    ]


@pytest.fixture
def signed_in(start_service: Callable[..., RunningService]) -> RunningService:
    """A service admitting only signed-in devices, with dev1 registered."""
    running = start_service(allow_anonymous=False)
    register(running, "dev1", SECRET)
    return running


def test_sdk_event_post_is_stored_and_answered_200(signed_in: RunningService, migrated_dsn: str) -> None:
    """The SDK's EventPostRequest gets a 200 it accepts, and the event is in the ``events`` view with its type."""
    with sdk_client(signed_in.port, "dev1", SECRET) as (client, callback):
        connected(client, callback)
        request = (
            EventPostRequest.builder()
            .set_event_identifier("overTemp")
            .add_value("temp", 85.5)
            .add_value("limit", 80)
            .set_timestamp(1700000000000)
            .build()
        )
        response = client.publish(request)
    assert (response.get_code(), response.is_success(), response.get_data()) == (200, True, {})
    assert response.get_id() == request.get_id()
    assert stored(migrated_dsn) == [("dev1", "overTemp", "WARN", 1700000000.0, {"temp": 85.5, "limit": 80})]


def test_sdk_invalid_event_gets_1204_and_nothing_is_stored(signed_in: RunningService, migrated_dsn: str) -> None:
    """An event whose output parameter has the wrong type comes back to the SDK as 1204 naming it."""
    with sdk_client(signed_in.port, "dev1", SECRET) as (client, callback):
        connected(client, callback)
        request = EventPostRequest.builder().set_event_identifier("fault").add_value("code", "E42").build()
        response = client.publish(request)
    assert response.get_code() == 1204
    assert response.get_message() == "Model validate failed: event fault: code: expected INT, got string"
    assert stored(migrated_dsn) == []


def test_unknown_event_id_gets_1204_naming_it(device: Device, migrated_dsn: str) -> None:
    """An event the product's model does not define is refused with 1204, and nothing is stored."""
    topic = "/sys/inverter01/dev1/thing/event/meltdown/post"
    reply = device.request(topic, event({"a": 1}, event_id="meltdown"))
    assert reply == {
        "id": "e1",
        "code": 1204,
        "message": "Model validate failed: event meltdown: meltdown: event not defined in the model of inverter01",
        "data": {},
    }
    assert stored(migrated_dsn) == []


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"", 1251),
        (b"not json", 1220),
        (json.dumps(event({"temp": 1.0}, event_id="fault")).encode(), 1260),
        (json.dumps(event({}, time="now")).encode(), 1220),
        (json.dumps(event({"limit": 1.0})).encode(), 1204),  # required temp missing
    ],
)
def test_bad_event_posts_get_their_codes(device: Device, migrated_dsn: str, payload: bytes, code: int) -> None:
    """Empty, not JSON, the wrong method, a bad time, a missing required parameter: each its code, nothing stored."""
    assert device.request(TOPIC, payload)["code"] == code
    assert stored(migrated_dsn) == []


def test_qos1_event_reply_comes_before_its_puback_and_resend_replaces(device: Device, migrated_dsn: str) -> None:
    """At QoS 1 the 200 reply arrives and the PUBACK completes; a re-send of the same time replaces the row."""
    device.subscribe(TOPIC + "_reply")
    mark = len(device.messages)
    info = device.publish(TOPIC, event({"temp": 90.0}, time=1700000005000))
    info.wait_for_publish(5)
    # paho marks the message published on PUBACK; the reply was written before it, in the same write
    _, body, _ = device.wait_message(TOPIC + "_reply", after=mark)
    assert json.loads(body)["code"] == 200
    assert device.request(TOPIC, event({"temp": 91.0}, request_id="e2", time=1700000005000))["code"] == 200
    assert stored(migrated_dsn) == [("dev1", "overTemp", "WARN", 1700000005.0, {"temp": 91.0})]


def test_measurepoints_still_flow_beside_events(device: Device, migrated_dsn: str) -> None:
    """An event post and a resume on the same connection are each answered on their own reply topic."""
    assert device.request(TOPIC, event({"temp": 81.0}, time=1700000000000))["code"] == 200
    resume = "/sys/inverter01/dev1/thing/measurepoint/resume"
    body = {"id": "r", "method": "thing.measurepoint.resume", "params": {"measurepoints": {"temp": 1.5}, "time": 5}}
    assert device.request(resume, body)["code"] == 200
    assert len(stored(migrated_dsn)) == 1
    assert len(fetch(migrated_dsn, "SELECT * FROM measurepoints")) == 1


@pytest.mark.slow
def test_no_event_reply_while_the_database_is_down(start_service: Callable[..., RunningService]) -> None:
    """With PostgreSQL stopped an event gets neither 200 nor PUBACK; once it is back, both come and the row is there."""
    # pytest's tmp_path is mode 700 under root: the unprivileged PostgreSQL user could not reach it
    scratch = Path(tempfile.mkdtemp(prefix="pointgate-events-outage-"))
    scratch.chmod(0o755)
    pg = EmbeddedPostgres(scratch / "db", durable=False)
    dsn = pg.start()
    try:
        service = start_service(database_url=dsn)
        dev = Device(service.port)
        assert dev.connect() == 0
        assert dev.request(TOPIC, event({"temp": 1.0}, time=1700000000000))["code"] == 200  # event writer connected
        pg.stop()
        info = dev.publish(TOPIC, event({"temp": 2.0}, request_id="down", time=1700000001000))
        time.sleep(1.5)  # nothing may arrive meanwhile: there is no event to wait for
        assert not info.is_published(), "PUBACK before the event was committed"
        assert not [m for m in dev.messages if b'"down"' in m[1]], "a reply went out before the commit"
        pg.start()
        info.wait_for_publish(20)
        assert info.is_published()
        _, body, _ = dev.wait_message(TOPIC + "_reply", 20, after=1)
        assert json.loads(body) == {"id": "down", "code": 200, "message": "", "data": {}}
        assert [r["output"] for r in fetch(dsn, "SELECT output FROM events ORDER BY ts")] == [
            '{"temp": 1.0}',
            '{"temp": 2.0}',
        ]
        dev.close()
    finally:
        pg.stop()
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.parametrize("size", [4096, 100_000], ids=["over-payload-limit", "over-packet-limit"])
def test_oversized_event_gets_1008(start_service: Callable[..., RunningService], size: int) -> None:
    """An event post over max_payload_bytes (or over the packet limit, read past) is answered 1008, not stored."""
    service = start_service(max_payload_bytes=2048)
    dev = Device(service.port)
    assert dev.connect() == 0
    try:
        reply = dev.request(TOPIC, b"{" + b" " * (size - 2) + b"}")
        assert reply["code"] == 1008 and reply["data"] == {}
        assert dev.request(TOPIC, event({"temp": 1.0}))["code"] == 200  # the connection stays usable
    finally:
        dev.close()


def test_gateway_posts_a_logged_in_sub_devices_event(
    start_service: Callable[..., RunningService], migrated_dsn: str
) -> None:
    """Through the route table, a gateway posts the events of a sub-device it logged in (stored as the
    sub-device's), and of one it did not log in it cannot (a publish outside its topics closes it)."""
    from tests.integration._login import connect, login
    from tests.integration.test_gateway import GW, GW_SECRET, SUB_SECRET, add_sub, combine, login_params

    running = start_service(allow_anonymous=False)
    register(running, GW, GW_SECRET)
    add_sub(running, "sub1")
    add_sub(running, "sub2")
    gateway, code = connect(running.port, login(GW, GW_SECRET))
    try:
        assert code == 0
        assert combine(gateway, "login", login_params("sub1", SUB_SECRET))["code"] == 200
        sub_topic = "/sys/inverter01/sub1/thing/event/fault/post"
        assert gateway.request(sub_topic, event({"code": 7}, event_id="fault", time=1700000000000))["code"] == 200
        assert stored(migrated_dsn) == [("sub1", "fault", "ERROR", 1700000000.0, {"code": 7})]
        gateway.publish("/sys/inverter01/sub2/thing/event/fault/post", event({"code": 8}, event_id="fault"))
        assert gateway.disconnected.wait(5)
    finally:
        gateway.close()
    assert len(stored(migrated_dsn)) == 1
