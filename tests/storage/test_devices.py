"""The device registry and the CONNECT authenticator, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from typing import Any, cast

import asyncpg
import pytest

from service.devices import registry as devices
from service.devices.auth import DeviceAuthenticator
from service.devices.secretbox import KEY_BYTES, SecretBox
from service.errors import DeviceExists, DeviceNotFound, InvalidKey


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


@pytest.fixture
async def pool(migrated_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(migrated_dsn, min_size=1, max_size=4) as created:
        yield created


def login(pk: str, dk: str, secret: str, *, ts: str = "1795466980552.2302") -> tuple[str, str, str]:
    """CONNECT client id, username and password as the Python SDK builds them (reference §2.1)."""
    client_id = f"{dk}|securemode=2,signmethod=hmacsha256,timestamp={ts}|"
    content = f"clientId{dk}deviceKey{dk}productKey{pk}timestamp{ts}{secret}"
    return client_id, f"{dk}&{pk}", hashlib.sha256(content.encode()).hexdigest()


# --- registry ---------------------------------------------------------------------------------------------


async def test_add_and_list(conn: asyncpg.Connection, box: SecretBox) -> None:
    """Added devices are listed in key order, enabled, with their gateway; --product filters."""
    await devices.add_device(conn, box, "pkB", "dk1")
    await devices.add_device(conn, box, "pkA", "gw")
    await devices.add_device(conn, box, "pkA", "sub", gateway=("pkA", "gw"))

    listed = await devices.list_devices(conn)
    assert [(d.product_key, d.device_key, d.enabled, d.gateway) for d in listed] == [
        ("pkA", "gw", True, None),
        ("pkA", "sub", True, ("pkA", "gw")),
        ("pkB", "dk1", True, None),
    ]
    assert all(d.created_at.tzinfo is not None for d in listed)
    assert [d.device_key for d in await devices.list_devices(conn, product_key="pkB")] == ["dk1"]
    assert await devices.list_devices(conn, product_key="nope") == []
    assert await conn.fetchval("SELECT count(*) FROM products") == 2


async def test_add_returns_given_or_generated_secret(conn: asyncpg.Connection, box: SecretBox) -> None:
    """add returns the secret it was given, or a fresh one, and login lookup returns the same."""
    assert await devices.add_device(conn, box, "pk", "given", secret="my-secret") == "my-secret"
    generated = await devices.add_device(conn, box, "pk", "generated")
    assert len(generated) >= 32
    assert await devices.get_credentials(conn, box, "pk", "given") == ("my-secret", True)
    assert await devices.get_credentials(conn, box, "pk", "generated") == (generated, True)
    assert await devices.get_credentials(conn, box, "pk", "missing") is None


async def test_secret_is_stored_encrypted(conn: asyncpg.Connection, box: SecretBox) -> None:
    """The plaintext secret appears nowhere in the stored row's bytes."""
    secret = await devices.add_device(conn, box, "pk", "dk")
    stored = await conn.fetchval("SELECT secret_enc FROM devices WHERE product_key = 'pk' AND device_key = 'dk'")
    assert isinstance(stored, bytes)
    assert secret.encode() not in stored
    assert box.open(stored, aad=b"pk/dk") == secret


async def test_duplicate_add_is_refused(conn: asyncpg.Connection, box: SecretBox) -> None:
    """Adding a registered device again raises DeviceExists naming it, and keeps the first secret."""
    first = await devices.add_device(conn, box, "pk", "dk")
    with pytest.raises(DeviceExists, match="pk/dk is already registered"):
        await devices.add_device(conn, box, "pk", "dk", secret="other")
    assert await devices.get_credentials(conn, box, "pk", "dk") == (first, True)


async def test_unknown_gateway_is_refused(conn: asyncpg.Connection, box: SecretBox) -> None:
    """A sub-device cannot name a gateway that is not registered."""
    with pytest.raises(DeviceNotFound, match="gateway pk/gw is not registered"):
        await devices.add_device(conn, box, "pk", "sub", gateway=("pk", "gw"))
    assert await devices.list_devices(conn) == []


@pytest.mark.parametrize(
    ("pk", "dk", "message"),
    [
        ("", "dk", "product key '': must not be empty"),
        ("pk", "", "device key '': must not be empty"),
        ("p/k", "dk", "'/'"),
        ("pk", "d+k", "'\\+'"),
        ("pk", "d#k", "'#'"),
        ("pk", "d&k", "'&'"),
        ("pk", "d|k", "'\\|'"),
        ("pk", "d\x00k", "NUL|x00"),
        ("p" * 129, "dk", "at most 128"),
    ],
)
async def test_invalid_keys_are_refused(
    conn: asyncpg.Connection, box: SecretBox, pk: str, dk: str, message: str
) -> None:
    """Keys that are empty, too long, or hold topic/login separators are refused with the reason."""
    with pytest.raises(InvalidKey, match=message):
        await devices.add_device(conn, box, pk, dk)
    assert isinstance(InvalidKey("x"), ValueError)


async def test_a_128_character_key_is_accepted(conn: asyncpg.Connection, box: SecretBox) -> None:
    """The length limit is inclusive, and unicode keys are fine."""
    await devices.add_device(conn, box, "p" * 128, "düse-01")
    assert [d.device_key for d in await devices.list_devices(conn)] == ["düse-01"]


async def test_disable_and_enable(conn: asyncpg.Connection, box: SecretBox) -> None:
    """disable and enable flip the flag login checks; a missing device raises DeviceNotFound."""
    secret = await devices.add_device(conn, box, "pk", "dk")
    await devices.set_enabled(conn, "pk", "dk", False)
    assert await devices.get_credentials(conn, box, "pk", "dk") == (secret, False)
    await devices.set_enabled(conn, "pk", "dk", True)
    assert await devices.get_credentials(conn, box, "pk", "dk") == (secret, True)
    with pytest.raises(DeviceNotFound, match="device pk/nope is not registered"):
        await devices.set_enabled(conn, "pk", "nope", False)


async def test_rotate_secret(conn: asyncpg.Connection, box: SecretBox) -> None:
    """rotate replaces the secret (generated or given); a missing device raises DeviceNotFound."""
    old = await devices.add_device(conn, box, "pk", "dk")
    new = await devices.rotate_secret(conn, box, "pk", "dk")
    assert new != old
    assert await devices.get_credentials(conn, box, "pk", "dk") == (new, True)
    assert await devices.rotate_secret(conn, box, "pk", "dk", secret="chosen") == "chosen"
    assert await devices.get_credentials(conn, box, "pk", "dk") == ("chosen", True)
    with pytest.raises(DeviceNotFound):
        await devices.rotate_secret(conn, box, "pk", "nope")


# --- authenticator ----------------------------------------------------------------------------------------


async def test_good_signature_is_accepted(pool: asyncpg.Pool, box: SecretBox) -> None:
    """A registered device signing with its secret gets in, identified by its keys."""
    secret = await devices.add_device(pool, box, "pk", "dk")
    auth = DeviceAuthenticator(pool, box, allow_anonymous=False)
    result = await auth.authenticate(*login("pk", "dk", secret))
    assert (result.ok, result.product_key, result.device_key, result.reason) == (True, "pk", "dk", None)


async def test_every_sdk_spelling_is_accepted(pool: asyncpg.Pool, box: SecretBox) -> None:
    """Upper-case hex and the C SDK's pk.dk id with its fixed timestamp log in."""
    secret = await devices.add_device(pool, box, "pk", "dk")
    auth = DeviceAuthenticator(pool, box, allow_anonymous=False)
    client_id, username, password = login("pk", "dk", secret)
    assert (await auth.authenticate(client_id, username, password.upper())).ok
    c_id = "pk.dk|securemode=2,signmethod=sha256,timestamp=2524608000000|"
    c_password = hashlib.sha256(f"clientIdpk.dkdeviceKeydkproductKeypktimestamp2524608000000{secret}".encode())
    assert (await auth.authenticate(c_id, username, c_password.hexdigest().upper())).ok


async def test_wrong_secret_is_a_bad_signature(pool: asyncpg.Pool, box: SecretBox) -> None:
    """A password signed with another secret is refused as bad_signature."""
    await devices.add_device(pool, box, "pk", "dk")
    auth = DeviceAuthenticator(pool, box, allow_anonymous=True)
    result = await auth.authenticate(*login("pk", "dk", "not-the-secret"))
    assert (result.ok, result.reason, result.device_key) == (False, "bad_signature", "dk")


async def test_unknown_device_is_refused(pool: asyncpg.Pool, box: SecretBox) -> None:
    """A well-formed login for an unregistered device is refused as unknown_device."""
    auth = DeviceAuthenticator(pool, box, allow_anonymous=True)
    result = await auth.authenticate(*login("pk", "ghost", "whatever"))
    assert (result.ok, result.reason) == (False, "unknown_device")


async def test_disabled_device_is_refused(pool: asyncpg.Pool, box: SecretBox) -> None:
    """A disabled device with the right secret is refused as disabled."""
    secret = await devices.add_device(pool, box, "pk", "dk")
    await devices.set_enabled(pool, "pk", "dk", False)
    auth = DeviceAuthenticator(pool, box, allow_anonymous=False)
    result = await auth.authenticate(*login("pk", "dk", secret))
    assert (result.ok, result.reason) == (False, "disabled")


async def test_disabled_device_with_wrong_secret_is_a_bad_signature(pool: asyncpg.Pool, box: SecretBox) -> None:
    """Only a client that proves the secret learns that the device is disabled."""
    await devices.add_device(pool, box, "pk", "dk")
    await devices.set_enabled(pool, "pk", "dk", False)
    auth = DeviceAuthenticator(pool, box, allow_anonymous=False)
    assert (await auth.authenticate(*login("pk", "dk", "guess"))).reason == "bad_signature"


@pytest.mark.parametrize(("username", "password"), [(None, None), ("", ""), (None, "")])
async def test_anonymous_refused_unless_allowed(
    pool: asyncpg.Pool, box: SecretBox, username: str | None, password: str | None
) -> None:
    """A CONNECT without username and password is refused by default and admitted only when allowed."""
    refused = await DeviceAuthenticator(pool, box, allow_anonymous=False).authenticate("any", username, password)
    assert (refused.ok, refused.reason) == (False, "anonymous_refused")
    allowed = await DeviceAuthenticator(pool, box, allow_anonymous=True).authenticate("any", username, password)
    assert (allowed.ok, allowed.product_key, allowed.device_key, allowed.reason) == (True, None, None, None)


@pytest.mark.parametrize(
    ("client_id", "username", "reason"),
    [
        (None, "dk&pk", "malformed"),
        ("plain-client", "dk&pk", "malformed"),
        ("dk|securemode=2,signmethod=sha256,timestamp=1|", None, "malformed"),
        ("dk|securemode=4,signmethod=sha256,timestamp=1|", "dk&pk", "unsupported_secure_mode"),
        ("dk|securemode=2,signmethod=sha512,timestamp=1|", "dk&pk", "unsupported_sign_method"),
    ],
)
async def test_unreadable_logins_are_refused_with_their_reason(
    pool: asyncpg.Pool, box: SecretBox, client_id: str | None, username: str | None, reason: str
) -> None:
    """A login that is not EnOS secure mode 2 or 3 is refused with the parser's reason, even if anonymity is allowed."""
    result = await DeviceAuthenticator(pool, box, allow_anonymous=True).authenticate(client_id, username, "00")
    assert (result.ok, result.reason) == (False, reason)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_cache_holds_credentials_for_cache_seconds(pool: asyncpg.Pool, box: SecretBox) -> None:
    """Disabling, rotating or adding a device takes effect once cache_seconds have passed, not before."""
    secret = await devices.add_device(pool, box, "pk", "dk")
    clock = Clock()
    auth = DeviceAuthenticator(pool, box, allow_anonymous=False, cache_seconds=5.0, clock=clock)
    assert (await auth.authenticate(*login("pk", "dk", secret))).ok
    assert (await auth.authenticate(*login("pk", "new", "s"))).reason == "unknown_device"

    await devices.set_enabled(pool, "pk", "dk", False)
    await devices.add_device(pool, box, "pk", "new", secret="s")
    clock.now += 4.9
    assert (await auth.authenticate(*login("pk", "dk", secret))).ok  # cached: still enabled
    assert (await auth.authenticate(*login("pk", "new", "s"))).reason == "unknown_device"  # misses are cached

    clock.now += 0.2
    assert (await auth.authenticate(*login("pk", "dk", secret))).reason == "disabled"
    assert (await auth.authenticate(*login("pk", "new", "s"))).ok

    await devices.set_enabled(pool, "pk", "dk", True)
    rotated = await devices.rotate_secret(pool, box, "pk", "dk")
    clock.now += 5.1
    assert (await auth.authenticate(*login("pk", "dk", secret))).reason == "bad_signature"
    assert (await auth.authenticate(*login("pk", "dk", rotated))).ok


async def test_tiny_cache_seconds_with_the_real_clock(pool: asyncpg.Pool, box: SecretBox) -> None:
    """With a 50 ms cache, a disable is seen after 50 ms on the real monotonic clock."""
    secret = await devices.add_device(pool, box, "pk", "dk")
    auth = DeviceAuthenticator(pool, box, allow_anonymous=False, cache_seconds=0.05)
    assert (await auth.authenticate(*login("pk", "dk", secret))).ok
    await devices.set_enabled(pool, "pk", "dk", False)
    await asyncio.sleep(0.1)
    assert (await auth.authenticate(*login("pk", "dk", secret))).reason == "disabled"


class CountingPool:
    """A real pool that counts the credential lookups sent through it."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.fetchrows = 0

    async def fetchrow(self, *args: Any) -> Any:
        self.fetchrows += 1
        await asyncio.sleep(0.05)  # keep the query in flight while the other logins arrive
        return await self.pool.fetchrow(*args)


async def test_a_reconnect_storm_costs_one_query(pool: asyncpg.Pool, box: SecretBox) -> None:
    """Concurrent and repeated logins of one device within cache_seconds share a single database query."""
    secret = await devices.add_device(pool, box, "pk", "dk")
    counting = CountingPool(pool)
    auth = DeviceAuthenticator(cast(asyncpg.Pool, counting), box, allow_anonymous=False)
    results = await asyncio.gather(*(auth.authenticate(*login("pk", "dk", secret)) for _ in range(50)))
    assert all(r.ok for r in results)
    assert (await auth.authenticate(*login("pk", "dk", "wrong"))).reason == "bad_signature"
    assert counting.fetchrows == 1


async def test_database_failure_is_unavailable_not_an_exception(migrated_dsn: str, box: SecretBox) -> None:
    """When the database cannot answer, the login is refused as unavailable and nothing is raised."""
    closed = await asyncpg.create_pool(migrated_dsn, min_size=1, max_size=1)
    await closed.close()
    result = await DeviceAuthenticator(closed, box, allow_anonymous=False).authenticate(*login("pk", "dk", "s"))
    assert (result.ok, result.reason) == (False, "unavailable")


async def test_wrong_key_file_is_unavailable(pool: asyncpg.Pool, box: SecretBox) -> None:
    """A secret sealed under another key is our fault: unavailable, not bad_signature."""
    secret = await devices.add_device(pool, box, "pk", "dk")
    other = SecretBox(os.urandom(KEY_BYTES))
    result = await DeviceAuthenticator(pool, other, allow_anonymous=False).authenticate(*login("pk", "dk", secret))
    assert (result.ok, result.reason) == (False, "unavailable")
