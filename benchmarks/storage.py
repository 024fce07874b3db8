"""Storage benchmark (issue 10): today's layout (``point_data``, migrations 0001-0002) against the series +
partitions + latest-values layout (0003), in one run, on one durable PostgreSQL.

1. Ingest: the same points written by each layout's writer statement in batches of ``--batch`` (the new one
   through `PointWriter` with one connection, latest values maintained): PostgreSQL backend CPU µs per point
   (utime+stime of the backend processes from /proc) and bytes on disk per point (table + indexes).
2. History: a table of ``--history-rows`` rows (devices × 10 points × hourly times ending now, i.e. about a
   year), built in time order, in each layout: latest values of one device, one day of one point, and the
   retention drop of a day (DROP TABLE of a partition; today's layout can only DELETE).

Usage: ``.venv/bin/python benchmarks/storage.py`` (about 10 minutes with the defaults on a 2-core machine;
``--history-rows 2000000`` for a quick look). ``--explain`` prints the plans of the docs/analytics.md queries.
Output: a table on stdout, then one JSON line with every number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from service.pipeline import Row  # noqa: E402
from service.resources import migrations_dir  # noqa: E402
from service.storage.embedded import EmbeddedPostgres  # noqa: E402
from service.storage.migrate import apply_migrations  # noqa: E402
from service.storage.partitions import MS_PER_DAY, MS_PER_HOUR, ensure_buckets, to_datetime  # noqa: E402
from service.storage.writer import PointWriter  # noqa: E402
from tests.storage.legacy import UPSERT as OLD_UPSERT  # noqa: E402
from tests.storage.legacy import columns as old_columns  # noqa: E402
from tests.storage.legacy import old_migrations  # noqa: E402

POINTS = 10
PRODUCT = "bench01"
HZ = os.sysconf("SC_CLK_TCK")
DATABASES = ("bench_old", "bench_new", "bench_old_resume", "bench_new_resume", "hist_old", "hist_new")

EXPLAIN_QUERIES = {
    "a device's points over a window (one day)": """
        SELECT ts, point, value, quality FROM measurepoints
        WHERE product_key = 'bench01' AND device_key = 'dev7' AND ts >= {day_ago} ORDER BY ts""",
    "time buckets: one device, 7 days, hourly avg/min/max per point": """
        SELECT date_bin('1 hour', ts, 'epoch') AS bucket, point, avg(value_num), min(value_num), max(value_num)
        FROM measurepoints
        WHERE product_key = 'bench01' AND device_key = 'dev7' AND ts >= {week_ago}
        GROUP BY 1, 2 ORDER BY 1, 2""",
    "time buckets: the whole fleet, one day, points per hour": """
        SELECT date_bin('1 hour', ts, 'epoch') AS bucket, count(*) FROM measurepoints
        WHERE ts >= {day_ago} GROUP BY 1 ORDER BY 1""",
    "latest values of one device": """
        SELECT point, ts, value, quality FROM measurepoints_latest
        WHERE product_key = 'bench01' AND device_key = 'dev7' ORDER BY point""",
    "gaps: missing data in one series over 30 days (expected every hour)": """
        SELECT ts AS gap_after, next_ts - ts AS gap FROM (
            SELECT ts, lead(ts) OVER (ORDER BY ts) AS next_ts FROM measurepoints
            WHERE product_key = 'bench01' AND device_key = 'dev7' AND point = 'p3'
              AND ts >= {month_ago}) s
        WHERE next_ts - ts > interval '1 hour'""",
}


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes, in seconds (/proc/<pid>/stat fields 14 and 15)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / HZ


def live_rows(n: int, devices: int, start_ms: int) -> list[list[Row]]:
    """Live traffic: every device sends its 10 points at one time, then the next round 10 s later."""
    rows: list[Row] = []
    rounds = n // (devices * POINTS)
    for r in range(rounds):
        ts = start_ms + r * 10_000
        for d in range(devices):
            rows.extend(Row(PRODUCT, f"dev{d}", f"p{p}", ts, float(r + p), None, ts + 5) for p in range(POINTS))
    return [rows]


def resume_rows(n: int, devices: int, start_ms: int) -> list[Row]:
    """Resume traffic: each device replays its backlog (10 points every 10 s), one device after another, so a
    batch holds many times of few series and the latest value moves once per series and batch."""
    rows: list[Row] = []
    rounds = n // (devices * POINTS)
    for d in range(devices):
        for r in range(rounds):
            ts = start_ms + r * 10_000
            rows.extend(Row(PRODUCT, f"dev{d}", f"p{p}", ts, float(r + p), None, ts + 5) for p in range(POINTS))
    return rows


def batches(rows: list[Row], size: int) -> list[list[Row]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


async def other_backends(conn: asyncpg.Connection) -> list[int]:
    records = await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND backend_type = 'client backend'"
    )
    return [r["pid"] for r in records]


async def ingest_old(dsn: str, rows: list[Row], batch: int, warm: list[Row], scratch: Path) -> dict[str, float]:
    conn = await asyncpg.connect(dsn)
    try:
        await apply_migrations(conn, old_migrations(scratch / "old-migrations"))
        pid = conn.get_server_pid()
        for chunk in batches(warm, batch):  # the same warm-up as the new layout's, outside the clock
            await conn.execute(OLD_UPSERT, *old_columns(chunk))
        started, cpu0 = time.perf_counter(), cpu_seconds([pid])
        for chunk in batches(rows, batch):
            await conn.execute(OLD_UPSERT, *old_columns(chunk))  # one statement = one transaction, as the writer
        wall, cpu = time.perf_counter() - started, cpu_seconds([pid]) - cpu0
        await conn.execute("VACUUM ANALYZE point_data")
        size = await conn.fetchval("SELECT pg_total_relation_size('point_data')")
    finally:
        await conn.close()
    n = len(rows)
    return {"cpu_us_per_point": cpu / n * 1e6, "points_per_s": n / wall, "bytes_per_point": size / (n + len(warm))}


async def ingest_new(dsn: str, rows: list[Row], batch: int, warm: list[Row]) -> dict[str, float]:
    conn = await asyncpg.connect(dsn)
    try:
        await apply_migrations(conn, migrations_dir())
        writer = PointWriter(dsn, connections=1, batch_points=batch, maintenance=False)
        writer.start()
        # the series dictionary and partitions are created on first sight: warm them up outside the clock,
        # as a running service would have them (each is once per series / per day, not per point)
        await asyncio.gather(*(writer.submit(chunk) for chunk in batches(warm, batch)))
        pids = await other_backends(conn)
        started, cpu0 = time.perf_counter(), cpu_seconds(pids)
        futures = [writer.submit(chunk) for chunk in batches(rows, batch)]
        await asyncio.gather(*futures)
        wall, cpu = time.perf_counter() - started, cpu_seconds(pids) - cpu0
        await writer.close()
        await conn.execute("VACUUM ANALYZE points")
        size = await conn.fetchval(
            "SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits WHERE inhparent = 'points'::regclass"
        )
        latest = await conn.fetchval("SELECT pg_total_relation_size('points_latest')")
        series = await conn.fetchval("SELECT pg_total_relation_size('series')")
    finally:
        await conn.close()
    n = len(rows)
    return {
        "cpu_us_per_point": cpu / n * 1e6,
        "points_per_s": n / wall,
        "bytes_per_point": size / (n + len(warm)),
        "latest_bytes": latest,
        "series_bytes": series,
    }


async def build_history(conn: asyncpg.Connection, layout: str, devices: int, hours: int, end_ms: int) -> float:
    """``devices`` × 10 points × ``hours`` hourly times ending at ``end_ms``, inserted hour by hour (time order)."""
    start_ms = end_ms - (hours - 1) * MS_PER_HOUR
    started = time.perf_counter()
    if layout == "new":
        await conn.execute(
            "INSERT INTO series (product_key, device_key, point)"
            " SELECT $1, 'dev' || d, 'p' || p FROM generate_series(0, $2 - 1) d, generate_series(0, 9) p",
            PRODUCT,
            devices,
        )
        await ensure_buckets(conn, range(start_ms // MS_PER_DAY, end_ms // MS_PER_DAY + 1), MS_PER_DAY)
        statement = """
            INSERT INTO points (series_id, ts, received_at, value_num)
            SELECT s.id, t, t, random() * 100 FROM series s,
                   generate_series(to_timestamp($1 / 1000.0), to_timestamp($2 / 1000.0), interval '1 hour') t"""
    else:
        statement = """
            INSERT INTO point_data (product_key, device_key, point, ts, received_at, value_num)
            SELECT 'bench01', 'dev' || d, 'p' || p, t, t, random() * 100
            FROM generate_series(to_timestamp($1 / 1000.0), to_timestamp($2 / 1000.0), interval '1 hour') t,
                 generate_series(0, $3 - 1) d, generate_series(0, 9) p"""
    day_hours = 24
    for first in range(0, hours, day_hours):
        lo = start_ms + first * MS_PER_HOUR
        hi = start_ms + (min(first + day_hours, hours) - 1) * MS_PER_HOUR
        if layout == "new":
            await conn.execute(statement, lo, hi)
        else:
            await conn.execute(statement, lo, hi, devices)
    if layout == "new":
        await conn.execute(
            "INSERT INTO points_latest (series_id, ts, received_at, value_num)"
            " SELECT series_id, ts, received_at, value_num FROM points WHERE ts = to_timestamp($1 / 1000.0)",
            end_ms,
        )
    await conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - started


async def timed(run: Callable[[], Awaitable[Any]], repeat: int = 21) -> tuple[float, float]:
    """Median and fastest milliseconds of ``repeat`` runs after one warm-up (the fastest shows the query
    without the machine's other load)."""
    await run()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        await run()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples), min(samples)


async def history_queries(conn: asyncpg.Connection, layout: str, end_ms: int, hours: int) -> dict[str, float]:
    day_lo = end_ms - 3 * MS_PER_DAY
    if layout == "new":
        latest = "SELECT point, ts, value FROM measurepoints_latest WHERE product_key = $1 AND device_key = $2"
    else:
        # today's layout has no latest table: one index probe per point of the device
        latest = """
            SELECT p.point, l.ts, l.value_num FROM (SELECT DISTINCT point FROM point_data
                WHERE product_key = $1 AND device_key = $2) p
            CROSS JOIN LATERAL (SELECT ts, value_num FROM point_data d WHERE d.product_key = $1
                AND d.device_key = $2 AND d.point = p.point ORDER BY ts DESC LIMIT 1) l"""
    table = "measurepoints" if layout == "new" else "point_data"
    day = (
        f"SELECT ts, value_num FROM {table} WHERE product_key = $1 AND device_key = $2 AND point = 'p3'"  # noqa: S608
        " AND ts >= to_timestamp($3 / 1000.0) AND ts < to_timestamp($3 / 1000.0) + interval '1 day'"
    )
    got_latest = await conn.fetch(latest, PRODUCT, "dev7")
    got_day = await conn.fetch(day, PRODUCT, "dev7", day_lo)
    assert len(got_latest) == POINTS and len(got_day) == 24, (len(got_latest), len(got_day))
    result: dict[str, float] = {}
    result["latest_one_device_ms"], result["latest_one_device_min_ms"] = await timed(
        lambda: conn.fetch(latest, PRODUCT, "dev7")
    )
    result["one_day_one_point_ms"], result["one_day_one_point_min_ms"] = await timed(
        lambda: conn.fetch(day, PRODUCT, "dev7", day_lo)
    )
    oldest_day = (end_ms - (hours - 1) * MS_PER_HOUR) // MS_PER_DAY * MS_PER_DAY
    started = time.perf_counter()
    if layout == "new":
        name = await conn.fetchval(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'points'::regclass AND c.relname <> 'points_default' ORDER BY c.relname LIMIT 1"
        )
        await conn.execute(f'DROP TABLE "{name}"')
    else:
        await conn.execute("DELETE FROM point_data WHERE ts < to_timestamp($1 / 1000.0) + interval '1 day'", oldest_day)
    result["drop_day_ms"] = (time.perf_counter() - started) * 1000
    return result


async def explain(conn: asyncpg.Connection, end_ms: int) -> dict[str, str]:
    """The plans of docs/analytics.md's queries, time bounds as constants (as Grafana's $__timeFilter writes them)."""

    def ago(days: int) -> str:
        return to_datetime(end_ms - days * MS_PER_DAY).strftime("'%Y-%m-%d %H:%M:%S+00'")

    bounds = {"day_ago": ago(1), "week_ago": ago(7), "month_ago": ago(30)}
    plans = {}
    await conn.execute("SET jit = off")
    for title, sql in EXPLAIN_QUERIES.items():
        await conn.fetch(sql.format(**bounds))  # once, so the plan shows a warm session
        rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, SUMMARY ON) " + sql.format(**bounds))
        plans[title] = "\n".join(r[0] for r in rows)
    return plans


async def main(args: argparse.Namespace) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="pointgate-storage-bench-"))
    scratch.chmod(0o755)
    server = None
    admin_dsn: str
    if args.database_url:
        admin_dsn = args.database_url
    else:
        server = EmbeddedPostgres(scratch / "db", durable=True)
        admin_dsn = server.start()
    result: dict[str, Any] = {"args": vars(args)}
    try:
        admin = await asyncpg.connect(admin_dsn)
        result["server"] = await admin.fetchval("SHOW server_version")
        for name in DATABASES:
            await admin.execute(f"DROP DATABASE IF EXISTS {name}")
            await admin.execute(f"CREATE DATABASE {name}")

        def dsn(name: str) -> str:
            return urlunsplit(urlsplit(admin_dsn)._replace(path=f"/{name}"))

        start_ms = int(time.time() * 1000) - 2 * MS_PER_DAY
        # one round before the clock starts: the new layout creates its series ids and partitions once
        warm = live_rows(args.devices * POINTS, args.devices, start_ms - 10_000)[0]
        workloads = {"live": live_rows(args.points, args.devices, start_ms)[0]}
        if args.resume:
            workloads["resume"] = resume_rows(args.points, args.devices, start_ms)
        for mode, rows in workloads.items():
            print(
                f"ingest ({mode}): {len(rows):,} points, {args.devices} devices × {POINTS} points,"
                f" batches of {args.batch}",
                file=sys.stderr,
            )
            suffix = "" if mode == "live" else f"_{mode}"
            result[f"ingest_old{suffix}"] = await ingest_old(dsn(f"bench_old{suffix}"), rows, args.batch, warm, scratch)
            result[f"ingest_new{suffix}"] = await ingest_new(dsn(f"bench_new{suffix}"), rows, args.batch, warm)

        hours = args.history_rows // (args.history_devices * POINTS)
        end_ms = int(time.time() * 1000) // MS_PER_HOUR * MS_PER_HOUR
        for layout in ("new", "old") if not args.skip_old_history else ("new",):
            db = dsn(f"hist_{layout}")
            conn = await asyncpg.connect(db)
            try:
                migrations = migrations_dir() if layout == "new" else old_migrations(scratch / "old-migrations")
                await apply_migrations(conn, migrations)
                print(
                    f"history ({layout}): {args.history_devices} devices × {POINTS} points × {hours} hours",
                    file=sys.stderr,
                )
                build_s = await build_history(conn, layout, args.history_devices, hours, end_ms)
                table = "points" if layout == "new" else "point_data"
                count = await conn.fetchval(f"SELECT count(*) FROM {table}")  # noqa: S608
                size = await conn.fetchval(
                    "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0) FROM pg_inherits"
                    " WHERE inhparent = 'points'::regclass"
                    if layout == "new"
                    else "SELECT pg_total_relation_size('point_data')"
                )
                entry = {"rows": count, "build_s": build_s, "bytes_per_point": size / count}
                if args.explain and layout == "new":
                    result["plans"] = await explain(conn, end_ms)
                entry |= await history_queries(conn, layout, end_ms, hours)
                result[f"history_{layout}"] = entry
            finally:
                await conn.close()
        for name in DATABASES:
            await admin.execute(f"DROP DATABASE IF EXISTS {name}")
        await admin.close()
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def report(result: dict[str, Any]) -> None:
    old, new = result["ingest_old"], result["ingest_new"]
    hn, ho = result["history_new"], result.get("history_old", {})

    def fmt(value: float | None, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    def both(entry: dict[str, float], name: str) -> str:
        if f"{name}_ms" not in entry:
            return "—"
        return f"{entry[f'{name}_ms']:.2f} / {entry[f'{name}_min_ms']:.2f}"

    lines = [
        ("measure", "today (point_data)", "new layout", "target"),
        (
            "backend CPU µs per point (new: latest values maintained)",
            fmt(old["cpu_us_per_point"], ".2f"),
            fmt(new["cpu_us_per_point"], ".2f"),
            "≤ 5",
        ),
        *(
            [
                (
                    "  same, resume traffic (50 times per series per batch)",
                    fmt(result["ingest_old_resume"]["cpu_us_per_point"], ".2f"),
                    fmt(result["ingest_new_resume"]["cpu_us_per_point"], ".2f"),
                    "≤ 5",
                )
            ]
            if "ingest_new_resume" in result
            else []
        ),
        (
            "ingest points/s (one connection, wall)",
            fmt(old["points_per_s"], ",.0f"),
            fmt(new["points_per_s"], ",.0f"),
            "",
        ),
        (
            "bytes on disk per point, ingest table (table + indexes)",
            fmt(old["bytes_per_point"], ".1f"),
            fmt(new["bytes_per_point"], ".1f"),
            "≤ 100",
        ),
        (
            f"bytes per point, {hn['rows']:,}-row history table",
            fmt(ho.get("bytes_per_point"), ".1f"),
            fmt(hn["bytes_per_point"], ".1f"),
            "≤ 100",
        ),
        (
            "latest values of one device, ~1 year of history (ms, median / fastest)",
            both(ho, "latest_one_device"),
            both(hn, "latest_one_device"),
            "< 5",
        ),
        (
            "one day of one point (ms, median / fastest)",
            both(ho, "one_day_one_point"),
            both(hn, "one_day_one_point"),
            "< 20",
        ),
        (
            "retention of a day (ms; today: DELETE, new: DROP TABLE)",
            fmt(ho.get("drop_day_ms"), ".1f"),
            fmt(hn["drop_day_ms"], ".1f"),
            "< 1000, no DELETE",
        ),
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    print(f"PostgreSQL {result['server']}")
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    for title, plan in result.get("plans", {}).items():
        print(f"\n-- {title}\n{plan}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=500_000, help="points written per layout in the ingest test")
    parser.add_argument("--devices", type=int, default=1000, help="devices in the ingest test (10 points each)")
    parser.add_argument("--resume", action="store_true", help="also ingest resume traffic (a backlog per device)")
    parser.add_argument("--batch", type=int, default=5000, help="points per write statement")
    parser.add_argument("--history-rows", type=int, default=20_000_000, help="rows in the history table")
    parser.add_argument("--history-devices", type=int, default=228, help="devices in the history table")
    parser.add_argument("--skip-old-history", action="store_true", help="build the history in the new layout only")
    parser.add_argument("--explain", action="store_true", help="print the plans of docs/analytics.md's queries")
    parser.add_argument("--database-url", help="an existing PostgreSQL (superuser); default: embedded, durable")
    parser.add_argument("--json", type=Path, help="append the JSON line to this file instead of stdout")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    outcome = asyncio.run(main(arguments))
    report(outcome)
    line = json.dumps(outcome, default=str)
    if arguments.json:
        with arguments.json.open("a") as out:
            out.write(line + "\n")
    else:
        print(line)
