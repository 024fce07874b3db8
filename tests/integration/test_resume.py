"""The resume API end to end: real broker, real MQTT device, real PostgreSQL."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import SAMPLE, Device, RunningService, fetch, resume_topic

TOPIC = resume_topic()
BATCH = resume_topic(batch=True)


def rows(dsn: str) -> list[dict[str, Any]]:
    return [dict(r) for r in fetch(dsn, "SELECT * FROM measurepoints ORDER BY product_key, device_key, point, ts")]


def body(**changes: Any) -> dict[str, Any]:
    request: dict[str, Any] = json.loads(json.dumps(SAMPLE))
    request.update(changes)
    return request


def batch_body(items: object, **flags: Any) -> dict[str, Any]:
    return {"id": "b1", "version": "1.0", "method": "thing.measurepoint.resume.batch", "params": items, **flags}


def test_sample_request_gets_200_and_three_rows(device: Device, service: RunningService, migrated_dsn: str) -> None:
    """The API's sample request is answered exactly as EnOS does and lands as three typed rows."""
    reply = device.request(TOPIC, SAMPLE)
    assert reply == {"id": "123", "code": 200, "message": "", "data": {}}
    stored = {r["point"]: r for r in rows(migrated_dsn)}
    assert set(stored) == {"temp", "branchCurr", "Power"}
    assert (
        stored["temp"]["value"] == "1.02" and stored["temp"]["value_num"] == 1.02 and stored["temp"]["quality"] is None
    )
    assert json.loads(stored["branchCurr"]["value"]) == ["1.02", "2.02", "7.93"]
    assert stored["branchCurr"]["value_num"] is None
    assert stored["Power"]["value"] == "1" and stored["Power"]["quality"] == 9
    assert all(r["ts"].timestamp() == 1700000000 and r["device_key"] == "dev1" for r in stored.values())


@pytest.mark.parametrize(
    ("payload", "code", "fragment"),
    [
        (b"", 1251, "Payload is empty"),
        (b"not json", 1220, "not valid JSON"),
        (b"[1, 2]", 1220, "not a JSON object"),
        (
            b'{"id":"7","method":"thing.measurepoint.resume","params":{"measurepoints":{"temp":NaN}}}',
            1220,
            "not valid JSON",
        ),
        (json.dumps(body(version=1)).encode(), 1220, "version"),
        (json.dumps(body(params=[])).encode(), 1220, "params must be an object"),
        (json.dumps(body(params={"measurepoints": {"temp": 1}, "time": "yesterday"})).encode(), 1220, "time"),
        (json.dumps(body(method="thing.measurepoint.post")).encode(), 1260, "Methods not consistent"),
        (
            json.dumps(body(params={"measurepoints": {"temp": "1.02"}})).encode(),
            1204,
            "temp: expected FLOAT, got string",
        ),
        (json.dumps(body(params={"measurepoints": {"Power": 5}})).encode(), 1204, "Power"),
        (json.dumps(body(params={"measurepoints": {"branchCurr": ["x"] * 129}})).encode(), 1204, "129"),
        (json.dumps(body(params={"measurepoints": {"Power": {"value": 2**31, "quality": 0}}})).encode(), 1204, "Power"),
        (json.dumps(body(params={"measurepoints": {"温度": 1.0}})).encode(), 1204, "温度: not defined in the model"),
    ],
)
def test_bad_requests_get_their_code_and_store_nothing(
    device: Device, migrated_dsn: str, payload: bytes, code: int, fragment: str
) -> None:
    """Every kind of bad request gets its EnOS code, a message saying why, and nothing is stored."""
    reply = device.request(TOPIC, payload)
    assert reply["code"] == code
    assert fragment in reply["message"]
    assert reply["data"] == {}
    assert rows(migrated_dsn) == []


def test_rejection_echoes_id_and_names_every_failing_point(device: Device, migrated_dsn: str) -> None:
    """A 1204 reply names each failing point with its reason and echoes the id exactly as sent."""
    request = body(id=42, params={"measurepoints": {"temp": "hot", "Power": True, "branchCurr": ["a"]}})
    reply = device.request(TOPIC, request)
    assert reply["id"] == 42 and reply["code"] == 1204
    assert "temp: expected FLOAT, got string" in reply["message"]
    assert "Power:" in reply["message"]
    assert "branchCurr" not in reply["message"]
    assert rows(migrated_dsn) == []


def test_oversized_payload_gets_1008(start_service: Callable[..., RunningService], migrated_dsn: str) -> None:
    """A payload over the configured limit is answered 1008 and nothing of it is stored."""
    service = start_service(max_payload_bytes=2048)
    dev = Device(service.port)
    assert dev.connect() == 0
    try:
        big = body(params={"measurepoints": {"branchCurr": ["x" * 100] * 30}})
        reply = dev.request(TOPIC, big)
        assert reply["code"] == 1008 and reply["id"] == "123"
        huge = body(params={"measurepoints": {"branchCurr": ["x" * 1000] * 100}})  # beyond the packet limit too
        huge["id"] = "456"
        reply = dev.request(TOPIC, huge, subscribe=False)
        assert reply["code"] == 1008 and reply["id"] == "456"  # skipped unread, yet its id is echoed
        assert dev.request(TOPIC, SAMPLE, subscribe=False)["code"] == 200  # the connection is still usable
    finally:
        dev.close()
    assert len(rows(migrated_dsn)) == 3


def test_resend_is_idempotent_and_last_write_wins(device: Device, migrated_dsn: str) -> None:
    """Re-sending a message creates no duplicate; a re-send with another value replaces the stored one."""
    assert device.request(TOPIC, SAMPLE)["code"] == 200
    assert device.request(TOPIC, SAMPLE, subscribe=False)["code"] == 200
    assert len(rows(migrated_dsn)) == 3
    changed = body(params={"measurepoints": {"temp": 7.5}, "time": 1700000000000})
    assert device.request(TOPIC, changed, subscribe=False)["code"] == 200
    stored = {r["point"]: r for r in rows(migrated_dsn)}
    assert len(stored) == 3 and stored["temp"]["value_num"] == 7.5


def test_missing_time_stores_receive_time(device: Device, migrated_dsn: str) -> None:
    """Without ``time`` the point is stamped with the moment the broker received it."""
    before = time.time()
    reply = device.request(TOPIC, body(params={"measurepoints": {"temp": 3.5}}))
    after = time.time()
    assert reply["code"] == 200
    (row,) = rows(migrated_dsn)
    assert before - 0.01 <= row["ts"].timestamp() <= after + 0.01
    assert row["ts"] == row["received_at"]


def test_version_1_1_and_qos0_are_accepted(device: Device, migrated_dsn: str) -> None:
    """The Java SDK's version "1.1" is accepted, and a QoS 0 request is answered and stored too."""
    device.subscribe(TOPIC + "_reply")
    mark = len(device.messages)
    device.publish(TOPIC, body(version="1.1"), qos=0)
    _, reply, _ = device.wait_message(TOPIC + "_reply", after=mark)
    assert json.loads(reply)["code"] == 200
    assert len(rows(migrated_dsn)) == 3


def test_batch_stores_every_item(device: Device, migrated_dsn: str) -> None:
    """A batch with several times for the publishing device stores every item."""
    items = [
        {"measurepoints": {"temp": 1.0}, "time": 1700000000000},
        {"deviceKey": "", "measurepoints": {"temp": 2.0, "Power": {"value": 3, "quality": 1}}, "time": 1700000001000},
    ]
    reply = device.request(BATCH, batch_body(items, skipInvalidMeasurepoints="", allowOfflineSubDevice=""))
    assert reply == {"id": "b1", "code": 200, "message": "", "data": {}}
    assert [(r["point"], r["value_num"]) for r in rows(migrated_dsn)] == [("Power", 3.0), ("temp", 1.0), ("temp", 2.0)]


def test_batch_without_skip_rejects_everything_on_first_error(device: Device, migrated_dsn: str) -> None:
    """Without skipInvalidMeasurepoints one invalid point rejects the whole batch with 1204."""
    items = [{"measurepoints": {"temp": 1.0}, "time": 1}, {"measurepoints": {"temp": "x", "nope": 1}, "time": 2}]
    reply = device.request(BATCH, batch_body(items))
    assert reply["code"] == 1204
    assert "params[1].temp" in reply["message"] and "params[1].nope" in reply["message"]
    assert rows(migrated_dsn) == []


def test_batch_with_skip_drops_only_invalid_points(device: Device, migrated_dsn: str) -> None:
    """With skipInvalidMeasurepoints the invalid points are dropped, the rest stored, and the reply says what."""
    items = [
        {"measurepoints": {"temp": 1.0, "dont.exist.name": 5}, "time": 1},
        {"measurepoints": {"temp": "x"}, "time": 2},
    ]
    reply = device.request(BATCH, batch_body(items, skipInvalidMeasurepoints=True))
    assert reply["code"] == 200
    assert "dont.exist.name" in reply["message"] and "params[1].temp" in reply["message"]
    assert [(r["point"], r["value_num"]) for r in rows(migrated_dsn)] == [("temp", 1.0)]


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (batch_body({"measurepoints": {}}), "params must be an array"),
        (batch_body([1]), "params[0] must be an object"),
        (batch_body([{"measurepoints": []}]), "measurepoints must be an object"),
        (batch_body([{"measurepoints": {}, "deviceKey": 5}]), "deviceKey must be a string"),
        (batch_body([{"measurepoints": {}}], skipInvalidMeasurepoints="yes"), "skipInvalidMeasurepoints"),
    ],
)
def test_batch_format_errors_get_1206(
    device: Device, migrated_dsn: str, payload: dict[str, Any], fragment: str
) -> None:
    """A batch whose structure is wrong gets 1206 naming the field."""
    reply = device.request(BATCH, payload)
    assert reply["code"] == 1206 and fragment in reply["message"]
    assert rows(migrated_dsn) == []


def test_batch_for_another_device_needs_permission(device: Device, migrated_dsn: str) -> None:
    """Data for another device is refused with 1212 unless allowOfflineSubDevice is set."""
    items = [
        {"measurepoints": {"temp": 1.0}, "time": 1},
        {"deviceKey": "sub1", "measurepoints": {"temp": 2.0}, "time": 1},
    ]
    reply = device.request(BATCH, batch_body(items))
    assert reply["code"] == 1212 and "sub1" in reply["message"]
    assert rows(migrated_dsn) == []
    reply = device.request(BATCH, batch_body(items, allowOfflineSubDevice=True), subscribe=False)
    assert reply["code"] == 200
    assert {r["device_key"] for r in rows(migrated_dsn)} == {"dev1", "sub1"}


def test_thousands_of_points_in_one_message(
    start_service: Callable[..., RunningService], migrated_dsn: str, tmp_path: Path
) -> None:
    """A message with 5 000 points (a non-validating model) is stored completely in one go."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "bulk.json").write_text(json.dumps({"productKey": "bulk", "validate": False, "measurepoints": {}}))
    service = start_service(models=models)
    dev = Device(service.port, "bulk1")
    assert dev.connect() == 0
    try:
        points = {f"p{i}": i * 0.5 for i in range(5000)}
        request = {"id": "1", "method": "thing.measurepoint.resume", "params": {"measurepoints": points, "time": 5}}
        assert dev.request(resume_topic("bulk", "bulk1"), request, timeout=20)["code"] == 200
    finally:
        dev.close()
    (count,) = fetch(
        migrated_dsn, "SELECT count(*) AS n, sum(value_num) AS s FROM measurepoints WHERE product_key='bulk'"
    )
    assert count["n"] == 5000 and count["s"] == sum(i * 0.5 for i in range(5000))


def test_unknown_product_is_refused(start_service: Callable[..., RunningService], migrated_dsn: str) -> None:
    """A product without a thing model gets 1204 naming the product."""
    service = start_service()
    dev = Device(service.port, "x1")
    assert dev.connect() == 0
    try:
        request = body(params={"measurepoints": {"temp": 1.0}})
        reply = dev.request(resume_topic("nosuchproduct", "x1"), request)
    finally:
        dev.close()
    assert reply["code"] == 1204 and "nosuchproduct" in reply["message"]
    assert rows(migrated_dsn) == []
