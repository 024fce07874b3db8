"""service.pipeline: one request from topic and bytes to rows to store, or a refusal with its reply code."""

from __future__ import annotations

import json
from typing import Any

from service.model.thingmodel import ThingModel, compile_model
from service.pipeline import Outcome, Row, handle
from service.protocol.replies import MAX_ISSUES_IN_REPLY, ReplyCode
from service.protocol.topics import RequestTopic, parse_request_topic

MODEL = compile_model(
    {"productKey": "pk", "measurepoints": {"temp": {"dataType": "FLOAT"}, "q": {"dataType": "INT", "hasQuality": True}}}
)
MODELS: dict[str, ThingModel] = {"pk": MODEL}
SINGLE = parse_request_topic("/sys/pk/gw/thing/measurepoint/resume")
BATCH = parse_request_topic("/sys/pk/gw/thing/measurepoint/resume/batch")
RECEIVED = 1_700_000_000_000


def decide(topic: RequestTopic | None, body: dict[str, Any], **options: Any) -> Outcome:
    assert topic is not None
    options.setdefault("models", MODELS)
    options.setdefault("max_bytes", 65536)
    return handle(topic, json.dumps(body).encode(), received_ms=RECEIVED, **options)


def resume(points: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {"id": "7", "method": "thing.measurepoint.resume", "params": {"measurepoints": points, "time": 5}} | changes


def batch(items: list[dict[str, Any]], **flags: Any) -> dict[str, Any]:
    return {"id": "b", "method": "thing.measurepoint.resume.batch", "params": items, **flags}


def test_valid_request_becomes_rows_and_an_empty_200() -> None:
    """Every good point is a row with the device, time, value, quality and receive time; the reply is 200."""
    outcome = decide(SINGLE, resume({"temp": 1.5, "q": {"value": 3, "quality": 9}}))
    assert outcome.accepted and outcome.code is ReplyCode.OK and outcome.message == ""
    assert outcome.rows == [
        Row("pk", "gw", "temp", 5, 1.5, None, RECEIVED),
        Row("pk", "gw", "q", 5, 3, 9, RECEIVED),
    ]
    assert json.loads(outcome.reply()) == {"id": "7", "code": 200, "message": "", "data": {}}


def test_envelope_refusal_is_an_outcome_with_its_code_and_id() -> None:
    """A bad envelope is not an exception for the caller: it is a refused outcome echoing the id."""
    outcome = decide(SINGLE, resume({}, method="thing.measurepoint.post"))
    assert not outcome.accepted and outcome.rows == []
    assert (outcome.request_id, outcome.code) == ("7", ReplyCode.METHOD_MISMATCH)
    assert outcome.message.startswith("Methods not consistent: ")


def test_invalid_point_refuses_the_whole_request_naming_every_failure() -> None:
    """Without skipInvalidMeasurepoints one bad point is 1204 for all, and every bad point is named."""
    outcome = decide(SINGLE, resume({"temp": "1.5", "nope": 1, "q": {"value": 1, "quality": 1}}))
    assert outcome.code is ReplyCode.MODEL_VALIDATE_FAILED and outcome.rows == []
    assert outcome.message == (
        "Model validate failed: temp: expected FLOAT, got string; nope: not defined in the model"
    )


def test_unknown_product_is_1204_naming_the_product() -> None:
    """A product without a model refuses its points with the product named."""
    topic = parse_request_topic("/sys/other/gw/thing/measurepoint/resume")
    outcome = decide(topic, resume({"temp": 1.0}))
    assert outcome.code is ReplyCode.MODEL_VALIDATE_FAILED
    assert "product 'other' has no thing model" in outcome.message
    assert decide(topic, resume({})).code is ReplyCode.MODEL_VALIDATE_FAILED  # even with no points


def test_skip_invalid_stores_the_rest_and_says_what_was_dropped() -> None:
    """With skipInvalidMeasurepoints the good points are stored and the 200 lists the dropped ones by item."""
    items = [{"measurepoints": {"temp": 1.0}, "time": 1}, {"measurepoints": {"temp": "x", "q": 5}, "time": 2}]
    outcome = decide(BATCH, batch(items, skipInvalidMeasurepoints=True))
    assert outcome.code is ReplyCode.OK
    assert [row.point for row in outcome.rows] == ["temp"]
    assert outcome.message.startswith("skipped 2 invalid measurepoints: params[1].temp: expected FLOAT")


def test_sub_device_needs_the_flag_and_the_policy() -> None:
    """Another device's item is 1212 unless allowOfflineSubDevice is set and the policy permits the pair."""
    items = [{"deviceKey": "sub", "measurepoints": {"temp": 1.0}, "time": 1}]
    refused = decide(BATCH, batch(items))
    assert refused.code is ReplyCode.NO_SUB_DEVICE_PERMISSION
    assert refused.message.endswith("params[0].device pk/sub is not a permitted sub-device of pk/gw")

    asked: list[tuple[tuple[str, str], tuple[str, str]]] = []

    def only_sub(gateway: tuple[str, str], device: tuple[str, str]) -> bool:
        asked.append((gateway, device))
        return device == ("pk", "sub")

    allowed = decide(BATCH, batch(items, allowOfflineSubDevice=True), sub_device_ok=only_sub)
    assert allowed.accepted and allowed.rows[0].device_key == "sub"
    assert asked == [(("pk", "gw"), ("pk", "sub"))]
    other = [{"deviceKey": "stranger", "measurepoints": {}, "time": 1}]
    denied = decide(BATCH, batch(other, allowOfflineSubDevice=True), sub_device_ok=only_sub)
    assert denied.code is ReplyCode.NO_SUB_DEVICE_PERMISSION


def test_logged_in_sub_device_needs_no_flag() -> None:
    """An item for a sub-device logged in through the publishing connection is accepted without the flag; an
    item for one that is not still needs it (1212), whatever the other items are."""
    items = [{"deviceKey": "sub", "measurepoints": {"temp": 1.0}, "time": 1}]
    online = {("pk", "sub")}
    accepted = decide(BATCH, batch(items), online=online, sub_device_ok=lambda gateway, device: False)
    assert accepted.accepted and [row.device_key for row in accepted.rows] == ["sub"]
    mixed = [*items, {"deviceKey": "offline", "measurepoints": {"temp": 2.0}, "time": 1}]
    refused = decide(BATCH, batch(mixed), online=online, sub_device_ok=lambda gateway, device: True)
    assert refused.code is ReplyCode.NO_SUB_DEVICE_PERMISSION and "pk/offline" in refused.message


def test_reply_names_at_most_the_cap_of_issues() -> None:
    """A request with many bad points gets a reply that names the first MAX_ISSUES_IN_REPLY and counts the rest."""
    points = {f"p{index}": 1 for index in range(MAX_ISSUES_IN_REPLY + 10)}
    outcome = decide(SINGLE, resume(points))
    assert outcome.message.endswith("; and 10 more")
