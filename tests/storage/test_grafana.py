"""The Grafana data source and dashboard: files consistent with docker-compose.yml, and every query they hold
run for real as the read-only analytics role against a real PostgreSQL (Grafana's macros expanded)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from service.pipeline import Row
from service.storage.embedded import find_bindir
from service.storage.writer import PointWriter

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "pointgate.json"
DATASOURCE = GRAFANA / "provisioning" / "datasources" / "pointgate.yml"
PROVIDER = GRAFANA / "provisioning" / "dashboards" / "pointgate.yml"
NOW = int(time.time() * 1000)


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def datasource() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(DATASOURCE.read_text())["datasources"][0]
    return data


def compose_grafana() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["grafana"]
    return data


def queries() -> list[tuple[str, str]]:
    """(where, SQL) of every panel target and template variable."""
    found = [(f"panel {p['title']!r}", t["rawSql"]) for p in dashboard()["panels"] for t in p["targets"]]
    found += [(f"variable ${v['name']}", v["query"]) for v in dashboard()["templating"]["list"]]
    return found


def test_dashboard_is_well_formed() -> None:
    """Unique panel ids, positions, a stable uid, and the panels the issue asks for."""
    data = dashboard()
    assert data["uid"] == "pointgate-points" and isinstance(data["schemaVersion"], int)
    panels = data["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"] and all(t["rawSql"].strip() for t in panel["targets"])
    titles = {p["title"] for p in panels}
    assert {"Points per device", "Latest values", "Ingest rate"} <= titles


def test_everything_uses_the_provisioned_data_source() -> None:
    """Every panel, target and variable names the data source uid the provisioning file creates."""
    uid = datasource()["uid"]
    data = dashboard()
    refs = [p["datasource"] for p in data["panels"]]
    refs += [t["datasource"] for p in data["panels"] for t in p["targets"]]
    refs += [v["datasource"] for v in data["templating"]["list"]]
    assert refs and all(ref == {"type": datasource()["type"], "uid": uid} for ref in refs)


def test_compose_mounts_the_provisioning_and_sets_its_variables() -> None:
    """docker-compose.yml mounts ./grafana where Grafana and the provider look, and sets every ${VAR} used."""
    service = compose_grafana()
    mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"] if v.startswith("./")}
    assert (ROOT / mounts["/etc/grafana/provisioning"]).resolve() == (GRAFANA / "provisioning").resolve()
    provider_path = yaml.safe_load(PROVIDER.read_text())["providers"][0]["options"]["path"]
    assert (ROOT / mounts[provider_path]).resolve() == DASHBOARD.parent.resolve()
    used = set(re.findall(r"\$\{(\w+)\}", DATASOURCE.read_text()))
    assert used and used <= set(service["environment"])
    assert service["environment"]["POINTGATE_GRAFANA_DB_USER"] == "grafana"


def expand(sql: str) -> str:
    """Grafana's PostgreSQL macros and this dashboard's variables, as Grafana would expand them."""
    start, end = "'2000-01-01T00:00:00Z'", "'2100-01-01T00:00:00Z'"
    sql = re.sub(r"\$__timeFilter\((\w+)\)", rf"\1 BETWEEN {start} AND {end}", sql)
    sql = re.sub(r"\$__timeGroupAlias\((\w+),\s*\$__interval\)", r"date_bin('1 minute', \1, 'epoch') AS time", sql)
    sql = sql.replace("$__interval_ms", "60000")
    sql = sql.replace("$product", "'inverter01'").replace("$device", "'d1','d2'").replace("$point", "'temp'")
    assert "$" not in sql, f"unexpanded macro in {sql}"
    return sql


async def _fill(dsn: str) -> None:
    writer = PointWriter(dsn, maintenance=False)
    writer.start()
    try:
        rows = [
            Row("inverter01", f"d{d}", p, NOW - i * 60_000, float(i), None, NOW)
            for d in (1, 2)
            for p in ("temp", "Power")
            for i in range(30)
        ]
        await asyncio.wait_for(writer.submit(rows), 20)
    finally:
        await writer.close()


@pytest.mark.parametrize(("where", "sql"), queries())
async def test_query_runs_as_the_analytics_role(migrated_dsn: str, where: str, sql: str) -> None:
    """Each query returns rows for pointgate_analytics: valid SQL, allowed by the read-only grants."""
    await _fill(migrated_dsn)
    conn = await asyncpg.connect(migrated_dsn)
    try:
        await conn.execute("SET ROLE pointgate_analytics")
        rows = await conn.fetch(expand(sql))
        assert rows, f"{where} returned nothing"
    finally:
        await conn.close()


def test_analytics_login_script_makes_a_read_only_login(migrated_dsn: str) -> None:
    """grafana/analytics-login.sql (run by compose with psql) creates a login in pointgate_analytics; twice is fine."""
    psql = find_bindir() / "psql"
    script = GRAFANA / "analytics-login.sql"
    for _ in range(2):
        result = subprocess.run(
            [
                str(psql),
                migrated_dsn,
                "--set=ON_ERROR_STOP=1",
                "--set=user=grafana_t",
                "--set=password=pw",
                f"--file={script}",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr

    async def check() -> None:
        conn = await asyncpg.connect(migrated_dsn)
        try:
            member = await conn.fetchval("SELECT pg_has_role('grafana_t', 'pointgate_analytics', 'MEMBER')")
            can_login = await conn.fetchval("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'grafana_t'")
            writes = await conn.fetchval("SELECT has_table_privilege('grafana_t', 'points', 'INSERT')")
            assert (member, can_login, writes) == (True, True, False)
        finally:
            await conn.execute("DROP ROLE IF EXISTS grafana_t")  # roles outlive the test database
            await conn.close()

    asyncio.run(check())
