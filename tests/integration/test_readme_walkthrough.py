"""The README, followed top to bottom as a new user would (issue 13): every command in its `sh` blocks, in order,
against a real `pointgate serve` on its embedded PostgreSQL.

Only what cannot run here is left out (installing, the TLS and container examples, the development commands);
ports and the data directory are the test's own (environment variables, which the README documents). A
command must exit 0 unless its README comment says ``exit 1``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support import free_ports

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SKIP = (
    *("pip install", "python3 -m venv", "--mqtts-bind", "ruff check", "pytest", "benchmarks/", "docker compose"),
    "pointgate consume",  # needs a cluster broker (deploy/ has the recipe)
)


def readme_commands() -> list[tuple[str, str]]:
    """(command, its comment) for every line of every `sh` block, continuation lines joined, in README order."""
    text = (ROOT / "README.md").read_text()
    commands: list[tuple[str, str]] = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            code, _, comment = line.partition("  #")
            if code.strip() and not code.strip().startswith("#"):
                commands.append((code.strip(), comment.strip()))
    return commands


def adapt(command: str, mqtt_port: int) -> str:
    """The README's command for this machine: our venv, our MQTT port, optional [parts] left out."""
    command = re.sub(r"\s\[[^\]]*\]", "", command)
    command = command.replace(".venv/bin/", f"{BIN}/").replace("127.0.0.1:1883", f"127.0.0.1:{mqtt_port}")
    return command


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_readme_works_top_to_bottom(tmp_path: Path) -> None:
    """Every README command, in order, does what the README says (exit 0, or exit 1 where it says so)."""
    base = Path(tempfile.mkdtemp(prefix="pointgate-readme-"))
    base.chmod(0o755)  # as root, the embedded PostgreSQL's user must reach the data directory
    mqtt_port, http_port = free_ports(2)
    env = {
        **os.environ,
        "POINTGATE_DATA_DIR": str(base / "data"),
        "POINTGATE_MQTT_BIND": f"127.0.0.1:{mqtt_port}",
        "POINTGATE_HTTP_BIND": f"127.0.0.1:{http_port}",
        "POINTGATE_LOG_FORMAT": "json",
    }
    commands = readme_commands()
    serve_line = next(c for c, _ in commands if "pointgate serve --allow-anonymous" in c)
    assert serve_line.startswith("python3 -m venv .venv && .venv/bin/pip install -e . && ")
    serve_log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen(
        [f"{BIN}/pointgate", "serve", "--allow-anonymous"], env=env, cwd=ROOT, stdout=serve_log, stderr=serve_log
    )
    subscriber: subprocess.Popen[str] | None = None
    ran: list[str] = []
    try:
        _wait_ready(http_port, serve, tmp_path / "serve.log")
        for command, comment in commands:
            if command == serve_line or any(skip in command for skip in SKIP):
                continue
            line = adapt(command, mqtt_port)
            print(f"$ {line}", file=sys.stderr)  # shown when the test fails
            if "amqtt_sub" in line:  # it waits for the reply: run it beside what follows
                subscriber = subprocess.Popen(  # noqa: S602 - the README's own command, as a user runs it
                    line, shell=True, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
                continue
            capture = re.fullmatch(r"(\w+)=\$\((.*)\)", line)  # SECRET=$(… device add …): keep it for later lines
            result = _sh(capture.group(2) if capture else line, env)
            expected = 1 if "exit 1" in comment else 0
            assert result.returncode == expected, f"{command}\n{result.stdout}\n{result.stderr}"
            ran.append(command)
            if capture:
                env[capture.group(1)] = result.stdout.strip()
            if subscriber is not None and "amqtt_pub" in line:
                # the subscriber's SUBSCRIBE cannot be observed from here: re-send (same id, idempotent) until
                # its one message arrives
                for _ in range(10):
                    try:
                        out, _ = subscriber.communicate(timeout=3)
                        break
                    except subprocess.TimeoutExpired:
                        assert _sh(line, env).returncode == 0
                else:
                    raise AssertionError("the README's subscriber got no reply")
                assert '"code":200' in out.replace(" ", ""), out
                subscriber = None
            if "sdk_resume.py" in line:
                assert result.stdout.startswith("200"), result.stdout
        assert any("device add inverter01 dev1" in c for c in ran) and any("sdk_resume.py" in c for c in ran)
        assert any("rejected replay" in c for c in ran) and any("model reload" in c for c in ran)
    finally:
        if subscriber is not None:
            subscriber.kill()
        serve.send_signal(signal.SIGTERM)
        try:
            assert serve.wait(30) == 0
        finally:
            serve_log.close()
            shutil.rmtree(base, ignore_errors=True)


def _wait_ready(http_port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(900):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    raise AssertionError(log.read_text())


def _sh(line: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S602 - the README's own command, as a user runs it
        line, shell=True, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
