"""Consumer-mode benchmark: devices → mosquitto → ``pointgate consume`` × N → PostgreSQL → reply → device.

Measures messages per second end to end (a device's request answered 200 after its commit) for one and for
two consumers sharing the request topics behind Debian's mosquitto, and checks that nothing was lost: every
request answered 200 and all its points in ``measurepoints``. Reuses the ingest benchmark's load generator
(raw asyncio MQTT devices in their own processes, closed loop, ``--window`` requests in flight per device)
and its durable embedded PostgreSQL.

    .venv/bin/python benchmarks/consume.py                         # 1 and 2 consumers, 20 000 messages each
    .venv/bin/python benchmarks/consume.py --consumers 1,2,3 --messages 40000 --devices 40

mosquitto runs on a free loopback port with a config written here (as root it drops to the ``mosquitto``
user); consumers run as ``python -m service consume`` processes; everything is stopped by PID at the end.
The table goes to stdout, then one JSON line. Exit 1 if any phase lost a message or timed out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `service` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import loadgen
from benchmarks.sampling import tree_cpu_s
from benchmarks.servers import Database, Server, free_port, stop_process, wait_ready_http
from benchmarks.wire import PRODUCT_KEY

MODELS = Path(__file__).resolve().parent / "models"


def start_mosquitto(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Debian's mosquitto on a free loopback port, with windows and queues that never drop a message."""
    binary = shutil.which("mosquitto", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
    if binary is None:
        raise SystemExit("mosquitto is not installed (apt-get install -y mosquitto)")
    port = free_port()
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "persistence false",
        "max_inflight_messages 1000",
        "max_queued_messages 1000000",
        "log_type error",
        "log_type warning",
    ]
    if os.geteuid() == 0:
        lines.append("user mosquitto")
    config = workdir / "mosquitto.conf"
    config.write_text("\n".join(lines) + "\n")
    log = (workdir / "mosquitto.log").open("wb")
    proc = subprocess.Popen([binary, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


def start_consumer(workdir: Path, name: str, broker_port: int, dsn: str, args: argparse.Namespace) -> Server:
    """One ``pointgate consume`` process, once its /readyz answers 200."""
    http_port = free_port()
    env = {
        **os.environ,
        "POINTGATE_BROKER_URL": f"mqtt://127.0.0.1:{broker_port}",
        "POINTGATE_BROKER_CLIENT_ID": name,
        "POINTGATE_BROKER_PROTOCOL": args.protocol,
        "POINTGATE_CONSUME_MAX_IN_FLIGHT": str(args.max_in_flight),
        "POINTGATE_DATABASE_URL": dsn,
        "POINTGATE_HTTP_BIND": f"127.0.0.1:{http_port}",
        "POINTGATE_DATA_DIR": str(workdir / name),
        "POINTGATE_MODELS": str(MODELS),
        "POINTGATE_LOG_LEVEL": "WARNING",
        "POINTGATE_LOG_FORMAT": "json",
    }
    log_path = workdir / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "consume"],
        env=env,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parent.parent,
    )
    ready_s = wait_ready_http(proc, http_port, log_path)
    return Server(name, proc, broker_port, log_path, ready_s=ready_s, http_port=http_port)


def run_phase(
    consumers: int, broker: tuple[subprocess.Popen[bytes], int], db: Database, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """Start ``consumers`` consumers, drive ``args.messages`` requests through them, check every one."""
    mosquitto, port = broker
    servers = [start_consumer(workdir, f"c{consumers}-{i}", port, db.dsn, args) for i in range(consumers)]
    procs = [server.proc for server in servers]
    prefix = f"n{consumers}-"
    keys = [f"{prefix}dev{i:04d}" for i in range(args.devices)]
    per = [args.messages // len(keys) + (1 if i < args.messages % len(keys) else 0) for i in range(len(keys))]
    gens = max(1, min(args.gen_procs, len(keys)))
    spec = {
        "host": "127.0.0.1",
        "port": port,
        "mode": "pointgate",
        "refill": "reply",
        "points": args.points,
        "qos": 1,
        "window": args.window,
        "rate": 0.0,
        "duration": 0.0,
        "n_devices_total": len(keys),
        "timeout": args.timeout,
        "connect_timeout": 60.0,
        "time_base_ms": int(time.time() * 1000) - 86_400_000,
        "subscriber_expect": 0,
    }
    children = [
        loadgen.spawn("generate", dict(spec, devices=[(i, keys[i], per[i]) for i in range(g, len(keys), gens)]))
        for g in range(gens)
    ]
    try:
        for child in children:
            loadgen.receive(child, 120, "connecting")
        cpu_before = [tree_cpu_s(p.pid) for p in procs], tree_cpu_s(mosquitto.pid)
        go = time.monotonic() + 0.3
        for _, conn in children:
            conn.send(("go", go))
        results = [loadgen.receive(child, args.timeout + 30, "running") for child in children]
        cpu_after = [tree_cpu_s(p.pid) for p in procs], tree_cpu_s(mosquitto.pid)
        writes = [server.metrics() for server in servers]
    finally:
        loadgen.stop_children(children)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            stop_process(proc, "consumer")
    replies = sum(r["replies"] for r in results)
    codes: dict[str, int] = {}
    for r in results:
        for code, n in r["codes"].items():
            codes[str(code)] = codes.get(str(code), 0) + n
    recv = sorted(t for r in results for t in r["recv"] if t > 0)
    elapsed = (recv[-1] - go) if recv else float("nan")
    # steady rate: the middle 80 % of replies by receive time (connection and drain edges left out)
    lo, hi = int(len(recv) * 0.1), int(len(recv) * 0.9) - 1
    steady = (hi - lo) / (recv[hi] - recv[lo]) if hi > lo and recv[hi] > recv[lo] else float("nan")
    rows, complete = db.stored(prefix, args.points)
    consumer_cpu = sum(a - b for a, b in zip(cpu_after[0], cpu_before[0], strict=True))
    batches = sum(w.get("batches", 0.0) for w in writes)
    return {
        "consumers": consumers,
        "messages": args.messages,
        "replies": replies,
        "codes": codes,
        "msg_per_s": steady,
        "points_per_s": steady * args.points,
        "elapsed_s": elapsed,
        "consumer_us_per_msg": 1e6 * consumer_cpu / max(replies, 1),
        "mosquitto_us_per_msg": 1e6 * (cpu_after[1] - cpu_before[1]) / max(replies, 1),
        "batch_points": sum(w.get("batch_points_sum", 0.0) for w in writes) / max(batches, 1.0),
        "commit_ms": 1000 * sum(w.get("write_s", 0.0) for w in writes) / max(batches, 1.0),
        "load_average": os.getloadavg(),
        "rows": rows,
        "complete_messages": len(complete),
        "timed_out": any(r["timed_out"] for r in results),
        "lost": args.messages - len(complete),
        "ok": replies == args.messages and codes == {"200": args.messages} and len(complete) == args.messages,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the phases; print the table and one JSON line; 1 if anything was lost."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--consumers", default="1,2", help="consumer counts, one phase each (default 1,2)")
    parser.add_argument("--messages", type=int, default=20000, help="requests per phase")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--window", type=int, default=20, help="requests in flight per device")
    parser.add_argument("--points", type=int, default=10, help="points per request (at most 10)")
    parser.add_argument("--gen-procs", type=int, default=1)
    parser.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    parser.add_argument("--max-in-flight", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--database-url", default=None, help="your PostgreSQL instead of an embedded durable one")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pointgate-bench-consume-"))
    workdir.chmod(0o755)  # the unprivileged mosquitto and PostgreSQL users must enter it
    db = Database(workdir, args.database_url)
    broker = start_mosquitto(workdir)
    phases = []
    try:
        for n in (int(c) for c in args.consumers.split(",")):
            phases.append(run_phase(n, broker, db, args, workdir))
    finally:
        stop_process(broker[0], "mosquitto")
        db.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    heads = (
        "consumers",
        "msg/s",
        "points/s",
        "replies",
        "lost",
        "cons µs/msg",
        "mosq µs/msg",
        "batch pts",
        "commit ms",
    )
    print(" ".join(f"{h:>{w}}" for h, w in zip(heads, (9, 8, 9, 8, 5, 11, 11, 9, 9), strict=True)))
    for p in phases:
        print(
            f"{p['consumers']:>9} {p['msg_per_s']:>8.0f} {p['points_per_s']:>9.0f} {p['replies']:>8} {p['lost']:>5}"
            f" {p['consumer_us_per_msg']:>11.0f} {p['mosquitto_us_per_msg']:>11.0f} {p['batch_points']:>9.0f}"
            f" {p['commit_ms']:>9.1f}"
        )
    print(json.dumps({"benchmark": "consume", "product": PRODUCT_KEY, "args": vars(args), "phases": phases}))
    return 0 if all(p["ok"] and not p["timed_out"] for p in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
