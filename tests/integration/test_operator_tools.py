"""Operator tools against a real pointgate and PostgreSQL (issue 13): refused requests kept and replayed, thing
models reloaded live, and the status page in a real headless browser."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from service.cli.main import app
from service.resources import schemas_dir
from tests.support import SAMPLE, Device, RunningService, fetch, resume_topic

TOPIC = resume_topic()


def with_point(
    point: str, value: object, *, request_id: str = "r1", time_ms: int = 1_700_000_000_000
) -> dict[str, Any]:
    return {
        "id": request_id,
        "version": "1.0",
        "method": "thing.measurepoint.resume",
        "params": {"measurepoints": {point: value}, "time": time_ms},
    }


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """A models directory of our own (a copy of schemas/), so a test can fix or break a model."""
    target = tmp_path / "models"
    shutil.copytree(schemas_dir(), target)
    return target


def add_point(models: Path, point: str, data_type: str) -> None:
    path = models / "inverter01.json"
    model = json.loads(path.read_text())
    model["measurepoints"][point] = {"dataType": data_type}
    path.write_text(json.dumps(model))


def cli(running: RunningService, *args: str) -> Result:
    env = {"POINTGATE_DATABASE_URL": running.service.dsn, "POINTGATE_MODELS": str(running.settings.models)}
    return CliRunner().invoke(app, list(args), env=env)


def kept_rows(dsn: str, count: int, timeout: float = 10) -> list[Any]:
    """The kept refusals once ``count`` of them are written (the store writes asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = fetch(dsn, "SELECT * FROM rejected_messages ORDER BY id")
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


@pytest.fixture
def device(service: RunningService) -> Any:
    dev = Device(service.port, "dev1")
    assert dev.connect() == 0
    yield dev
    dev.close()


@pytest.fixture
def service(start_service: Callable[..., RunningService], models: Path) -> RunningService:
    """A service on our own models directory, listening for `model reload` (a NOTIFY sent before its LISTEN is
    lost: the command would rightly say that no serve answered)."""
    running = start_service(models=models)
    presence = running.service.presence
    assert presence is not None
    running.call(asyncio.wait_for(presence.listening.wait(), 10))
    return running


def test_refused_requests_are_kept_listed_shown_and_replayed(
    service: RunningService, device: Device, models: Path, migrated_dsn: str
) -> None:
    """A 1204 for a point the model lacks is kept; after the model is fixed, replay stores it with its own time;
    a request that is still wrong is reported, with exit 1."""
    first = with_point("windSpeed", 7.5, request_id="w1")
    assert device.request(TOPIC, first)["code"] == 1204
    assert device.request(TOPIC, with_point("temp", "hot", request_id="t1"))["code"] == 1204
    rows = kept_rows(migrated_dsn, 2)
    assert [(r["code"], r["product_key"], r["device_key"], r["topic"]) for r in rows] == [
        (1204, "inverter01", "dev1", TOPIC)
    ] * 2
    assert "windSpeed" in rows[0]["reason"] and json.loads(rows[0]["payload"]) == first

    listed = cli(service, "rejected", "list", "--json")
    assert listed.exit_code == 0, listed.output
    summaries = json.loads(listed.stdout)
    assert [s["id"] for s in summaries] == [rows[1]["id"], rows[0]["id"]]  # newest first
    assert "payload" not in summaries[0]
    shown = cli(service, "rejected", "show", str(rows[0]["id"]), "--json")
    assert json.loads(json.loads(shown.stdout)[0]["payload"]) == first

    add_point(models, "windSpeed", "FLOAT")
    replayed = cli(service, "rejected", "replay", "--models", str(models))
    assert replayed.exit_code == 1  # the "hot" temperature is still wrong
    assert f"{rows[1]['id']}: still refused: 1204" in replayed.stdout
    assert "2 replayed: 1 stored (1 points), 1 still refused" in replayed.stderr
    stored = fetch(migrated_dsn, "SELECT value_num, ts FROM measurepoints WHERE point = 'windSpeed'")
    assert [(r["value_num"], int(r["ts"].timestamp() * 1000)) for r in stored] == [(7.5, 1_700_000_000_000)]
    again = cli(service, "rejected", "list", "--pending", "--json")
    assert [s["id"] for s in json.loads(again.stdout)] == [rows[1]["id"]]
    missing = cli(service, "rejected", "show", "999999")
    assert missing.exit_code == 1 and missing.stderr.startswith("pointgate: error: no refused request kept")


def test_keeping_can_be_switched_off_and_payloads_are_bounded(
    start_service: Callable[..., RunningService], migrated_dsn: str
) -> None:
    """keep_rejected=false keeps nothing; rejected_payload_bytes cuts long payloads (those cannot be replayed)."""
    off = start_service(keep_rejected=False)
    dev = Device(off.port, "dev1")
    assert dev.connect() == 0
    try:
        assert dev.request(TOPIC, with_point("nope", 1))["code"] == 1204
    finally:
        dev.close()
    assert off.service.rejected is not None and off.service.rejected.counts[1204] >= 1  # counted, not kept

    short = start_service(rejected_payload_bytes=40)
    dev = Device(short.port, "dev1")
    assert dev.connect() == 0
    try:
        assert dev.request(TOPIC, with_point("nope", 1))["code"] == 1204
    finally:
        dev.close()
    [row] = kept_rows(migrated_dsn, 1)  # only this service's: the first one kept nothing
    assert len(row["payload"]) == 40 and row["truncated"] and row["payload_bytes"] > 40
    result = cli(short, "rejected", "replay")
    assert result.exit_code == 1 and "cannot replay" in result.stdout


def test_kept_refusals_are_bounded_by_count_and_age(
    start_service: Callable[..., RunningService], migrated_dsn: str
) -> None:
    """Pruning keeps at most rejected_max_count rows and none older than rejected_max_age."""
    running = start_service(rejected_max_count=3, rejected_max_age="1h")
    dev = Device(running.port, "dev1")
    assert dev.connect() == 0
    try:
        for i in range(5):
            assert dev.request(TOPIC, with_point("nope", i, request_id=f"n{i}"))["code"] == 1204
    finally:
        dev.close()
    rows = kept_rows(migrated_dsn, 5)
    fetch(
        migrated_dsn,
        "UPDATE rejected_messages SET received_at = now() - interval '2 hours' WHERE id = $1",
        rows[-1]["id"],
    )
    store = running.service.rejected
    assert store is not None
    running.call(store._prune())
    left = [r["id"] for r in fetch(migrated_dsn, "SELECT id FROM rejected_messages ORDER BY id")]
    assert left == [rows[1]["id"], rows[2]["id"], rows[3]["id"]]  # the newest is too old; then the newest three


def test_models_reload_live_without_dropping_the_connection(
    service: RunningService, device: Device, models: Path
) -> None:
    """`model reload`: the running serve takes the new set; the same connection now gets 200 for the new point."""
    assert device.request(TOPIC, with_point("windSpeed", 3.0))["code"] == 1204
    add_point(models, "windSpeed", "FLOAT")
    result = cli(service, "model", "reload")
    assert result.exit_code == 0, result.output
    assert re.search(r": reloaded: 2 thing model\(s\) loaded", result.stdout)
    assert device.request(TOPIC, with_point("windSpeed", 3.0), subscribe=False)["code"] == 200
    assert not device.disconnected.is_set()


def test_a_reload_reaches_event_posts_too(service: RunningService, device: Device, models: Path) -> None:
    """Events are checked against the reloaded models as well: an event added to a model is accepted at once."""
    topic = "/sys/inverter01/dev1/thing/event/gust/post"
    post = {"id": "g1", "version": "1.0", "method": "thing.event.gust.post", "params": {"events": {"speed": 31.5}}}
    assert device.request(topic, post)["code"] == 1204
    path = models / "inverter01.json"
    model = json.loads(path.read_text())
    model["events"]["gust"] = {"eventType": "WARN", "outputData": [{"identifier": "speed", "dataType": "FLOAT"}]}
    path.write_text(json.dumps(model))
    assert cli(service, "model", "reload").exit_code == 0
    assert device.request(topic, post, subscribe=False)["code"] == 200


def test_an_invalid_model_set_is_refused_and_the_old_one_kept(
    service: RunningService, device: Device, models: Path
) -> None:
    """A broken file: `model reload` refuses before asking; the serve's own reload refuses too, keeps the old
    models, and /readyz shows why (as a note: the service keeps working)."""
    (models / "broken.json").write_text('{"productKey": "broken", "measurepoints": {"x": {"dataType": "NOPE"}}}')
    refused = cli(service, "model", "reload")
    assert refused.exit_code == 2 and "broken.json" in refused.stderr and "not reloaded" in refused.stderr
    ok, reason = service.call(service.service.reload_models())
    assert not ok and "broken.json" in reason
    with urllib.request.urlopen(f"http://127.0.0.1:{service.http_port}/readyz", timeout=3) as response:
        body = json.loads(response.read())
    assert response.status == 200 and "broken.json" in body["notes"]["models_reload"]
    assert device.request(TOPIC, SAMPLE)["code"] == 200  # the previous models still answer
    (models / "broken.json").unlink()
    assert service.call(service.service.reload_models())[0]
    with urllib.request.urlopen(f"http://127.0.0.1:{service.http_port}/readyz", timeout=3) as response:
        assert "notes" not in json.loads(response.read())


def test_model_reload_without_a_running_serve_says_so(migrated_dsn: str) -> None:
    """Nobody listening: exit 1 and a line saying no serve answered."""
    result = CliRunner().invoke(app, ["model", "reload", "--database-url", migrated_dsn, "--wait", "0.5"])
    assert result.exit_code == 1 and "no running serve answered" in result.stderr


@pytest.mark.slow
def test_sighup_reloads_the_models_of_a_serve_process(migrated_dsn: str, tmp_path: Path, models: Path) -> None:
    """SIGHUP makes a serve process re-read its models."""
    log = tmp_path / "serve.log"
    env = {**os.environ, "POINTGATE_LOG_FORMAT": "json", "POINTGATE_DATABASE_URL": migrated_dsn}
    args = ["serve", "--mqtt-bind", "127.0.0.1:0", "--http-bind", "127.0.0.1:0", "--data-dir", str(tmp_path / "d")]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", *args, "--models", str(models)], env=env, stdout=out, stderr=out
        )
    try:
        assert _wait_for_line(log, "pointgate started", proc)
        add_point(models, "windSpeed", "FLOAT")
        proc.send_signal(signal.SIGHUP)
        line = _wait_for_line(log, "thing models reloaded", proc)
        assert line is not None and json.loads(line)["models"] == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _wait_for_line(log: Path, event: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if f'"event": "{event}"' in line or f'"event":"{event}"' in line:
                return line
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    return None


# --- the status page in a real browser --------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def browse(url: str) -> tuple[str, str]:
    """The DOM of ``url`` as headless chromium rendered it, and chromium's log (console messages included)."""
    assert CHROMIUM is not None
    profile = tempfile.mkdtemp(prefix="pointgate-chromium-")
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--dump-dom",
        url,
    ]
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=90, check=False)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, result.stderr


def figure(dom: str, element_id: str) -> float:
    match = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert match is not None, element_id
    return float(match.group(1).replace(",", ""))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_status_page_in_a_headless_browser(service: RunningService, device: Device) -> None:
    """/ loads in chromium without console errors and shows live figures after
    traffic: connected devices, message and point rates, refusals by code with the latest example, models."""
    for i in range(20):
        assert device.request(TOPIC, {**SAMPLE, "id": f"s{i}"}, subscribe=i == 0)["code"] == 200
    assert device.request(TOPIC, with_point("windSpeed", 1.0), subscribe=False)["code"] == 1204
    service.service.rates.sample()  # a sample after the traffic (the service takes one every second)
    url = f"http://127.0.0.1:{service.http_port}/"
    dom, log = browse(url)
    assert "<title>pointgate" in dom
    assert figure(dom, "connected") >= 1
    assert figure(dom, "msg-rate") > 0 and figure(dom, "point-rate") > 0
    assert figure(dom, "messages-total") >= 21 and figure(dom, "points-total") >= 60
    rejections = dom[dom.index('id="rejections"') :]
    assert "<td>1204</td>" in rejections and "inverter01/dev1" in rejections and "windSpeed" in rejections
    models = dom[dom.index('id="models"') :]
    assert "inverter01" in models and "allTypes01" in models
    console = [line for line in log.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == [], console


def test_status_page_is_plain_html_with_no_script(service: RunningService) -> None:
    """The page needs no build step and no JavaScript: server-rendered HTML, no <script>, refreshes itself."""
    with urllib.request.urlopen(f"http://127.0.0.1:{service.http_port}/", timeout=3) as response:
        body = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/html")
    assert "<script" not in body.lower() and 'http-equiv="refresh"' in body
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{service.http_port}/favicon.ico", timeout=3)
    except urllib.error.HTTPError as exc:
        assert exc.code == 404  # and the page asks for none (its icon is inline)
    assert '<link rel="icon" href="data:,">' in body
