"""Who may connect: checks a CONNECT's EnOS login against the device registry.

The broker calls `DeviceAuthenticator.authenticate` once per CONNECT and refuses the connection unless the
result is ``ok``. Secure mode 2 is signed with the device secret; a device's first such login marks it
activated. Secure mode 3 is signed with the product secret and activates a registered device that is not yet
activated, when its product allows dynamic activation (service/devices/activation.py): the result then carries
the device secret, which the broker sends the device on ``/ext/session/{pk}/{dk}/thing/activate/info``.

Credentials are cached per device for ``cache_seconds`` (misses too), so a device
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

from service.devices import activation
from service.devices.activation import DeviceLogin
from service.devices.secretbox import SecretBox
from service.errors import LoginRefused
from service.ops.logs import get_logger
from service.ops.metrics import AuthFailureReason
from service.protocol.signing import LoginRequest, parse_login, verify_password

_Key = tuple[str, str]
_Credentials = DeviceLogin | None

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
    # set only when this login (secure mode 3) just activated the device: its secret, to be sent to it
    activated_secret: str | None = None


class DeviceAuthenticator:
    """Checks EnOS secure-mode-2 and -3 logins against the registry, with a short credentials cache.

    ``allow_activation`` False refuses secure mode 3: a caller that cannot send the device its secret (the
    broker auth endpoints of a cluster broker) must not activate it.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        box: SecretBox,
        *,
        allow_anonymous: bool,
        allow_activation: bool = True,
        cache_seconds: float = 5.0,
        max_cached: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._box = box
        self._allow_anonymous = allow_anonymous
        self._allow_activation = allow_activation
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

        if req.secure_mode == "3":
            return await self._activate(req, password)
        try:
            credentials = await self._credentials((req.product_key, req.device_key))
        except Exception:
            # our fault, not the device's: log it (without the password) and let the device retry
            log.exception("auth.credentials_unavailable", product=req.product_key, device=req.device_key)
            return refused("unavailable")
        if credentials is None:
            return refused("unknown_device")
        if not verify_password(req, credentials.secret, password):
            return refused("bad_signature")
        # after the signature, so only the device itself can learn that it is disabled
        if not credentials.enabled:
            return refused("disabled")
        if not credentials.activated:
            await self._mark_activated(req.product_key, req.device_key, credentials)
        return AuthResult(True, req.product_key, req.device_key, None)

    async def _activate(self, req: LoginRequest, password: str | None) -> AuthResult:
        """Secure mode 3: the product secret's signature, the product's policy, then the one atomic activation."""

        def refused(reason: AuthFailureReason) -> AuthResult:
            return AuthResult(False, req.product_key, req.device_key, reason)

        if not self._allow_activation:
            return refused("activation_disabled")
        key = (req.product_key, req.device_key)
        try:
            state = await activation.activation_state(self._pool, self._box, *key)
            # a product without a secret cannot check the signature: activation is off for it
            if state.product_secret is None:
                return refused("activation_disabled")
            if not verify_password(req, state.product_secret, password):
                return refused("bad_signature")
            # after the signature: only a holder of the product secret learns about policy and devices
            if not state.dynamic_activation:
                return refused("activation_disabled")
            if state.device_enabled is None:
                return refused("unknown_device")
            if not state.device_enabled:
                return refused("disabled")
            if state.device_activated:
                return refused("already_activated")
            secret = await activation.activate(self._pool, self._box, *key)
        except Exception:
            log.exception("auth.activation_unavailable", product=req.product_key, device=req.device_key)
            return refused("unavailable")
        if secret is None:
            return refused("already_activated")  # another connection won the race a moment ago
        self.forget(*key)
        log.info("device activated", product=req.product_key, device=req.device_key)
        return AuthResult(True, req.product_key, req.device_key, None, activated_secret=secret)

    async def _mark_activated(self, product_key: str, device_key: str, credentials: DeviceLogin) -> None:
        # a device's first secure-mode-2 login closes its secure-mode-3 window; a failure here costs only that
        try:
            await activation.mark_activated(self._pool, product_key, device_key)
        except Exception as exc:
            log.warning("could not record activation", product=product_key, device=device_key, error=str(exc))
            return
        key = (product_key, device_key)
        cached = self._cache.get(key)
        if cached is not None and cached[1] is credentials:
            self._cache[key] = (cached[0], DeviceLogin(credentials.secret, credentials.enabled, True))

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
        credentials = await activation.device_login(self._pool, self._box, *key)
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
