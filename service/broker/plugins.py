"""Our amqtt plugins: the device login check, through amqtt's own auth-plugin API.

Login happens once per connection, so amqtt's plugin dispatch (a task per plugin) costs nothing that matters
here; per-message work (ACL, ingest) is called directly by the connection instead (connection.py, overrides.py B9).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from service.broker.overrides import authenticator_of
from service.ops import metrics
from service.ops.logs import get_logger

_log = get_logger("pointgate.login")


def log_refused_login(session: Session, product_key: str | None, device_key: str | None, reason: str) -> None:
    """One line per refused login: who claimed to be whom, from where, and why; never the password."""
    _log.info(
        "login refused",
        product=product_key,
        device=device_key,
        client_id=session.client_id,
        peer=f"{session.remote_address}:{session.remote_port}",
        reason=reason,
    )


class LoginResult(Protocol):
    """What an authenticator answers (service.devices.auth.AuthResult)."""

    ok: bool
    product_key: str | None
    device_key: str | None
    reason: str | None


class Authenticator(Protocol):
    """Checks CONNECT credentials (service.devices.auth.DeviceAuthenticator)."""

    async def authenticate(self, client_id: str | None, username: str | None, password: str | None) -> Any:
        """Return a `LoginResult`."""


class DeviceAuthPlugin(BaseAuthPlugin):
    """Accepts a CONNECT only if the broker's authenticator does; records the device on the session."""

    @dataclass
    class Config:
        """No options: the authenticator is owned by the composition root and hung on the broker."""

    async def authenticate(self, *, session: Session) -> bool | None:
        """amqtt's hook: True lets the device in (CONNACK 0), False refuses it (CONNACK 5)."""
        authenticator: Authenticator | None = authenticator_of(self.context)
        if authenticator is None:
            metrics.AUTH_FAILURES.labels(reason="unavailable").inc()
            return False
        result: LoginResult = await authenticator.authenticate(session.client_id, session.username, session.password)
        if not result.ok:
            metrics.AUTH_FAILURES.labels(reason=result.reason or "refused").inc()
            session.attributes.pop("device", None)
            log_refused_login(session, result.product_key, result.device_key, result.reason or "refused")
            return False
        if result.product_key and result.device_key:
            session.attributes["device"] = (result.product_key, result.device_key)
        secret = getattr(result, "activated_secret", None)
        if secret:
            # just activated (secure mode 3): the broker sends it on activate/info after the CONNACK, then drops it
            session.attributes["activated_secret"] = secret
        return True
