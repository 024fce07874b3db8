"""The `pointgate` command line as an operator uses it: settings, config show, model check, migrate, serve refusals."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli.main import app
from service.errors import ConfigError
from service.settings import load_settings
from tests.support import fetch

runner = CliRunner()


def test_config_show_redacts_the_database_password() -> None:
    """`config show` prints the effective settings as JSON with the database password hidden."""
    result = runner.invoke(app, ["config", "show"], env={"POINTGATE_DATABASE_URL": "postgresql://u:hunter2@db:5432/x"})
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["database_url"] == "postgresql://u:***@db:5432/x"
    assert "hunter2" not in result.stdout
    assert shown["mqtt_bind"] == "0.0.0.0:1883"


def test_flags_beat_environment_which_beats_the_toml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Precedence is flag > POINTGATE_* environment > TOML file > default."""
    config = tmp_path / "pointgate.toml"
    config.write_text('mqtt_bind = "127.0.0.1:1111"\nhttp_bind = "127.0.0.1:2222"\nworkers = 3\n')
    monkeypatch.setenv("POINTGATE_HTTP_BIND", "127.0.0.1:3333")
    settings = load_settings({"workers": 5}, config_file=config)
    assert (settings.mqtt_bind, settings.http_bind, settings.workers) == ("127.0.0.1:1111", "127.0.0.1:3333", 5)


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"POINTGATE_MQTT_BIND": "nonsense"}, "mqtt_bind"),
        ({"POINTGATE_WORKERS": "zero"}, "workers"),
        ({"POINTGATE_LOG_LEVEL": "LOUD"}, "log_level"),
    ],
)
def test_a_wrong_setting_fails_naming_the_key(env: dict[str, str], key: str) -> None:
    """A wrong value stops the command with exit 2 and a message naming the key, not a traceback."""
    result = runner.invoke(app, ["config", "show"], env=env)
    assert result.exit_code == 2
    assert key in result.output and "Traceback" not in result.output


def test_load_settings_raises_config_error_with_key() -> None:
    """`load_settings` turns validation errors into one ConfigError listing each bad key."""
    with pytest.raises(ConfigError, match="http_bind"):
        load_settings({"http_bind": "localhost"})


def test_model_check_reports_file_and_reason(tmp_path: Path) -> None:
    """`model check` exits 2 (as `serve` does on the same file) naming a malformed model file and why."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"productKey": "p", "measurepoints": {"x": {"dataType": "COMPLEX"}}}))
    result = runner.invoke(app, ["model", "check", str(bad)])
    assert result.exit_code == 2
    assert str(bad) in result.output and "COMPLEX" in result.output
    assert runner.invoke(app, ["model", "check"]).exit_code == 0


def test_serve_refuses_to_start_on_a_malformed_model(tmp_path: Path) -> None:
    """`serve` with a broken thing model exits non-zero before opening any port, naming the file."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "broken.json").write_text("{not json")
    result = runner.invoke(app, ["serve", "--models", str(models), "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 2
    assert "broken.json" in result.output


def test_migrate_applies_once_and_reports(pg_dsn: str) -> None:
    """`migrate` says what it applied; a second run applies nothing and still succeeds."""
    first = runner.invoke(app, ["migrate", "--database-url", pg_dsn])
    assert first.exit_code == 0, first.output
    assert "applied 0001 points" in first.stdout
    second = runner.invoke(app, ["migrate", "--database-url", pg_dsn])
    assert second.exit_code == 0 and "0 migration(s) applied" in second.stdout
    assert fetch(pg_dsn, "SELECT count(*) AS n FROM measurepoints")[0]["n"] == 0


def test_migrate_against_unreachable_database_fails_cleanly() -> None:
    """An unreachable database gives a one-line error and a non-zero exit, not a traceback."""
    result = runner.invoke(app, ["migrate", "--database-url", "postgresql://postgres@127.0.0.1:9/none"])
    assert result.exit_code != 0
    assert "Traceback" not in result.output


def test_serve_refuses_zero_workers(tmp_path: Path) -> None:
    """`--workers 0` is refused with one line naming the setting."""
    result = runner.invoke(app, ["serve", "--workers", "0", "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 2
    assert "workers" in result.output and "Traceback" not in result.output


def test_serve_with_workers_refuses_a_port_in_use(tmp_path: Path) -> None:
    """`--workers 2` on a port another program listens on stops at once, naming the address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        bind = f"127.0.0.1:{taken.getsockname()[1]}"
        result = runner.invoke(app, ["serve", "--workers", "2", "--mqtt-bind", bind, "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 2
    assert f"--mqtt-bind {bind}: cannot listen: address already in use" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_serve_single_process_refuses_a_port_in_use() -> None:
    """`--workers 1` on a busy MQTT port: one line naming the options and the address, exit 2, no traceback."""
    import shutil
    import tempfile

    data = Path(tempfile.mkdtemp(prefix="pointgate-cli-"))
    data.chmod(0o755)  # reachable by the unprivileged PostgreSQL user when running as root
    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            args = ["serve", "--workers", "1", "--mqtt-bind", f"127.0.0.1:{port}", "--http-bind", "127.0.0.1:0"]
            result = runner.invoke(app, [*args, "--allow-anonymous", "--data-dir", str(data / "d")])
        assert result.exit_code == 2, result.output
        assert f"--mqtt-bind 127.0.0.1:{port}: cannot listen: address already in use" in result.output
        assert "Traceback" not in result.output
    finally:
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow
def test_device_add_on_embedded_database_prints_only_the_secret(tmp_path: Path) -> None:
    """On the embedded database `device add` prints only the secret on stdout; its logs go to stderr."""
    import shutil
    import tempfile

    data = Path(tempfile.mkdtemp(prefix="pointgate-cli-"))
    data.chmod(0o755)  # reachable by the unprivileged PostgreSQL user when running as root
    try:
        result = runner.invoke(app, ["--data-dir", str(data / "d"), "device", "add", "inverter01", "dev9"])
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        assert len(lines) == 1 and len(lines[0]) >= 24 and " " not in lines[0]
    finally:
        shutil.rmtree(data, ignore_errors=True)
