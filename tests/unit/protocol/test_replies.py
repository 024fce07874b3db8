"""service.protocol.replies: the reply-code table, the wire encoding and every message a device can read."""

from __future__ import annotations

import json

import pytest

from service.errors import DeviceFault
from service.protocol import replies
from service.protocol.replies import MAX_ISSUES_IN_REPLY, ReplyCode, json_type, quote, show


def test_codes_are_enos_numbers_with_enos_wording() -> None:
    """Each code keeps EnOS's number and fixed text; only 200 has an empty message."""
    assert {int(code): code.message for code in ReplyCode} == {
        200: "",
        429: "Too many requests",
        705: "It failed to query device, not existed this device",
        723: "Device is disable",
        740: "Sub device not belong the gateway",
        742: "Sign check failed",
        770: "Dynamic activate is not allowed",
        1008: "Msg size is too large, discard the message",
        1009: "Publish to topic with no write permission",
        1200: "Parse error",
        1204: "Model validate failed",
        1206: "Measurepoint post data format error",
        1212: "No sub-device permission",
        1220: "Payload format error",
        1251: "Payload is empty",
        1255: "add topo failure",
        1256: "Remove topo failure",
        1260: "Methods not consistent",
        500: "Internal error",
    }


def test_encode_echoes_the_id_as_sent_with_an_integer_code_and_empty_data() -> None:
    """The wire shape every SDK parses: id verbatim (string, number or null), integer code, message, data {}."""
    for request_id in ("123", 7, None):
        body = json.loads(replies.encode(request_id, ReplyCode.MODEL_VALIDATE_FAILED, "why"))
        assert body == {"id": request_id, "code": 1204, "message": "why", "data": {}}


def test_encode_carries_the_data_given() -> None:
    """A reply with data (topology, batch login) keeps it as given; without, data is {}."""
    body = json.loads(replies.encode("9", ReplyCode.OK, "", [{"productKey": "p", "deviceKey": "d"}]))
    assert body == {"id": "9", "code": 200, "message": "", "data": [{"productKey": "p", "deviceKey": "d"}]}


def test_message_is_enos_wording_then_the_reason() -> None:
    """``message`` puts our reason after EnOS's text, and is EnOS's text alone without one."""
    assert replies.message(ReplyCode.PAYLOAD_EMPTY) == "Payload is empty"
    assert replies.message(ReplyCode.PAYLOAD_FORMAT_ERROR, "not JSON") == "Payload format error: not JSON"


def test_device_fault_text_is_worded_here() -> None:
    """A DeviceFault's text (what the pipeline replies) is ``replies.message`` of its code and detail."""
    fault = DeviceFault(ReplyCode.METHOD_MISMATCH, "method 'x' does not match topic", request_id="1")
    assert fault.text == replies.message(ReplyCode.METHOD_MISMATCH, "method 'x' does not match topic")
    assert str(fault) == fault.text


def test_the_1008_rule_refuses_only_what_is_over_the_limit() -> None:
    """A request of exactly the limit passes; one byte more is 1008, worded with both sizes."""
    assert not replies.is_too_large(512, 512)
    assert replies.is_too_large(513, 512)
    expected = "Msg size is too large, discard the message: payload is 513 bytes, at most 512"
    assert replies.too_large(513, 512) == expected
    assert replies.too_large(9, 4, what="packet").endswith(": packet is 9 bytes, at most 4")


def test_sub_device_refusal_names_both_devices_and_where() -> None:
    """The 1212 message says which batch item named which device, and whose sub-device it is not."""
    text = replies.not_a_sub_device("params[1].", ("pk", "sub1"), ("gw", "g1"))
    assert text == "No sub-device permission: params[1].device pk/sub1 is not a permitted sub-device of gw/g1"


def test_model_invalid_lists_issues_up_to_the_cap() -> None:
    """1204 lists every failing point, but at most MAX_ISSUES_IN_REPLY, then says how many more."""
    assert replies.model_invalid(["a: x", "b: y"]) == "Model validate failed: a: x; b: y"
    many = [f"p{index}: bad" for index in range(MAX_ISSUES_IN_REPLY + 3)]
    text = replies.model_invalid(many)
    assert text.endswith(f"p{MAX_ISSUES_IN_REPLY - 1}: bad; and 3 more")
    assert f"p{MAX_ISSUES_IN_REPLY}:" not in text


def test_skipped_is_empty_when_nothing_was_skipped() -> None:
    """The 200 message is empty for a clean request, and counts and lists dropped points otherwise."""
    assert replies.skipped([]) == ""
    assert replies.skipped(["a: x"]) == "skipped 1 invalid measurepoints: a: x"


def test_not_stored_is_an_internal_error() -> None:
    """The 500 message carries EnOS's text for 500 and says the points were not stored."""
    assert replies.not_stored() == "Internal error: points could not be stored"


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (None, "null"),
        (True, "boolean true"),
        (5, "integer 5"),
        (1.5, "number 1.5"),
        ("5", "string"),
        ([1], "array"),
        ({"a": 1}, "object"),
    ],
)
def test_json_type_names_the_type_and_a_short_scalar(value: object, words: str) -> None:
    """Types are named as JSON names them, with the value for numbers and booleans."""
    assert json_type(value) == words


def test_show_cuts_long_values_with_an_ellipsis() -> None:
    """A value longer than 40 characters is cut to 37 and ``…``; short ones are JSON literals."""
    assert show("ab") == '"ab"'
    assert show(None) == "null"
    assert show(float("inf")) == "inf"
    long = show("x" * 100)
    assert len(long) == 38 and long.endswith("…")


def test_quote_escapes_lone_surrogates_but_keeps_other_unicode() -> None:
    """Readable Unicode stays readable; a lone surrogate (unstorable, unprintable) is escaped."""
    assert quote("温度") == '"温度"'
    assert quote("a\ud800") == '"a\\ud800"'


def test_markdown_table_has_one_row_per_code_in_table_order() -> None:
    """The generated README table has a header and one row per code, 200 first and 500 last."""
    lines = replies.markdown_table().splitlines()
    assert lines[0] == "| code | message | when |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == [str(int(code)) for code in ReplyCode]
    assert lines[2] == "| 200 | | stored (committed); or the topology / sub-device request done |"
