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
    """An event post topic: ``/sys/{productKey}/{deviceKey}/thing/event/{eventId}/post`` (route ``event_post``)."""

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

    @classmethod
    def of(cls, request: DeviceRequest) -> EventTopic:
        """The event post a request on the ``event_post`` route is (its variable level is the event id)."""
        return cls(request.topic, request.product_key, request.device_key, request.variable)


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


# --- every other request on a device's topics (issue 12) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    """A request pointgate serves on a device's topic tree, besides the four measurement-point ones.

    ``path`` is the topic after ``/{tree}/{productKey}/{deviceKey}/``; a ``+`` level is variable and fills the
    ``{}`` in ``method``. ``sub_device``: a gateway may send it on a sub-device's topic once it logged that
    sub-device in (``combine.login``); otherwise only the device itself may.
    """

    name: str
    tree: str  # "sys" or "ext/session"
    path: str
    method: str
    sub_device: bool = False


# The routing table: a request on a device topic that matches none of these (nor a measurement-point topic) is
# answered 1009 and relayed nowhere. To serve another request: one `Route` here and its handler in
# service/broker/requests.py `handlers`.
ROUTES: tuple[Route, ...] = (
    Route("topo_add", "sys", "thing/topo/add", "thing.topo.add"),
    Route("topo_get", "sys", "thing/topo/get", "thing.topo.get"),
    Route("topo_delete", "sys", "thing/topo/delete", "thing.topo.delete"),
    Route("combine_login", "ext/session", "combine/login", "combine.login"),
    Route("combine_login_batch", "ext/session", "combine/login/batch", "combine.login.batch"),
    Route("combine_logout", "ext/session", "combine/logout", "combine.logout"),
    # a gateway posts a logged-in sub-device's events on the sub-device's topic, as it does its measure points
    Route("event_post", "sys", "thing/event/+/post", "thing.event.{}.post", sub_device=True),
)

# Cloud-to-device topics (reference/enos-protocol.md §3): the device answers on their ``_reply``, never writes them.
DOWNSTREAM: tuple[tuple[str, str], ...] = (
    ("sys", "thing/service/#"),
    ("sys", "thing/model/down_raw"),
    ("sys", "thing/enable"),
    ("sys", "thing/disable"),
    ("sys", "thing/delete"),
    ("sys", "ota/device/upgrade"),
    ("sys", "rrpc/request/+"),
    ("ext/session", "combine/enable"),
    ("ext/session", "combine/disable"),
    ("ext/session", "combine/delete"),
    ("ext/session", "thing/activate/info"),
)


@dataclass(frozen=True, slots=True)
class DeviceRequest:
    """A PUBLISH on a device's ``/sys/…`` or ``/ext/session/…`` tree that is not a measurement-point request.

    ``route`` is None when pointgate does not serve it; ``reply_topic`` is None when the topic is itself a
    ``_reply`` (a device answering a cloud-to-device message: relayed, never answered).
    """

    topic: str
    tree: str
    product_key: str
    device_key: str
    path: str
    route: Route | None
    variable: str = ""
    downstream: bool = False

    @property
    def device(self) -> tuple[str, str]:
        """(productKey, deviceKey) the topic names."""
        return self.product_key, self.device_key

    @property
    def reply_topic(self) -> str | None:
        """Where the answer is published (None for a ``_reply`` topic: it is an answer itself)."""
        return None if self.topic.endswith("_reply") else self.topic + "_reply"

    @property
    def method(self) -> str:
        """The ``method`` a payload on this topic must carry (empty when not served)."""
        return self.route.method.format(self.variable) if self.route is not None else ""

    @property
    def name(self) -> str:
        """Label for metrics and logs: the route's name, ``reply`` or ``unserved``."""
        if self.route is not None:
            return self.route.name
        return "reply" if self.reply_topic is None else "unserved"


def split_device_topic(topic: str) -> tuple[str, str, str, str] | None:
    """``(tree, productKey, deviceKey, path)`` of a topic in a device's ``/sys/`` or ``/ext/session/`` tree."""
    if topic.startswith("/sys/"):
        tree, rest = "sys", topic[5:]
    elif topic.startswith("/ext/session/"):
        tree, rest = "ext/session", topic[13:]
    else:
        return None
    parts = rest.split("/", 2)
    if len(parts) != 3 or not parts[0] or not parts[1] or not parts[2]:
        return None
    return tree, parts[0], parts[1], parts[2]


def _match(pattern: str, path: str) -> str | None:
    """The variable level of ``path`` when it matches ``pattern`` (``""`` without one), else None."""
    want, have = pattern.split("/"), path.split("/")
    if want[-1] == "#":
        return "" if have[: len(want) - 1] == want[:-1] and len(have) >= len(want) else None
    if len(want) != len(have):
        return None
    variable = ""
    for expected, level in zip(want, have, strict=True):
        if expected == "+":
            if not level:
                return None
            variable = level
        elif expected != level:
            return None
    return variable


def parse_topic(topic: str) -> RequestTopic | DeviceRequest | None:
    """What a PUBLISH on ``topic`` is: a measurement-point request, another device request, or None (plain MQTT)."""
    request = parse_request_topic(topic)
    if request is not None:
        return request
    split = split_device_topic(topic)
    if split is None:
        return None
    tree, product_key, device_key, path = split
    for route in ROUTES:
        if route.tree == tree:
            variable = _match(route.path, path)
            if variable is not None:
                return DeviceRequest(topic, tree, product_key, device_key, path, route, variable)
    downstream = any(kind == tree and _match(pattern, path) is not None for kind, pattern in DOWNSTREAM)
    return DeviceRequest(topic, tree, product_key, device_key, path, None, downstream=downstream)


def topic_device(topic: str) -> tuple[str, str] | None:
    """The device whose tree ``topic`` (or a filter) lies in, or None."""
    split = split_device_topic(topic)
    return None if split is None else (split[1], split[2])
