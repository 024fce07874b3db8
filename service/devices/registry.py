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
from service.errors import DeviceExists, DeviceInUse, DeviceNotFound, InvalidKey, TopologyRefused
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
    online: bool = False
    last_seen: datetime | None = None
    peer: str | None = None
    client_id: str | None = None
    # None: registered but not activated yet (service/devices/activation.py): secure mode 3 may still activate it
    activated_at: datetime | None = None


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


# a session counts as online only while its `serve` keeps refreshing it (a killed serve cannot say goodbye)
ONLINE_WITHIN_SECONDS = 90
_COLUMNS = f"""
    product_key, device_key, d.enabled, d.gateway_product_key, d.gateway_device_key, d.created_at,
    coalesce(s.online AND s.last_seen > now() - interval '{ONLINE_WITHIN_SECONDS} seconds', false) AS online,
    s.last_seen, s.peer, s.client_id, d.activated_at
"""


async def list_devices(conn: Executor, *, product_key: str | None = None) -> list[Device]:
    """Registered devices, ordered by product then device key; only ``product_key``'s when given."""
    rows = await conn.fetch(
        f"""
        SELECT {_COLUMNS}
        FROM devices d LEFT JOIN device_sessions s USING (product_key, device_key)
        WHERE $1::text IS NULL OR d.product_key = $1
        ORDER BY d.product_key, d.device_key
        """,  # noqa: S608 - _COLUMNS is a constant
        product_key,
    )
    return [_device(row) for row in rows]


async def get_device(conn: Executor, product_key: str, device_key: str) -> Device | None:
    """One registered device, or None."""
    row = await conn.fetchrow(
        f"""
        SELECT {_COLUMNS}
        FROM devices d LEFT JOIN device_sessions s USING (product_key, device_key)
        WHERE d.product_key = $1 AND d.device_key = $2
        """,  # noqa: S608 - _COLUMNS is a constant
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
        online=row["online"],
        last_seen=row["last_seen"],
        peer=row["peer"],
        client_id=row["client_id"],
        activated_at=row["activated_at"],
    )


async def require_device(conn: Executor, product_key: str, device_key: str) -> Device:
    """One registered device; raise `DeviceNotFound` if it is not registered."""
    device = await get_device(conn, product_key, device_key)
    if device is None:
        raise DeviceNotFound(product_key, device_key)
    return device


async def delete_device(conn: asyncpg.Connection, product_key: str, device_key: str) -> None:
    """Remove a device and its session row (its stored points stay); refuse while it is a gateway of others."""
    try:
        async with conn.transaction():
            status = await conn.execute(
                "DELETE FROM devices WHERE product_key = $1 AND device_key = $2", product_key, device_key
            )
            await conn.execute(
                "DELETE FROM device_sessions WHERE product_key = $1 AND device_key = $2", product_key, device_key
            )
    except asyncpg.ForeignKeyViolationError:
        raise DeviceInUse(
            f"device {product_key}/{device_key} is the gateway of registered sub-devices; delete those first"
        ) from None
    if status != "DELETE 1":
        raise DeviceNotFound(product_key, device_key)


async def require_credentials(conn: Executor, box: SecretBox, product_key: str, device_key: str) -> tuple[str, bool]:
    """``(secret, enabled)``; raise `DeviceNotFound` if the device is not registered."""
    found = await get_credentials(conn, box, product_key, device_key)
    if found is None:
        raise DeviceNotFound(product_key, device_key)
    return found


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


# --- gateway topology and sub-device logins (issue 12) -------------------------------------------------------------
Key = tuple[str, str]
Transactional = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
"""A single connection (one from a pool included): what a transaction needs."""


async def login_records(conn: Executor, box: SecretBox, keys: list[Key]) -> dict[Key, tuple[str, bool, Key | None]]:
    """``(secret, enabled, gateway)`` of each registered device among ``keys`` (one query; unknown ones absent)."""
    rows = await conn.fetch(
        """
        SELECT d.product_key, d.device_key, d.secret_enc, d.enabled, d.gateway_product_key, d.gateway_device_key
        FROM devices d JOIN unnest($1::text[], $2::text[]) AS k (pk, dk)
          ON d.product_key = k.pk AND d.device_key = k.dk
        """,
        [k[0] for k in keys],
        [k[1] for k in keys],
    )
    found: dict[Key, tuple[str, bool, Key | None]] = {}
    for row in rows:
        key = (row["product_key"], row["device_key"])
        gateway = (row["gateway_product_key"], row["gateway_device_key"]) if row["gateway_product_key"] else None
        found[key] = (box.open(row["secret_enc"], aad=_aad(*key)), row["enabled"], gateway)
    return found


async def gateways_among(conn: Executor, keys: list[Key]) -> set[Key]:
    """Which of ``keys`` have sub-devices of their own."""
    rows = await conn.fetch(
        """
        SELECT DISTINCT gateway_product_key, gateway_device_key FROM devices
        JOIN unnest($1::text[], $2::text[]) AS k (pk, dk) ON gateway_product_key = k.pk AND gateway_device_key = k.dk
        """,
        [k[0] for k in keys],
        [k[1] for k in keys],
    )
    return {(row[0], row[1]) for row in rows}


async def sub_devices_of(conn: Executor, gateway: Key) -> list[Key]:
    """A gateway's sub-devices (its topology), ordered by product then device key."""
    rows = await conn.fetch(
        "SELECT product_key, device_key FROM devices WHERE gateway_product_key = $1 AND gateway_device_key = $2"
        " ORDER BY product_key, device_key",
        *gateway,
    )
    return [(row[0], row[1]) for row in rows]


async def attach_sub_devices(conn: Transactional, gateway: Key, keys: list[Key]) -> None:
    """Make ``keys`` sub-devices of ``gateway``, all or none (`TopologyRefused` naming the first that cannot be).

    A sub-device already under this gateway stays; one under another gateway, the gateway itself, a device that
    has sub-devices, or a gateway that is itself a sub-device is refused. Rows are locked while checked, so two
    gateways claiming one device at once cannot both succeed.
    """
    name = f"{gateway[0]}/{gateway[1]}"
    async with conn.transaction():
        own = await conn.fetchrow(
            "SELECT gateway_product_key, gateway_device_key FROM devices"
            " WHERE product_key = $1 AND device_key = $2 FOR SHARE",
            *gateway,
        )
        if own is None:
            raise DeviceNotFound(*gateway, role="gateway")
        if own[0] is not None:
            raise TopologyRefused(f"gateway {name} is itself a sub-device of {own[0]}/{own[1]}")
        rows = await conn.fetch(
            """
            SELECT d.product_key, d.device_key, d.gateway_product_key, d.gateway_device_key,
                   EXISTS (SELECT 1 FROM devices s WHERE s.gateway_product_key = d.product_key
                                                     AND s.gateway_device_key = d.device_key) AS parent
            FROM devices d JOIN unnest($1::text[], $2::text[]) AS k (pk, dk)
              ON d.product_key = k.pk AND d.device_key = k.dk
            FOR UPDATE OF d
            """,
            [k[0] for k in keys],
            [k[1] for k in keys],
        )
        found = {(row[0], row[1]): row for row in rows}
        for key in keys:
            row = found.get(key)
            if key == gateway:
                raise TopologyRefused(f"{key[0]}/{key[1]} is the gateway itself")
            if row is None:
                raise DeviceNotFound(*key)
            if row[2] is not None and (row[2], row[3]) != gateway:
                raise TopologyRefused(f"{key[0]}/{key[1]} is a sub-device of another gateway, {row[2]}/{row[3]}")
            if row["parent"]:
                raise TopologyRefused(f"{key[0]}/{key[1]} is a gateway (it has sub-devices)")
        await conn.execute(
            """
            UPDATE devices d SET gateway_product_key = $3, gateway_device_key = $4, updated_at = now()
            FROM unnest($1::text[], $2::text[]) AS k (pk, dk)
            WHERE d.product_key = k.pk AND d.device_key = k.dk AND d.gateway_product_key IS NULL
            """,
            [k[0] for k in keys],
            [k[1] for k in keys],
            *gateway,
        )


async def detach_sub_devices(conn: Transactional, gateway: Key, keys: list[Key]) -> None:
    """Remove ``keys`` from ``gateway``'s topology, all or none (`DeviceNotFound` / `TopologyRefused` otherwise)."""
    async with conn.transaction():
        rows = await conn.fetch(
            """
            SELECT d.product_key, d.device_key, d.gateway_product_key, d.gateway_device_key
            FROM devices d JOIN unnest($1::text[], $2::text[]) AS k (pk, dk)
              ON d.product_key = k.pk AND d.device_key = k.dk
            FOR UPDATE OF d
            """,
            [k[0] for k in keys],
            [k[1] for k in keys],
        )
        found = {(row[0], row[1]): (row[2], row[3]) for row in rows}
        for key in keys:
            if key not in found:
                raise DeviceNotFound(*key)
            if found[key] != gateway:
                raise TopologyRefused(f"{key[0]}/{key[1]} is not a sub-device of {gateway[0]}/{gateway[1]}")
        await conn.execute(
            """
            UPDATE devices d SET gateway_product_key = NULL, gateway_device_key = NULL, updated_at = now()
            FROM unnest($1::text[], $2::text[]) AS k (pk, dk)
            WHERE d.product_key = k.pk AND d.device_key = k.dk
            """,
            [k[0] for k in keys],
            [k[1] for k in keys],
        )
