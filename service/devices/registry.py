"""The device registry in PostgreSQL: which devices exist, whether they may log in, and their sealed secrets.

Every function takes a connection or a pool (both run single statements), so the command line passes its
one connection and the broker its pool. Secrets go in and out in clear; only sealed bytes touch the
database (service/devices/secretbox.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from service.devices.secretbox import SecretBox, new_secret
from service.errors import DeviceExists, DeviceNotFound, InvalidKey
from service.protocol.signing import key_problem

Executor = asyncpg.Connection | asyncpg.Pool


@dataclass(frozen=True)
class Device:
    """A registered device, without its secret."""

    product_key: str
    device_key: str
    enabled: bool
    gateway: tuple[str, str] | None
    created_at: datetime


def check_key(what: str, key: str) -> None:
    """Raise `InvalidKey` if ``key`` cannot be a product or device key (``what`` names it in the message)."""
    problem = key_problem(key)
    if problem is not None:
        raise InvalidKey(f"invalid {what} {key!r}: {problem}")


def _aad(product_key: str, device_key: str) -> bytes:
    # keys cannot contain '/', so "pk/dk" names exactly one device
    return f"{product_key}/{device_key}".encode()


async def add_device(
    conn: Executor,
    box: SecretBox,
    product_key: str,
    device_key: str,
    *,
    secret: str | None = None,
    gateway: tuple[str, str] | None = None,
) -> str:
    """Register a device (and its product if new); return its secret, generated unless given."""
    check_key("product key", product_key)
    check_key("device key", device_key)
    if gateway is not None:
        check_key("gateway product key", gateway[0])
        check_key("gateway device key", gateway[1])
        if gateway == (product_key, device_key):
            raise InvalidKey(f"device {product_key}/{device_key} cannot be its own gateway")
    secret = new_secret() if secret is None else secret
    if not secret:
        raise InvalidKey("a device secret must not be empty")
    gateway_pk, gateway_dk = gateway if gateway is not None else (None, None)
    try:
        # one statement, so it is atomic on a pool as on a connection; the foreign key sees the CTE's row
        await conn.execute(
            """
            WITH product AS (INSERT INTO products (product_key) VALUES ($1) ON CONFLICT DO NOTHING)
            INSERT INTO devices (product_key, device_key, secret_enc, gateway_product_key, gateway_device_key)
            VALUES ($1, $2, $3, $4, $5)
            """,
            product_key,
            device_key,
            box.seal(secret, aad=_aad(product_key, device_key)),
            gateway_pk,
            gateway_dk,
        )
    except asyncpg.UniqueViolationError:
        raise DeviceExists(product_key, device_key) from None
    except asyncpg.ForeignKeyViolationError:
        if gateway is None:
            raise  # the product row is inserted by the same statement, so only the gateway can be missing
        raise DeviceNotFound(*gateway, role="gateway") from None
    return secret


async def list_devices(conn: Executor, *, product_key: str | None = None) -> list[Device]:
    """Registered devices, ordered by product then device key; only ``product_key``'s when given."""
    rows = await conn.fetch(
        """
        SELECT product_key, device_key, enabled, gateway_product_key, gateway_device_key, created_at
        FROM devices
        WHERE $1::text IS NULL OR product_key = $1
        ORDER BY product_key, device_key
        """,
        product_key,
    )
    return [_device(row) for row in rows]


async def get_device(conn: Executor, product_key: str, device_key: str) -> Device | None:
    """One registered device, or None."""
    row = await conn.fetchrow(
        """
        SELECT product_key, device_key, enabled, gateway_product_key, gateway_device_key, created_at
        FROM devices WHERE product_key = $1 AND device_key = $2
        """,
        product_key,
        device_key,
    )
    return None if row is None else _device(row)


def _device(row: asyncpg.Record) -> Device:
    gateway_pk, gateway_dk = row["gateway_product_key"], row["gateway_device_key"]
    return Device(
        product_key=row["product_key"],
        device_key=row["device_key"],
        enabled=row["enabled"],
        gateway=(gateway_pk, gateway_dk) if gateway_pk is not None else None,
        created_at=row["created_at"],
    )


async def set_enabled(conn: Executor, product_key: str, device_key: str, enabled: bool) -> None:
    """Allow or forbid a device's logins; raise `DeviceNotFound` if it is not registered."""
    status = await conn.execute(
        "UPDATE devices SET enabled = $3, updated_at = now() WHERE product_key = $1 AND device_key = $2",
        product_key,
        device_key,
        enabled,
    )
    if status != "UPDATE 1":
        raise DeviceNotFound(product_key, device_key)


async def rotate_secret(
    conn: Executor, box: SecretBox, product_key: str, device_key: str, *, secret: str | None = None
) -> str:
    """Replace a device's secret (generated unless given) and return it; the old one stops working."""
    secret = new_secret() if secret is None else secret
    if not secret:
        raise InvalidKey("a device secret must not be empty")
    status = await conn.execute(
        "UPDATE devices SET secret_enc = $3, updated_at = now() WHERE product_key = $1 AND device_key = $2",
        product_key,
        device_key,
        box.seal(secret, aad=_aad(product_key, device_key)),
    )
    if status != "UPDATE 1":
        raise DeviceNotFound(product_key, device_key)
    return secret


async def get_credentials(conn: Executor, box: SecretBox, product_key: str, device_key: str) -> tuple[str, bool] | None:
    """``(secret, enabled)`` for checking a login, or None for an unregistered device."""
    row = await conn.fetchrow(
        "SELECT secret_enc, enabled FROM devices WHERE product_key = $1 AND device_key = $2",
        product_key,
        device_key,
    )
    if row is None:
        return None
    return box.open(row["secret_enc"], aad=_aad(product_key, device_key)), row["enabled"]


SubDevicePair = tuple[tuple[str, str], tuple[str, str]]
"""((gateway product, gateway device), (sub-device product, sub-device device))."""


async def sub_device_pairs(conn: Executor) -> frozenset[SubDevicePair]:
    """Every (gateway, sub-device) relation of enabled sub-devices: whom each gateway may write points for."""
    records = await conn.fetch(
        "SELECT gateway_product_key, gateway_device_key, product_key, device_key FROM devices"
        " WHERE gateway_product_key IS NOT NULL AND enabled"
    )
    return frozenset(((r[0], r[1]), (r[2], r[3])) for r in records)
