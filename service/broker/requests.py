"""Every request on a device's topics that is not a measurement point: dispatched by route, or answered 1009.

The connection (service/broker/connection.py) sends measurement-point requests to the ingest and everything
else on a device's ``/sys/{pk}/{dk}/…`` or ``/ext/session/{pk}/{dk}/…`` tree here. A request whose route
(``service.protocol.topics.ROUTES``) has a handler in `handlers` is that handler's to answer; any other gets
``1009 Publish to topic with no write permission`` on its ``_reply`` topic and is relayed nowhere: a device is
never left waiting for an answer that cannot come, and cannot write a cloud-to-device topic.

To serve another request: add its `Route` to ``ROUTES`` and its handler to `handlers` (one entry each).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from service.broker.acl import Identity
from service.ops import metrics
from service.ops.logs import get_logger
from service.protocol import replies
from service.protocol.envelope import request_id_of
from service.protocol.replies import ReplyCode
from service.protocol.topics import DeviceRequest

if TYPE_CHECKING:
    from service.broker.events import EventIngest
    from service.broker.gateways import Gateways
    from service.broker.ingest import Ticket

log = get_logger("pointgate.requests")

Key = tuple[str, str]


class Caller(Protocol):
    """The connection a request came in on (service.broker.connection.Connection)."""

    identity: Identity
    client_id: str
    closing: bool
    sub_devices: set[Key] | frozenset[Key]


Handler = Callable[[DeviceRequest, bytes, "Ticket", Caller], None]
"""Answers one request: ``ticket.answer(reply)`` now or later (after its database work)."""


def handlers(gateways: Gateways, events: EventIngest) -> dict[str, Handler]:
    """The handler of each served route, by route name (service.protocol.topics.ROUTES)."""
    return {
        "topo_add": gateways.topo_add,
        "topo_get": gateways.topo_get,
        "topo_delete": gateways.topo_delete,
        "combine_login": gateways.login,
        "combine_login_batch": gateways.login_batch,
        "combine_logout": gateways.logout,
        "event_post": events.handle,
    }


class Requests:
    """Routes a device request to its handler; answers 1009 where there is none."""

    def __init__(self, table: Mapping[str, Handler]) -> None:
        self._table = dict(table)

    def accept(self, request: DeviceRequest, payload: bytes, ticket: Ticket, caller: Caller) -> None:
        """Hand ``request`` to its handler, or refuse it with 1009."""
        route = request.route
        handler = self._table.get(route.name) if route is not None else None
        if route is None or handler is None:
            why = "a cloud-to-device topic" if request.downstream else "a request pointgate does not serve"
            refuse(request, payload, ticket, caller, ReplyCode.NO_WRITE_PERMISSION, f"{request.path} is {why}")
            return
        if caller.identity is not None and request.device != caller.identity and not route.sub_device:
            detail = f"{request.method} is not sent for a sub-device through its gateway"
            refuse(request, payload, ticket, caller, ReplyCode.NO_WRITE_PERMISSION, detail)
            return
        handler(request, payload, ticket, caller)


def refuse(
    request: DeviceRequest,
    payload: bytes,
    ticket: Ticket,
    caller: Caller,
    code: ReplyCode,
    detail: str,
    *,
    request_id: Any = None,
    data: Any = None,
) -> None:
    """Answer ``request`` with ``code``, logged (one line) and counted; its ``id`` echoed when it can be read."""
    if request_id is None:
        request_id = request_id_of(payload)
    text = replies.message(code, detail)
    log.info(
        "request rejected",
        product=request.product_key,
        device=request.device_key,
        topic=request.topic,
        client_id=caller.client_id,
        code=int(code),
        reason=text,
    )
    answer(request, ticket, request_id, code, text, data)


def answer(request: DeviceRequest, ticket: Ticket, request_id: Any, code: ReplyCode, text: str, data: Any) -> None:
    """Send a reply and count it."""
    metrics.REQUESTS.labels(route=request.name, code=str(int(code))).inc()
    metrics.REPLIES.labels(code=str(int(code))).inc()
    ticket.answer(replies.encode(request_id, code, text, data))
