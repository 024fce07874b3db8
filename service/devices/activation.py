"""Product secrets, the dynamic-activation policy, and device activation state, in PostgreSQL.

A product may carry a secret (sealed like device secrets) and allow dynamic activation. A device that is
registered but not yet activated may then sign in with secure mode 3 — signed with the product secret — and
is activated by that login: it receives its own device secret and must use secure mode 2 from then on. A
device is activated by its first successful login in either mode (migrations/0005_activation.sql).

`activate` is one conditional UPDATE, so with several workers or instances two devices racing for the same
activation cannot both win.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from service.devices.registry import Executor, check_key
from service.devices.secretbox import SecretBox, new_secret
from service.errors import InvalidKey, RegistryError


@dataclass(frozen=True)
class Product:
    """A product's activation settings (never its secret)."""

    product_key: str
    has_secret: bool
    dynamic_activation: bool


@dataclass(frozen=True)
class DeviceLogin:
    """What a secure-mode-2 login needs to know about a device."""

    secret: str
    enabled: bool
    activated: bool


@dataclass(frozen=True)
class ActivationState:
    """What a secure-mode-3 login needs: the product's secret and policy, and the device's state (None: unknown)."""

    product_secret: str | None
    dynamic_activation: bool
    device_enabled: bool | None
    device_activated: bool | None


def product_aad(product_key: str) -> bytes:
    """The sealed product secret's associated data: no device's ``pk/dk`` can equal it (it has no ``/``)."""
    return f"product:{product_key}".encode()


def _device_aad(product_key: str, device_key: str) -> bytes:
    return f"{product_key}/{device_key}".encode()  # as service.devices.registry seals device secrets


async def set_product(
    conn: Executor,
    box: SecretBox,
    product_key: str,
    *,
    secret: str | None = None,
    generate_secret: bool = False,
    dynamic_activation: bool | None = None,
) -> tuple[Product, str | None]:
    """Set a product's secret and/or activation policy (creating the product if new).

    Returns the product and the secret when one was generated. Dynamic activation needs a secret, given now or
    stored before; a refusal is a `RegistryError` saying what to pass.
    """
    check_key("product key", product_key)
    if secret is not None and generate_secret:
        raise InvalidKey("give --secret or --generate-secret, not both")
    if secret is not None and not secret:
        raise InvalidKey("a product secret must not be empty")
    generated = new_secret() if generate_secret else None
    new = secret if secret is not None else generated
    sealed = box.seal(new, aad=product_aad(product_key)) if new is not None else None
    try:
        if isinstance(conn, asyncpg.Pool):
            async with conn.acquire() as acquired:
                row = await _upsert_product(acquired, product_key, sealed, dynamic_activation)
        else:
            row = await _upsert_product(conn, product_key, sealed, dynamic_activation)
    except asyncpg.CheckViolationError:
        raise RegistryError(
            f"product {product_key} has no secret: dynamic activation needs --secret S or --generate-secret"
        ) from None
    assert row is not None
    return Product(row["product_key"], row["has_secret"], row["dynamic_activation"]), generated


async def _upsert_product(
    conn: asyncpg.Connection | PoolConnectionProxy,
    product_key: str,
    sealed: bytes | None,
    dynamic_activation: bool | None,
) -> asyncpg.Record | None:
    # two statements in one transaction: an INSERT … ON CONFLICT would check the new row's constraint (policy
    # without a secret) before noticing the product exists with one; a refusal leaves nothing behind
    async with conn.transaction():
        await conn.execute("INSERT INTO products (product_key) VALUES ($1) ON CONFLICT DO NOTHING", product_key)
        return await conn.fetchrow(
            """
            UPDATE products SET
                secret_enc = coalesce($2, secret_enc),
                dynamic_activation = coalesce($3, dynamic_activation),
                updated_at = now()
            WHERE product_key = $1
            RETURNING product_key, secret_enc IS NOT NULL AS has_secret, dynamic_activation
            """,
            product_key,
            sealed,
            dynamic_activation,
        )


async def get_product(conn: Executor, product_key: str) -> Product | None:
    """A product's activation settings, or None if it is not registered."""
    row = await conn.fetchrow(
        "SELECT product_key, secret_enc IS NOT NULL AS has_secret, dynamic_activation FROM products"
        " WHERE product_key = $1",
        product_key,
    )
    return None if row is None else Product(row["product_key"], row["has_secret"], row["dynamic_activation"])


async def device_login(conn: Executor, box: SecretBox, product_key: str, device_key: str) -> DeviceLogin | None:
    """The secret, enabled flag and activation state of a device, or None for an unregistered one."""
    row = await conn.fetchrow(
        "SELECT secret_enc, enabled, activated_at IS NOT NULL AS activated FROM devices"
        " WHERE product_key = $1 AND device_key = $2",
        product_key,
        device_key,
    )
    if row is None:
        return None
    secret = box.open(row["secret_enc"], aad=_device_aad(product_key, device_key))
    return DeviceLogin(secret, row["enabled"], row["activated"])


async def mark_activated(conn: Executor, product_key: str, device_key: str) -> None:
    """Record a device's first login (secure mode 2): from now on it cannot be activated with the product secret."""
    await conn.execute(
        "UPDATE devices SET activated_at = now() WHERE product_key = $1 AND device_key = $2 AND activated_at IS NULL",
        product_key,
        device_key,
    )


async def activation_state(conn: Executor, box: SecretBox, product_key: str, device_key: str) -> ActivationState:
    """The product's secret and policy and the device's state, read fresh (never cached: activation is rare)."""
    row = await conn.fetchrow(
        """
        SELECT p.secret_enc, p.dynamic_activation, d.enabled, d.activated_at IS NOT NULL AS activated
        FROM products p LEFT JOIN devices d ON d.product_key = p.product_key AND d.device_key = $2
        WHERE p.product_key = $1
        """,
        product_key,
        device_key,
    )
    if row is None:
        return ActivationState(None, False, None, None)
    sealed = row["secret_enc"]
    secret = box.open(sealed, aad=product_aad(product_key)) if sealed is not None else None
    return ActivationState(secret, row["dynamic_activation"], row["enabled"], row["activated"])


async def activate(conn: Executor, box: SecretBox, product_key: str, device_key: str) -> str | None:
    """Activate a registered, enabled, not yet activated device of a product that allows it; its device secret.

    None when it cannot be (already activated — possibly a moment ago by a racing connection —, disabled,
    unknown, or the product's policy changed): one conditional UPDATE decides, so only one caller ever wins.
    """
    row = await conn.fetchrow(
        """
        UPDATE devices d SET activated_at = now(), updated_at = now()
        FROM products p
        WHERE d.product_key = $1 AND d.device_key = $2 AND d.activated_at IS NULL AND d.enabled
          AND p.product_key = d.product_key AND p.dynamic_activation
        RETURNING d.secret_enc
        """,
        product_key,
        device_key,
    )
    return None if row is None else box.open(row["secret_enc"], aad=_device_aad(product_key, device_key))
