"""The amqtt 0.12.1 defects a hostile or broken device can trigger (reference/amqtt.md §5), each fixed in our layer.

Every scenario is a function of a broker port that returns what the clients observed. Each test runs it against
the real service and against stock amqtt configured the same way (`StockBroker`: the same listener and auth
plugin over the same device registry, plus a topic plugin applying pointgate's own ACL), and asserts that the
defect shows on stock and not on pointgate, so each test fails if its override in ``service/broker/overrides.py``
(named in the section title) is removed. Both brokers run the scenario at the same time. The one scenario that
cannot be reproduced deterministically on stock says why in its docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import pytest
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session

from service.broker import acl
from service.broker.config import broker_config
from service.devices.auth import DeviceAuthenticator
from service.devices.secretbox import SecretBox, key_path, load_or_create_key
from tests.integration._login import PK, Login, login, register
from tests.integration._mqtt import (
    CONNACK,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBLISH,
    SUBACK,
    RawClient,
    connect_packet,
    publish_packet,
    subscribe_packet,
)
from tests.support import SAMPLE, Device, RunningService, resume_topic

T = TypeVar("T")

WRONG_PASSWORD = "0" * 64


# --- stock amqtt, configured like pointgate -------------------------------------------------------------------------
class AclPlugin(BaseTopicPlugin):  # type: ignore[misc]  # amqtt ships no type information
    """pointgate's ACL (service/broker/acl.py) as an amqtt topic plugin: stock confines devices as pointgate does."""

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        if session is None or topic is None:
            return False
        device = session.attributes.get("device")
        identity = device if isinstance(device, tuple) else None
        if action == Action.PUBLISH:
            return acl.may_publish(identity, topic)
        if action == Action.SUBSCRIBE:
            return acl.may_subscribe(identity, topic)
        return acl.may_receive(identity, topic)


class StockBroker:
    """Stock `amqtt.broker.Broker` on its own loop thread, with pointgate's config, auth plugin and registry."""

    def __init__(self, running: RunningService, dsn: str) -> None:
        self._config = broker_config(running.settings, mqtt_bind="127.0.0.1:0")
        self._config["plugins"][f"{__name__}.AclPlugin"] = {}
        self._box = SecretBox(load_or_create_key(key_path(running.settings)))
        self._dsn = dsn
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="stock-amqtt", daemon=True)
        self._thread.start()
        self.broker: Broker | None = None
        self._pool: asyncpg.Pool | None = None

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        self._pool = await asyncpg.create_pool(self._dsn, min_size=0, max_size=2)
        self.broker = Broker(self._config)
        # the very authenticator pointgate uses; plugins.DeviceAuthPlugin finds it on the broker
        self.broker.authenticator = DeviceAuthenticator(self._pool, self._box, allow_anonymous=True)
        await self.broker.start()

    async def _stop(self) -> None:
        if self.broker is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.broker.shutdown(), 5)
        if self._pool is not None:
            await asyncio.wait_for(self._pool.close(), 5)

    def start(self) -> StockBroker:
        self.call(self._start())
        return self

    def stop(self) -> None:
        try:
            self.call(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    @property
    def port(self) -> int:
        assert self.broker is not None
        port: int = self.broker._servers["default"].instance.sockets[0].getsockname()[1]
        return port


@dataclass
class Brokers:
    """pointgate and stock amqtt side by side, sharing the device registry."""

    pointgate: RunningService
    stock: StockBroker

    def register(self, dk: str, *, prefix: str | None = None) -> Login:
        """Register device ``dk`` (product `PK`) and return its login (``prefix``: the id part of its client id)."""
        secret = f"secret-of-{dk}"
        register(self.pointgate, dk, secret)
        return login(dk, secret, prefix=prefix)

    def both(self, scenario: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, T]:
        """Run ``scenario(port, ...)`` on pointgate and on stock at the same time: (pointgate's, stock's)."""
        with ThreadPoolExecutor(2) as pool:
            ours = pool.submit(scenario, self.pointgate.port, *args, **kwargs)
            theirs = pool.submit(scenario, self.stock.port, *args, **kwargs)
            return ours.result(60), theirs.result(60)


@pytest.fixture
def make_brokers(start_service: Callable[..., RunningService], migrated_dsn: str) -> Iterator[Callable[..., Brokers]]:
    """Factory: pointgate started with setting overrides, and stock amqtt configured like it."""
    stocks: list[StockBroker] = []

    def make(**overrides: Any) -> Brokers:
        running = start_service(**overrides)
        stock = StockBroker(running, migrated_dsn)
        stocks.append(stock)
        return Brokers(running, stock.start())

    yield make
    for stock in stocks:
        stock.stop()


@pytest.fixture
def brokers(make_brokers: Callable[..., Brokers]) -> Brokers:
    """pointgate with the test defaults (anonymous allowed, 2 s CONNECT timeout), and stock amqtt."""
    return make_brokers()


def connected(port: int, creds: Login | None = None, client_id: str = "watcher", **options: Any) -> Device:
    """A connected paho device, signed in with ``creds`` or anonymous."""
    if creds is None:
        dev = Device(port, client_id, **options)
    else:
        dev = Device(port, creds.client_id, username=creds.username, password=creds.password, **options)
    assert dev.connect() == 0
    return dev


def received(dev: Device, topics: set[str], timeout: float) -> tuple[str, bytes, int] | None:
    """The first message ``dev`` got on any of ``topics`` within ``timeout``, or None."""
    deadline = time.monotonic() + timeout
    while True:
        found = next((m for m in list(dev.messages) if m[0] in topics), None)
        if found is not None or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def own_topic(dk: str, name: str = "x") -> str:
    """A topic in device ``dk``'s own tree that is relayed like any MQTT message: a device's answer to a
    cloud-to-device service call (requests on a device's tree are answered, never relayed)."""
    return f"/sys/{PK}/{dk}/thing/service/{name}_reply"


# --- 1. keep-alive (H2) ---------------------------------------------------------------------------------------------
def silent_device(port: int, creds: Login, *, stall: bytes, watch: float) -> tuple[float | None, bytes | None]:
    """A device with keep-alive 2 s and a Will sends ``stall`` after CONNECT, then nothing: (closed after, Will)."""
    will_topic = own_topic("ka", "will")
    watcher = connected(port)
    raw = RawClient(port)
    try:
        watcher.subscribe(will_topic)
        assert raw.connect(connect_packet(creds.client_id, creds, keepalive=2, will=(will_topic, b"gone"))) == 0
        raw.send(stall)
        closed_after = raw.wait_closed(watch)
        will = received(watcher, {will_topic}, 1.0)
        return closed_after, None if will is None else will[1]
    finally:
        raw.close()
        watcher.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "stall",
    [b"", publish_packet(own_topic("ka"), b"x" * 100)[:20]],
    ids=["silent-after-connect", "silent-mid-packet"],
)
def test_keepalive_is_enforced_and_the_will_sent(brokers: Brokers, stall: bytes) -> None:
    """A device silent for 1.5 × its keep-alive (even mid-packet) is disconnected and its Will published."""
    creds = brokers.register("ka")
    ours, stock = brokers.both(silent_device, creds, stall=stall, watch=5.0)
    assert stock == (None, None)  # amqtt: still connected after 5 s, no Will
    closed_after, will = ours
    assert closed_after is not None and 2.5 <= closed_after <= 4.0
    assert will == b"gone"


# --- 2. CONNECT timeout (B1) ----------------------------------------------------------------------------------------
def idle_socket(port: int, *, watch: float) -> float | None:
    """A TCP connection that never sends CONNECT: seconds until the broker closed it (None: still open)."""
    raw = RawClient(port)
    try:
        return raw.wait_closed(watch)
    finally:
        raw.close()


@pytest.mark.slow
def test_connection_without_connect_is_closed_after_connect_timeout(brokers: Brokers) -> None:
    """A connection that sends no CONNECT within connect_timeout (2 s here) is closed."""
    ours, stock = brokers.both(idle_socket, watch=4.0)
    assert stock is None
    assert ours is not None and 1.5 <= ours <= 3.0


# --- 3. retained messages on connect (B4) ---------------------------------------------------------------------------
def retained_on_connect(port: int, owner: Login, other: Login) -> list[str]:
    """``owner`` subscribes to and retains a message on its own topic; the topics ``other`` gets on connecting."""
    topic = own_topic("ret-a")
    dev_a = connected(port, owner)
    try:
        dev_a.subscribe(topic)
        dev_a.client.publish(topic, b"private", qos=1, retain=True).wait_for_publish(5)
        dev_a.wait_message(topic)
        dev_c = connected(port, other)
        try:
            time.sleep(1.0)
            return [t for t, _, _ in dev_c.messages]
        finally:
            dev_c.close()
    finally:
        dev_a.close()


def test_retained_messages_go_only_to_own_subscriptions_on_connect(brokers: Brokers) -> None:
    """A device connecting without subscribing receives no retained message of another device."""
    owner, other = brokers.register("ret-a"), brokers.register("ret-c")
    ours, stock = brokers.both(retained_on_connect, owner, other)
    assert stock == [own_topic("ret-a")]  # amqtt pushed device A's data to device C
    assert ours == []


# --- 4. a refused CONNECT reusing a live device's client id (B2) ----------------------------------------------------
def refused_takeover(port: int, victim: Login, *, clean: bool) -> tuple[int, bool, bool, bool, int | None]:
    """A wrong-password CONNECT with the victim's client id (and a Will in its tree) while the victim is online.

    Returns (attacker's CONNACK code, victim kicked off, forged Will published, victim still gets its
    messages, the victim's next request's reply code).
    """
    topic, will_topic = own_topic("victim"), own_topic("victim", "will")
    request = resume_topic(PK, "victim")
    dev = connected(port, victim)
    watcher = connected(port)
    raw = RawClient(port)
    try:
        dev.subscribe(topic)
        dev.subscribe(request + "_reply")
        watcher.subscribe(will_topic)
        attack = connect_packet(victim.client_id, victim, password=WRONG_PASSWORD, clean=clean, will=(will_topic, b"x"))
        code = raw.connect(attack)
        time.sleep(1.0)  # time for a take-over, and a Will, to happen
        kicked = dev.disconnected.is_set()
        forged = received(watcher, {will_topic}, 0) is not None
        dev.publish(topic, b"still here", qos=1)
        still_served = received(dev, {topic}, 2.0) is not None
        dev.publish(request, SAMPLE, qos=1)
        reply = received(dev, {request + "_reply"}, 2.0)
        return code, kicked, forged, still_served, None if reply is None else json.loads(reply[1])["code"]
    finally:
        raw.close()
        watcher.close()
        dev.close()


@pytest.mark.slow
def test_refused_clean_connect_does_not_wipe_a_live_devices_subscriptions(brokers: Brokers) -> None:
    """A wrong-password clean-session CONNECT with a live device's client id leaves its subscriptions intact."""
    victim = brokers.register("victim")
    ours, stock = brokers.both(refused_takeover, victim, clean=True)
    assert stock[:4] == (5, False, False, False)  # amqtt: refused, yet the victim's subscriptions are gone
    assert ours == (5, False, False, True, 200)


@pytest.mark.slow
def test_refused_persistent_connect_neither_kicks_nor_plants_a_will(brokers: Brokers) -> None:
    """A wrong-password persistent CONNECT with a live device's client id neither kicks it nor plants a Will."""
    victim = brokers.register("victim")
    ours, stock = brokers.both(refused_takeover, victim, clean=False)
    assert stock[:3] == (5, True, True)  # amqtt: refused, yet the victim is kicked and the attacker's Will sent
    assert ours == (5, False, False, True, 200)


# --- 5. Wills and the publish ACL (B5) ------------------------------------------------------------------------------
def will_elsewhere(
    port: int, sender: Login, watcher: Login | None, will_topic: str
) -> tuple[int, tuple[str, bytes] | None]:
    """``sender`` connects with a Will on ``will_topic`` and drops: (its CONNACK, what a subscriber to it got)."""
    forged = json.dumps({"id": "1", "code": 200, "message": "", "data": {}}).encode()
    dev = connected(port, watcher)
    raw = RawClient(port)
    try:
        dev.subscribe(will_topic)
        code = raw.connect(connect_packet(sender.client_id, sender, will=(will_topic, forged)))
        raw.close()  # no DISCONNECT: the Will is due
        got = received(dev, {will_topic}, 1.5)
        return code, None if got is None else got[:2]
    finally:
        raw.close()
        dev.close()


@pytest.mark.parametrize(
    ("will_topic", "watcher_dk", "stock_delivers"),
    [(resume_topic(PK, "will-b") + "_reply", "will-b", True), (f"/sys/{PK}/will-a/#", None, False)],
    ids=["another-devices-reply-topic", "wildcard-topic"],
)
def test_will_no_publish_could_carry_is_refused(
    brokers: Brokers, will_topic: str, watcher_dk: str | None, stock_delivers: bool
) -> None:
    """A Will on another device's topic, or with wildcards, refuses the CONNECT; nothing is ever delivered."""
    sender = brokers.register("will-a")
    watcher = None if watcher_dk is None else brokers.register(watcher_dk)
    ours, stock = brokers.both(will_elsewhere, sender, watcher, will_topic)
    # amqtt accepts both: the forged reply reaches device B; the wildcard Will fails only when sent (an error log)
    code, got = stock
    assert code == 0 and (got is not None and got[0] == will_topic) == stock_delivers
    assert ours == (5, None)


# --- 6. sessions: clean-session take-over, clean sessions resumed, client ids reused (B3, B10) ----------------------
def second_connection(port: int, creds: Login) -> tuple[int, float | None, bool]:
    """Connect twice with the same client id (clean session): (2nd CONNACK, 1st closed after, 2nd answers PINGREQ)."""
    first, second = RawClient(port), RawClient(port)
    try:
        assert first.connect(connect_packet(creds.client_id, creds)) == 0
        code = second.connect(connect_packet(creds.client_id, creds))
        closed_after = first.wait_closed(2.0)
        second.send(PINGREQ)
        pong = second.read_packet(2.0)
        return code, closed_after, pong is not None and pong[0] == PINGRESP
    finally:
        first.close()
        second.close()


def test_clean_session_takeover_closes_the_old_connection(brokers: Brokers) -> None:
    """A second clean-session CONNECT with the same client id closes the first connection."""
    creds = brokers.register("twice")
    ours, stock = brokers.both(second_connection, creds)
    assert stock == (0, None, True)  # amqtt: the first connection is left open, an orphan
    code, closed_after, usable = ours
    assert code == 0 and closed_after is not None and closed_after < 1.0 and usable


def clean_then_persistent(port: int, creds: Login) -> tuple[int, bool]:
    """Subscribe in a clean session, leave, reconnect at once persistent: (session-present flag, old sub still on)."""
    topic = own_topic("sp")
    dev = connected(port, creds)
    dev.subscribe(topic)
    dev.close()
    raw = RawClient(port)
    try:
        raw.send(connect_packet(creds.client_id, creds, clean=False))
        connack = raw.read_packet(5)
        assert connack is not None and connack[0] == CONNACK and connack[1][1] == 0
        raw.send(publish_packet(topic, b"for the old subscription"))
        raw.send(PINGREQ)
        while (packet := raw.read_packet(2.0)) is not None and packet[0] != PINGRESP:
            pass
        return connack[1][0] & 0x01, bool(raw.received(PUBLISH))
    finally:
        raw.close()


def test_clean_session_is_not_resumed_by_a_persistent_reconnect(brokers: Brokers) -> None:
    """A persistent CONNECT right after a clean session ended starts afresh: session-present 0, no old subscription.

    Not run on stock: there the outcome depends on whether amqtt's session monitor (a 1 s loop) dropped the
    clean session between the two connections, so it would be a race, not a reproduction.
    """
    creds = brokers.register("sp")
    assert clean_then_persistent(brokers.pointgate.port, creds) == (0, False)


def same_client_id(port: int, first: Login, second: Login, *, clean: bool) -> tuple[int, bool, bool]:
    """``second`` (another device) connects with ``first``'s client id: (its CONNACK, first kicked, first served)."""
    topic = own_topic("cid-a")
    dev_a = connected(port, first)
    dev_b = Device(port, second.client_id, username=second.username, password=second.password, clean_session=clean)
    try:
        dev_a.subscribe(topic)
        code = dev_b.connect()
        time.sleep(1.0)  # time for a take-over to happen
        dev_a.publish(topic, b"mine", qos=1)
        return code, dev_a.disconnected.is_set(), received(dev_a, {topic}, 2.0) is not None
    finally:
        dev_b.close()
        dev_a.close()


@pytest.mark.slow
@pytest.mark.parametrize("clean", [True, False], ids=["clean", "persistent"])
def test_another_device_reusing_a_client_id_does_not_touch_the_session(brokers: Brokers, clean: bool) -> None:
    """A device connecting with another device's client id neither kicks it nor takes or wipes its session."""
    first, second = brokers.register("cid-a", prefix="shared"), brokers.register("cid-b", prefix="shared")
    assert first.client_id == second.client_id
    ours, stock = brokers.both(same_client_id, first, second, clean=clean)
    # amqtt keys sessions by client id alone: the first device is kicked (persistent) or its subscriptions wiped
    assert stock == (0, not clean, False)
    assert ours == (0, False, True)


# --- 7. $-topic publish (B6) ----------------------------------------------------------------------------------------
def dollar_publish(port: int) -> tuple[bool, list[int], bool]:
    """PUBLISH QoS 1 to ``$SYS/x``, then to a watched topic: (closed, PUBACKed ids, second message delivered)."""
    topic = own_topic("zombie")
    watcher = connected(port)
    raw = RawClient(port)
    try:
        watcher.subscribe(topic)
        assert raw.connect(connect_packet("zombie")) == 0
        raw.send(publish_packet("$SYS/x", b"1", qos=1, packet_id=1))
        raw.read_packet(0.5)
        raw.send(publish_packet(topic, b"2", qos=1, packet_id=2))
        closed = raw.wait_closed(1.0) is not None
        acked = [int.from_bytes(body[:2], "big") for body in raw.received(PUBACK)]
        return closed, acked, received(watcher, {topic}, 0.5) is not None
    finally:
        raw.close()
        watcher.close()


def test_dollar_topic_publish_closes_the_connection(brokers: Brokers) -> None:
    """A PUBLISH to a ``$`` topic closes the connection instead of leaving a zombie that acks and drops data."""
    ours, stock = brokers.both(dollar_publish)
    assert stock == (False, [1, 2], False)  # amqtt: both PUBACKed, the second silently dropped
    assert ours == (True, [], False)


# --- 8. malformed packets (H3) --------------------------------------------------------------------------------------
MALFORMED = {
    "wildcard-topic": publish_packet("/sys/a/#", b""),
    # over the packet limit (skipped unread by pointgate) and carrying a packet amqtt then parses as if sent
    "oversized-wildcard-topic": publish_packet(resume_topic("+", "x"), publish_packet("/y", b"y" * 600_000)),
    "qos-3": publish_packet("/sys/a/b", b"x", qos=3),
    "bad-remaining-length": b"\x30\xff\xff\xff\xff",
}


def malformed(port: int, packet: bytes) -> tuple[bool, bool]:
    """Send ``packet`` then PINGREQ: (connection closed, PINGRESP received)."""
    raw = RawClient(port)
    try:
        assert raw.connect(connect_packet("malformed")) == 0
        raw.send(packet)
        raw.send(PINGREQ)
        closed = raw.wait_closed(1.5) is not None
        return closed, bool(raw.received(PINGRESP))
    finally:
        raw.close()


@pytest.mark.parametrize("packet", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_packet_closes_the_connection(brokers: Brokers, packet: bytes) -> None:
    """A malformed packet closes the connection rather than being skipped (or desynchronising the stream)."""
    ours, stock = brokers.both(malformed, packet)
    assert stock == (False, True)  # amqtt: "Message discarded", the connection carries on
    assert ours == (True, False)


# --- 9. QoS downgrade (B7) ------------------------------------------------------------------------------------------
def delivered_qos(port: int) -> int | None:
    """A QoS 1 subscriber's copy of a QoS 0 publish: the QoS it arrived with."""
    topic = own_topic("qos")
    sub, pub = connected(port, client_id="sub"), connected(port, client_id="pub")
    try:
        sub.subscribe(topic, qos=1)
        pub.publish(topic, b"qos0", qos=0)
        got = received(sub, {topic}, 3.0)
        return None if got is None else got[2]
    finally:
        sub.close()
        pub.close()


def test_qos_is_downgraded_to_the_publish_qos(brokers: Brokers) -> None:
    """A QoS 0 publish reaches a QoS 1 subscriber as QoS 0 (min of publish and subscription)."""
    ours, stock = brokers.both(delivered_qos)
    assert stock == 1
    assert ours == 0


# --- 10. packet size (H4) -------------------------------------------------------------------------------------------
def oversized_request(port: int, size: int) -> tuple[int | None, int | None, int | None]:
    """Publish ``size`` bytes on a request topic (also subscribed), then a valid request.

    Returns (code replied to the big one, size of the big one as relayed back, code replied to the next one).
    """
    topic = resume_topic(PK, "big")
    dev = connected(port, client_id="big")
    try:
        dev.subscribe(topic + "_reply")
        dev.subscribe(topic)
        dev.publish(topic, b"{" + b" " * (size - 2) + b"}", qos=1)
        got = received(dev, {topic, topic + "_reply"}, 3.0)
        code = json.loads(got[1])["code"] if got is not None and got[0] == topic + "_reply" else None
        relayed = len(got[1]) if got is not None and got[0] == topic else None
        dev.messages.clear()
        dev.publish(topic, SAMPLE, qos=1)
        after = received(dev, {topic + "_reply"}, 2.0)
        return code, relayed, None if after is None else json.loads(after[1])["code"]
    finally:
        dev.close()


@pytest.mark.parametrize("size", [4096, 100_000], ids=["over-payload-limit", "over-packet-limit"])
def test_oversized_request_gets_1008_and_the_connection_stays_usable(
    make_brokers: Callable[..., Brokers], size: int
) -> None:
    """A request over max_payload_bytes is answered 1008 (never stored or relayed); the next request gets 200."""
    brokers = make_brokers(max_payload_bytes=2048)
    ours, stock = brokers.both(oversized_request, size)
    assert stock == (None, size, None)  # amqtt: no limit, the whole payload accepted and relayed
    assert ours == (1008, None, 200)


ABSURD = {  # packet, what stock amqtt answers to it and to the PINGREQ after it
    "8MiB-publish": (publish_packet("/big/topic", b"x" * (8 << 20), qos=1), {PUBACK, PINGRESP}),
    "1MiB-subscribe": (subscribe_packet(1, [(f"/f{i}" + "x" * 65000, 0) for i in range(16)]), {SUBACK, PINGRESP}),
    "256MiB-announced": (b"\x32\xff\xff\xff\x7f", set()),  # amqtt waits for all of it to arrive
}


def absurd_packet(port: int, packet: bytes) -> tuple[bool, set[int]]:
    """Send ``packet`` then PINGREQ: (connection closed, types of the packets that came back)."""
    raw = RawClient(port)
    try:
        assert raw.connect(connect_packet("absurd")) == 0
        raw.send(packet)
        raw.send(PINGREQ)
        closed = raw.wait_closed(3.0) is not None
        return closed, {kind for kind, _ in raw.packets[1:]}
    finally:
        raw.close()


@pytest.mark.slow
@pytest.mark.parametrize(("packet", "stock_answers"), ABSURD.values(), ids=ABSURD.keys())
def test_absurdly_large_packets_close_the_connection(brokers: Brokers, packet: bytes, stock_answers: set[int]) -> None:
    """A packet far beyond the limit (8 MiB PUBLISH, 1 MiB SUBSCRIBE, 256 MiB announced) closes the connection."""
    ours, stock = brokers.both(absurd_packet, packet)
    assert stock == (False, stock_answers)  # amqtt reads (or waits for) all of it, and answers it
    assert ours == (True, set())


# --- 11. PUBACK only after commit (H1) ------------------------------------------------------------------------------
def unacked_while_database_down(port: int) -> tuple[float | None, bool]:
    """A QoS 1 resume: (seconds until its PUBACK, None if none within 2 s; the connection still answers PINGREQ)."""
    raw = RawClient(port)
    try:
        assert raw.connect(connect_packet("h1")) == 0
        start = time.monotonic()
        raw.send(publish_packet(resume_topic(PK, "h1"), json.dumps(SAMPLE).encode(), qos=1, packet_id=7))
        puback = None
        while time.monotonic() - start < 2.0 and puback is None:
            packet = raw.read_packet(2.0 - (time.monotonic() - start))
            if packet is not None and packet[0] == PUBACK:
                puback = time.monotonic() - start
        raw.send(PINGREQ)
        pong = raw.read_packet(2.0)
        return puback, pong is not None and pong[0] == PINGRESP
    finally:
        raw.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_puback_waits_for_the_commit(make_brokers: Callable[..., Brokers]) -> None:
    """With the database unreachable a QoS 1 resume gets no PUBACK, and the device stays connected."""
    brokers = make_brokers(database_url=f"postgresql://pointgate@127.0.0.1:{closed_port()}/none", drain_timeout=1.0)
    ours, stock = brokers.both(unacked_while_database_down)
    assert stock[0] is not None and stock[0] < 0.5 and stock[1]  # amqtt acks data nothing has stored
    assert ours == (None, True)


def test_subscribe_does_not_render_every_subscription(service: RunningService) -> None:
    """B11: the subscription map's repr stays constant-size, so amqtt's per-SUBSCRIBE debug string costs O(1)."""
    devices = [Device(service.port, f"dev{i}") for i in range(20)]
    try:
        for index, dev in enumerate(devices):
            assert dev.connect() == 0
            assert dev.subscribe(f"/sys/inverter01/dev{index}/thing/measurepoint/resume_reply") == [1]
        broker = service.service.broker
        assert broker is not None and len(broker._subscriptions) == 20
        assert repr(broker._subscriptions) == "<20 subscription filters>"  # stock amqtt renders all 20 sessions
    finally:
        for dev in devices:
            dev.close()
