"""service/broker/acl.py: a signed-in device owns its /sys/ and /ext/session/ trees and nothing else."""

from __future__ import annotations

import pytest

from service.broker import acl

ME = ("pk", "dk")


@pytest.mark.parametrize(
    "topic",
    ["/sys/pk/dk/thing/measurepoint/resume", "/ext/session/pk/dk/combine/login", "/sys/pk/dk/#", "/sys/pk/dk/+/x"],
)
def test_own_trees_are_allowed(topic: str) -> None:
    assert acl.may_publish(ME, topic)
    assert acl.may_subscribe(ME, topic)
    assert acl.may_receive(ME, topic)


@pytest.mark.parametrize(
    "topic",
    [
        "/sys/pk/other/thing/measurepoint/resume",  # another device
        "/sys/pk/dk2/thing/measurepoint/resume",  # a device whose key merely starts with ours
        "/sys/pk/+/thing/measurepoint/resume_reply",  # a wildcard in the device level is another string
        "/sys/pk/#",
        "/sys/other/dk/x",
        "#",
        "/ext/session/pk/other/x",
        "sys/pk/dk/x",  # no leading slash: not the tree
    ],
)
def test_everything_else_is_refused(topic: str) -> None:
    assert not acl.may_publish(ME, topic)
    assert not acl.may_subscribe(ME, topic)
    assert not acl.may_receive(ME, topic)


def test_anonymous_sessions_are_not_isolated() -> None:
    """Development mode (--allow-anonymous): no identity, so nothing to confine to."""
    assert acl.owns(None, "#")
    assert acl.may_publish(None, "/sys/any/thing")
    assert acl.may_subscribe(None, "/sys/#")
