"""Test support: pointgate running for real in a background thread, and a device speaking real MQTT (paho)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import asyncpg
import paho.mqtt.client as mqtt

from service.app import Service
from service.settings import Settings

T = TypeVar("T")

SAMPLE = {
    "id": "123",
    "version": "1.0",
    "method": "thing.measurepoint.resume",
    "params": {
        "measurepoints": {"temp": 1.02, "branchCurr": ["1.02", "2.02", "7.93"], "Power": {"value": 1, "quality": 9}},
        "time": 1700000000000,
    },
}


def resume_topic(pk: str = "inverter01", dk: str = "dev1", *, batch: bool = False, api: str = "resume") -> str:
    """The request topic of a device."""
    return f"/sys/{pk}/{dk}/thing/measurepoint/{api}" + ("/batch" if batch else "")


class RunningService:
    """A real `Service` on its own event loop thread, so tests can drive it with blocking MQTT clients."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="pointgate-test", daemon=True)
        self._thread.start()
        self.service = Service(settings)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run ``coro`` on the service's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> RunningService:
        self.call(self.service.start())
        return self

    def stop(self) -> None:
        try:
            self.call(self.service.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    @property
    def port(self) -> int:
        return self.service.mqtt_port

    @property
    def http_port(self) -> int:
        assert self.service.ops is not None
        return self.service.ops.port


def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """Run one query against the test database (from a test's own thread)."""

    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


class Device:
    """A device over real MQTT 3.1.1 (paho), with blocking helpers that wait for replies."""

    def __init__(
        self,
        port: int,
        client_id: str = "dev1",
        *,
        username: str | None = None,
        password: str | None = None,
        clean_session: bool = True,
        keepalive: int = 60,
    ) -> None:
        self.port = port
        self.keepalive = keepalive
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=clean_session
        )
        if username is not None or password is not None:
            self.client.username_pw_set(username, password)
        self.messages: list[tuple[str, bytes, int]] = []
        self._cond = threading.Condition()
        self.connack: int | None = None
        self._connected = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.disconnected = threading.Event()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
        self.connack = reason.value if hasattr(reason, "value") else int(reason)
        self._connected.set()

    def _on_disconnect(self, *args: Any) -> None:
        self.disconnected.set()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((message.topic, bytes(message.payload), message.qos))
            self._cond.notify_all()

    def connect(self, timeout: float = 5) -> int:
        """Connect; return the CONNACK code (0 = accepted)."""
        self.client.reconnect_delay_set(60, 120)  # a refused device must not retry during the test
        self.client.connect("127.0.0.1", self.port, keepalive=self.keepalive)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            raise TimeoutError("no CONNACK")
        assert self.connack is not None
        return self.connack

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5) -> list[int]:
        """Subscribe and wait for the SUBACK; return its codes (128 = refused)."""
        done = threading.Event()
        codes: list[int] = []

        def on_subscribe(client: Any, userdata: Any, mid: int, reasons: Any, properties: Any = None) -> None:
            codes.extend(r.value if hasattr(r, "value") else int(r) for r in reasons)
            done.set()

        self.client.on_subscribe = on_subscribe
        self.client.subscribe(topic, qos)
        if not done.wait(timeout):
            raise TimeoutError("no SUBACK")
        return codes

    def publish(self, topic: str, payload: bytes | str | dict[str, Any], qos: int = 1) -> mqtt.MQTTMessageInfo:
        data = json.dumps(payload) if isinstance(payload, dict) else payload
        return self.client.publish(topic, data, qos=qos)

    def wait_message(self, topic: str, timeout: float = 5, *, after: int = 0) -> tuple[str, bytes, int]:
        """The first message on ``topic`` received at index ``after`` or later."""
        with self._cond:
            ok = self._cond.wait_for(lambda: any(t == topic for t, _, _ in self.messages[after:]), timeout)
            if not ok:
                raise TimeoutError(f"nothing on {topic} within {timeout}s")
            return next(m for m in self.messages[after:] if m[0] == topic)

    def request(
        self, topic: str, payload: bytes | str | dict[str, Any], *, timeout: float = 5, subscribe: bool = True
    ) -> dict[str, Any]:
        """Publish a request (QoS 1) and return the decoded reply from ``topic + '_reply'``."""
        if subscribe:
            self.subscribe(topic + "_reply")
        mark = len(self.messages)
        self.publish(topic, payload)
        _, body, _ = self.wait_message(topic + "_reply", timeout, after=mark)
        reply: dict[str, Any] = json.loads(body)
        return reply

    def close(self) -> None:
        self.client.disconnect()
        # paho's network thread clears client._thread as it ends; when the broker closes at once after the
        # DISCONNECT, that can happen between loop_stop's check and its join (AttributeError on None)
        thread = self.client._thread
        if thread is not None:
            self.client._thread_terminate = True
            thread.join(10)
            self.client._thread = None


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports nothing listens on right now (all held open while choosing, so two calls
    in a row cannot hand out the same port twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def free_port() -> int:
    """One loopback port nothing listens on right now."""
    return free_ports(1)[0]
