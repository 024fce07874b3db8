"""What operators see after real traffic: metrics, the readiness body, and logs."""

from __future__ import annotations

import json
import re
import urllib.request

from tests.integration.test_process import Pointgate
from tests.support import SAMPLE, Device, RunningService, resume_topic

TOPIC = resume_topic()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as response:
        return str(response.read().decode())


def value(metrics: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    for line in metrics.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        match = re.match(r"^([a-z_]+)(\{[^}]*\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return 0.0


def test_metrics_count_real_traffic(service: RunningService, device: Device) -> None:
    """After real requests /metrics counts accepted and rejected messages by code, points written and devices."""
    before = scrape(service.http_port)
    assert device.request(TOPIC, SAMPLE)["code"] == 200
    assert device.request(TOPIC, b"not json", subscribe=False)["code"] == 1220
    after = scrape(service.http_port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("pointgate_messages_total", api="resume", outcome="accepted", code="200") == 1
    assert delta("pointgate_messages_total", api="resume", outcome="rejected", code="1220") == 1
    assert delta("pointgate_points_written_total") == 3
    assert delta("pointgate_replies_total", code="200") == 1
    assert delta("pointgate_write_seconds_count") >= 1
    assert value(after, "pointgate_connected_devices") >= 1
    assert value(after, "pointgate_models_loaded") == 2
    assert 'pointgate_build_info{version="' in after
    assert "dev1" not in after  # no device ids as labels


def test_readyz_names_each_check(service: RunningService) -> None:
    """/readyz reports every check by name when all is well."""
    with urllib.request.urlopen(f"http://127.0.0.1:{service.http_port}/readyz", timeout=3) as response:
        body = json.loads(response.read())
    assert response.status == 200
    assert body == {"status": "ready", "checks": {"database": "ok", "migrations": "ok", "models": "ok", "mqtt": "ok"}}


def test_logs_say_where_it_listens_and_one_line_per_rejection(migrated_dsn: str, tmp_path: object) -> None:
    """JSON logs: start-up names listeners, database and model count; each rejection is one line with its facts."""
    from pathlib import Path

    process = Pointgate(migrated_dsn, Path(str(tmp_path)) / "data")
    try:
        process.wait_until("/readyz", 200)
        dev = Device(process.mqtt_port)
        assert dev.connect() == 0
        bad = {**SAMPLE, "params": {"measurepoints": {"temp": "hot"}}}
        assert dev.request(TOPIC, bad)["code"] == 1204
        dev.close()
    finally:
        process.proc.terminate()
        process.proc.wait(10)
        process.stop()
    lines = [json.loads(line) for line in process.log.read_text().splitlines() if line.startswith("{")]
    started = next(line for line in lines if line["event"] == "pointgate started")
    assert started["mqtt"] == f"127.0.0.1:{process.mqtt_port}" and started["models"] == 2
    assert started["database"] == "external"
    rejected = [line for line in lines if line["event"] == "request rejected"]
    assert len(rejected) == 1
    assert rejected[0]["product"] == "inverter01" and rejected[0]["device"] == "dev1"
    assert rejected[0]["code"] == 1204 and "temp: expected FLOAT" in rejected[0]["reason"]
    assert rejected[0]["topic"] == TOPIC and rejected[0]["level"] == "info"
    # the payload itself is never logged at INFO, on that line or any other
    assert '"hot"' not in process.log.read_text() and "thing.measurepoint.resume" not in process.log.read_text()
