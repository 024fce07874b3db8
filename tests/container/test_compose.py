"""docker-compose.yml, run with podman-compose: database healthy, migrate completes, pointgate serves, down.

The shipped file is used as it is; ``compose.override.yml`` beside this file holds the test-only changes (the
postgres stand-in, the session's image tag and build argument, ephemeral loopback ports, anonymous devices).

Debian 12's podman (4.3) runs health checks only from systemd timers and cannot wait for ``healthy``, so
podman-compose ignores ``condition: service_healthy`` there (it says so in a warning). The test therefore walks
the compose file's start-up order itself, one service at a time, the way Docker Compose would: it runs the db
service's own health check (``podman healthcheck run``, what the timer would do) until it passes, then brings up
``migrate`` and waits for it to exit 0, then brings up ``pointgate``.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.container.conftest import PYTESTMARK
from tests.container.podman import ROOT, BaseImages, environment, inspect, podman
from tests.container.test_image import SAMPLE_POINTS, http_status, send_sample

pytestmark = PYTESTMARK

OVERRIDE = Path(__file__).resolve().parent / "compose.override.yml"


class Compose:
    """podman-compose on docker-compose.yml plus the test override, under a project name of its own."""

    def __init__(self, image: str, base: BaseImages) -> None:
        self.project = f"pgtest{uuid.uuid4().hex[:8]}"
        self.env = {
            **environment(),
            "POINTGATE_TEST_IMAGE": image,
            "POINTGATE_TEST_PYTHON_IMAGE": base.python,
            "POINTGATE_TEST_POSTGRES_IMAGE": base.postgres,
        }
        # podman-compose installs next to the interpreter, which may not be on PATH
        self.binary = str(Path(sys.executable).parent / "podman-compose")

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        command = [
            self.binary, "-f", str(ROOT / "docker-compose.yml"), "-f", str(OVERRIDE), "-p", self.project,
            "--podman-build-args=--network host", *args,
        ]  # fmt: skip
        result = subprocess.run(
            command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}"
        return result

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def containers(self) -> list[str]:
        label = f"label=io.podman.compose.project={self.project}"
        return podman("ps", "--all", "--filter", label, "--format", "{{.Names}}").stdout.split()

    def volumes(self) -> list[str]:
        names = podman("volume", "ls", "--format", "{{.Name}}").stdout.split()
        return [name for name in names if name.startswith(f"{self.project}_")]


@pytest.fixture
def compose(image: str, base_images: BaseImages) -> Iterator[Compose]:
    stack = Compose(image, base_images)
    try:
        yield stack
    finally:
        subprocess.run(
            [stack.binary, "-f", str(ROOT / "docker-compose.yml"), "-f", str(OVERRIDE), "-p", stack.project,
             "down", "--volumes", "--timeout", "5"],
            cwd=ROOT, env=stack.env, capture_output=True, timeout=120, check=False,
        )  # fmt: skip


def wait_healthy(container: str, timeout: float) -> None:
    """Run the container's own health check until it passes (as podman's systemd timer would)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if podman("healthcheck", "run", container, check=False).returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(f"{container} never healthy; logs:\n{podman('logs', container, check=False).stderr[-3000:]}")


def test_compose_stack_starts_in_order_serves_a_device_and_goes_down(compose: Compose) -> None:
    """db healthy -> migrate exits 0 -> pointgate ready; the API sample gets 200 into the db; `down` removes all."""
    compose("build", "migrate", "pointgate", timeout=1800)  # the file's `build: .`, from the layer cache
    compose("up", "--detach", "--no-build", "db")
    db = compose.container("db")
    wait_healthy(db, timeout=90)
    assert inspect(db, "{{.State.Health.Status}}") == "healthy"

    compose("up", "--detach", "--no-build", "--no-deps", "migrate")
    migrate = compose.container("migrate")
    assert podman("wait", migrate, timeout=120).stdout.strip() == "0", podman("logs", migrate).stdout
    assert "schema is current" in podman("logs", migrate).stdout

    compose("up", "--detach", "--no-build", "--no-deps", "pointgate")
    pointgate = compose.container("pointgate")
    ports = {}
    for target in (1883, 9100):
        ports[target] = int(podman("port", pointgate, f"{target}/tcp").stdout.strip().rsplit(":", 1)[1])
    deadline = time.monotonic() + 90
    while http_status(f"http://127.0.0.1:{ports[9100]}/readyz")[0] != 200:
        assert time.monotonic() < deadline, podman("logs", pointgate, check=False).stdout[-3000:]
        assert inspect(pointgate, "{{.State.Running}}") == "true", podman("logs", pointgate).stdout[-3000:]
        time.sleep(0.2)

    reply = send_sample(ports[1883])
    assert reply["code"] == 200, reply
    # the rows are in the compose file's database, read with its own credentials over TCP
    sql = "SELECT point FROM measurepoints WHERE device_key = 'dev1' ORDER BY point"
    result = podman(
        "exec", "--env", "PGPASSWORD=pointgate", db,
        "psql", "-h", "127.0.0.1", "-U", "pointgate", "-d", "pointgate", "-tAc", sql,
    )  # fmt: skip
    assert set(result.stdout.split()) == SAMPLE_POINTS

    assert len(compose.containers()) == 3
    assert len(compose.volumes()) == 2
    compose("down", "--volumes")
    assert compose.containers() == []
    assert compose.volumes() == []
