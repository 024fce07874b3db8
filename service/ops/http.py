"""The ops HTTP endpoint: ``/livez``, ``/readyz``, ``/metrics`` and the status page ``/``, apart from MQTT.

Kubernetes semantics: ``/livez`` answers 200 as long as the event loop does (a failure means
"restart me"); ``/readyz`` answers 200 only when every readiness check passes and the service is not
draining (a failure means "send no new traffic here"), and 503 otherwise, with each check's result in
a JSON body (plus ``notes``: things to look at that do not make the service unready). Probes read the status
code; the body is for the operator.

A check is an ``async`` callable returning ``None`` when healthy or a short reason string. Checks
run concurrently, each under a timeout, so one hung dependency cannot hang the probe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence

from aiohttp import web

from service.ops import metrics
from service.ops.logs import get_logger

__all__ = ["Check", "OpsServer", "run_checks"]

Check = Callable[[], Awaitable[str | None]]
Render = Callable[[], tuple[bytes, str]]

_OK = "ok"
_log = get_logger(__name__)


class OpsServer:
    """An aiohttp server for the ops endpoints; ``port`` holds the bound port once started."""

    def __init__(
        self,
        host: str,
        port: int,
        checks: Mapping[str, Check],
        *,
        check_timeout: float = 1.0,
        routes: Sequence[web.RouteDef] = (),
        render: Render = metrics.render,
        notes: Callable[[], Mapping[str, str]] | None = None,
        status_page: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None,
    ) -> None:
        self.host = host
        self._routes = list(routes)  # more endpoints on this listener (the broker auth endpoints)
        self.port = port
        self._checks = dict(checks)
        self._notes = notes
        self._status_page = status_page
        self._check_timeout = check_timeout
        self._render = render
        self._draining = False
        self._was_ready: bool | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Bind and serve; with port 0 the OS picks a free port, readable in ``port`` afterwards."""
        app = web.Application()
        app.add_routes(
            [
                web.get("/livez", self._livez),
                web.get("/readyz", self._readyz),
                web.get("/metrics", self._metrics),
                *self._routes,
            ]
        )
        if self._status_page is not None:
            app.add_routes([web.get("/", self._status_page)])
        # No access log: probes and scrapes hit these every few seconds and would drown the real lines.
        # A short shutdown_timeout: a scrape in flight must not hold up the drain.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        _log.info("ops endpoint listening", host=self.host, port=self.port)

    async def stop(self) -> None:
        """Close the listener and any open connection; safe to call twice or before ``start``."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def set_draining(self) -> None:
        """Make ``/readyz`` fail with reason ``draining`` from now on (shutdown has begun)."""
        self._draining = True
        metrics.DRAINING.set(1)

    async def _livez(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        checks = await run_checks(self._checks, self._check_timeout)
        if self._draining:
            checks["draining"] = "draining"
        ready = all(result == _OK for result in checks.values())
        if ready != self._was_ready:
            # One line per change of state, not one per probe.
            failing = {name: result for name, result in checks.items() if result != _OK}
            if ready:
                _log.info("ready")
            else:
                _log.warning("not ready", failing=failing)
            self._was_ready = ready
        body: dict[str, object] = {"status": "ready" if ready else "not ready", "checks": checks}
        notes = dict(self._notes()) if self._notes is not None else {}
        if notes:
            # worth an operator's attention but no reason to take traffic away (e.g. a refused model reload:
            # the previous models keep working)
            body["notes"] = notes
        return web.json_response(body, status=200 if ready else 503)

    async def check_results(self) -> dict[str, str]:
        """Every check's current result (for the status page)."""
        return await run_checks(self._checks, self._check_timeout)

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = self._render()
        return web.Response(body=body, headers={"Content-Type": content_type})


async def run_checks(checks: Mapping[str, Check], each_s: float) -> dict[str, str]:
    """Run every check concurrently, each under ``each_s`` seconds: name → ``"ok"`` or the reason it fails."""
    names = list(checks)
    results = await asyncio.gather(*(_run_check(checks[name], each_s) for name in names))
    return dict(zip(names, results, strict=True))


async def _run_check(check: Check, each_s: float) -> str:
    try:
        async with asyncio.timeout(each_s):
            reason = await check()
    except TimeoutError:
        return "timeout"
    except Exception as exc:
        # A check that raises is a failing check, not a failing probe.
        return f"error: {type(exc).__name__}: {exc}"
    return _OK if reason is None else reason
