"""service.protocol.topics: which PUBLISH is a measurement-point request, whose device it names, where replies go."""

from __future__ import annotations

import pytest

from service.protocol.topics import RequestTopic, device_prefixes, parse_request_topic


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
