"""service.events (and the event parts of topics and envelope): an event post from bytes to a row, or a refusal."""

from __future__ import annotations

import json
from typing import Any

import pytest

from service.events import EventOutcome, EventRow, handle_event
from service.model.thingmodel import ThingModel, compile_model
from service.protocol.replies import ReplyCode
from service.protocol.topics import DeviceRequest, EventTopic, parse_request_topic, parse_topic

MODEL = compile_model(
    {
        "productKey": "pk",
        "measurepoints": {},
        "events": {
            "overTemp": {
                "eventType": "WARN",
                "outputData": [
                    {"identifier": "temp", "dataType": "FLOAT", "required": True},
                    {"identifier": "note", "dataType": "STRING", "dataDefinition": {"maxLength": 4}},
                ],
            }
        },
    }
)
LAX = compile_model({"productKey": "lax", "validate": False, "measurepoints": {}})
MODELS: dict[str, ThingModel] = {"pk": MODEL, "lax": LAX}
RECEIVED = 1_700_000_000_000
TOPIC = "/sys/pk/dk/thing/event/overTemp/post"


def parse_event_topic(topic: str) -> EventTopic | None:
    """The event post ``topic`` is, found as the broker finds it: by the request router's ``event_post`` route."""
    request = parse_topic(topic)
    if isinstance(request, DeviceRequest) and request.route is not None and request.route.name == "event_post":
        return EventTopic.of(request)
    return None


def decide(topic: str, body: Any, *, raw: bytes | None = None, max_bytes: int = 65536) -> EventOutcome:
    parsed = parse_event_topic(topic)
    assert parsed is not None
    payload = json.dumps(body).encode() if raw is None else raw
    return handle_event(parsed, payload, models=MODELS, received_ms=RECEIVED, max_bytes=max_bytes)


def post(events: Any, event: str = "overTemp", **params: Any) -> dict[str, Any]:
    return {"id": "9", "version": "1.0", "method": f"thing.event.{event}.post", "params": {"events": events, **params}}


def test_event_topic_parses_with_its_method_and_reply() -> None:
    """The event post route names the device and the event, the method it demands and its reply topic."""
    parsed = parse_event_topic(TOPIC)
    assert parsed == EventTopic(TOPIC, "pk", "dk", "overTemp")
    assert parsed.method == "thing.event.overTemp.post"
    assert parsed.reply_topic == TOPIC + "_reply"
    assert parsed.name == "event" and parsed.batch is False
    assert parse_request_topic(TOPIC) is None  # not a measurement-point request


@pytest.mark.parametrize(
    "topic",
    [
        "/sys/pk/dk/thing/event/overTemp/post_reply",
        "/sys/pk/dk/thing/event//post",
        "/sys/pk/dk/thing/event/overTemp",
        "/sys/pk/dk/thing/event/a/b/post",
        "/sys/pk/dk/thing/service/overTemp/post",
        "/ext/session/pk/dk/thing/event/overTemp/post",
        "sys/pk/dk/thing/event/overTemp/post",
        "/sys//dk/thing/event/overTemp/post",
    ],
)
def test_other_topics_are_not_event_posts(topic: str) -> None:
    """Replies, empty levels and other trees are not event posts."""
    assert parse_event_topic(topic) is None


def test_valid_event_becomes_a_row_and_an_empty_200() -> None:
    """A good post is one row with device, event, the model's type, device time, values as sent and receive time."""
    outcome = decide(TOPIC, post({"temp": 81.5, "note": "hot"}, time=1234))
    assert outcome.accepted and outcome.code is ReplyCode.OK and outcome.request_id == "9"
    assert outcome.row == EventRow("pk", "dk", "overTemp", "WARN", 1234, {"temp": 81.5, "note": "hot"}, RECEIVED)
    assert json.loads(outcome.reply()) == {"id": "9", "code": 200, "message": "", "data": {}}


def test_time_defaults_to_receive_time() -> None:
    """Without ``time`` the broker's receive time is the event's time."""
    row = decide(TOPIC, post({"temp": 1.0})).row
    assert row is not None and row.time_ms == RECEIVED


def test_value_is_accepted_in_place_of_events() -> None:
    """``params.value`` (Alibaba-style clients) is read like ``params.events``."""
    body = {"id": "1", "method": "thing.event.overTemp.post", "params": {"value": {"temp": 2.0}, "time": 5}}
    row = decide(TOPIC, body).row
    assert row is not None and row.values == {"temp": 2.0}


def test_invalid_values_are_1204_naming_each() -> None:
    """Every failing output parameter is named in the 1204 message, and nothing is to be stored."""
    outcome = decide(TOPIC, post({"temp": "81", "note": "too long", "x": 1}))
    assert outcome.code is ReplyCode.MODEL_VALIDATE_FAILED and outcome.row is None
    assert outcome.message == (
        "Model validate failed: event overTemp: temp: expected FLOAT, got string; "
        "event overTemp: note: string is 8 bytes, at most 4; "
        "event overTemp: x: not an output parameter of event overTemp"
    )


def test_unknown_event_is_1204_naming_it() -> None:
    """An event the model does not define is 1204 (EnOS's code for an event that does not match the model)."""
    outcome = decide("/sys/pk/dk/thing/event/meltdown/post", post({"a": 1}, "meltdown"))
    assert outcome.code is ReplyCode.MODEL_VALIDATE_FAILED
    assert outcome.message == "Model validate failed: event meltdown: meltdown: event not defined in the model of pk"


def test_product_without_model_is_1204() -> None:
    """A product with no thing model cannot have events."""
    outcome = decide("/sys/nomodel/dk/thing/event/e/post", post({}, "e"))
    assert outcome.code is ReplyCode.MODEL_VALIDATE_FAILED and "has no thing model" in outcome.message


def test_non_validating_model_stores_any_event_with_no_type() -> None:
    """With validate false an undefined event is stored as sent, with no event type."""
    row = decide("/sys/lax/dk/thing/event/anything/post", post({"x": [1, 2]}, "anything")).row
    assert row is not None and row.event_type is None and row.values == {"x": [1, 2]}


@pytest.mark.parametrize(
    ("body", "raw", "code", "words"),
    [
        (None, b"", ReplyCode.PAYLOAD_EMPTY, "Payload is empty"),
        (None, b"{nope", ReplyCode.PAYLOAD_FORMAT_ERROR, "not valid JSON"),
        ([1], None, ReplyCode.PAYLOAD_FORMAT_ERROR, "not a JSON object"),
        (post({"temp": 1.0}, "other"), None, ReplyCode.METHOD_MISMATCH, "expected 'thing.event.overTemp.post'"),
        ({"id": "1", "method": "thing.event.overTemp.post"}, None, ReplyCode.PAYLOAD_FORMAT_ERROR, "params must be"),
        (post([1]), None, ReplyCode.PAYLOAD_FORMAT_ERROR, "params.events must be an object"),
        (post({"temp": 1.0}, time="now"), None, ReplyCode.PAYLOAD_FORMAT_ERROR, "params.time must be integer"),
        (post({"temp": 1.0}, value={}), None, ReplyCode.PAYLOAD_FORMAT_ERROR, 'both "events" and "value"'),
    ],
)
def test_bad_envelopes_get_their_codes(body: Any, raw: bytes | None, code: ReplyCode, words: str) -> None:
    """Empty, non-JSON, wrong method, missing or mistyped params: the envelope's own code and reason."""
    outcome = decide(TOPIC, body, raw=raw)
    assert outcome.code is code and words in outcome.message and outcome.row is None


def test_too_large_is_1008_with_its_id() -> None:
    """A payload over the limit is 1008, echoing its id."""
    outcome = decide(TOPIC, post({"temp": 1.0, "note": "x" * 100}), max_bytes=50)
    assert outcome.code is ReplyCode.MESSAGE_TOO_LARGE and outcome.request_id == "9"


def test_python_sdk_method_spelling_is_accepted() -> None:
    """enos-mqtt-sdk-python 0.1.1 sends ``thing.event.%s.post{eventId}``: accepted for that event, not another."""
    body = post({"temp": 1.0}) | {"method": "thing.event.%s.postoverTemp"}
    assert decide(TOPIC, body).accepted
    wrong = post({"temp": 1.0}) | {"method": "thing.event.%s.postfault"}
    assert decide(TOPIC, wrong).code is ReplyCode.METHOD_MISMATCH
