"""HTTP endpoints a clustered broker calls so that devices log in through pointgate's registry.

The broker (EMQX, or mosquitto with mosquitto-go-auth, or amqtt's HTTP plugins) sends each CONNECT's client
id, username and password here; pointgate re-runs the same EnOS signature check as ``serve``
(`DeviceAuthenticator`, ``service/protocol/signing.py``) and answers with the device's topic permissions, the
same rules ``serve`` enforces (``service/broker/acl.py``). Formats (reference/cluster-broker.md §1):

- ``POST /auth/emqx/authn`` — EMQX 5 HTTP authentication. JSON ``{clientid, username, password}`` →
  ``{"result": "allow", "is_superuser": false, "client_attrs": {…}, "acl": [...]}`` (EMQX ≥ 5.8 applies the
  ACL; end it with ``deny all #``), ``{"result": "deny"}`` for an EnOS login that fails, ``{"result":
  "ignore"}`` for a CONNECT that is not an EnOS login at all (so a second authenticator, holding the consumers'
  own accounts, can take it), HTTP 503 when the registry cannot be read (EMQX then ignores it).
- ``POST /auth/emqx/authz`` — EMQX 5 HTTP authorization. ``{username, topic, action}`` →
  ``{"result": "allow" | "deny"}`` (``ignore`` for a username that is not ``deviceKey&productKey``).
- ``/auth/http/user``, ``/auth/http/superuser``, ``/auth/http/acl`` — the mosquitto-go-auth ``http`` backend
  and amqtt's ``UserAuthHttpPlugin``/``TopicAuthHttpPlugin``: ``{username, password, clientid | client_id}``;
  ``{username, topic, acc}`` with ``acc`` 1 read, 2 write, 3 both, 4 subscribe. Answer: 200 ``{"Ok": true}``
  or 403 ``{"Ok": false, "Error": …}``, which both the ``status`` and ``json`` response modes read; JSON,
  form or query-string parameters.

The consumers' own broker account (``broker_username``/``broker_password``, when set) is accepted too, as a
superuser, so one authenticator serves the whole cluster.

Only the broker may call them: every request must carry the shared secret (``Authorization: Bearer <secret>``
or ``X-Pointgate-Auth: <secret>``), or the endpoints listen on their own TLS listener that requires a client
certificate. A refused caller gets 401. No password, signature or secret is ever logged.
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

import orjson
from aiohttp import web

from service.broker.acl import Identity, may_publish, may_receive, may_subscribe
from service.devices.auth import DeviceAuthenticator
from service.errors import ConfigError
from service.ops import metrics
from service.ops.logs import get_logger
from service.protocol.signing import key_problem
from service.settings import Settings, parse_bind

log = get_logger(__name__)

AUTH_HEADER = "X-Pointgate-Auth"
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def device_identity(username: str | None) -> Identity:
    """The (productKey, deviceKey) a ``deviceKey&productKey`` username names, or None if it names none."""
    if not username:
        return None
    device_key, amp, product_key = username.partition("&")
    if not amp or key_problem(product_key) or key_problem(device_key):
        return None
    return product_key, device_key


def emqx_acl(product_key: str, device_key: str) -> list[dict[str, Any]]:
    """The device's permissions as EMQX ≥ 5.8 takes them from the authentication answer (new format)."""
    trees = (f"/sys/{product_key}/{device_key}/#", f"/ext/session/{product_key}/{device_key}/#")
    return [
        *({"permission": "allow", "action": "publish", "topic": tree} for tree in trees),
        *({"permission": "allow", "action": "subscribe", "topic": tree} for tree in trees),
        # without it an unmatched action would fall through to the authorizers (default: allow)
        {"permission": "deny", "action": "all", "topic": "#"},
    ]


def may(identity: Identity, action: str, topic: str) -> bool:
    """``serve``'s rule for one action: ``publish``, ``subscribe``, ``read`` (delivery) or ``readwrite``."""
    if identity is None or not topic:
        return False
    if action == "publish":
        return may_publish(identity, topic)
    if action == "subscribe":
        return may_subscribe(identity, topic)
    if action == "read":
        return may_receive(identity, topic)
    if action == "readwrite":
        return may_publish(identity, topic) and may_receive(identity, topic)
    return False


# mosquitto-go-auth / amqtt ``acc`` values
_ACC: dict[str, str] = {"1": "read", "2": "publish", "3": "readwrite", "4": "subscribe"}


class BrokerAuth:
    """The endpoints, bound to an authenticator and the shared secret (None: mTLS guards them instead)."""

    def __init__(
        self,
        authenticator: DeviceAuthenticator,
        *,
        secret: str | None,
        service_account: tuple[str, str] | None = None,
    ) -> None:
        self._authenticator = authenticator
        self._secret = secret.encode() if secret else None
        # the consumers' own broker login (broker_username/broker_password): allowed, as a superuser
        self._service_account = service_account

    def _is_service_account(self, username: str | None, password: str | None) -> bool:
        if self._service_account is None or username is None or password is None:
            return False
        name, secret = self._service_account
        same_name = hmac.compare_digest(username.encode("utf-8", "replace"), name.encode())
        return hmac.compare_digest(password.encode("utf-8", "replace"), secret.encode()) and same_name

    def routes(self) -> list[web.RouteDef]:
        """The aiohttp routes, each guarded by the secret check."""
        guarded = self._guarded
        return [
            web.post("/auth/emqx/authn", guarded(self._emqx_authn)),
            web.post("/auth/emqx/authz", guarded(self._emqx_authz)),
            *(
                web.route(method, path, guarded(handler))
                for path, handler in (
                    ("/auth/http/user", self._http_user),
                    ("/auth/http/superuser", self._http_superuser),
                    ("/auth/http/acl", self._http_acl),
                )
                for method in ("GET", "POST", "PUT")
            ),
        ]

    def _guarded(self, handler: _Handler) -> _Handler:
        async def check(request: web.Request) -> web.StreamResponse:
            if self._secret is not None and not self._caller_ok(request):
                log.warning("auth endpoint: caller without the shared secret", path=request.path, peer=request.remote)
                return web.json_response({"result": "ignore", "Ok": False, "Error": "unauthorised"}, status=401)
            try:
                return await handler(request)
            except _BadRequest as exc:
                return web.json_response({"result": "ignore", "Ok": False, "Error": str(exc)}, status=400)

        return check

    def _caller_ok(self, request: web.Request) -> bool:
        assert self._secret is not None
        offered = request.headers.get(AUTH_HEADER, "")
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            offered = offered or token
        return hmac.compare_digest(offered.encode("utf-8", "replace"), self._secret)

    # -- EMQX 5 --------------------------------------------------------------------------------------------

    async def _emqx_authn(self, request: web.Request) -> web.Response:
        params = await _params(request)
        client_id, username, password = params.get("clientid"), params.get("username"), params.get("password")
        if self._is_service_account(username, password):
            return web.json_response({"result": "allow", "is_superuser": True})
        result = await self._authenticator.authenticate(client_id, username, password)
        if result.ok and result.product_key is not None and result.device_key is not None:
            pk, dk = result.product_key, result.device_key
            return web.json_response(
                {
                    "result": "allow",
                    "is_superuser": False,
                    "client_attrs": {"product_key": pk, "device_key": dk},
                    "acl": emqx_acl(pk, dk),
                },
                dumps=_dumps,
            )
        reason = result.reason or "malformed"
        self._refused(reason, result.product_key, result.device_key)
        if reason == "unavailable":
            return web.json_response({"result": "ignore"}, status=503)
        if reason in ("malformed", "anonymous_refused"):
            # not an EnOS login: leave it to the next authenticator (the consumers' accounts), refused if none
            return web.json_response({"result": "ignore"})
        return web.json_response({"result": "deny"})

    async def _emqx_authz(self, request: web.Request) -> web.Response:
        params = await _params(request)
        identity = device_identity(params.get("username"))
        if identity is None:
            return web.json_response({"result": "ignore"})
        action = params.get("action", "")
        allowed = may(identity, action, params.get("topic", ""))
        if not allowed:
            self._denied(action)
        return web.json_response({"result": "allow" if allowed else "deny"})

    # -- mosquitto-go-auth / amqtt HTTP backend ------------------------------------------------------------

    async def _http_user(self, request: web.Request) -> web.Response:
        params = await _params(request)
        client_id = params.get("clientid") or params.get("client_id")
        if self._is_service_account(params.get("username"), params.get("password")):
            return web.json_response({"Ok": True, "Error": ""})
        result = await self._authenticator.authenticate(client_id, params.get("username"), params.get("password"))
        if result.ok and result.product_key is not None:
            return web.json_response({"Ok": True, "Error": ""})
        reason = result.reason or "malformed"
        self._refused(reason, result.product_key, result.device_key)
        return web.json_response({"Ok": False, "Error": reason}, status=503 if reason == "unavailable" else 403)

    async def _http_superuser(self, request: web.Request) -> web.Response:
        # no device is a superuser; the consumers' account is (go-auth asks with the username only)
        params = await _params(request)
        if self._service_account is not None and params.get("username") == self._service_account[0]:
            return web.json_response({"Ok": True, "Error": ""})
        return web.json_response({"Ok": False, "Error": "not a superuser"}, status=403)

    async def _http_acl(self, request: web.Request) -> web.Response:
        params = await _params(request)
        action = _ACC.get(params.get("acc", ""), "")
        allowed = may(device_identity(params.get("username")), action, params.get("topic", ""))
        if allowed:
            return web.json_response({"Ok": True, "Error": ""})
        self._denied(action)
        return web.json_response({"Ok": False, "Error": "not authorized"}, status=403)

    # -- accounting ----------------------------------------------------------------------------------------

    @staticmethod
    def _refused(reason: metrics.AuthFailureReason, product: str | None, device: str | None) -> None:
        metrics.AUTH_FAILURES.labels(reason=reason).inc()
        # who and why, never the password
        log.info("broker login refused", product=product, device=device, reason=reason)

    @staticmethod
    def _denied(action: str) -> None:
        label: Literal["publish", "subscribe"] = "subscribe" if action == "subscribe" else "publish"
        metrics.ACL_DENIALS.labels(action=label).inc()


class _BadRequest(Exception):
    """The request's parameters cannot be read."""


async def _params(request: web.Request) -> dict[str, str]:
    """Query string, then a JSON or form body over it; every value as text (EMQX sends ``qos`` as "1")."""
    params: dict[str, str] = dict(request.query)
    if request.can_read_body:
        if request.content_type == "application/json":
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                raise _BadRequest("body is not JSON") from None
            if not isinstance(body, Mapping):
                raise _BadRequest("body is not a JSON object")
            params.update({str(k): v if isinstance(v, str) else _text(v) for k, v in body.items()})
        else:
            form = await request.post()
            params.update({k: v for k, v in form.items() if isinstance(v, str)})
    return params


def _text(value: object) -> str:
    return "" if value is None else orjson.dumps(value).decode()


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def auth_enabled(settings: Settings) -> bool:
    """The endpoints are off unless a shared secret or a client CA (mTLS) guards them."""
    return settings.auth_secret is not None or settings.auth_tls_client_cafile is not None


def check_auth_settings(settings: Settings) -> None:
    """Refuse a setup that would serve the endpoints unguarded or half-configured, naming the setting."""
    tls = settings.auth_tls_certfile is not None or settings.auth_tls_keyfile is not None
    if tls and (settings.auth_tls_certfile is None or settings.auth_tls_keyfile is None):
        raise ConfigError("auth_tls_certfile and auth_tls_keyfile go together")
    if (tls or settings.auth_tls_client_cafile is not None) and settings.auth_bind is None:
        raise ConfigError("auth TLS settings need auth_bind: the endpoints' own listener")
    if settings.auth_tls_client_cafile is not None and not tls:
        raise ConfigError("auth_tls_client_cafile needs auth_tls_certfile and auth_tls_keyfile (mTLS)")
    if settings.auth_bind is not None and not auth_enabled(settings):
        raise ConfigError("auth_bind given but the endpoints are unguarded: set auth_secret or auth_tls_client_cafile")


class AuthServer:
    """The endpoints on their own listener (``auth_bind``), over TLS with client certificates when configured."""

    def __init__(self, settings: Settings, auth: BrokerAuth) -> None:
        assert settings.auth_bind is not None
        self.host, self.port = parse_bind(settings.auth_bind, default_host="127.0.0.1")
        self._auth = auth
        self._ssl: ssl.SSLContext | None = None
        if settings.auth_tls_certfile is not None and settings.auth_tls_keyfile is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(settings.auth_tls_certfile, settings.auth_tls_keyfile)
            if settings.auth_tls_client_cafile is not None:
                context.load_verify_locations(settings.auth_tls_client_cafile)
                context.verify_mode = ssl.CERT_REQUIRED
            self._ssl = context
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Bind and serve; ``port`` holds the bound port afterwards (useful with port 0)."""
        app = web.Application()
        app.add_routes(self._auth.routes())
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port, ssl_context=self._ssl).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        log.info("auth endpoints listening", host=self.host, port=self.port, tls=self._ssl is not None)

    async def stop(self) -> None:
        """Close the listener; safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


def endpoints(settings: Settings, authenticator: DeviceAuthenticator) -> tuple[list[web.RouteDef], AuthServer | None]:
    """Where the endpoints go: routes for the ops listener, or their own server (not started); none when off."""
    check_auth_settings(settings)
    if not auth_enabled(settings):
        return [], None
    account = None
    if settings.broker_username and settings.broker_password is not None:
        account = (settings.broker_username, settings.broker_password.get_secret_value())
    secret = settings.auth_secret.get_secret_value() if settings.auth_secret else None
    auth = BrokerAuth(authenticator, secret=secret, service_account=account)
    if settings.auth_bind is not None:
        return [], AuthServer(settings, auth)
    return auth.routes(), None
