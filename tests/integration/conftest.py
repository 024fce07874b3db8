"""Integration fixtures: the real service (broker + writer + ops endpoint) against the test PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.resources import schemas_dir
from service.settings import Settings
from tests.support import Device, RunningService


@pytest.fixture
def make_settings(migrated_dsn: str, tmp_path: Path) -> Callable[..., Settings]:
    """Settings for a service on ephemeral loopback ports, using this test's database."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": migrated_dsn,
            "mqtt_bind": "127.0.0.1:0",
            "http_bind": "127.0.0.1:0",
            "data_dir": tmp_path / "data",
            "models": schemas_dir(),
            "allow_anonymous": True,
            "connect_timeout": 2.0,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def start_service(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., RunningService]]:
    """Factory: start a service with setting overrides; every one started is stopped after the test."""
    started: list[RunningService] = []

    def start(**overrides: Any) -> RunningService:
        running = RunningService(make_settings(**overrides)).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def service(start_service: Callable[..., RunningService]) -> RunningService:
    """A running service with anonymous devices allowed (the resume tests don't sign in)."""
    return start_service()


@pytest.fixture
def device(service: RunningService) -> Iterator[Device]:
    """An anonymous device connected to `service`."""
    dev = Device(service.port, "dev1")
    assert dev.connect() == 0
    yield dev
    dev.close()
