"""Who may connect: checks a CONNECT's EnOS login against the device registry.

The broker calls `DeviceAuthenticator.authenticate` once per CONNECT and refuses the connection unless the
result is ``ok``. Credentials are cached per device for ``cache_seconds`` (misses too), so a device
retrying in a loop, or a fleet reconnecting after a restart, costs one query per device per period; a
disabled device or a rotated secret therefore takes effect within that period. Concurrent logins of the
same device share one query.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from service.devices.registry import get_credentials
from service.devices.secretbox import SecretBox
from service.errors import LoginRefused
from service.ops.logs import get_logger
from service.ops.metrics import AuthFailureReason
from service.protocol.signing import parse_login, verify_password

_Key = tuple[str, str]
_Credentials = tuple[str, bool] | None

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class AuthResult:
    """The verdict on one CONNECT.

    On success ``product_key``/``device_key`` are the device's (both None for an allowed anonymous client).
    On refusal they are the keys the client *claimed*, when its login could be read: for logging only.
    """

    ok: bool
    product_key: str | None
    device_key: str | None
    reason: AuthFailureReason | None


class DeviceAuthenticator:
    """Checks EnOS secure-mode-2 logins against the registry, with a short credentials cache."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        box: SecretBox,
        *,
        allow_anonymous: bool,
        cache_seconds: float = 5.0,
        max_cached: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._box = box
        self._allow_anonymous = allow_anonymous
        self._cache_seconds = cache_seconds
        self._max_cached = max_cached
        self._clock = clock
        self._cache: dict[_Key, tuple[float, _Credentials]] = {}  # key -> (expires at, credentials)
        self._inflight: dict[_Key, asyncio.Task[_Credentials]] = {}

    async def authenticate(self, client_id: str | None, username: str | None, password: str | None) -> AuthResult:
        """Decide whether this CONNECT may proceed; never raises (a database failure is ``unavailable``)."""
        if not username and not password:
            if self._allow_anonymous:
                return AuthResult(True, None, None, None)
            return AuthResult(False, None, None, "anonymous_refused")
        try:
            req = parse_login(client_id or "", username)
        except LoginRefused as exc:
            return AuthResult(False, None, None, exc.reason)

        def refused(reason: AuthFailureReason) -> AuthResult:
            return AuthResult(False, req.product_key, req.device_key, reason)

        try:
            credentials = await self._credentials((req.product_key, req.device_key))
        except Exception:
            # our fault, not the device's: log it (without the password) and let the device retry
            log.exception("auth.credentials_unavailable", product=req.product_key, device=req.device_key)
            return refused("unavailable")
        if credentials is None:
            return refused("unknown_device")
        secret, enabled = credentials
        if not verify_password(req, secret, password):
            return refused("bad_signature")
        # after the signature, so only the device itself can learn that it is disabled
        if not enabled:
            return refused("disabled")
        return AuthResult(True, req.product_key, req.device_key, None)

    def forget(self, product_key: str, device_key: str) -> None:
        """Drop a device's cached credentials (for callers that know the registry just changed)."""
        self._cache.pop((product_key, device_key), None)

    async def _credentials(self, key: _Key) -> _Credentials:
        cached = self._cache.get(key)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch(key))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._fetched(key, done))
        # shield: one CONNECT giving up must not cancel the query other CONNECTs of this device wait for
        return await asyncio.shield(task)

    async def _fetch(self, key: _Key) -> _Credentials:
        started = self._clock()  # expire from the query's start: the row may change while it runs
        credentials = await get_credentials(self._pool, self._box, *key)
        self._remember(key, started + self._cache_seconds, credentials)
        return credentials

    def _fetched(self, key: _Key, task: asyncio.Task[_Credentials]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # mark retrieved even if every waiter left; the waiters log it

    def _remember(self, key: _Key, expires: float, credentials: _Credentials) -> None:
        if self._cache_seconds <= 0:
            return
        self._cache.pop(key, None)  # re-insert at the end: entries stay in expiry order
        self._cache[key] = (expires, credentials)
        # Drop expired entries from the front, then the oldest beyond the cap, so random keys from a hostile
        # client cannot grow memory without bound. Cheap: every entry lives equally long, so the dict's order
        # is expiry order.
        now = self._clock()
        while self._cache:
            oldest = next(iter(self._cache))
            if self._cache[oldest][0] > now and len(self._cache) <= self._max_cached:
                break
            del self._cache[oldest]
