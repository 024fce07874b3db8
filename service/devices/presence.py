"""Who is connected, in the database; and registry changes reaching live connections.

`Presence` is the ``serve`` side of ``pointgate device list`` and ``device disable``/``rotate``/``delete``:

* The broker tells it of every signed-in device's connect and disconnect (`on_session`, synchronous and
  cheap: an event goes on a bounded queue). A background task writes them to ``device_sessions``, and every
  `HEARTBEAT_SECONDS` refreshes ``last_seen`` for the devices still connected here, so a ``serve`` that was
  killed stops counting as online after ``ONLINE_WITHIN_SECONDS`` (registry.py).
* It LISTENs on the ``pointgate_devices`` channel, which a trigger on ``devices`` notifies (migration 0006)
  whichever process changed the row. A device disabled, deleted or given a new secret has its cached
  credentials dropped and its live connections closed; it must log in again, and cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg

from service.ops.logs import get_logger

log = get_logger("pointgate.presence")

HEARTBEAT_SECONDS = 30.0
CHANNEL = "pointgate_devices"
_MAX_PENDING = 100_000  # connect/disconnect events waiting for the database; beyond it the oldest are dropped
_RETRY_SECONDS = 2.0


class Broker(Protocol):
    """What presence needs from the broker (service.broker.overrides.PointgateBroker)."""

    on_session: Callable[[bool, Any], None] | None

    def close_device(self, product_key: str, device_key: str) -> int:
        """Close the device's live connections; return how many."""


class CredentialCache(Protocol):
    """What presence needs from the authenticator (service.devices.auth.DeviceAuthenticator)."""

    def forget(self, product_key: str, device_key: str) -> None:
        """Drop the device's cached credentials."""


@dataclass(frozen=True, slots=True)
class _Event:
    connected: bool
    product_key: str
    device_key: str
    client_id: str
    peer: str | None


class Presence:
    """Records connections in ``device_sessions`` and applies registry changes to live connections."""

    def __init__(
        self,
        dsn: str,
        pool: asyncpg.Pool,
        broker: Broker,
        credentials: CredentialCache,
        *,
        schema_ready: asyncio.Event,
    ) -> None:
        self._dsn = dsn
        self._pool = pool
        self._broker = broker
        self._credentials = credentials
        self._schema_ready = schema_ready
        self.instance = f"{socket.gethostname()}:{os.getpid()}"
        self._events: deque[_Event] = deque(maxlen=_MAX_PENDING)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.listening = asyncio.Event()
        # other channels this serve listens on, on the same connection (app.py adds the model reload)
        self.channels: dict[str, Callable[[str], None]] = {}
        broker.on_session = self.on_session

    def start(self) -> None:
        """Start writing sessions and listening for registry changes."""
        self._tasks = [asyncio.create_task(self._write_loop()), asyncio.create_task(self._listen_loop())]

    async def stop(self) -> None:
        """Stop; mark this instance's devices offline (they are disconnected by now)."""
        self._closed = True  # the driver may turn a cancellation into its own error: the loops check this too
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        if self._schema_ready.is_set():
            # bounded: a database that is slow or away must not hold up the shutdown (the rows go stale instead,
            # and count as offline after ONLINE_WITHIN_SECONDS)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._goodbye(), 2)

    async def _goodbye(self) -> None:
        await self._flush()
        await self._pool.execute(
            "UPDATE device_sessions SET online = false, last_seen = now() WHERE instance = $1 AND online", self.instance
        )

    def on_session(self, connected: bool, session: Any) -> None:
        """The broker's hook: a signed-in device connected or disconnected (anonymous sessions are not kept)."""
        device = session.attributes.get("device")
        if not isinstance(device, tuple):
            return
        product_key, device_key = device
        client_id = str(session.client_id)
        prefix = f"{product_key}/{device_key}/"  # the broker keys sessions by device (B10); show what was sent
        client_id = client_id.removeprefix(prefix)
        address = getattr(session, "remote_address", None)
        peer = f"{address}:{session.remote_port}" if address else None
        self._events.append(_Event(connected, product_key, device_key, client_id, peer))
        self._wake.set()

    async def _write_loop(self) -> None:
        await self._schema_ready.wait()
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), HEARTBEAT_SECONDS)
            self._wake.clear()
            try:
                await self._flush()
                await self._pool.execute(
                    "UPDATE device_sessions SET last_seen = now() WHERE instance = $1 AND online", self.instance
                )
            except Exception as exc:  # the database is down: the events wait (bounded) and go when it is back
                log.warning("could not record device sessions", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(_RETRY_SECONDS)
                self._wake.set()

    async def _flush(self) -> None:
        while self._events:
            event = self._events[0]
            if event.connected:
                await self._pool.execute(
                    """
                    INSERT INTO device_sessions AS s
                        (product_key, device_key, online, client_id, peer, instance, connected_at, last_seen)
                    VALUES ($1, $2, true, $3, $4, $5, now(), now())
                    ON CONFLICT (product_key, device_key) DO UPDATE SET
                        online = true, client_id = $3, peer = $4, instance = $5, connected_at = now(),
                        last_seen = now()
                    """,
                    event.product_key,
                    event.device_key,
                    event.client_id,
                    event.peer,
                    self.instance,
                )
            else:
                # only the connection that is recorded goes offline: a takeover may have replaced it already
                await self._pool.execute(
                    """
                    UPDATE device_sessions SET online = false, last_seen = now()
                    WHERE product_key = $1 AND device_key = $2 AND client_id = $3 AND instance = $4
                      AND peer IS NOT DISTINCT FROM $5
                    """,
                    event.product_key,
                    event.device_key,
                    event.client_id,
                    self.instance,
                    event.peer,
                )
            self._events.popleft()

    async def _listen_loop(self) -> None:
        while not self._closed:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=5)
                await conn.add_listener(CHANNEL, self._on_notify)
                for channel, handler in self.channels.items():
                    await conn.add_listener(channel, _adapt(handler))
                self.listening.set()
                while True:  # a dead connection shows only when used
                    await asyncio.sleep(_RETRY_SECONDS)
                    await asyncio.wait_for(conn.execute("SELECT 1"), 5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.listening.clear()
                log.debug("registry listener reconnecting", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(_RETRY_SECONDS)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2)

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        """A ``pointgate_devices`` notification."""
        try:
            change = json.loads(str(payload))
            product_key, device_key, what = change["productKey"], change["deviceKey"], change["change"]
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable registry notification", payload=str(payload)[:200])
            return
        self.apply(product_key, device_key, what)

    def apply(self, product_key: str, device_key: str, change: str) -> None:
        """A registry change: forget cached credentials; close live connections unless it was an enable."""
        self._credentials.forget(product_key, device_key)
        if change == "enabled":
            return
        closed = self._broker.close_device(product_key, device_key)
        log.info("device changed in the registry", product=product_key, device=device_key, change=change, closed=closed)


def _adapt(handler: Callable[[str], None]) -> Callable[[Any, int, str, object], None]:
    def listener(conn: Any, pid: int, channel: str, payload: object) -> None:
        handler(str(payload))

    return listener
