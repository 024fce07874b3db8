"""Product secrets, the activation policy and device activation state, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import asyncpg
import pytest

from service.devices import activation
from service.devices import registry as devices
from service.devices.activation import Product
from service.devices.auth import DeviceAuthenticator
from service.devices.secretbox import KEY_BYTES, SecretBox
from service.errors import InvalidKey, RegistryError, SecretUnreadable
from tests.storage.test_devices import login


@pytest.fixture
def box() -> SecretBox:
    return SecretBox(os.urandom(KEY_BYTES))


@pytest.fixture
async def conn(migrated_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(migrated_dsn)
    try:
        yield connection
    finally:
        await connection.close()


def mode3(pk: str, dk: str, secret: str) -> tuple[str, str, str]:
    client_id, username, password = login(pk, dk, secret)
    return client_id.replace("securemode=2", "securemode=3"), username, password


async def test_product_secret_is_sealed_and_policy_needs_it(conn: asyncpg.Connection, box: SecretBox) -> None:
    """The secret is stored sealed (under its own associated data); activation without a secret is refused."""
    with pytest.raises(RegistryError, match="has no secret: dynamic activation needs --secret S"):
        await activation.set_product(conn, box, "pk", dynamic_activation=True)
    product, generated = await activation.set_product(conn, box, "pk", secret="ps", dynamic_activation=True)
    assert (product, generated) == (Product("pk", True, True), None)
    sealed = await conn.fetchval("SELECT secret_enc FROM products WHERE product_key = 'pk'")
    assert b"ps" not in sealed and box.open(sealed, aad=activation.product_aad("pk")) == "ps"
    with pytest.raises(SecretUnreadable):  # a device's associated data does not open it
        box.open(sealed, aad=b"pk/dk")
    # changing only the policy keeps the secret
    product, _ = await activation.set_product(conn, box, "pk", dynamic_activation=False)
    assert product == Product("pk", True, False)
    assert await activation.get_product(conn, "pk") == Product("pk", True, False)
    assert await activation.get_product(conn, "nope") is None


async def test_generated_secret_is_returned_once(conn: asyncpg.Connection, box: SecretBox) -> None:
    """--generate-secret returns the new secret, which the activation state then opens."""
    _, generated = await activation.set_product(conn, box, "pk", generate_secret=True, dynamic_activation=True)
    assert generated and len(generated) >= 20
    state = await activation.activation_state(conn, box, "pk", "absent")
    assert (state.product_secret, state.dynamic_activation, state.device_enabled) == (generated, True, None)
    with pytest.raises(InvalidKey):
        await activation.set_product(conn, box, "pk", secret="x", generate_secret=True)
    with pytest.raises(InvalidKey):
        await activation.set_product(conn, box, "bad/key", secret="x")


async def test_concurrent_activations_have_one_winner(migrated_dsn: str, box: SecretBox) -> None:
    """Eight connections activating one device at once: exactly one gets the secret."""
    setup = await asyncpg.connect(migrated_dsn)
    try:
        await devices.add_device(setup, box, "pk", "dk", secret="device-secret")
        await activation.set_product(setup, box, "pk", secret="ps", dynamic_activation=True)
    finally:
        await setup.close()
    conns = [await asyncpg.connect(migrated_dsn) for _ in range(8)]
    try:
        results = await asyncio.gather(*(activation.activate(c, box, "pk", "dk") for c in conns))
    finally:
        for c in conns:
            await c.close()
    assert [r for r in results if r is not None] == ["device-secret"] and results.count(None) == 7


async def test_authenticator_activates_once_then_wants_mode_2(migrated_dsn: str, box: SecretBox) -> None:
    """Mode 3 with the product secret activates and returns the device secret; a second mode 3 is already_activated,
    and mode 2 with the device secret works."""
    async with asyncpg.create_pool(migrated_dsn, min_size=1, max_size=2) as pool:
        await devices.add_device(pool, box, "pk", "dk", secret="device-secret")
        await activation.set_product(pool, box, "pk", secret="ps", dynamic_activation=True)
        auth = DeviceAuthenticator(pool, box, allow_anonymous=False)
        first = await auth.authenticate(*mode3("pk", "dk", "ps"))
        assert (first.ok, first.activated_secret) == (True, "device-secret")
        again = await auth.authenticate(*mode3("pk", "dk", "ps"))
        assert (again.ok, again.reason) == (False, "already_activated")
        assert (await auth.authenticate(*login("pk", "dk", "device-secret"))).ok
        # the broker auth endpoints cannot hand a secret over: they never activate
        await devices.add_device(pool, box, "pk", "dk2")
        endpoint = DeviceAuthenticator(pool, box, allow_anonymous=False, allow_activation=False)
        assert (await endpoint.authenticate(*mode3("pk", "dk2", "ps"))).reason == "activation_disabled"


async def test_mode_2_login_marks_activated_once(migrated_dsn: str, box: SecretBox) -> None:
    """A device's first mode-2 login records its activation; a device added before the migration counts as activated."""
    async with asyncpg.create_pool(migrated_dsn, min_size=1, max_size=2) as pool:
        await devices.add_device(pool, box, "pk", "dk", secret="s")
        assert not (await activation.device_login(pool, box, "pk", "dk")).activated  # type: ignore[union-attr]
        auth = DeviceAuthenticator(pool, box, allow_anonymous=False)
        assert (await auth.authenticate(*login("pk", "dk", "s"))).ok
        assert (await activation.device_login(pool, box, "pk", "dk")).activated  # type: ignore[union-attr]
        assert await activation.device_login(pool, box, "pk", "nobody") is None
