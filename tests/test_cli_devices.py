"""``pointgate device …`` driven through typer against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import asyncpg
import pytest
from typer.testing import CliRunner, Result

from service.cli.devices import app
from service.cli.main import app as main_app
from service.devices.registry import get_credentials
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
    return CliRunner().invoke(app, list(args), env=env)


def credentials(env: dict[str, str], pk: str, dk: str) -> tuple[str, bool] | None:
    """What the authenticator would read for pk/dk, using the key file the CLI created."""
    box = SecretBox(load_or_create_key(Path(env["POINTGATE_SECRET_KEY_FILE"])))

    async def read() -> tuple[str, bool] | None:
        conn = await asyncpg.connect(env["POINTGATE_DATABASE_URL"])
        try:
            return await get_credentials(conn, box, pk, dk)
        finally:
            await conn.close()

    return asyncio.run(read())


def test_add_prints_the_secret_and_creates_a_private_key_file(env: dict[str, str]) -> None:
    """add prints only the secret on stdout, stores it sealed, and creates the key file with mode 0600."""
    result = run(env, "add", "pk1", "dk1")
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip()
    assert len(secret) == 32 and "\n" not in secret
    assert "registered pk1/dk1" in result.stderr
    key_file = Path(env["POINTGATE_SECRET_KEY_FILE"])
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert credentials(env, "pk1", "dk1") == (secret, True)


def test_add_json_with_given_secret_and_gateway(env: dict[str, str]) -> None:
    """add --json prints productKey/deviceKey/secret; --secret and --gateway are stored."""
    assert run(env, "add", "pk1", "gw").exit_code == 0
    result = run(env, "add", "pk1", "sub", "--secret", "chosen-secret", "--gateway", "pk1/gw", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"productKey": "pk1", "deviceKey": "sub", "secret": "chosen-secret"}
    listed = json.loads(run(env, "list", "--json").stdout)
    assert [(d["deviceKey"], d["gateway"]) for d in listed] == [
        ("gw", None),
        ("sub", {"productKey": "pk1", "deviceKey": "gw"}),
    ]


def test_list_shows_devices_but_never_secrets(env: dict[str, str]) -> None:
    """list (table and JSON) shows every device and its state, and no secret."""
    secret_a = run(env, "add", "pkA", "dk1").stdout.strip()
    secret_b = run(env, "add", "pkB", "dk2").stdout.strip()

    table = run(env, "list")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        *("PRODUCT", "KEY", "DEVICE", "KEY", "ENABLED", "STATE", "LAST", "SEEN", "PEER", "CLIENT", "ID"),
        *("GATEWAY", "CREATED"),
    ]
    assert [line.split()[:8] for line in lines[1:]] == [
        ["pkA", "dk1", "yes", "offline", "never", "-", "-", "-"],
        ["pkB", "dk2", "yes", "offline", "never", "-", "-", "-"],
    ]

    as_json = run(env, "list", "--json", "--product", "pkB")
    assert [(d["productKey"], d["deviceKey"], d["enabled"]) for d in json.loads(as_json.stdout)] == [
        ("pkB", "dk2", True)
    ]
    for output in (table.output, as_json.output, run(env, "list", "--json").output):
        assert secret_a not in output and secret_b not in output
        assert "secret" not in output.lower()


def test_disable_and_enable(env: dict[str, str]) -> None:
    """disable and enable switch the device's login flag and say so."""
    run(env, "add", "pk1", "dk1")
    result = run(env, "disable", "pk1", "dk1")
    assert result.exit_code == 0, result.output
    assert "disabled pk1/dk1" in result.stdout
    assert json.loads(run(env, "list", "--json").stdout)[0]["enabled"] is False
    assert credentials(env, "pk1", "dk1") is not None
    assert run(env, "enable", "pk1", "dk1").exit_code == 0
    assert json.loads(run(env, "list", "--json").stdout)[0]["enabled"] is True


def test_rotate_prints_a_new_secret_that_replaces_the_old(env: dict[str, str]) -> None:
    """rotate prints a new secret, stored in place of the old one; --json and --secret work."""
    old = run(env, "add", "pk1", "dk1").stdout.strip()
    result = run(env, "rotate", "pk1", "dk1")
    assert result.exit_code == 0, result.output
    new = result.stdout.strip()
    assert new != old
    assert credentials(env, "pk1", "dk1") == (new, True)
    chosen = run(env, "rotate", "pk1", "dk1", "--secret", "s2", "--json")
    assert json.loads(chosen.stdout) == {"productKey": "pk1", "deviceKey": "dk1", "secret": "s2"}
    assert credentials(env, "pk1", "dk1") == ("s2", True)


def test_add_twice_fails_cleanly(env: dict[str, str]) -> None:
    """Adding a registered device exits 1 with a one-line message and no traceback."""
    assert run(env, "add", "pk1", "dk1").exit_code == 0
    result = run(env, "add", "pk1", "dk1")
    assert result.exit_code == 1
    assert result.stderr.strip() == "pointgate: error: device pk1/dk1 is already registered"
    assert result.stdout == ""
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["disable", "pk1", "nope"], "pointgate: error: device pk1/nope is not registered"),
        (["enable", "pk1", "nope"], "pointgate: error: device pk1/nope is not registered"),
        (["rotate", "pk1", "nope"], "pointgate: error: device pk1/nope is not registered"),
        (["add", "pk1", "d/k"], "pointgate: error: invalid device key 'd/k': must not contain '/'"),
        (["add", "pk1", "sub", "--gateway", "pk1/ghost"], "pointgate: error: gateway pk1/ghost is not registered"),
    ],
)
def test_registry_errors_are_one_line_messages(env: dict[str, str], args: list[str], message: str) -> None:
    """Missing devices, invalid keys and unknown gateways exit 1 with a clear message, no traceback."""
    result = run(env, *args)
    assert result.exit_code == 1
    assert result.stderr.strip() == message
    assert "Traceback" not in result.output


def test_bad_gateway_syntax_is_a_usage_error(env: dict[str, str]) -> None:
    """--gateway without PK/DK form is rejected by option parsing (exit 2)."""
    result = run(env, "add", "pk1", "sub", "--gateway", "no-slash")
    assert result.exit_code == 2
    assert "PRODUCT_KEY/DEVICE_KEY" in result.output


def test_key_file_readable_by_others_is_a_config_error(env: dict[str, str]) -> None:
    """A key file with group/other permissions stops add with exit 2 and the fix in the message."""
    assert run(env, "add", "pk1", "dk1").exit_code == 0
    Path(env["POINTGATE_SECRET_KEY_FILE"]).chmod(0o644)
    result = run(env, "add", "pk1", "dk2")
    assert result.exit_code == 2
    assert "chmod 600" in result.stderr
    assert "Traceback" not in result.output


def test_unreachable_database_is_a_clear_error(env: dict[str, str]) -> None:
    """A database that refuses connections gives exit 1 and a message, not a traceback."""
    env = {**env, "POINTGATE_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    result = run(env, "list")
    assert result.exit_code == 1
    assert result.stderr.startswith("pointgate: error: ")
    assert "Traceback" not in result.output


def test_main_cli_flags_reach_the_device_commands(env: dict[str, str]) -> None:
    """`pointgate --database-url … device …` uses the flag, not the environment."""
    dsn = env["POINTGATE_DATABASE_URL"]
    broken = {**env, "POINTGATE_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    added = CliRunner().invoke(main_app, ["--database-url", dsn, "device", "add", "pk1", "dk1", "--json"], env=broken)
    assert added.exit_code == 0, added.output
    assert json.loads(added.stdout)["deviceKey"] == "dk1"
    listed = CliRunner().invoke(main_app, ["--database-url", dsn, "device", "list", "--json"], env=broken)
    assert [d["deviceKey"] for d in json.loads(listed.stdout)] == ["dk1"]


def test_topo_add_get_delete(env: dict[str, str]) -> None:
    """topo add attaches sub-devices, get lists them (text and JSON), delete detaches them."""
    for dk in ("gw", "s1", "s2"):
        assert run(env, "add", "pk", dk).exit_code == 0
    added = run(env, "topo", "add", "pk/gw", "pk/s1", "pk/s2")
    assert added.exit_code == 0, added.output
    listed = run(env, "topo", "get", "pk/gw")
    assert listed.stdout.splitlines() == ["pk/s1", "pk/s2"]
    as_json = json.loads(run(env, "topo", "get", "pk/gw", "--json").stdout)
    assert as_json == [{"productKey": "pk", "deviceKey": "s1"}, {"productKey": "pk", "deviceKey": "s2"}]
    assert run(env, "topo", "delete", "pk/gw", "pk/s1").exit_code == 0
    assert run(env, "topo", "get", "pk/gw").stdout.splitlines() == ["pk/s2"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["topo", "add", "pk/gw", "pk/s1", "pk/theirs"], "pk/theirs is a sub-device of another gateway, pk/gw2"),
        (["topo", "add", "pk/gw", "pk/gw"], "pk/gw is the gateway itself"),
        (["topo", "add", "pk/gw", "pk/ghost"], "device pk/ghost is not registered"),
        (["topo", "add", "pk/s1", "pk/gw"], "pk/gw is a gateway (it has sub-devices)"),
        (["topo", "delete", "pk/gw", "pk/s1"], "pk/s1 is not a sub-device of pk/gw"),
        (["topo", "get", "pk/nope"], "gateway pk/nope is not registered"),
    ],
)
def test_topo_refusals_are_one_line_and_change_nothing(env: dict[str, str], args: list[str], message: str) -> None:
    """A topology change that cannot be made fails with one line, exit 1, and leaves every relation as it was."""
    for dk in ("gw", "gw2", "s1"):
        assert run(env, "add", "pk", dk).exit_code == 0
    assert run(env, "add", "pk", "theirs", "--gateway", "pk/gw2").exit_code == 0
    assert run(env, "add", "pk", "mine", "--gateway", "pk/gw").exit_code == 0
    result = run(env, *args)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"pointgate: error: {message}"
    assert run(env, "topo", "get", "pk/gw").stdout.splitlines() == ["pk/mine"]
    assert run(env, "topo", "get", "pk/gw2").stdout.splitlines() == ["pk/theirs"]
