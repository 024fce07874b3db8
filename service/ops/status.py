"""The status page at ``/`` on the ops listener: what an operator wants at a glance, as plain HTML.

Server-rendered on each request, no build step, no JavaScript (it reloads itself every few seconds with a
``<meta refresh>``): connected devices, messages and points per second, refusals by code with the latest
examples (never their payloads), the write queue and the database, and the thing models loaded.
`render` is a pure function of a `Snapshot`; `Rates` turns the Prometheus counters into per-second figures.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, field
from html import escape
from typing import Any

from prometheus_client import CollectorRegistry

REFRESH_SECONDS = 5
_WINDOW_SECONDS = 10.0


@dataclass(frozen=True)
class Figures:
    """The page's figures read from a Prometheus registry: this process's, or the workers' added up."""

    connected_devices: int = 0
    messages_total: float = 0.0
    points_total: float = 0.0
    write_queue_points: int = 0


def read_figures(registry: CollectorRegistry) -> Figures:
    """Collect ``registry`` once and pick the page's figures out of it."""
    values: dict[str, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in _FIGURES:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return Figures(
        connected_devices=int(values.get("pointgate_connected_devices", 0)),
        messages_total=values.get("pointgate_messages_total", 0.0),
        points_total=values.get("pointgate_points_written_total", 0.0),
        write_queue_points=int(values.get("pointgate_write_queue_points", 0)),
    )


_FIGURES = frozenset(
    (
        "pointgate_connected_devices",
        "pointgate_messages_total",
        "pointgate_points_written_total",
        "pointgate_write_queue_points",
    )
)


class Rates:
    """Messages and points per second over the last ten seconds, from samples taken once a second."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._samples: deque[tuple[float, float, float]] = deque()

    def sample(self, now: float | None = None) -> None:
        """Take one sample of the counters (the service calls this every second)."""
        now = time.monotonic() if now is None else now
        figures = read_figures(self._registry)
        self._samples.append((now, figures.messages_total, figures.points_total))
        while len(self._samples) > 2 and now - self._samples[0][0] > _WINDOW_SECONDS:
            self._samples.popleft()

    def per_second(self) -> tuple[float, float]:
        """(messages/s, points/s); zero until two samples exist."""
        if len(self._samples) < 2:
            return 0.0, 0.0
        (t0, m0, p0), (t1, m1, p1) = self._samples[0], self._samples[-1]
        span = max(t1 - t0, 1e-9)
        return (m1 - m0) / span, (p1 - p0) / span

    async def run(self) -> None:
        """Sample every second until cancelled."""
        while True:
            self.sample()
            await asyncio.sleep(1.0)


@dataclass(frozen=True)
class Example:
    """A recent refusal, as the page shows it."""

    received_at: str
    product_key: str
    device_key: str
    topic: str
    reason: str


@dataclass(frozen=True)
class ModelRow:
    """A loaded thing model."""

    product_key: str
    points: int
    path: str


@dataclass(frozen=True)
class Parts:
    """What only a serve (or each worker of one) knows: refusals by code with the latest examples, notes, models.

    A worker sends its parts to the supervisor with its status (`to_json`); the supervisor adds them up (`merge`).
    """

    rejections: Mapping[int, int] = field(default_factory=dict)
    examples: Mapping[int, Sequence[Example]] = field(default_factory=dict)
    notes: Mapping[str, str] = field(default_factory=dict)
    models: Sequence[ModelRow] = ()

    def to_json(self, *, with_models: bool) -> dict[str, object]:
        """A JSON-ready form; ``with_models`` false leaves the model list out (sent only when it changed)."""
        out: dict[str, object] = {
            "rejections": {str(code): count for code, count in self.rejections.items()},
            "examples": {str(code): [list(astuple(e)) for e in found] for code, found in self.examples.items()},
            "notes": dict(self.notes),
        }
        if with_models:
            out["models"] = [list(astuple(m)) for m in self.models]
        return out

    @staticmethod
    def from_json(data: Mapping[str, Any], models: Sequence[ModelRow] = ()) -> Parts:
        """Read `to_json`'s form; ``models`` stands in when the message carries none."""
        return Parts(
            rejections={int(code): int(count) for code, count in data["rejections"].items()},
            examples={int(code): [Example(*e) for e in found] for code, found in data["examples"].items()},
            notes={str(k): str(v) for k, v in data["notes"].items()},
            models=[ModelRow(*m) for m in data["models"]] if "models" in data else models,
        )


def merge(parts: Mapping[str, Parts]) -> Parts:
    """The parts of several workers (keyed by worker name) as one: counts added, the latest examples kept."""
    rejections: Counter[int] = Counter()
    examples: dict[int, list[Example]] = {}
    notes: dict[str, str] = {}
    models: Sequence[ModelRow] = ()
    for name, part in parts.items():
        rejections.update(part.rejections)
        for code, found in part.examples.items():
            examples.setdefault(code, []).extend(found)
        notes.update({f"{key} ({name})": note for key, note in part.notes.items()})
        models = models or part.models
    latest = {
        code: sorted(found, key=lambda e: e.received_at, reverse=True)[:EXAMPLES] for code, found in examples.items()
    }
    return Parts(dict(rejections), latest, notes, models)


EXAMPLES = 3  # latest refusals shown per code


@dataclass(frozen=True)
class Snapshot:
    """Everything the page shows, gathered by the service (or the supervisor of its workers)."""

    version: str
    uptime_s: float
    figures: Figures
    messages_per_s: float
    points_per_s: float
    checks: Mapping[str, str]
    parts: Parts
    keeping_rejected: bool = True


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:70em}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse}td,th{padding:.2em .8em .2em 0;text-align:left;vertical-align:top}
th{font-weight:600;border-bottom:1px solid #ccc}.figures td{font-size:1.6em;font-weight:600;padding-right:2em}
.figures th{border:0;font-weight:400;color:#555}.ok{color:#17622b}.bad{color:#a4161a;font-weight:600}
.muted{color:#666}code{font-size:.95em}
"""


def _figure(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 or value == int(value) else f"{value:,.1f}"


def render(snap: Snapshot) -> str:
    """The page as HTML (every value escaped)."""
    ready = all(result == "ok" for result in snap.checks.values())
    figures = snap.figures
    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',  # no /favicon.ico request (and no 404 in the console)
        f"<title>pointgate {escape(snap.version)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>pointgate {escape(snap.version)}</h1>",
        f'<p class="{"ok" if ready else "bad"}" id="state">{"ready" if ready else "not ready"}'
        f' <span class="muted">· up {_figure(snap.uptime_s)} s · refreshes every {REFRESH_SECONDS} s</span></p>',
        '<table class="figures"><tr>',
        f'<td id="connected">{snap.figures.connected_devices}</td>',
        f'<td id="msg-rate">{_figure(snap.messages_per_s)}</td>',
        f'<td id="point-rate">{_figure(snap.points_per_s)}</td>',
        f'<td id="queue">{snap.figures.write_queue_points}</td>',
        "</tr><tr><th>connected devices</th><th>messages/s</th><th>points/s</th><th>points waiting to commit</th>",
        "</tr></table>",
        f'<p class="muted">since start: <span id="messages-total">{_figure(figures.messages_total)}</span> messages, '
        f'<span id="points-total">{_figure(snap.figures.points_total)}</span> points committed</p>',
        "<h2>Health</h2><table><tr><th>check</th><th>state</th></tr>",
    ]
    for name, result in snap.checks.items():
        css = "ok" if result == "ok" else "bad"
        out.append(f'<tr><td>{escape(name)}</td><td class="{css}">{escape(result)}</td></tr>')
    for name, note in snap.parts.notes.items():
        out.append(f'<tr><td>{escape(name)}</td><td class="bad">{escape(note)}</td></tr>')
    out.append("</table>")
    out.append('<h2>Refused requests</h2><table id="rejections"><tr><th>code</th><th>count</th><th>latest</th></tr>')
    if not snap.parts.rejections:
        out.append('<tr><td colspan="3" class="muted">none since start</td></tr>')
    for code, count in sorted(snap.parts.rejections.items()):
        examples = "".join(
            f"<div><code>{escape(e.received_at)}</code> {escape(e.product_key)}/{escape(e.device_key)}: "
            f"{escape(e.reason)}</div>"
            for e in snap.parts.examples.get(code, ())
        )
        out.append(f"<tr><td>{code}</td><td>{count}</td><td>{examples}</td></tr>")
    out.append("</table>")
    kept = (
        "kept for <code>pointgate rejected list / show / replay</code>"
        if snap.keeping_rejected
        else "not kept (keep_rejected = false)"
    )
    out.append(f'<p class="muted">Refused requests are {kept}.</p>')
    out.append('<h2>Thing models</h2><table id="models"><tr><th>product</th><th>points</th><th>file</th></tr>')
    for model in snap.parts.models:
        out.append(
            f"<tr><td>{escape(model.product_key)}</td><td>{model.points}</td>"
            f'<td class="muted">{escape(model.path)}</td></tr>'
        )
    out.append("</table>")
    out.append('<p class="muted"><a href="/metrics">/metrics</a> · <a href="/readyz">/readyz</a></p>')
    out.append("</body></html>")
    return "\n".join(out)
