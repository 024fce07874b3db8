"""What every ``pointgate`` command shares: the database options, the settings, and the one error format.

Every failure an operator can cause or meet ends the same way: lines on stderr starting with
``pointgate: error:`` and a non-zero exit, never a traceback. Exit 2 means the input was wrong (a setting, a
file, a model, a usage error); exit 1 means something failed while doing the work (the database, a device
that does not exist, a port in use).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from service.errors import ConfigError, PointgateError
from service.settings import Settings, load_settings

T = TypeVar("T")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML settings file (env POINTGATE_CONFIG).")]
DatabaseOpt = Annotated[
    str | None, typer.Option("--database-url", help="PostgreSQL DSN; unset: embedded PostgreSQL under --data-dir.")
]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="Where the embedded database and keys live.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``message`` (each of its lines) in the one error format and exit with ``code``."""
    for line in message.splitlines() or [""]:
        typer.echo(f"pointgate: error: {line}", err=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    """One warning line on stderr, in the same format as errors."""
    typer.echo(f"pointgate: warning: {message}", err=True)


def exit_code(exc: BaseException) -> int:
    """2 when the operator's input is wrong, 1 when the work failed."""
    return 2 if isinstance(exc, ConfigError) else 1


def describe(exc: BaseException) -> str:
    """An expected failure in words, for the error line."""
    import asyncpg

    from service.storage.database import describe_database_error

    if isinstance(exc, (asyncpg.PostgresError, asyncpg.InterfaceError)):
        return describe_database_error(exc)
    if isinstance(exc, OSError) and not isinstance(exc, PointgateError):
        return describe_database_error(exc) if _is_network(exc) else str(exc)
    return str(exc) or type(exc).__name__


def _is_network(exc: OSError) -> bool:
    import socket

    return isinstance(exc, (ConnectionError, socket.gaierror, TimeoutError))


def guard(action: Callable[[], T]) -> T:
    """Run ``action``; turn every expected failure into the one error format and an exit code."""
    import asyncpg

    try:
        return action()
    except (PointgateError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        fail(describe(exc), exit_code(exc))


def settings_from(ctx: typer.Context, **overrides: Any) -> Settings:
    """The effective settings: this command's flags over the flags given before it (``pointgate --x device --y``)."""
    if isinstance(ctx.obj, Settings) and not any(v is not None for v in overrides.values()):
        return ctx.obj  # a caller embedding the app may hand down finished Settings
    base: dict[str, Any] = {}
    for level in _contexts(ctx):
        if isinstance(level.obj, dict):
            base.update({k: v for k, v in level.obj.items() if v is not None})
    base.update({k: v for k, v in overrides.items() if v is not None})
    config_file = base.pop("config", None)
    return guard(lambda: load_settings(base, config_file=config_file))


def _contexts(ctx: typer.Context) -> list[Any]:
    chain: list[Any] = []
    level: Any = ctx
    while level is not None:
        chain.append(level)
        level = level.parent
    return list(reversed(chain))


def remember(ctx: typer.Context, **values: Any) -> None:
    """Keep a group's shared options on its context, for the commands below it."""
    ctx.obj = {k: v for k, v in values.items() if v is not None}


def unknown_environment(known: set[str], environ: dict[str, str] | None = None) -> list[str]:
    """``POINTGATE_*`` variables that name no setting, each with a suggestion when one is close."""
    import difflib

    env = os.environ if environ is None else environ
    problems: list[str] = []
    for name in sorted(env):
        if not name.startswith("POINTGATE_") or name in known:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(f"unknown environment variable {name} is ignored{hint}")
    return problems
