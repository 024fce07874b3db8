"""service.ops.logs: one structured pipeline for our loggers and the libraries' stdlib loggers."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import structlog

from service.ops.logs import configure_logging, get_logger


class _Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Put structlog and the stdlib root logger back as they were: the configuration is global."""
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in ("amqtt", "transitions")}
    yield
    structlog.configure(**config)
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, noisy_level in noisy.items():
        logging.getLogger(name).setLevel(noisy_level)
    structlog.contextvars.clear_contextvars()


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_line_has_timestamp_level_event_logger() -> None:
    """In JSON mode a log call is one JSON object with a UTC ISO-8601 timestamp, level, event, logger."""
    out = io.StringIO()
    configure_logging(json=True, stream=out)
    get_logger("pointgate.test").info("message rejected", code=1204)
    [line] = _lines(out)
    assert line["event"] == "message rejected"
    assert line["level"] == "info"
    assert line["logger"] == "pointgate.test"
    assert line["code"] == 1204
    assert datetime.fromisoformat(line["timestamp"]).utcoffset() == timedelta(0)


def test_bound_contextvars_appear_on_the_line() -> None:
    """product/device/topic bound with structlog.contextvars show up on every line logged meanwhile."""
    out = io.StringIO()
    configure_logging(json=True, stream=out)
    log = get_logger("pointgate.test")
    with structlog.contextvars.bound_contextvars(product="inv01", device="dev7", topic="/sys/inv01/dev7/x"):
        log.info("inside")
    log.info("outside")
    inside, outside = _lines(out)
    assert (inside["product"], inside["device"], inside["topic"]) == ("inv01", "dev7", "/sys/inv01/dev7/x")
    assert "device" not in outside


def test_stdlib_records_go_through_the_json_pipeline() -> None:
    """A stdlib logger's record (amqtt, asyncpg...) comes out as the same JSON shape, %-args and extra applied."""
    out = io.StringIO()
    configure_logging(json=True, stream=out)
    with structlog.contextvars.bound_contextvars(device="dev7"):
        logging.getLogger("amqtt.broker").warning("client %s went away", "c1", extra={"client_id": "c1"})
    [line] = _lines(out)
    assert line["event"] == "client c1 went away"
    assert line["client_id"] == "c1"
    assert line["level"] == "warning"
    assert line["logger"] == "amqtt.broker"
    assert line["device"] == "dev7"
    assert datetime.fromisoformat(line["timestamp"]).utcoffset() == timedelta(0)


def test_amqtt_info_is_quiet_unless_debug() -> None:
    """amqtt and transitions INFO lines are dropped at INFO level and kept at DEBUG."""
    out = io.StringIO()
    configure_logging(level="INFO", json=True, stream=out)
    logging.getLogger("amqtt.broker").info("chatty")
    logging.getLogger("transitions.core").info("chatty")
    assert out.getvalue() == ""
    configure_logging(level="DEBUG", json=True, stream=out)
    logging.getLogger("amqtt.broker").info("chatty")
    assert [line["event"] for line in _lines(out)] == ["chatty"]


def test_level_filters_our_own_loggers() -> None:
    """Below the configured level nothing is written; at or above it the line is."""
    out = io.StringIO()
    configure_logging(level="WARNING", json=True, stream=out)
    log = get_logger("pointgate.test")
    log.info("hidden")
    log.warning("shown")
    assert [line["event"] for line in _lines(out)] == ["shown"]


def test_configuring_twice_does_not_duplicate_lines() -> None:
    """Calling configure_logging again replaces its handler, so each call still writes one line."""
    first, second = io.StringIO(), io.StringIO()
    configure_logging(json=True, stream=first)
    configure_logging(json=True, stream=second)
    get_logger("pointgate.test").info("once")
    logging.getLogger("asyncpg").warning("once too")
    assert first.getvalue() == ""
    assert [line["event"] for line in _lines(second)] == ["once", "once too"]


def test_traceback_stays_on_one_json_line() -> None:
    """An exception logged in JSON mode is one line with the traceback in an "exception" field."""
    out = io.StringIO()
    configure_logging(json=True, stream=out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        get_logger("pointgate.test").exception("write failed")
    [line] = _lines(out)
    assert line["event"] == "write failed"
    assert "RuntimeError: boom" in line["exception"]


def test_console_mode_is_not_json() -> None:
    """json=False renders the readable console format: event text and key=value, not a JSON object."""
    out = io.StringIO()
    configure_logging(json=False, stream=out)
    get_logger("pointgate.test").info("device connected", device="dev7")
    text = out.getvalue()
    assert "device connected" in text
    assert "device=dev7" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_auto_mode_picks_json_off_a_terminal_and_console_on_one() -> None:
    """json=None writes JSON to a pipe or file (containers) and the console format to a terminal."""
    piped, terminal = io.StringIO(), _Terminal()
    configure_logging(stream=piped)
    get_logger("pointgate.test").info("hello")
    assert _lines(piped)[0]["event"] == "hello"
    configure_logging(stream=terminal)
    get_logger("pointgate.test").info("hello")
    assert "hello" in terminal.getvalue()
    with pytest.raises(json.JSONDecodeError):
        json.loads(terminal.getvalue())


def test_unknown_level_is_refused_with_its_name() -> None:
    """A misspelt level is an error naming the value, not a silent default."""
    with pytest.raises(ValueError, match="'LOUD'"):
        configure_logging(level="LOUD", stream=io.StringIO())
