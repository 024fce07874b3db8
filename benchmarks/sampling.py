"""Process and machine accounting from /proc: CPU and memory of pointgate (all its worker processes), of
PostgreSQL (postmaster and backends), of the whole machine; and the machine's description.

A process "tree" is a root PID and all its live descendants: ``pointgate serve --workers N`` is a parent and
N workers, PostgreSQL a postmaster and its backends. CPU of a descendant that exited during a phase is lost
(unless its parent reaped it, when it shows in the parent's cutime, which is not counted either): the
benchmark's processes do not exit while a phase runs. RSS of a tree is the sum of its processes' VmRSS, so
pages shared between a parent and its forked workers are counted more than once.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int | str) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()


def proc_cpu_s(pid: int) -> float:
    """utime + stime of one process, seconds (0.0 if it is gone)."""
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kb(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/<pid>/status (VmRSS, VmHWM); 0 if the process is gone."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def tree_pids(root: int) -> list[int]:
    """``root`` and its live descendants."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(entry)[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, ()))
    return out


def tree_cpu_s(root: int) -> float:
    """CPU seconds of ``root`` and its live descendants."""
    return sum(proc_cpu_s(pid) for pid in tree_pids(root))


def tree_status_kb(root: int, key: str) -> int:
    """The sum of a /proc/<pid>/status ``kB`` line over ``root`` and its live descendants."""
    return sum(proc_status_kb(pid, key) for pid in tree_pids(root))


def machine_busy_s() -> float:
    """CPU seconds all cores spent not idle since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / CLK_TCK


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (what ``uptime`` shows)."""
    one, five, fifteen = os.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)


@dataclass
class Snapshot:
    """CPU counters at one instant."""

    wall: float
    server: float
    database: float | None
    machine: float

    @classmethod
    def take(cls, server_pid: int, pg_pid: int | None) -> Snapshot:
        """Read the counters of the server's tree, the database's tree and the machine."""
        return cls(
            time.monotonic(),
            tree_cpu_s(server_pid),
            tree_cpu_s(pg_pid) if pg_pid else None,
            machine_busy_s(),
        )


@dataclass
class RssSampler:
    """Samples a process tree's RSS every ``period`` seconds in a background thread, while in ``with``."""

    root: int
    period: float = 1.0
    started: float = 0.0
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, MB)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._sample()

    def _sample(self) -> None:
        self.samples.append((round(time.monotonic() - self.started, 2), tree_status_kb(self.root, "VmRSS") / 1024))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period)


def raise_nofile(needed: int) -> dict[str, Any]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (children inherit it); say whether ``needed`` fits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        new = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    now_soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"soft_before": soft, "soft": now_soft, "hard": hard, "enough": now_soft >= needed}


def machine_info(postgres_version: str | None = None) -> dict[str, Any]:
    """nproc, CPU model, memory, kernel, Python and library versions: what docs/performance.md reports."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    versions: dict[str, str] = {}
    for dist in ("amqtt", "asyncpg", "uvloop", "orjson"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[dist] = version(dist)
    git = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgres": postgres_version,
        "versions": versions,
        "git": git,
    }
