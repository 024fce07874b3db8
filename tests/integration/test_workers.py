"""`pointgate serve --workers 2` as real processes: one port for both workers, one /metrics and /readyz for the
service, a worker killed with -9 replaced without losing anything acknowledged, SIGTERM draining every worker, and
MQTT take-over enforced across workers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.resources import schemas_dir
from tests.integration.test_process import Pointgate
from tests.support import Device, fetch, resume_topic

BASE_MS = 1_760_000_000_000
REQUEST = {"id": "1", "version": "1.0", "method": "thing.measurepoint.resume"}


@pytest.fixture
def workers(migrated_dsn: str, tmp_path: Path) -> Iterator[Pointgate]:
    """A ready `pointgate serve --workers 2` on the test database."""
    process = Pointgate(migrated_dsn, tmp_path / "data", POINTGATE_WORKERS="2")
    try:
        process.wait_until("/readyz", 200)
        yield process
    finally:
        _kill_all(process)


def _kill_all(process: Pointgate) -> None:
    # SIGTERM first, so the supervisor removes its metrics directory; then SIGKILL whatever is left, by pid
    if process.proc.poll() is None:
        process.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.proc.wait(20)
    for pid in _worker_pids(process).values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.stop()


def _log_lines(process: Pointgate) -> list[dict[str, Any]]:
    lines = []
    for raw in process.log.read_text().splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    return lines


def _worker_pids(process: Pointgate) -> dict[int, int]:
    """The current pid of each worker, from the supervisor's "worker started" lines."""
    return {line["worker"]: line["pid"] for line in _log_lines(process) if line.get("event") == "worker started"}


def _metrics(process: Pointgate) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{process.http_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _metric_sum(process: Pointgate, name: str, **labels: str) -> float:
    return sum(
        value
        for (sample, sample_labels), value in _metrics(process).items()
        if sample == name and all((k, v) in sample_labels for k, v in labels.items())
    )


def _devices_per_worker(process: Pointgate) -> dict[str, float]:
    return {
        dict(labels)["worker"]: value
        for (name, labels), value in _metrics(process).items()
        if name == "pointgate_worker_connected_devices"
    }


def _eventually(condition: Callable[[], bool], timeout: float = 15, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout} s")


class Publisher:
    """Device ``dev{n}`` sending one-point resume messages as fast as its window allows, recording acknowledgements."""

    def __init__(self, port: int, n: int, total: int) -> None:
        self.device_key = f"dev{n}"
        self.topic = resume_topic(dk=self.device_key)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.device_key, protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages_set(20)
        self.client.reconnect_delay_set(0.2, 1)  # type: ignore[arg-type]  # paho takes fractions of a second
        self.total = total
        self.mid_to_index: dict[int, int] = {}
        self.acked: set[int] = set()
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client.on_publish = self._on_publish
        self.client.on_connect = lambda client, *_: client.subscribe(self.topic + "_reply", 1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(10), "no SUBACK"

    def _on_publish(self, client: Any, userdata: Any, mid: int, *args: Any) -> None:
        with self.lock:
            self.acked.add(mid)

    def run(self) -> None:
        for index in range(self.total):
            payload = json.dumps(
                {
                    "id": str(index),
                    "version": "1.0",
                    "method": "thing.measurepoint.resume",
                    "params": {"measurepoints": {"temp": float(index)}, "time": BASE_MS + index},
                }
            )
            info = self.client.publish(self.topic, payload, qos=1)  # no lock held: paho calls back from its thread
            self.mid_to_index[info.mid] = index

    def acknowledged(self) -> set[int]:
        with self.lock:
            return {self.mid_to_index[mid] for mid in self.acked if mid in self.mid_to_index}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _stored(dsn: str) -> dict[str, set[int]]:
    sql = "SELECT device_key, (extract(epoch FROM ts) * 1000)::bigint - $1 AS i FROM measurepoints"
    rows = fetch(dsn, sql, BASE_MS)
    stored: dict[str, set[int]] = {}
    for row in rows:
        stored.setdefault(row["device_key"], set()).add(int(row["i"]))
    return stored


def _start_publishers(port: int, count: int, total: int) -> list[Publisher]:
    publishers = [Publisher(port, n, total) for n in range(count)]
    for publisher in publishers:
        threading.Thread(target=publisher.run, daemon=True).start()
    return publishers


def _acknowledged(publishers: list[Publisher]) -> int:
    return sum(len(p.acknowledged()) for p in publishers)


def _assert_nothing_acknowledged_lost(publishers: list[Publisher], dsn: str) -> None:
    stored = _stored(dsn)
    for publisher in publishers:
        missing = publisher.acknowledged() - stored.get(publisher.device_key, set())
        assert not missing, f"{publisher.device_key}: {len(missing)} acknowledged messages lost"


@pytest.mark.slow
def test_port_is_shared_and_metrics_count_across_workers(workers: Pointgate, migrated_dsn: str) -> None:
    """Connections land on both workers; /metrics counts every worker's messages and devices."""
    devices = [Device(workers.mqtt_port, f"dev{n}") for n in range(16)]
    try:
        for device in devices:
            assert device.connect() == 0
        for n, device in enumerate(devices):
            topic = resume_topic(dk=f"dev{n}")
            for i in range(5):
                payload = {**REQUEST, "id": str(i), "params": {"measurepoints": {"temp": 1.0}, "time": BASE_MS + i}}
                assert device.request(topic, payload, subscribe=i == 0)["code"] == 200
        per_worker = _devices_per_worker(workers)
        assert sorted(per_worker) == ["0", "1"]
        assert all(count > 0 for count in per_worker.values()), per_worker  # 16 connections, both workers
        assert sum(per_worker.values()) == 16
        assert _metric_sum(workers, "pointgate_connected_devices") == 16
        assert _metric_sum(workers, "pointgate_messages_total", outcome="accepted") == 80
        assert _metric_sum(workers, "pointgate_points_written_total") == 80
        assert _metric_sum(workers, "pointgate_workers") == 2
        assert sum(len(v) for v in _stored(migrated_dsn).values()) == 80
    finally:
        for device in devices:
            device.close()
    _eventually(lambda: _metric_sum(workers, "pointgate_connected_devices") == 0, what="devices gone")


@pytest.mark.slow
def test_killed_worker_is_replaced_and_nothing_acknowledged_is_lost(workers: Pointgate, migrated_dsn: str) -> None:
    """kill -9 of one worker under load: a new worker takes its place, readiness comes back, nothing acked is lost."""
    before = _worker_pids(workers)
    publishers = _start_publishers(workers.mqtt_port, count=6, total=800)
    try:
        _eventually(lambda: _acknowledged(publishers) >= 300, what="300 acknowledged")
        os.kill(before[1], signal.SIGKILL)
        _eventually(lambda: _worker_pids(workers).get(1) not in (None, before[1]), what="worker 1 replaced")
        after = _worker_pids(workers)
        assert after[0] == before[0]  # the other worker was left alone
        workers.wait_until("/readyz", 200)
        assert _metric_sum(workers, "pointgate_worker_restarts_total") == 1
        assert _metric_sum(workers, "pointgate_workers") == 2
        fresh = [Device(workers.mqtt_port, f"new{n}") for n in range(8)]
        try:  # devices connecting now are served, by both workers
            for n, device in enumerate(fresh):
                assert device.connect() == 0
                request = {**REQUEST, "params": {"measurepoints": {"temp": 1}}}
                assert device.request(resume_topic(dk=f"new{n}"), request)["code"] == 200
            assert _devices_per_worker(workers)["1"] > 0
        finally:
            for device in fresh:
                device.close()
    finally:
        for publisher in publishers:
            publisher.close()
    time.sleep(0.3)  # acknowledgements in flight at close reach the sets
    _assert_nothing_acknowledged_lost(publishers, migrated_dsn)
    assert any(line.get("event") == "worker died, restarting" for line in _log_lines(workers))


@pytest.mark.slow
def test_sigterm_drains_every_worker_and_exits_zero(workers: Pointgate, migrated_dsn: str) -> None:
    """SIGTERM under load: every worker drains, the supervisor exits 0 in time, nothing acknowledged is lost."""
    pids = _worker_pids(workers)
    publishers = _start_publishers(workers.mqtt_port, count=6, total=500)
    try:
        _eventually(lambda: _acknowledged(publishers) >= 300, what="300 acknowledged")
        started = time.monotonic()
        workers.proc.send_signal(signal.SIGTERM)
        # exit 0: every worker drained and exited by itself, none killed at the deadline (drain_timeout 8 s + 6 s)
        assert workers.proc.wait(20) == 0
        assert time.monotonic() - started < 15
    finally:
        for publisher in publishers:
            publisher.close()
    time.sleep(0.3)
    _assert_nothing_acknowledged_lost(publishers, migrated_dsn)
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", workers.mqtt_port), timeout=1).close()
    drained = [line.get("worker") for line in _log_lines(workers) if line.get("event") == "pointgate stopped"]
    assert sorted(drained, key=str) == [0, 1, None]  # both workers and the supervisor


@pytest.mark.slow
def test_take_over_across_workers(workers: Pointgate) -> None:
    """A client id connecting on one worker closes its connection on the other; the new connection works."""
    topic = resume_topic(dk="dev1")
    crossed = 0
    for _ in range(30):
        old = Device(workers.mqtt_port, "dev1")
        new = Device(workers.mqtt_port, "dev1")
        try:
            assert old.connect() == 0
            _eventually(lambda: sum(_devices_per_worker(workers).values()) == 1, what="first connection counted")
            old_worker = max(_devices_per_worker(workers).items(), key=lambda item: item[1])[0]
            assert new.connect() == 0
            assert old.disconnected.wait(5), "the old connection was not taken over"
            _eventually(lambda: sum(_devices_per_worker(workers).values()) == 1, what="one connection left")
            new_worker = max(_devices_per_worker(workers).items(), key=lambda item: item[1])[0]
            reply = new.request(topic, {**REQUEST, "params": {"measurepoints": {"temp": 2.0}}})
            assert reply["code"] == 200
        finally:
            new.close()
            old.close()
        _eventually(lambda: sum(_devices_per_worker(workers).values()) == 0, what="all disconnected")
        if new_worker != old_worker:
            crossed += 1
            if crossed == 2:
                break
    assert crossed == 2, "the kernel never put the two connections on different workers"
    events = {line.get("event") for line in _log_lines(workers)}
    assert "client id connected on another worker, taking over" in events


@pytest.mark.slow
def test_status_page_and_sighup_reload_across_workers(migrated_dsn: str, tmp_path: Path) -> None:
    """With workers, the supervisor's status page adds up every worker's devices and refusals, and SIGHUP reaches
    every worker: a broken model set is refused by each (shown in /readyz notes), a fixed one reloaded by each."""
    models = tmp_path / "models"
    shutil.copytree(schemas_dir(), models)
    process = Pointgate(migrated_dsn, tmp_path / "data", POINTGATE_WORKERS="2", POINTGATE_MODELS=str(models))
    devices = [Device(process.mqtt_port, f"dev{n}") for n in range(16)]
    try:
        process.wait_until("/readyz", 200)
        for device in devices:
            assert device.connect() == 0
        for n, device in enumerate(devices):
            bad = {**REQUEST, "id": "b", "params": {"measurepoints": {"nope": 1}, "time": BASE_MS}}
            assert device.request(resume_topic(dk=f"dev{n}"), bad)["code"] == 1204
        assert all(count > 0 for count in _devices_per_worker(process).values())  # both refused some

        def page_shows_everything() -> bool:
            page = process.body("/")
            row = re.search(r"<tr><td>1204</td><td>(\d+)</td>", page)
            return '<td id="connected">16</td>' in page and row is not None and row.group(1) == "16"

        _eventually(page_shows_everything, what="status page with 16 devices and 16 refusals")
        assert "/dev" in process.body("/") and "nope" in process.body("/")  # the latest examples, merged

        (models / "broken.json").write_text("{not json")
        process.proc.send_signal(signal.SIGHUP)

        def notes() -> dict[str, str]:
            return dict(json.loads(process.body("/readyz")).get("notes", {}))

        _eventually(lambda: len(notes()) == 2, what="both workers refusing the broken set")
        assert sorted(notes()) == ["models_reload (worker 0)", "models_reload (worker 1)"]
        assert all("broken.json" in note for note in notes().values())
        assert process.status("/readyz") == 200  # the previous models keep working: no reason to drain
        assert "broken.json" in process.body("/")

        (models / "broken.json").unlink()
        process.proc.send_signal(signal.SIGHUP)
        _eventually(lambda: not notes(), what="both workers reloaded")
        reloaded = [line for line in _log_lines(process) if line.get("event") == "thing models reloaded"]
        assert sorted(line["worker"] for line in reloaded) == [0, 1]
    finally:
        for device in devices:
            device.close()
        _kill_all(process)
