"""Devices as an operator sees them (issue 13, findings 7-8 and "who is connected"): refused logins logged,
disable/rotate/delete reaching live connections, and `device list/show/credentials` against a real service."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from service.cli.main import app
from service.devices.secretbox import key_path
from tests.integration._login import PK, connect, login, register, sign
from tests.support import SAMPLE, Device, RunningService, resume_topic


@pytest.fixture
def service(start_service: Callable[..., RunningService]) -> RunningService:
    """A service that admits only registered devices, listening for registry changes."""
    running = start_service(allow_anonymous=False)
    presence = running.service.presence
    assert presence is not None
    running.call(asyncio.wait_for(presence.listening.wait(), 10))
    return running


def cli(running: RunningService, *args: str) -> Result:
    """`pointgate device …` from another "process" (its own connection), on the service's database and key."""
    env = {
        "POINTGATE_DATABASE_URL": running.service.dsn,
        "POINTGATE_SECRET_KEY_FILE": str(key_path(running.settings)),
        "POINTGATE_DATA_DIR": str(running.settings.data_dir),
    }
    return CliRunner().invoke(app, ["device", *args], env=env)


def refusals(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == "login refused"]


def test_each_refused_login_is_one_line_without_the_password(
    service: RunningService, caplog: pytest.LogCaptureFixture
) -> None:
    """Wrong secret, unknown device, disabled device, anonymous: one line each with who, from where and why."""
    caplog.set_level(logging.INFO)
    register(service, "good", "s3cret")
    register(service, "off", "s3cret")
    assert cli(service, "disable", PK, "off").exit_code == 0
    attempts = {
        "bad_signature": login("good", "wrong-secret"),
        "unknown_device": login("ghost", "s3cret"),
        "disabled": login("off", "s3cret"),
    }
    for creds in attempts.values():
        device, code = connect(service.port, creds)
        device.close()
        assert code != 0
    anonymous = Device(service.port, "anon-1")
    assert anonymous.connect() != 0
    anonymous.close()
    lines = refusals(caplog)
    assert [line["reason"] for line in lines] == [*attempts, "anonymous_refused"]
    for line, (reason, creds) in zip(lines, attempts.items(), strict=False):
        assert line["product"] == PK and line["device"] == creds.username.split("&")[0], line
        assert line["client_id"] == creds.client_id and line["peer"].startswith("127.0.0.1:"), line
        assert line["reason"] == reason
    assert lines[3]["client_id"] == "anon-1"
    text = caplog.text
    for creds in attempts.values():
        assert creds.password not in text


def wait_closed(device: Device, timeout: float = 10) -> float:
    started = time.monotonic()
    assert device.disconnected.wait(timeout), "the connection stayed open"
    return time.monotonic() - started


@pytest.mark.parametrize("command", ["disable", "rotate", "delete"])
def test_disable_rotate_delete_close_the_live_connection(service: RunningService, command: str) -> None:
    """The CLI's change reaches the running serve (LISTEN/NOTIFY): the device is disconnected within seconds and
    cannot come back with its old credentials."""
    register(service, "dev5", "old-secret")
    device, code = connect(service.port, login("dev5", "old-secret"))
    assert code == 0
    try:
        assert device.request(resume_topic(dk="dev5"), SAMPLE)["code"] == 200
        result = cli(service, command, PK, "dev5")
        assert result.exit_code == 0, result.output
        assert wait_closed(device) < 10
    finally:
        device.close()
    again, code = connect(service.port, login("dev5", "old-secret"))
    again.close()
    assert code != 0
    if command == "rotate":
        fresh, code = connect(service.port, login("dev5", result.stdout.strip()))
        fresh.close()
        assert code == 0


def test_enable_does_not_close_connections(service: RunningService) -> None:
    """Only changes that take a login away close connections."""
    register(service, "dev6", "s")
    device, code = connect(service.port, login("dev6", "s"))
    try:
        assert code == 0
        assert cli(service, "enable", PK, "dev6").exit_code == 0
        assert device.request(resume_topic(dk="dev6"), SAMPLE)["code"] == 200
        assert not device.disconnected.is_set()
    finally:
        device.close()


def listed(running: RunningService, dk: str) -> dict[str, Any]:
    result = cli(running, "show", PK, dk, "--json")
    assert result.exit_code == 0, result.output
    shown: dict[str, Any] = json.loads(result.stdout)
    return shown


def wait_for(running: RunningService, dk: str, online: bool, timeout: float = 10) -> dict[str, Any]:
    """The device as `device show` reports it, once its recorded state is ``online`` (written asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        shown = listed(running, dk)
        if shown["online"] is online or time.monotonic() > deadline:
            return shown
        time.sleep(0.1)


def test_list_and_show_say_who_is_connected(service: RunningService) -> None:
    """device list/show: online with peer address and the client id the device sent; offline with last seen."""
    register(service, "dev7", "s")
    register(service, "dev8", "s")
    creds = login("dev7", "s")
    device, code = connect(service.port, creds)
    assert code == 0
    try:
        shown = wait_for(service, "dev7", True)
        assert shown["online"] is True and shown["clientId"] == creds.client_id
        assert shown["peer"].startswith("127.0.0.1:") and shown["lastSeen"]
        table = cli(service, "list").stdout.splitlines()
        row7 = next(line.split() for line in table if " dev7 " in line)
        assert row7[3] == "online" and row7[5].startswith("127.0.0.1:") and row7[6] == creds.client_id
        row8 = next(line.split() for line in table if " dev8 " in line)
        assert row8[3:5] == ["offline", "never"]
    finally:
        device.close()
    gone = wait_for(service, "dev7", False)
    assert gone["online"] is False and gone["lastSeen"]


def test_credentials_print_a_login_any_mqtt_client_can_use(service: RunningService) -> None:
    """`device credentials` gives client id, username and password that sign in with a plain MQTT client."""
    register(service, "dev9", "s9")
    result = cli(service, "credentials", PK, "dev9", "--json")
    assert result.exit_code == 0, result.output
    creds = json.loads(result.stdout)
    assert creds["username"] == f"dev9&{PK}"
    timestamp = creds["clientId"].split("timestamp=")[1].rstrip("|")
    assert creds["password"] == sign("sha256", "dev9", "dev9", PK, timestamp, "s9")
    client = Device(service.port, creds["clientId"], username=creds["username"], password=creds["password"])
    try:
        assert client.connect() == 0
    finally:
        client.close()
    text = cli(service, "credentials", PK, "dev9")
    assert [line.split(":", 1)[0] for line in text.stdout.splitlines()] == ["client id", "username", "password"]
    missing = cli(service, "credentials", PK, "nobody")
    assert missing.exit_code == 1 and missing.stderr.startswith("pointgate: error: device")


def test_delete_removes_the_device_but_not_a_gateway_in_use(service: RunningService) -> None:
    """delete removes a device; a gateway with sub-devices is refused with the reason."""
    register(service, "gw1", "s")
    assert cli(service, "add", PK, "sub1", "--gateway", f"{PK}/gw1").exit_code == 0
    refused = cli(service, "delete", PK, "gw1")
    assert refused.exit_code == 1 and "gateway of registered sub-devices" in refused.stderr
    assert cli(service, "delete", PK, "sub1").exit_code == 0
    assert cli(service, "show", PK, "sub1").exit_code == 1
    assert cli(service, "delete", PK, "sub1").exit_code == 1


def test_the_acl_warning_carries_product_and_device_as_fields(
    service: RunningService, caplog: pytest.LogCaptureFixture
) -> None:
    """Publishing outside its own topics: the warning line has product and device as fields, and the topic."""
    caplog.set_level(logging.INFO)
    register(service, "acl1", "s")
    device, code = connect(service.port, login("acl1", "s"))
    try:
        assert code == 0
        device.publish(resume_topic(dk="someone-else"), SAMPLE)
        assert device.disconnected.wait(10)
    finally:
        device.close()
    [line] = [
        r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == "protocol violation, closing"
    ]
    assert (line["product"], line["device"]) == (PK, "acl1")
    assert resume_topic(dk="someone-else") in line["reason"]
