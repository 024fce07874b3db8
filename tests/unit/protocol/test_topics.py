"""service.protocol.topics: which PUBLISH is a measurement-point request, whose device it names, where replies go."""

from __future__ import annotations

import pytest

from service.protocol.topics import (
    DeviceRequest,
    RequestTopic,
    device_prefixes,
    parse_request_topic,
    parse_topic,
    topic_device,
)


@pytest.mark.parametrize(
    ("topic", "api", "batch", "name", "method"),
    [
        ("/sys/pk/dk/thing/measurepoint/resume", "resume", False, "resume", "thing.measurepoint.resume"),
        (
            "/sys/pk/dk/thing/measurepoint/resume/batch",
            "resume",
            True,
            "resume_batch",
            "thing.measurepoint.resume.batch",
        ),
        ("/sys/pk/dk/thing/measurepoint/post", "post", False, "post", "thing.measurepoint.post"),
        ("/sys/pk/dk/thing/measurepoint/post/batch", "post", True, "post_batch", "thing.measurepoint.post.batch"),
    ],
)
def test_request_topics_parse_with_their_method_and_label(
    topic: str, api: str, batch: bool, name: str, method: str
) -> None:
    """Each of the four request topics names the device, its API, the method it demands and its metrics label."""
    parsed = parse_request_topic(topic)
    assert parsed == RequestTopic(topic, "pk", "dk", api, batch)
    assert (parsed.name, parsed.method) == (name, method)


def test_reply_topic_is_the_request_topic_plus_reply() -> None:
    """Replies go to the request topic with ``_reply`` appended, batch or not."""
    for topic in ("/sys/pk/dk/thing/measurepoint/resume", "/sys/pk/dk/thing/measurepoint/post/batch"):
        parsed = parse_request_topic(topic)
        assert parsed is not None and parsed.reply_topic == topic + "_reply"


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "sys/pk/dk/thing/measurepoint/resume",  # no leading slash
        "/sys/pk/dk/thing/measurepoint/resume/",  # trailing empty level
        "/sys/pk/dk/thing/measurepoint/resume/single",  # 8 levels, last not "batch"
        "/sys/pk/dk/thing/measurepoint/report",  # unknown API
        "/sys/pk/dk/thing/event/resume",
        "/sys/pk/dk/thing/measurepoint/resume_reply",  # a reply is not a request
        "/sys//dk/thing/measurepoint/resume",  # empty product key
        "/sys/pk//thing/measurepoint/resume",  # empty device key
        "/ext/pk/dk/thing/measurepoint/resume",
        "/sys/pk/dk/thing/measurepoint/resume/batch/x",  # too deep
    ],
)
def test_other_topics_are_not_requests(topic: str) -> None:
    """Anything that is not exactly one of the four request shapes parses to None (plain MQTT traffic)."""
    assert parse_request_topic(topic) is None


def test_device_prefixes_are_its_sys_and_session_trees() -> None:
    """A device owns ``/sys/{pk}/{dk}/`` and ``/ext/session/{pk}/{dk}/`` (the ACL's input)."""
    assert device_prefixes("pk", "dk") == ("/sys/pk/dk/", "/ext/session/pk/dk/")


@pytest.mark.parametrize(
    ("topic", "route", "method"),
    [
        ("/sys/pk/dk/thing/topo/add", "topo_add", "thing.topo.add"),
        ("/sys/pk/dk/thing/topo/get", "topo_get", "thing.topo.get"),
        ("/sys/pk/dk/thing/topo/delete", "topo_delete", "thing.topo.delete"),
        ("/ext/session/pk/dk/combine/login", "combine_login", "combine.login"),
        ("/ext/session/pk/dk/combine/login/batch", "combine_login_batch", "combine.login.batch"),
        ("/ext/session/pk/dk/combine/logout", "combine_logout", "combine.logout"),
    ],
)
def test_served_routes(topic: str, route: str, method: str) -> None:
    """Each served request parses to its route, device, method and reply topic."""
    request = parse_topic(topic)
    assert isinstance(request, DeviceRequest) and request.route is not None
    assert (request.route.name, request.method, request.device) == (route, method, ("pk", "dk"))
    assert request.reply_topic == topic + "_reply"


def test_unserved_downstream_and_reply_topics() -> None:
    """Other topics in a device's tree are requests without a route; cloud-to-device ones are marked; a
    ``_reply`` topic has no reply topic of its own; topics outside device trees are plain MQTT (None)."""
    unserved = parse_topic("/sys/pk/dk/thing/attribute/update")
    assert isinstance(unserved, DeviceRequest) and unserved.route is None and not unserved.downstream
    assert unserved.name == "unserved" and unserved.method == ""
    downstream_topics = (
        "/sys/pk/dk/thing/service/measurepoint/set",
        "/sys/pk/dk/rrpc/request/9",
        "/ext/session/pk/dk/combine/delete",
    )
    for topic in downstream_topics:
        downstream = parse_topic(topic)
        assert isinstance(downstream, DeviceRequest) and downstream.downstream, topic
    reply = parse_topic("/sys/pk/dk/thing/service/x_reply")
    assert isinstance(reply, DeviceRequest) and reply.reply_topic is None and reply.name == "reply"
    assert isinstance(parse_topic("/sys/pk/dk/thing/measurepoint/post"), RequestTopic)
    for topic in ("/other/topic", "/sys/pk/dk", "/sys/pk/dk/", "/sys//dk/x", "/ext/pk/dk/x"):
        assert parse_topic(topic) is None, topic


def test_topic_device() -> None:
    """The device whose tree a topic or filter lies in; wildcard keys are just other strings."""
    assert topic_device("/sys/pk/dk/thing/x") == ("pk", "dk")
    assert topic_device("/ext/session/pk/dk/#") == ("pk", "dk")
    assert topic_device("/sys/+/dk/#") == ("+", "dk")
    assert topic_device("/sys/pk/#") is None
