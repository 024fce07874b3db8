"""service/broker/subscriptions.py (TopicIndex) and the filter rule it relies on (protocol/topics.valid_filter)."""

from __future__ import annotations

import pytest

from service.broker.subscriptions import TopicIndex
from service.protocol.topics import valid_filter

FILTERS = [
    "/sys/pk/a/x",
    "/sys/pk/a/+",
    "/sys/pk/a/#",
    "/sys/+/+/x",
    "#",
    "+/+",
    "sport/#",
    "sport/+/player1",
    "$SYS/#",
]


def index(*filters: str) -> TopicIndex:
    found = TopicIndex()
    for topic_filter in filters:
        found.add(topic_filter)
    return found


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("/sys/pk/a/x", {"/sys/pk/a/x", "/sys/pk/a/+", "/sys/pk/a/#", "/sys/+/+/x", "#"}),
        ("/sys/pk/a", {"/sys/pk/a/#", "#"}),  # "a/#" matches "a" itself [MQTT-4.7.1-2]
        ("/sys/pk/a/x/y", {"/sys/pk/a/#", "#"}),
        ("/sys/pk/b/x", {"/sys/+/+/x", "#"}),
        ("sport", {"sport/#", "#"}),
        ("sport/tennis/player1", {"sport/#", "sport/+/player1", "#"}),
        ("a/b", {"+/+", "#"}),
        ("/x", {"+/+", "#"}),  # the empty first level is a level
        ("$SYS/x", {"$SYS/#"}),  # leading wildcards never match $ topics [MQTT-4.7.2-1]
    ],
)
def test_match_follows_mqtt_rules(topic: str, expected: set[str]) -> None:
    assert set(index(*FILTERS).match(topic)) == expected


def test_discard_removes_only_that_filter_and_prunes_its_branch() -> None:
    found = index("/sys/pk/a/x", "/sys/pk/a/#")
    found.discard("/sys/pk/a/x")
    assert found.match("/sys/pk/a/x") == ["/sys/pk/a/#"]
    assert len(found) == 1 and "/sys/pk/a/x" not in found and "/sys/pk/a/#" in found
    found.discard("/sys/pk/a/#")
    found.discard("/sys/pk/a/#")  # twice is harmless
    assert len(found) == 0 and found.match("/sys/pk/a/x") == []
    assert found._root.children == {}  # no empty branches left behind


def test_one_devices_filters_are_never_visited_for_another_devices_topic() -> None:
    """The property issue 8 #5 needs: matching B's topic does not walk A's 5 000 wildcard filters."""
    found = index(*(f"/sys/pk/a/thing/+/{i}/#" for i in range(5000)))
    found.add("/sys/pk/b/thing/measurepoint/resume_reply")
    visited: list[object] = []
    original = dict.get

    class Counting(dict[str, object]):
        def get(self, key: str, default: object = None) -> object:
            visited.append(key)
            return original(self, key, default)

    def instrument(node: object) -> None:
        children = node.children  # type: ignore[attr-defined]
        node.children = Counting(children)  # type: ignore[attr-defined]
        for child in children.values():
            instrument(child)

    instrument(found._root)
    assert found.match("/sys/pk/b/thing/measurepoint/resume_reply") == ["/sys/pk/b/thing/measurepoint/resume_reply"]
    assert len(visited) < 40  # a few lookups per level of B's topic, whatever A holds


@pytest.mark.parametrize("topic_filter", ["a", "/a/b", "+", "#", "a/+/b", "a/#", "/+/+/#", "a//b"])
def test_well_formed_filters(topic_filter: str) -> None:
    assert valid_filter(topic_filter)


@pytest.mark.parametrize("topic_filter", ["", "a/#/b", "a#", "a/b+", "+a", "a/\x00", "##"])
def test_malformed_filters(topic_filter: str) -> None:
    assert not valid_filter(topic_filter)
