"""``pointgate product …`` driven through typer against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import pytest
from typer.testing import CliRunner, Result

from service.cli.main import app
from service.devices.activation import activation_state, mark_activated
from service.devices.secretbox import SecretBox, load_or_create_key


@pytest.fixture
def env(migrated_dsn: str, tmp_path: Path) -> dict[str, str]:
    """Environment pointing the CLI at the test database and a key file in tmp_path."""
    return {
        "POINTGATE_DATABASE_URL": migrated_dsn,
        "POINTGATE_DATA_DIR": str(tmp_path / "data"),
        "POINTGATE_SECRET_KEY_FILE": str(tmp_path / "keys" / "secret.key"),
    }


def run(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(app, ["product", *args], env=env)


def stored_secret(env: dict[str, str], pk: str) -> str | None:
    """The product secret as the authenticator would open it, with the key file the CLI created."""
    box = SecretBox(load_or_create_key(Path(env["POINTGATE_SECRET_KEY_FILE"])))

    async def read() -> str | None:
        conn = await asyncpg.connect(env["POINTGATE_DATABASE_URL"])
        try:
            return (await activation_state(conn, box, pk, "any")).product_secret
        finally:
            await conn.close()

    return asyncio.run(read())


def test_generate_secret_prints_it_alone_and_stores_it_sealed(env: dict[str, str]) -> None:
    """--generate-secret prints only the secret on stdout (a summary on stderr); it opens from the database."""
    result = run(env, "set", "pk1", "--generate-secret", "--dynamic-activation", "on")
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip()
    assert len(secret) == 32 and "\n" not in secret
    assert "pk1: product secret set, dynamic activation on" in result.stderr
    assert stored_secret(env, "pk1") == secret


def test_set_secret_then_policy_and_show(env: dict[str, str]) -> None:
    """--secret stores the given secret and prints nothing on stdout; show reports the policy, never the secret."""
    assert run(env, "set", "pk1", "--secret", "given").stdout == ""
    assert stored_secret(env, "pk1") == "given"
    assert run(env, "set", "pk1", "--dynamic-activation", "on").exit_code == 0
    shown = run(env, "show", "pk1", "--json")
    assert json.loads(shown.stdout) == {"productKey": "pk1", "secret": True, "dynamicActivation": True}
    assert "given" not in shown.output
    assert run(env, "show", "pk1").stdout.strip() == "pk1: product secret set, dynamic activation on"
    assert run(env, "set", "pk1", "--dynamic-activation", "off").exit_code == 0
    assert "dynamic activation off" in run(env, "show", "pk1").stdout


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["set", "pk2", "--dynamic-activation", "on"], 1, "product pk2 has no secret"),
        (["set", "pk2", "--secret", "a", "--generate-secret"], 1, "not both"),
        (["set", "pk2", "--secret", ""], 1, "must not be empty"),
        (["set", "bad/pk", "--secret", "a"], 1, "invalid product key"),
        (["set", "pk2", "--dynamic-activation", "maybe"], 2, "maybe"),
        (["set", "pk2"], 2, "give --secret"),
        (["show", "nope"], 1, "product nope is not registered"),
    ],
)
def test_bad_requests_are_one_line_and_non_zero(env: dict[str, str], args: list[str], code: int, words: str) -> None:
    """A refused request names what is wrong and exits non-zero; nothing is stored."""
    result = run(env, *args)
    assert result.exit_code == code and words in result.output
    assert stored_secret(env, "pk2") is None


def test_device_show_says_whether_a_device_is_activated(env: dict[str, str]) -> None:
    """A newly added device shows activatedAt null (secure mode 3 may still activate it); once activated, its time."""
    assert CliRunner().invoke(app, ["device", "add", "pk1", "dk1"], env=env).exit_code == 0
    shown = CliRunner().invoke(app, ["device", "show", "pk1", "dk1", "--json"], env=env)
    assert json.loads(shown.stdout)["activatedAt"] is None

    async def activate() -> None:
        conn = await asyncpg.connect(env["POINTGATE_DATABASE_URL"])
        try:
            await mark_activated(conn, "pk1", "dk1")
        finally:
            await conn.close()

    asyncio.run(activate())
    shown = CliRunner().invoke(app, ["device", "show", "pk1", "dk1", "--json"], env=env)
    assert json.loads(shown.stdout)["activatedAt"] is not None
