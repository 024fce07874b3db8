"""The connection to the cluster broker: paho-mqtt driven by asyncio, with PUBACKs sent only when told.

paho-mqtt 2.x is the client because it is the one well-kept Python client whose manual acknowledgement is
a documented API on both MQTT 3.1.1 and 5 (``manual_ack=True`` + ``Client.ack(mid, qos)``); the research
(reference/cluster-broker.md §2) measured it at 30 µs per message and compares the others. paho's core is
synchronous, so this module drives it through its external-loop API: the socket is registered with the
asyncio loop (``loop_read`` when readable, ``loop_write`` when paho has bytes to send), and ``loop_misc``
runs every second for keep-alive. Everything runs on the event loop's thread, except the blocking TCP/TLS
connect, which runs in a worker thread before the socket is handed to the loop.

Each connection has a *generation*. A PUBACK names a packet id of one connection; after a reconnect the same
id means another message, so an ack of an older generation is dropped (the broker redelivers that message
or, on EMQX, hands it to another consumer: idempotent writes make either harmless).

The link reconnects by itself with back-off (1 s doubling to 30 s) and re-subscribes on every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from service.ops.logs import get_logger

log = get_logger(__name__)

_BACKOFF_FIRST, _BACKOFF_MAX = 1.0, 30.0
_CONNACK_TIMEOUT = 10.0
# Replies are published at QoS 1. paho's own limit on unacknowledged publishes is switched off (0): with a
# limit it rescans every outstanding message on each PUBACK (measured: 1.9 ms per reply at 3,000 in flight).
# The link applies the limit itself instead: the broker's Receive Maximum from CONNACK on MQTT 5 (a client that
# exceeds it is disconnected), none on 3.1.1 (which has no such limit).
_NO_LIMIT = 65535


@dataclass(frozen=True, slots=True)
class LinkOptions:
    """How to reach the broker and what to subscribe to."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    client_id: str = ""
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive: int = 30
    session_expiry: int = 0
    filters: tuple[str, ...] = ()
    receive_maximum: int = 1000
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """One PUBLISH received from the broker."""

    generation: int
    mid: int
    qos: int
    dup: bool
    topic: str
    payload: bytes


def default_client_id() -> str:
    """Unique per consumer: two consumers sharing an id would keep taking each other's session over.

    Host and PID say where it runs; the random part keeps two consumers in one process apart. A persistent
    session (``session_expiry`` > 0) needs a stable id instead, given by the operator.
    """
    return f"pointgate-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class BrokerLink:
    """One MQTT client connection, kept up by `run` until `close`."""

    def __init__(self, options: LinkOptions, on_message: Callable[[Delivery], None]) -> None:
        self.options = options
        self._on_delivery = on_message
        self.generation = 0
        self.connected = False
        self.subscribed = False
        self.problem: str | None = "not connected yet"
        self._closing = False
        self._paused = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: Any = None
        self._connack: asyncio.Future[int] | None = None
        self._suback: asyncio.Future[list[int]] | None = None
        self._unsuback: asyncio.Future[None] | None = None
        self._lost = asyncio.Event()
        self._closed = asyncio.Event()
        self._unacked_replies: set[int] = set()
        self._waiting_replies: deque[tuple[str, bytes]] = deque()
        self._reply_window = _NO_LIMIT
        self.replies_in_flight_peak = 0  # most replies unacknowledged by the broker at once (ops insight, tests)
        self._client_id = options.client_id or default_client_id()
        self._client = self._make_client()

    # -- the paho client ----------------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        opts = self.options
        v5 = opts.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else opts.session_expiry == 0,
            manual_ack=True,
        )
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        if opts.username is not None:
            client.username_pw_set(opts.username, opts.password)
        if opts.tls:
            context = ssl.create_default_context(cafile=opts.cafile)
            if opts.certfile:
                context.load_cert_chain(opts.certfile, opts.keyfile)
            client.tls_set_context(context)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        return client

    def _connect_blocking(self) -> None:
        opts = self.options
        if opts.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = opts.session_expiry
            # the broker sends at most this many unacknowledged messages: our in-flight bound, enforced by it
            properties.ReceiveMaximum = opts.receive_maximum
            self._client.connect(
                opts.host, opts.port, opts.keepalive, clean_start=opts.session_expiry == 0, properties=properties
            )
        else:
            self._client.connect(opts.host, opts.port, opts.keepalive)

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, subscribe, and reconnect after every loss, until `close`."""
        self._loop = asyncio.get_running_loop()
        delay = _BACKOFF_FIRST
        while not self._closing:
            try:
                await self._connect_once()
            except Exception as exc:
                self.problem = f"broker {self.options.host}:{self.options.port}: {_describe(exc)}"
                log.warning("broker unreachable, retrying", error=self.problem, retry_in=delay)
                self._drop_socket()
                await self._sleep_unless_closing(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
                continue
            delay = _BACKOFF_FIRST
            misc = asyncio.create_task(self._misc())
            try:
                await self._lost.wait()
            finally:
                misc.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await misc
            if not self._closing:
                log.warning("broker connection lost, reconnecting", error=self.problem)
                await self._sleep_unless_closing(_BACKOFF_FIRST)

    async def _connect_once(self) -> None:
        assert self._loop is not None
        self._lost = asyncio.Event()
        self._connack = self._loop.create_future()
        self.generation += 1
        self._paused = False  # a new connection is read from the start (its CONNACK); the consumer re-pauses
        await asyncio.to_thread(self._connect_blocking)
        if self._sock is None:  # pragma: no cover - paho opened no socket but raised nothing
            raise ConnectionError("no socket")
        self._loop.add_reader(self._sock, self._read)
        self._loop.add_writer(self._sock, self._write)  # flush the CONNECT paho may still hold
        code = await asyncio.wait_for(self._connack, _CONNACK_TIMEOUT)
        if code != 0:
            raise ConnectionRefusedError(f"CONNACK refused: {mqtt.connack_string(code)} ({code})")
        self.connected = True
        self._suback = self._loop.create_future()
        self._client.subscribe([(f, 1) for f in self.options.filters])
        codes = await asyncio.wait_for(self._suback, _CONNACK_TIMEOUT)
        refused = [f for f, c in zip(self.options.filters, codes, strict=False) if c >= 0x80]
        if refused:
            raise ConnectionRefusedError(f"subscription refused by the broker: {', '.join(refused)}")
        self.subscribed = True
        self.problem = None
        log.info(
            "broker connected",
            broker=f"{self.options.host}:{self.options.port}",
            client_id=self._client_id,
            protocol=self.options.protocol,
            filters=list(self.options.filters),
        )

    async def _misc(self) -> None:
        while True:
            await asyncio.sleep(1)
            if self._client.loop_misc() != mqtt.MQTT_ERR_SUCCESS:
                self._mark_lost("keep-alive failed")
                return

    async def _sleep_unless_closing(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), seconds)

    async def unsubscribe(self, seconds: float = 5.0) -> None:
        """Leave the shared subscriptions (first step of a drain): the broker sends the others new messages."""
        if not self.connected or self._loop is None:
            return
        self._unsuback = self._loop.create_future()
        self._client.unsubscribe(list(self.options.filters))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._unsuback, seconds)
        self.subscribed = False

    async def close(self, seconds: float = 2.0) -> None:
        """Send what paho still holds (replies, PUBACKs), DISCONNECT, and stop reconnecting."""
        self._closing = True
        self._closed.set()
        if self.connected:
            deadline = asyncio.get_running_loop().time() + seconds
            # paho signals nothing when its buffer empties, so look every 10 ms for at most ``seconds``
            while self._client.want_write() and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            self._client.disconnect()
            self._write()
        self._drop_socket()
        self._lost.set()

    # -- used by the consumer -----------------------------------------------------------------------------

    def ack(self, generation: int, mid: int, qos: int) -> bool:
        """PUBACK one message, if it came on the current connection (else the broker will redeliver it)."""
        if qos == 0 or generation != self.generation or not self.connected:
            return False
        self._client.ack(mid, qos)
        return True

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 (paho queues it while the connection is down and sends it after reconnecting)."""
        if len(self._unacked_replies) >= self._reply_window or self._waiting_replies:
            self._waiting_replies.append((topic, payload))
            return
        info = self._client.publish(topic, payload, qos=1)
        self._unacked_replies.add(info.mid)
        self.replies_in_flight_peak = max(self.replies_in_flight_peak, len(self._unacked_replies))

    def pause(self) -> None:
        """Stop reading from the broker (in-flight bound reached); TCP flow control holds the rest."""
        if not self._paused and self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock)
        self._paused = True

    def resume(self) -> None:
        """Read again."""
        if self._paused and self._sock is not None and self._loop is not None:
            self._loop.add_reader(self._sock, self._read)
            self._loop.call_soon(self._read)  # bytes may have arrived while paused
        self._paused = False

    @property
    def reply_window(self) -> int:
        """Most replies unacknowledged at once: the broker's Receive Maximum (MQTT 5), else unlimited (65535)."""
        return self._reply_window

    @property
    def outgoing_pending(self) -> int:
        """Replies published but not yet acknowledged by the broker."""
        return len(self._unacked_replies) + len(self._waiting_replies)

    # -- socket plumbing ----------------------------------------------------------------------------------

    def _read(self) -> None:
        if self._paused or self._sock is None:
            return
        try:
            while True:
                rc = self._client.loop_read()
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    self._mark_lost(mqtt.error_string(rc))
                    return
                # TLS may hold decoded bytes the socket no longer signals as readable
                sock = self._client.socket()
                if self._paused or sock is None or not (hasattr(sock, "pending") and sock.pending() > 0):
                    return
        except Exception as exc:
            self._mark_lost(_describe(exc))

    def _write(self) -> None:
        if self._sock is None:
            return
        try:
            rc = self._client.loop_write()
        except Exception as exc:
            self._mark_lost(_describe(exc))
            return
        if rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
            self._mark_lost(mqtt.error_string(rc))

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # called in the connect thread: only remember it; the loop registers it after connect returns
        self._sock = sock

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._loop is not None and sock is self._sock:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
            self._sock = None

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._loop is not None and sock is self._sock:
            if threading_ok(self._loop):
                self._loop.add_writer(sock, self._write)
            else:  # during connect, from the worker thread
                self._loop.call_soon_threadsafe(self._add_writer_if_current, sock)

    def _add_writer_if_current(self, sock: Any) -> None:
        if sock is self._sock and self._loop is not None:
            self._loop.add_writer(sock, self._write)

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._loop is not None and sock is self._sock and threading_ok(self._loop):
            self._loop.remove_writer(sock)

    def _drop_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None and self._loop is not None:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        if sock is not None:
            # paho closes it again on its next connect; closing here ends a half-open or refused connection now
            with contextlib.suppress(OSError):
                sock.close()

    def _mark_lost(self, reason: str) -> None:
        self.connected = False
        self.subscribed = False
        self.problem = f"broker connection lost: {reason}"
        self._drop_socket()
        self._lost.set()
        for waiter in (self._connack, self._suback, self._unsuback):
            if waiter is not None and not waiter.done():
                waiter.set_exception(ConnectionError(reason))

    # -- paho callbacks (on the loop's thread) ------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        maximum = getattr(properties, "ReceiveMaximum", None) if self.options.protocol == "5" else None
        self._reply_window = int(maximum) if maximum else _NO_LIMIT
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(int(reason.value) if hasattr(reason, "value") else int(reason))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if not self._closing:
            self._mark_lost(str(reason))

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        if self._suback is not None and not self._suback.done():
            self._suback.set_result([int(r.value) if hasattr(r, "value") else int(r) for r in reasons])

    def _on_unsubscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        if self._unsuback is not None and not self._unsuback.done():
            self._unsuback.set_result(None)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self._unacked_replies.discard(mid)
        while self._waiting_replies and len(self._unacked_replies) < self._reply_window:
            topic, payload = self._waiting_replies.popleft()
            self._unacked_replies.add(self._client.publish(topic, payload, qos=1).mid)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._on_delivery(
            Delivery(
                self.generation, message.mid, message.qos, bool(message.dup), message.topic, bytes(message.payload)
            )
        )


def threading_ok(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether we are on ``loop``'s own thread (paho calls some hooks from the connect thread)."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
