"""One device connection after CONNECT: strict MQTT 3.1.1 framing, the lean request path, bounded queues.

amqtt reads a connection with a task per packet, queues every PUBLISH for a per-connection loop, and sends
every reply through a global broadcast queue and a task per delivery (reference/amqtt.md §4.3: five tasks and
four ``asyncio.wait`` per message, ~55 % of pointgate's CPU). Once a device is signed in, its transport is
handed to a `Connection` (an ``asyncio.Protocol``): bytes are parsed as they arrive, in the event loop's own
callback, without a task, a queue or a plugin event per packet. amqtt keeps the listeners, CONNECT,
authentication, sessions, subscriptions, retained messages and Wills.

The rules every packet obeys here (issue 7, issue 8):

* Framing is strict MQTT 3.1.1: anything the specification says must close the connection closes it at
  once — whatever follows in the same read is not looked at — and releases the socket. Nothing after a
  DISCONNECT is acted on.
* PUBACKs leave in the order the PUBLISHes came in [MQTT-4.6.0-2], and a request's reply (when the device
  is subscribed to its reply topic) leaves before its PUBACK, in the same write.
* A device with ``max_inflight`` requests waiting for their commit is not read any further until some are
  answered: a device faster than the database feels slower PUBACKs, never growing memory here.
* At most ``max_queued_bytes`` wait towards a device; one that stops reading is disconnected (what it was not
  answered, it re-sends).
* Subscriptions per session, wildcard subscriptions and QoS 2 messages in flight are limited; QoS 2 on a
  request topic is refused. A device past a limit is disconnected and logged once, with product, device and
  the limit's name.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Container
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

from service.broker import acl
from service.ops import metrics
from service.ops.logs import get_logger
from service.protocol import replies
from service.protocol.envelope import PEEK_BYTES, peek_id
from service.protocol.replies import ReplyCode
from service.protocol.topics import (
    DeviceRequest,
    RequestTopic,
    parse_topic,
    topic_device,
    valid_filter,
    valid_topic,
)

if TYPE_CHECKING:
    from amqtt.session import Session

    from service.broker.ingest import Ticket

log = get_logger("pointgate.broker")

# packet types [MQTT-2.2.1]
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

PINGRESP_PACKET = b"\xd0\x00"
# an oversized PUBLISH up to this many times the limit is read past (and answered 1008); beyond it, closed
SKIP_FACTOR = 8
_UNPARSED: Any = object()
_NO_SUB_DEVICES: frozenset[tuple[str, str]] = frozenset()
# remaining length's largest encodable value [MQTT-2.2.3]
MAX_REMAINING_LENGTH = 268_435_455


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-connection limits (service/settings.py names and documents each)."""

    max_packet_bytes: int = 512 * 1024 + 65539
    max_inflight: int = 32
    max_queued_bytes: int = 1 << 20
    max_subscriptions: int = 100
    max_wildcard_subscriptions: int = 10
    max_qos2_inflight: int = 16


class RequestHandler(Protocol):
    """Where a measurement-point request goes (service/broker/ingest.py `Ingest`)."""

    def accept(
        self,
        topic: RequestTopic,
        payload: bytes,
        ticket: Ticket,
        *,
        device: acl.Identity,
        client_id: str,
        online: Container[tuple[str, str]] = ...,
    ) -> None:
        """Decide on a request; answer ``ticket`` now (refused) or once its rows are committed."""

    def reject_oversize(
        self, topic: RequestTopic, size: int, ticket: Ticket, *, client_id: str, request_id: Any = None
    ) -> None:
        """Answer a request whose packet exceeded the size limit (``request_id``: from its first bytes)."""


class RequestRouter(Protocol):
    """Where every other request on a device's topics goes (service/broker/requests.py `Requests`)."""

    def accept(self, request: DeviceRequest, payload: bytes, ticket: Ticket, caller: Any) -> None:
        """Answer ``request`` through ``ticket``: its handler's answer, or 1009."""


class Hub(Protocol):
    """What a connection needs from the broker (overrides.PointgateBroker)."""

    ingest: RequestHandler | None
    requests: RequestRouter | None

    def deliver(self, topic: str, data: bytes, qos: int) -> None:
        """Hand a message to every session subscribed to ``topic``."""

    def retain(self, topic: str, data: bytes, qos: int) -> None:
        """Store (or, empty, clear) the retained message of ``topic``."""

    def subscribe(self, session: Session, topic_filter: str, qos: int) -> int:
        """Add a subscription; the granted QoS or 0x80. Raises `LimitExceeded`."""

    def unsubscribe(self, session: Session, topic_filter: str) -> None:
        """Remove a subscription."""

    def retained_for(self, topic_filter: str) -> list[tuple[str, bytes, int]]:
        """The retained messages a new subscription to ``topic_filter`` gets: (topic, data, qos)."""

    def hold_back(self, conn: Connection) -> bool:
        """True when the database side is full: ``conn`` stops reading and is resumed (`resume`) once it is not."""


class ProtocolViolation(Exception):
    """A packet MQTT 3.1.1 says must close the connection."""


class LimitExceeded(Exception):
    """A device went past one of its limits; the name is the ``limit`` label of the metric."""

    def __init__(self, limit: metrics.LimitName, detail: str) -> None:
        super().__init__(detail)
        self.limit = limit


def encode_length(n: int) -> bytes:
    """MQTT's variable-length "remaining length"."""
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode_publish(topic: bytes, data: bytes, qos: int, packet_id: int, *, retain: bool = False) -> bytes:
    """A PUBLISH packet (``topic`` already UTF-8); ``packet_id`` is ignored at QoS 0."""
    size = 2 + len(topic) + len(data) + (2 if qos else 0)
    head = bytes((0x30 | (qos << 1) | (1 if retain else 0),)) + encode_length(size) + len(topic).to_bytes(2, "big")
    if qos:
        return head + topic + packet_id.to_bytes(2, "big") + data
    return head + topic + data


def _ack(kind: int, packet_id: int) -> bytes:
    return bytes((kind, 2)) + packet_id.to_bytes(2, "big")


class _Ticket:
    """One PUBLISH awaiting its answer, in arrival order: its reply (if any) and its PUBACK (QoS 1)."""

    __slots__ = ("conn", "done", "packet_id", "reply", "reply_topic")

    def __init__(self, conn: Connection, packet_id: int | None, reply_topic: str | None) -> None:
        self.conn = conn
        self.packet_id = packet_id
        self.reply_topic = reply_topic
        self.reply: bytes | None = None
        self.done = False

    def answer(self, reply: bytes) -> None:
        """The request is answered: its reply, then its PUBACK, go out in turn."""
        if self.done:
            return
        self.reply = reply
        self.done = True
        conn = self.conn
        if conn.closing:
            # the device left before its answer: anyone else subscribed (or its persistent session) still gets it
            if self.reply_topic is not None:
                conn.hub.deliver(self.reply_topic, reply, 1)
            return
        conn.ready()

    def release(self) -> None:
        """Nothing to reply (a relayed message): only the PUBACK, in turn."""
        self.done = True
        if not self.conn.closing:
            self.conn.ready()

    def abandon(self) -> None:
        """The request will not be answered (shutting down): no PUBACK, and no later one may overtake it."""
        if not self.done:
            self.done = True
            self.conn.close("request abandoned")


class Connection(BrokerProtocolHandler):
    """A signed-in device's connection: amqtt's handler slot in the broker's session table, our protocol."""

    def __init__(
        self, hub: Hub, stream_reader: asyncio.StreamReader, stream_writer: asyncio.StreamWriter, limits: Limits
    ) -> None:
        # amqtt's handler builds a lock, two queues, an event and four dicts per connection that this class
        # never uses (issue 7 #4: ~8 KB of the 53 KB an idle connection cost): not calling its __init__ is deliberate
        self.hub = hub
        self.limits = limits
        self.session: Session | None = None
        self.reader = None
        self.writer = None
        self.plugins_manager = None
        self._loop = asyncio.get_running_loop()
        self._stream_reader: asyncio.StreamReader | None = stream_reader
        self._stream_protocol: Any = None
        self.transport: Any = stream_writer.transport
        self.identity: acl.Identity = None
        self.client_id = ""
        self.closing = False
        self.clean_disconnect = False
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._buffer = bytearray()
        self._skip = 0
        self._pending: deque[_Ticket] = deque()
        self._out: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None
        self._flushing = False  # inside data_received or _flush: whatever is queued is written at its end
        self._paused = False
        self._held = False  # paused because the writer is full (not because of this connection's own window)
        self._draining = False  # shutting down: nothing more is read; what was taken is answered
        self._keep_alive = 0.0
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._out_id = 0  # packet ids of our QoS 1 deliveries
        self._qos2: dict[int, tuple[str, bytes, bool]] = {}
        # a device uses a handful of topics, parsed once
        self._requests: dict[str, RequestTopic | DeviceRequest | None] = {}
        # sub-devices logged in through this (gateway) connection: their topics are its own (service/broker/gateways.py)
        self.sub_devices: set[tuple[str, str]] | frozenset[tuple[str, str]] = _NO_SUB_DEVICES

    # --- life cycle ----------------------------------------------------------------------------------
    def begin(self, session: Session, connack: bytes) -> None:
        """Send the CONNACK and take the transport over from amqtt's stream reader."""
        self.session = session
        device = session.attributes.get("device")
        self.identity = device if isinstance(device, tuple) else None
        self.client_id = session.client_id or ""
        self._keep_alive = 1.5 * session.keep_alive if session.keep_alive > 0 else 0.0
        transport = self.transport
        reader, self._stream_reader = self._stream_reader, None
        assert reader is not None
        self._stream_protocol = transport.get_protocol()
        # what the device sent after its CONNECT (while we were checking its login) is ours to parse
        buffered: bytearray = reader._buffer  # type: ignore[attr-defined]
        leftover = bytes(buffered)
        buffered.clear()
        at_eof = reader.at_eof() or reader.exception() is not None
        transport.set_protocol(self)
        if transport.is_closing():
            self._finish()
            return
        transport.write(connack)
        self._last_read = self._loop.time()
        if self._keep_alive:
            self._timer = self._loop.call_at(self._last_read + self._keep_alive, self._check_keep_alive)
        with contextlib.suppress(Exception):
            transport.resume_reading()  # the stream reader may have paused it (its buffer was full)
        if leftover:
            self.data_received(leftover)
        if at_eof and not self.closing:
            self.close(None)

    def refuse(self, connack: bytes) -> None:
        """Answer a refused CONNECT and close."""
        self.closing = True
        self.transport.write(connack)
        self.transport.close()
        self._finish()

    def close(self, reason: str | None, *, abort: bool = False) -> None:
        """Close the connection now; nothing more is read from it (``reason`` None: the device's own doing)."""
        if self.closing:
            return
        self.closing = True
        self._buffer.clear()
        self._skip = 0
        self._qos2.clear()
        if reason is not None:
            log.info("closing connection", client_id=self.client_id, reason=reason)
        if self._out and not abort:
            self._write_out()
        transport = self.transport
        if abort:
            transport.abort()
        else:
            transport.close()
        self._finish()

    def _finish(self) -> None:
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._pending.clear()
        self._out.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    def _limit(self, exc: LimitExceeded) -> None:
        # logged once: the connection closes right after
        metrics.LIMIT_HITS.labels(limit=exc.limit).inc()
        product, device = self.identity if self.identity is not None else (None, None)
        log.warning(
            "device past a limit, disconnecting",
            product=product,
            device=device,
            client_id=self.client_id,
            limit=exc.limit,
            reason=str(exc),
        )
        self.close(None, abort=exc.limit == "queued_bytes")

    def _violation(self, reason: str) -> None:
        metrics.PROTOCOL_VIOLATIONS.inc()
        product, device = self.identity if self.identity is not None else (None, None)
        log.warning(
            "protocol violation, closing", product=product, device=device, client_id=self.client_id, reason=reason
        )
        self.close(None)

    # --- amqtt's handler interface (the broker's session table calls these) ---------------------------
    async def stop(self) -> None:
        """amqtt's "stop the handler": close the connection."""
        self.close(None)

    async def handle_connection_closed(self) -> None:
        """The take-over path: drop the old connection at once (its peer is most likely gone)."""
        self.close(None, abort=True)

    async def mqtt_publish(
        self, topic: str, data: bytes, qos: int | None, retain: bool, ack_timeout: Any = None
    ) -> None:
        """amqtt's per-subscriber publish, written straight to the socket (no flow task, no 5 s wait)."""
        self.send(topic, bytes(data), qos or 0, retain=retain)

    def busy(self) -> bool:
        """Whether anything is still on its way to the device (drain on shutdown)."""
        if self.closing:
            return False
        return bool(self._out) or bool(self._pending) or self.transport.get_write_buffer_size() > 0

    # --- asyncio.Protocol ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # never called: taken over
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()
        # amqtt's stream objects wait on their own protocol (StreamWriter.wait_closed): tell it too
        if self._stream_protocol is not None:
            protocol, self._stream_protocol = self._stream_protocol, None
            with contextlib.suppress(Exception):
                protocol.connection_lost(exc)

    def eof_received(self) -> bool:
        self.close(None)
        return False

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self._last_read = self._loop.time()
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return
            data = data[self._skip :]
            self._skip = 0
        self._buffer += data
        self._flushing = True
        try:
            if not self._paused:
                self._process()
        finally:
            self._flushing = False
        self._flush()

    # --- parsing -------------------------------------------------------------------------------------
    def _process(self) -> None:
        buf = self._buffer
        size = len(buf)
        pos = 0
        limits = self.limits
        try:
            while pos < size and not self.closing:
                if len(self._pending) >= limits.max_inflight or self.hub.hold_back(self):
                    # backpressure: stop reading until some requests are answered (ready() resumes), or until
                    # the writer has room again (the hub calls resume())
                    self._held = len(self._pending) < limits.max_inflight
                    self._paused = True
                    self.transport.pause_reading()
                    break
                first = buf[pos]
                length, shift, index = 0, 0, pos + 1
                while True:
                    if index >= size:
                        return
                    byte = buf[index]
                    length |= (byte & 0x7F) << shift
                    index += 1
                    if not byte & 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        raise ProtocolViolation("malformed remaining length")
                if length > limits.max_packet_bytes:
                    consumed = self._oversized(first, buf, index, size, length)
                    if consumed < 0:
                        return  # need more of it before deciding
                    pos = consumed
                    continue
                end = index + length
                if end > size:
                    return
                self._packet(first, buf, index, end)
                pos = end
        except ProtocolViolation as exc:
            self._violation(str(exc))
        except UnicodeDecodeError:
            self._violation("string is not valid UTF-8")
        except LimitExceeded as exc:
            self._limit(exc)
        finally:
            if not self.closing:
                del buf[:pos]

    def _packet(self, first: int, buf: bytearray, start: int, end: int) -> None:
        kind, flags = first >> 4, first & 0x0F
        if kind == PUBLISH:
            self._publish(flags, buf, start, end)
            return
        if kind in (PUBACK, PUBREC, PUBREL, PUBCOMP):
            if end - start != 2:
                raise ProtocolViolation(f"packet type {kind} with remaining length {end - start}")
            if flags != (2 if kind == PUBREL else 0):
                raise ProtocolViolation(f"packet type {kind} with flags {flags:#x}")
            if kind == PUBREL:
                self._release(int.from_bytes(buf[start:end], "big"))
            # PUBACK/PUBREC/PUBCOMP: acknowledgements of our QoS 1 deliveries; nothing is retried while connected
            return
        if kind in (SUBSCRIBE, UNSUBSCRIBE):
            if flags != 2:
                raise ProtocolViolation(f"packet type {kind} with flags {flags:#x}")
            if kind == SUBSCRIBE:
                self._subscribe(buf, start, end)
            else:
                self._unsubscribe(buf, start, end)
            return
        if kind in (PINGREQ, DISCONNECT):
            if flags or end != start:
                raise ProtocolViolation(f"packet type {kind} malformed")
            if kind == PINGREQ:
                self._out.append(PINGRESP_PACKET)
            else:
                self.clean_disconnect = True
                self.close(None)
            return
        if kind == CONNECT:
            raise ProtocolViolation("second CONNECT [MQTT-3.1.0-2]")
        raise ProtocolViolation(f"packet type {kind} is not sent by clients")

    def _publish(self, flags: int, buf: bytearray, start: int, end: int) -> None:
        qos = (flags >> 1) & 0x03
        if qos == 3:
            raise ProtocolViolation("PUBLISH with QoS 3")
        if qos == 0 and flags & 0x08:
            raise ProtocolViolation("PUBLISH QoS 0 with DUP set [MQTT-3.3.1-2]")
        if end - start < 2:
            raise ProtocolViolation("PUBLISH without a topic")
        at = start + 2 + int.from_bytes(buf[start : start + 2], "big")
        if at > end:
            raise ProtocolViolation("PUBLISH topic runs past the packet")
        topic = buf[start + 2 : at].decode("utf-8")
        packet_id = 0
        if qos:
            if at + 2 > end:
                raise ProtocolViolation("PUBLISH without a packet identifier")
            packet_id = int.from_bytes(buf[at : at + 2], "big")
            at += 2
            if packet_id == 0:
                raise ProtocolViolation("PUBLISH with packet identifier 0 [MQTT-2.3.1-1]")
        if not valid_topic(topic):
            raise ProtocolViolation(f"invalid publish topic {topic!r}")
        if not acl.may_publish(self.identity, topic) and not self._sub_device_topic(topic):
            metrics.ACL_DENIALS.labels(action="publish").inc()
            raise ProtocolViolation(f"publish outside own topics {topic!r}")
        payload = bytes(buf[at:end])
        hub = self.hub
        ingest = hub.ingest
        requests = self._requests
        request = requests.get(topic, _UNPARSED)
        if request is _UNPARSED:
            if len(requests) >= 16:
                requests.clear()
            request = requests[topic] = parse_topic(topic)
        if isinstance(request, RequestTopic) and ingest is not None:
            if qos == 2:
                raise LimitExceeded("qos2_request", "QoS 2 on a request topic (the SDKs use QoS 1)")
            ticket = _Ticket(self, packet_id or None, request.reply_topic)
            self._pending.append(ticket)
            ingest.accept(
                request, payload, ticket, device=self.identity, client_id=self.client_id, online=self.sub_devices
            )
            return
        if request is not None and self._routed(request):
            # every other request on a device's topics is answered (its handler, or 1009) and relayed nowhere
            if qos == 2:
                raise LimitExceeded("qos2_request", "QoS 2 on a request topic (the SDKs use QoS 1)")
            assert isinstance(request, DeviceRequest) and hub.requests is not None
            ticket = _Ticket(self, packet_id or None, request.reply_topic)
            self._pending.append(ticket)
            hub.requests.accept(request, payload, ticket, self)
            return
        if qos == 2:
            if packet_id not in self._qos2:
                if len(self._qos2) >= self.limits.max_qos2_inflight:
                    raise LimitExceeded("qos2_inflight", f"more than {self.limits.max_qos2_inflight} QoS 2 in flight")
                self._qos2[packet_id] = (topic, payload, bool(flags & 0x01))
            self._out.append(_ack(0x50, packet_id))  # PUBREC; delivery on PUBREL
            return
        hub.deliver(topic, payload, qos)
        if flags & 0x01:
            hub.retain(topic, payload, qos)
        if qos == 1:
            ticket = _Ticket(self, packet_id, None)
            ticket.done = True  # nothing to wait for, but its PUBACK keeps its place behind earlier requests
            self._pending.append(ticket)

    def _routed(self, request: RequestTopic | DeviceRequest) -> bool:
        """Whether a non-measurement-point ``request`` goes to the request router (not relayed as plain MQTT).

        A device's answer on a ``_reply`` topic (to a cloud-to-device message) is relayed, unless a route serves it.
        """
        return (
            isinstance(request, DeviceRequest)
            and self.hub.requests is not None
            and (request.route is not None or request.reply_topic is not None)
        )

    def _sub_device_topic(self, topic: str) -> bool:
        """Whether ``topic`` lies in the tree of a sub-device logged in through this connection (the slow path:
        only a publish outside the device's own trees gets here)."""
        return bool(self.sub_devices) and topic_device(topic) in self.sub_devices

    def _release(self, packet_id: int) -> None:
        message = self._qos2.pop(packet_id, None)
        if message is not None:
            topic, payload, retain = message
            self.hub.deliver(topic, payload, 2)
            if retain:
                self.hub.retain(topic, payload, 2)
        self._out.append(_ack(0x70, packet_id))  # PUBCOMP, also for an id we no longer know [MQTT-4.3.3]

    def _strings(self, buf: bytearray, at: int, end: int, *, with_qos: bool) -> list[tuple[str, int]]:
        found: list[tuple[str, int]] = []
        while at < end:
            if at + 2 > end:
                raise ProtocolViolation("topic filter length runs past the packet")
            stop = at + 2 + int.from_bytes(buf[at : at + 2], "big")
            if stop + (1 if with_qos else 0) > end:
                raise ProtocolViolation("topic filter runs past the packet")
            text = buf[at + 2 : stop].decode("utf-8")
            qos = 0
            if with_qos:
                options = buf[stop]
                if options > 2:
                    raise ProtocolViolation(f"SUBSCRIBE requested QoS byte {options:#x} [MQTT-3.8.3-4]")
                qos = options
                stop += 1
            if not text or "\x00" in text:
                raise ProtocolViolation("empty topic filter or one with U+0000")
            found.append((text, qos))
            at = stop
        if not found:
            raise ProtocolViolation("no topic filter [MQTT-3.8.3-3, MQTT-3.10.3-2]")
        return found

    def _packet_id(self, buf: bytearray, start: int, end: int) -> int:
        if end - start < 2:
            raise ProtocolViolation("packet without a packet identifier")
        packet_id = int.from_bytes(buf[start : start + 2], "big")
        if packet_id == 0:
            raise ProtocolViolation("packet identifier 0 [MQTT-2.3.1-1]")
        return packet_id

    def _subscribe(self, buf: bytearray, start: int, end: int) -> None:
        packet_id = self._packet_id(buf, start, end)
        filters = self._strings(buf, start + 2, end, with_qos=True)
        session = self.session
        assert session is not None
        hub = self.hub
        codes = bytes(
            hub.subscribe(session, topic_filter, qos) if valid_filter(topic_filter) else 0x80
            for topic_filter, qos in filters
        )
        self._out.append(bytes((0x90,)) + encode_length(2 + len(codes)) + packet_id.to_bytes(2, "big") + codes)
        for (topic_filter, _), code in zip(filters, codes, strict=True):
            if code != 0x80:
                for topic, data, qos in hub.retained_for(topic_filter):
                    self.send(topic, data, min(qos, code), retain=True)

    def _unsubscribe(self, buf: bytearray, start: int, end: int) -> None:
        packet_id = self._packet_id(buf, start, end)
        session = self.session
        assert session is not None
        for topic_filter, _ in self._strings(buf, start + 2, end, with_qos=False):
            self.hub.unsubscribe(session, topic_filter)
        self._out.append(_ack(0xB0, packet_id))

    def _oversized(self, first: int, buf: bytearray, index: int, size: int, length: int) -> int:
        """Read past an oversized PUBLISH without keeping it (H4); the buffer position after what it consumed.

        Returns -1 while its topic has not fully arrived yet. Anything but a PUBLISH within `SKIP_FACTOR` times
        the limit closes the connection.
        """
        limits = self.limits
        qos = (first >> 1) & 0x03
        if first >> 4 != PUBLISH or length > SKIP_FACTOR * limits.max_packet_bytes or qos == 3:
            raise ProtocolViolation(f"oversized packet ({length} bytes)")
        if index + 2 > size:
            return -1
        topic_end = index + 2 + int.from_bytes(buf[index : index + 2], "big")
        head_end = topic_end + (2 if qos else 0)
        if head_end > size:
            return -1
        topic = buf[index + 2 : topic_end].decode("utf-8")
        if not valid_topic(topic):
            # as for a PUBLISH of normal size; and never answer (1008) on a topic with wildcards
            raise ProtocolViolation(f"invalid publish topic {topic!r}")
        if not acl.may_publish(self.identity, topic) and not self._sub_device_topic(topic):
            metrics.ACL_DENIALS.labels(action="publish").inc()
            raise ProtocolViolation(f"publish outside own topics {topic!r}")
        if qos == 2:
            raise LimitExceeded("qos2_request", "oversized QoS 2 PUBLISH")
        packet_id = int.from_bytes(buf[topic_end:head_end], "big") if qos else 0
        if qos and packet_id == 0:
            raise ProtocolViolation("PUBLISH with packet identifier 0 [MQTT-2.3.1-1]")
        end = index + length
        log.info("oversized publish skipped", client_id=self.client_id, bytes=length)
        request = parse_topic(topic)
        ingest = self.hub.ingest
        reply_topic = request.reply_topic if request is not None else None
        ticket = _Ticket(self, packet_id or None, reply_topic)
        self._pending.append(ticket)
        prefix = bytes(buf[head_end : min(size, head_end + PEEK_BYTES)])  # what has arrived of its payload
        if isinstance(request, RequestTopic) and ingest is not None:
            ingest.reject_oversize(request, length, ticket, client_id=self.client_id, request_id=peek_id(prefix))
        elif request is not None and reply_topic is not None and self._routed(request):
            detail = replies.too_large(length, self.limits.max_packet_bytes, what="packet")
            metrics.REPLIES.labels(code=str(int(ReplyCode.MESSAGE_TOO_LARGE))).inc()
            ticket.answer(replies.encode(peek_id(prefix), ReplyCode.MESSAGE_TOO_LARGE, detail))
        else:
            ticket.done = True
        if end > size:
            self._skip = end - size
            return size
        return end

    # --- writing -------------------------------------------------------------------------------------
    def send(self, topic: str, data: bytes, qos: int, *, retain: bool = False) -> None:
        """Queue a PUBLISH to the device (QoS 0 or 1; QoS 2 subscriptions are granted QoS 1)."""
        if self.closing:
            return
        qos = min(qos, 1)
        packet_id = 0
        if qos:
            self._out_id = packet_id = self._out_id % 65535 + 1
        self._out.append(encode_publish(topic.encode("utf-8"), data, qos, packet_id, retain=retain))
        self._schedule_flush()

    def ready(self) -> None:
        """A ticket was answered: flush in turn, once per loop iteration however many were."""
        self._schedule_flush()

    def resume(self) -> None:
        """The writer has room again: read on (if this connection's own window allows)."""
        if self._draining:
            return
        self._held = False
        if self._paused and not self.closing:
            self._flush()

    def stop_reading(self) -> None:
        """Shutdown: read nothing more from the device, so the drain only has to answer what was already taken
        (what the device sent after it is neither acknowledged nor lost: the device sends it again)."""
        if self.closing or self._draining:
            return
        self._draining = self._held = self._paused = True
        self.transport.pause_reading()

    def _schedule_flush(self) -> None:
        if self._flush_handle is None and not self._flushing:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self.closing:
            return
        self._flushing = True
        try:
            self._flush_now()
        finally:
            self._flushing = False

    def _flush_now(self) -> None:
        pending = self._pending
        out = self._out
        was_paused = self._paused
        while True:
            while pending and pending[0].done:
                ticket = pending.popleft()
                if ticket.reply is not None and ticket.reply_topic is not None:
                    # written before the PUBACK, in the same write; other subscribers get it their own way
                    self.hub.deliver(ticket.reply_topic, ticket.reply, 1)
                if ticket.packet_id is not None:
                    out.append(_ack(0x40, ticket.packet_id))
            if self._paused and not self._held and not self.closing and len(pending) < self.limits.max_inflight:
                # room again: parse what is buffered (it may answer at once, and pause again); while draining
                # _held stays set, so nothing more is parsed
                self._paused = False
                self._process()
                continue
            break
        if out and not self.closing:
            self._write_out()
        if was_paused and not self._paused and not self.closing:
            self.transport.resume_reading()

    def _write_out(self) -> None:
        out = self._out
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        transport = self.transport
        transport.write(data)
        queued = transport.get_write_buffer_size()
        if queued > self.limits.max_queued_bytes:
            self._limit(LimitExceeded("queued_bytes", f"{queued} bytes queued towards a device that does not read"))

    # --- keep-alive (H2) -----------------------------------------------------------------------------
    def _check_keep_alive(self) -> None:
        self._timer = None
        if self.closing:
            return
        deadline = self._last_read + self._keep_alive
        now = self._loop.time()
        if self._paused or now < deadline:
            # paused by us: the device is not silent, we are not listening
            when = max(deadline, now + 1.0) if self._paused else deadline
            self._timer = self._loop.call_at(when, self._check_keep_alive)
            return
        log.info("keep-alive expired, closing", client_id=self.client_id)
        self.close(None, abort=True)
