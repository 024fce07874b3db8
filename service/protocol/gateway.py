"""Gateway requests, pure: topology (``thing.topo.*``) and sub-device sessions (``combine.*``) parsed and decided.

A gateway names its sub-devices in ``params`` (reference/enos-protocol.md §4.4, EnOS's topology and sub-device
pages); a login or a topology add carries the sub-device's own signature, made exactly as a CONNECT password
(``service.protocol.signing``) over ``clientId``, ``deviceKey``, ``productKey`` and ``timestamp``. The docs also
sign ``cleanSession`` when it is sent (the Python SDK sends it but does not sign it): either is accepted.

Every refusal is a `DeviceFault` with its EnOS code; `check_login` decides one sub-device's login from its
registry record. No I/O: service/broker/gateways.py feeds these the registry's answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.errors import DeviceFault
from service.protocol.replies import ReplyCode, json_type
from service.protocol.signing import SignMethod, sign_method, verify_signature

Key = tuple[str, str]
"""(productKey, deviceKey)."""


@dataclass(frozen=True, slots=True)
class Record:
    """What the registry holds about a sub-device for deciding its login: secret, enabled, gateway."""

    secret: str
    enabled: bool
    gateway: Key | None


@dataclass(frozen=True, slots=True)
class SignedDevice:
    """A sub-device named with its signature (one ``combine.login`` / batch item / ``thing.topo.add`` item)."""

    product_key: str
    device_key: str
    signed: dict[str, str]  # the signed fields
    sign: str
    method: SignMethod | None  # None: an unknown signMethod (742)
    secure_mode: str = "2"
    clean_session: str | None = None

    @property
    def key(self) -> Key:
        """(productKey, deviceKey)."""
        return self.product_key, self.device_key

    def verify(self, secret: str) -> bool:
        """Whether the signature is the sub-device's, with or without ``cleanSession`` among the signed fields."""
        if self.method is None:
            return False
        if verify_signature(self.signed, secret, self.method, self.sign):
            return True
        if self.clean_session is None:
            return False
        return verify_signature({**self.signed, "cleanSession": self.clean_session}, secret, self.method, self.sign)


def _text(params: dict[str, Any], name: str, where: str, code: ReplyCode, *, scalar: bool = False) -> str:
    value = params.get(name)
    if scalar and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # a timestamp sent as a number is signed as its digits
    if not isinstance(value, str) or not value:
        raise DeviceFault(code, f"{where}{name} must be a non-empty string, got {json_type(value)}")
    return value


def _object(value: Any, where: str, code: ReplyCode) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DeviceFault(code, f"{where} must be an object, got {json_type(value)}")
    return value


def _list(value: Any, where: str, code: ReplyCode) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise DeviceFault(code, f"{where} must be a non-empty array, got {json_type(value)}")
    return value


def _sign_method(params: dict[str, Any], where: str, code: ReplyCode) -> SignMethod | None:
    # the docs spell it "signmethod", the SDKs "signMethod"
    name = params.get("signMethod", params.get("signmethod"))
    if not isinstance(name, str) or not name:
        raise DeviceFault(code, f"{where}signMethod must be a non-empty string, got {json_type(name)}")
    return sign_method(name)


def _secure_mode(params: dict[str, Any], where: str, code: ReplyCode) -> str:
    value = params.get("secureMode")
    if value is None or value == "":
        return "2"
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if text not in ("2", "3"):
        raise DeviceFault(code, f"{where}secureMode must be 2 (device secret), got {json_type(value)}")
    return str(text)


def _clean_session(params: dict[str, Any]) -> str | None:
    value = params.get("cleanSession")
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else None


def parse_login(params: Any) -> SignedDevice:
    """``combine.login``'s params (1220 when a field is missing or of the wrong type)."""
    code = ReplyCode.PAYLOAD_FORMAT_ERROR
    params = _object(params, "params", code)
    where = "params."
    product_key = _text(params, "productKey", where, code)
    device_key = _text(params, "deviceKey", where, code)
    signed = {
        "clientId": _text(params, "clientId", where, code),
        "deviceKey": device_key,
        "productKey": product_key,
        "timestamp": _text(params, "timestamp", where, code, scalar=True),
    }
    sign = _text(params, "sign", where, code)
    method = _sign_method(params, where, code)
    secure_mode = _secure_mode(params, where, code)
    return SignedDevice(product_key, device_key, signed, sign, method, secure_mode, _clean_session(params))


def parse_login_batch(params: Any) -> list[SignedDevice]:
    """``combine.login.batch``'s params: shared ``clientId``/``timestamp``/``signMethod``, then ``subDevices``."""
    code = ReplyCode.PAYLOAD_FORMAT_ERROR
    params = _object(params, "params", code)
    client_id = _text(params, "clientId", "params.", code)
    timestamp = _text(params, "timestamp", "params.", code, scalar=True)
    method = _sign_method(params, "params.", code)
    found: list[SignedDevice] = []
    seen: set[Key] = set()
    for index, item in enumerate(_list(params.get("subDevices"), "params.subDevices", code)):
        where = f"params.subDevices[{index}]."
        item = _object(item, where[:-1], code)
        product_key = _text(item, "productKey", where, code)
        device_key = _text(item, "deviceKey", where, code)
        if (product_key, device_key) in seen:
            raise DeviceFault(code, f"{where[:-1]} names {product_key}/{device_key} twice")
        seen.add((product_key, device_key))
        signed = {"clientId": client_id, "deviceKey": device_key, "productKey": product_key, "timestamp": timestamp}
        sign = _text(item, "sign", where, code)
        found.append(SignedDevice(product_key, device_key, signed, sign, method, _secure_mode(item, where, code)))
    return found


def parse_device_list(params: Any, code: ReplyCode, *, what: str = "params") -> list[Key]:
    """A list of ``{productKey, deviceKey}`` (``thing.topo.delete``), each named once."""
    keys: list[Key] = []
    for index, item in enumerate(_list(params, what, code)):
        where = f"{what}[{index}]."
        item = _object(item, where[:-1], code)
        key = (_text(item, "productKey", where, code), _text(item, "deviceKey", where, code))
        if key in keys:
            raise DeviceFault(code, f"{where[:-1]} names {key[0]}/{key[1]} twice")
        keys.append(key)
    return keys


def parse_logout(params: Any) -> Key:
    """``combine.logout``'s params: the sub-device to log out."""
    code = ReplyCode.PAYLOAD_FORMAT_ERROR
    params = _object(params, "params", code)
    return _text(params, "productKey", "params.", code), _text(params, "deviceKey", "params.", code)


def parse_topo_add(params: Any) -> list[SignedDevice]:
    """``thing.topo.add``'s params: each sub-device with its signature (1255 when malformed)."""
    code = ReplyCode.TOPO_ADD_FAILED
    found: list[SignedDevice] = []
    for index, item in enumerate(_list(params, "params", code)):
        where = f"params[{index}]."
        item = _object(item, where[:-1], code)
        product_key = _text(item, "productKey", where, code)
        device_key = _text(item, "deviceKey", where, code)
        if any(found_one.key == (product_key, device_key) for found_one in found):
            raise DeviceFault(code, f"{where[:-1]} names {product_key}/{device_key} twice")
        signed = {
            "clientId": _text(item, "clientId", where, code),
            "deviceKey": device_key,
            "productKey": product_key,
            "timestamp": _text(item, "timestamp", where, code, scalar=True),
        }
        sign = _text(item, "sign", where, code)
        found.append(SignedDevice(product_key, device_key, signed, sign, _sign_method(item, where, code)))
    return found


def check_topo_get(params: Any) -> None:
    """``thing.topo.get`` takes no parameters: ``{}`` or none (1200 otherwise)."""
    if params is not None and not isinstance(params, dict):
        raise DeviceFault(ReplyCode.PARSE_ERROR, f"params must be an object, got {json_type(params)}")


def check_login(login: SignedDevice, record: Record | None, gateway: Key) -> DeviceFault | None:
    """Why ``gateway`` may not log ``login``'s sub-device in (None: it may), in EnOS's order of checks.

    The signature is checked before anything a non-holder of the secret could learn from the answer (whose
    gateway it is, whether it is disabled), as for a CONNECT.
    """
    name = f"{login.product_key}/{login.device_key}"
    if login.secure_mode == "3":
        return DeviceFault(ReplyCode.DYNAMIC_ACTIVATION_NOT_ALLOWED, f"{name}: log sub-devices in with secureMode 2")
    if record is None:
        return DeviceFault(ReplyCode.SUB_DEVICE_NOT_FOUND, f"{name} is not registered")
    if login.method is None:
        return DeviceFault(ReplyCode.SIGN_CHECK_FAILED, f"{name}: unknown signMethod")
    if not login.verify(record.secret):
        return DeviceFault(ReplyCode.SIGN_CHECK_FAILED, f"{name}: sign is not the device secret's signature")
    if record.gateway != gateway:
        detail = f"{name} is not a sub-device of {gateway[0]}/{gateway[1]}"
        return DeviceFault(ReplyCode.NOT_SUB_DEVICE_OF_GATEWAY, detail)
    if not record.enabled:
        return DeviceFault(ReplyCode.SUB_DEVICE_DISABLED, f"{name} is disabled")
    return None


def check_topo_add(item: SignedDevice, record: Record | None, gateway: Key, *, is_gateway: bool) -> str | None:
    """Why ``item`` cannot join ``gateway``'s topology (a 1255 detail), or None. ``is_gateway``: the device
    already has sub-devices of its own."""
    name = f"{item.product_key}/{item.device_key}"
    if item.key == gateway:
        return f"{name} is the gateway itself"
    if record is None:
        return f"{name} is not registered"
    if not item.verify(record.secret):
        return f"{name}: sign is not the device secret's signature"
    if record.gateway is not None and record.gateway != gateway:
        return f"{name} is a sub-device of another gateway"
    if is_gateway:
        return f"{name} is a gateway (it has sub-devices)"
    return None


def device_json(key: Key) -> dict[str, str]:
    """A sub-device as EnOS names it in replies."""
    return {"productKey": key[0], "deviceKey": key[1]}


def batch_data(logged_in: list[Key], failed: list[Key]) -> dict[str, list[dict[str, str]]]:
    """``combine.login.batch``'s reply ``data``: who logged in, who did not."""
    return {
        "loginedSubDevices": [device_json(key) for key in logged_in],
        "failedSubDevices": [device_json(key) for key in failed],
    }
