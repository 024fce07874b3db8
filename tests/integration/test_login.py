"""Device login and isolation end to end: EnOS-signed CONNECTs against the registry, then the topic ACL."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration._login import (
    C_TIMESTAMP,
    PK,
    PY_TIMESTAMP,
    Login,
    connect,
    disable,
    login,
    raw_connack,
    register,
    rotate,
)
from tests.support import SAMPLE, Device, RunningService, fetch, resume_topic

SECRET = "s3cret-of-dev1"
# paho reports the MQTT 3.1.1 CONNACK code 5 ("not authorized", EnOS's answer to a bad login) as its MQTT 5
# equivalent 135; test_refusal_is_connack_5_on_the_wire checks the byte itself
CONNACK_REFUSED = 135
SUBACK_REFUSED = 128


@pytest.fixture
def service(start_service: Callable[..., RunningService]) -> RunningService:
    """A service that admits only signed-in devices (the product default)."""
    return start_service(allow_anonymous=False)


def rows(dsn: str) -> list[dict[str, Any]]:
    return [dict(r) for r in fetch(dsn, "SELECT * FROM measurepoints ORDER BY device_key, point, ts")]


def request(measurepoints: dict[str, Any], *, time_ms: int | None = 1700000000000, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(json.dumps(SAMPLE))
    body["params"] = {"measurepoints": measurepoints} | ({} if time_ms is None else {"time": time_ms})
    body.update(changes)
    return body


def connack_of(port: int, creds: Login) -> int:
    """The CONNACK code a login gets (the connection is closed again at once)."""
    device, code = connect(port, creds)
    device.close()
    return code


VARIANTS: dict[str, dict[str, Any]] = {
    "python-sdk-default": {"method": "hmacsha256", "timestamp": PY_TIMESTAMP},
    "sha256-upper-hex": {"method": "sha256", "upper": True},
    "sha256-lower-hex": {"method": "sha256"},
    "python-sha1-upper": {"method": "hmacsha1", "upper": True, "timestamp": PY_TIMESTAMP},
    "sha1": {"method": "sha1"},
    "md5": {"method": "md5"},
    "python-md5": {"method": "hmacmd5", "timestamp": PY_TIMESTAMP},
    "c-sdk": {"method": "sha256", "upper": True, "prefix": f"{PK}.dev1", "timestamp": C_TIMESTAMP},
    "java-sdk": {"method": "sha256", "prefix": "dev1{ip=10.0.0.7,version=2.3.0,compress=DEFAULT}"},
    "docs-template-spaces": {"method": "sha256", "upper": True, "separator": ", "},
}


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_sdk_login_variant_signs_in_and_stores(
    service: RunningService, migrated_dsn: str, variant: dict[str, Any]
) -> None:
    """Each official SDK's spelling of a correct login gets CONNACK 0, and the device's resume lands as rows."""
    register(service, "dev1", SECRET)
    device, code = connect(service.port, login("dev1", SECRET, **variant))
    try:
        assert code == 0
        reply = device.request(resume_topic(PK, "dev1"), SAMPLE)
    finally:
        device.close()
    assert reply == {"id": "123", "code": 200, "message": "", "data": {}}
    stored = rows(migrated_dsn)
    assert {(r["product_key"], r["device_key"], r["point"]) for r in stored} == {
        (PK, "dev1", "temp"),
        (PK, "dev1", "branchCurr"),
        (PK, "dev1", "Power"),
    }


def test_java_style_request_without_time_is_stored_at_receive_time(service: RunningService, migrated_dsn: str) -> None:
    """A version "1.1" request without ``time`` (Java, Node, C) is answered 200 and stamped on receipt."""
    register(service, "dev1", SECRET)
    device, code = connect(service.port, login("dev1", SECRET))
    try:
        assert code == 0
        before = time.time()
        reply = device.request(resume_topic(PK, "dev1"), request({"temp": 21.5}, time_ms=None, version="1.1"))
        after = time.time()
    finally:
        device.close()
    assert reply["code"] == 200
    (row,) = rows(migrated_dsn)
    assert row["point"] == "temp" and row["value_num"] == 21.5
    assert before - 0.01 <= row["ts"].timestamp() <= after + 0.01


@pytest.mark.parametrize(
    "case",
    [
        "wrong-secret",
        "unknown-device",
        "other-devices-signature",
        "secure-mode-3",
        "unknown-sign-method",
        "no-password",
    ],
)
def test_bad_logins_get_connack_5(service: RunningService, case: str) -> None:
    """A login that does not prove the registered device's secret is refused with CONNACK 5."""
    register(service, "dev1", SECRET)
    register(service, "dev2", "secret-of-dev2")
    good = login("dev1", SECRET)
    creds = {
        "wrong-secret": login("dev1", "not-the-secret"),
        "unknown-device": login("ghost", SECRET),
        # dev2 signs with its own secret but claims to be dev1
        "other-devices-signature": login("dev1", "secret-of-dev2"),
        "secure-mode-3": Login(good.client_id.replace("securemode=2", "securemode=3"), good.username, good.password),
        "unknown-sign-method": Login(good.client_id.replace("sha256", "sha512"), good.username, good.password),
        "no-password": Login(good.client_id, good.username, ""),
    }[case]
    assert connack_of(service.port, creds) == CONNACK_REFUSED
    # the control: the same service lets the genuine login in, so the refusal above was about the credentials
    device, code = connect(service.port, good)
    device.close()
    assert code == 0


def test_refusal_is_connack_5_on_the_wire(service: RunningService) -> None:
    """A bad signature is answered with the MQTT 3.1.1 CONNACK return code 5 byte for byte; a good one with 0."""
    register(service, "dev1", SECRET)
    assert raw_connack(service.port, login("dev1", "not-the-secret")) == b"\x20\x02\x00\x05"
    assert raw_connack(service.port, login("dev1", SECRET)) == b"\x20\x02\x00\x00"


def test_disabled_device_is_refused(service: RunningService) -> None:
    """A disabled device is refused with CONNACK 5 even with a correct signature."""
    register(service, "dev1", SECRET)
    disable(service, "dev1")
    assert connack_of(service.port, login("dev1", SECRET)) == CONNACK_REFUSED


def test_anonymous_is_refused_by_default(service: RunningService) -> None:
    """Without allow_anonymous a CONNECT without credentials is refused with CONNACK 5."""
    device = Device(service.port, "anon1")
    try:
        assert device.connect() == CONNACK_REFUSED
    finally:
        device.close()


def test_allow_anonymous_admits_anonymous_but_not_bad_signatures(
    start_service: Callable[..., RunningService], migrated_dsn: str
) -> None:
    """allow_anonymous lets a credential-less client in, yet a wrong signature is still refused, not downgraded."""
    running = start_service(allow_anonymous=True)
    register(running, "dev1", SECRET)
    anonymous = Device(running.port, "anon1")
    try:
        assert anonymous.connect() == 0
        assert anonymous.request(resume_topic(PK, "dev1"), SAMPLE)["code"] == 200
    finally:
        anonymous.close()
    assert connack_of(running.port, login("dev1", "not-the-secret")) == CONNACK_REFUSED
    assert len(rows(migrated_dsn)) == 3


@pytest.mark.slow
def test_rotated_secret_replaces_the_old_one_within_the_cache_period(service: RunningService) -> None:
    """After rotate_secret the old secret stops working within the 5 s credentials cache, and the new one works."""
    register(service, "dev1", SECRET)
    old, new = login("dev1", SECRET), login("dev1", "rotated-secret")
    device, code = connect(service.port, old)  # fills the authenticator's cache with the old secret
    device.close()
    assert code == 0
    rotate(service, "dev1", "rotated-secret")
    rotated_at = time.monotonic()
    while connack_of(service.port, old) == 0:
        assert time.monotonic() - rotated_at < 7, "old secret still accepted 7 s after rotation"
        time.sleep(0.25)
    assert connack_of(service.port, old) == CONNACK_REFUSED
    device, code = connect(service.port, new)
    device.close()
    assert code == 0


# ACL: dev1 and dev10 share a product, and "dev1" is a string prefix of "dev10" on purpose.
A, B = "dev1", "dev10"
A_PREFIX = f"/sys/{PK}/{A}/"


def _pair(service: RunningService) -> tuple[Device, Device]:
    register(service, A, SECRET)
    register(service, B, "secret-of-dev10")
    a, code_a = connect(service.port, login(A, SECRET))
    b, code_b = connect(service.port, login(B, "secret-of-dev10"))
    if (code_a, code_b) != (0, 0):
        a.close()
        b.close()
        pytest.fail(f"the two devices could not sign in: CONNACK {code_a}, {code_b}")
    return a, b


@pytest.mark.parametrize(
    "topic_filter",
    [
        resume_topic(PK, B) + "_reply",
        f"/sys/{PK}/{B}/#",
        f"/sys/{PK}/+/thing/measurepoint/resume_reply",
        "/sys/#",
        "#",
        f"/ext/session/{PK}/{B}/#",
        f"/sys/{PK}/{A}",  # not under A's tree: the prefix is "/sys/pk/dk/", slash included
    ],
)
def test_device_cannot_subscribe_outside_its_topics(service: RunningService, topic_filter: str) -> None:
    """A subscription that could match another device's topics is refused with SUBACK 128; its own is granted."""
    a, b = _pair(service)
    try:
        assert a.subscribe(topic_filter) == [SUBACK_REFUSED]
        assert a.subscribe(A_PREFIX + "#") == [1]
    finally:
        a.close()
        b.close()


def test_publish_onto_another_devices_topic_closes_the_connection(service: RunningService, migrated_dsn: str) -> None:
    """A device publishing under another device's topic is disconnected and none of that data is stored."""
    a, b = _pair(service)
    try:
        a.publish(resume_topic(PK, B), request({"temp": 66.0}, time_ms=1700000000001))
        assert a.disconnected.wait(5), "the broker kept the trespassing connection open"
        # B's own request commits after A's would have: if A's had been taken, it would be in the table now
        assert b.request(resume_topic(PK, B), request({"temp": 10.0}, time_ms=1700000000002))["code"] == 200
    finally:
        a.close()
        b.close()
    assert [(r["device_key"], r["value_num"]) for r in rows(migrated_dsn)] == [(B, 10.0)]


def test_device_never_receives_another_devices_replies(service: RunningService) -> None:
    """With a wildcard subscription to its whole own tree, a device gets its own replies and never another's."""
    a, b = _pair(service)
    try:
        assert a.subscribe(A_PREFIX + "#") == [1]
        assert b.request(resume_topic(PK, B), request({"temp": 1.0}))["code"] == 200
        # A's own reply comes after B's was delivered (one broadcast queue): A's wildcard works, and had B's
        # reply been routed to A it would be in A's inbox by now
        assert a.request(resume_topic(PK, A), request({"temp": 2.0}), subscribe=False)["code"] == 200
        time.sleep(0.2)
        topics = [topic for topic, _, _ in a.messages]
    finally:
        a.close()
        b.close()
    assert resume_topic(PK, A) + "_reply" in topics
    assert [topic for topic in topics if not topic.startswith(A_PREFIX)] == []


def test_reusing_another_devices_client_id_takes_over_nothing(service: RunningService) -> None:
    """A device signing in under another device's client id neither kicks it off nor inherits its session."""
    register(service, A, SECRET)
    register(service, "devB", "sb")
    b_login = login("devB", "sb")
    b, code = connect(service.port, b_login)
    assert code == 0
    a_login = login(A, SECRET, prefix="devB")  # A's own valid signature over B's client id
    assert a_login.client_id == b_login.client_id
    intruder, code = connect(service.port, a_login)
    try:
        assert code == 0  # a valid login for A: client ids are the device's choice
        time.sleep(0.3)
        assert not b.disconnected.is_set(), "B was disconnected by another device's CONNECT"
        assert b.request(resume_topic(PK, "devB"), request({"temp": 1.0}))["code"] == 200
    finally:
        intruder.close()
        b.close()


def test_another_device_never_gets_a_sessions_queued_replies(service: RunningService) -> None:
    """Replies queued for an offline persistent session go to that device only, not to another using its client id."""
    register(service, "devB", "sb")
    b_login = login("devB", "sb")
    reply_topic = resume_topic(PK, "devB") + "_reply"
    b, code = connect(service.port, b_login, clean_session=False)
    assert code == 0
    assert b.subscribe(reply_topic) == [1]
    b.close()  # offline now; the session and its subscription stay
    # B's second connection (another client id, same credentials) makes a reply that the offline session queues
    other, code = connect(service.port, login("devB", "sb", prefix="devB-backfill"))
    try:
        assert code == 0
        assert other.request(resume_topic(PK, "devB"), request({"temp": 3.0}))["code"] == 200
    finally:
        other.close()
    register(service, A, SECRET)
    intruder, code = connect(service.port, login(A, SECRET, prefix="devB"), clean_session=False)
    try:
        assert code == 0
        time.sleep(0.5)
        assert intruder.messages == []
    finally:
        intruder.close()
    # the control: B itself, resuming its session, does get the queued reply
    b, code = connect(service.port, b_login, clean_session=False)
    try:
        assert code == 0
        _, body, _ = b.wait_message(reply_topic, timeout=3)
    finally:
        b.close()
    assert json.loads(body)["code"] == 200
