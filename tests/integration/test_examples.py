"""The runnable examples in examples/, run as a user would (a separate Python process) against a real pointgate."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from service.devices.registry import add_device
from tests.integration._login import PK, _registry, register
from tests.support import RunningService, fetch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_sdk_gateway_example(start_service: Callable[..., RunningService], migrated_dsn: str) -> None:
    """examples/sdk_gateway.py adds its sub-devices to its topology, logs them in, and their resumes land (200s)."""
    running = start_service(allow_anonymous=False)
    register(running, "gw1", "gw-secret")
    register(running, "meter1", "m1-secret")
    # meter2 already in the topology (as `pointgate device topo add` or `device add --gateway` would leave it)
    _registry(running, lambda conn, box: add_device(conn, box, PK, "meter2", secret="m2-secret", gateway=(PK, "gw1")))
    url = f"tcp://127.0.0.1:{running.port}"
    result = run_example("sdk_gateway.py", url, PK, "gw1", "gw-secret", "meter1=m1-secret", "meter2=m2-secret")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "topo get: 200",
        "topo add meter1: 200",
        "login meter1 meter2: 200",
        "resume meter1: 200",
        "resume meter2: 200",
        "logout meter1: 200",
        "logout meter2: 200",
    ]
    rows = fetch(migrated_dsn, "SELECT device_key, value_num FROM measurepoints ORDER BY device_key")
    assert [(r[0], r[1]) for r in rows] == [("meter1", 20.0), ("meter2", 21.0)]
    gateways = fetch(migrated_dsn, "SELECT device_key FROM devices WHERE gateway_device_key = 'gw1' ORDER BY 1")
    assert [r[0] for r in gateways] == ["meter1", "meter2"]


def test_sdk_gateway_example_reports_a_refused_login(start_service: Callable[..., RunningService]) -> None:
    """With a wrong gateway secret the example says why it is not connected and exits 1."""
    running = start_service(allow_anonymous=False)
    register(running, "gw1", "gw-secret")
    result = run_example("sdk_gateway.py", f"tcp://127.0.0.1:{running.port}", PK, "gw1", "wrong", "m=x")
    assert result.returncode == 1
    assert "not connected" in result.stderr


def test_sdk_resume_example(start_service: Callable[..., RunningService], migrated_dsn: str) -> None:
    """examples/sdk_resume.py backfills the sample's points and prints 200."""
    running = start_service(allow_anonymous=False)
    register(running, "dev1", "dev-secret")
    result = run_example("sdk_resume.py", f"tcp://127.0.0.1:{running.port}", PK, "dev1", "dev-secret")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split()[0] == "200"
    assert len(fetch(migrated_dsn, "SELECT 1 FROM measurepoints WHERE device_key = 'dev1'")) == 3
