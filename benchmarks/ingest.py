"""End-to-end ingest benchmark: publish → validated → committed → reply received, against a real pointgate.

Run ``python benchmarks/ingest.py --help``; what it measures, how, and the results are in benchmarks/README.md
and docs/performance.md. The parts:

  wire.py      MQTT packets and the bench devices' resume requests, encoded by hand
  client.py    the raw asyncio MQTT client: windowed sending, refill on reply or PUBACK, what it records
  loadgen.py   generator and idle-holder processes, driven over a pipe
  servers.py   pointgate, stock amqtt and the embedded PostgreSQL as child processes
  sampling.py  CPU and RSS of process trees, machine load, machine description (/proc)
  phase.py     one measured phase and the figures computed from it
  report.py    the table, the target verdicts, the py-spy summary
  ingest.py    this file: the command line and the order of the phases
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    # ``python benchmarks/ingest.py``: import the package as ``benchmarks.*`` from the repository root
    # (and not this directory's modules as top-level ones)
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import contextlib
import datetime as dt
import json
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

from benchmarks import loadgen, report
from benchmarks.client import Refill
from benchmarks.phase import Load, Phase, run_phase
from benchmarks.sampling import load_average, machine_info, raise_nofile, tree_status_kb
from benchmarks.servers import Database, Server, start_pointgate, start_stock, stop_process
from benchmarks.wire import POINT_NAMES

# a sustained phase sends as many messages as fit in its duration; its arrays are sized for this rate at most
SUSTAINED_MAX_MSG_S = 25_000


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; see ``--help``."""
    parser = argparse.ArgumentParser(
        description="End-to-end ingest benchmark for pointgate (and stock amqtt for comparison).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--devices",
        default="10",
        help="device connections; a comma list (10,100) runs phases per count; with --idle: idle connections",
    )
    parser.add_argument("--messages", type=int, default=20000, help="requests per phase (all devices together)")
    parser.add_argument("--window", type=int, default=10, help="most requests in flight per device")
    parser.add_argument(
        "--refill",
        default="reply,puback",
        help="what frees a place in a device's window: reply, puback (as the SDKs and paho do), or both (a list)",
    )
    parser.add_argument(
        "--points",
        type=int,
        default=10,
        choices=range(1, len(POINT_NAMES) + 1),
        metavar="1..10",
        help="measure points per message (bench01 has 10)",
    )
    parser.add_argument("--qos", type=int, default=1, choices=(0, 1), help="QoS of the requests")
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: total msg/s (0 = as fast as it goes)")
    parser.add_argument("--half", action="store_true", help="after each max-rate phase, rerun at half its rate")
    parser.add_argument("--half-seconds", type=float, default=15.0, help="how long a --half phase sends")
    parser.add_argument(
        "--sustained",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="max-rate phases send for this long instead of --messages; reports RSS over time",
    )
    parser.add_argument("--workers", type=int, default=1, help="pointgate serve --workers N")
    parser.add_argument(
        "--kill-worker",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="SIGKILL one worker this long into each max-rate phase (needs --workers > 1): is anything "
        "acknowledged lost? Its devices' connections drop and are counted as errors",
    )
    parser.add_argument("--database-url", help="use this PostgreSQL instead of a fresh embedded one")
    parser.add_argument("--compare-stock", action="store_true", help="also measure stock amqtt's relay rate")
    parser.add_argument("--idle", action="store_true", help="--devices are idle connections next to --active ones")
    parser.add_argument("--active", type=int, default=10, help="active devices in --idle mode")
    parser.add_argument("--gen-procs", type=int, default=1, help="generator processes")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a phase may run after its start")
    parser.add_argument("--json", help="append the JSON result line to this file instead of stdout")
    parser.add_argument(
        "--pointgate-env", action="append", default=[], metavar="KEY=VALUE", help="extra environment for pointgate"
    )
    parser.add_argument("--py-spy", metavar="FILE", help="sample pointgate with py-spy into FILE (collapsed stacks)")
    parser.add_argument("--py-spy-bin", default=_default_py_spy(), help="the py-spy executable")
    parser.add_argument("--cprofile", metavar="FILE", help="run pointgate under cProfile, stats to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, database)")
    args = parser.parse_args(argv)
    args.device_counts = [int(v) for v in str(args.devices).split(",") if v.strip()]
    if not args.device_counts or min(args.device_counts) < 1:
        parser.error("--devices needs positive counts")
    args.refills = [v.strip() for v in str(args.refill).split(",") if v.strip()]
    if not args.refills or any(v not in ("reply", "puback") for v in args.refills):
        parser.error("--refill takes reply, puback or reply,puback")
    if args.qos == 0 and "puback" in args.refills:
        parser.error("--refill puback needs --qos 1 (there is no PUBACK at QoS 0)")
    if args.messages < (args.active if args.idle else max(args.device_counts)):
        parser.error("--messages must be at least the number of active devices")
    if args.window < 1 or args.window > 1000:
        parser.error("--window must be 1..1000")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.kill_worker and (args.workers < 2 or args.idle or args.rate):
        parser.error("--kill-worker needs --workers 2 or more, and max-rate phases (no --idle, no --rate)")
    if args.sustained < 0 or (args.sustained and args.rate):
        parser.error("--sustained needs a positive duration and runs at full speed (no --rate)")
    return args


def _default_py_spy() -> str:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy") or "py-spy"


@contextlib.contextmanager
def idle_connections(server: Server, keys: list[str]) -> Iterator[dict[str, Any]]:
    """Hold ``keys`` connected (each subscribed to its reply topic) in a separate process."""
    child = loadgen.spawn(
        "hold", {"host": "127.0.0.1", "port": server.mqtt_port, "device_keys": keys, "connect_timeout": 60.0}
    )
    try:
        info: dict[str, Any] = loadgen.receive(child, 300, "idle connections")
        info["pid"] = child[0].pid
        yield info
        child[1].send(("stop", None))
        loadgen.receive(child, 60, "closing idle connections")
    finally:
        loadgen.stop_children([child])


class Run:
    """The servers and database of one benchmark run, and the phases measured so far."""

    def __init__(self, args: argparse.Namespace, db: Database) -> None:
        self.args = args
        self.db = db
        self.load = Load(
            points=args.points, qos=args.qos, window=args.window, timeout=args.timeout, gen_procs=args.gen_procs
        )
        self.tag = secrets.token_hex(3)
        self.phases: list[Phase] = []
        self._phase_no = 0

    def keys(self, count: int, label: str = "") -> list[str]:
        """Fresh device keys for one phase (their rows are counted by this prefix)."""
        self._phase_no += 1
        return [f"{self.tag}{self._phase_no:02d}{label}d{i:05d}" for i in range(count)]

    def run(self, server: Server, name: str, device_keys: list[str], **kw: Any) -> Phase:
        """Measure one phase and keep it."""
        print(f"phase {name} ({server.name}, load {load_average()[0]}) ...", file=sys.stderr)
        kw.setdefault("messages", self.args.messages)
        phase = run_phase(self.load, server, self.db if server.name == "pointgate" else None, name, device_keys, **kw)
        self.phases.append(phase)
        return phase

    def pointgate_phases(self, server: Server, extra: dict[str, Any]) -> None:
        """Idle-connection mode, or max (bounded or sustained) and half-rate phases per device count and refill."""
        args = self.args
        if args.idle:
            self.idle_phases(server, extra)
            return
        for count in args.device_counts:
            for refill in args.refills:
                mode: Refill = refill
                if args.sustained:
                    first = self.run(
                        server,
                        f"{count} dev {refill} {args.sustained:.0f}s",
                        self.keys(count),
                        refill=mode,
                        kill_worker_after=args.kill_worker,
                        duration=args.sustained,
                        messages=max(args.messages, int(SUSTAINED_MAX_MSG_S * args.sustained)),
                    )
                else:
                    label = f" @{args.rate:.0f}/s" if args.rate else " max"
                    first = self.run(
                        server,
                        f"{count} dev {refill}{label}",
                        self.keys(count),
                        refill=mode,
                        rate=args.rate,
                        kill_worker_after=args.kill_worker,
                    )
                if args.half and not args.rate and first.msg_s == first.msg_s and first.msg_s > 0:
                    half = round(first.msg_s / 2)
                    messages = max(count, int(half * args.half_seconds))
                    self.run(
                        server,
                        f"{count} dev {refill} @{half}/s",
                        self.keys(count),
                        refill=mode,
                        rate=half,
                        messages=messages,
                    )

    def idle_phases(self, server: Server, extra: dict[str, Any]) -> None:
        """``--active`` devices alone, then next to ``--devices`` idle subscribed connections."""
        args = self.args
        idle_n = args.device_counts[0]
        refill: Refill = args.refills[0]
        base = self.run(server, f"{args.active} active", self.keys(args.active), refill=refill)
        rss_before = _tree_rss_kb(server)
        with idle_connections(server, self.keys(idle_n, "i")) as info:
            time.sleep(1.0)
            rss_after = _tree_rss_kb(server)
            loaded = self.run(
                server,
                f"{args.active} active + {info['clients']} idle",
                self.keys(args.active),
                refill=refill,
                idle_devices=info["clients"],
                holder_pid=info["pid"],
            )
        extra["idle"] = {
            "idle_connections": info["clients"],
            "connect_failures": info["failures"],
            "connect_s": round(info["connect_s"], 2),
            "connects_per_s": round(info["clients"] / info["connect_s"]) if info["connect_s"] else None,
            "rss_before_mb": round(rss_before / 1024, 1),
            "rss_after_mb": round(rss_after / 1024, 1),
            "rss_kb_per_connection": round((rss_after - rss_before) / max(info["clients"], 1), 2),
            "throughput_ratio": round(loaded.msg_s / base.msg_s, 3) if base.msg_s else None,
        }

    def stock_phases(self, server: Server) -> None:
        """Stock amqtt relaying the same publishes, one phase per device count."""
        for count in self.args.device_counts:
            self.run(server, f"{count} dev relay", self.keys(count), stock=True)


def _tree_rss_kb(server: Server) -> int:
    """RSS of pointgate and its workers, kB."""
    return tree_status_kb(server.proc.pid, "VmRSS")


def _stop_py_spy(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is None or spy.poll() is not None:
        return
    spy.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        spy.wait(30)
    if spy.poll() is None:
        spy.kill()
        spy.wait(5)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the phases the command line asks for; print the table, the verdicts and the JSON line."""
    args = parse_args(argv)
    from service.ops.logs import configure_logging

    configure_logging(level="WARNING", json=False, stream=sys.stderr)  # stdout is for the results
    # pointgate holds every connection (and the holder process the idle ones): that is the most one process needs
    needed = max(args.device_counts) + (args.active if args.idle else 0) + 200
    limits = raise_nofile(needed)
    if args.idle and not limits["enough"]:
        print(f"RLIMIT_NOFILE {limits['soft']} < {needed} needed for --idle; run with fewer --devices", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="pointgate-bench-"))
    workdir.chmod(0o755)  # the embedded PostgreSQL runs as an unprivileged user when we are root
    started = dt.datetime.now(dt.UTC)
    extra: dict[str, Any] = {"nofile": limits, "load_at_start": load_average()}
    db: Database | None = None
    bench: Run | None = None
    servers: list[Server] = []
    spy: subprocess.Popen[bytes] | None = None
    pg_version: str | None = None
    try:
        db = Database(workdir, args.database_url)
        pg_version = db.version()
        print(f"database: {db.kind}, PostgreSQL {pg_version}; work dir {workdir}", file=sys.stderr)
        bench = Run(args, db)
        server = start_pointgate(
            workdir, db.dsn, workers=args.workers, extra_env=args.pointgate_env, cprofile=args.cprofile
        )
        servers.append(server)
        print(
            f"pointgate pid {server.proc.pid} (--workers {args.workers}) ready in {server.ready_s:.1f}s "
            f"on :{server.mqtt_port}",
            file=sys.stderr,
        )
        if args.py_spy:
            spy = report.start_py_spy(args.py_spy_bin, server.proc.pid, Path(args.py_spy).resolve())
        bench.pointgate_phases(server, extra)
        _stop_py_spy(spy)
        stop_process(server.proc, "pointgate")
        servers.remove(server)
        if args.compare_stock and not args.idle:
            stock = start_stock(workdir)
            servers.append(stock)
            print(f"stock amqtt pid {stock.proc.pid} on :{stock.mqtt_port}", file=sys.stderr)
            bench.stock_phases(stock)
            stop_process(stock.proc, "amqtt")
            servers.remove(stock)
    except RuntimeError as exc:  # a server that would not start, a generator that failed: said once, exit 2
        print(f"benchmark stopped: {exc}", file=sys.stderr)
        return 2
    finally:
        _stop_py_spy(spy)
        for server in servers:
            stop_process(server.proc, server.name)
        if db is not None:
            db.stop()
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    phases = bench.phases if bench is not None else []
    print(f"\npointgate ingest benchmark, {started:%Y-%m-%d %H:%M} UTC, {extra['load_at_start']} load at start")
    info = machine_info(pg_version)
    print(
        f"{info['nproc']} CPUs ({info['cpu_model']}), {info['mem_gib']} GiB, Python {info['python']}, "
        f"PostgreSQL {pg_version}, git {info['git']}"
    )
    print(
        f"window {args.window}, {args.points} points/msg, QoS {args.qos}, --workers {args.workers}, "
        f"{args.gen_procs} generator process(es), database {db.kind if db else '-'}"
    )
    print("\n".join(report.table(phases)))
    print("\n".join(report.sustained(phases)))
    if "idle" in extra:
        print(f"idle: {json.dumps(extra['idle'])}")
    verdicts = report.targets(phases, extra)
    for key, verdict in verdicts.items():
        print(f"target {key}: {verdict}")
    if args.py_spy and Path(args.py_spy).exists():
        print("\n".join(report.summarise_py_spy(Path(args.py_spy))))
    record = {
        "date": started.isoformat(timespec="seconds"),
        "machine": info,
        "args": {k: v for k, v in vars(args).items() if k not in ("device_counts", "refills")},
        "database": db.kind if db else None,
        "phases": [dict(vars(p), rss_growth_mb=p.rss_growth_mb) for p in phases],
        "extra": extra,
        "targets": verdicts,
    }
    line = json.dumps(record, default=str)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    else:
        print(line)
    return 0 if all(p.ok for p in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
