"""service.ops.http: the ops endpoint, served for real on an ephemeral loopback port."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import pytest

from service.ops import metrics
from service.ops.http import Check, OpsServer

Serve = Callable[[Mapping[str, Check]], Awaitable[OpsServer]]


async def _ok() -> str | None:
    return None


async def _db_down() -> str | None:
    return "connection refused"


async def _hangs() -> str | None:
    await asyncio.Event().wait()
    return None


async def _raises() -> str | None:
    raise OSError("pool closed")


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start OpsServers on 127.0.0.1:0 and stop them after the test."""
    servers: list[OpsServer] = []

    async def start(checks: Mapping[str, Check]) -> OpsServer:
        server = OpsServer("127.0.0.1", 0, checks)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()
    metrics.DRAINING.set(0)


async def _get(server: OpsServer, path: str) -> tuple[int, Any, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{server.port}{path}") as response,
    ):
        body = await response.json() if response.content_type == "application/json" else await response.text()
        return response.status, body, response.headers["Content-Type"]


async def test_port_zero_binds_a_real_port(serve: Serve) -> None:
    """With port 0 the server binds an ephemeral port and reports it in .port."""
    server = await serve({})
    assert server.port > 0


async def test_livez_answers_ok(serve: Serve) -> None:
    """GET /livez is 200 {"status": "ok"}, whatever the readiness checks say."""
    server = await serve({"database": _db_down})
    status, body, _ = await _get(server, "/livez")
    assert (status, body) == (200, {"status": "ok"})


async def test_readyz_is_200_when_every_check_passes(serve: Serve) -> None:
    """GET /readyz is 200 with each check reported "ok" when all return None."""
    server = await serve({"database": _ok, "models": _ok})
    status, body, _ = await _get(server, "/readyz")
    assert status == 200
    assert body == {"status": "ready", "checks": {"database": "ok", "models": "ok"}}


async def test_readyz_is_503_with_the_failing_reason(serve: Serve) -> None:
    """A check returning a reason makes /readyz 503, with that reason under the check's name."""
    server = await serve({"database": _db_down, "models": _ok})
    status, body, _ = await _get(server, "/readyz")
    assert status == 503
    assert body == {"status": "not ready", "checks": {"database": "connection refused", "models": "ok"}}


async def test_readyz_reports_a_raising_check_as_failing(serve: Serve) -> None:
    """A check that raises fails readiness with the exception named, instead of breaking the probe."""
    server = await serve({"database": _raises})
    status, body, _ = await _get(server, "/readyz")
    assert status == 503
    assert "OSError" in body["checks"]["database"]


async def test_hanging_check_times_out_within_a_second(serve: Serve) -> None:
    """A check that never returns is reported "timeout" and the probe still answers in about 1 s."""
    server = await serve({"database": _hangs, "models": _ok})
    started = time.monotonic()
    status, body, _ = await _get(server, "/readyz")
    elapsed = time.monotonic() - started
    assert status == 503
    assert body["checks"] == {"database": "timeout", "models": "ok"}
    assert elapsed < 1.8


async def test_draining_makes_readyz_fail_and_sets_the_gauge(serve: Serve) -> None:
    """After set_draining(), /readyz is 503 with a "draining" check and pointgate_draining is 1."""
    server = await serve({"database": _ok})
    assert (await _get(server, "/readyz"))[0] == 200
    server.set_draining()
    status, body, _ = await _get(server, "/readyz")
    assert status == 503
    assert body == {"status": "not ready", "checks": {"database": "ok", "draining": "draining"}}
    assert metrics.REGISTRY.get_sample_value("pointgate_draining") == 1


async def test_metrics_serves_the_registry(serve: Serve) -> None:
    """GET /metrics is Prometheus text holding build info and the current value of a counter."""
    metrics.REPLIES.labels(code="1206").inc()
    expected = metrics.REGISTRY.get_sample_value("pointgate_replies_total", {"code": "1206"})
    server = await serve({})
    status, body, content_type = await _get(server, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    assert "pointgate_build_info{" in body
    assert f'pointgate_replies_total{{code="1206"}} {expected}' in body


async def test_stop_closes_the_port(serve: Serve) -> None:
    """After stop() the port no longer accepts connections."""
    server = await serve({})
    await server.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await _get(server, "/livez")
