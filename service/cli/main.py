"""The ``pointgate`` command: serve, migrate, model check, config show, device …, product ….

Every option is also a ``POINTGATE_<NAME>`` environment variable (through `Settings`); a flag wins over the
environment, which wins over the TOML file. Operator mistakes end with one clear line on stderr and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from service.errors import ConfigError, PointgateError
from service.settings import Settings, load_settings

app = typer.Typer(
    name="pointgate",
    help="MQTT ingestion broker for EnOS-protocol devices: validates measurement points and stores them in PostgreSQL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Thing models.", no_args_is_help=True)
config_app = typer.Typer(help="Settings.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(config_app, name="config")

T = TypeVar("T")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML settings file (env POINTGATE_CONFIG).")]
DatabaseOpt = Annotated[
    str | None, typer.Option("--database-url", help="PostgreSQL DSN; unset: embedded PostgreSQL under --data-dir.")
]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="Where the embedded database and keys live.")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"pointgate: {message}", err=True)
    return typer.Exit(code)


def _guard(action: Callable[[], T]) -> T:
    """Run ``action``; turn our own errors into a message and an exit code."""
    try:
        return action()
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    except PointgateError as exc:
        raise _fail(str(exc), 1) from None
    except OSError as exc:
        raise _fail(str(exc), 1) from None


def _settings(ctx: typer.Context, **overrides: Any) -> Settings:
    base: dict[str, Any] = dict(ctx.obj or {}) if isinstance(ctx.obj, dict) else {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    config_file = base.pop("config", None)
    return _guard(lambda: load_settings(base, config_file=config_file))


@app.callback()
def main_options(
    ctx: typer.Context, config: ConfigOpt = None, database_url: DatabaseOpt = None, data_dir: DataDirOpt = None
) -> None:
    """Options every command shares."""
    from service.ops.logs import configure_logging

    # stdout is each command's result (a secret, JSON); diagnostics go to stderr. `serve` reconfigures.
    configure_logging(level="INFO", json=False, stderr=True)
    ctx.obj = {"config": config, "database_url": database_url, "data_dir": data_dir}


@app.command()
def serve(
    ctx: typer.Context,
    mqtt_bind: Annotated[str | None, typer.Option(help="Plain MQTT listener HOST:PORT [0.0.0.0:1883].")] = None,
    mqtts_bind: Annotated[
        str | None, typer.Option(help="TLS MQTT listener HOST:PORT (needs --tls-certfile/--tls-keyfile).")
    ] = None,
    tls_certfile: Annotated[Path | None, typer.Option(help="Server certificate (PEM).")] = None,
    tls_keyfile: Annotated[Path | None, typer.Option(help="Server private key (PEM).")] = None,
    tls_client_cafile: Annotated[
        Path | None, typer.Option(help="CA for client certificates; makes them required.")
    ] = None,
    http_bind: Annotated[str | None, typer.Option(help="Ops endpoint HOST:PORT [127.0.0.1:9100].")] = None,
    database_url: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
    models: Annotated[Path | None, typer.Option(help="Directory of thing models [schemas/].")] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Worker processes sharing the MQTT port [the cores available]; 1: one plain process."),
    ] = None,
    allow_anonymous: Annotated[
        bool | None,
        typer.Option(
            "--allow-anonymous/--no-allow-anonymous", help="Let devices connect without credentials (development only)."
        ),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = None,
    log_format: Annotated[str | None, typer.Option(help="auto, json or console.")] = None,
) -> None:
    """Run the broker."""
    settings = _settings(
        ctx,
        mqtt_bind=mqtt_bind,
        mqtts_bind=mqtts_bind,
        tls_certfile=tls_certfile,
        tls_keyfile=tls_keyfile,
        tls_client_cafile=tls_client_cafile,
        http_bind=http_bind,
        database_url=database_url,
        data_dir=data_dir,
        models=models,
        workers=workers,
        allow_anonymous=allow_anonymous,
        log_level=log_level,
        log_format=log_format,
    )
    from service.app import serve as run
    from service.ops.logs import configure_logging

    configure_logging(
        level=settings.log_level, json={"auto": None, "json": True, "console": False}[settings.log_format]
    )
    code = _guard(lambda: _run(run(settings)))
    raise typer.Exit(code)


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        return asyncio.run(coro)
    return uvloop.run(coro)


@app.command()
def migrate(ctx: typer.Context, database_url: DatabaseOpt = None, data_dir: DataDirOpt = None) -> None:
    """Apply the SQL migrations (idempotent; safe to run twice or concurrently)."""
    settings = _settings(ctx, database_url=database_url, data_dir=data_dir)

    async def run() -> list[Any]:
        from service.resources import migrations_dir
        from service.storage.database import connect
        from service.storage.migrate import apply_migrations

        async with connect(settings) as conn:
            return await apply_migrations(conn, migrations_dir())

    applied = _guard(lambda: asyncio.run(run()))
    for migration in applied:
        typer.echo(f"applied {migration.version:04d} {migration.name}")
    typer.echo(f"{len(applied)} migration(s) applied; schema is current")


@model_app.command("check")
def model_check(
    ctx: typer.Context,
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Model files or directories [the --models directory].")
    ] = None,
) -> None:
    """Validate thing model files; exit non-zero naming each bad file and why."""
    from service.model.thingmodel import check_paths, load_models

    targets = paths or [_settings(ctx).models]
    errors = check_paths(targets)
    for error in errors:
        typer.echo(f"error: {error}", err=True)
    if errors:
        raise typer.Exit(1)
    count = sum(len(load_models(p)) if p.is_dir() else 1 for p in targets)
    typer.echo(f"ok: {count} thing model(s) valid")


@config_app.command("show")
def config_show(ctx: typer.Context) -> None:
    """Print the effective settings (secrets redacted) as JSON."""
    typer.echo(json.dumps(_settings(ctx).redacted(), indent=2, sort_keys=True))


def _mount_devices() -> None:
    from service.cli.devices import app as devices_app

    app.add_typer(devices_app, name="device")
    from service.cli.products import app as products_app

    app.add_typer(products_app, name="product")
    from service.cli.storage import app as storage_app

    app.add_typer(storage_app, name="storage")


_mount_devices()


def _mount_consume() -> None:
    from service.cli.consume import consume

    app.command()(consume)


_mount_consume()


def main() -> None:
    """Console-script entry point."""
    app(prog_name="pointgate")


if __name__ == "__main__":  # pragma: no cover
    main()
