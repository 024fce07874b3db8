"""The supervisor's take-over relay and a worker's end of it, as pure logic: no processes, no sockets."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from service.settings import Settings
from service.supervisor import Supervisor, _Link, _plain


class FakeControl:
    """Stands in for a control socket's StreamWriter: records the lines written."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.lines.extend(json.loads(line) for line in data.splitlines())

    def close(self) -> None:
        pass


class FakeBroker:
    """Records which connections it was asked to evict."""

    def __init__(self) -> None:
        self.evicted: list[tuple[str, object]] = []

    async def evict_session(self, client_id: str, connection: object) -> None:
        self.evicted.append((client_id, connection))


def _supervisor(tmp_path: Path) -> tuple[Supervisor, list[FakeControl]]:
    supervisor = Supervisor(Settings(workers=2, data_dir=tmp_path / "data"), str(tmp_path))
    controls = [FakeControl(), FakeControl()]
    for worker, control in zip(supervisor.workers, controls, strict=True):
        worker.control = control  # type: ignore[assignment]
    return supervisor, controls


def test_connect_on_another_worker_evicts_the_old_connection(tmp_path: Path) -> None:
    """K on worker 0 (connection 1), then K on worker 1: worker 0 is told to evict exactly connection 1."""
    supervisor, controls = _supervisor(tmp_path)
    w0, w1 = supervisor.workers
    supervisor._on_message(w0, {"t": "up", "key": "pk/dk/c", "serial": 1, "clean": True})
    supervisor._on_message(w1, {"t": "up", "key": "pk/dk/c", "serial": 7, "clean": True})
    assert controls[0].lines == [{"t": "evict", "key": "pk/dk/c", "serial": 1}]
    assert controls[1].lines == []
    # the old connection's end, reported after the new one began, does not forget the new owner
    supervisor._on_message(w0, {"t": "down", "key": "pk/dk/c", "serial": 1, "clean": True})
    supervisor._on_message(w0, {"t": "up", "key": "pk/dk/c", "serial": 2, "clean": True})
    assert controls[1].lines == [{"t": "evict", "key": "pk/dk/c", "serial": 7}]
    assert (w0.devices, w1.devices) == (1, 1)  # w1's eviction is in flight; its "down" comes next


def test_reconnect_on_the_same_worker_is_left_to_its_broker(tmp_path: Path) -> None:
    """Take-over within one worker is the broker's job: the supervisor sends nothing."""
    supervisor, controls = _supervisor(tmp_path)
    w0, _ = supervisor.workers
    supervisor._on_message(w0, {"t": "up", "key": "k", "serial": 1, "clean": True})
    supervisor._on_message(w0, {"t": "down", "key": "k", "serial": 1, "clean": True})
    supervisor._on_message(w0, {"t": "up", "key": "k", "serial": 2, "clean": True})
    assert controls[0].lines == [] and controls[1].lines == []


def test_a_persistent_session_is_remembered_after_its_connection(tmp_path: Path) -> None:
    """A persistent session stays on its worker when the device goes: reconnecting elsewhere evicts it there."""
    supervisor, controls = _supervisor(tmp_path)
    w0, w1 = supervisor.workers
    supervisor._on_message(w0, {"t": "up", "key": "k", "serial": 3, "clean": False})
    supervisor._on_message(w0, {"t": "down", "key": "k", "serial": 3, "clean": False})
    supervisor._on_message(w1, {"t": "up", "key": "k", "serial": 1, "clean": False})
    assert controls[0].lines == [{"t": "evict", "key": "k", "serial": 3}]
    # a clean session is forgotten with its connection: nothing to evict later
    supervisor._on_message(w1, {"t": "up", "key": "c", "serial": 2, "clean": True})
    supervisor._on_message(w1, {"t": "down", "key": "c", "serial": 2, "clean": True})
    supervisor._on_message(w0, {"t": "up", "key": "c", "serial": 4, "clean": True})
    assert controls[1].lines == []


def test_a_dead_workers_sessions_are_forgotten(tmp_path: Path) -> None:
    """After a worker dies nothing is sent to evict its (gone) connections."""
    supervisor, controls = _supervisor(tmp_path)
    w0, w1 = supervisor.workers
    supervisor._on_message(w0, {"t": "up", "key": "k", "serial": 1, "clean": True})
    supervisor._forget(w0)
    w0.control = controls[0]  # type: ignore[assignment]  # its replacement
    supervisor._on_message(w1, {"t": "up", "key": "k", "serial": 1, "clean": True})
    assert controls[0].lines == []
    assert w0.devices == 0


async def test_a_worker_evicts_only_the_connection_it_was_told_about() -> None:
    """A late eviction (the device reconnected here since) leaves the newer connection alone."""
    control, broker = FakeControl(), FakeBroker()
    link = _Link(control)  # type: ignore[arg-type]
    link.broker = broker  # type: ignore[assignment]
    first, second = object(), object()
    link.connected("k", first, True)
    link.connected("k", second, True)  # a local take-over: the broker already closed `first`
    link.disconnected("k", first, True)  # its end arrives late: not reported, `second` is current
    assert [line["t"] for line in control.lines] == ["up", "up"]
    link._evict("k", 1)
    await asyncio.gather(*link.evictions)
    assert broker.evicted == []
    link._evict("k", 2)
    await asyncio.gather(*link.evictions)
    assert broker.evicted == [("k", second)]


def test_workers_get_the_secrets_in_clear(tmp_path: Path) -> None:
    """A worker's settings carry the real DSN and secrets, not pydantic's redaction."""
    settings = Settings(database_url="postgresql://u:pw@db/x", auth_secret="s3cret", data_dir=tmp_path)
    data = _plain(settings)
    assert data["database_url"] == "postgresql://u:pw@db/x" and data["auth_secret"] == "s3cret"
    assert Settings(**data).database_url == settings.database_url
