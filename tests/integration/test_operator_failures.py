"""`pointgate serve` and `migrate` as an operator meets them when something is wrong (issue 13, findings 1-3, 9).

Each failure ends with one line naming what to fix and a non-zero exit, never a traceback; a database that is
merely down is waited for, with readiness naming the host.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from service.resources import schemas_dir
from service.storage.embedded import EmbeddedPostgres
from tests.conftest import _run
from tests.support import free_port, free_ports

ROOT = Path(__file__).resolve().parents[2]


def pointgate(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``pointgate ARGS`` to completion (these runs are expected to stop by themselves)."""
    environment = {
        **os.environ,
        "POINTGATE_MODELS": str(schemas_dir()),
        "POINTGATE_LOG_FORMAT": "console",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def serve_args(tmp_path: Path, *, mqtt: str = "127.0.0.1:0", http: str = "127.0.0.1:0") -> list[str]:
    return ["serve", "--mqtt-bind", mqtt, "--http-bind", http, "--data-dir", str(tmp_path / "data")]


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("pointgate: error:")]


def assert_one_clear_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    lines = error_lines(result)
    assert len(lines) == 1, output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def listening_socket() -> Iterator[int]:
    """A loopback port something already listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_busy_mqtt_port_is_one_line_naming_the_option(migrated_dsn: str, tmp_path: Path, listening_socket: int) -> None:
    """A taken MQTT port: exit 2 and one line with --mqtt-bind and the address, no amqtt traceback."""
    bind = f"127.0.0.1:{listening_socket}"
    result = pointgate(*serve_args(tmp_path, mqtt=bind), "--database-url", migrated_dsn)
    assert result.returncode == 2
    assert_one_clear_line(result, f"--mqtt-bind {bind}", "address already in use")


def test_busy_http_port_is_one_line_naming_the_option(migrated_dsn: str, tmp_path: Path, listening_socket: int) -> None:
    """A taken ops port: exit 2 and one line with --http-bind and the address, before any traceback could be logged."""
    bind = f"127.0.0.1:{listening_socket}"
    result = pointgate(*serve_args(tmp_path, http=bind), "--database-url", migrated_dsn)
    assert result.returncode == 2
    assert_one_clear_line(result, f"--http-bind {bind}", "address already in use")


def with_user(dsn: str, user: str, database: str | None = None) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    path = f"/{database}" if database is not None else parts.path
    return urlunsplit(parts._replace(netloc=f"{user}@{host}", path=path))


def _edit(path: Path, change: Callable[[str], str]) -> None:
    """Rewrite a small file in place (pg_hba.conf: a few lines, read and written at once)."""
    path.write_text(change(path.read_text()))


@pytest.fixture
def password_dsn(pg_server: str, migrated_dsn: str) -> Iterator[str]:
    """A DSN whose role needs a password, with the wrong one: pg_hba asks that role (only) for scram."""
    if os.environ.get("POINTGATE_TEST_DATABASE_URL"):
        pytest.skip("needs the session's own PostgreSQL (edits pg_hba.conf)")
    role = f"pw_{uuid.uuid4().hex[:12]}"
    wrong = with_user(migrated_dsn, f"{role}:wrong")
    rules = f"local all {role} scram-sha-256\nhost all {role} all scram-sha-256\n"

    async def setup() -> Path:
        conn = await asyncpg.connect(pg_server)
        try:
            await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'right'")
            hba = Path(await conn.fetchval("SHOW hba_file"))
            _edit(hba, lambda text: rules + text)
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()
        for _ in range(200):  # the postmaster reloads asynchronously: wait until the rule bites
            try:
                other = await asyncpg.connect(wrong)
            except asyncpg.InvalidPasswordError:
                return hba
            await other.close()
            await asyncio.sleep(0.05)
        raise AssertionError("pg_hba.conf reload never took effect")

    async def teardown(hba: Path) -> None:
        _edit(hba, lambda text: text.replace(rules, ""))
        conn = await asyncpg.connect(pg_server)
        try:
            await conn.execute("SELECT pg_reload_conf()")
            await conn.execute(f"DROP ROLE IF EXISTS {role}")
        finally:
            await conn.close()

    hba = _run(setup())
    try:
        yield wrong
    finally:
        _run(teardown(hba))


@pytest.mark.parametrize("case", ["wrong password", "missing database", "unknown user", "unresolvable host"])
def test_fatal_database_errors_stop_serve_with_one_line(
    case: str, request: pytest.FixtureRequest, migrated_dsn: str, tmp_path: Path
) -> None:
    """Errors waiting cannot fix stop start-up: exit 1, one line naming the database and the reason."""
    if case == "wrong password":
        dsn, needle = request.getfixturevalue("password_dsn"), "wrong password"
    elif case == "missing database":
        dsn, needle = with_user(migrated_dsn, "postgres", "no_such_db"), "does not exist"
    elif case == "unknown user":
        dsn, needle = with_user(migrated_dsn, "nobody_here"), "refused this user"
    else:
        dsn, needle = "postgresql://postgres@no-such-host.invalid:5432/x", "does not resolve"
    started = time.monotonic()
    result = pointgate(*serve_args(tmp_path), "--database-url", dsn, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert_one_clear_line(result, needle)
    assert "pointgate started" not in result.stdout + result.stderr
    assert time.monotonic() - started < 30  # it does not retry forever


def test_migrate_with_a_wrong_password_is_one_line(password_dsn: str) -> None:
    """`migrate` with a wrong password: the same one-line format as every command, not asyncpg's traceback."""
    result = pointgate("migrate", "--database-url", password_dsn)
    assert result.returncode == 1
    assert_one_clear_line(result, "wrong password")


def test_an_edited_migration_stops_serve(migrated_dsn: str, tmp_path: Path) -> None:
    """A migration edited after it was applied is refused at start-up, not retried as if the database were down."""

    async def tamper() -> None:
        conn = await asyncpg.connect(migrated_dsn)
        try:
            await conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
        finally:
            await conn.close()

    _run(tamper())
    result = pointgate(*serve_args(tmp_path), "--database-url", migrated_dsn)
    assert result.returncode == 1
    assert_one_clear_line(result, "0001_points.sql")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_database_that_is_down_is_waited_for_and_readiness_names_the_host(tmp_path: Path, workers: str) -> None:
    """Refused connections are transient: serve starts, /readyz is 503 naming host:port and why (with workers, in
    each worker's check)."""
    db_port, http_port = free_ports(2)
    env = {**os.environ, "POINTGATE_MODELS": str(schemas_dir()), "POINTGATE_LOG_FORMAT": "json"}
    args = [*serve_args(tmp_path, http=f"127.0.0.1:{http_port}"), "--workers", workers]
    dsn = f"postgresql://postgres@127.0.0.1:{db_port}/pointgate"
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", *args, "--database-url", dsn], env=env, stdout=log, stderr=log
    )
    where = f"127.0.0.1:{db_port}/pointgate"
    try:
        checks: dict[str, str] = {}
        for _ in range(600):  # until a check names the database (workers say "starting" first)
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2)
                raise AssertionError("ready without a database")
            except urllib.error.HTTPError as exc:
                checks = json.loads(exc.read())["checks"]
                # one process: its database check; workers: every worker's check, once each has started
                if (any if workers == "1" else all)(where in reason for reason in checks.values()):
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.1)
        named = [reason for reason in checks.values() if where in reason]
        assert named and all("refused" in reason for reason in named), checks
        if workers == "1":
            assert where in checks["database"] and f"127.0.0.1:{db_port}" in checks["migrations"]
        else:
            assert set(checks) == {"worker 0", "worker 1"} and len(named) == 2
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        log.close()


@pytest.mark.slow
def test_sigterm_stops_an_adopted_embedded_postgres(tmp_path: Path) -> None:
    """After a kill -9 the next serve adopts the embedded PostgreSQL left running, and on SIGTERM stops it too."""
    base = Path(tempfile.mkdtemp(prefix="pointgate-adopt-"))
    base.chmod(0o755)  # as root, the PostgreSQL user must reach it
    data = base / "d"
    leftover = EmbeddedPostgres(data)
    leftover.start()  # what a killed pointgate leaves behind
    http_port = free_port()
    env = {**os.environ, "POINTGATE_MODELS": str(schemas_dir()), "POINTGATE_LOG_FORMAT": "json"}
    args = ["serve", "--mqtt-bind", "127.0.0.1:0", "--http-bind", f"127.0.0.1:{http_port}", "--data-dir", str(data)]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "service", *args], env=env, stdout=log, stderr=log)
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                time.sleep(0.1)
        assert "embedded postgres adopted" in (tmp_path / "serve.log").read_text()
        assert EmbeddedPostgres(data).is_running()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not EmbeddedPostgres(data).is_running(), (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        if EmbeddedPostgres(data).is_running():
            leftover.stop()
        import shutil

        shutil.rmtree(base, ignore_errors=True)
