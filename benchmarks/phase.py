"""One measured phase: drive a set of devices against one server, then turn what was recorded into figures.

Figures (see benchmarks/README.md, "What the columns mean"): throughput over the steady window (the middle 80 %
of replies by receive time), reply and PUBACK latency per message over the middle 80 % by send order, CPU of
the server's process tree, of PostgreSQL and of the generator, the server's RSS over time, the writer's
batches from ``/metrics``, and the checks: PUBACKs that overtook their reply, and messages acknowledged but
not stored (looked up message by message in ``measurepoints``).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks import loadgen
from benchmarks.client import Refill
from benchmarks.sampling import RssSampler, Snapshot, load_average, proc_cpu_s, tree_pids, tree_status_kb
from benchmarks.servers import Database, Server

STEADY = (0.10, 0.90)  # the steady window: fraction of replies (by time) left out at each end
TIMELINE_S = 0.5  # bucket of the reply-rate and p99 timelines
SUSTAINED_WINDOW_S = 5.0  # bucket of the latency-over-time table of a sustained phase


@dataclass(frozen=True)
class Load:
    """What every phase of a run shares."""

    points: int = 10
    qos: int = 1
    window: int = 10
    timeout: float = 60.0
    gen_procs: int = 1


@dataclass
class Phase:
    """One measured run against one server."""

    name: str
    server: str
    devices: int
    messages: int
    points: int
    window: int
    qos: int
    refill: str = "reply"
    rate: float = 0.0
    duration: float = 0.0  # sustained: seconds of sending
    workers: int = 1
    idle_devices: int = 0
    killed_worker: int | None = None  # --kill-worker: the PID killed with SIGKILL during the phase
    sent: int = 0
    completed: int = 0  # replies (pointgate) or relayed deliveries (stock)
    acks: int = 0
    timed_out: bool = False
    msg_s: float = 0.0
    msg_s_overall: float = 0.0  # every reply (delivery) over first → last
    ack_msg_s: float = 0.0  # PUBACKs per second over the steady window
    points_s: float = 0.0
    duration_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)  # send → reply
    ack_latency_ms: dict[str, float] = field(default_factory=dict)  # send → PUBACK
    puback_before_reply: int = 0  # must be 0 for a subscribed device
    acked_not_stored: int | None = None  # must be 0
    server_us_per_msg: float = 0.0
    server_cores: float = 0.0
    db_us_per_msg: float | None = None
    db_us_per_point: float | None = None
    db_cores: float | None = None
    db_bytes_per_point: float | None = None
    gen_us_per_msg: float = 0.0
    gen_cores: float = 0.0
    other_cores: float = 0.0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    server_rss_mb: float = 0.0
    server_peak_rss_mb: float = 0.0
    rss_start_mb: float = 0.0
    rss_max_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_timeline_mb: list[tuple[float, float]] = field(default_factory=list)  # (s since start, MB)
    rows_expected: int | None = None
    rows_found: int | None = None
    codes: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    connect_s: float = 0.0
    first_s: float = 0.0  # first reply (delivery) after the start
    write_batches: int | None = None  # database transactions during the phase (pointgate's /metrics)
    write_batch_points: float | None = None  # mean points per transaction
    write_ms: float | None = None  # mean INSERT + COMMIT time
    writer_busy: float | None = None  # writer transaction time ÷ phase time (> 1 with concurrent writers)
    slow_commits: dict[str, int] = field(default_factory=dict)  # transactions slower than 25 ms / 100 ms
    # open loop: how far the generator itself fell behind its schedule (its lateness counts as latency)
    gen_late_sends: int = 0
    gen_max_lag_ms: float = 0.0
    window_full_ticks: int = 0
    timeline: list[int] = field(default_factory=list)  # replies (deliveries) per TIMELINE_S since the start
    p99_timeline_ms: list[float] = field(default_factory=list)  # p99 latency of the messages sent in each bucket
    # sustained: per SUSTAINED_WINDOW_S of send time, (start s, messages, p50 ms, p99 ms)
    latency_windows: list[tuple[float, int, float, float]] = field(default_factory=list)

    @property
    def rss_growth_mb(self) -> float:
        """How far RSS rose above where it was at the start of the phase (its peak, not its end)."""
        return self.rss_max_mb - self.rss_start_mb

    @property
    def ok(self) -> bool:
        """Nothing lost, nothing timed out, no error, every PUBACK after its reply, every code 200."""
        errors = dict(self.errors)
        rows_ok = self.rows_expected is None or self.rows_found == self.rows_expected
        if self.killed_worker:
            # the killed worker's devices lose their connections, and what it committed but could not answer
            # is stored without a reply: neither is a failure; losing something acknowledged is
            errors.pop("connection lost", None)
            rows_ok = self.rows_expected is None or (self.rows_found or 0) >= self.rows_expected
        return (
            not self.timed_out
            and not errors
            and not self.puback_before_reply
            and not self.acked_not_stored
            and rows_ok
            and all(code == "200" for code in self.codes)
        )


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted ``values`` (NaN when empty)."""
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q * len(values)) - 1))]


def steady_rate(times: list[float]) -> float:
    """Events per second over the middle 80 % of ``times`` (sorted in place)."""
    times.sort()
    n = len(times)
    lo, hi = int(STEADY[0] * n), int(STEADY[1] * n) - 1
    if hi <= lo or times[hi] <= times[lo]:
        return float("nan")
    return (hi - lo) / (times[hi] - times[lo])


def latency_summary(pairs: list[tuple[float, float]]) -> dict[str, float]:
    """p50/p95/p99/max (ms) over the middle 80 % of ``(sent, received)`` pairs by send order; p99 of all."""
    if not pairs:
        return {}
    pairs = sorted(pairs)
    lo, hi = int(STEADY[0] * len(pairs)), int(STEADY[1] * len(pairs))
    latencies = sorted((got - sent) * 1000 for sent, got in pairs[lo:hi] or pairs)
    every = sorted((got - sent) * 1000 for sent, got in pairs)
    return {
        "p50": percentile(latencies, 0.50),
        "p95": percentile(latencies, 0.95),
        "p99": percentile(latencies, 0.99),
        "max": latencies[-1],
        "p99_all": percentile(every, 0.99),
        "max_all": every[-1],
    }


def _windows(pairs: list[tuple[float, float]], go: float, size: float) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for sent, got in pairs:
        out.setdefault(int((sent - go) / size), []).append((got - sent) * 1000)
    return out


def _common_prefix(keys: list[str]) -> str:
    first, last = min(keys), max(keys)
    size = 0
    while size < min(len(first), len(last)) and first[size] == last[size]:
        size += 1
    return first[:size]


def run_phase(
    load: Load,
    server: Server,
    db: Database | None,
    name: str,
    device_keys: list[str],
    *,
    messages: int,
    refill: Refill = "reply",
    rate: float = 0.0,
    duration: float = 0.0,
    stock: bool = False,
    idle_devices: int = 0,
    holder_pid: int | None = None,
    kill_worker_after: float = 0.0,
) -> Phase:
    """Drive ``device_keys`` against ``server``: ``messages`` in total, or as many as fit in ``duration``
    seconds (then ``messages`` is only the upper bound); measure everything."""
    n = len(device_keys)
    per_device = [messages // n + (1 if i < messages % n else 0) for i in range(n)]
    procs = max(1, min(load.gen_procs, n))
    time_base_ms = int(time.time() * 1000) - 86_400_000
    base_spec = {
        "host": "127.0.0.1",
        "port": server.mqtt_port,
        "mode": "stock" if stock else "pointgate",
        "refill": refill,
        "points": load.points,
        "qos": load.qos,
        "window": load.window,
        "rate": rate,
        "duration": duration,
        "n_devices_total": n,
        "timeout": load.timeout + duration,
        "connect_timeout": 60.0,
        "time_base_ms": time_base_ms,
    }
    assignments = [[(i, device_keys[i], per_device[i]) for i in range(p, n, procs)] for p in range(procs)]
    children = [
        loadgen.spawn(
            "generate", dict(base_spec, devices=devices, subscriber_expect=messages if stock and p == 0 else 0)
        )
        for p, devices in enumerate(assignments)
    ]
    phase = Phase(
        name,
        server.name,
        n,
        messages,
        load.points,
        load.window,
        load.qos,
        refill="puback" if stock else refill,
        rate=rate,
        duration=duration,
        workers=server.workers,
        idle_devices=idle_devices,
    )
    pg_pid = db.pid if db else None
    try:
        ready = [loadgen.receive(c, 120, f"{name}: connecting") for c in children]
        phase.connect_s = max(r["connect_s"] for r in ready)
        table_before = db.table_bytes() if db is not None and not stock else None
        go = time.monotonic() + 0.3
        phase.load_before = load_average()
        metrics_before = server.metrics()
        holder_before = proc_cpu_s(holder_pid) if holder_pid else 0.0
        before = Snapshot.take(server.proc.pid, pg_pid)
        killer = None
        if kill_worker_after:
            killer = threading.Timer(go + kill_worker_after - time.monotonic(), _kill_a_worker, (server, phase))
            killer.start()
        with RssSampler(server.proc.pid) as rss:
            for _, conn in children:
                conn.send(("go", go))
            results = [loadgen.receive(c, load.timeout + duration + 30, f"{name}: running") for c in children]
            after = Snapshot.take(server.proc.pid, pg_pid)
        if killer is not None:
            killer.cancel()
        holder_cpu = proc_cpu_s(holder_pid) - holder_before if holder_pid else 0.0
        metrics_after = server.metrics()
        phase.load_after = load_average()
    finally:
        loadgen.stop_children(children)
    _analyse(phase, results, go, stock=stock)
    _cpu(phase, before, after, sum(r["cpu_s"] for r in results), holder_cpu, go, results)
    _writer(phase, metrics_before, metrics_after, after.wall - before.wall)
    samples = [(round(t - (go - rss.started), 2), round(mb, 1)) for t, mb in rss.samples]
    phase.rss_timeline_mb = samples
    if samples:
        phase.rss_start_mb = samples[0][1]
        phase.rss_end_mb = samples[-1][1]
        phase.rss_max_mb = max(mb for _, mb in samples)
    phase.server_rss_mb = tree_status_kb(server.proc.pid, "VmRSS") / 1024
    phase.server_peak_rss_mb = tree_status_kb(server.proc.pid, "VmHWM") / 1024
    if db is not None and not stock:
        _check_stored(phase, db, device_keys, assignments, results, time_base_ms)
        if table_before is not None and phase.rows_found:
            phase.db_bytes_per_point = (db.table_bytes() - table_before) / phase.rows_found
    return phase


def _kill_a_worker(server: Server, phase: Phase) -> None:
    """SIGKILL one of pointgate's worker processes (a child of the supervisor), as a crash would."""
    workers = [pid for pid in tree_pids(server.proc.pid) if pid != server.proc.pid and _parent(pid) == server.proc.pid]
    if workers:
        os.kill(workers[0], signal.SIGKILL)
        phase.killed_worker = workers[0]


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _analyse(phase: Phase, results: list[dict[str, Any]], go: float, *, stock: bool) -> None:
    finished = max(r["finished"] for r in results)
    codes: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    pairs: list[tuple[float, float]] = []
    ack_pairs: list[tuple[float, float]] = []
    done_times: list[float] = []
    for r in results:
        codes.update(r["codes"])
        errors.update(r["errors"])
        phase.sent += sum(r["sent"])
        phase.acks += r["acks"]
        phase.puback_before_reply += r["puback_before_reply"]
        phase.timed_out |= r["timed_out"]
        phase.gen_late_sends += r["late_sends"]
        phase.gen_max_lag_ms = max(phase.gen_max_lag_ms, r["max_lag"] * 1000)
        phase.window_full_ticks += r["window_full"]
        for sent, got, acked in zip(r["send"], r["recv"], r["ack"], strict=True):
            if acked > 0.0:
                ack_pairs.append((sent, acked))
            if got > 0.0:
                pairs.append((sent, got))
                done_times.append(got)
        if stock:
            done_times.extend(r["sub_recv"])  # deliveries to the /sys/# subscriber (no replies)
    phase.completed = len(done_times)
    if done_times:
        phase.first_s = min(done_times) - go
        buckets = Counter(int((t - go) / TIMELINE_S) for t in done_times)
        phase.timeline = [buckets.get(b, 0) for b in range(max(buckets) + 1)]
    phase.codes = {str(k): v for k, v in sorted(codes.items())}
    phase.errors = dict(errors)
    phase.msg_s = steady_rate(done_times)
    span = max(done_times) - min(done_times) if done_times else 0.0
    phase.msg_s_overall = phase.completed / span if span > 0 else float("nan")
    if stock:
        # stock amqtt PUBACKs at once and relays from an unbounded backlog: deliveries crawl while the
        # publishers are busy and rush once they are done, so no middle window is representative. Its rate
        # is all deliveries over first → last delivery, as in reference/amqtt.md §4.1.
        phase.msg_s = phase.msg_s_overall
    elif phase.refill == "puback" and done_times:
        # devices that refill on PUBACK can run ahead of their replies, which then arrive in a late burst: the
        # middle of the reply times is no steady state. Throughput is every reply over start → last reply.
        phase.msg_s = phase.completed / (max(done_times) - go)
    phase.ack_msg_s = steady_rate([acked for _, acked in ack_pairs])
    phase.points_s = phase.msg_s * phase.points
    phase.duration_s = finished - go
    phase.latency_ms = latency_summary(pairs)
    phase.ack_latency_ms = latency_summary(ack_pairs)
    if pairs:
        by_bucket = _windows(pairs, go, TIMELINE_S)
        phase.p99_timeline_ms = [
            round(percentile(sorted(by_bucket.get(b, [])), 0.99), 1) for b in range(max(by_bucket) + 1)
        ]
        if phase.duration:
            windows = _windows(pairs, go, SUSTAINED_WINDOW_S)
            for b in sorted(windows):
                values = sorted(windows[b])
                phase.latency_windows.append(
                    (
                        b * SUSTAINED_WINDOW_S,
                        len(values),
                        round(percentile(values, 0.5), 1),
                        round(percentile(values, 0.99), 1),
                    )
                )


def _cpu(
    phase: Phase,
    before: Snapshot,
    after: Snapshot,
    gen_cpu: float,
    holder_cpu: float,
    go: float,
    results: list[dict[str, Any]],
) -> None:
    count = max(phase.completed, 1)
    cpu_wall = after.wall - before.wall
    wall = max(r["finished"] for r in results) - go
    server_cpu = after.server - before.server
    phase.server_us_per_msg = server_cpu / count * 1e6
    phase.server_cores = server_cpu / cpu_wall
    db_cpu = 0.0
    if after.database is not None and before.database is not None:
        db_cpu = after.database - before.database
        phase.db_us_per_msg = db_cpu / count * 1e6
        phase.db_us_per_point = phase.db_us_per_msg / phase.points
        phase.db_cores = db_cpu / cpu_wall
    phase.gen_us_per_msg = gen_cpu / count * 1e6
    phase.gen_cores = gen_cpu / wall if wall > 0 else 0.0
    known = server_cpu + gen_cpu + db_cpu + holder_cpu
    phase.other_cores = max(0.0, (after.machine - before.machine - known) / cpu_wall)


def _writer(phase: Phase, before: dict[str, float], after: dict[str, float], wall: float) -> None:
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    if not delta.get("batches"):
        return
    phase.write_batches = int(delta["batches"])
    phase.write_batch_points = delta["batch_points_sum"] / delta["batches"]
    phase.write_ms = delta["write_s"] / delta["batches"] * 1000
    phase.writer_busy = delta["write_s"] / wall
    phase.slow_commits = {
        "over_25ms": int(delta["batches"] - delta.get("writes_le_25ms", 0)),
        "over_100ms": int(delta["batches"] - delta.get("writes_le_100ms", 0)),
    }


def _check_stored(
    phase: Phase,
    db: Database,
    device_keys: list[str],
    assignments: list[list[tuple[int, str, int]]],
    results: list[dict[str, Any]],
    time_base_ms: int,
) -> None:
    """Rows found vs replies × points, and every acknowledged message looked up in ``measurepoints``.

    Acknowledged: PUBACKed at QoS 1; answered at QoS 0 (there is no PUBACK).
    """
    rows, complete = db.stored(_common_prefix(device_keys), phase.points)
    phase.rows_found = rows
    phase.rows_expected = phase.completed * phase.points
    missing = 0
    for devices, r in zip(assignments, results, strict=True):
        acked = r["ack"] if phase.qos == 1 else r["recv"]
        base = 0
        for _, device_key, count in devices:
            for k in range(count):
                if acked[base + k] > 0.0 and (device_key, time_base_ms + k) not in complete:
                    missing += 1
            base += count
    phase.acked_not_stored = missing
