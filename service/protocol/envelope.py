"""Payload bytes → a `Request` or an `EventRequest`: the EnOS envelope checked field by field, before any
thing model is consulted.

Every refusal is a `DeviceFault` with the code EnOS uses for it (reference/enos-protocol.md §4–§6) and, when
the payload had one, the request ``id`` so the reply can echo it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from service.errors import DeviceFault
from service.protocol import replies
from service.protocol.replies import ReplyCode, json_type, show
from service.protocol.topics import EventTopic, RequestTopic

VERSIONS = frozenset({"1.0", "1.1"})
# timestamptz holds far more, but a device clock outside years 1970..9999 is a bug, not data
MAX_TIME_MS = 253_402_300_799_999


@dataclass(frozen=True, slots=True)
class Item:
    """One device's points at one time."""

    product_key: str
    device_key: str
    time_ms: int
    measurepoints: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Request:
    """A decoded measurement-point request."""

    id: Any  # as sent: echoed verbatim in the reply
    items: list[Item]
    skip_invalid: bool = False
    allow_offline_sub_device: bool = False


@dataclass(frozen=True, slots=True)
class EventRequest:
    """A decoded event post: the event's output parameters at one time."""

    id: Any  # as sent: echoed verbatim in the reply
    time_ms: int
    values: dict[str, Any]


def decode_event(payload: bytes, topic: EventTopic, *, received_ms: int, max_bytes: int) -> EventRequest:
    """Check the envelope of an event post: ``params`` is ``{"events": {param: value, ...}, "time"?: ms}``.

    ``events`` is what the official Python SDK (``EventPostRequest``) and EnOS's documentation send; ``value``
    is accepted in its place (the Alibaba-style name some hand-written clients use), never both.
    """
    # enos-mqtt-sdk-python 0.1.1 builds the method as "thing.event.%s.post" + eventId (an unformatted template):
    # the official SDK's events would otherwise all be 1260
    body, request_id = _open(payload, topic.method, max_bytes, f"thing.event.%s.post{topic.event_id}")
    params = body.get("params")
    code = ReplyCode.PAYLOAD_FORMAT_ERROR
    if not isinstance(params, dict):
        raise DeviceFault(code, f"params must be an object, got {json_type(params)}", request_id=request_id)
    if "events" in params and "value" in params:
        raise DeviceFault(code, 'params has both "events" and "value": send one', request_id=request_id)
    name = "value" if "value" in params else "events"
    values = params.get(name)
    if not isinstance(values, dict):
        detail = f"params.{name} must be an object of output parameters, got {json_type(values)}"
        raise DeviceFault(code, detail, request_id=request_id)
    return EventRequest(request_id, _time(params, received_ms, "params", code, request_id), values)


PEEK_BYTES = 256  # how much of a request too large to read is looked at for its id

# one top-level member of a JSON object whose value is a scalar: "key": "string" | number | true | false | null
_MEMBER = re.compile(
    rb'\s*"((?:[^"\\]|\\.)*)"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|true|false|null)\s*(,|\})'
)


def peek_id(prefix: bytes) -> Any:
    """The request id from the first bytes of a payload too large to read whole, or None.

    Only the top-level members before the first object or array are looked at (the SDKs send ``id`` first, and
    ``allowOfflineSubDevice``-style flags are scalars), so a nested ``"id"`` is never taken for the request's.
    """
    start = prefix.find(b"{")
    if start < 0 or prefix[:start].strip():
        return None
    pos = start + 1
    while (member := _MEMBER.match(prefix, pos)) is not None:
        if member.group(1) == b"id":
            try:
                return orjson.loads(member.group(2))
            except orjson.JSONDecodeError:
                return None
        if member.group(3) == b"}":
            return None
        pos = member.end()
    return None


def decode(payload: bytes, topic: RequestTopic, *, received_ms: int, max_bytes: int) -> Request:
    """Check the envelope of ``payload`` published on ``topic``; raise `DeviceFault` on the first problem."""
    body, request_id = _open(payload, topic.method, max_bytes)

    def refuse(code: ReplyCode, detail: str) -> DeviceFault:
        return DeviceFault(code, detail, request_id=request_id)

    params = body.get("params")
    if not topic.batch:
        if not isinstance(params, dict):
            raise refuse(ReplyCode.PAYLOAD_FORMAT_ERROR, f"params must be an object, got {json_type(params)}")
        item = _item(params, topic, received_ms, "params", ReplyCode.PAYLOAD_FORMAT_ERROR, request_id)
        return Request(request_id, [item])

    code = ReplyCode.BATCH_FORMAT_ERROR
    if not isinstance(params, list):
        raise refuse(code, f"params must be an array, got {json_type(params)}")
    items = []
    for index, entry in enumerate(params):
        where = f"params[{index}]"
        if not isinstance(entry, dict):
            raise refuse(code, f"{where} must be an object, got {json_type(entry)}")
        items.append(_item(entry, topic, received_ms, where, code, request_id))
    return Request(
        request_id,
        items,
        skip_invalid=_flag(body, "skipInvalidMeasurepoints", request_id),
        allow_offline_sub_device=_flag(body, "allowOfflineSubDevice", request_id),
    )


def _open(payload: bytes, expected: str, max_bytes: int, alias: str = "") -> tuple[dict[str, Any], Any]:
    """The JSON object of a request and its ``id``, after the envelope checks every request shares.

    1251 empty, 1008 too large (echoing the id when the payload parses), 1220 not a JSON object or an envelope
    field of the wrong type, 1260 ``method`` not ``expected`` (nor ``alias``, a known SDK misspelling, when given).
    """
    if not payload:
        raise DeviceFault(ReplyCode.PAYLOAD_EMPTY)
    error: orjson.JSONDecodeError | None = None
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        body, error = None, exc
    if replies.is_too_large(len(payload), max_bytes):
        # it was read anyway (it fit in a packet), so the reply can still echo its id
        request_id = body.get("id") if isinstance(body, dict) else None
        detail = replies.too_large_detail(len(payload), max_bytes)
        raise DeviceFault(ReplyCode.MESSAGE_TOO_LARGE, detail, request_id=request_id)
    if error is not None:
        raise DeviceFault(ReplyCode.PAYLOAD_FORMAT_ERROR, f"payload is not valid JSON ({error})")
    if not isinstance(body, dict):
        raise DeviceFault(ReplyCode.PAYLOAD_FORMAT_ERROR, "payload is not a JSON object")

    request_id = body.get("id")

    def refuse(code: ReplyCode, detail: str) -> DeviceFault:
        return DeviceFault(code, detail, request_id=request_id)

    if request_id is not None and (not isinstance(request_id, str | int) or isinstance(request_id, bool)):
        raise refuse(ReplyCode.PAYLOAD_FORMAT_ERROR, f"id must be a string, got {json_type(request_id)}")
    version = body.get("version")
    if version is not None and version not in VERSIONS:
        raise refuse(ReplyCode.PAYLOAD_FORMAT_ERROR, f'version must be "1.0" or "1.1", got {show(version)}')
    method = body.get("method")
    if not isinstance(method, str):
        raise refuse(ReplyCode.PAYLOAD_FORMAT_ERROR, f"method must be a string, got {json_type(method)}")
    if method != expected and (not alias or method != alias):
        raise refuse(ReplyCode.METHOD_MISMATCH, f"method {method!r} does not match topic, expected {expected!r}")

    return body, request_id


def _time(entry: dict[str, Any], received_ms: int, where: str, code: ReplyCode, request_id: Any) -> int:
    # `_item`'s time rule, for event posts (kept inline there, for the same reason as `_open`)
    time_ms = entry.get("time")
    if time_ms is None:
        return received_ms
    if not isinstance(time_ms, int) or isinstance(time_ms, bool):
        raise DeviceFault(
            code, f"{where}.time must be integer milliseconds, got {show(time_ms)}", request_id=request_id
        )
    if not 0 <= time_ms <= MAX_TIME_MS:
        raise DeviceFault(code, f"{where}.time {time_ms} is out of range", request_id=request_id)
    return time_ms


def _item(
    entry: dict[str, Any], topic: RequestTopic, received_ms: int, where: str, code: ReplyCode, request_id: Any
) -> Item:
    points = entry.get("measurepoints")
    if not isinstance(points, dict):
        raise DeviceFault(
            code, f"{where}.measurepoints must be an object, got {json_type(points)}", request_id=request_id
        )
    time_ms = entry.get("time")
    if time_ms is None:
        time_ms = received_ms
    elif not isinstance(time_ms, int) or isinstance(time_ms, bool):
        raise DeviceFault(
            code, f"{where}.time must be integer milliseconds, got {show(time_ms)}", request_id=request_id
        )
    elif not 0 <= time_ms <= MAX_TIME_MS:
        raise DeviceFault(code, f"{where}.time {time_ms} is out of range", request_id=request_id)
    keys = []
    for field, own in (("productKey", topic.product_key), ("deviceKey", topic.device_key)):
        value = entry.get(field) if topic.batch else None
        if value is None or value == "":
            keys.append(own)  # empty or missing names the publishing device (the Python SDK sends "")
        elif isinstance(value, str):
            keys.append(value)
        else:
            raise DeviceFault(code, f"{where}.{field} must be a string, got {json_type(value)}", request_id=request_id)
    return Item(keys[0], keys[1], time_ms, points)


def _flag(body: dict[str, Any], name: str, request_id: Any) -> bool:
    # missing, "" and false all mean false: the Python SDK sends "" for an unset flag
    value = body.get(name)
    if value is None or value == "" or value is False:
        return False
    if value is True:
        return True
    raise DeviceFault(
        ReplyCode.BATCH_FORMAT_ERROR, f"{name} must be true or false, got {show(value)}", request_id=request_id
    )


def decode_envelope(payload: bytes, method: str, *, max_bytes: int) -> tuple[Any, Any]:
    """``(id, params)`` of any other request (topology, sub-device sessions) after the common checks.

    The same rules and codes as a measurement-point request's envelope: 1251 empty, 1008 too large, 1220 not a
    JSON object or an envelope field of the wrong type, 1260 ``method`` not the topic's. ``params`` is returned as
    sent (None when absent) for the request's own parser to check.
    """
    body, request_id = _open(payload, method, max_bytes)
    return request_id, body.get("params")


def request_id_of(payload: bytes) -> Any:
    """The ``id`` of a payload, best effort (None when it is not a JSON object with a string or integer id)."""
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    request_id = body.get("id") if isinstance(body, dict) else None
    return request_id if isinstance(request_id, str | int) and not isinstance(request_id, bool) else None
