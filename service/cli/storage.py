"""``pointgate storage …``: what the points table holds (``status``) and partition upkeep on demand (``maintain``).

``status`` reads the catalog only (sizes and the planner's row estimates, no ``count(*)`` over history), so it
answers in milliseconds on a table of billions of rows. ``maintain`` runs the pass ``serve`` runs every ten
minutes: create the partitions ahead, drop those past ``retention``.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
import typer

from service.cli.common import ConfigOpt, DatabaseOpt, DataDirOpt, JsonOpt, guard, remember, settings_from
from service.errors import ConfigError
from service.resources import migrations_dir
from service.settings import Settings, format_duration
from service.storage import database
from service.storage.migrate import pending_migrations
from service.storage.partitions import (
    PartitionStatus,
    Policy,
    maintain,
    policy_from_settings,
    status,
    to_datetime,
)

app = typer.Typer(help="The points table: partitions, sizes, retention.", no_args_is_help=True)


@dataclass(frozen=True)
class Report:
    """Everything ``storage status`` shows."""

    policy: Policy
    partitions: list[PartitionStatus]
    series: int
    latest_rows: int
    latest_bytes: int


@app.callback()
def storage_options(
    ctx: typer.Context, config: ConfigOpt = None, database_url: DatabaseOpt = None, data_dir: DataDirOpt = None
) -> None:
    """The points table: partitions, sizes, retention."""
    remember(ctx, config=config, database_url=database_url, data_dir=data_dir)


@app.command("status")
def status_command(
    ctx: typer.Context,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Show the partitions of the points table with their range, size on disk and estimated rows."""
    settings = settings_from(ctx, config=config, database_url=database_url, data_dir=data_dir)
    policy = _policy(settings)
    report = _run(settings, lambda conn: _report(conn, policy))
    if as_json:
        typer.echo(json.dumps(_report_json(report), indent=2))
        return
    for line in render(report):
        typer.echo(line)


@app.command("maintain")
def maintain_command(
    ctx: typer.Context, config: ConfigOpt = None, database_url: DatabaseOpt = None, data_dir: DataDirOpt = None
) -> None:
    """Create the partitions ahead and drop those past the retention, now (serve does it every 10 minutes)."""
    settings = settings_from(ctx, config=config, database_url=database_url, data_dir=data_dir)
    policy = _policy(settings)
    created, dropped = _run(settings, lambda conn: maintain(conn, policy, int(time.time() * 1000)))
    for partition in created:
        typer.echo(f"created {partition.name}")
    for partition in dropped:
        typer.echo(f"dropped {partition.name} (past retention {format_duration(policy.retention or policy.width)})")
    typer.echo(f"{len(created)} partition(s) created, {len(dropped)} dropped")


def render(report: Report) -> list[str]:
    """The human-readable table of ``storage status``."""
    policy = report.policy
    retention = "off" if policy.retention is None else format_duration(policy.retention)
    lines = [
        f"points partitioned by device time: width {format_duration(policy.width)}, {policy.ahead} ahead, "
        f"created on demand back to {format_duration(policy.backfill)}, retention {retention}"
    ]
    rows = [("PARTITION", "FROM (UTC)", "TO (UTC)", "SIZE", "ROWS (EST.)")]
    for p in report.partitions:
        rows.append(
            (
                p.name,
                "default" if p.lo_ms is None else _when(p.lo_ms),
                "" if p.hi_ms is None else _when(p.hi_ms),
                human_bytes(p.bytes),
                "?" if p.rows_estimate is None else f"{p.rows_estimate:,}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    total_bytes = sum(p.bytes for p in report.partitions)
    total_rows = sum(p.rows_estimate or 0 for p in report.partitions)
    lines.append(
        f"total: {len(report.partitions)} partition(s), {human_bytes(total_bytes)}, ~{total_rows:,} rows;"
        f" {report.series:,} series; latest values {report.latest_rows:,} rows, {human_bytes(report.latest_bytes)}"
    )
    if any(p.rows_estimate is None for p in report.partitions):
        lines.append("? = not analysed yet (autovacuum will, or run ANALYZE points)")
    return lines


def human_bytes(size: int) -> str:
    """``8192`` → ``8.0 kB`` (powers of 1024, as PostgreSQL's pg_size_pretty)."""
    value = float(size)
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _when(ms: int) -> str:
    return to_datetime(ms).strftime("%Y-%m-%d %H:%M")


def _report_json(report: Report) -> dict[str, Any]:
    policy = report.policy
    return {
        "policy": {
            "partitionWidth": format_duration(policy.width),
            "partitionsAhead": policy.ahead,
            "partitionBackfill": format_duration(policy.backfill),
            "retention": None if policy.retention is None else format_duration(policy.retention),
        },
        "partitions": [
            {
                "name": p.name,
                "from": None if p.lo_ms is None else to_datetime(p.lo_ms).isoformat(),
                "to": None if p.hi_ms is None else to_datetime(p.hi_ms).isoformat(),
                "bytes": p.bytes,
                "rowsEstimate": p.rows_estimate,
            }
            for p in report.partitions
        ],
        "series": report.series,
        "latest": {"rows": report.latest_rows, "bytes": report.latest_bytes},
    }


async def _report(conn: asyncpg.Connection, policy: Policy) -> Report:
    partitions = await status(conn)
    series = await conn.fetchval("SELECT count(*) FROM series")
    latest = await conn.fetchrow(
        "SELECT count(*) AS rows, pg_total_relation_size('points_latest') AS bytes FROM points_latest"
    )
    assert latest is not None
    return Report(policy, partitions, series, latest["rows"], latest["bytes"])


def _policy(settings: Settings) -> Policy:
    return guard(lambda: policy_from_settings(settings))


def _run(settings: Settings, operation: Any) -> Any:
    async def run() -> Any:
        async with database.connect(settings) as conn:
            pending = await pending_migrations(conn, migrations_dir())
            if pending:
                raise ConfigError(
                    f"the schema is not current ({len(pending)} migration(s) pending, first"
                    f" {pending[0].path.name}): run `pointgate migrate`"
                )
            return await operation(conn)

    return guard(lambda: asyncio.run(run()))
