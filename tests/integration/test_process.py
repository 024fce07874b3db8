"""pointgate as a real process: kill -9 loses nothing acknowledged, SIGTERM drains and exits 0 in time."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.resources import schemas_dir
from tests.support import fetch, free_port, free_ports, resume_topic

TOPIC = resume_topic()
BASE_MS = 1_750_000_000_000


class Pointgate:
    """`pointgate serve` in a subprocess."""

    def __init__(self, dsn: str, data_dir: Path, **env: str) -> None:
        self.mqtt_port, self.http_port = free_ports(2)
        environment = {
            **os.environ,
            "POINTGATE_DATABASE_URL": dsn,
            "POINTGATE_MQTT_BIND": f"127.0.0.1:{self.mqtt_port}",
            "POINTGATE_HTTP_BIND": f"127.0.0.1:{self.http_port}",
            "POINTGATE_DATA_DIR": str(data_dir),
            "POINTGATE_MODELS": str(schemas_dir()),
            "POINTGATE_ALLOW_ANONYMOUS": "true",
            "POINTGATE_LOG_FORMAT": "json",
            "POINTGATE_WORKERS": "1",  # the single-process service; test_workers.py runs several
            **env,
        }
        self.log = data_dir / "pointgate.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"], env=environment, stdout=self._log_file, stderr=subprocess.STDOUT
        )

    def status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=2) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def body(self, path: str) -> str:
        """The body of ``path`` whatever its status ("" when nothing answers)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=2) as response:
                return str(response.read().decode())
        except urllib.error.HTTPError as exc:
            return str(exc.read().decode())
        except OSError:
            return ""

    def metric(self, name: str) -> float:
        """The value of the unlabelled sample ``name`` on /metrics (0 before it exists)."""
        for family in text_string_to_metric_families(self.body("/metrics")):
            for sample in family.samples:
                if sample.name == name and not sample.labels:
                    return float(sample.value)
        return 0.0

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
        """Poll ``condition`` until it holds; fail naming ``what`` (with the log) if it never does."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"never {what}; log:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def wait_until(self, path: str, code: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status(path) == code:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{path} never answered {code}; log:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log_file.close()


@pytest.fixture
def pointgate(migrated_dsn: str, tmp_path: Path) -> Iterator[Pointgate]:
    """A ready `pointgate serve` process on the test database."""
    process = Pointgate(migrated_dsn, tmp_path / "pg-data")
    try:
        process.wait_until("/readyz", 200)
        yield process
    finally:
        process.stop()


class Publisher:
    """A device sending one-point resume messages as fast as its in-flight window allows, recording acks."""

    def __init__(self, port: int, total: int) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dev1", protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages_set(50)
        self.total = total
        self.mid_to_index: dict[int, int] = {}
        self.acked_mids: set[int] = set()
        self.replied_200: set[int] = set()
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.disconnected = threading.Event()
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_disconnect = lambda *args: self.disconnected.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(TOPIC + "_reply", 1)
        # the SUBACK: replies published from now on reach us
        assert self.subscribed.wait(10), "no SUBACK for the reply topic"

    def _on_publish(self, client: Any, userdata: Any, mid: int, *args: Any) -> None:
        with self.lock:
            self.acked_mids.add(mid)

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        reply = json.loads(message.payload)
        if reply["code"] == 200:
            with self.lock:
                self.replied_200.add(int(reply["id"]))

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
            info = self.client.publish(TOPIC, payload, qos=1)  # no lock held: paho calls back from its thread
            self.mid_to_index[info.mid] = index

    def acknowledged(self) -> set[int]:
        with self.lock:
            mids, replied = set(self.acked_mids), set(self.replied_200)
        return {self.mid_to_index[mid] for mid in mids if mid in self.mid_to_index} | replied

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def stored_indexes(dsn: str) -> set[int]:
    records = fetch(dsn, "SELECT (extract(epoch FROM ts) * 1000)::bigint - $1 AS i FROM measurepoints", BASE_MS)
    return {int(r["i"]) for r in records}


@pytest.mark.slow
def test_kill_9_loses_nothing_acknowledged(pointgate: Pointgate, migrated_dsn: str) -> None:
    """kill -9 in the middle of a load: every message that got a PUBACK or a 200 reply is in PostgreSQL."""
    publisher = Publisher(pointgate.mqtt_port, total=20000)
    threading.Thread(target=publisher.run, daemon=True).start()
    deadline = time.monotonic() + 30
    while len(publisher.acknowledged()) < 300 and time.monotonic() < deadline:
        time.sleep(0.01)
    pointgate.proc.send_signal(signal.SIGKILL)
    pointgate.proc.wait(10)
    # paho sees the connection close only after handling every PUBACK and reply the server sent before dying
    assert publisher.disconnected.wait(10)
    acknowledged = publisher.acknowledged()
    publisher.close()
    assert len(acknowledged) >= 300
    missing = acknowledged - stored_indexes(migrated_dsn)
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"


@pytest.mark.slow
def test_sigterm_drains_and_exits_zero(pointgate: Pointgate, migrated_dsn: str) -> None:
    """SIGTERM under load: exit 0 well inside Docker's 10 s, new connections refused, all acknowledged data stored."""
    publisher = Publisher(pointgate.mqtt_port, total=3000)
    threading.Thread(target=publisher.run, daemon=True).start()
    while len(publisher.acknowledged()) < 200:
        time.sleep(0.01)
    started = time.monotonic()
    pointgate.proc.send_signal(signal.SIGTERM)
    assert pointgate.proc.wait(10) == 0
    assert time.monotonic() - started < 10
    assert publisher.disconnected.wait(10)  # every PUBACK and reply sent before the exit has been handled
    acknowledged = publisher.acknowledged()
    publisher.close()
    assert not acknowledged - stored_indexes(migrated_dsn)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", pointgate.mqtt_port), timeout=1).close()
    log = pointgate.log.read_text()
    assert "draining" in log and "pointgate stopped" in log


@pytest.mark.slow
def test_drain_turns_readiness_off_and_second_signal_exits_at_once(tmp_path: Path) -> None:
    """During a drain /readyz is 503 while /livez stays 200; a second signal ends the process immediately."""
    closed = free_port()  # nothing listens here: the database is down for the whole test
    process = Pointgate(
        f"postgresql://postgres@127.0.0.1:{closed}/postgres", tmp_path / "data", POINTGATE_DRAIN_TIMEOUT="30"
    )
    try:
        process.wait_until("/livez", 200)
        assert process.status("/readyz") == 503  # database unreachable
        device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dev1", protocol=mqtt.MQTTv311)
        device.connect("127.0.0.1", process.mqtt_port)
        device.loop_start()
        info = device.publish(
            TOPIC,
            json.dumps({"id": "1", "method": "thing.measurepoint.resume", "params": {"measurepoints": {"temp": 1.0}}}),
            qos=1,
        )
        # the broker has the message once it waits in the writer's queue
        process.wait_for(lambda: process.metric("pointgate_write_queue_points") >= 1, "queued the message")
        assert not info.is_published()  # nothing can be committed, so no PUBACK
        process.proc.send_signal(signal.SIGTERM)
        process.wait_for(lambda: "draining" in process.body("/readyz"), "reported draining on /readyz")
        assert process.proc.poll() is None  # still draining: the queued message is not given up early
        assert process.status("/livez") == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{process.http_port}/readyz", timeout=2) as response:
            raise AssertionError(f"ready during drain: {response.status}")
    except urllib.error.HTTPError as exc:
        assert exc.code == 503 and "draining" in exc.read().decode()
        started = time.monotonic()
        process.proc.send_signal(signal.SIGTERM)
        assert process.proc.wait(5) != 0
        assert time.monotonic() - started < 2
    finally:
        device.loop_stop()
        process.stop()
