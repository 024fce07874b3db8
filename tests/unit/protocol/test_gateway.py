"""service.protocol.gateway: topology and sub-device login requests parsed and decided, without I/O."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from service.errors import DeviceFault
from service.protocol import gateway as proto
from service.protocol.replies import ReplyCode

GW = ("pk", "gw")
SECRET = "s3cret"


def signed(dk: str, secret: str = SECRET, *, method: str = "sha256", **extra: str) -> str:
    """The reference's rule (reference/enos-protocol.md §4.4), computed here independently."""
    fields = {"clientId": f"pk{dk}", "deviceKey": dk, "productKey": "pk", "timestamp": "1795466992753", **extra}
    content = "".join(k + fields[k] for k in sorted(fields)) + secret
    return hashlib.new(method, content.encode()).hexdigest()


def python_sdk_login(dk: str, secret: str = SECRET) -> dict[str, Any]:
    """combine.login params as the Python SDK sends them (cleanSession sent, not signed)."""
    return {
        "productKey": "pk",
        "deviceKey": dk,
        "clientId": f"pk{dk}",
        "timestamp": "1795466992753",
        "sign": signed(dk, secret),
        "secureMode": "2",
        "signMethod": "hmacsha256",
        "cleanSession": "False",
    }


def test_python_sdk_login_verifies() -> None:
    """The SDK's params parse, and its signature (without cleanSession) checks against the secret only."""
    login = proto.parse_login(python_sdk_login("sub"))
    assert login.key == ("pk", "sub") and login.secure_mode == "2"
    assert login.verify(SECRET) and not login.verify("other")


def test_docs_login_signs_clean_session_in_upper_sha1() -> None:
    """The docs' variant: cleanSession among the signed fields, hmacsha1, upper-case hex."""
    params = python_sdk_login("sub") | {"cleanSession": "true", "signMethod": "hmacSha1"}
    params["sign"] = signed("sub", method="sha1", cleanSession="true").upper()
    assert proto.parse_login(params).verify(SECRET)


@pytest.mark.parametrize("field", ["productKey", "deviceKey", "clientId", "timestamp", "sign", "signMethod"])
def test_login_without_a_field_is_1220_naming_it(field: str) -> None:
    """Each required field missing (or empty) is a 1220 whose detail names it."""
    params = python_sdk_login("sub")
    params[field] = ""
    with pytest.raises(DeviceFault) as caught:
        proto.parse_login(params)
    assert caught.value.code is ReplyCode.PAYLOAD_FORMAT_ERROR and field in caught.value.detail


def test_login_params_not_an_object_and_bad_secure_mode() -> None:
    """params must be an object; secureMode other than 2 or 3 is 1220; a numeric timestamp is signed as digits."""
    params: Any
    for params in (None, [], "x"):
        with pytest.raises(DeviceFault):
            proto.parse_login(params)
    with pytest.raises(DeviceFault, match="secureMode"):
        proto.parse_login(python_sdk_login("sub") | {"secureMode": "4"})
    numeric = proto.parse_login(python_sdk_login("sub") | {"timestamp": 1795466992753})
    assert numeric.verify(SECRET)


def record(gateway: tuple[str, str] | None = GW, *, enabled: bool = True) -> proto.Record:
    return proto.Record(SECRET, enabled, gateway)


@pytest.mark.parametrize(
    ("params", "found", "code"),
    [
        (python_sdk_login("sub"), record(), None),
        (python_sdk_login("sub"), None, ReplyCode.SUB_DEVICE_NOT_FOUND),
        (python_sdk_login("sub", "wrong"), record(), ReplyCode.SIGN_CHECK_FAILED),
        (python_sdk_login("sub") | {"signMethod": "sha512"}, record(), ReplyCode.SIGN_CHECK_FAILED),
        (python_sdk_login("sub"), record(("pk", "gw2")), ReplyCode.NOT_SUB_DEVICE_OF_GATEWAY),
        (python_sdk_login("sub"), record(None), ReplyCode.NOT_SUB_DEVICE_OF_GATEWAY),
        (python_sdk_login("sub"), record(enabled=False), ReplyCode.SUB_DEVICE_DISABLED),
        (python_sdk_login("sub") | {"secureMode": "3"}, record(), ReplyCode.DYNAMIC_ACTIVATION_NOT_ALLOWED),
        # a wrong signature hides whose device it is and whether it is disabled
        (python_sdk_login("sub", "wrong"), record(("pk", "gw2"), enabled=False), ReplyCode.SIGN_CHECK_FAILED),
    ],
    ids=["ok", "unknown", "bad-sign", "unknown-method", "other-gateway", "no-gateway", "disabled", "dynamic", "order"],
)
def test_check_login_codes(params: dict[str, Any], found: proto.Record | None, code: ReplyCode | None) -> None:
    """Each refusal has EnOS's code, checked signature first."""
    fault = proto.check_login(proto.parse_login(params), found, GW)
    assert (fault.code if fault else None) is code


def test_batch_login_shares_client_id_and_timestamp() -> None:
    """Batch items are signed over the shared clientId and timestamp; a device named twice is 1220."""
    ts, client_id = "1795466992.9807022", "login.batch"

    def sign(dk: str) -> str:
        content = f"clientId{client_id}deviceKey{dk}productKeypktimestamp{ts}{SECRET}"
        return hashlib.sha256(content.encode()).hexdigest()

    items = [{"productKey": "pk", "deviceKey": dk, "secureMode": "2", "sign": sign(dk)} for dk in ("a", "b")]
    params = {"clientId": client_id, "timestamp": ts, "signMethod": "hmacsha256", "subDevices": items}
    logins = proto.parse_login_batch(params)
    assert [login.key for login in logins] == [("pk", "a"), ("pk", "b")]
    assert all(login.verify(SECRET) for login in logins)
    with pytest.raises(DeviceFault, match="twice"):
        proto.parse_login_batch(params | {"subDevices": [items[0], items[0]]})
    with pytest.raises(DeviceFault, match="subDevices"):
        proto.parse_login_batch(params | {"subDevices": []})


def test_batch_data_shape() -> None:
    """The batch reply's data carries both lists, as EnOS names them."""
    assert proto.batch_data([("pk", "a")], [("pk", "b")]) == {
        "loginedSubDevices": [{"productKey": "pk", "deviceKey": "a"}],
        "failedSubDevices": [{"productKey": "pk", "deviceKey": "b"}],
    }


def test_topo_add_parse_and_check() -> None:
    """topo add items carry their signature; each refusal reason is named; malformed params are 1255."""
    item = {"productKey": "pk", "deviceKey": "sub", "clientId": "pksub", "timestamp": "1795466992753"}
    item |= {"signmethod": "hmacSha1", "sign": signed("sub", method="sha1").upper()}
    (parsed,) = proto.parse_topo_add([item])
    assert proto.check_topo_add(parsed, record(None), GW, is_gateway=False) is None
    assert proto.check_topo_add(parsed, record(GW), GW, is_gateway=False) is None  # already ours: idempotent
    assert "another gateway" in str(proto.check_topo_add(parsed, record(("pk", "x")), GW, is_gateway=False))
    assert "is a gateway" in str(proto.check_topo_add(parsed, record(None), GW, is_gateway=True))
    assert "not registered" in str(proto.check_topo_add(parsed, None, GW, is_gateway=False))
    assert "sign" in str(proto.check_topo_add(parsed, proto.Record("x", True, None), GW, is_gateway=False))
    (itself,) = proto.parse_topo_add([item | {"deviceKey": "gw"}])
    assert "gateway itself" in str(proto.check_topo_add(itself, record(None), GW, is_gateway=False))
    malformed: tuple[Any, ...] = ({}, [], [1], [item, item])
    for params in malformed:
        with pytest.raises(DeviceFault) as caught:
            proto.parse_topo_add(params)
        assert caught.value.code is ReplyCode.TOPO_ADD_FAILED


def test_topo_delete_and_get_params() -> None:
    """topo delete names devices (1256 when malformed); topo get takes {} or nothing (1200 otherwise)."""
    assert proto.parse_device_list([{"productKey": "pk", "deviceKey": "a"}], ReplyCode.TOPO_DELETE_FAILED) == [
        ("pk", "a")
    ]
    with pytest.raises(DeviceFault) as caught:
        proto.parse_device_list([{"productKey": "pk"}], ReplyCode.TOPO_DELETE_FAILED)
    assert caught.value.code is ReplyCode.TOPO_DELETE_FAILED
    proto.check_topo_get({})
    proto.check_topo_get(None)
    with pytest.raises(DeviceFault) as caught:
        proto.check_topo_get([])
    assert caught.value.code is ReplyCode.PARSE_ERROR
    assert proto.parse_logout({"productKey": "pk", "deviceKey": "a"}) == ("pk", "a")
