"""Faults under load: a consumer killed (-9) or drained (SIGTERM), PostgreSQL restarted. Nothing answered is lost."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from service.storage.embedded import EmbeddedPostgres
from tests.consume.conftest import ConsumerProcess, Mosquitto, RunningConsumer
from tests.support import Device, fetch, resume_topic

BASE_MS = 1_750_000_000_000


class Fleet:
    """Devices publishing one-point requests at QoS 1 through the broker, re-sending what was not answered."""

    def __init__(self, port: int, devices: int, per_device: int) -> None:
        self.per_device = per_device
        self.clients: list[mqtt.Client] = []
        self.answered: dict[int, int] = {}  # request index -> reply code
        self.lock = threading.Lock()
        self.done = threading.Event()
        for d in range(devices):
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fleet{d}", protocol=mqtt.MQTTv311)
            client.max_inflight_messages_set(100)
            client.on_message = self._on_reply
            client.connect("127.0.0.1", port)
            client.loop_start()
            info = client.subscribe(resume_topic(dk=f"fleet{d}") + "_reply", 1)
            assert info[0] == 0
            self.clients.append(client)
        time.sleep(0.3)  # SUBACKs; nothing is published before, so nothing can be missed

    @property
    def total(self) -> int:
        return self.per_device * len(self.clients)

    def _on_reply(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        reply = json.loads(message.payload)
        with self.lock:
            self.answered[int(reply["id"])] = reply["code"]

    def ok(self) -> set[int]:
        with self.lock:
            return {index for index, code in self.answered.items() if code == 200}

    def send(self, indexes: list[int]) -> None:
        for index in indexes:
            d = index % len(self.clients)
            payload = {
                "id": str(index),
                "version": "1.0",
                "method": "thing.measurepoint.resume",
                "params": {"measurepoints": {"temp": float(index)}, "time": BASE_MS + index},
            }
            self.clients[d].publish(resume_topic(dk=f"fleet{d}"), json.dumps(payload), qos=1)

    def send_all_in_background(self) -> None:
        def run() -> None:
            self.send(list(range(self.total)))
            self.done.set()

        threading.Thread(target=run, daemon=True).start()

    def resend_until_answered(self, timeout: float) -> list[int]:
        """What a device does with its offline cache: re-send every request not answered 200.

        Returns how many were re-sent in each round.
        """
        deadline = time.monotonic() + timeout
        rounds: list[int] = []
        while time.monotonic() < deadline:
            # wait for replies to stop coming before deciding what is unanswered
            before = -1
            while len(self.ok()) != before and len(self.ok()) < self.total:
                before = len(self.ok())
                time.sleep(1.0)
            missing = sorted(set(range(self.total)) - self.ok())
            if not missing:
                return rounds
            rounds.append(len(missing))
            self.send(missing)
        raise AssertionError(f"{self.total - len(self.ok())} requests never answered")

    def close(self) -> None:
        for client in self.clients:
            client.loop_stop()
            client.disconnect()


def stored(dsn: str) -> list[int]:
    rows = fetch(dsn, "SELECT (extract(epoch FROM ts) * 1000)::bigint - $1 AS i FROM measurepoints", BASE_MS)
    return [int(r["i"]) for r in rows]


@pytest.mark.slow
def test_kill_9_of_a_consumer_loses_nothing_answered(
    broker: Mosquitto, spawn_consumer: Callable[..., ConsumerProcess], migrated_dsn: str
) -> None:
    """kill -9 one of two consumers mid-load: every request answered 200 is stored; re-sends complete the rest once."""
    victim = spawn_consumer(broker.url, "victim").wait_ready()
    survivor = spawn_consumer(broker.url, "survivor").wait_ready()
    fleet = Fleet(broker.port, devices=4, per_device=500)
    try:
        fleet.send_all_in_background()
        deadline = time.monotonic() + 60
        while len(fleet.ok()) < 400 and time.monotonic() < deadline:
            time.sleep(0.01)
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        answered_at_kill = fleet.ok()
        assert len(answered_at_kill) >= 400
        # the claim itself: nothing answered 200 before the crash is missing
        assert not answered_at_kill - set(stored(migrated_dsn))
        assert fleet.done.wait(60)
        rounds = fleet.resend_until_answered(timeout=90)
        rows = stored(migrated_dsn)
        assert sorted(rows) == list(range(fleet.total)), "not every request stored exactly once"
        print(f"kill -9: {len(answered_at_kill)} answered 200 at the kill, all stored; re-sent per round: {rounds}")
        assert survivor.proc.poll() is None
    finally:
        fleet.close()


@pytest.mark.slow
def test_sigterm_drains_a_consumer_under_load(
    broker: Mosquitto, spawn_consumer: Callable[..., ConsumerProcess], migrated_dsn: str
) -> None:
    """SIGTERM mid-load: the consumer unsubscribes, commits, answers and exits 0 within 10 s; the other carries on."""
    leaving = spawn_consumer(broker.url, "leaving").wait_ready()
    staying = spawn_consumer(broker.url, "staying").wait_ready()
    fleet = Fleet(broker.port, devices=4, per_device=300)
    try:
        fleet.send_all_in_background()
        while len(fleet.ok()) < 200:
            time.sleep(0.01)
        started = time.monotonic()
        leaving.proc.send_signal(signal.SIGTERM)
        assert leaving.proc.wait(10) == 0
        assert time.monotonic() - started < 10
        assert not fleet.ok() - set(stored(migrated_dsn))
        log = leaving.log.read_text()
        assert "draining" in log and "pointgate consume stopped" in log
        assert fleet.done.wait(60)
        fleet.resend_until_answered(timeout=60)
        assert sorted(stored(migrated_dsn)) == list(range(fleet.total))
        assert staying.proc.poll() is None
    finally:
        fleet.close()


@pytest.mark.slow
def test_database_restart_mid_load_loses_nothing_acknowledged(
    broker: Mosquitto, start_consumer: Callable[..., RunningConsumer], scratch: Path
) -> None:
    """PostgreSQL stops under load: no 200 and no PUBACK meanwhile; once back, everything is answered and stored."""
    pg = EmbeddedPostgres(scratch / "db", durable=False)
    dsn = pg.start()
    try:
        consumer = start_consumer(broker.url, database_url=dsn)
        dev = Device(broker.port, "dev1")
        assert dev.connect() == 0
        dev.subscribe(resume_topic() + "_reply")
        assert dev.request(resume_topic(), _req(0), subscribe=False)["code"] == 200
        pg.stop()
        for index in range(1, 51):
            dev.publish(resume_topic(), _req(index))
        time.sleep(1.5)
        service = consumer.service
        assert service.consumer is not None and service.link is not None
        assert service.consumer.acknowledged == 1, "a PUBACK went to the broker before its commit"
        assert [m for m in dev.messages if b'"id":"1"' in m[1]] == []
        pg.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and service.consumer.acknowledged < 51:
            time.sleep(0.1)
        assert service.consumer.acknowledged == 51

        def codes() -> dict[str, int]:
            return {json.loads(body)["id"]: json.loads(body)["code"] for _, body, _ in list(dev.messages)}

        while time.monotonic() < deadline and len(codes()) < 51:
            time.sleep(0.05)
        assert codes() == {str(i): 200 for i in range(51)}
        assert sorted(stored(dsn)) == list(range(51))
        dev.close()
    finally:
        pg.stop()


def _req(index: int) -> dict[str, Any]:
    return {
        "id": str(index),
        "version": "1.0",
        "method": "thing.measurepoint.resume",
        "params": {"measurepoints": {"temp": float(index)}, "time": BASE_MS + index},
    }
