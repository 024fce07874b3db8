"""EnOS device login: parse the CONNECT fields and check the password a device signed (no I/O).

A device in secure mode 2 sends (reference/enos-protocol.md §2; in secure mode 3 the same, signed with the
product secret instead)::

    clientId = {id}|securemode=2,signmethod=hmacsha256,timestamp=1795466980552.2302|
    username = {deviceKey}&{productKey}
    password = hex(H("clientId" + id + "deviceKey" + dk + "productKey" + pk + "timestamp" + ts + secret))

Every official SDK signs this way, but each spells it a little differently (hex case, sign method
name, float or fixed timestamps, Java's ``{ip=…}`` block inside the id), so the parser keeps the id
and the timestamp verbatim and compares hex case-insensitively.

The timestamp is never checked for freshness (the C SDK sends a constant), which makes the password
a static credential: it must never be logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from service.errors import LoginRefused

SignMethod = Literal["sha256", "sha1", "md5"]

# The names SDKs put in `signmethod=` (any case). The "hmac" spellings are not HMACs: every SDK hashes the
# concatenation plainly, so they map to the same digest.
_SIGN_METHODS: dict[str, SignMethod] = {
    "sha256": "sha256",
    "hmacsha256": "sha256",
    "sha1": "sha1",
    "hmacsha1": "sha1",
    "md5": "md5",
    "hmacmd5": "md5",
}

# SHA-1 and MD5 are weak, but the device chooses the method and old SDKs only speak those; refusing them
# would lock out fielded devices. The secret, not the hash, is what an attacker lacks.
_HASHES: dict[SignMethod, Callable[[bytes], Any]] = {
    "sha256": hashlib.sha256,
    "sha1": hashlib.sha1,
    "md5": hashlib.md5,
}

# 2: signed with the device secret; 3: signed with the product secret, to activate a registered device
# (service/devices/activation.py). 4 (the integration channel) is not served.
SECURE_MODES = frozenset({"2", "3"})

MAX_KEY_LENGTH = 128
# Characters that would make a key ambiguous in a topic (/ + #), in the username (&), in the client id (|),
# or in C strings (NUL).
_FORBIDDEN_KEY_CHARS = frozenset("/+#&|\x00")


@dataclass(frozen=True, slots=True)
class LoginRequest:
    """What a CONNECT claims: which device, and how it signed its password."""

    client_id_prefix: str
    secure_mode: str
    sign_method: SignMethod
    timestamp: str
    product_key: str
    device_key: str


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a product or device key, or None if it can."""
    if not key:
        return "must not be empty"
    if len(key) > MAX_KEY_LENGTH:
        return f"must be at most {MAX_KEY_LENGTH} characters"
    bad = sorted(_FORBIDDEN_KEY_CHARS.intersection(key))
    if bad:
        return "must not contain " + " ".join(repr(c) for c in bad)
    return None


def parse_login(client_id: str, username: str | None) -> LoginRequest:
    """Read the login a device claims from its MQTT client id and username, or raise `LoginRefused`."""
    # Split on '|' before ',' : the Java SDK puts "{ip=…,version=…}" (with commas) inside the id part.
    parts = client_id.split("|")
    if len(parts) != 3 or parts[2] != "":
        raise LoginRefused("malformed", "client id is not 'id|securemode=…,signmethod=…,timestamp=…|'")
    prefix, fields = parts[0], _parse_fields(parts[1])

    for name in ("securemode", "signmethod", "timestamp"):
        if not fields.get(name):
            raise LoginRefused("malformed", f"client id has no {name}")
    if fields["securemode"] not in SECURE_MODES:
        raise LoginRefused("unsupported_secure_mode", f"securemode={fields['securemode']} (only 2 and 3 are supported)")
    method = _SIGN_METHODS.get(fields["signmethod"].lower())
    if method is None:
        raise LoginRefused("unsupported_sign_method", f"signmethod={fields['signmethod']}")

    if not username:
        raise LoginRefused("malformed", "no username")
    device_key, amp, product_key = username.partition("&")  # device first: "dk&pk"
    if not amp:
        raise LoginRefused("malformed", "username is not 'deviceKey&productKey'")
    for what, key in (("product key", product_key), ("device key", device_key)):
        problem = key_problem(key)
        if problem is not None:
            raise LoginRefused("malformed", f"{what} {problem}")

    return LoginRequest(
        client_id_prefix=prefix,
        secure_mode=fields["securemode"],
        sign_method=method,
        timestamp=fields["timestamp"],
        product_key=product_key,
        device_key=device_key,
    )


def _parse_fields(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue  # tolerate a trailing or doubled comma
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or not key:
            raise LoginRefused("malformed", f"client id field {part.strip()!r} is not key=value")
        if key in fields:
            raise LoginRefused("malformed", f"client id repeats {key}")
        # the docs' template shows spaces after commas; values themselves never contain spaces
        fields[key] = value.strip()
    return fields


def expected_password(req: LoginRequest, secret: str) -> str:
    """The lower-case hex password a device holding ``secret`` sends for ``req``."""
    # keys in byte-wise sorted order, which is always this order
    content = (
        f"clientId{req.client_id_prefix}deviceKey{req.device_key}"
        f"productKey{req.product_key}timestamp{req.timestamp}{secret}"
    )
    digest: str = _HASHES[req.sign_method](content.encode("utf-8")).hexdigest()
    return digest.lower()


def sign_method(name: str) -> SignMethod | None:
    """The digest a ``signMethod`` name stands for (any SDK spelling, any case), or None if unknown."""
    return _SIGN_METHODS.get(name.lower())


def signature(fields: Mapping[str, str], secret: str, method: SignMethod) -> str:
    """EnOS's signature of ``fields`` (a sub-device login, a topology add): the lower-case hex digest of every
    name and value in byte-wise name order, then the secret (the same rule as a CONNECT password)."""
    content = "".join(name + fields[name] for name in sorted(fields)) + secret
    digest: str = _HASHES[method](content.encode("utf-8")).hexdigest()
    return digest.lower()


def verify_signature(fields: Mapping[str, str], secret: str, method: SignMethod, sign: str) -> bool:
    """Whether ``sign`` is the signature of ``fields`` under ``secret`` (any hex case, constant time)."""
    expected = signature(fields, secret, method).encode("ascii")
    return hmac.compare_digest(expected, sign.lower().encode("utf-8", "replace"))


def verify_password(req: LoginRequest, secret: str, password: str | None) -> bool:
    """Whether ``password`` is the signature of ``req`` under ``secret`` (any hex case, constant time)."""
    if password is None:
        return False
    expected = expected_password(req, secret).encode("ascii")
    # compare bytes: compare_digest refuses non-ASCII str, and a device may send anything
    return hmac.compare_digest(expected, password.lower().encode("utf-8", "replace"))
