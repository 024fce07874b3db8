"""Topic names: which request a PUBLISH is, whose device it names, and where its reply goes.

Measurement-point requests are ``/sys/{productKey}/{deviceKey}/thing/measurepoint/{api}[/batch]``; the reply
topic is always the request topic plus ``_reply`` (reference/enos-protocol.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass

_APIS = ("resume", "post")


@dataclass(frozen=True, slots=True)
class RequestTopic:
    """A measurement-point request topic, parsed."""

    topic: str
    product_key: str
    device_key: str
    api: str  # "resume" or "post"
    batch: bool

    @property
    def method(self) -> str:
        """The ``method`` a payload on this topic must carry."""
        return f"thing.measurepoint.{self.api}" + (".batch" if self.batch else "")

    @property
    def reply_topic(self) -> str:
        """Where the answer is published."""
        return self.topic + "_reply"

    @property
    def name(self) -> str:
        """Short label for metrics and logs: ``resume``, ``resume_batch``, ``post``, ``post_batch``."""
        return self.api + ("_batch" if self.batch else "")


def parse_request_topic(topic: str) -> RequestTopic | None:
    """Return the parsed request, or None when the topic is not a measurement-point request."""
    parts = topic.split("/")
    # ['', 'sys', pk, dk, 'thing', 'measurepoint', api] (+ ['batch'])
    if len(parts) not in (7, 8) or parts[0] != "" or parts[1] != "sys":
        return None
    if parts[4] != "thing" or parts[5] != "measurepoint" or parts[6] not in _APIS:
        return None
    batch = len(parts) == 8
    if batch and parts[7] != "batch":
        return None
    if not parts[2] or not parts[3]:
        return None
    return RequestTopic(topic, parts[2], parts[3], parts[6], batch)


@dataclass(frozen=True, slots=True)
class EventTopic:
    """An event post topic, parsed: ``/sys/{productKey}/{deviceKey}/thing/event/{eventId}/post``."""

    topic: str
    product_key: str
    device_key: str
    event_id: str

    batch = False  # one event per request: the envelope decoder reads ``params`` as an object

    @property
    def method(self) -> str:
        """The ``method`` a payload on this topic must carry."""
        return f"thing.event.{self.event_id}.post"

    @property
    def reply_topic(self) -> str:
        """Where the answer is published."""
        return self.topic + "_reply"

    @property
    def name(self) -> str:
        """Label for metrics and logs."""
        return "event"


def parse_event_topic(topic: str) -> EventTopic | None:
    """Return the parsed event post, or None when the topic is not one."""
    parts = topic.split("/")
    # ['', 'sys', pk, dk, 'thing', 'event', eventId, 'post']
    if len(parts) != 8 or parts[0] != "" or parts[1] != "sys" or parts[4] != "thing" or parts[5] != "event":
        return None
    if parts[7] != "post" or not parts[2] or not parts[3] or not parts[6]:
        return None
    return EventTopic(topic, parts[2], parts[3], parts[6])


def device_prefixes(product_key: str, device_key: str) -> tuple[str, str]:
    """The topic prefixes a device owns: its ``/sys/`` and ``/ext/session/`` trees."""
    return f"/sys/{product_key}/{device_key}/", f"/ext/session/{product_key}/{device_key}/"


def valid_topic(topic: str) -> bool:
    """Whether a client may publish on ``topic`` at all: no wildcards, no ``$`` topics, no NUL [MQTT-4.7]."""
    return bool(topic) and "#" not in topic and "+" not in topic and not topic.startswith("$") and "\x00" not in topic


def valid_filter(topic_filter: str) -> bool:
    """Whether a subscription filter is well formed: ``#`` only as the whole last level, ``+`` only as a whole level.

    An empty filter or one with NUL is malformed [MQTT-4.7.3-1, MQTT-4.7.3-2].
    """
    if not topic_filter or "\x00" in topic_filter:
        return False
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):
            return False
        if "+" in level and level != "+":
            return False
    return True
