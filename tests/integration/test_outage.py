"""PostgreSQL going away and coming back: the service stays up, answers no 200 meanwhile, and loses nothing."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from service.storage.embedded import EmbeddedPostgres
from tests.support import SAMPLE, Device, RunningService, fetch, resume_topic

TOPIC = resume_topic()


def readyz(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_database_restart_loses_nothing_acknowledged(
    start_service: Callable[..., RunningService], tmp_path: Path
) -> None:
    """With PostgreSQL stopped there is no 200 and no PUBACK; once it is back every request is stored and answered."""
    # pytest's tmp_path is mode 700 under root: the unprivileged PostgreSQL user could not reach it
    scratch = Path(tempfile.mkdtemp(prefix="pointgate-outage-"))
    scratch.chmod(0o755)
    pg = EmbeddedPostgres(scratch / "db", durable=False)
    dsn = pg.start()
    try:
        service = start_service(database_url=dsn)
        dev = Device(service.port)
        assert dev.connect() == 0
        assert dev.request(TOPIC, SAMPLE)["code"] == 200  # schema applied, writer connected

        pg.stop()
        pending = []
        for i in range(5):
            request = {
                **SAMPLE,
                "id": f"out{i}",
                "params": {"measurepoints": {"temp": float(i)}, "time": 1700000100000 + i},
            }
            pending.append(dev.publish(TOPIC, request))
        time.sleep(1.5)
        assert not any(info.is_published() for info in pending), "PUBACK before the data was committed"
        assert not [m for m in dev.messages if b'"out' in m[1]], "a reply went out before the commit"
        status, body = readyz(service.http_port)
        assert status == 503 and body["checks"]["database"] != "ok"  # type: ignore[index]

        pg.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(info.is_published() for info in pending):
            time.sleep(0.1)
        assert all(info.is_published() for info in pending), "PUBACKs did not arrive after the database returned"
        replies = {}
        for topic, payload, _ in list(dev.messages):
            reply = json.loads(payload)
            if topic == TOPIC + "_reply" and str(reply["id"]).startswith("out"):
                replies[reply["id"]] = reply["code"]
        assert replies == {f"out{i}": 200 for i in range(5)}
        stored = fetch(dsn, "SELECT value_num FROM measurepoints WHERE ts > to_timestamp(1700000050) ORDER BY ts")
        assert [r["value_num"] for r in stored] == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert readyz(service.http_port)[0] == 200
        dev.close()
    finally:
        pg.stop()
        shutil.rmtree(scratch, ignore_errors=True)
