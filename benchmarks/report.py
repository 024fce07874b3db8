"""What a run prints: the table of phases, the sustained phases over time, the verdict on each design target,
the py-spy summary, and one JSON line with every number."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.phase import Phase


def _fmt(value: float | None, spec: str = ".0f") -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return format(value, spec)


_HEADER = (
    "phase",
    "server",
    "w",
    "dev",
    "refill",
    "msgs",
    "msg/s",
    "ack/s",
    "points/s",
    "p50 ms",
    "p99 ms",
    "max ms",
    "ack p99",
    "srv µs/msg",
    "srv cores",
    "pg µs/pt",
    "pg B/pt",
    "gen cores",
    "other",
    "load1",
    "RSS MB",
    "RSS +MB",
    "batch pts",
    "commit ms",
    "writer",
    "ack<reply",
    "acked lost",
    "rows ok",
)


def _row(p: Phase) -> tuple[str, ...]:
    if p.rows_expected is None:
        rows_ok = "-"
    elif p.killed_worker:  # committed by the killed worker but never answered: stored, no reply
        rows_ok = "yes" if (p.rows_found or 0) >= p.rows_expected else "NO"
    else:
        rows_ok = "yes" if p.rows_found == p.rows_expected else "NO"
    lat, ack = p.latency_ms, p.ack_latency_ms
    return (
        p.name,
        p.server,
        str(p.workers),
        str(p.devices) + (f"+{p.idle_devices}i" if p.idle_devices else ""),
        p.refill,
        f"{p.completed}/{p.sent}",
        _fmt(p.msg_s),
        _fmt(p.ack_msg_s),
        _fmt(p.points_s),
        _fmt(lat.get("p50"), ".1f"),
        _fmt(lat.get("p99"), ".1f"),
        _fmt(lat.get("max"), ".1f"),
        _fmt(ack.get("p99"), ".1f"),
        _fmt(p.server_us_per_msg),
        _fmt(p.server_cores, ".2f"),
        _fmt(p.db_us_per_point, ".1f"),
        _fmt(p.db_bytes_per_point),
        _fmt(p.gen_cores, ".2f"),
        _fmt(p.other_cores, ".2f"),
        f"{p.load_before[0]:.1f}",
        _fmt(p.rss_end_mb),
        _fmt(p.rss_growth_mb, "+.0f"),
        _fmt(p.write_batch_points),
        _fmt(p.write_ms, ".1f"),
        _fmt(p.writer_busy, ".0%"),
        str(p.puback_before_reply) if p.server == "pointgate" and p.qos == 1 else "-",
        _fmt(p.acked_not_stored, "d") if p.acked_not_stored is not None else "-",
        rows_ok,
    )


def table(phases: list[Phase]) -> list[str]:
    """The phases as an aligned text table, then one line per phase that failed a check."""
    rows = [_row(p) for p in phases]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(_HEADER)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(_HEADER, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    for p in phases:
        if p.killed_worker:
            lines.append(f"  {p.name}: worker pid {p.killed_worker} killed (SIGKILL); errors {p.errors}")
        if not p.ok:
            problems = {k: v for k, v in p.codes.items() if k != "200"}
            lines.append(
                f"  ! {p.name}: timed_out={p.timed_out} errors={p.errors} non-200={problems} "
                f"PUBACK before reply={p.puback_before_reply} acked not stored={p.acked_not_stored} "
                f"rows {p.rows_found}/{p.rows_expected}"
            )
    return lines


def sustained(phases: list[Phase]) -> list[str]:
    """For each sustained phase: RSS every few seconds and reply latency per 5 s of send time."""
    lines: list[str] = []
    for p in phases:
        if not p.duration:
            continue
        step = max(1, len(p.rss_timeline_mb) // 15)
        rss = ", ".join(f"{t:.0f}s {mb:.0f}" for t, mb in p.rss_timeline_mb[::step])
        lines.append(
            f"{p.name}: RSS MB {p.rss_start_mb:.0f} → {p.rss_end_mb:.0f} (max {p.rss_max_mb:.0f}, "
            f"growth {p.rss_growth_mb:+.0f}); over time: {rss}"
        )
        windows = ", ".join(f"{t:.0f}s {n} msgs p50 {p50:.0f} p99 {p99:.0f}" for t, n, p50, p99 in p.latency_windows)
        lines.append(f"{p.name}: reply latency per 5 s of send time (ms): {windows}")
    return lines


def _max_phases(phases: list[Phase]) -> list[Phase]:
    return [p for p in phases if p.server == "pointgate" and p.rate == 0 and not p.idle_devices]


def targets(phases: list[Phase], extra: dict[str, Any]) -> dict[str, Any]:
    """The issue-7 / design.md targets this run speaks to, with the numbers behind each verdict."""
    out: dict[str, Any] = {}
    maxes = _max_phases(phases)
    for p in maxes:
        out[f"msg_s_{p.devices}dev_{p.refill}_w{p.workers}"] = {"msg_s": round(p.msg_s), "ok": p.msg_s >= 10_000}
    for s in phases:
        if s.server != "amqtt":
            continue
        for p in maxes:
            if p.devices == s.devices and s.msg_s > 0:
                ratio = p.msg_s / s.msg_s
                out[f"vs_stock_{p.devices}dev_{p.refill}_w{p.workers}"] = {"ratio": round(ratio, 2), "ok": ratio >= 2}
    for p in phases:
        if p.server == "pointgate" and p.rate and p.latency_ms:
            out[f"p99_at_{round(p.rate)}_msg_s_{p.devices}dev_{p.refill}_w{p.workers}"] = {
                "p99_ms": round(p.latency_ms["p99"], 1),
                "ok": p.latency_ms["p99"] < 50,
            }
    for p in phases:
        if p.duration and p.latency_ms:
            out[f"sustained_{round(p.duration)}s_{p.devices}dev_{p.refill}_w{p.workers}"] = {
                "rss_growth_mb": round(p.rss_growth_mb, 1),
                "p99_ms": round(p.latency_ms["p99_all"], 1),
                "ok": p.rss_growth_mb < 50 and p.latency_ms["p99_all"] < 1000,
            }
    if "idle" in extra:
        idle = extra["idle"]
        ratio, kb = idle["throughput_ratio"], idle["rss_kb_per_connection"]
        out["idle_throughput_within_20pct"] = {"ratio": ratio, "ok": ratio is not None and ratio >= 0.8}
        out["idle_kb_per_connection"] = {"kb": kb, "ok": kb < 20}
    checked = [p for p in phases if p.acked_not_stored is not None]
    if checked:
        lost = sum(p.acked_not_stored or 0 for p in checked)
        out["acknowledged_lost"] = {"messages": lost, "ok": lost == 0}
    ordered = [p for p in phases if p.server == "pointgate" and p.qos == 1]
    if ordered:
        early = sum(p.puback_before_reply for p in ordered)
        out["puback_before_reply"] = {"count": early, "ok": early == 0}
    return out


def start_py_spy(binary: str, pid: int, out: Path) -> subprocess.Popen[bytes]:
    """Sample pointgate and its workers (non-blocking) until SIGINT; collapsed stacks go to ``out``."""
    return subprocess.Popen(
        [
            binary,
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--format",
            "raw",
            "--rate",
            "250",
            "--nonblocking",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def summarise_py_spy(path: Path, top: int = 25) -> list[str]:
    """Own and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame_name(f) for f in stack.split(";") if f and not f.startswith("process ")]
        if not frames:
            continue
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return ["(no samples)"]
    lines = [f"py-spy: {total} samples; own time (top {top}):"]
    lines += [f"  {c / total:6.1%}  {name}" for name, c in own.most_common(top)]
    lines.append(f"inclusive time (top {top}):")
    lines += [f"  {c / total:6.1%}  {name}" for name, c in inclusive.most_common(top)]
    return lines


def _frame_name(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)"
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if parts else path
    return f"{name} ({short})"
