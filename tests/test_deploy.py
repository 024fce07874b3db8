"""deploy/docker-compose.yml (EMQX cluster + consumers + PostgreSQL), checked statically like docker-compose.yml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from service.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"


def _check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    # the compose-spec schema ships inside check-jsonschema: this runs offline
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def test_cluster_compose_file_matches_the_compose_specification() -> None:
    result = _check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cluster_compose_validation_catches_a_misspelt_key(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("depends_on:", "depend_on:", 1))
    assert _check_compose(broken).returncode != 0


def test_two_emqx_nodes_form_one_cluster() -> None:
    """Each node's name is among the static seeds, and both nodes share every other setting."""
    services = _services()
    nodes = [services[name] for name in ("emqx1", "emqx2")]
    seeds = nodes[0]["environment"]["EMQX_CLUSTER__STATIC__SEEDS"]
    for node in nodes:
        assert node["environment"]["EMQX_NODE__NAME"] in seeds
        assert node["environment"]["EMQX_NODE__NAME"].endswith(node["hostname"])
        assert node["image"].startswith("emqx/emqx:5.")
    assert {k: v for k, v in nodes[0]["environment"].items() if k != "EMQX_NODE__NAME"} == {
        k: v for k, v in nodes[1]["environment"].items() if k != "EMQX_NODE__NAME"
    }


def test_emqx_logs_devices_in_through_the_consumers_with_the_shared_secret() -> None:
    """EMQX's HTTP authenticator posts to the consumers' auth endpoint with the secret the consumers check."""
    services = _services()
    emqx, consumer = services["emqx1"]["environment"], services["consumer"]["environment"]
    authn = emqx["EMQX_AUTHENTICATION"]
    assert 'url = "http://consumer:9100/auth/emqx/authn"' in authn
    assert consumer["POINTGATE_HTTP_BIND"].endswith(":9100")
    # compose escapes EMQX's placeholders as $${…}; the secret is interpolated from .env on both sides
    assert 'clientid = "$${clientid}"' in authn and 'password = "$${password}"' in authn
    assert "Bearer ${POINTGATE_AUTH_SECRET" in authn and consumer["POINTGATE_AUTH_SECRET"].startswith(
        "${POINTGATE_AUTH_SECRET"
    )
    assert emqx["EMQX_AUTHORIZATION__NO_MATCH"] == "deny"


def test_consumers_are_configured_for_ack_after_commit() -> None:
    """Every POINTGATE_* the consumers get is a real setting; clean sessions; EMQX's window fits theirs."""
    services = _services()
    consumer = services["consumer"]
    assert consumer["command"] == ["consume"]
    fields = {f"POINTGATE_{name.upper()}" for name in Settings.model_fields}
    assert set(consumer["environment"]) <= fields
    assert consumer["environment"]["POINTGATE_BROKER_SESSION_EXPIRY"] == "0"
    window = int(consumer["environment"]["POINTGATE_CONSUME_MAX_IN_FLIGHT"])
    assert int(services["emqx1"]["environment"]["EMQX_MQTT__MAX_INFLIGHT"]) >= window
    assert consumer["deploy"]["replicas"] >= 2
    assert consumer["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["migrate"]


def test_env_example_names_every_variable_the_file_requires() -> None:
    """Each ${VAR:?…} the compose file needs is in env.example, so `cp env.example .env` starts it."""
    text = COMPOSE.read_text()
    required = {part.split(":?")[0] for part in text.split("${")[1:] if ":?" in part.split("}")[0]}
    example = {line.split("=")[0] for line in (DEPLOY / "env.example").read_text().splitlines() if "=" in line}
    assert required and required <= example
