"""The broker auth endpoints accept exactly the logins and topics `serve` accepts, in EMQX's and go-auth's formats.

Each login is tried twice against the same running service: as an MQTT CONNECT on `serve`'s own listener, and
as the HTTP request a cluster broker sends for it (EMQX 5 shapes its request as below: POST, JSON body from the
configured template, its default headers plus the one the operator configured). The two verdicts must agree.
"""

from __future__ import annotations

import functools
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from service.broker.acl import may_publish, may_subscribe
from tests.integration._login import PK, Login, connect, disable, login, register
from tests.integration.test_login import VARIANTS
from tests.support import RunningService

SECRET = "s3cret-of-dev1"
AUTH_SECRET = "broker-shared-secret-9f2c"


@pytest.fixture
def service(start_service: Callable[..., RunningService]) -> RunningService:
    """`serve` with signed-in devices only and the auth endpoints on its ops listener."""
    running = start_service(allow_anonymous=False, auth_secret=AUTH_SECRET)
    register(running, "dev1", SECRET)
    register(running, "dev2", "secret-of-dev2")
    register(running, "dev3", "secret-of-dev3")
    disable(running, "dev3")
    return running


def post(
    port: int, path: str, body: dict[str, Any] | bytes, *, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """POST the way EMQX 5's HTTP connector does (JSON body, its default headers) plus ``headers``."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST")
    for name, value in {
        "content-type": "application/json",
        "accept": "application/json",
        "cache-control": "no-cache",
        "connection": "keep-alive",
        "keep-alive": "timeout=30, max=1000",
        "authorization": f"Bearer {AUTH_SECRET}",
        **(headers or {}),
    }.items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - http://127.0.0.1 built above
            return response.status, _json(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, _json(exc.read())


def _json(body: bytes) -> dict[str, Any]:
    try:
        decoded: dict[str, Any] = json.loads(body or b"{}")
    except ValueError:
        return {"text": body.decode(errors="replace")}
    return decoded


def emqx_authn(port: int, creds: Login) -> dict[str, Any]:
    # authentication.body = {clientid = "${clientid}", username = "${username}", password = "${password}",
    #                        peerhost = "${peerhost}"}
    body = {"clientid": creds.client_id, "username": creds.username, "password": creds.password, "peerhost": "10.1.2.3"}
    status, answer = post(port, "/auth/emqx/authn", body)
    assert status in (200, 503), answer
    return answer


def go_auth_user(port: int, creds: Login) -> int:
    body = {"username": creds.username, "password": creds.password, "clientid": creds.client_id}
    return post(port, "/auth/http/user", body)[0]


def mqtt_accepts(service: RunningService, creds: Login) -> bool:
    device, code = connect(service.port, creds)
    device.close()
    return code == 0


def _good(**variant: Any) -> Login:
    return login("dev1", SECRET, **variant)


LOGINS: dict[str, Callable[[], Login]] = {
    **{f"sdk-{name}": functools.partial(_good, **variant) for name, variant in VARIANTS.items()},
    "wrong-secret": lambda: login("dev1", "not-the-secret"),
    "unknown-device": lambda: login("ghost", SECRET),
    "other-devices-signature": lambda: login("dev1", "secret-of-dev2"),
    "disabled-device": lambda: login("dev3", "secret-of-dev3"),
    "secure-mode-3": lambda: Login(_good().client_id.replace("securemode=2", "securemode=3"), *_rest(_good())),
    "unknown-sign-method": lambda: Login(_good().client_id.replace("sha256", "sha512"), *_rest(_good())),
    "no-password": lambda: Login(_good().client_id, _good().username, ""),
    "anonymous": lambda: Login("someone", "", ""),
    "not-an-enos-username": lambda: Login(_good().client_id, "dev1", _good().password),
}


def _rest(creds: Login) -> tuple[str, str]:
    return creds.username, creds.password


def test_auth_endpoints_agree_with_serve(service: RunningService) -> None:
    """For every SDK login variant and every kind of bad login, EMQX's and go-auth's answers match serve's CONNACK.

    One service for all cases (they only read the registry), each case checked in turn.
    """
    for case, make in LOGINS.items():
        creds = make()
        accepted = mqtt_accepts(service, creds)
        assert accepted == case.startswith("sdk-"), case  # the control: serve decides as the login tests say
        answer = emqx_authn(service.http_port, creds)
        assert (answer["result"] == "allow") == accepted, (case, answer)
        assert go_auth_user(service.http_port, creds) == (200 if accepted else 403), case
        if accepted:
            assert answer["is_superuser"] is False
            assert answer["client_attrs"] == {"product_key": PK, "device_key": "dev1"}
            assert answer["acl"][-1] == {"permission": "deny", "action": "all", "topic": "#"}
            allowed = {(rule["action"], rule["topic"]) for rule in answer["acl"] if rule["permission"] == "allow"}
            trees = (f"/sys/{PK}/dev1/#", f"/ext/session/{PK}/dev1/#")
            assert allowed == {(action, tree) for action in ("publish", "subscribe") for tree in trees}


def test_refusals_are_deny_or_ignore_as_emqx_chains_expect(service: RunningService) -> None:
    """A failed EnOS login is `deny` (final); a CONNECT that is not an EnOS login is `ignore` (next authenticator)."""
    assert emqx_authn(service.http_port, login("dev1", "wrong"))["result"] == "deny"
    assert (
        emqx_authn(service.http_port, Login("pointgate-consumer-1", "pointgate", "its-password"))["result"] == "ignore"
    )


TOPICS = [
    ("publish", f"/sys/{PK}/dev1/thing/measurepoint/resume"),
    ("publish", f"/sys/{PK}/dev1/thing/measurepoint/resume/batch"),
    ("publish", f"/ext/session/{PK}/dev1/combine/login"),
    ("publish", f"/sys/{PK}/dev2/thing/measurepoint/resume"),
    ("publish", "/sys/otherProduct/dev1/thing/measurepoint/resume"),
    ("publish", f"/sys/{PK}/dev1x/thing/measurepoint/resume"),
    ("subscribe", f"/sys/{PK}/dev1/thing/measurepoint/resume_reply"),
    ("subscribe", f"/sys/{PK}/dev1/#"),
    ("subscribe", f"/sys/{PK}/+/thing/measurepoint/resume_reply"),
    ("subscribe", "/sys/#"),
    ("subscribe", "#"),
    ("subscribe", f"$share/g//sys/{PK}/dev1/#"),
]


def test_authorization_answers_serves_acl(service: RunningService) -> None:
    """EMQX authz and go-auth ACL answers equal serve's rules for each (action, topic) of device dev1."""
    identity = (PK, "dev1")
    verdicts = []
    for action, topic in TOPICS:
        expected = may_publish(identity, topic) if action == "publish" else may_subscribe(identity, topic)
        verdicts.append(expected)
        body = {
            "clientid": "dev1|securemode=2|",
            "username": f"dev1&{PK}",
            "topic": topic,
            "action": action,
            "qos": "1",
        }
        status, answer = post(service.http_port, "/auth/emqx/authz", body)
        assert status == 200 and answer == {"result": "allow" if expected else "deny"}, (action, topic)
        acc = "2" if action == "publish" else "4"
        body = {"username": f"dev1&{PK}", "clientid": "dev1", "topic": topic, "acc": acc}
        assert post(service.http_port, "/auth/http/acl", body)[0] == (200 if expected else 403), (action, topic)
    assert True in verdicts and False in verdicts  # the list exercises both answers
    # go-auth's read check (delivery to a subscriber) and a username that names no device
    body = {"username": f"dev1&{PK}", "clientid": "dev1", "topic": f"/sys/{PK}/dev2/thing/measurepoint/resume_reply"}
    assert post(service.http_port, "/auth/http/acl", {**body, "acc": "1"})[0] == 403
    body = {"username": "pointgate", "topic": f"/sys/{PK}/dev1/x", "action": "publish"}
    assert post(service.http_port, "/auth/emqx/authz", body)[1] == {"result": "ignore"}


def test_go_auth_form_parameters_and_amqtt_client_id(service: RunningService) -> None:
    """go-auth's form mode and amqtt's `client_id` spelling are read like JSON."""
    good = _good()
    form = urllib.parse.urlencode({"username": good.username, "password": good.password, "client_id": good.client_id})
    headers = {"content-type": "application/x-www-form-urlencoded"}
    assert post(service.http_port, "/auth/http/user", form.encode(), headers=headers)[0] == 200
    wrong = urllib.parse.urlencode({"username": good.username, "password": "0" * 64, "client_id": good.client_id})
    assert post(service.http_port, "/auth/http/user", wrong.encode(), headers=headers)[0] == 403
    assert post(service.http_port, "/auth/http/superuser", {"username": good.username})[0] == 403


@pytest.mark.parametrize(
    "headers", [{"authorization": ""}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {AUTH_SECRET}"}]
)
def test_callers_without_the_shared_secret_are_refused(service: RunningService, headers: dict[str, str]) -> None:
    """Without the exact shared secret every endpoint answers 401, whatever the body."""
    creds = _good()
    body = {"clientid": creds.client_id, "username": creds.username, "password": creds.password}
    for path in ("/auth/emqx/authn", "/auth/http/user"):
        assert post(service.http_port, path, body, headers=headers)[0] == 401
    assert (
        post(
            service.http_port, "/auth/emqx/authn", body, headers={"authorization": "", "x-pointgate-auth": AUTH_SECRET}
        )[0]
        == 200
    )


def test_endpoints_are_off_by_default(start_service: Callable[..., RunningService]) -> None:
    """With no secret and no client CA configured, the paths do not exist."""
    running = start_service(allow_anonymous=False)
    assert post(running.http_port, "/auth/emqx/authn", {"username": "x"})[0] == 404


def test_no_secret_in_any_log_line(service: RunningService, capsys: pytest.CaptureFixture[str]) -> None:
    """Refused logins and refused callers are logged without the password or the shared secret."""
    bad = login("dev1", "not-the-secret")
    emqx_authn(service.http_port, bad)
    post(service.http_port, "/auth/emqx/authn", {"username": "x"}, headers={"authorization": "Bearer guess-123"})
    out = capsys.readouterr()
    logs = out.out + out.err
    assert "broker login refused" in logs
    for secret in (bad.password, AUTH_SECRET, SECRET, "guess-123"):
        assert secret not in logs


def test_the_consumers_own_account_is_a_superuser(start_service: Callable[..., RunningService]) -> None:
    """With broker_username/broker_password set, that login is allowed as a superuser; a wrong password is not."""
    running = start_service(
        allow_anonymous=False, auth_secret=AUTH_SECRET, broker_username="pointgate", broker_password="consumer-pw"
    )
    port = running.http_port
    body = {"clientid": "pointgate-1", "username": "pointgate", "password": "consumer-pw"}
    assert post(port, "/auth/emqx/authn", body) == (200, {"result": "allow", "is_superuser": True})
    assert post(port, "/auth/emqx/authn", {**body, "password": "guess"})[1]["result"] != "allow"
    assert post(port, "/auth/http/user", body)[0] == 200
    assert post(port, "/auth/http/user", {**body, "password": "guess"})[0] == 403
    assert post(port, "/auth/http/superuser", {"username": "pointgate"})[0] == 200
    assert post(port, "/auth/http/superuser", {"username": f"dev1&{PK}"})[0] == 403
