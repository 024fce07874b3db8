"""Structured logging: one structlog pipeline for our own loggers and for the libraries' stdlib loggers.

Every line carries an ISO-8601 UTC ``timestamp``, ``level``, ``event`` and ``logger``, plus whatever is
bound with :mod:`structlog.contextvars` for the message being handled (``product``, ``device``,
``topic``, ``msg_id``), so a rejected message is one line an operator can grep by device.

In a container (stdout not a TTY) the lines are JSON objects; on a terminal they are the readable
console rendering. amqtt, asyncpg, aiohttp and transitions log through :mod:`logging`; their records
go through the same processors via :class:`structlog.stdlib.ProcessorFormatter` on the root handler,
so there is one format on stdout whoever wrote the line.

Policy:

- **No payload bodies at INFO or above.** A payload is device data and can be 512 KiB; log its size,
  the topic and the reply code. A body may appear only at DEBUG, which is off in production.
- **Never log a device secret, a password or a signature**, at any level.
- Device faults (a bad payload, a bad signature) are INFO/WARNING lines with the reply code, never
  ERROR: ERROR means something on our side needs an operator.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog
from structlog.typing import Processor

__all__ = ["configure_logging", "get_logger"]

# Libraries that log every packet or state change at INFO/DEBUG; quiet unless we are debugging.
_NOISY_LOGGERS = ("amqtt", "transitions")


class _PointgateHandler(logging.StreamHandler[TextIO]):
    """The root handler we install; its own class so reconfiguring replaces it and nothing else.

    Without an explicit stream it writes to whatever ``sys.stdout`` is at the time of each line, so a
    replaced stdout (a test runner's capture, a closed pipe swapped out) never receives stale writes.
    """

    def __init__(self, stream: TextIO | None = None, *, stderr: bool = False) -> None:
        self._fixed = stream
        self._stderr = stderr
        super().__init__(stream or sys.stdout)

    @property
    def stream(self) -> TextIO:
        if self._fixed is not None:
            return self._fixed
        return sys.stderr if self._stderr else sys.stdout

    @stream.setter
    def stream(self, value: TextIO) -> None:
        if self._fixed is not None:
            self._fixed = value


def _shared_processors() -> list[Processor]:
    """Processors that build the event dict, for structlog and stdlib records alike."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        structlog.processors.StackInfoRenderer(),
    ]


def _renderer(json: bool, stream: TextIO) -> list[Processor]:
    """The last processors: turn the event dict into one line of text."""
    if json:
        # format_exc_info puts the traceback in an "exception" string, so it stays on one JSON line.
        return [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    # plain_traceback: the default rich formatter shows locals, which may hold a device secret.
    return [
        structlog.dev.ConsoleRenderer(colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback),
    ]


def configure_logging(
    *, level: str = "INFO", json: bool | None = None, stream: TextIO | None = None, stderr: bool = False
) -> None:
    """Send every log line, ours and the libraries', to ``stream`` (default stdout) at ``level``.

    ``json=None`` picks JSON lines unless ``stream`` is a terminal. ``stderr=True`` (commands whose stdout is
    their result, such as ``device add`` printing a secret) sends the lines to standard error instead.
    Safe to call again: the handler is
    replaced, not added. Call it before the first log line: loggers cache their configuration.
    """
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}; expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    out = stream if stream is not None else (sys.stderr if stderr else sys.stdout)
    as_json = not out.isatty() if json is None else json

    shared = _shared_processors()
    structlog.configure(
        processors=[
            # Drop filtered-out calls first, before any processor spends time on them.
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )

    handler = _PointgateHandler(stream, stderr=stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            # ExtraAdder: a stdlib call's extra={"client_id": ...} becomes a key on the line.
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *_renderer(as_json, out)],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _PointgateHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)

    noisy_level = logging.NOTSET if numeric <= logging.DEBUG else max(numeric, logging.WARNING)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(noisy_level)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structured logger named ``name`` (use the module's ``__name__``)."""
    return structlog.stdlib.get_logger(name)
