"""EnOS CONNECT login parsing and signature checks, for every official SDK's spelling (reference §2)."""

from __future__ import annotations

import hashlib

import pytest

from service.errors import LoginRefused
from service.protocol.signing import (
    expected_password,
    parse_login,
    sign_method,
    signature,
    verify_password,
    verify_signature,
)

WIRE_CLIENT_ID = "dkTest01|securemode=2,signmethod=hmacsha256,timestamp=1795466980552.2302|"
WIRE_USERNAME = "dkTest01&pkTest01"
WIRE_SECRET = "secretXYZ"
WIRE_PASSWORD = "42e58d100f994c80d50bffc3c5da4a6c669a58fcebc5e790ec6f42c0124b6524"


def sign(algorithm: str, client_id: str, dk: str, pk: str, ts: str, secret: str) -> str:
    """The password as the reference spells the algorithm, computed independently of the code under test."""
    content = f"clientId{client_id}deviceKey{dk}productKey{pk}timestamp{ts}{secret}"
    return hashlib.new(algorithm, content.encode()).hexdigest()


def test_wire_sample_from_the_python_sdk_verifies() -> None:
    """The CONNECT captured from the Python SDK verifies with its secret and yields the documented hash."""
    req = parse_login(WIRE_CLIENT_ID, WIRE_USERNAME)
    assert (req.client_id_prefix, req.device_key, req.product_key) == ("dkTest01", "dkTest01", "pkTest01")
    assert req.timestamp == "1795466980552.2302"
    assert expected_password(req, WIRE_SECRET) == WIRE_PASSWORD
    assert verify_password(req, WIRE_SECRET, WIRE_PASSWORD)


def test_upper_case_hex_is_accepted() -> None:
    """Node, C and the docs send UPPER-case hex; it verifies like lower-case."""
    req = parse_login(WIRE_CLIENT_ID, WIRE_USERNAME)
    assert verify_password(req, WIRE_SECRET, WIRE_PASSWORD.upper())


@pytest.mark.parametrize(
    ("token", "algorithm"),
    [
        ("sha256", "sha256"),
        ("hmacsha256", "sha256"),
        ("HmacSHA256", "sha256"),
        ("sha1", "sha1"),
        ("hmacsha1", "sha1"),
        ("md5", "md5"),
        ("hmacmd5", "md5"),
        ("MD5", "md5"),
    ],
)
def test_every_sign_method_alias_hashes_plainly(token: str, algorithm: str) -> None:
    """Each signmethod name (any case) means a plain hash of the content, not an HMAC."""
    client_id = f"dk1|securemode=2,signmethod={token},timestamp=1700000000000|"
    req = parse_login(client_id, "dk1&pk1")
    assert req.sign_method == algorithm
    password = sign(algorithm, "dk1", "dk1", "pk1", "1700000000000", "s3cret")
    assert verify_password(req, "s3cret", password)
    assert verify_password(req, "s3cret", password.upper())


def test_float_timestamp_is_signed_verbatim() -> None:
    """A float-string timestamp is used exactly as sent, not parsed or rounded."""
    req = parse_login("dk1|securemode=2,signmethod=sha256,timestamp=1700000000000.1234567|", "dk1&pk1")
    assert req.timestamp == "1700000000000.1234567"
    assert verify_password(req, "s", sign("sha256", "dk1", "dk1", "pk1", "1700000000000.1234567", "s"))


def test_c_sdk_login_with_fixed_timestamp_and_pk_dot_dk_id() -> None:
    """The C SDK's 'pk.dk' id and constant year-2050 timestamp verify (no freshness check)."""
    client_id = "pk1.dk1|securemode=2,signmethod=sha256,timestamp=2524608000000|"
    req = parse_login(client_id, "dk1&pk1")
    assert req.client_id_prefix == "pk1.dk1"
    password = sign("sha256", "pk1.dk1", "dk1", "pk1", "2524608000000", "s").upper()
    assert verify_password(req, "s", password)


def test_java_client_id_keeps_its_brace_block_with_commas() -> None:
    """Java's '{ip=…,version=…,compress=…}' block is part of the signed id, commas and all."""
    client_id = "dk{ip=10.0.0.1,version=2.3,compress=DEFAULT}|securemode=2,signmethod=sha256,timestamp=1700000000000|"
    req = parse_login(client_id, "dk&pk")
    assert req.client_id_prefix == "dk{ip=10.0.0.1,version=2.3,compress=DEFAULT}"
    password = sign("sha256", req.client_id_prefix, "dk", "pk", "1700000000000", "s")
    assert verify_password(req, "s", password)
    assert not verify_password(req, "s", sign("sha256", "dk", "dk", "pk", "1700000000000", "s"))


def test_spaces_around_fields_are_tolerated() -> None:
    """The docs' template puts a space after each comma; spaces around keys and values are ignored."""
    req = parse_login("dk1|securemode=2, signmethod = sha256 , timestamp= 1700000000000|", "dk1&pk1")
    assert (req.secure_mode, req.sign_method, req.timestamp) == ("2", "sha256", "1700000000000")


def test_wrong_secret_is_refused() -> None:
    """A password signed with another secret does not verify."""
    req = parse_login(WIRE_CLIENT_ID, WIRE_USERNAME)
    assert not verify_password(req, "secretXYz", WIRE_PASSWORD)


@pytest.mark.parametrize("password", [None, "", "42e58d10", WIRE_PASSWORD + "00", "zz" * 32, "é" * 64])
def test_missing_or_garbled_password_is_refused(password: str | None) -> None:
    """No password, a truncated one, a longer one or non-hex text never verifies (and never raises)."""
    req = parse_login(WIRE_CLIENT_ID, WIRE_USERNAME)
    assert not verify_password(req, WIRE_SECRET, password)


def test_username_is_device_key_first() -> None:
    """'dk&pk' names device dk of product pk; swapping them changes the signed content."""
    req = parse_login(WIRE_CLIENT_ID, "pkTest01&dkTest01")
    assert (req.device_key, req.product_key) == ("pkTest01", "dkTest01")
    assert not verify_password(req, WIRE_SECRET, WIRE_PASSWORD)


@pytest.mark.parametrize(
    ("client_id", "username", "reason"),
    [
        ("dkTest01", WIRE_USERNAME, "malformed"),  # no fields at all
        ("dk|securemode=2,signmethod=sha256,timestamp=1", WIRE_USERNAME, "malformed"),  # no closing '|'
        ("dk|securemode=2,signmethod=sha256,timestamp=1|x", WIRE_USERNAME, "malformed"),  # text after it
        ("dk|securemode=2,signmethod=sha256,timestamp=1||", WIRE_USERNAME, "malformed"),
        ("dk|securemode=2,signmethod=sha256|", WIRE_USERNAME, "malformed"),  # no timestamp
        ("dk|securemode=2,signmethod=sha256,timestamp=|", WIRE_USERNAME, "malformed"),  # empty timestamp
        ("dk|signmethod=sha256,timestamp=1|", WIRE_USERNAME, "malformed"),  # no securemode
        ("dk|securemode=2,timestamp=1|", WIRE_USERNAME, "malformed"),  # no signmethod
        ("dk|securemode=2,signmethod=sha256,timestamp=1,junk|", WIRE_USERNAME, "malformed"),
        ("dk|securemode=2,securemode=2,signmethod=sha256,timestamp=1|", WIRE_USERNAME, "malformed"),
        ("dk|securemode=1,signmethod=sha256,timestamp=1|", WIRE_USERNAME, "unsupported_secure_mode"),
        ("dk|securemode=4,signmethod=sha256,timestamp=1|", WIRE_USERNAME, "unsupported_secure_mode"),
        ("dk|securemode=2,signmethod=sha512,timestamp=1|", WIRE_USERNAME, "unsupported_sign_method"),
        ("dk|securemode=2,signmethod=hmacsha512,timestamp=1|", WIRE_USERNAME, "unsupported_sign_method"),
        (WIRE_CLIENT_ID, None, "malformed"),
        (WIRE_CLIENT_ID, "", "malformed"),
        (WIRE_CLIENT_ID, "dkTest01", "malformed"),  # no '&'
        (WIRE_CLIENT_ID, "&pkTest01", "malformed"),  # empty device key
        (WIRE_CLIENT_ID, "dkTest01&", "malformed"),  # empty product key
        (WIRE_CLIENT_ID, "dkTest01&pk&x", "malformed"),  # '&' inside the product key
        (WIRE_CLIENT_ID, "dk/1&pkTest01", "malformed"),  # '/' would escape the device's topics
        (WIRE_CLIENT_ID, "dk#&pkTest01", "malformed"),
        (WIRE_CLIENT_ID, "dk&" + "p" * 129, "malformed"),  # longer than any registrable key
    ],
)
def test_malformed_logins_are_refused_with_a_reason(client_id: str, username: str | None, reason: str) -> None:
    """A CONNECT that cannot be an EnOS secure-mode-2 login is refused, saying which way it is wrong."""
    with pytest.raises(LoginRefused) as caught:
        parse_login(client_id, username)
    assert caught.value.reason == reason


def test_secure_mode_3_is_read_like_mode_2() -> None:
    """A secure-mode-3 login (signed with the product secret) parses with its mode; the signature rule is the same."""
    client_id = WIRE_CLIENT_ID.replace("securemode=2", "securemode=3")
    req = parse_login(client_id, WIRE_USERNAME)
    assert req.secure_mode == "3"
    assert verify_password(req, WIRE_SECRET, WIRE_PASSWORD)


def sign_content(algorithm: str, content: str) -> str:
    return hashlib.new(algorithm, content.encode()).hexdigest()


def test_sub_device_signature_is_the_connect_rule_over_any_fields() -> None:
    """The generic signature equals a CONNECT password for the same four fields, and takes extra ones in order."""
    fields = {"clientId": "dkTest01", "deviceKey": "dkTest01", "productKey": "pkTest01"}
    fields["timestamp"] = "1795466980552.2302"
    assert signature(fields, WIRE_SECRET, "sha256") == WIRE_PASSWORD
    assert verify_signature(fields, WIRE_SECRET, "sha256", WIRE_PASSWORD.upper())
    assert not verify_signature(fields, "other", "sha256", WIRE_PASSWORD)
    assert not verify_signature(fields, WIRE_SECRET, "sha256", "ünïcode")
    extra = fields | {"cleanSession": "true"}
    content = "cleanSessiontrue" + "".join(k + fields[k] for k in sorted(fields)) + WIRE_SECRET
    assert signature(extra, WIRE_SECRET, "sha1") == sign_content("sha1", content)


def test_sign_method_names() -> None:
    """Every SDK spelling of a sign method, any case; unknown ones are None."""
    assert [sign_method(n) for n in ("hmacSha1", "SHA256", "hmacmd5", "sha512")] == ["sha1", "sha256", "md5", None]
