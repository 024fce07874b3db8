"""Replies to devices, encoding and wording: the one table of reply codes and every message built from it.

A reply is ``{"id", "code", "message", "data"}`` on the request topic plus ``_reply`` (reference/enos-protocol.md
§5). Its ``message`` is EnOS's fixed wording for the code, then ``": "`` and our reason, so a device operator
reads both what EnOS would say and what exactly was wrong. Every refusal a device can receive is worded here;
the README's reply-code table is generated from `ReplyCode` (``python -m service.protocol.replies``) and a test
keeps the two equal.

Values quoted back to a device (``json_type``, ``show``, ``quote``) are worded the same way whoever refuses
them, the envelope decoder or a thing model.

Pure: imports nothing from pointgate.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Sequence
from typing import Any, Literal

import orjson

# a reply names every failing point, but a message with 5 000 bad points must not become a 200 KB reply
MAX_ISSUES_IN_REPLY = 50
# a value quoted back is cut to this many characters, so a hostile payload cannot flood a reply or a log line
MAX_SHOWN = 40

_SURROGATE = re.compile("[\ud800-\udfff]")


class ReplyCode(enum.IntEnum):
    """Codes a device can find in a ``_reply`` message (EnOS's own), with EnOS's wording as ``message``."""

    OK = 200
    TOO_MANY_SUB_DEVICES = 429
    SUB_DEVICE_NOT_FOUND = 705
    SUB_DEVICE_DISABLED = 723
    NOT_SUB_DEVICE_OF_GATEWAY = 740
    SIGN_CHECK_FAILED = 742
    DYNAMIC_ACTIVATION_NOT_ALLOWED = 770
    MESSAGE_TOO_LARGE = 1008
    NO_WRITE_PERMISSION = 1009
    PARSE_ERROR = 1200
    MODEL_VALIDATE_FAILED = 1204
    BATCH_FORMAT_ERROR = 1206
    NO_SUB_DEVICE_PERMISSION = 1212
    PAYLOAD_FORMAT_ERROR = 1220
    PAYLOAD_EMPTY = 1251
    TOPO_ADD_FAILED = 1255
    TOPO_DELETE_FAILED = 1256
    METHOD_MISMATCH = 1260
    INTERNAL_ERROR = 500

    @property
    def message(self) -> str:
        """The fixed text EnOS sends with this code."""
        return _TABLE[self][0]

    @property
    def when(self) -> str:
        """When pointgate answers with this code (documentation: the README's table)."""
        return _TABLE[self][1]


_TABLE: dict[ReplyCode, tuple[str, str]] = {
    ReplyCode.OK: ("", "stored (committed); or the topology / sub-device request done"),
    ReplyCode.TOO_MANY_SUB_DEVICES: (
        "Too many requests",
        "`combine.login`: the gateway already has `max_sub_devices_per_gateway` sub-devices online"
        " (EnOS documents the limit, not its code; 429 is the SDKs' TOO_MANY_REQUESTS)",
    ),
    ReplyCode.SUB_DEVICE_NOT_FOUND: (
        "It failed to query device, not existed this device",
        "`combine.login`: the sub-device is not registered",
    ),
    ReplyCode.SUB_DEVICE_DISABLED: ("Device is disable", "`combine.login`: the sub-device is disabled"),
    ReplyCode.NOT_SUB_DEVICE_OF_GATEWAY: (
        "Sub device not belong the gateway",
        "`combine.login`: the sub-device is not in this gateway's topology (`thing.topo.add`, `device topo add`)",
    ),
    ReplyCode.SIGN_CHECK_FAILED: (
        "Sign check failed",
        "`combine.login`: the sub-device's `sign` is not its secret's signature, or `signMethod` is unknown",
    ),
    ReplyCode.DYNAMIC_ACTIVATION_NOT_ALLOWED: (
        "Dynamic activate is not allowed",
        "`combine.login` with `secureMode` 3 (product secret): sub-devices log in with their device secret",
    ),
    ReplyCode.MESSAGE_TOO_LARGE: (
        "Msg size is too large, discard the message",
        "payload over `max_payload_bytes` (512 KiB)",
    ),
    ReplyCode.NO_WRITE_PERMISSION: (
        "Publish to topic with no write permission",
        "a request on a device topic pointgate does not serve, a cloud-to-device topic, or a request a gateway"
        " may not send for its sub-device; never relayed",
    ),
    ReplyCode.PARSE_ERROR: ("Parse error", "`thing.topo.get`: `params` is not an object"),
    ReplyCode.MODEL_VALIDATE_FAILED: (
        "Model validate failed",
        "a point is not in the model, or has the wrong type, range or shape; the message names every failing point",
    ),
    ReplyCode.BATCH_FORMAT_ERROR: (
        "Measurepoint post data format error",
        "a batch's structure is wrong (not a list, item not an object, bad flag)",
    ),
    ReplyCode.NO_SUB_DEVICE_PERMISSION: (
        "No sub-device permission",
        "a batch item names a device the publisher may not write for",
    ),
    ReplyCode.PAYLOAD_FORMAT_ERROR: (
        "Payload format error",
        "not JSON, not an object, `NaN`, an envelope field of the wrong type",
    ),
    ReplyCode.PAYLOAD_EMPTY: ("Payload is empty", ""),
    ReplyCode.TOPO_ADD_FAILED: (
        "add topo failure",
        "`thing.topo.add`: a sub-device is unknown, badly signed, the gateway itself, a gateway, or another"
        " gateway's; or `params` is malformed. Nothing is added",
    ),
    ReplyCode.TOPO_DELETE_FAILED: (
        "Remove topo failure",
        "`thing.topo.delete`: a device is unknown, not this gateway's sub-device, or online through it; or"
        " `params` is malformed. Nothing is removed",
    ),
    ReplyCode.METHOD_MISMATCH: ("Methods not consistent", "`method` does not match the topic"),
    ReplyCode.INTERNAL_ERROR: (
        "Internal error",
        "the database refused data that passed validation (should not happen; logged)",
    ),
}


# --- encoding -------------------------------------------------------------------------------------


def encode(request_id: Any, code: ReplyCode, message: str, data: Any = None) -> bytes:
    """Serialise a reply the way every official SDK can parse it: ``id`` as sent, integer ``code``, ``data``
    (``{}`` unless given)."""
    return orjson.dumps({"id": request_id, "code": int(code), "message": message, "data": {} if data is None else data})


# --- messages -------------------------------------------------------------------------------------


def message(code: ReplyCode, detail: str = "") -> str:
    """A reply's ``message``: EnOS's wording for ``code``, then our reason when there is one."""
    return f"{code.message}: {detail}" if detail else code.message


def too_large(size: int, limit: int, *, what: Literal["payload", "packet"] = "payload") -> str:
    """The 1008 message: the request's ``what`` is ``size`` bytes, over the ``limit``."""
    return message(ReplyCode.MESSAGE_TOO_LARGE, too_large_detail(size, limit, what=what))


def too_large_detail(size: int, limit: int, *, what: Literal["payload", "packet"] = "payload") -> str:
    """The reason part of the 1008 message (for a `DeviceFault`, which adds EnOS's wording itself)."""
    return f"{what} is {size} bytes, at most {limit}"


def is_too_large(size: int, limit: int) -> bool:
    """The 1008 rule: a request of ``size`` bytes is refused when it is over ``limit`` (the limit itself is fine)."""
    return size > limit


def not_a_sub_device(where: str, device: tuple[str, str], gateway: tuple[str, str]) -> str:
    """The 1212 message: ``device`` (named at ``where`` in the request) may not be written by ``gateway``."""
    return message(
        ReplyCode.NO_SUB_DEVICE_PERMISSION,
        f"{where}device {device[0]}/{device[1]} is not a permitted sub-device of {gateway[0]}/{gateway[1]}",
    )


def model_invalid(issues: Sequence[str]) -> str:
    """The 1204 message: every failing point with its reason (at most `MAX_ISSUES_IN_REPLY` of them)."""
    return _summarise(ReplyCode.MODEL_VALIDATE_FAILED.message, issues)


def skipped(issues: Sequence[str]) -> str:
    """The 200 message when ``skipInvalidMeasurepoints`` dropped points: how many, and which and why."""
    return _summarise(f"skipped {len(issues)} invalid measurepoints", issues) if issues else ""


def not_stored() -> str:
    """The 500 message: the request was valid but its points could not be committed."""
    return message(ReplyCode.INTERNAL_ERROR, "points could not be stored")


def _summarise(head: str, lines: Sequence[str]) -> str:
    shown = "; ".join(lines[:MAX_ISSUES_IN_REPLY])
    more = f"; and {len(lines) - MAX_ISSUES_IN_REPLY} more" if len(lines) > MAX_ISSUES_IN_REPLY else ""
    return f"{head}: {shown}{more}"


# --- values quoted back ---------------------------------------------------------------------------


def json_type(value: object) -> str:
    """The JSON name of a value's type, with the value itself when it is a short scalar (``integer 5``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {show(value)}"
    if isinstance(value, int):
        return f"integer {show(value)}"
    if isinstance(value, float):
        return f"number {show(value)}"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list | tuple) else "object" if isinstance(value, dict) else type(value).__name__


def show(value: object) -> str:
    """A value as JSON, cut short with ``…`` so a hostile payload cannot flood a reply or a log line."""
    # numbers in Python's spelling: json.dumps would say "Infinity" where the range messages say "inf"
    text = str(value) if isinstance(value, int | float) and not isinstance(value, bool) else quote(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "…"


def quote(value: object) -> str:
    """``value`` as a JSON literal, readable for any Unicode but never carrying NUL or a lone surrogate."""
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return json.dumps(value, default=repr) if _SURROGATE.search(text) else text


# --- the README's table ---------------------------------------------------------------------------


def markdown_table() -> str:
    """The README's "Reply codes" table, generated from `ReplyCode`."""
    lines = ["| code | message | when |", "|---|---|---|"]
    lines += [f"| {int(code)} | {code.message} | {code.when} |".replace("|  |", "| |") for code in ReplyCode]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
