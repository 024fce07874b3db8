"""Who may publish, subscribe to and receive which topic. Pure functions over a device identity.

A signed-in device owns ``/sys/{pk}/{dk}/…`` and ``/ext/session/{pk}/{dk}/…`` and nothing else. Anonymous
sessions (only with ``--allow-anonymous``, a development mode) have no identity and are not isolated.
"""

from __future__ import annotations

from functools import lru_cache

from service.protocol.topics import device_prefixes

Identity = tuple[str, str] | None
"""(productKey, deviceKey) of a signed-in device; None for an anonymous session."""


def owns(identity: Identity, topic: str) -> bool:
    """Whether ``topic`` (or a subscription filter) lies inside the device's own trees."""
    if identity is None:
        return True
    return topic.startswith(_prefixes(identity))


@lru_cache(maxsize=65536)
def _prefixes(identity: tuple[str, str]) -> tuple[str, str]:
    # checked for every message and every delivery: build a device's two prefix strings once
    return device_prefixes(*identity)


def may_publish(identity: Identity, topic: str) -> bool:
    """A device publishes only under its own prefixes."""
    return owns(identity, topic)


def may_subscribe(identity: Identity, topic_filter: str) -> bool:
    """A device subscribes only to filters inside its own prefixes.

    A filter such as ``/sys/pk/dk/#`` stays inside the tree because the prefix is matched literally: a ``+``
    in the product or device level is a different string and is refused.
    """
    return owns(identity, topic_filter)


def may_receive(identity: Identity, topic: str) -> bool:
    """A device never receives another device's messages (checked again at delivery, whatever matched)."""
    return owns(identity, topic)
