"""One request, start to decision: topic → envelope → thing model → rows, or a refusal with its reply code.

Pure: no sockets, no database. The broker layer feeds it a PUBLISH and gets back an `Outcome`; the writer
stores `Outcome.rows` and only then is the 200 reply sent.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from service.errors import DeviceFault
from service.model.thingmodel import PointIssue, ThingModel
from service.protocol import replies
from service.protocol.envelope import Item, decode
from service.protocol.replies import ReplyCode
from service.protocol.topics import RequestTopic

SubDeviceCheck = Callable[[tuple[str, str], tuple[str, str]], bool]
"""(gateway, sub-device) → may this gateway write the sub-device's points?"""


class Row(NamedTuple):
    """One point to store (a tuple: built per point on the hot path, where a frozen dataclass costs 3x)."""

    product_key: str
    device_key: str
    point: str
    time_ms: int
    value: Any
    quality: int | None
    received_ms: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to store and what to answer."""

    request_id: Any
    code: ReplyCode
    message: str = ""
    rows: list[Row] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        """True when the rows must be committed before the (200) reply goes out."""
        return self.code is ReplyCode.OK

    def reply(self) -> bytes:
        """The reply payload: ``id`` echoed as sent, integer ``code``, ``message``, and always ``data``."""
        return replies.encode(self.request_id, self.code, self.message)


def allow_all_sub_devices(gateway: tuple[str, str], sub_device: tuple[str, str]) -> bool:
    """Sub-device policy when there is no registry to consult (anonymous mode)."""
    return True


def handle(
    topic: RequestTopic,
    payload: bytes,
    *,
    models: Mapping[str, ThingModel],
    received_ms: int,
    max_bytes: int,
    sub_device_ok: SubDeviceCheck = allow_all_sub_devices,
    online: Container[tuple[str, str]] = frozenset(),
) -> Outcome:
    """Decide what a request on ``topic`` becomes.

    A batch item for another device than the topic's is accepted when that device is ``online`` (logged in
    through the publishing gateway connection with ``combine.login``), or when the request sets
    ``allowOfflineSubDevice`` and ``sub_device_ok`` says it is the topic device's sub-device; otherwise the
    whole request is refused with 1212 (EnOS's rule, reference/enos-protocol.md §8).
    """
    try:
        request = decode(payload, topic, received_ms=received_ms, max_bytes=max_bytes)
    except DeviceFault as fault:
        return Outcome(fault.request_id, fault.code, fault.text)

    gateway = (topic.product_key, topic.device_key)
    rows: list[Row] = []
    skipped: list[str] = []
    for index, item in enumerate(request.items):
        where = f"params[{index}]." if topic.batch else ""
        device = (item.product_key, item.device_key)
        if (
            device != gateway
            and device not in online
            and not (request.allow_offline_sub_device and sub_device_ok(gateway, device))
        ):
            message = replies.not_a_sub_device(where, device, gateway)
            return Outcome(request.id, ReplyCode.NO_SUB_DEVICE_PERMISSION, message)
        good, issues = _check(item, models)
        if issues and not request.skip_invalid:
            message = replies.model_invalid([f"{where}{issue}" for issue in issues])
            return Outcome(request.id, ReplyCode.MODEL_VALIDATE_FAILED, message)
        skipped.extend(f"{where}{issue}" for issue in issues)
        rows.extend(
            Row(
                item.product_key,
                item.device_key,
                point.identifier,
                item.time_ms,
                point.value,
                point.quality,
                received_ms,
            )
            for point in good
        )
    return Outcome(request.id, ReplyCode.OK, replies.skipped(skipped), rows)


def _check(item: Item, models: Mapping[str, ThingModel]) -> tuple[list[Any], list[PointIssue]]:
    model = models.get(item.product_key)
    if model is None:
        reason = f"product {item.product_key!r} has no thing model"
        return [], [PointIssue(identifier, reason) for identifier in item.measurepoints] or [PointIssue("*", reason)]
    checked, issues = model.check(item.measurepoints)
    return list(checked), list(issues)
