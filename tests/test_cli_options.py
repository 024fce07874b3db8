"""The command line's shared behaviour (issue 13, findings 3-5 and 10): one error format, the database options
in every position, no silent switch to another embedded database, every setting a `serve` flag, misspelt
variables warned about, and the smaller refusals."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from service.cli.main import app
from service.errors import ConfigError
from service.settings import Settings, load_settings
from service.storage.database import announce_serve, check_embedded_choice, retract_serve

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_every_failing_command_uses_one_error_format(tmp_path: Path) -> None:
    """migrate, device, model check and config show fail with `pointgate: error:` lines and no traceback."""
    bad_model = tmp_path / "bad.json"
    bad_model.write_text("{not json")
    down = "postgresql://postgres@127.0.0.1:9/none"
    cases = [
        (["migrate", "--database-url", down], {}, 1),
        (["device", "list", "--database-url", down], {}, 1),
        (["model", "check", str(bad_model)], {}, 2),
        (["config", "show"], {"POINTGATE_WORKERS": "zero"}, 2),
    ]
    for args, env, code in cases:
        result = runner.invoke(app, args, env=env)
        assert result.exit_code == code, (args, result.output)
        lines = result.stderr.splitlines()
        assert lines and all(line.startswith("pointgate: error: ") for line in lines), (args, lines)
        assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["--database-url", "{dsn}", "--data-dir", "{dir}", "device", "add", "pk1", "dk1"],
        ["device", "--database-url", "{dsn}", "--data-dir", "{dir}", "add", "pk1", "dk1"],
        ["device", "add", "--database-url", "{dsn}", "--data-dir", "{dir}", "pk1", "dk1"],
        ["device", "add", "pk1", "dk1", "--database-url", "{dsn}", "--data-dir", "{dir}"],
    ],
    ids=["before the command", "between group and command", "after the command", "at the end"],
)
def test_database_options_work_in_every_position(args: list[str], migrated_dsn: str, tmp_path: Path) -> None:
    """--database-url and --data-dir reach `device add` wherever they are given (the key file lands in --data-dir)."""
    data = tmp_path / "data"
    argv = [a.format(dsn=migrated_dsn, dir=data) for a in args]
    result = runner.invoke(app, argv, env={"POINTGATE_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none"})
    assert result.exit_code == 0, result.output
    assert (data / "secret.key").is_file()
    listed = runner.invoke(app, ["device", "list", "--json", "--database-url", migrated_dsn, "--data-dir", str(data)])
    assert [d["deviceKey"] for d in json.loads(listed.stdout)] == ["dk1"]


def test_migrate_accepts_the_options_after_the_command(migrated_dsn: str) -> None:
    """`migrate --database-url` as well as `--database-url migrate`."""
    assert runner.invoke(app, ["--database-url", migrated_dsn, "migrate"]).exit_code == 0
    assert runner.invoke(app, ["migrate", "--database-url", migrated_dsn]).exit_code == 0


def test_a_plain_device_command_refuses_another_embedded_database_than_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a serve running on --data-dir X, a device command on the default data dir stops and names both."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "home"))
    (tmp_path / "run").mkdir()
    served = tmp_path / "served"
    record = announce_serve(Settings(data_dir=served))
    try:
        result = runner.invoke(app, ["device", "list"])
        assert result.exit_code == 2
        default = Settings().data_dir  # root's default ignores XDG_DATA_HOME
        assert f"--data-dir {served}" in result.stderr and f"would use {default.resolve()}" in result.stderr
        # a data directory chosen on purpose is followed
        check_embedded_choice(load_settings({"data_dir": tmp_path / "elsewhere"}))
        check_embedded_choice(load_settings({"data_dir": served}))
        with pytest.raises(ConfigError):
            check_embedded_choice(load_settings())
    finally:
        retract_serve(record)
    check_embedded_choice(load_settings())  # no serve running: nothing to confuse


def _serve_flags() -> set[str]:
    command = typer.main.get_command(app)
    serve = command.commands["serve"]  # type: ignore[attr-defined]
    return {opt for param in serve.params for opt in param.opts}


def test_every_setting_is_a_serve_flag_and_a_readme_row() -> None:
    """The README says every setting of its Settings table is a flag of `serve`: each one is; and every setting
    there is is documented in one of the README's settings tables."""
    flags = _serve_flags()
    readme = (ROOT / "README.md").read_text()

    def first_cells(text: str) -> set[str]:
        cells = [line.split("|")[1] for line in text.splitlines() if line.startswith("| `")]
        return {name for cell in cells for name in re.findall(r"`([a-z0-9_]+)`", cell)}

    table = first_cells(readme[readme.index("### Settings") : readme.index("### Migrations")])
    for name in table:
        assert f"--{name.replace('_', '-')}" in flags, name
    documented = first_cells(readme)
    for name in Settings.model_fields:
        assert name in documented, name


def test_a_misspelt_pointgate_variable_is_warned_about(migrated_dsn: str) -> None:
    """POINTGATE_MQT_BIND is not silently ignored: a warning names it and the setting it probably means."""
    result = runner.invoke(app, ["config", "show"], env={"POINTGATE_MQT_BIND": "127.0.0.1:1"})
    assert result.exit_code == 0
    assert "unknown environment variable POINTGATE_MQT_BIND" in result.stderr
    assert "did you mean POINTGATE_MQTT_BIND?" in result.stderr
    clean = runner.invoke(app, ["config", "show"], env={"POINTGATE_MQTT_BIND": "127.0.0.1:1"})
    assert "unknown environment variable" not in clean.stderr


def test_device_add_for_a_product_without_a_model_warns(migrated_dsn: str, tmp_path: Path) -> None:
    """A device of a product with no thing model is registered, with a warning that its data will be refused."""
    base = ["device", "add", "--database-url", migrated_dsn, "--data-dir", str(tmp_path)]
    result = runner.invoke(app, [*base, "nomodel01", "dk1"])
    assert result.exit_code == 0, result.output
    assert "pointgate: warning: no thing model for product 'nomodel01'" in result.stderr
    known = runner.invoke(app, [*base, "inverter01", "dk1"])
    assert known.exit_code == 0 and "warning" not in known.stderr


def test_serve_names_every_bad_model_like_model_check(tmp_path: Path) -> None:
    """serve and model check both list every malformed file, with the same exit code (2)."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "a.json").write_text("{not json")
    (models / "b.json").write_text(json.dumps({"productKey": "b", "measurepoints": {"x": {"dataType": "COMPLEX"}}}))
    served = runner.invoke(app, ["serve", "--models", str(models), "--data-dir", str(tmp_path / "d")])
    checked = runner.invoke(app, ["model", "check", str(models)])
    assert served.exit_code == checked.exit_code == 2
    for result in (served, checked):
        assert "a.json" in result.stderr and "b.json" in result.stderr, result.stderr


def test_sdk_example_says_cannot_connect_when_nothing_listens() -> None:
    """examples/sdk_resume.py against a closed port blames the connection, not the secret."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "sdk_resume.py"), f"tcp://127.0.0.1:{port}", "pk", "dk", "s"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ},
    )
    assert result.returncode == 1
    assert f"cannot connect to 127.0.0.1:{port}" in result.stderr
    assert "secret" not in result.stderr


def test_model_check_names_every_bad_point_and_every_accepted_key(tmp_path: Path) -> None:
    """Two bad points in one file are both reported; the allowed-keys list includes desc and unit."""
    model = tmp_path / "m.json"
    points = {"a": {"dataType": "COMPLEX"}, "b": {"dataType": "INT", "colour": "red"}, "c": {"dataType": "INT"}}
    model.write_text(json.dumps({"productKey": "m", "measurepoints": points}))
    result = runner.invoke(app, ["model", "check", str(model)])
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and '"a"' in lines[0] and '"b"' in lines[1], lines
    assert "desc" in lines[1] and "unit" in lines[1]


def test_the_printed_psql_is_the_one_beside_the_embedded_server() -> None:
    """serve's psql hint names a psql that exists when the embedded server's binaries ship one."""
    from service.storage.embedded import _candidates, psql_command

    command = psql_command()
    if any((bindir / "psql").is_file() for bindir in _candidates()):
        assert command.endswith("/psql") and Path(command.strip("'")).is_file()
    else:
        assert command == "psql"


def test_anonymous_on_a_public_listener_is_warned_about() -> None:
    """--allow-anonymous on a non-loopback --mqtt-bind is warned about; on loopback it is not."""
    from service.app import anonymous_warning

    assert anonymous_warning(load_settings({"allow_anonymous": True, "mqtt_bind": "0.0.0.0:1883"}))
    assert anonymous_warning(load_settings({"allow_anonymous": True, "mqtt_bind": "127.0.0.1:1883"})) is None
    assert anonymous_warning(load_settings({"allow_anonymous": False, "mqtt_bind": "0.0.0.0:1883"})) is None
