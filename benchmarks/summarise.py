"""Summarise repeated benchmark runs: median (min–max) per phase kind over the JSON lines of ``ingest.py --json``.

``python -m benchmarks.summarise results.jsonl [more.jsonl ...]`` prints a Markdown table: one row per
(server, workers, devices, refill, kind), where kind is max, half (the ``--half`` rerun), rate (``--rate``),
sustained, idle-base / idle-loaded, or relay (stock amqtt). The ratio to stock amqtt is computed inside each run
(same machine, same moment) before it is summarised, which is what makes it the figure to trust on a shared box.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Key = tuple[str, int, int, str, str]


def _kind(phase: dict[str, Any], args: dict[str, Any]) -> str:
    if phase["server"] == "amqtt":
        return "relay"
    if args.get("idle"):
        return "idle-loaded" if phase["idle_devices"] else "idle-base"
    if phase.get("duration"):
        return "sustained"
    if phase["rate"]:
        return "rate" if args.get("rate") else "half"
    return "max"


def _spread(values: list[float], spec: str = ".0f") -> str:
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return "–"
    mid = format(statistics.median(values), spec)
    if len(values) == 1:
        return mid
    return f"{mid} ({format(min(values), spec)}–{format(max(values), spec)})"


def collect(records: list[dict[str, Any]]) -> dict[Key, list[dict[str, Any]]]:
    """Phases grouped by key, each with ``ratio`` (to stock amqtt in the same run) and ``load1`` added."""
    groups: dict[Key, list[dict[str, Any]]] = {}
    for record in records:
        args = record["args"]
        stock = {p["devices"]: p["msg_s"] for p in record["phases"] if p["server"] == "amqtt"}
        for phase in record["phases"]:
            kind = _kind(phase, args)
            key: Key = (phase["server"], phase.get("workers", 1), phase["devices"], phase["refill"], kind)
            row = dict(phase)
            row["load1"] = phase["load_before"][0]
            if kind in ("max", "sustained") and stock.get(phase["devices"]):
                row["ratio"] = phase["msg_s"] / stock[phase["devices"]]
            if kind == "idle-loaded":
                row["kb_per_conn"] = record["extra"]["idle"]["rss_kb_per_connection"]
                row["idle_ratio"] = record["extra"]["idle"]["throughput_ratio"]
            groups.setdefault(key, []).append(row)
    return groups


def table(groups: dict[Key, list[dict[str, Any]]]) -> list[str]:
    """The Markdown table."""
    header = (
        "server | w | devices | refill | kind | runs | msg/s | × stock | p50 ms | p99 ms | ack p99 ms | "
        "srv µs/msg | pg µs/pt | RSS +MB | KB/idle conn | load1 | other cores | ack<reply | acked lost"
    )
    lines = [header, "|".join(["---"] * (header.count("|") + 1))]
    for key in sorted(groups, key=lambda k: (k[0] != "pointgate", k[1], k[2], k[3], k[4])):
        rows = groups[key]
        server, workers, devices, refill, kind = key

        def values(name: str, rows: list[dict[str, Any]] = rows) -> list[float]:
            return [float(r[name]) for r in rows if r.get(name) is not None]

        def latency(which: str, field: str = "latency_ms", rows: list[dict[str, Any]] = rows) -> list[float]:
            return [float(r[field][which]) for r in rows if r.get(field) and which in r[field]]

        lines.append(
            " | ".join(
                (
                    server,
                    str(workers),
                    str(devices) + (f" + {rows[0]['idle_devices']} idle" if rows[0]["idle_devices"] else ""),
                    refill,
                    kind + (f" ({_spread(values('rate'))}/s)" if kind in ("half", "rate") else ""),
                    str(len(rows)),
                    _spread(values("msg_s")),
                    _spread(values("ratio"), ".2f"),
                    _spread(latency("p50"), ".1f"),
                    _spread(latency("p99_all" if kind == "sustained" else "p99"), ".1f"),
                    _spread(latency("p99", "ack_latency_ms"), ".1f"),
                    _spread(values("server_us_per_msg")),
                    _spread(values("db_us_per_point"), ".1f"),
                    _spread(values("rss_growth_mb"), ".0f"),
                    _spread(values("kb_per_conn"), ".1f"),
                    _spread(values("load1"), ".1f"),
                    _spread(values("other_cores"), ".2f"),
                    str(int(sum(values("puback_before_reply")))) if server == "pointgate" else "–",
                    str(int(sum(values("acked_not_stored")))) if server == "pointgate" else "–",
                )
            )
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Read the JSON lines, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("files", nargs="+", type=Path, help="JSON lines written by ingest.py --json")
    args = parser.parse_args(argv)
    records = [
        json.loads(line) for path in args.files for line in path.read_text().splitlines() if line.startswith("{")
    ]
    if not records:
        parser.error("no results in those files")
    print("\n".join(table(collect(records))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
