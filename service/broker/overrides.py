"""Every override of amqtt 0.12.1 internals, in one place, each naming the upstream defect it fixes.

amqtt is pinned exactly (pyproject) because this module subclasses its private classes. Each fix has a test in
``tests/integration/test_hardening.py`` that fails on stock amqtt. References are to
``shared/reference/amqtt.md``. After CONNECT a device's connection is a `service.broker.connection.Connection`
(the lean packet path: H1–H4, strict framing and the per-connection limits are documented there).

Connection (service/broker/connection.py):
  H1  PUBACK only after commit, in arrival order, after the request's reply (§1.7).
  H2  keep-alive enforced (§5 #1): no bytes for 1.5 × keep-alive closes the connection, and the Will is sent.
  H3  malformed packets close the connection at once (§5 #7, issue 8): every packet type framed strictly.
  H4  packet size limit (§2.6): an oversized PUBLISH is skipped without buffering it and answered with 1008 on
      its reply topic when it is a request topic; anything else oversized closes the connection.

Broker:
  B1  CONNECT timeout (§5 #2), and a CONNECT read strictly: anything but a well-formed CONNECT as the first
      packet closes the socket at once (issue 8 #1: amqtt left it to the garbage collector).
  B2  authentication before any session is touched (§5 #4, #4b): a refused CONNECT can no longer delete, take
      over or kick a live device's session, nor plant a Will.
  B3  clean-session take-over closes the old connection (§5 #5), as persistent take-over already did; a clean
      session is never resumed by a persistent CONNECT that comes before the session monitor dropped it.
  B4  retained messages on connect only for the session's own subscriptions (§5 #3), never other clients'.
  B5  Wills obey the publish ACL (§5 #4c) and the topic-name rules: checked at CONNECT (refused) and again when
      published.
  B6  a ``$``/wildcard topic PUBLISH closes the connection (§5 #6) instead of leaving a zombie.
  B7  QoS downgraded to min(publish, subscription) (§5 #8); subscriptions are granted at most QoS 1.
  B8  fan-out looks topics up in a tree of topic levels (subscriptions.TopicIndex) instead of matching every
      subscription of every client (§4.2, issue 8 #5), and delivers synchronously to each connection: no
      broadcast queue, no task per delivery.
  B9  topic ACL and measurement-point ingest are direct calls: amqtt's plugin dispatch makes one task per
      plugin per message (§1.3), which the hot path cannot afford.
  B10 sessions are keyed by device and client id: amqtt keys them by the client id alone, which the device
      chooses, so another device could take over a session (and its queued replies) by reusing the id.
  B11 the subscription map's repr is constant-size (amqtt rendered it on every SUBSCRIBE: O(N²) connects).
  B12 lean sessions (issue 7 #4): no ``transitions`` state machine and no queues until one is needed.
  B13 persistent sessions of devices that never return expire (``session_expiry``), counted as a limit hit;
      the offline queue of a persistent session is bounded in bytes like a connection's.

Workers (``serve --workers N``, service/supervisor.py):
  W1  ``session_events`` hears each device session begin and end, and `PointgateBroker.evict_session` closes a
      session that reconnected on another worker: take-over across processes, relayed by the supervisor.
  W2  with ``reuse_port`` the TCP listeners bind with SO_REUSEPORT, so every worker listens on the same port.

Gateways (issue 12, service/broker/gateways.py):
  G1  a sub-device logged in through a gateway connection lends it its topics: the gateway may subscribe to
      them (subscription limits count per tree) and receives what is delivered on them while the session lasts.
      Its subscriptions there outlive the session (the SDKs cache what they subscribed), but deliver nothing
      until the sub-device is logged in again: delivery checks the session every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from math import floor
from typing import TYPE_CHECKING, Any, Protocol

from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.contexts import Action, ListenerConfig, ListenerType
from amqtt.errors import AMQTTError
from amqtt.events import BrokerEvents
from amqtt.session import Session
from amqtt.utils import gen_client_id

from service.broker import acl
from service.broker.connection import (
    Connection,
    LimitExceeded,
    Limits,
    RequestHandler,
    RequestRouter,
)
from service.broker.subscriptions import TopicIndex
from service.ops import metrics
from service.protocol.activation import activate_info, activate_info_topic
from service.protocol.topics import topic_device, valid_filter, valid_topic

if TYPE_CHECKING:
    from amqtt.adapters import ReaderAdapter, WriterAdapter

log = logging.getLogger("pointgate.broker")

# CONNACK return codes [MQTT-3.2.2.3]
_ACCEPTED, _BAD_PROTOCOL, _BAD_ID, _BAD_LOGIN, _NOT_AUTHORIZED = 0, 1, 2, 4, 5


def connack(code: int, session_present: bool = False) -> bytes:
    """A CONNACK packet."""
    return bytes((0x20, 2, 1 if session_present else 0, code))


class _State:
    """What amqtt reads of a session's ``transitions`` machine (B12: the machine itself cost ~12 KB a session)."""

    __slots__ = ("_session", "state")

    def __init__(self, session: Session) -> None:
        self._session = session
        self.state = "new"

    def is_connected(self) -> bool:
        return self.state == "connected"

    def connect(self) -> None:
        if self.state == "connected":
            raise RuntimeError("session already connected")
        self.state = "connected"
        self._session.last_connect_time = floor(time.time())
        self._session.last_disconnect_time = None

    def disconnect(self) -> None:
        self.state = "disconnected"
        self._session.last_disconnect_time = floor(time.time())


class PointgateSession(Session):
    """amqtt's `Session` without the state machine and with queues created on first use (B12)."""

    def __init__(self) -> None:  # amqtt's __init__ builds what B12 avoids: not calling it is deliberate
        self.transitions = _State(self)
        self.remote_address: str | None = None
        self.remote_port: int | None = None
        self.client_id: str | None = None
        self.clean_session: bool | None = None
        self.will_flag = False
        self.will_message: bytes | None = None
        self.will_qos: int | None = None
        self.will_retain: bool | None = None
        self.will_topic: str | None = None
        self.keep_alive = 0
        self.publish_retry_delay = 0
        self.broker_uri = None
        self.username: str | None = None
        self.password: str | None = None
        self.cafile = self.capath = self.cadata = None
        self._packet_id = 0
        self.parent = 0
        self.last_connect_time: int | None = None
        self.ssl_object: Any = None
        self.last_disconnect_time: int | None = None
        self.attributes: dict[str, Any] = {}
        self.inflight_out: dict[int, Any] = {}
        self.inflight_in: dict[int, Any] = {}
        self.is_anonymous = False
        # offline queue of a persistent session: (topic, data, qos), bounded in bytes
        self.offline: deque[tuple[str, bytes, int]] | None = None
        self.offline_bytes = 0

    @property
    def retained_messages(self) -> asyncio.Queue[Any]:
        """amqtt's offline queue; unused here (`offline` replaces it), so always empty."""
        return asyncio.Queue()

    @property
    def delivered_message_queue(self) -> asyncio.Queue[Any]:
        """amqtt's incoming queue; unused here (the connection hands messages on directly)."""
        return asyncio.Queue()

    def clear_queues(self) -> None:
        self.offline = None
        self.offline_bytes = 0


class ConnectRefused(Exception):
    """A first packet that is not an acceptable CONNECT; ``reply`` is the CONNACK to send first, if any."""

    def __init__(self, reason: str, reply: bytes | None = None) -> None:
        super().__init__(reason)
        self.reply = reply


async def read_connect(reader: asyncio.StreamReader, max_bytes: int) -> PointgateSession:
    """Read and check the first packet (B1, MQTT 3.1.1 §3.1); a session for it, or `ConnectRefused`."""
    first = (await reader.readexactly(1))[0]
    if first != 0x10:
        raise ConnectRefused(f"first packet is not a CONNECT (byte {first:#04x}) [MQTT-3.1.0-1]")
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift > 21:
            raise ConnectRefused("malformed remaining length")
    if length > max_bytes:
        raise ConnectRefused(f"CONNECT of {length} bytes")
    body = await reader.readexactly(length)
    at = 0

    def field() -> bytes:
        nonlocal at
        if at + 2 > len(body):
            raise ConnectRefused("CONNECT field runs past the packet")
        end = at + 2 + int.from_bytes(body[at : at + 2], "big")
        if end > len(body):
            raise ConnectRefused("CONNECT field runs past the packet")
        value, at = body[at + 2 : end], end
        return value

    def text() -> str:
        try:
            return field().decode("utf-8")
        except UnicodeDecodeError:
            raise ConnectRefused("CONNECT string is not valid UTF-8") from None

    name = text()
    if at + 4 > len(body):
        raise ConnectRefused("CONNECT variable header runs past the packet")
    level, flags = body[at], body[at + 1]
    keep_alive = int.from_bytes(body[at + 2 : at + 4], "big")
    at += 4
    if name != "MQTT":
        raise ConnectRefused(f"protocol name {name!r} [MQTT-3.1.2-1]")
    if level != 4:
        raise ConnectRefused(f"protocol level {level}", connack(_BAD_PROTOCOL))
    if flags & 0x01:
        raise ConnectRefused("CONNECT reserved flag set [MQTT-3.1.2-3]")
    will, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 0x03, bool(flags & 0x20)
    if will_qos == 3 or (not will and (will_qos or will_retain)):
        raise ConnectRefused("CONNECT Will flags inconsistent [MQTT-3.1.2-13..15]")
    has_user, has_password = bool(flags & 0x80), bool(flags & 0x40)
    if has_password and not has_user:
        raise ConnectRefused("password without user name [MQTT-3.1.2-22]", connack(_BAD_LOGIN))
    session = PointgateSession()
    session.clean_session = bool(flags & 0x02)
    session.client_id = text()
    if not session.client_id and not session.clean_session:
        raise ConnectRefused("empty client id with a persistent session [MQTT-3.1.3-8]", connack(_BAD_ID))
    if will:
        session.will_flag = True
        session.will_topic = text()
        session.will_message = field()
        session.will_qos = will_qos
        session.will_retain = will_retain
    if has_user:
        session.username = text()
    if has_password:
        session.password = text()
    if at != len(body):
        raise ConnectRefused("CONNECT has bytes after its payload")
    session.keep_alive = keep_alive
    return session


class SessionEvents(Protocol):
    """Who hears that a session began or ended on this broker (W1; service/supervisor.py in a worker).

    ``connection`` identifies one connection of the session (a persistent session outlives its connections):
    hand it back to `PointgateBroker.evict_session`.
    """

    def connected(self, client_id: str, connection: object, clean: bool) -> None:
        """A device's session is now connected here (called before its CONNACK leaves)."""

    def disconnected(self, client_id: str, connection: object, clean: bool) -> None:
        """That connection ended; with ``clean`` False the session stays on this broker."""


class PointgateBroker(Broker):
    """amqtt's Broker with B1–B13; each connection runs as a `Connection`."""

    def __init__(
        self,
        config: dict[str, Any],
        *,
        connect_timeout: float,
        max_packet_bytes: int,
        limits: Limits | None = None,
        session_expiry: float | None = None,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(config)
        self.connect_timeout = connect_timeout
        self.reuse_port = reuse_port  # W2
        self.session_events: SessionEvents | None = None  # W1
        self.max_packet_bytes = max_packet_bytes
        base = limits or Limits()
        self.limits = Limits(
            max_packet_bytes=max_packet_bytes,
            max_inflight=base.max_inflight,
            max_queued_bytes=base.max_queued_bytes,
            max_subscriptions=base.max_subscriptions,
            max_wildcard_subscriptions=base.max_wildcard_subscriptions,
            max_qos2_inflight=base.max_qos2_inflight,
        )
        self.session_expiry = session_expiry
        self.ingest: RequestHandler | None = None
        self.requests: RequestRouter | None = None  # every other device request (service/broker/requests.py)
        self.gateway_sessions: Any = None  # service.broker.gateways.SubDeviceSessions (G1)
        # where the ingest's points go (service.storage.writer.PointWriter): while it is full, connections stop
        # reading requests, so the queue in front of PostgreSQL stays bounded whatever the number of devices
        self.points: Any = None
        self._held: set[Connection] = set()
        self._resumer: asyncio.Task[None] | None = None
        self.authenticator: Any = None  # service.devices.auth.DeviceAuthenticator, used by plugins.DeviceAuthPlugin
        self._subscriptions = _Subscriptions()
        self._index = TopicIndex()
        self._session_filters: dict[str, dict[str, int]] = {}  # client id -> {filter: granted qos}
        # ops hook (service/devices/presence.py): told of each signed-in device's connect and disconnect
        self.on_session: Callable[[bool, Session], None] | None = None

    # B1 ------------------------------------------------------------------------------------------------
    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[Connection, Session]:
        stream_reader: asyncio.StreamReader = reader._reader
        stream_writer: asyncio.StreamWriter = writer._writer
        try:
            session = await asyncio.wait_for(read_connect(stream_reader, self.max_packet_bytes), self.connect_timeout)
        except BaseException as exc:
            # whatever went wrong, the socket is released now, not when a garbage collection finds it
            if isinstance(exc, ConnectRefused) and exc.reply is not None:
                with contextlib.suppress(Exception):
                    stream_writer.write(exc.reply)
                stream_writer.close()
            else:
                stream_writer.transport.abort()
            if not isinstance(exc, Exception):
                raise
            if isinstance(exc, TimeoutError):
                reason = f"no CONNECT within {self.connect_timeout}s"
            else:
                reason = str(exc) or type(exc).__name__
            raise AMQTTError(f"bad CONNECT from {remote_address}:{remote_port}: {reason}") from None
        session.remote_address, session.remote_port = remote_address, remote_port
        session.ssl_object = writer.get_ssl_info()
        return Connection(self, stream_reader, stream_writer, self.limits), session

    # B2, B3, B4 ----------------------------------------------------------------------------------------
    async def _handle_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        client_session: Session,
        handler: Connection,
        server: Any,
        listener_name: str,
    ) -> None:
        if not client_session.client_id:
            client_session.client_id = gen_client_id()
        authenticated = await self._authenticate(client_session, self.listeners_config[listener_name])
        if not authenticated:
            client_session.will_flag = False
            handler.refuse(connack(_NOT_AUTHORIZED))
            return

        # B10: devices choose their client ids, so sessions are keyed by device as well; otherwise a device
        # reusing another's client id would disconnect it and inherit its session, queued replies included
        identity = _identity(client_session)
        if identity is not None:
            client_session.client_id = f"{identity[0]}/{identity[1]}/{client_session.client_id}"
        # the device secret of a device this CONNECT just activated (secure mode 3): never kept on a session
        activated_secret = client_session.attributes.pop("activated_secret", None)
        session = await self._adopt_session(client_session)
        self._sessions[session.client_id] = (session, handler)
        if self.session_events is not None:  # W1
            self.session_events.connected(session.client_id, handler, session.clean_session)
        handler.begin(session, connack(_ACCEPTED, session_present=bool(session.parent)))
        if activated_secret is not None and identity is not None:
            # right after the CONNACK, unsubscribed, as EnOS does: the SDKs take it as a command
            handler.send(activate_info_topic(*identity), activate_info(*identity, activated_secret), 1)
        metrics.CONNECTED_DEVICES.inc()
        if self.on_session is not None:
            self.on_session(True, session)
        try:
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_CONNECTED, client_id=session.client_id, client_session=session
            )
            self._send_offline_queue(session, handler)
            for topic_filter, qos in list(self._session_filters.get(session.client_id, {}).items()):
                for topic, data, retained_qos in self.retained_for(topic_filter):
                    handler.send(topic, data, min(qos, retained_qos), retain=True)
            await asyncio.shield(handler.closed)
        finally:
            await self._handle_disconnect(session, handler, handler.clean_disconnect)

    async def _adopt_session(self, incoming: Session) -> Session:
        client_id = incoming.client_id
        existing = self._sessions.get(client_id)
        if existing is not None and existing[0].transitions.is_connected():
            old_session, old_handler = existing
            log.info("client id already connected, taking over", extra={"client_id": client_id})
            await old_handler.handle_connection_closed()
            for _ in range(100):  # the old connection's task marks its session disconnected
                if not old_session.transitions.is_connected():
                    break
                await asyncio.sleep(0.02)
        # a clean session ends with its connection [MQTT-3.1.2-6], even while the monitor has yet to drop it:
        # resuming it would report session-present and carry its subscriptions into a persistent session
        if incoming.clean_session or existing is None or existing[0].clean_session:
            if existing is not None:
                await self._delete_session(client_id)
            incoming.parent = 0
            session = incoming
        else:
            session = existing[0]
            for name in (
                "will_flag",
                "will_message",
                "will_topic",
                "will_qos",
                "will_retain",
                "keep_alive",
                "username",
                "password",
                "attributes",
                "ssl_object",
                "remote_address",
                "remote_port",
            ):
                setattr(session, name, getattr(incoming, name))
            session.parent = 1
        for _ in range(100):
            try:
                session.transitions.connect()
                break
            except Exception:  # the old connection is still winding down
                await asyncio.sleep(0.02)
        return session

    async def _authenticate(self, session: Session, listener: ListenerConfig) -> bool:
        if not await super()._authenticate(session, listener):
            return False
        # B5: a Will outside the device's own topics is refused at CONNECT, as is one no PUBLISH could carry
        will_topic = session.will_topic or ""
        if session.will_flag and not (valid_topic(will_topic) and acl.may_publish(_identity(session), will_topic)):
            metrics.AUTH_FAILURES.labels(reason="will_topic_denied").inc()
            from service.broker.plugins import log_refused_login

            device = _identity(session) or (None, None)
            log_refused_login(session, device[0], device[1], "will_topic_denied")
            return False
        return True

    # B5 ------------------------------------------------------------------------------------------------
    async def _handle_disconnect(self, client_session: Session, handler: Any, disconnect_waiter: Any) -> None:
        """The connection is over: the Will unless it ended with DISCONNECT, then the session is disconnected."""
        handler.close(None)
        clean = disconnect_waiter is True
        if not clean and client_session.will_flag:
            topic, data = client_session.will_topic or "", bytes(client_session.will_message or b"")
            if valid_topic(topic) and acl.may_publish(_identity(client_session), topic):
                self.deliver(topic, data, client_session.will_qos or 0)
                if client_session.will_retain:
                    self.retain(topic, data, client_session.will_qos or 0)
        if client_session.transitions.state == "connected":
            client_session.transitions.disconnect()
        if self.gateway_sessions is not None and isinstance(handler, Connection) and handler.sub_devices:
            self.gateway_sessions.closed(handler)  # G1: its sub-devices' sessions end with it
        metrics.CONNECTED_DEVICES.dec()
        if self.session_events is not None:  # W1
            self.session_events.disconnected(client_session.client_id, handler, client_session.clean_session)
        if self.on_session is not None:
            self.on_session(False, client_session)
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_DISCONNECTED, client_id=client_session.client_id, client_session=client_session
        )

    # W1 ------------------------------------------------------------------------------------------------
    async def evict_session(self, client_id: str, connection: object) -> None:
        """The session reconnected on another worker: close ``connection`` if it is still this session's, and
        drop the session (its state now lives with the new connection). A newer connection here is left alone."""
        existing = self._sessions.get(client_id)
        if existing is None or existing[1] is not connection:
            return
        session, handler = existing
        if session.transitions.is_connected():
            log.info("client id connected on another worker, taking over", extra={"client_id": client_id})
            await handler.handle_connection_closed()
            for _ in range(100):  # the connection's task marks its session disconnected
                if not session.transitions.is_connected():
                    break
                await asyncio.sleep(0.02)
        if self._sessions.get(client_id, (None, None))[1] is connection:
            await self._delete_session(client_id)

    # B9 ------------------------------------------------------------------------------------------------
    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        identity = _identity(session)
        if action == Action.PUBLISH:
            return acl.may_publish(identity, topic)
        if action == Action.SUBSCRIBE:
            return acl.may_subscribe(identity, topic)
        return acl.may_receive(identity, topic)

    # B7, B8, limits: subscriptions -------------------------------------------------------------------------
    def subscribe(self, session: Session, topic_filter: str, qos: int) -> int:
        """Add (or update) a subscription; the granted QoS, or 0x80. Raises `LimitExceeded`."""
        if not valid_filter(topic_filter):
            return 0x80
        identity = _identity(session)
        lent = not acl.may_subscribe(identity, topic_filter)
        if lent and not self._lent(session, topic_filter):
            metrics.ACL_DENIALS.labels(action="subscribe").inc()
            return 0x80
        granted = min(qos, 1)
        client_id = session.client_id
        own = self._session_filters.setdefault(client_id, {})
        subscribers = self._subscriptions.get(topic_filter)
        if topic_filter in own and subscribers is not None:
            subscribers[:] = [(s, granted if s.client_id == client_id else q) for s, q in subscribers]
            own[topic_filter] = granted
            return granted
        limits = self.limits
        # G1: the limits hold per tree: the device's own, and each sub-device's it was lent
        peers: Any = own
        if lent:
            tree = topic_device(topic_filter)
            peers = [f for f in own if not acl.owns(identity, f) and topic_device(f) == tree]
        elif len(own) >= limits.max_subscriptions:
            peers = [f for f in own if acl.owns(identity, f)]
        if len(peers) >= limits.max_subscriptions:
            raise LimitExceeded("subscriptions", f"more than {limits.max_subscriptions} subscriptions")
        if ("+" in topic_filter or "#" in topic_filter) and sum(
            1 for f in peers if "+" in f or "#" in f
        ) >= limits.max_wildcard_subscriptions:
            raise LimitExceeded(
                "wildcard_subscriptions", f"more than {limits.max_wildcard_subscriptions} wildcard subscriptions"
            )
        if subscribers is None:
            subscribers = self._subscriptions[topic_filter] = []
            self._index.add(topic_filter)
        subscribers.append((session, granted))
        own[topic_filter] = granted
        return granted

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """amqtt's entry point (BrokerContext.add_subscription): as `subscribe`, limits answered with 0x80."""
        try:
            return self.subscribe(session, subscription[0], subscription[1])
        except LimitExceeded:
            return 0x80

    def unsubscribe(self, session: Session, topic_filter: str) -> None:
        """Remove one subscription of ``session``."""
        self._del_subscription(topic_filter, session)

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        own = self._session_filters.get(session.client_id)
        if own is None or own.pop(a_filter, None) is None:
            return 0
        subscribers = self._subscriptions.get(a_filter)
        if subscribers is not None:
            subscribers[:] = [(s, q) for s, q in subscribers if s.client_id != session.client_id]
            if not subscribers:
                del self._subscriptions[a_filter]
                self._index.discard(a_filter)
        return 1

    async def _del_all_subscriptions(self, session: Session) -> None:
        for topic_filter in list(self._session_filters.get(session.client_id, ())):
            self._del_subscription(topic_filter, session)
        self._session_filters.pop(session.client_id, None)

    def subscribers(self, topic: str) -> list[tuple[Session, int]]:
        """Every (session, granted QoS) whose filter matches ``topic``."""
        found: list[tuple[Session, int]] = []
        for topic_filter in self._index.match(topic):
            found.extend(self._subscriptions.get(topic_filter, ()))
        return found

    def deliver(self, topic: str, data: bytes, qos: int) -> None:
        """Fan a message out to every subscriber now (B7, B8): into each connection's next write."""
        for topic_filter in self._index.match(topic):
            for target, sub_qos in self._subscriptions.get(topic_filter, ()):
                if not acl.may_receive(_identity(target), topic) and not self._lent(target, topic):
                    continue
                delivered = min(qos, sub_qos)
                if target.transitions.state == "connected":
                    handler = self._sessions.get(target.client_id, (None, None))[1]
                    if isinstance(handler, Connection):
                        handler.send(topic, data, delivered)
                elif not target.clean_session and delivered > 0 and not target.is_anonymous:
                    self._queue_offline(target, topic, data, delivered)

    # G1 ------------------------------------------------------------------------------------------------
    def _lent(self, session: Session, topic: str) -> bool:
        """Whether ``topic`` (or a filter) is in the tree of a sub-device logged in through ``session``'s connection.

        Only reached when the plain ACL said no, i.e. for a gateway's sub-device traffic.
        """
        handler = self._sessions.get(session.client_id, (None, None))[1]
        if not isinstance(handler, Connection) or not handler.sub_devices or handler.closing:
            return False
        return topic_device(topic) in handler.sub_devices

    def _queue_offline(self, session: Session, topic: str, data: bytes, qos: int) -> None:
        if not isinstance(session, PointgateSession):
            return
        if session.offline_bytes + len(data) > self.limits.max_queued_bytes:
            metrics.LIMIT_HITS.labels(limit="queued_bytes").inc()
            return  # the device re-sends what it was not answered
        if session.offline is None:
            session.offline = deque()
        session.offline.append((topic, data, qos))
        session.offline_bytes += len(data)

    def _send_offline_queue(self, session: Session, handler: Connection) -> None:
        if isinstance(session, PointgateSession) and session.offline:
            queued, session.offline = session.offline, None
            session.offline_bytes = 0
            for topic, data, qos in queued:
                handler.send(topic, data, qos)  # not flagged RETAIN (amqtt did: §5 #9)

    async def _broadcast_message(
        self, session: Session | None, topic: str | None, data: bytes | None, force_qos: int | None = None
    ) -> None:
        if topic is not None and data is not None:
            self.deliver(topic, bytes(data), 2 if force_qos is None else force_qos)

    def retain(self, topic: str, data: bytes, qos: int) -> None:
        """Store the retained message of ``topic``; an empty one clears it [MQTT-3.3.1-10]."""
        if data:
            self._retained_messages[topic] = RetainedApplicationMessage(None, topic, data, qos)
        else:
            self._retained_messages.pop(topic, None)

    def retained_for(self, topic_filter: str) -> list[tuple[str, bytes, int]]:
        """Retained messages matching a filter (an exact filter is one lookup)."""
        if "+" not in topic_filter and "#" not in topic_filter:
            found = self._retained_messages.get(topic_filter)
            return [] if found is None else [(found.topic, bytes(found.data), found.qos or 0)]
        index = TopicIndex()
        index.add(topic_filter)
        return [
            (topic, bytes(message.data), message.qos or 0)
            for topic, message in self._retained_messages.items()
            if index.match(topic)
        ]

    def hold_back(self, conn: Connection) -> bool:
        """True (and ``conn`` resumed later) while the writer holds as many points as it may queue."""
        points = self.points
        if points is None or not points.full:
            return False
        self._held.add(conn)
        if self._resumer is None or self._resumer.done():
            self._resumer = asyncio.create_task(self._resume_when_room())
        return True

    async def _resume_when_room(self) -> None:
        await self.points.wait_for_room()
        held, self._held = self._held, set()
        for conn in held:
            conn.resume()

    # B13 -----------------------------------------------------------------------------------------------
    async def _session_monitor(self) -> None:
        while True:
            expire_before = None if self.session_expiry is None else time.time() - self.session_expiry
            gone: list[str] = []
            expired = 0
            for client_id, (session, _) in self._sessions.items():
                if session.transitions.state != "disconnected":
                    continue
                if session.clean_session or session.is_anonymous:
                    gone.append(client_id)
                elif expire_before is not None and (session.last_disconnect_time or 0) < expire_before:
                    gone.append(client_id)
                    expired += 1
            for client_id in gone:
                await self._cleanup_session(client_id)
            if expired:
                metrics.LIMIT_HITS.labels(limit="session_expiry").inc(expired)
                log.info("persistent sessions expired", extra={"sessions": expired})
            await asyncio.sleep(1)

    # service hooks -----------------------------------------------------------------------------------------
    # W2 ------------------------------------------------------------------------------------------------
    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,
        port: int,
        ssl_context: ssl.SSLContext | None,
    ) -> Any:
        if not self.reuse_port or listener_type != ListenerType.TCP:
            return await super()._create_server_instance(listener_name, listener_type, address, port, ssl_context)
        return await asyncio.start_server(
            functools.partial(self.stream_connected, listener_name=listener_name),
            address,
            port,
            reuse_address=True,
            reuse_port=True,
            ssl=ssl_context,
        )

    def listener_port(self, listener: str) -> int:
        """The port a listener is bound to (its real one when configured with port 0)."""
        port: int = self._servers[listener].instance.sockets[0].getsockname()[1]
        return port

    def stop_accepting(self) -> None:
        """Close the listening sockets and stop reading from the connections already open: they stay until the
        broker shuts down, to receive the answers to what they sent before."""
        for server in self._servers.values():
            instance = getattr(server, "instance", None)
            if instance is not None:
                instance.close()
        for _, handler in self._sessions.values():
            if isinstance(handler, Connection):
                handler.stop_reading()

    def replies_pending(self) -> bool:
        """Whether replies are still on their way to a device."""
        return any(isinstance(handler, Connection) and handler.busy() for _, handler in self._sessions.values())

    # ops: close a device's connections (device disabled, rotated or deleted; service/devices/presence.py) ------
    def close_device(self, product_key: str, device_key: str) -> int:
        """Close every live connection signed in as this device; return how many were closed."""
        closing = 0
        for session, handler in list(self._sessions.values()):
            if _identity(session) == (product_key, device_key) and session.transitions.state == "connected":
                handler.close("device changed in the registry")
                closing += 1
        return closing

    def publish_reply(self, topic: str, payload: bytes) -> None:
        """Deliver a reply to whoever subscribed to ``topic`` (QoS 1, downgraded per subscriber, not retained)."""
        self.deliver(topic, payload, 1)

    # TLS: amqtt asks for client certificates but does not require them (CERT_OPTIONAL) ------------------
    @staticmethod
    def _create_ssl_context(listener: ListenerConfig) -> ssl.SSLContext:
        context = Broker._create_ssl_context(listener)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if listener.get("cafile"):
            context.verify_mode = ssl.CERT_REQUIRED
        return context


class _Subscriptions(dict[str, list[tuple[Session, int]]]):
    """amqtt's filter → subscribers map, with a repr that does not render every subscription (B11)."""

    def __repr__(self) -> str:
        return f"<{len(self)} subscription filters>"


def _identity(session: Session) -> acl.Identity:
    device = session.attributes.get("device")
    return device if isinstance(device, tuple) else None


def authenticator_of(context: Any) -> Any:
    """The authenticator hung on the broker a plugin context belongs to (amqtt offers no public way to it)."""
    return getattr(context._broker_instance, "authenticator", None)
