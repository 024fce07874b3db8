"""``pointgate consume``: read requests from a clustered MQTT broker's shared subscriptions (docs/scale-out.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

BROKER = "Cluster broker"
AUTH = "Broker auth endpoints"


def consume(
    ctx: typer.Context,
    broker: Annotated[
        str | None,
        typer.Option("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT.", rich_help_panel=BROKER),
    ] = None,
    broker_username: Annotated[str | None, typer.Option(rich_help_panel=BROKER)] = None,
    broker_password: Annotated[
        str | None, typer.Option(help="Prefer POINTGATE_BROKER_PASSWORD.", rich_help_panel=BROKER)
    ] = None,
    client_id: Annotated[
        str | None,
        typer.Option("--client-id", help="Unique per consumer (default: random).", rich_help_panel=BROKER),
    ] = None,
    protocol: Annotated[
        str | None,
        typer.Option("--protocol", help="MQTT version: 5 or 3.1.1 (default 5).", rich_help_panel=BROKER),
    ] = None,
    broker_tls_cafile: Annotated[Path | None, typer.Option(rich_help_panel=BROKER)] = None,
    broker_tls_certfile: Annotated[Path | None, typer.Option(rich_help_panel=BROKER)] = None,
    broker_tls_keyfile: Annotated[Path | None, typer.Option(rich_help_panel=BROKER)] = None,
    keepalive: Annotated[int | None, typer.Option("--keepalive", rich_help_panel=BROKER)] = None,
    session_expiry: Annotated[
        int | None,
        typer.Option(
            "--session-expiry",
            help="0 = clean session (default); N keeps it N s.",
            rich_help_panel=BROKER,
        ),
    ] = None,
    group: Annotated[
        str | None,
        typer.Option("--group", help="Shared group (default pointgate).", rich_help_panel=BROKER),
    ] = None,
    topic_filter: Annotated[
        list[str] | None,
        typer.Option(
            "--filter",
            help="Filter to share, repeatable (default: the 4 request topics).",
            rich_help_panel=BROKER,
        ),
    ] = None,
    max_in_flight: Annotated[
        int | None, typer.Option("--max-in-flight", help="Messages held before commit (default 1000).")
    ] = None,
    http_bind: Annotated[str | None, typer.Option(help="Ops endpoint HOST:PORT (default 127.0.0.1:9100).")] = None,
    database_url: Annotated[str | None, typer.Option("--database-url", help="PostgreSQL DSN.")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir")] = None,
    models: Annotated[Path | None, typer.Option(help="Directory of thing models (default schemas/).")] = None,
    auth_bind: Annotated[
        str | None,
        typer.Option(help="Own HOST:PORT for auth (default: the ops one).", rich_help_panel=AUTH),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = None,
    log_format: Annotated[str | None, typer.Option(help="auto, json or console.")] = None,
) -> None:
    """Consume requests from a cluster broker's shared subscriptions; PUBACK and reply after the commit."""
    from service.cli.common import guard as _guard
    from service.cli.common import settings_from as _settings
    from service.cli.main import _run
    from service.ops.logs import configure_logging

    settings = _settings(
        ctx,
        broker_url=broker,
        broker_username=broker_username,
        broker_password=broker_password,
        broker_client_id=client_id,
        broker_protocol=protocol,
        broker_tls_cafile=broker_tls_cafile,
        broker_tls_certfile=broker_tls_certfile,
        broker_tls_keyfile=broker_tls_keyfile,
        broker_keepalive=keepalive,
        broker_session_expiry=session_expiry,
        consume_group=group,
        consume_filters=topic_filter or None,
        consume_max_in_flight=max_in_flight,
        http_bind=http_bind,
        database_url=database_url,
        data_dir=data_dir,
        models=models,
        auth_bind=auth_bind,
        log_level=log_level,
        log_format=log_format,
    )
    if settings.broker_url is None:
        raise _guard_config("consume needs --broker mqtt://HOST:PORT (or POINTGATE_BROKER_URL)")
    from service.consume.service import consume as run

    configure_logging(
        level=settings.log_level, json={"auto": None, "json": True, "console": False}[settings.log_format]
    )
    raise typer.Exit(_guard(lambda: _run(run(settings))))


def _guard_config(message: str) -> typer.Exit:
    typer.echo(f"pointgate: {message}", err=True)
    return typer.Exit(2)
