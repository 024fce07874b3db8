"""The image built from the repository's Dockerfile, run for real under podman.

Two ways of running it, as the README describes: with the embedded database inside the container (own network
namespace, ports published on loopback, read-only root filesystem, only the data volume writable), and with
``POINTGATE_DATABASE_URL`` pointing at the test session's PostgreSQL (on the host's network, free loopback
ports), including ``migrate`` as a one-shot container and a SIGTERM drain under load.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.container.conftest import PYTESTMARK, tcp_dsn
from tests.container.podman import BaseImages, image_size, inspect, podman
from tests.integration.test_process import Publisher, stored_indexes
from tests.support import SAMPLE, Device, fetch, free_port, free_ports, resume_topic

pytestmark = PYTESTMARK

UID = 10001
SAMPLE_POINTS = {"temp", "branchCurr", "Power"}


def http_status(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (http:// URLs built above)
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


@dataclass
class Container:
    """A detached container of the image, reachable on loopback ports, removed (with its volume) at the end."""

    name: str
    mqtt_port: int
    http_port: int
    volume: str | None = None

    @property
    def ops(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def wait_ready(self, timeout: float = 90) -> None:
        """Poll /readyz until 200; fail early, with the logs, if the container exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if http_status(f"{self.ops}/readyz")[0] == 200:
                return
            if inspect(self.name, "{{.State.Running}}") != "true":
                break
            time.sleep(0.2)
        raise AssertionError(f"{self.name} never ready; logs:\n{self.logs()[-4000:]}")

    def exec(self, *command: str, user: str | None = None) -> tuple[int, str]:
        args = ["exec", *(["--user", user] if user else []), self.name, *command]
        result = podman(*args, check=False)
        return result.returncode, result.stdout + result.stderr

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name, check=False)
        if self.volume:
            podman("volume", "rm", "--force", self.volume, check=False)


def start_embedded(image: str) -> Container:
    """The image with its embedded PostgreSQL: read-only root, a named volume on the data directory."""
    name = f"pointgate-test-{uuid.uuid4().hex[:10]}"
    volume = f"{name}-data"
    podman("volume", "create", volume)
    podman(
        "run", "--detach", "--name", name,
        "--read-only",  # with podman's tmpfs on /tmp, /var/tmp, /run: pointgate needs a temporary directory
        "--volume", f"{volume}:/var/lib/pointgate",
        "--publish", "127.0.0.1::1883", "--publish", "127.0.0.1::9100",
        image, "serve", "--allow-anonymous",
    )  # fmt: skip
    ports = {}
    for target in (1883, 9100):
        # "127.0.0.1:41234": podman chose a free host port
        ports[target] = int(podman("port", name, f"{target}/tcp").stdout.strip().rsplit(":", 1)[1])
    return Container(name, ports[1883], ports[9100], volume)


def start_on_host(image: str, database_url: str, *args: str) -> Container:
    """The image on the host's network with an external database, on free loopback ports."""
    name = f"pointgate-test-{uuid.uuid4().hex[:10]}"
    mqtt_port, http_port = free_ports(2)
    container = Container(name, mqtt_port, http_port)
    podman(
        "run", "--detach", "--name", name, "--network", "host",
        "--env", f"POINTGATE_DATABASE_URL={database_url}",
        "--env", f"POINTGATE_MQTT_BIND=127.0.0.1:{container.mqtt_port}",
        "--env", f"POINTGATE_HTTP_BIND=127.0.0.1:{container.http_port}",
        image, "serve", "--allow-anonymous", *args,
    )  # fmt: skip
    return container


def send_sample(port: int) -> dict[str, object]:
    device = Device(port, "dev1")
    try:
        assert device.connect() == 0
        return device.request(resume_topic(), SAMPLE, timeout=15)
    finally:
        device.close()


def test_image_is_small_and_has_no_compiler_or_pip_cache(image: str, base_images: BaseImages) -> None:
    """The runtime stage adds the venv and data files only: no compiler, no pip cache, no build tree."""
    script = (
        "for tool in gcc cc c++ make ld; do command -v $tool; done; "
        "find / -xdev \\( -path '*/.cache/pip' -o -path '/root/.cache' -o -name 'pip-*' -path '/tmp/*' "
        "-o -path /src \\) -print 2>/dev/null; true"
    )
    found = podman("run", "--rm", "--user", "0", "--entrypoint", "sh", image, "-c", script).stdout.split()
    assert found == [], found
    added = image_size(image) - image_size(base_images.python)
    assert added < 250e6, f"the Dockerfile adds {added / 1e6:.0f} MB to its base"


# --- the embedded database inside the container ---------------------------------------------------------


@pytest.fixture(scope="module")
def embedded(image: str) -> Iterator[Container]:
    container = start_embedded(image)
    try:
        container.wait_ready()
        yield container
    finally:
        container.remove()


def test_runs_as_the_unprivileged_numeric_uid(image: str, embedded: Container) -> None:
    """The image's user is numeric 10001:10001, and every process in the container (pointgate, PostgreSQL) has it."""
    assert inspect(image, "{{.Config.User}}") == f"{UID}:{UID}"
    code, out = embedded.exec("sh", "-c", "grep -h '^Uid:' /proc/[0-9]*/status")
    assert code == 0, out
    uids = {field for line in out.splitlines() for field in line.split()[1:]}
    assert uids == {str(UID)}, out
    code, out = embedded.exec("cat", "/proc/1/cmdline")
    assert "pointgate" in out  # exec form: pointgate itself is PID 1 and gets the SIGTERM


def test_livez_and_readyz_answer(embedded: Container) -> None:
    """/livez and /readyz answer 200 on the published ops port; /readyz says ready."""
    assert http_status(f"{embedded.ops}/livez")[0] == 200
    status, body = http_status(f"{embedded.ops}/readyz")
    assert status == 200
    assert json.loads(body)["status"] == "ready"


def test_the_images_healthcheck_succeeds(image: str, embedded: Container) -> None:
    """The HEALTHCHECK survives the build (Docker format) and its command succeeds in the running container."""
    test = json.loads(podman("image", "inspect", "--format", "{{json .HealthCheck.Test}}", image).stdout)
    assert test[0] == "CMD" and "http://127.0.0.1:9100/livez" in test[-1]
    result = podman("healthcheck", "run", embedded.name, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert inspect(embedded.name, "{{.State.Health.Status}}") == "healthy"


def test_device_gets_200_and_rows_are_in_the_embedded_database(embedded: Container) -> None:
    """The API sample gets code 200, and its three points are in the container's own PostgreSQL."""
    reply = send_sample(embedded.mqtt_port)
    assert reply["code"] == 200, reply
    query = (
        "import asyncio, asyncpg\n"
        "async def main():\n"
        "    conn = await asyncpg.connect('postgresql://postgres@/postgres?host=/var/lib/pointgate/run&port=5432')\n"
        "    rows = await conn.fetch(\"SELECT point FROM measurepoints WHERE device_key = 'dev1'\")\n"
        "    print(sorted(r['point'] for r in rows))\n"
        "asyncio.run(main())\n"
    )
    code, out = embedded.exec("python", "-c", query)
    assert code == 0, out
    assert out.strip() == str(sorted(SAMPLE_POINTS))


def test_root_filesystem_is_read_only_and_only_the_data_volume_writable(embedded: Container) -> None:
    """The service runs (tests above) on a read-only root: only the data volume (uid 10001) takes writes."""
    assert inspect(embedded.name, "{{.HostConfig.ReadonlyRootfs}}") == "true"
    for path in ("/app", "/opt/venv", "/etc", "/usr", "/var"):
        code, out = embedded.exec("sh", "-c", f"echo x > {path}/.probe", user="0")  # even root cannot write
        assert code != 0 and "Read-only file system" in out, (path, out)
    code, out = embedded.exec("sh", "-c", "echo x > /var/lib/pointgate/.probe && rm /var/lib/pointgate/.probe")
    assert code == 0, out
    code, out = embedded.exec("stat", "-c", "%u %a", "/var/lib/pointgate")
    assert out.split() == [str(UID), "750"], out  # the fresh named volume took the image's ownership


# --- the test session's PostgreSQL, reached over POINTGATE_DATABASE_URL ----------------------------------


def test_migrate_runs_as_a_one_shot_container(image: str, pg_dsn: str) -> None:
    """`migrate` as a one-shot container applies migrations/ and exits 0; again, nothing to do; a bad URL says so."""
    dsn = tcp_dsn(pg_dsn)
    run = ("run", "--rm", "--network", "host", "--env", f"POINTGATE_DATABASE_URL={dsn}", image, "migrate")
    first = podman(*run, check=False)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "schema is current" in first.stdout
    assert fetch(pg_dsn, "SELECT count(*) AS n FROM measurepoints")[0]["n"] == 0  # the view exists
    again = podman(*run, check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 migration(s) applied" in again.stdout, again.stdout
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    bad = podman("run", "--rm", "--network", "host", "--env", f"POINTGATE_DATABASE_URL={closed}", image, "migrate",
                 check=False)  # fmt: skip
    assert bad.returncode != 0
    # one line for the operator, no traceback (podman's own log lines, `time="…" level=…`, aside)
    said = [line for line in bad.stderr.splitlines() if line.strip() and not line.startswith('time="')]
    assert len(said) == 1 and said[0].startswith("pointgate: "), bad.stderr


@pytest.fixture
def on_host(image: str, migrated_dsn: str) -> Iterator[Container]:
    container = start_on_host(image, tcp_dsn(migrated_dsn))
    try:
        container.wait_ready()
        yield container
    finally:
        container.remove()


def test_device_gets_200_and_rows_are_in_the_session_database(on_host: Container, migrated_dsn: str) -> None:
    """With POINTGATE_DATABASE_URL at the session's PostgreSQL, the API sample gets 200 and its rows are there."""
    reply = send_sample(on_host.mqtt_port)
    assert reply["code"] == 200, reply
    rows = fetch(migrated_dsn, "SELECT point FROM measurepoints WHERE device_key = 'dev1'")
    assert {r["point"] for r in rows} == SAMPLE_POINTS
    assert '"database": "external"' in on_host.logs()


def test_sigterm_under_load_drains_and_exits_zero(on_host: Container, migrated_dsn: str) -> None:
    """`podman stop` (SIGTERM, SIGKILL after 10 s) under load: exit 0 inside 10 s, nothing acknowledged lost."""
    publisher = Publisher(on_host.mqtt_port, total=3000)
    threading.Thread(target=publisher.run, daemon=True).start()
    deadline = time.monotonic() + 60
    while len(publisher.acknowledged()) < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(publisher.acknowledged()) >= 200, on_host.logs()[-3000:]
    started = time.monotonic()
    podman("stop", "--time", "10", on_host.name, timeout=60)
    elapsed = time.monotonic() - started
    exit_code = inspect(on_host.name, "{{.State.ExitCode}}")
    time.sleep(0.3)  # let paho's thread hand over the last PUBACKs it read before the connection closed
    acknowledged = publisher.acknowledged()
    publisher.close()
    logs = on_host.logs()
    assert exit_code == "0", logs[-3000:]  # 137 would mean podman had to SIGKILL it
    assert elapsed < 10, elapsed
    missing = acknowledged - stored_indexes(migrated_dsn)
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"
    assert "draining" in logs and "pointgate stopped" in logs
