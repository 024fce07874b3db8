"""service.protocol.envelope: payload bytes to a Request, every refusal with EnOS's code and a worded reason."""

from __future__ import annotations

import json
from typing import Any

import pytest

from service.errors import DeviceFault
from service.protocol.envelope import (
    MAX_TIME_MS,
    Item,
    Request,
    decode,
    decode_envelope,
    decode_event,
    peek_id,
    request_id_of,
)
from service.protocol.replies import ReplyCode
from service.protocol.topics import EventTopic, RequestTopic, parse_request_topic

SINGLE = parse_request_topic("/sys/pk/dk/thing/measurepoint/resume")
BATCH = parse_request_topic("/sys/pk/dk/thing/measurepoint/resume/batch")
RECEIVED = 1_700_000_000_000
LIMIT = 4096


def encode(body: object) -> bytes:
    return json.dumps(body).encode()


def single(**changes: Any) -> bytes:
    body: dict[str, Any] = {"id": "1", "version": "1.0", "method": "thing.measurepoint.resume"}
    body["params"] = {"measurepoints": {"temp": 1.5}, "time": 5}
    body.update(changes)
    return encode(body)


def batch(params: object, **changes: Any) -> bytes:
    return encode({"id": "b", "method": "thing.measurepoint.resume.batch", "params": params, **changes})


def run(payload: bytes, topic: RequestTopic | None = SINGLE, max_bytes: int = LIMIT) -> Request:
    assert topic is not None
    return decode(payload, topic, received_ms=RECEIVED, max_bytes=max_bytes)


def refusal(payload: bytes, topic: RequestTopic | None = SINGLE, max_bytes: int = LIMIT) -> DeviceFault:
    with pytest.raises(DeviceFault) as caught:
        run(payload, topic, max_bytes)
    return caught.value


def test_single_request_decodes_to_one_item_of_the_publishing_device() -> None:
    """A resume request becomes one item for the topic's device, at the time it names."""
    assert run(single()) == Request("1", [Item("pk", "dk", 5, {"temp": 1.5})])


def test_missing_time_is_the_receive_time() -> None:
    """Without ``time`` a point is stamped with the broker's receive time."""
    request = run(single(params={"measurepoints": {}}))
    assert request.items[0].time_ms == RECEIVED


def test_id_and_version_are_optional() -> None:
    """``id`` and ``version`` may be absent; the id is then null in the reply."""
    request = run(encode({"method": "thing.measurepoint.resume", "params": {"measurepoints": {}}}))
    assert request.id is None


def test_batch_items_default_to_the_publisher_and_carry_flags() -> None:
    """Empty or missing keys in a batch item name the publisher; flags come through as booleans."""
    params = [
        {"measurepoints": {"a": 1}, "time": 1},
        {"productKey": "", "deviceKey": "sub", "measurepoints": {"b": 2}, "time": 2},
    ]
    request = run(batch(params, skipInvalidMeasurepoints=True, allowOfflineSubDevice=""), BATCH)
    assert request.items == [Item("pk", "dk", 1, {"a": 1}), Item("pk", "sub", 2, {"b": 2})]
    assert (request.skip_invalid, request.allow_offline_sub_device) == (True, False)


def test_single_topic_ignores_keys_inside_params() -> None:
    """On a non-batch topic the device is always the publisher, whatever ``params`` claims."""
    params = {"productKey": "other", "deviceKey": "other", "measurepoints": {}, "time": 1}
    item = run(single(params=params)).items[0]
    assert (item.product_key, item.device_key) == ("pk", "dk")


@pytest.mark.parametrize(
    ("payload", "code", "detail"),
    [
        (b"", ReplyCode.PAYLOAD_EMPTY, ""),
        (b"{not json", ReplyCode.PAYLOAD_FORMAT_ERROR, "payload is not valid JSON"),
        (b"NaN", ReplyCode.PAYLOAD_FORMAT_ERROR, "payload is not valid JSON"),
        (b"[1]", ReplyCode.PAYLOAD_FORMAT_ERROR, "payload is not a JSON object"),
        (single(id=5.5), ReplyCode.PAYLOAD_FORMAT_ERROR, "id must be a string, got number 5.5"),
        (single(id=True), ReplyCode.PAYLOAD_FORMAT_ERROR, "id must be a string, got boolean true"),
        (single(version="2.0"), ReplyCode.PAYLOAD_FORMAT_ERROR, 'version must be "1.0" or "1.1", got "2.0"'),
        (single(method=5), ReplyCode.PAYLOAD_FORMAT_ERROR, "method must be a string, got integer 5"),
        (single(method="thing.measurepoint.post"), ReplyCode.METHOD_MISMATCH, "does not match topic"),
        (single(params=[]), ReplyCode.PAYLOAD_FORMAT_ERROR, "params must be an object, got array"),
        (single(params={"measurepoints": 1}), ReplyCode.PAYLOAD_FORMAT_ERROR, "params.measurepoints must be an"),
        (single(params={"measurepoints": {}, "time": 1.5}), ReplyCode.PAYLOAD_FORMAT_ERROR, "got 1.5"),
        (single(params={"measurepoints": {}, "time": "1"}), ReplyCode.PAYLOAD_FORMAT_ERROR, 'got "1"'),
        (single(params={"measurepoints": {}, "time": -1}), ReplyCode.PAYLOAD_FORMAT_ERROR, "out of range"),
        (single(params={"measurepoints": {}, "time": MAX_TIME_MS + 1}), ReplyCode.PAYLOAD_FORMAT_ERROR, "range"),
    ],
)
def test_envelope_errors_get_their_code_and_reason(payload: bytes, code: ReplyCode, detail: str) -> None:
    """Each malformed envelope is refused with EnOS's code for it and a reason naming the field."""
    fault = refusal(payload)
    assert fault.code is code
    assert detail in fault.detail
    assert fault.text.startswith(code.message)


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        (batch({"measurepoints": {}}), "params must be an array, got object"),
        (batch([1]), "params[0] must be an object, got integer 1"),
        (batch([{"measurepoints": []}]), "params[0].measurepoints must be an object, got array"),
        (batch([{"measurepoints": {}, "deviceKey": 5}]), "params[0].deviceKey must be a string, got integer 5"),
        (batch([], skipInvalidMeasurepoints="yes"), 'skipInvalidMeasurepoints must be true or false, got "yes"'),
        (batch([], allowOfflineSubDevice=1), "allowOfflineSubDevice must be true or false, got 1"),
    ],
)
def test_batch_structure_errors_are_1206(payload: bytes, detail: str) -> None:
    """A batch whose structure is wrong is 1206, naming the item and field."""
    fault = refusal(payload, BATCH)
    assert (fault.code, fault.detail) == (ReplyCode.BATCH_FORMAT_ERROR, detail)


def test_refusals_after_the_id_echo_it() -> None:
    """Once the payload had an id, the refusal carries it for the reply; before that it is None."""
    assert refusal(single(id="abc", method="x")).request_id == "abc"
    assert refusal(b"{bad").request_id is None


def test_oversized_payload_is_1008_and_keeps_its_id() -> None:
    """A payload over the limit is 1008 with both sizes; it was parsed anyway, so its id is echoed."""
    payload = single(id="big")
    fault = refusal(payload, max_bytes=len(payload) - 1)
    assert fault.code is ReplyCode.MESSAGE_TOO_LARGE and fault.request_id == "big"
    assert fault.detail == f"payload is {len(payload)} bytes, at most {len(payload) - 1}"
    assert run(payload, max_bytes=len(payload)).id == "big"  # exactly the limit is fine


def test_long_values_are_cut_short_in_reasons() -> None:
    """A long wrong value is quoted back cut to 40 characters with an ellipsis, never in full."""
    fault = refusal(single(version="v" * 500))
    assert fault.detail.endswith("…") and len(fault.detail) < 100


EVENT: EventTopic | None = EventTopic("/sys/pk/dk/thing/event/alarm/post", "pk", "dk", "alarm")


@pytest.mark.parametrize(
    "header",
    [
        None,  # empty payload
        b"{oops",
        b"[1]",
        {"id": True},
        {"id": "1", "version": "2.0"},
        {"id": "1", "method": 5},
        {"id": "1", "method": "thing.other"},
        {"id": "1", "method": "thing.other", "params": {"time": "now"}, "pad": "x" * LIMIT},
    ],
)
def test_event_and_point_envelopes_refuse_alike(header: object) -> None:
    """The envelope checks every request shares give an event post the same code and words as a point request."""
    payload = b"" if header is None else header if isinstance(header, bytes) else encode(header)
    assert EVENT is not None
    with pytest.raises(DeviceFault) as point:
        run(payload)
    with pytest.raises(DeviceFault) as event:
        decode_event(payload, EVENT, received_ms=RECEIVED, max_bytes=LIMIT)
    assert (event.value.code, event.value.request_id) == (point.value.code, point.value.request_id)
    # the method mismatch names each topic's own method; every other reason is word for word the same
    assert event.value.text == point.value.text.replace("thing.measurepoint.resume", "thing.event.alarm.post")


@pytest.mark.parametrize(
    ("time_value", "words"), [("5", "must be integer"), (True, "must be integer"), (-1, "out of range")]
)
def test_event_time_follows_the_point_rule(time_value: object, words: str) -> None:
    """An event's ``time`` is refused exactly where a point request's would be."""
    assert EVENT is not None
    body = {"id": "1", "method": "thing.event.alarm.post", "params": {"events": {}, "time": time_value}}
    with pytest.raises(DeviceFault) as event:
        decode_event(encode(body), EVENT, received_ms=RECEIVED, max_bytes=LIMIT)
    with pytest.raises(DeviceFault) as point:
        run(single(params={"measurepoints": {}, "time": time_value}))
    assert words in event.value.text and event.value.text == point.value.text


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"", ReplyCode.PAYLOAD_EMPTY),
        (b"{nope", ReplyCode.PAYLOAD_FORMAT_ERROR),
        (b"[1]", ReplyCode.PAYLOAD_FORMAT_ERROR),
        (b'{"id": true, "method": "combine.login"}', ReplyCode.PAYLOAD_FORMAT_ERROR),
        (b'{"id": "1", "version": "2.0", "method": "combine.login"}', ReplyCode.PAYLOAD_FORMAT_ERROR),
        (b'{"id": "1"}', ReplyCode.PAYLOAD_FORMAT_ERROR),
        (b'{"id": "1", "method": "combine.logout"}', ReplyCode.METHOD_MISMATCH),
        (b'{"id": "1", "method": "combine.login", "pad": "' + b"x" * LIMIT + b'"}', ReplyCode.MESSAGE_TOO_LARGE),
    ],
)
def test_generic_envelope_refusals(payload: bytes, code: ReplyCode) -> None:
    """Other requests' envelopes get the measurement points' codes: 1251, 1220, 1260, 1008."""
    with pytest.raises(DeviceFault) as caught:
        decode_envelope(payload, "combine.login", max_bytes=LIMIT)
    assert caught.value.code is code


def test_generic_envelope_returns_id_and_params_as_sent() -> None:
    """A good envelope gives back its id verbatim and its params unchecked (None when absent)."""
    body = b'{"id": "9", "version": "1.1", "method": "thing.topo.get"}'
    assert decode_envelope(body, "thing.topo.get", max_bytes=LIMIT) == ("9", None)
    assert request_id_of(b'{"id": 3}') == 3
    assert [request_id_of(p) for p in (b"x", b"[]", b'{"id": [1]}', b'{"id": true}')] == [None] * 4


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        (b'{"id": "123", "version": "1.0", "params": {"measurepoints": {', "123"),
        (b'  {"allowOfflineSubDevice": true, "id": 7, "params": [', 7),  # scalar flags before it are skipped
        (b'{"id":"a\\"b","method":"x"', 'a"b'),
        (b'{"params": {"id": "nested"}, "id": "late"}', None),  # past an object: a nested id is never taken
        (b'{"version": "1.0"}', None),
        (b'garbage {"id": "1",', None),
        (b'{"id": "12', None),  # cut inside the id: unknown, not a wrong id
        (b"", None),
    ],
)
def test_peek_id_finds_only_a_top_level_id_among_the_first_members(prefix: bytes, expected: object) -> None:
    """A request too large to read is answered with the id from its first bytes, when it is plainly there."""
    assert peek_id(prefix) == expected
