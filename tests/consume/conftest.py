"""A real mosquitto for the consumer tests, and `pointgate consume` running against it.

mosquitto is Debian's (``.ci/run`` installs it). Each test gets its own broker on a free loopback port,
with a config file the test writes; as root it runs as the unprivileged ``mosquitto`` user (it drops
privileges itself). Without mosquitto the tests are skipped on a developer's machine and fail under CI.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from service.consume.service import ConsumeService
from service.resources import schemas_dir
from service.settings import Settings
from tests.support import free_port

T = TypeVar("T")


def mosquitto_binary() -> str | None:
    """Debian installs it in /usr/sbin, which an unprivileged PATH may not hold."""
    return shutil.which("mosquitto", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


class Mosquitto:
    """One mosquitto process on 127.0.0.1:``port``; `start` and `stop` may be called more than once."""

    def __init__(self, directory: Path, port: int | None = None, **options: str) -> None:
        binary = mosquitto_binary()
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail("mosquitto is not installed (.ci/run installs it: apt-get install -y mosquitto)")
            pytest.skip("mosquitto is not installed (apt-get install -y mosquitto)")
        self.binary = binary
        self.port = port or free_port()
        self.directory = directory
        self.config = directory / "mosquitto.conf"
        self.log = directory / "mosquitto.log"
        settings = {
            "allow_anonymous": "true",
            "persistence": "false",
            # the outgoing window per client and a queue deep enough that no test hits mosquitto's silent drop
            "max_inflight_messages": "1000",
            "max_queued_messages": "100000",
            **options,
        }
        lines = [f"listener {self.port} 127.0.0.1", *(f"{key} {value}" for key, value in settings.items())]
        if os.geteuid() == 0:
            lines.append("user mosquitto")  # mosquitto drops root privileges to this user itself
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10) -> Mosquitto:
        log = self.log.open("ab")
        self.proc = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory the unprivileged mosquitto / PostgreSQL users can enter (pytest's tmp_path is 0700 as root)."""
    path = Path(tempfile.mkdtemp(prefix="pointgate-consume-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_broker(scratch: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Factory for mosquitto brokers (not started); every one is stopped after the test."""
    brokers: list[Mosquitto] = []

    def make(port: int | None = None, **options: str) -> Mosquitto:
        directory = scratch / f"mosquitto{len(brokers)}"
        directory.mkdir()
        directory.chmod(0o755)
        broker = Mosquitto(directory, port, **options)
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def broker(make_broker: Callable[..., Mosquitto]) -> Mosquitto:
    """A running mosquitto."""
    return make_broker().start()


class RunningConsumer:
    """A real `ConsumeService` on its own event loop thread, driven from blocking test code."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="pointgate-consume-test", daemon=True)
        self._thread.start()
        self.service = ConsumeService(settings)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> RunningConsumer:
        self.call(self.service.start())
        return self

    def stop(self) -> None:
        try:
            self.call(self.service.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def wait_subscribed(self, timeout: float = 10) -> RunningConsumer:
        deadline = time.monotonic() + timeout
        link = self.service.link
        assert link is not None
        while not link.subscribed:
            if time.monotonic() > deadline:
                raise TimeoutError(f"consumer never subscribed: {link.problem}")
            time.sleep(0.02)
        return self

    @property
    def received(self) -> int:
        assert self.service.consumer is not None
        return self.service.consumer.received

    @property
    def http_port(self) -> int:
        assert self.service.ops is not None
        return self.service.ops.port


@pytest.fixture
def consumer_settings(migrated_dsn: str, scratch: Path) -> Callable[..., Settings]:
    """Settings for a consumer of this test's database, ops endpoint on an ephemeral port."""

    def make(broker_url: str, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "broker_url": broker_url,
            "database_url": migrated_dsn,
            "http_bind": "127.0.0.1:0",
            "data_dir": scratch / "data",
            "models": schemas_dir(),
            "drain_timeout": 5.0,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def start_consumer(consumer_settings: Callable[..., Settings]) -> Iterator[Callable[..., RunningConsumer]]:
    """Factory: start a consumer (and wait for its subscriptions unless told not to); all stopped after the test."""
    started: list[RunningConsumer] = []

    def start(broker_url: str, *, wait: bool = True, **overrides: Any) -> RunningConsumer:
        running = RunningConsumer(consumer_settings(broker_url, **overrides)).start()
        started.append(running)
        return running.wait_subscribed() if wait else running

    yield start
    for running in started:
        running.stop()


class ConsumerProcess:
    """`pointgate consume` as a real process (for kill -9 and SIGTERM), configured through POINTGATE_* variables."""

    def __init__(self, broker_url: str, dsn: str, directory: Path, name: str, **env: str) -> None:
        self.http_port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.log = directory / f"{name}.log"
        environment = {
            **os.environ,
            "POINTGATE_BROKER_URL": broker_url,
            "POINTGATE_BROKER_CLIENT_ID": name,
            "POINTGATE_DATABASE_URL": dsn,
            "POINTGATE_HTTP_BIND": f"127.0.0.1:{self.http_port}",
            "POINTGATE_DATA_DIR": str(directory / "data"),
            "POINTGATE_MODELS": str(schemas_dir()),
            "POINTGATE_LOG_FORMAT": "json",
            **env,
        }
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "consume"],
            env=environment,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=2) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def wait_ready(self, timeout: float = 30) -> ConsumerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.status("/readyz") == 200:
                return self
            time.sleep(0.1)
        raise AssertionError(f"consumer never ready; log:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log_file.close()


@pytest.fixture
def spawn_consumer(migrated_dsn: str, scratch: Path) -> Iterator[Callable[..., ConsumerProcess]]:
    """Factory for consumer processes on this test's database; every one is killed after the test."""
    spawned: list[ConsumerProcess] = []

    def spawn(broker_url: str, name: str, **env: str) -> ConsumerProcess:
        process = ConsumerProcess(broker_url, migrated_dsn, scratch / name, name, **env)
        spawned.append(process)
        return process

    yield spawn
    for process in spawned:
        process.stop()
