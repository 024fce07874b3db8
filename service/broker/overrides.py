"""Every override of amqtt 0.12.1 internals, in one place, each naming the upstream defect it fixes.

amqtt is pinned exactly (pyproject) because this module subclasses its private classes. Each fix has a test in
``tests/integration/test_hardening.py`` that fails on stock amqtt. References are to
``shared/reference/amqtt.md``.

Handler (one per connection):
  H1  PUBACK only after commit: amqtt PUBACKs a QoS 1 PUBLISH before anything saw it (§1.7); here it waits for
      the message's ``acked`` future (resolved by the ingest after COMMIT, or at once for other topics) and
      keeps PUBACKs in arrival order [MQTT-4.6.0-2]. The device's in-flight window becomes the backpressure.
  H2  keep-alive enforced (§5 #1): no packet (nor the rest of a started one) for 1.5 × keep-alive closes the
      connection, and the Will is sent.
  H3  malformed packets close the connection (§5 #7) instead of "Message discarded" and a desynchronised stream;
      PUBLISH with QoS 3 included, and an oversized PUBLISH whose topic is invalid or longer than the packet.
  H4  packet size limit (§2.6): an oversized PUBLISH is skipped without buffering it and answered with 1008 on
      its reply topic when it is a request topic; anything else oversized closes the connection.

Broker:
  B1  CONNECT timeout (§5 #2): a connection that sends no CONNECT within ``connect_timeout`` is closed.
  B2  authentication before any session is touched (§5 #4, #4b): a refused CONNECT can no longer delete, take
      over or kick a live device's session, nor plant a Will.
  B3  clean-session take-over closes the old connection (§5 #5), as persistent take-over already did; a clean
      session is never resumed by a persistent CONNECT that comes before amqtt's monitor dropped it.
  B4  retained messages on connect only for the session's own subscriptions (§5 #3), never other clients'.
  B5  Wills obey the publish ACL (§5 #4c) and the topic-name rules: checked at CONNECT (refused) and again when
      published.
  B6  a ``$``/wildcard topic PUBLISH closes the connection (§5 #6) instead of leaving a zombie.
  B7  QoS downgraded to min(publish, subscription) (§5 #8).
  B8  fan-out looks topics up in an index (exact filters by dict, wildcard filters in a set) instead of
      matching every subscription of every client (§4.2: ~0.45 µs per subscription per message), and
      per-session filter sets make disconnect O(own subscriptions).
  B9  topic ACL and measurement-point ingest are direct calls: amqtt's plugin dispatch makes one task per
      plugin per message (§1.3), which the hot path cannot afford.
  B10 sessions are keyed by device and client id: amqtt keys them by the client id alone, which the device
      chooses, so another device could take over a session (and its queued replies) by reusing the id.
  B11 a SUBSCRIBE no longer renders every subscription into a debug string (O(N²) connects).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
import time
from typing import TYPE_CHECKING, Any, Protocol

from amqtt.broker import Broker
from amqtt.contexts import Action, ListenerConfig
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.events import BrokerEvents, MQTTEvents
from amqtt.mqtt import packet_class
from amqtt.mqtt.constants import QOS_0, QOS_1
from amqtt.mqtt.packet import PUBLISH, RESERVED_0, RESERVED_15, MQTTFixedHeader
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import IncomingApplicationMessage, Session

from service.broker import acl
from service.ops import metrics
from service.protocol.topics import RequestTopic, parse_request_topic

if TYPE_CHECKING:
    from amqtt.adapters import ReaderAdapter, WriterAdapter

log = logging.getLogger("pointgate.broker")

# remaining length = 2 + topic (≤ 65535) + packet id (2) + payload
_PUBLISH_OVERHEAD = 2 + 65535 + 2
# beyond this an oversized PUBLISH is not even skipped through: the connection is closed
_SKIP_FACTOR = 8


class Ingest(Protocol):
    """What the broker hands measurement-point requests to (service/broker/ingest.py)."""

    def accept(self, session: Session, topic: RequestTopic, message: AckedMessage) -> None:
        """Take a request; resolve ``message.acked`` when it is answered."""

    def reject_oversize(self, session: Session, topic: RequestTopic, size: int, packet_id: int | None) -> None:
        """Answer a request whose packet exceeded the size limit."""


class AckedMessage(IncomingApplicationMessage):
    """An incoming PUBLISH with the future its PUBACK waits on (H1)."""

    __slots__ = ("acked",)

    def __init__(self, packet_id: int | None, topic: str, qos: int | None, data: bytes, retain: bool) -> None:
        super().__init__(packet_id, topic, qos, data, retain)
        self.acked: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def ack(self, send_puback: bool = True) -> None:
        """Release the PUBACK (or, with False, drop it: the connection is being closed)."""
        if not self.acked.done():
            self.acked.set_result(send_puback)


class PointgateHandler(BrokerProtocolHandler):
    """amqtt's per-connection protocol handler with H1–H4."""

    max_packet_bytes: int = 512 * 1024 + _PUBLISH_OVERHEAD
    broker: PointgateBroker | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ack_tail: asyncio.Future[None] | None = None

    # H1 ------------------------------------------------------------------------------------------------
    async def handle_publish(self, publish_packet: PublishPacket) -> None:
        if publish_packet.topic_name is None or publish_packet.data is None or self.session is None:
            return
        packet_id = publish_packet.variable_header.packet_id if publish_packet.variable_header else None
        message = AckedMessage(
            packet_id, publish_packet.topic_name, publish_packet.qos, publish_packet.data, publish_packet.retain_flag
        )
        message.publish_packet = publish_packet
        if message.qos != QOS_1:
            if message.qos == QOS_0:
                message.ack()
            await self._handle_message_flow(message)  # QoS 0: queue it; QoS 2: amqtt's own four-way flow
            return
        # PUBACKs must leave in the order the PUBLISHes came in, whatever order the commits finish in
        previous, done = self._ack_tail, self._loop.create_future()
        self._ack_tail = done
        try:
            await self.session.delivered_message_queue.put(message)
            send = await message.acked
            if previous is not None:
                await previous
            if send and packet_id is not None:
                await self._send_packet(PubackPacket.build(packet_id))
        finally:
            done.set_result(None)

    # H2 ------------------------------------------------------------------------------------------------
    def _read_timeout(self) -> float | None:
        keep_alive = self.session.keep_alive if self.session else 0
        return 1.5 * keep_alive if keep_alive > 0 else None

    # H3, H4: amqtt's _reader_loop with the fixes (its structure kept so upstream diffs stay readable) ------
    async def _reader_loop(self) -> None:
        assert self.session is not None and self._reader_ready is not None
        running: set[asyncio.Task[None]] = set()
        timeout = self._read_timeout()
        try:
            while True:
                self._reader_ready.set()
                if self.reader is None:
                    break
                header = await asyncio.wait_for(MQTTFixedHeader.from_stream(self.reader), timeout=timeout)
                if not header:
                    break
                if header.packet_type in (RESERVED_0, RESERVED_15) or not self._header_ok(header):
                    log.warning("malformed packet, closing", extra={"client_id": self.session.client_id})
                    break
                # H2: the rest of a packet is bounded too, or a device stalling mid-packet would never time out
                if header.remaining_length > self.max_packet_bytes:
                    if not await asyncio.wait_for(self._skip_oversized(header), timeout=timeout):
                        break
                    continue
                packet = await asyncio.wait_for(
                    packet_class(header).from_stream(self.reader, fixed_header=header), timeout=timeout
                )
                await self.plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=packet, session=self.session)
                task = self._dispatch(packet)
                if task is not None:
                    running.add(task)
                    task.add_done_callback(running.discard)
        except TimeoutError:
            # H2: the finally below closes the connection; the broker then sends the Will
            log.info("keep-alive expired, closing", extra={"client_id": self.session.client_id})
        except (MQTTError, AMQTTError, ValueError, UnicodeDecodeError, IndexError) as exc:
            log.warning("malformed packet, closing: %s", exc, extra={"client_id": self.session.client_id})
        except (NoDataError, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("reader failed, closing")
        finally:
            for task in running:
                task.cancel()
            await self.handle_connection_closed()
            self._reader_stopped.set()
            await self.stop()

    @staticmethod
    def _header_ok(header: MQTTFixedHeader) -> bool:
        if header.packet_type == PUBLISH:
            return (header.flags >> 1) & 0x03 != 0x03  # QoS 3 does not exist
        return True

    def _dispatch(self, packet: Any) -> asyncio.Task[None] | None:
        handler_name = _HANDLERS.get(type(packet).__name__)
        if handler_name is None:
            return None
        if handler_name == "handle_connect":
            # a second CONNECT is a protocol violation [MQTT-3.1.0-2]
            raise MQTTError("CONNECT received on an open connection")
        return asyncio.create_task(getattr(self, handler_name)(packet))

    async def _skip_oversized(self, header: MQTTFixedHeader) -> bool:
        """Read past an oversized PUBLISH without keeping it; False means close the connection."""
        assert self.reader is not None and self.session is not None
        size = header.remaining_length
        if header.packet_type != PUBLISH or size > _SKIP_FACTOR * self.max_packet_bytes:
            log.warning("oversized packet (%d bytes), closing", size, extra={"client_id": self.session.client_id})
            return False
        qos = (header.flags >> 1) & 0x03
        topic_len = int.from_bytes(await _read(self.reader, 2))
        left = size - 2 - topic_len - (2 if qos else 0)
        if left < 0:
            raise MQTTError("PUBLISH topic longer than its packet")  # H3: reading on would desynchronise the stream
        topic = (await _read(self.reader, topic_len)).decode("utf-8")
        if not valid_topic(topic):
            # H3/B6: as for a PUBLISH of normal size; and never answer (1008) on a topic with wildcards
            log.warning("invalid publish topic %r, closing", topic, extra={"client_id": self.session.client_id})
            return False
        packet_id = None
        if qos:
            packet_id = int.from_bytes(await _read(self.reader, 2))
        while left > 0:
            chunk = await _read(self.reader, min(left, 65536))
            left -= len(chunk)
        log.info("oversized publish skipped", extra={"client_id": self.session.client_id, "bytes": size})
        if self.broker is not None:
            await self.broker.answer_oversize(self.session, topic, size, packet_id)
        if qos == QOS_1 and packet_id is not None:
            await self._send_packet(PubackPacket.build(packet_id))
        return True


async def _read(reader: ReaderAdapter, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await reader.read(n - len(data))
        if not chunk:
            raise NoDataError("connection closed mid-packet")
        data += chunk
    return data


_HANDLERS = {
    "ConnackPacket": "handle_connack",
    "SubscribePacket": "handle_subscribe",
    "UnsubscribePacket": "handle_unsubscribe",
    "SubackPacket": "handle_suback",
    "UnsubackPacket": "handle_unsuback",
    "PubackPacket": "handle_puback",
    "PubrecPacket": "handle_pubrec",
    "PubrelPacket": "handle_pubrel",
    "PubcompPacket": "handle_pubcomp",
    "PingReqPacket": "handle_pingreq",
    "PingRespPacket": "handle_pingresp",
    "PublishPacket": "handle_publish",
    "DisconnectPacket": "handle_disconnect",
    "ConnectPacket": "handle_connect",
}


class PointgateBroker(Broker):
    """amqtt's Broker with B1–B9."""

    def __init__(self, config: dict[str, Any], *, connect_timeout: float, max_packet_bytes: int) -> None:
        super().__init__(config)
        self.connect_timeout = connect_timeout
        self.max_packet_bytes = max_packet_bytes
        self.ingest: Ingest | None = None
        self.authenticator: Any = None  # service.devices.auth.DeviceAuthenticator, used by plugins.DeviceAuthPlugin
        # B11: amqtt logs repr(self._subscriptions) on every SUBSCRIBE whatever the log level, which made
        # connecting N devices cost O(N^2) (47 % of CPU while 3 000 devices connected, benchmarks/README.md)
        self._subscriptions = _Subscriptions()
        self._wildcard_filters: set[str] = set()
        self._session_filters: dict[str, set[str]] = {}

    # B1 ------------------------------------------------------------------------------------------------
    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        try:
            handler, session = await asyncio.wait_for(
                PointgateHandler.init_from_connect(reader, writer, self.plugins_manager), self.connect_timeout
            )
        except TimeoutError:
            with contextlib.suppress(Exception):
                await writer.close()
            raise AMQTTError(f"no CONNECT from {remote_address}:{remote_port} within {self.connect_timeout}s") from None
        except (MQTTError, NoDataError, ValueError, UnicodeDecodeError) as exc:
            with contextlib.suppress(Exception):
                await writer.close()
            raise AMQTTError(f"bad CONNECT from {remote_address}:{remote_port}: {exc}") from None
        assert isinstance(handler, PointgateHandler)
        handler.broker = self
        handler.max_packet_bytes = self.max_packet_bytes
        # B2: nothing about existing sessions is decided here any more; that waits for authentication
        return handler, session

    # B2, B3, B4 ----------------------------------------------------------------------------------------
    async def _handle_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Any,
        listener_name: str,
    ) -> None:
        if not client_session.client_id:
            from amqtt.utils import gen_client_id

            client_session.client_id = gen_client_id()
        authenticated = await self._authenticate(client_session, self.listeners_config[listener_name])
        if not authenticated:
            client_session.will_flag = False
            client_session.parent = 0
            handler.attach(client_session, reader, writer)
            await handler.mqtt_connack_authorize(False)
            await writer.close()
            return

        # B10: devices choose their client ids, so sessions are keyed by device as well; otherwise a device
        # reusing another's client id would disconnect it and inherit its session, queued replies included
        identity = _identity(client_session)
        if identity is not None:
            client_session.client_id = f"{identity[0]}/{identity[1]}/{client_session.client_id}"
        session = await self._adopt_session(client_session)
        handler.attach(session, reader, writer)
        self._sessions[session.client_id] = (session, handler)
        await handler.mqtt_connack_authorize(True)
        metrics.CONNECTED_DEVICES.inc()
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_CONNECTED, client_id=session.client_id, client_session=session
        )
        await handler.start()
        await self._publish_session_retained_messages(session)
        for topic_filter in list(self._session_filters.get(session.client_id, ())):
            await self._publish_retained_messages_for_subscription((topic_filter, QOS_0), session)
        await self._client_message_loop(session, handler)

    async def _adopt_session(self, incoming: Session) -> Session:
        client_id = incoming.client_id
        existing = self._sessions.get(client_id)
        if existing is not None and existing[0].transitions.is_connected():
            old_session, old_handler = existing
            log.info("client id already connected, taking over", extra={"client_id": client_id})
            await old_handler.handle_connection_closed()
            for _ in range(100):  # the old connection's loop marks its session disconnected
                if not old_session.transitions.is_connected():
                    break
                await asyncio.sleep(0.02)
        # a clean session ends with its connection [MQTT-3.1.2-6], even while amqtt's 1 s monitor has yet to drop it:
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
            except Exception:  # transitions.MachineError: the old connection is still winding down
                await asyncio.sleep(0.02)
        return session

    async def _authenticate(self, session: Session, listener: ListenerConfig) -> bool:
        if not await super()._authenticate(session, listener):
            return False
        # B5: a Will outside the device's own topics is refused at CONNECT, as is one no PUBLISH could carry
        will_topic = session.will_topic or ""
        if session.will_flag and not (valid_topic(will_topic) and acl.may_publish(_identity(session), will_topic)):
            metrics.AUTH_FAILURES.labels(reason="will_topic_denied").inc()
            log.info("will topic outside the device's topics, refusing", extra={"client_id": session.client_id})
            return False
        return True

    # B5, B6 --------------------------------------------------------------------------------------------
    async def _handle_disconnect(
        self, client_session: Session, handler: BrokerProtocolHandler, disconnect_waiter: asyncio.Future[Any]
    ) -> None:
        if client_session.will_flag and not acl.may_publish(_identity(client_session), client_session.will_topic or ""):
            client_session.will_flag = False
        metrics.CONNECTED_DEVICES.dec()
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        message = wait_deliver.result()
        if message is None:
            return True
        topic: str = message.topic
        if not valid_topic(topic):
            log.warning("invalid publish topic %r, closing", topic, extra={"client_id": client_session.client_id})
            _ack(message, False)
            await handler.handle_connection_closed()  # B6: close it; the loop then runs the disconnect
            return True
        if not await self._topic_filtering(client_session, topic, Action.PUBLISH):
            log.warning("publish outside own topics %r, closing", topic, extra={"client_id": client_session.client_id})
            metrics.ACL_DENIALS.labels(action="publish").inc()
            _ack(message, False)
            await handler.handle_connection_closed()
            return True
        request = parse_request_topic(topic)
        if request is not None and self.ingest is not None:
            self.ingest.accept(client_session, request, message)
            return True
        await self._broadcast_message(client_session, topic, message.data, message.qos)
        if message.publish_packet is not None and message.publish_packet.retain_flag:
            await self.retain_message(client_session, topic, message.data, message.qos)
        _ack(message, True)
        return True

    async def answer_oversize(self, session: Session, topic: str, size: int, packet_id: int | None) -> None:
        """H4's reply path: a 1008 on the request's reply topic, if it is a request on the device's own topic."""
        request = parse_request_topic(topic)
        if request is not None and self.ingest is not None and acl.may_publish(_identity(session), topic):
            self.ingest.reject_oversize(session, request, size, packet_id)

    # B9 ------------------------------------------------------------------------------------------------
    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        identity = _identity(session)
        if action == Action.PUBLISH:
            return acl.may_publish(identity, topic)
        if action == Action.SUBSCRIBE:
            allowed = acl.may_subscribe(identity, topic)
            if not allowed:
                metrics.ACL_DENIALS.labels(action="subscribe").inc()
            return allowed
        return acl.may_receive(identity, topic)

    # B7, B8 --------------------------------------------------------------------------------------------
    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        code = await super().add_subscription(subscription, session)
        if code != 0x80:
            topic_filter = subscription[0]
            self._session_filters.setdefault(session.client_id, set()).add(topic_filter)
            if "+" in topic_filter or "#" in topic_filter:
                self._wildcard_filters.add(topic_filter)
        return code

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        deleted = super()._del_subscription(a_filter, session)
        if deleted:
            self._session_filters.get(session.client_id, set()).discard(a_filter)
            if not self._subscriptions.get(a_filter):
                self._subscriptions.pop(a_filter, None)
                self._wildcard_filters.discard(a_filter)
        return deleted

    async def _del_all_subscriptions(self, session: Session) -> None:
        for topic_filter in list(self._session_filters.pop(session.client_id, ())):
            self._del_subscription(topic_filter, session)

    def _matching_filters(self, topic: str) -> list[str]:
        found = [topic] if topic in self._subscriptions else []
        for topic_filter in list(self._wildcard_filters):
            if topic_filter not in self._subscriptions:
                self._wildcard_filters.discard(topic_filter)
            elif self._matches(topic, topic_filter):
                found.append(topic_filter)
        return found

    async def _run_broadcast(self, running_tasks: Any) -> None:
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        published_qos = broadcast.get("qos")
        for topic_filter in self._matching_filters(topic):
            for target, sub_qos in list(self._subscriptions.get(topic_filter, ())):
                qos = sub_qos if published_qos is None else min(published_qos, sub_qos)
                if not acl.may_receive(_identity(target), topic):
                    continue
                if target.transitions.state != "connected":
                    if not target.clean_session and qos > 0 and not target.is_anonymous:
                        await self._retain_broadcast_message(broadcast, qos, target)
                    continue
                handler = self._get_handler(target)
                if handler is not None:
                    running_tasks.append(
                        asyncio.ensure_future(handler.mqtt_publish(topic, broadcast["data"], qos, retain=False))
                    )

    def listener_port(self, listener: str) -> int:
        """The port a listener is bound to (its real one when configured with port 0)."""
        port: int = self._servers[listener].instance.sockets[0].getsockname()[1]
        return port

    def stop_accepting(self) -> None:
        """Close the listening sockets; connections already open stay until the broker shuts down."""
        for server in self._servers.values():
            instance = getattr(server, "instance", None)
            if instance is not None:
                instance.close()

    def replies_pending(self) -> bool:
        """Whether published replies are still queued or on their way to a device."""
        return not self._broadcast_queue.empty() or any(not task.done() for task in self._tasks_queue)

    def publish_reply(self, topic: str, payload: bytes) -> None:
        """Queue a reply for whoever subscribed to ``topic`` (QoS 1, downgraded per subscriber, not retained)."""
        self._broadcast_queue.put_nowait({"session": None, "topic": topic, "data": payload, "qos": QOS_1})

    # TLS: amqtt asks for client certificates but does not require them (CERT_OPTIONAL) ------------------
    @staticmethod
    def _create_ssl_context(listener: ListenerConfig) -> ssl.SSLContext:
        context = Broker._create_ssl_context(listener)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if listener.get("cafile"):
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def valid_topic(topic: str) -> bool:
    """Whether a client may publish on ``topic`` at all: no wildcards, no ``$`` topics, no NUL [MQTT-4.7]."""
    return bool(topic) and "#" not in topic and "+" not in topic and not topic.startswith("$") and "\x00" not in topic


class _Subscriptions(dict[str, list[tuple[Session, int]]]):
    """amqtt's filter → subscribers map, with a repr that does not render every subscription (B11)."""

    def __repr__(self) -> str:
        return f"<{len(self)} subscription filters>"


def _identity(session: Session) -> acl.Identity:
    device = session.attributes.get("device")
    return device if isinstance(device, tuple) else None


def _ack(message: Any, send: bool) -> None:
    if isinstance(message, AckedMessage):
        message.ack(send)


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch (the receive time of a message)."""
    return math.floor(time.time() * 1000)
