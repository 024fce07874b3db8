"""Fixtures of the container stage: podman, the bootstrapped base images, the project's image built once.

Every test module here sets `PYTESTMARK`: ``container``, ``slow`` (so the quick ``-m "not slow"`` loop leaves
them out) and a timeout with room for a cold bootstrap. They are skipped, with the reason, only where podman
cannot run. The session's numbers (how the bases were obtained, the build time, the image size) are printed
at the end of the run.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import pytest

from tests.container.podman import BaseImages, build_project_image, image_size, podman, unusable_reason

_REPORT: dict[str, Any] = {}

PYTESTMARK = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="session")
def podman_ready() -> None:
    """Skip (with the reason) where podman cannot run; elsewhere nothing."""
    reason = unusable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def base_images(podman_ready: None) -> BaseImages:
    """The stand-ins for python:3.11-slim and postgres, from the cache or bootstrapped from Debian's mirror."""
    began = time.monotonic()
    base = BaseImages.for_recipe().ensure()
    _REPORT["base images"] = f"{round(time.monotonic() - began, 1)} s ({'; '.join(base.how.values())})"
    return base


@pytest.fixture(scope="session")
def image(base_images: BaseImages) -> Iterator[str]:
    """The image built from the repository's Dockerfile as shipped, tagged for this session only."""
    tag = f"localhost/pointgate-test/pointgate:{uuid.uuid4().hex[:12]}"
    seconds = build_project_image(base_images, tag)
    size, base_size = image_size(tag), image_size(base_images.python)
    _REPORT["image build"] = f"{seconds} s"
    _REPORT["image size"] = (
        f"{size / 1e6:.0f} MB ({(size - base_size) / 1e6:.0f} MB over the {base_size / 1e6:.0f} MB python stand-in)"
    )
    try:
        yield tag
    finally:
        # the name only: its layers stay as the build cache of the next session
        podman("untag", tag, check=False)


def tcp_dsn(dsn: str) -> str:
    """``dsn`` over TCP on loopback: the session's server answers on its socket and on 127.0.0.1:port."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or ""])[0]
    if not host.startswith("/"):
        return dsn  # already host:port (an external POINTGATE_TEST_DATABASE_URL)
    port = query.get("port", ["5432"])[0]
    user = parts.username or "postgres"
    return urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{port}", query=""))


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _REPORT:
        terminalreporter.section("container stage")
        for key, value in _REPORT.items():
            terminalreporter.write_line(f"{key}: {value}")


def record(key: str, value: str) -> None:
    """Add a line to the container stage's summary at the end of the run."""
    _REPORT[key] = value
