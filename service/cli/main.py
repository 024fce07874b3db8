"""The ``pointgate`` command: serve, migrate, model check, config show, device …, product …, rejected ….

Every setting is a flag of ``serve`` and a ``POINTGATE_<NAME>`` environment variable (through `Settings`); a flag
wins over the environment, which wins over the TOML file. ``--config``, ``--database-url`` and ``--data-dir``
are accepted before the command, after it, and between a group and its command, by every command that touches
the database. Operator mistakes end with ``pointgate: error: …`` on stderr and a non-zero exit (common.py),
never a traceback.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from service.cli.common import ConfigOpt, DatabaseOpt, DataDirOpt, fail, guard, remember, settings_from, warn
from service.settings import known_environment

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


@app.callback()
def main_options(
    ctx: typer.Context, config: ConfigOpt = None, database_url: DatabaseOpt = None, data_dir: DataDirOpt = None
) -> None:
    """Options every command shares."""
    from service.cli.common import unknown_environment
    from service.ops.logs import configure_logging

    # stdout is each command's result (a secret, JSON); diagnostics go to stderr. `serve` reconfigures.
    configure_logging(level="INFO", json=False, stderr=True)
    for problem in unknown_environment(known_environment()):
        warn(problem)
    remember(ctx, config=config, database_url=database_url, data_dir=data_dir)


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
    secret_key_file: Annotated[
        Path | None, typer.Option(help="Key that encrypts device secrets [<data-dir>/secret.key].")
    ] = None,
    max_payload_bytes: Annotated[int | None, typer.Option(help="Larger requests get 1008 [524288].")] = None,
    connect_timeout: Annotated[
        float | None, typer.Option(help="Seconds a new connection has to send CONNECT [10].")
    ] = None,
    drain_timeout: Annotated[float | None, typer.Option(help="Seconds to commit queued data on SIGTERM [8].")] = None,
    write_batch_points: Annotated[int | None, typer.Option(help="Most points in one transaction [5000].")] = None,
    write_connections: Annotated[int | None, typer.Option(help="Database connections writing in parallel [2].")] = None,
    max_inflight_requests: Annotated[
        int | None, typer.Option(help="Requests of one connection awaiting their commit [32].")
    ] = None,
    max_queued_bytes: Annotated[int | None, typer.Option(help="Bytes waiting towards one device [1048576].")] = None,
    max_subscriptions: Annotated[int | None, typer.Option(help="Subscriptions one session may hold [100].")] = None,
    max_wildcard_subscriptions: Annotated[
        int | None, typer.Option(help="Wildcard subscriptions one session may hold [10].")
    ] = None,
    max_qos2_inflight: Annotated[
        int | None, typer.Option(help="QoS 2 messages a connection may leave unreleased [16].")
    ] = None,
    session_expiry: Annotated[
        float | None, typer.Option(help="Seconds a persistent session outlives its connection [86400].")
    ] = None,
    max_sub_devices_per_gateway: Annotated[
        int | None, typer.Option(help="Sub-devices one gateway connection may have logged in [200].")
    ] = None,
    keep_rejected: Annotated[
        bool | None,
        typer.Option("--keep-rejected/--no-keep-rejected", help="Keep refused requests for `pointgate rejected` [on]."),
    ] = None,
    rejected_payload_bytes: Annotated[
        int | None, typer.Option(help="Most payload bytes kept per refused request [65536].")
    ] = None,
    rejected_max_count: Annotated[int | None, typer.Option(help="Most refused requests kept [100000].")] = None,
    rejected_max_age: Annotated[
        str | None, typer.Option(help="Refused requests older than this are dropped, e.g. 7d, 12h [7d].")
    ] = None,
    partition_width: Annotated[str | None, typer.Option(help="Time range of one points partition [1d].")] = None,
    partitions_ahead: Annotated[int | None, typer.Option(help="Partitions kept created ahead of now [3].")] = None,
    partition_backfill: Annotated[
        str | None, typer.Option(help="How far back partitions are created on demand [365d].")
    ] = None,
    retention: Annotated[str | None, typer.Option(help="Drop partitions older than this, e.g. 90d [keep all].")] = None,
    embedded_user: Annotated[
        str | None, typer.Option(help="User that runs the embedded PostgreSQL when root [postgres, else nobody].")
    ] = None,
    embedded_port: Annotated[
        int | None, typer.Option(help="Also expose the embedded PostgreSQL on 127.0.0.1:PORT [socket only].")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = None,
    log_format: Annotated[str | None, typer.Option(help="auto, json or console.")] = None,
) -> None:
    """Run the broker."""
    settings = settings_from(
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
        secret_key_file=secret_key_file,
        max_payload_bytes=max_payload_bytes,
        connect_timeout=connect_timeout,
        drain_timeout=drain_timeout,
        write_batch_points=write_batch_points,
        write_connections=write_connections,
        max_inflight_requests=max_inflight_requests,
        max_queued_bytes=max_queued_bytes,
        max_subscriptions=max_subscriptions,
        max_wildcard_subscriptions=max_wildcard_subscriptions,
        max_qos2_inflight=max_qos2_inflight,
        session_expiry=session_expiry,
        max_sub_devices_per_gateway=max_sub_devices_per_gateway,
        keep_rejected=keep_rejected,
        rejected_payload_bytes=rejected_payload_bytes,
        rejected_max_count=rejected_max_count,
        rejected_max_age=rejected_max_age,
        partition_width=partition_width,
        partitions_ahead=partitions_ahead,
        partition_backfill=partition_backfill,
        retention=retention,
        embedded_user=embedded_user,
        embedded_port=embedded_port,
        log_level=log_level,
        log_format=log_format,
    )
    from service.app import serve as run
    from service.ops.logs import configure_logging

    configure_logging(
        level=settings.log_level, json={"auto": None, "json": True, "console": False}[settings.log_format]
    )
    code = guard(lambda: _run(run(settings)))
    raise typer.Exit(code)


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        return asyncio.run(coro)
    return uvloop.run(coro)


@app.command()
def migrate(
    ctx: typer.Context, config: ConfigOpt = None, database_url: DatabaseOpt = None, data_dir: DataDirOpt = None
) -> None:
    """Apply the SQL migrations (idempotent; safe to run twice or concurrently)."""
    settings = settings_from(ctx, config=config, database_url=database_url, data_dir=data_dir)

    async def run() -> list[Any]:
        from service.resources import migrations_dir
        from service.storage.database import connect
        from service.storage.migrate import apply_migrations

        async with connect(settings) as conn:
            return await apply_migrations(conn, migrations_dir())

    applied = guard(lambda: asyncio.run(run()))
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

    targets = paths or [settings_from(ctx).models]
    errors = check_paths(targets)
    if errors:
        fail("\n".join(str(error) for error in errors), 2)
    count = sum(len(load_models(p)) if p.is_dir() else 1 for p in targets)
    typer.echo(f"ok: {count} thing model(s) valid")


@model_app.command("reload")
def model_reload(
    ctx: typer.Context,
    wait: Annotated[float, typer.Option("--wait", help="seconds to wait for the answers of running serves")] = 3.0,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Make every running serve re-read its thing models (same as SIGHUP); a bad set is refused, the old kept."""
    from service.model.reload import request_reload
    from service.model.thingmodel import check_paths
    from service.storage import database

    settings = settings_from(ctx, config=config, database_url=database_url, data_dir=data_dir)
    errors = check_paths([settings.models])
    if errors:  # the same files serve would read (when it runs here): refuse before asking
        fail("\n".join(f"{error} (not reloaded)" for error in errors), 2)

    async def run() -> list[Any]:
        database.check_embedded_choice(settings)
        async with database.database_dsn(settings) as dsn:
            conn = await database.open_connection(dsn)
            try:
                return await request_reload(conn, wait_s=wait)
            finally:
                await conn.close()

    answers = guard(lambda: asyncio.run(run()))
    if not answers:
        fail(f"no running serve answered within {wait:g} s (is one running on this database?)")
    for answer in answers:
        typer.echo(f"{answer.instance}: {'reloaded' if answer.ok else 'refused'}: {answer.message}")
    if not all(answer.ok for answer in answers):
        raise typer.Exit(1)


@config_app.command("show")
def config_show(ctx: typer.Context) -> None:
    """Print the effective settings (secrets redacted) as JSON."""
    typer.echo(json.dumps(settings_from(ctx).redacted(), indent=2, sort_keys=True))


def _mount_devices() -> None:
    from service.cli.devices import app as devices_app
    from service.cli.rejected import app as rejected_app

    app.add_typer(devices_app, name="device")
    from service.cli.products import app as products_app

    app.add_typer(products_app, name="product")
    from service.cli.storage import app as storage_app

    app.add_typer(storage_app, name="storage")
    app.add_typer(rejected_app, name="rejected")


_mount_devices()


def _mount_consume() -> None:
    from service.cli.consume import consume

    app.command()(consume)


_mount_consume()


def main() -> None:
    """Console-script entry point: the last net under every command, so nothing ends in a traceback."""
    try:
        app(prog_name="pointgate")
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as exc:  # a bug of ours: still one line, and the type so it can be reported
        typer.echo(f"pointgate: error: unexpected {type(exc).__name__}: {exc}", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":  # pragma: no cover
    main()
