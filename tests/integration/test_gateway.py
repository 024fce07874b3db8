"""Gateways against a real pointgate and PostgreSQL: topology, sub-device sessions, and every request answered.

The official Python SDK drives what it can send (topology add/get/delete, sub-device login, batch login, logout,
a resume for a logged-in sub-device); raw paho clients send what it cannot (the docs' signing with
``cleanSession``, upper-case SHA-1, refused logins of every kind) and check the topics a gateway can and cannot
reach. Signatures in the raw cases are computed here from the reference's rule, not with pointgate's code.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from enos.message.upstream.resume.MeasurepointResumeBatchRequest import MeasurepointResumeBatchRequest
from enos.message.upstream.resume.MeasurepointResumeRequest import MeasurepointResumeRequest
from enos.message.upstream.status.SubDeviceLoginBatchRequest import SubDeviceLoginBatchRequest
from enos.message.upstream.status.SubDeviceLoginRequest import SubDeviceLoginRequest
from enos.message.upstream.status.SubDeviceLogoutRequest import SubDeviceLogoutRequest
from enos.message.upstream.topo.SubDeviceInfo import SubDeviceInfo
from enos.message.upstream.topo.TopoAddRequest import TopoAddRequest
from enos.message.upstream.topo.TopoDeleteRequest import TopoDeleteRequest
from enos.message.upstream.topo.TopoGetRequest import TopoGetRequest

from service.broker.gateways import SubDeviceSessions
from service.broker.ingest import Ingest
from service.devices.registry import add_device
from tests.integration._login import PK, _registry, connect, disable, login, register, sign
from tests.integration.test_sdk import connected, sdk_client
from tests.support import SAMPLE, Device, RunningService, fetch, resume_topic

pytestmark = [
    pytest.mark.filterwarnings("ignore:Callback API version 1 is deprecated:DeprecationWarning"),
]

GW, GW_SECRET = "gw1", "gw-secret"
SUB_SECRET = "sub-secret"


@pytest.fixture
def service(start_service: Callable[..., RunningService]) -> RunningService:
    """Signed-in devices only; gateway gw1 registered, sub1..sub3 registered as its sub-devices."""
    running = start_service(allow_anonymous=False)
    register(running, GW, GW_SECRET)
    for dk in ("sub1", "sub2", "sub3"):
        add_sub(running, dk)
    return running


def add_sub(running: RunningService, dk: str, *, gateway: str | None = GW, secret: str = SUB_SECRET) -> None:
    """Register ``dk`` (as ``gateway``'s sub-device unless None)."""
    gw = (PK, gateway) if gateway is not None else None
    _registry(running, lambda conn, box: add_device(conn, box, PK, dk, secret=secret, gateway=gw))


def gateway_of(dsn: str, dk: str) -> str | None:
    rows = fetch(dsn, "SELECT gateway_device_key FROM devices WHERE product_key = $1 AND device_key = $2", PK, dk)
    return rows[0][0] if rows else None


def stored(dsn: str) -> list[tuple[str, str, float]]:
    rows = fetch(dsn, "SELECT device_key, point, value_num FROM measurepoints ORDER BY device_key, point")
    return [(r[0], r[1], r[2]) for r in rows]


def sessions_of(running: RunningService) -> SubDeviceSessions:
    """The running service's sub-device sessions."""
    broker = running.service.broker
    assert broker is not None and isinstance(broker.gateway_sessions, SubDeviceSessions)
    return broker.gateway_sessions


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll a condition the service changes on its own schedule (the topology refresh, a disconnect)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def gateway(service: RunningService) -> Iterator[Device]:
    """gw1 signed in over raw MQTT."""
    device, code = connect(service.port, login(GW, GW_SECRET))
    assert code == 0
    yield device
    device.close()


# --- the official SDK ------------------------------------------------------------------------------------------
def test_sdk_gateway_logs_sub_devices_in_and_their_resume_lands(service: RunningService, migrated_dsn: str) -> None:
    """The SDK's gateway logs sub-devices in (single and batch); their resumes get 200 and land; logout ends it."""
    with sdk_client(service.port, GW, GW_SECRET) as (client, callback):
        connected(client, callback)
        single = client.publish(SubDeviceLoginRequest.builder().set_sub_device_info(PK, "sub1", SUB_SECRET).build())
        assert (single.get_code(), single.get_sub_product_key(), single.get_sub_device_key()) == (200, PK, "sub1")
        batch = client.publish(
            SubDeviceLoginBatchRequest.builder()
            .add_sub_device_info(PK, "sub2", SUB_SECRET)
            .add_sub_device_info(PK, "sub3", SUB_SECRET)
            .build()
        )
        assert batch.get_code() == 200
        assert batch.get_data() == {
            "loginedSubDevices": [{"productKey": PK, "deviceKey": "sub2"}, {"productKey": PK, "deviceKey": "sub3"}],
            "failedSubDevices": [],
        }
        # a resume on the sub-device's own topic, over the gateway's connection
        resume = (
            MeasurepointResumeRequest.builder()
            .set_product_key(PK)
            .set_device_key("sub1")
            .add_measure_point("temp", 1.5)
            .set_timestamp(1700000000000)
            .build()
        )
        assert client.publish(resume).get_code() == 200
        # a batch on the gateway's topic naming logged-in sub-devices: no allowOfflineSubDevice needed
        item = MeasurepointResumeRequest.builder().set_product_key(PK).set_device_key("sub2")
        batch_resume = (
            MeasurepointResumeBatchRequest.builder()
            .add_request(item.add_measure_point("temp", 2.5).set_timestamp(1700000000000).build())
            .build()
        )
        assert client.publish(batch_resume).get_code() == 200
        logout_request = SubDeviceLogoutRequest.builder().set_sub_product_key(PK).set_sub_device_key("sub2").build()
        logout = client.publish(logout_request)
        assert logout.get_code() == 200
        # logged out and without the flag, sub2 is an offline sub-device again: the whole batch is refused
        again = MeasurepointResumeRequest.builder().set_product_key(PK).set_device_key("sub2")
        refused = client.publish(
            MeasurepointResumeBatchRequest.builder()
            .add_request(again.add_measure_point("temp", 9.0).set_timestamp(1700000060000).build())
            .build()
        )
        assert refused.get_code() == 1212
    assert stored(migrated_dsn) == [("sub1", "temp", 1.5), ("sub2", "temp", 2.5)]
    # proving their device secrets activated them, as a secure-mode-2 CONNECT would (no product secret may claim them)
    activated = fetch(migrated_dsn, "SELECT device_key FROM devices WHERE activated_at IS NOT NULL ORDER BY 1")
    assert [r[0] for r in activated] == [GW, "sub1", "sub2", "sub3"]


def test_sdk_topology_add_get_delete(service: RunningService, migrated_dsn: str) -> None:
    """The SDK adds a signed sub-device to its topology, reads it back, and removes it; the registry follows."""
    add_sub(service, "loose", gateway=None)
    with sdk_client(service.port, GW, GW_SECRET) as (client, callback):
        connected(client, callback)
        added = client.publish(TopoAddRequest.builder().add_sub_device(SubDeviceInfo(PK, "loose", SUB_SECRET)).build())
        assert added.get_code() == 200
        assert gateway_of(migrated_dsn, "loose") == GW
        listed = client.publish(TopoGetRequest.builder().build())
        assert listed.get_code() == 200
        assert [d["deviceKey"] for d in listed.get_data()] == ["loose", "sub1", "sub2", "sub3"]
        deleted = client.publish(TopoDeleteRequest.builder().delete_sub_device(PK, "loose").build())
        assert deleted.get_code() == 200
        assert gateway_of(migrated_dsn, "loose") is None
        bad = client.publish(TopoAddRequest.builder().add_sub_device(SubDeviceInfo(PK, "loose", "wrong")).build())
        assert bad.get_code() == 1255 and "sign" in bad.get_message()
    assert gateway_of(migrated_dsn, "loose") is None


def test_sdk_sub_device_login_with_a_wrong_secret_is_742(service: RunningService) -> None:
    """A sub-device login signed with a wrong secret comes back 742 to the SDK, and nothing is logged in."""
    with sdk_client(service.port, GW, GW_SECRET) as (client, callback):
        connected(client, callback)
        response = client.publish(SubDeviceLoginRequest.builder().set_sub_device_info(PK, "sub1", "nope").build())
        assert response.get_code() == 742
    sessions = sessions_of(service)
    assert len(sessions) == 0


# --- raw clients: what the SDK cannot send -------------------------------------------------------------------------
def login_params(
    dk: str, secret: str, *, method: str = "sha256", clean: str | None = None, upper: bool = False, pk: str = PK
) -> dict[str, Any]:
    """combine.login params; with ``clean``, signed over cleanSession too (the docs' way)."""
    fields = {"clientId": f"{pk}{dk}", "deviceKey": dk, "productKey": pk, "timestamp": "1700000000000"}
    if clean is not None:
        fields["cleanSession"] = clean
    content = "".join(k + fields[k] for k in sorted(fields)) + secret
    digest = hashlib.new({"sha256": "sha256", "hmacsha1": "sha1", "md5": "md5"}[method], content.encode()).hexdigest()
    return {**fields, "sign": digest.upper() if upper else digest, "signMethod": method}


def combine(gateway: Device, what: str, params: Any, *, request_id: str = "7") -> dict[str, Any]:
    topic = f"/ext/session/{PK}/{GW}/combine/{what}"
    method = "combine." + what.replace("/", ".")
    return gateway.request(topic, {"id": request_id, "version": "1.0", "method": method, "params": params})


def topo(gateway: Device, what: str, params: Any) -> dict[str, Any]:
    topic = f"/sys/{PK}/{GW}/thing/topo/{what}"
    return gateway.request(topic, {"id": "5", "version": "1.0", "method": f"thing.topo.{what}", "params": params})


@pytest.mark.parametrize(
    ("method", "clean", "upper"),
    [("sha256", None, False), ("hmacsha1", "true", True), ("md5", "False", False)],
    ids=["sha256", "docs-sha1-upper-with-cleanSession", "md5-python-cleanSession-unsigned"],
)
def test_every_signing_variant_logs_in(gateway: Device, method: str, clean: str | None, upper: bool) -> None:
    """Sub-device signatures as every client makes them: any method name, hex case, cleanSession signed or not."""
    params = login_params("sub1", SUB_SECRET, method=method, clean=clean, upper=upper)
    if clean is None:
        params["cleanSession"] = "False"  # sent but not signed, as the Python SDK does
    reply = combine(gateway, "login", params)
    assert (reply["id"], reply["code"], reply["data"]) == ("7", 200, {"productKey": PK, "deviceKey": "sub1"})


def test_refused_logins_get_their_codes_and_change_nothing(
    service: RunningService, gateway: Device, start_service: Callable[..., RunningService]
) -> None:
    """Unknown 705, wrong sign 742, another gateway's 740, disabled 723, product secret 770, missing field 1220."""
    register(service, "gw2", "x")
    add_sub(service, "other", gateway="gw2")
    add_sub(service, "off")
    disable(service, "off")
    cases = {
        "ghost": (login_params("ghost", SUB_SECRET), 705),
        "sub1": (login_params("sub1", "wrong"), 742),
        "other": (login_params("other", SUB_SECRET), 740),
        "off": (login_params("off", SUB_SECRET), 723),
    }
    for dk, (params, code) in cases.items():
        reply = combine(gateway, "login", params)
        assert reply["code"] == code, (dk, reply)
        assert reply["message"]
    dynamic = {**login_params("sub2", SUB_SECRET), "secureMode": "3"}
    assert combine(gateway, "login", dynamic)["code"] == 770
    missing = login_params("sub2", SUB_SECRET)
    del missing["sign"]
    assert combine(gateway, "login", missing)["code"] == 1220
    assert combine(gateway, "login", None)["code"] == 1220
    # nothing was logged in: none of their reply topics can be subscribed to
    for dk in ("ghost", "sub1", "other", "off", "sub2"):
        assert gateway.subscribe(resume_topic(PK, dk) + "_reply") == [128]
    assert len(sessions_of(service)) == 0


def test_batch_login_reports_who_logged_in_and_who_failed(gateway: Device, service: RunningService) -> None:
    """A batch with a disabled sub-device: that failure's code, both lists, the others logged in."""
    add_sub(service, "off")
    disable(service, "off")
    items = [
        {k: v for k, v in login_params(dk, SUB_SECRET).items() if k in ("productKey", "deviceKey", "sign")}
        for dk in ("sub1", "off", "sub2")
    ]
    params = {"clientId": f"{PK}sub1", "timestamp": "1700000000000", "signMethod": "sha256", "subDevices": items}
    # the batch signs with one shared clientId: re-sign each item over it
    for item in items:
        fields = {
            "clientId": params["clientId"],
            "deviceKey": item["deviceKey"],
            "productKey": PK,
            "timestamp": params["timestamp"],
        }
        item["sign"] = sign("sha256", fields["clientId"], item["deviceKey"], PK, fields["timestamp"], SUB_SECRET)
    reply = combine(gateway, "login/batch", params)
    assert reply["code"] == 723
    assert reply["data"] == {
        "loginedSubDevices": [{"productKey": PK, "deviceKey": "sub1"}, {"productKey": PK, "deviceKey": "sub2"}],
        "failedSubDevices": [{"productKey": PK, "deviceKey": "off"}],
    }
    assert f"{PK}&off has error" in reply["message"]
    bad = combine(gateway, "login/batch", {"clientId": "x"})
    assert bad["code"] == 1220 and bad["data"] == {"loginedSubDevices": [], "failedSubDevices": []}


def test_limit_on_online_sub_devices(start_service: Callable[..., RunningService]) -> None:
    """Past max_sub_devices_per_gateway a login is refused (429) and the first session is untouched."""
    running = start_service(allow_anonymous=False, max_sub_devices_per_gateway=1)
    register(running, GW, GW_SECRET)
    add_sub(running, "sub1")
    add_sub(running, "sub2")
    device, code = connect(running.port, login(GW, GW_SECRET))
    try:
        assert code == 0
        assert combine(device, "login", login_params("sub1", SUB_SECRET))["code"] == 200
        over = combine(device, "login", login_params("sub2", SUB_SECRET))
        assert over["code"] == 429 and "max_sub_devices_per_gateway" in over["message"]
        assert device.subscribe(resume_topic(PK, "sub2") + "_reply") == [128]
        assert device.request(resume_topic(PK, "sub1"), SAMPLE)["code"] == 200
    finally:
        device.close()


# --- what a gateway can reach ----------------------------------------------------------------------------------
def test_gateway_reaches_a_sub_device_only_while_logged_in(service: RunningService, migrated_dsn: str) -> None:
    """Before login and after logout a gateway can neither subscribe to nor receive a sub-device's replies, and a
    publish on its topic closes the connection; logged in, both work. Other devices' replies never reach it."""
    reply_topic = resume_topic(PK, "sub1") + "_reply"
    gw, code = connect(service.port, login(GW, GW_SECRET))
    sub, sub_code = connect(service.port, login("sub1", SUB_SECRET))
    try:
        assert (code, sub_code) == (0, 0)
        assert gw.subscribe(reply_topic) == [128]
        assert combine(gw, "login", login_params("sub1", SUB_SECRET))["code"] == 200
        assert gw.request(resume_topic(PK, "sub1"), SAMPLE)["code"] == 200
        assert combine(gw, "logout", {"productKey": PK, "deviceKey": "sub1"})["code"] == 200
        # sub1 itself, connected directly, gets its reply; the gateway (still subscribed) must not
        mark = len(gw.messages)
        assert sub.request(resume_topic(PK, "sub1"), {**SAMPLE, "id": "direct"})["code"] == 200
        # a copy for the gateway would be written in the same delivery as sub1's: one round trip of its own
        # after that, anything written before has arrived
        assert topo(gw, "get", {})["code"] == 200
        assert [m for m in gw.messages[mark:] if m[0] == reply_topic] == []
        # and publishing for it again is a publish outside its own topics
        gw.publish(resume_topic(PK, "sub1"), SAMPLE)
        assert gw.disconnected.wait(5)
    finally:
        gw.close()
        sub.close()


def test_gateway_cannot_reach_another_gateways_devices(service: RunningService, gateway: Device) -> None:
    """A sub-device of another gateway cannot be logged in, subscribed to or written for, with or without the flag."""
    register(service, "gw2", "x")
    add_sub(service, "theirs", gateway="gw2")
    assert combine(gateway, "login", login_params("theirs", SUB_SECRET))["code"] == 740
    assert gateway.subscribe(resume_topic(PK, "theirs") + "_reply") == [128]
    assert gateway.subscribe(f"/sys/{PK}/+/thing/measurepoint/resume_reply") == [128]
    batch = {
        "id": "b",
        "version": "1.0",
        "method": "thing.measurepoint.resume.batch",
        "allowOfflineSubDevice": True,
        "params": [{"deviceKey": "theirs", "productKey": PK, "measurepoints": {"temp": 1.0}}],
    }
    assert gateway.request(resume_topic(PK, GW, batch=True), batch)["code"] == 1212


def test_offline_sub_device_needs_the_flag_and_the_relation(service: RunningService, gateway: Device) -> None:
    """Not logged in: a sub-device's batch item needs allowOfflineSubDevice (1212 without); with it, 200."""
    batch: dict[str, Any] = {
        "id": "b",
        "version": "1.0",
        "method": "thing.measurepoint.resume.batch",
        "params": [{"deviceKey": "sub3", "productKey": PK, "measurepoints": {"temp": 1.0}, "time": 1700000000000}],
    }
    assert gateway.request(resume_topic(PK, GW, batch=True), batch)["code"] == 1212
    ingest = service.service.broker.ingest if service.service.broker is not None else None
    assert isinstance(ingest, Ingest)
    assert wait_for(lambda: ((PK, GW), (PK, "sub3")) in ingest.sub_devices)  # the registry snapshot's refresh
    assert gateway.request(resume_topic(PK, GW, batch=True), {**batch, "allowOfflineSubDevice": True})["code"] == 200


def test_sessions_end_with_the_gateway_and_when_the_sub_device_is_disabled(service: RunningService) -> None:
    """Disabling a logged-in sub-device ends its session (topology refresh); the gateway's disconnect ends the rest."""
    sessions = sessions_of(service)
    gw, code = connect(service.port, login(GW, GW_SECRET))
    try:
        assert code == 0
        for dk in ("sub1", "sub2"):
            assert combine(gw, "login", login_params(dk, SUB_SECRET))["code"] == 200
        assert len(sessions) == 2
        disable(service, "sub1")
        assert wait_for(lambda: sessions.through((PK, "sub1")) is None)
        assert sessions.through((PK, "sub2")) is not None
    finally:
        gw.close()
    assert wait_for(lambda: len(sessions) == 0)


# --- topology refusals -----------------------------------------------------------------------------------------
def test_topology_refusals_change_nothing(service: RunningService, gateway: Device, migrated_dsn: str) -> None:
    """topo add of another gateway's device, of the gateway itself, or with one bad item: 1255, nothing added;
    topo delete of a device not its own or online: 1256, nothing removed; topo get with bad params: 1200."""
    register(service, "gw2", "x")
    add_sub(service, "theirs", gateway="gw2")
    add_sub(service, "loose", gateway=None)

    def item(dk: str, secret: str = SUB_SECRET) -> dict[str, str]:
        ts, client_id = "1700000000000", f"{PK}.{dk}"
        return {
            "productKey": PK,
            "deviceKey": dk,
            "clientId": client_id,
            "timestamp": ts,
            "signMethod": "sha256",
            "sign": sign("sha256", client_id, dk, PK, ts, secret),
        }

    for params, detail in (
        ([item("loose"), item("theirs")], "another gateway"),
        ([item("loose"), item(GW, GW_SECRET)], "gateway itself"),
        ([item("loose"), item("ghost")], "not registered"),
        ([item("loose", "wrong")], "sign"),
        ({"productKey": PK}, "array"),
    ):
        reply = topo(gateway, "add", params)
        assert reply["code"] == 1255 and detail in reply["message"], reply
    assert gateway_of(migrated_dsn, "loose") is None
    assert gateway_of(migrated_dsn, "theirs") == "gw2"

    assert topo(gateway, "delete", [{"productKey": PK, "deviceKey": "theirs"}])["code"] == 1256
    assert combine(gateway, "login", login_params("sub1", SUB_SECRET))["code"] == 200
    online = topo(gateway, "delete", [{"productKey": PK, "deviceKey": "sub2"}, {"productKey": PK, "deviceKey": "sub1"}])
    assert online["code"] == 1256 and "online" in online["message"]
    assert gateway_of(migrated_dsn, "sub2") == GW and gateway_of(migrated_dsn, "theirs") == "gw2"
    assert topo(gateway, "get", [1])["code"] == 1200


# --- every other request answered ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "method"),
    [
        ("/sys/{pk}/{dk}/thing/attribute/update", "thing.attribute.update"),
        ("/sys/{pk}/{dk}/thing/tsltemplate/get", "thing.tsltemplate.get"),
        ("/sys/{pk}/{dk}/thing/service/measurepoint/set", "thing.service.measurepoint.set"),
        ("/ext/session/{pk}/{dk}/combine/disable", "combine.disable"),
    ],
    ids=["attribute-update", "tsl-template", "downstream-set", "downstream-combine-disable"],
)
def test_unserved_requests_get_1009_and_are_not_relayed(gateway: Device, path: str, method: str) -> None:
    """A request pointgate does not serve, or a cloud-to-device topic, is answered 1009 and reaches no subscriber."""
    topic = path.format(pk=PK, dk=GW)
    assert gateway.subscribe(topic) == [1]
    mark = len(gateway.messages)
    reply = gateway.request(topic, {"id": "u1", "version": "1.0", "method": method, "params": {}})
    assert (reply["id"], reply["code"], reply["data"]) == ("u1", 1009, {})
    assert reply["message"].startswith("Publish to topic with no write permission")
    assert [m for m in gateway.messages[mark:] if m[0] == topic] == []


def test_unserved_request_without_json_is_still_answered(gateway: Device) -> None:
    """Whatever the payload, an unserved request gets its 1009 (id null when unreadable)."""
    reply = gateway.request(f"/sys/{PK}/{GW}/thing/attribute/query", b"\x00not json")
    assert (reply["id"], reply["code"]) == (None, 1009)


def test_gateway_may_not_send_topology_for_its_sub_device(gateway: Device) -> None:
    """A logged-in sub-device lends its measurement points, not the right to change topology in its name."""
    assert combine(gateway, "login", login_params("sub1", SUB_SECRET))["code"] == 200
    topic = f"/sys/{PK}/sub1/thing/topo/get"
    reply = gateway.request(topic, {"id": "t", "version": "1.0", "method": "thing.topo.get", "params": {}})
    assert reply["code"] == 1009


def test_login_reply_echoes_a_java_style_request(gateway: Device) -> None:
    """version "1.1" (Java) and a numeric timestamp are accepted; the id comes back verbatim."""
    params = login_params("sub2", SUB_SECRET)
    reply = gateway.request(
        f"/ext/session/{PK}/{GW}/combine/login",
        json.dumps({"id": "99", "version": "1.1", "method": "combine.login", "params": params}),
    )
    assert (reply["id"], reply["code"]) == ("99", 200)
