"""Subscription filters indexed by topic level, so matching a topic costs its depth, not the number of filters.

amqtt matches every PUBLISH against every filter of every client (reference/amqtt.md §4.2: ~0.45 µs per
subscription per message), so one device holding 50 000 wildcard filters slowed every other device's
traffic to seconds (issue 8 #5). Here filters live in a tree of topic levels: matching walks the topic's
levels and only enters a ``+`` or ``#`` branch that exists at that point. A device's filters all sit
under its own ``/sys/{pk}/{dk}/`` branch (the ACL sees to that), so another device's topics never reach them.

Pure data structure: no I/O, no amqtt.
"""

from __future__ import annotations

_CACHE_TOPICS = 65536


class _Node:
    __slots__ = ("children", "filter")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.filter: str | None = None  # the filter that ends at this node, if one does


class TopicIndex:
    """A set of topic filters that answers "which of them match this topic name"."""

    __slots__ = ("_cache", "_root", "_size")

    def __init__(self) -> None:
        self._root = _Node()
        self._size = 0
        # topic -> matching filters, valid until the next add/discard (replies go to the same topics again and again)
        self._cache: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return self._size

    def __contains__(self, topic_filter: object) -> bool:
        if not isinstance(topic_filter, str):
            return False
        node: _Node | None = self._root
        for level in topic_filter.split("/"):
            node = node.children.get(level) if node is not None else None
        return node is not None and node.filter is not None

    def add(self, topic_filter: str) -> None:
        """Add a (well-formed) filter; adding one already present does nothing."""
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        if node.filter is None:
            node.filter = topic_filter
            self._size += 1
            self._cache.clear()

    def discard(self, topic_filter: str) -> None:
        """Remove a filter if present, and the branches only it used."""
        path: list[tuple[_Node, str]] = []
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                return
            path.append((node, level))
            node = child
        if node.filter is None:
            return
        node.filter = None
        self._size -= 1
        self._cache.clear()
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.children or child.filter is not None:
                break
            del parent.children[level]

    def match(self, topic: str) -> list[str]:
        """Every filter matching the topic name ``topic`` (MQTT 3.1.1 §4.7; ``$`` topics skip leading wildcards).

        The answer is shared with later calls for the same topic: do not modify it.
        """
        found = self._cache.get(topic)
        if found is None:
            if len(self._cache) >= _CACHE_TOPICS:
                self._cache.clear()
            found = self._cache[topic] = self._match(topic)
        return found

    def _match(self, topic: str) -> list[str]:
        levels = topic.split("/")
        depth = len(levels)
        dollar = topic.startswith("$")
        found: list[str] = []
        stack = [(self._root, 0)]
        while stack:
            node, index = stack.pop()
            children = node.children
            wildcards = not (dollar and index == 0)
            if wildcards:
                rest = children.get("#")
                if rest is not None and rest.filter is not None:
                    found.append(rest.filter)  # "a/#" also matches "a" itself
            if index == depth:
                if node.filter is not None:
                    found.append(node.filter)
                continue
            exact = children.get(levels[index])
            if exact is not None:
                stack.append((exact, index + 1))
            if wildcards:
                plus = children.get("+")
                if plus is not None:
                    stack.append((plus, index + 1))
        return found
