"""Signed-in devices for integration tests: register them in a running service's registry, build their logins.

Passwords are computed here from the reference's algorithm (reference/enos-protocol.md §2.2), independently of
`service.protocol.signing`, so a regression there cannot hide behind a helper that shares its code.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg

from service.devices.registry import add_device, rotate_secret, set_enabled
from service.devices.secretbox import SecretBox, key_path, load_or_create_key
from tests.support import Device, RunningService

T = TypeVar("T")

PK = "inverter01"  # the shipped thing model (schemas/inverter01.json)
PY_TIMESTAMP = "1795466980552.2302"  # the Python SDK's float-string timestamp, as captured on the wire
C_TIMESTAMP = "2524608000000"  # the C SDK's fixed timestamp (year 2050)
_HASHES = {
    "sha256": "sha256",
    "hmacsha256": "sha256",
    "sha1": "sha1",
    "hmacsha1": "sha1",
    "md5": "md5",
    "hmacmd5": "md5",
}


@dataclass(frozen=True)
class Login:
    """The three CONNECT fields a device sends."""

    client_id: str
    username: str
    password: str


def sign(method: str, prefix: str, dk: str, pk: str, timestamp: str, secret: str) -> str:
    """The lower-case hex password for a login (plain hash of the sorted concatenation, despite the names)."""
    content = f"clientId{prefix}deviceKey{dk}productKey{pk}timestamp{timestamp}{secret}"
    return hashlib.new(_HASHES[method.lower()], content.encode("utf-8")).hexdigest()


def login(
    dk: str,
    secret: str,
    *,
    pk: str = PK,
    prefix: str | None = None,
    method: str = "sha256",
    timestamp: str = "1700000000000",
    upper: bool = False,
    separator: str = ",",
) -> Login:
    """An EnOS secure-mode-2 login; ``prefix`` is the id part of the client id (default: the device key)."""
    prefix = dk if prefix is None else prefix
    fields = separator.join(("securemode=2", f"signmethod={method}", f"timestamp={timestamp}"))
    password = sign(method, prefix, dk, pk, timestamp, secret)
    return Login(f"{prefix}|{fields}|", f"{dk}&{pk}", password.upper() if upper else password)


def connect(port: int, creds: Login, *, tls: ssl.SSLContext | None = None, **options: Any) -> tuple[Device, int]:
    """A paho device that sent ``creds`` (over TLS with ``tls``), and the CONNACK code it got; close it in any case."""
    device = Device(port, creds.client_id, username=creds.username, password=creds.password, **options)
    if tls is not None:
        device.client.tls_set_context(tls)
    try:
        return device, device.connect()
    except BaseException:
        device.close()
        raise


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def connect_packet(creds: Login) -> bytes:
    """A bare MQTT 3.1.1 CONNECT (clean session, keep-alive 60 s) carrying ``creds``."""
    variable = _field(b"MQTT") + bytes([4, 0x80 | 0x40 | 0x02]) + (60).to_bytes(2, "big")
    body = variable + b"".join(_field(v.encode()) for v in (creds.client_id, creds.username, creds.password))
    length, size = b"", len(body)
    while True:  # MQTT's variable-length "remaining length"
        size, digit = divmod(size, 128)
        length += bytes([digit | (0x80 if size else 0)])
        if not size:
            break
    return b"\x10" + length + body


def exchange_connect(sock: socket.socket, creds: Login) -> bytes:
    """Send a CONNECT on ``sock``; return the 4 CONNACK bytes as written, or fewer if the broker closed first."""
    sock.sendall(connect_packet(creds))
    received = b""
    while len(received) < 4:
        chunk = sock.recv(4 - len(received))
        if not chunk:
            break
        received += chunk
    return received


def raw_connack(port: int, creds: Login, timeout: float = 5) -> bytes:
    """The CONNACK a bare CONNECT gets, byte for byte.

    paho reports a 3.1.1 refusal as its MQTT 5 equivalent (5 becomes 135), so the wire code is checked here.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        return exchange_connect(sock, creds)


def _registry(running: RunningService, action: Callable[[asyncpg.Connection, SecretBox], Awaitable[T]]) -> T:
    # the box must open what the service seals: build it from the very key file the service created
    box = SecretBox(load_or_create_key(key_path(running.settings)))

    async def run() -> T:
        conn = await asyncpg.connect(running.service.dsn)
        try:
            return await action(conn, box)
        finally:
            await conn.close()

    return asyncio.run(run())


def register(running: RunningService, dk: str, secret: str, *, pk: str = PK) -> str:
    """Register a device with ``secret`` in the running service's registry."""
    return _registry(running, lambda conn, box: add_device(conn, box, pk, dk, secret=secret))


def rotate(running: RunningService, dk: str, secret: str, *, pk: str = PK) -> str:
    """Give a registered device a new secret."""
    return _registry(running, lambda conn, box: rotate_secret(conn, box, pk, dk, secret=secret))


def disable(running: RunningService, dk: str, *, pk: str = PK) -> None:
    """Forbid a registered device's logins."""
    _registry(running, lambda conn, box: set_enabled(conn, pk, dk, False))
