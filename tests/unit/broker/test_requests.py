"""service.broker.requests and gateways.SubDeviceSessions: request routing and sub-device sessions, without I/O."""

from __future__ import annotations

import json
from typing import Any

from service.broker.gateways import SubDeviceSessions
from service.broker.requests import Requests
from service.protocol.topics import DeviceRequest, parse_topic


class FakeTicket:
    def __init__(self) -> None:
        self.replies: list[dict[str, Any]] = []

    def answer(self, reply: bytes) -> None:
        self.replies.append(json.loads(reply))

    def abandon(self) -> None:
        raise AssertionError("not abandoned")


class FakeCaller:
    def __init__(self, identity: tuple[str, str] | None = ("pk", "gw")) -> None:
        self.identity = identity
        self.client_id = "c"
        self.closing = False
        self.sub_devices: set[tuple[str, str]] | frozenset[tuple[str, str]] = frozenset()


def request(topic: str) -> DeviceRequest:
    parsed = parse_topic(topic)
    assert isinstance(parsed, DeviceRequest)
    return parsed


def test_unserved_and_handlerless_requests_get_1009_with_their_id() -> None:
    """No route, or a route without a handler: 1009 on the reply, the id echoed."""
    handled: list[str] = []
    router = Requests({"topo_get": lambda req, payload, ticket, caller: handled.append(req.topic)})
    for topic in ("/sys/pk/gw/thing/attribute/update", "/sys/pk/gw/thing/topo/add", "/sys/pk/gw/thing/service/x"):
        ticket = FakeTicket()
        router.accept(request(topic), b'{"id": "4"}', ticket, FakeCaller())
        assert [(r["id"], r["code"]) for r in ticket.replies] == [("4", 1009)], topic
    assert "cloud-to-device" in ticket.replies[0]["message"]
    router.accept(request("/sys/pk/gw/thing/topo/get"), b"{}", FakeTicket(), FakeCaller())
    assert handled == ["/sys/pk/gw/thing/topo/get"]


def test_gateway_requests_on_a_sub_device_topic_need_a_sub_device_route() -> None:
    """A route not marked for sub-devices is 1009 on a sub-device's topic (anonymous sessions are not checked)."""
    handled: list[str] = []
    router = Requests({"topo_get": lambda req, payload, ticket, caller: handled.append(req.topic)})
    ticket = FakeTicket()
    router.accept(request("/sys/pk/sub/thing/topo/get"), b"{}", ticket, FakeCaller())
    assert ticket.replies[0]["code"] == 1009 and handled == []
    router.accept(request("/sys/pk/sub/thing/topo/get"), b"{}", FakeTicket(), FakeCaller(identity=None))
    assert handled == ["/sys/pk/sub/thing/topo/get"]


def test_sessions_limit_move_logout_close_and_prune() -> None:
    """Logins up to the limit; a sub-device moves between connections; logout, close and prune end sessions."""
    sessions = SubDeviceSessions(limit=2)
    first, second = FakeCaller(), FakeCaller()
    assert sessions.login(first, ("pk", "a")) and sessions.login(first, ("pk", "b"))
    assert sessions.login(first, ("pk", "a"))  # again: no change, not over the limit
    assert not sessions.login(first, ("pk", "c")) and first.sub_devices == {("pk", "a"), ("pk", "b")}
    assert sessions.login(second, ("pk", "b"))
    assert sessions.through(("pk", "b")) is second and first.sub_devices == {("pk", "a")}
    assert not sessions.logout(first, ("pk", "b")) and sessions.logout(second, ("pk", "b"))
    mark = sessions.mark()
    assert sessions.login(second, ("pk", "c"))  # after the snapshot was taken: prune leaves it
    pairs = frozenset({(("pk", "gw"), ("pk", "x"))})
    assert sessions.prune(pairs, mark) == 1  # a: no longer the gateway's enabled sub-device
    assert sessions.through(("pk", "a")) is None and sessions.through(("pk", "c")) is second
    sessions.closed(second)
    assert len(sessions) == 0 and not second.sub_devices
