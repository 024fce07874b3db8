"""``pointgate storage status|maintain`` through typer against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from service.cli.main import app
from service.cli.storage import human_bytes
from service.pipeline import Row
from service.storage.partitions import MS_PER_DAY, Policy, partition_name
from service.storage.writer import PointWriter

TODAY = int(time.time() * 1000) // MS_PER_DAY * MS_PER_DAY


def run(dsn: str, tmp_path: Path, *args: str, **env: str) -> Result:
    environment = {"POINTGATE_DATABASE_URL": dsn, "POINTGATE_DATA_DIR": str(tmp_path / "data"), **env}
    return CliRunner().invoke(app, ["storage", *args], env=environment)


async def write(dsn: str, days_back: int) -> None:
    writer = PointWriter(dsn, maintenance=False, policy=Policy(backfill=timedelta(days=30)))
    writer.start()
    try:
        rows = [
            Row("inverter01", "d1", "temp", TODAY - d * MS_PER_DAY + 5, float(d), None, 0) for d in range(days_back)
        ]
        await asyncio.wait_for(writer.submit(rows), 20)
    finally:
        await writer.close()


def test_status_shows_partitions_sizes_and_estimates(migrated_dsn: str, tmp_path: Path) -> None:
    """A table of partitions (default first) with ranges and sizes, then totals; --json carries the same."""
    asyncio.run(write(migrated_dsn, 3))
    result = run(migrated_dsn, tmp_path, "status")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("points partitioned by device time: width 1d, 3 ahead")
    assert "retention off" in lines[0]
    assert lines[1].split() == ["PARTITION", "FROM", "(UTC)", "TO", "(UTC)", "SIZE", "ROWS", "(EST.)"]
    assert lines[2].startswith("points_default") and "default" in lines[2]
    assert any(line.startswith(partition_name(TODAY)) for line in lines)
    assert "1 series" in lines[-1] or "1 series" in lines[-2]

    as_json = json.loads(run(migrated_dsn, tmp_path, "status", "--json").stdout)
    names = [p["name"] for p in as_json["partitions"]]
    assert names[0] == "points_default" and partition_name(TODAY - 2 * MS_PER_DAY) in names
    assert as_json["policy"] == {
        "partitionWidth": "1d",
        "partitionsAhead": 3,
        "partitionBackfill": "365d",
        "retention": None,
    }
    assert as_json["series"] == 1 and as_json["latest"]["rows"] == 1
    assert all(p["bytes"] > 0 for p in as_json["partitions"])


def test_maintain_creates_ahead_and_drops_past_retention(migrated_dsn: str, tmp_path: Path) -> None:
    """maintain creates today's and the next partitions; with retention 1d it drops the older days."""
    asyncio.run(write(migrated_dsn, 4))
    result = run(migrated_dsn, tmp_path, "maintain", POINTGATE_RETENTION="1d", POINTGATE_PARTITIONS_AHEAD="2")
    assert result.exit_code == 0, result.output
    assert f"created {partition_name(TODAY + 2 * MS_PER_DAY)}" in result.stdout
    for days in (2, 3):
        assert f"dropped {partition_name(TODAY - days * MS_PER_DAY)}" in result.stdout
    assert f"dropped {partition_name(TODAY - MS_PER_DAY)}" not in result.stdout
    names = [p["name"] for p in json.loads(run(migrated_dsn, tmp_path, "status", "--json").stdout)["partitions"]]
    assert partition_name(TODAY - 3 * MS_PER_DAY) not in names and partition_name(TODAY - MS_PER_DAY) in names


def test_status_on_an_unmigrated_database_says_what_to_do(pg_dsn: str, tmp_path: Path) -> None:
    """Before `pointgate migrate`: exit 2 with one line naming the command to run, no traceback."""
    result = run(pg_dsn, tmp_path, "status")
    assert result.exit_code == 2
    assert result.stderr.startswith("pointgate: error: the schema is not current")
    assert "run `pointgate migrate`" in result.stderr and "Traceback" not in result.output


def test_bad_retention_is_one_line_and_exit_2(migrated_dsn: str, tmp_path: Path) -> None:
    """A retention shorter than a partition is refused before touching the database."""
    result = run(migrated_dsn, tmp_path, "status", POINTGATE_RETENTION="2h")
    assert result.exit_code == 2
    assert "retention must be at least one partition width" in result.stderr


@pytest.mark.parametrize(
    ("size", "text"), [(0, "0 bytes"), (1023, "1023 bytes"), (8192, "8.0 kB"), (5 * 1024**3, "5.0 GB")]
)
def test_human_bytes(size: int, text: str) -> None:
    """Sizes read like pg_size_pretty's."""
    assert human_bytes(size) == text
