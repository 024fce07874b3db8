"""``pointgate rejected …``: the refused requests ``serve`` kept, and replaying them after a model is fixed.

``list`` shows the newest first (id, time, device, code, reason; whether a replay stored it), ``show ID`` one
of them with its payload, ``replay`` runs kept requests through the pipeline again against the thing models in
``--models`` as they are now: what passes is stored (its points keep their own time, or the original receive
time), what still fails is listed with its new reason. Each kept request records its last replay's result.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import asyncpg
import typer

from service.cli.common import ConfigOpt, DatabaseOpt, DataDirOpt, JsonOpt, fail, guard, remember, settings_from
from service.ops import rejected as kept_store
from service.resources import migrations_dir
from service.settings import Settings
from service.storage import database
from service.storage.migrate import apply_migrations

T = TypeVar("T")

app = typer.Typer(help="Refused requests kept by serve: list, show, replay.", no_args_is_help=True)


@app.callback()
def rejected_options(
    ctx: typer.Context, config: ConfigOpt = None, database_url: DatabaseOpt = None, data_dir: DataDirOpt = None
) -> None:
    """Refused requests kept by serve: list, show, replay."""
    remember(ctx, config=config, database_url=database_url, data_dir=data_dir)


def _device_filter(device: str | None) -> tuple[str | None, str | None]:
    if device is None:
        return None, None
    product_key, slash, device_key = device.partition("/")
    return product_key, (device_key if slash else None)


@app.command("list")
def list_(
    ctx: typer.Context,
    code: Annotated[int | None, typer.Option("--code", help="only this reply code")] = None,
    device: Annotated[str | None, typer.Option("--device", metavar="PK[/DK]", help="only this product/device")] = None,
    pending: Annotated[bool, typer.Option("--pending", help="only those no replay has stored yet")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="at most this many, newest first")] = 50,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """The newest refused requests kept (never their payloads; see `show`)."""
    settings = settings_from(ctx, config=config, database_url=database_url, data_dir=data_dir)
    product_key, device_key = _device_filter(device)
    found = _run(
        settings,
        lambda conn, _dsn: kept_store.list_kept(
            conn, code=code, product_key=product_key, device_key=device_key, pending_only=pending, limit=limit
        ),
    )
    if as_json:
        typer.echo(json.dumps([_summary(k) for k in found], indent=2))
        return
    if not found:
        typer.echo("no refused requests kept", err=True)
        return
    rows: list[tuple[str, ...]] = [("ID", "RECEIVED", "DEVICE", "CODE", "REPLAY", "REASON")]
    rows += [
        (
            str(k.id),
            k.received_at.isoformat(timespec="seconds"),
            f"{k.product_key}/{k.device_key}",
            str(k.code),
            "-" if k.replay_code is None else str(k.replay_code),
            k.reason,
        )
        for k in found
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        typer.echo("  ".join([*cells, row[-1]]))


@app.command()
def show(
    ctx: typer.Context,
    ids: Annotated[list[int], typer.Argument(help="ids from `rejected list`")],
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Kept refused requests in full, payload included."""
    settings = settings_from(ctx, config=config, database_url=database_url, data_dir=data_dir)
    found = _run(settings, lambda conn, _dsn: kept_store.get_kept(conn, ids))
    missing = sorted(set(ids) - {k.id for k in found})
    if missing:
        fail(f"no refused request kept with id {', '.join(map(str, missing))}")
    if as_json:
        typer.echo(json.dumps([{**_summary(k), "payload": _payload_text(k)} for k in found], indent=2))
        return
    for k in found:
        for key, value in _summary(k).items():
            typer.echo(f"{key + ':':<14} {'-' if value is None else value}")
        typer.echo(f"{'payload:':<14} {_payload_text(k)}")
        typer.echo("")


@app.command()
def replay(
    ctx: typer.Context,
    ids: Annotated[list[int] | None, typer.Argument(help="ids to replay [every kept request not yet stored]")] = None,
    code: Annotated[int | None, typer.Option("--code", help="only this reply code")] = None,
    device: Annotated[str | None, typer.Option("--device", metavar="PK[/DK]", help="only this product/device")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="at most this many")] = 10_000,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="check only: store nothing, record nothing")] = False,
    models: Annotated[Path | None, typer.Option("--models", help="thing models to check against [schemas/]")] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Run kept requests through the pipeline again; store what passes now, report what still fails."""
    from service.model.thingmodel import check_paths, load_models

    settings = settings_from(ctx, config=config, database_url=database_url, data_dir=data_dir, models=models)
    problems = check_paths([settings.models])
    if problems:
        fail("\n".join(str(p) for p in problems), 2)
    loaded = load_models(settings.models)
    product_key, device_key = _device_filter(device)

    async def run(conn: asyncpg.Connection, dsn: str) -> list[kept_store.ReplayResult]:
        if ids:
            chosen = await kept_store.get_kept(conn, ids)
        else:
            chosen = await kept_store.list_kept(
                conn, code=code, product_key=product_key, device_key=device_key, pending_only=True, limit=limit
            )
            chosen.reverse()  # oldest first: a later message for the same point should win
        return await kept_store.replay(
            conn, dsn, chosen, loaded, max_payload_bytes=settings.max_payload_bytes, dry_run=dry_run
        )

    results = _run(settings, run)
    stored = [r for r in results if r.code == 200]
    failed = [r for r in results if r.code != 200]
    if as_json:
        typer.echo(json.dumps([{"id": r.id, "code": r.code, "message": r.reason, "points": r.points} for r in results]))
    else:
        for r in failed:
            typer.echo(f"{r.id}: still refused: {r.code} {r.reason}")
    verb = "would store" if dry_run else "stored"
    typer.echo(
        f"{len(results)} replayed: {len(stored)} {verb} ({sum(r.points for r in stored)} points), "
        f"{len(failed)} still refused",
        err=True,
    )
    if failed:
        raise typer.Exit(1)


def _summary(k: kept_store.Kept) -> dict[str, Any]:
    return {
        "id": k.id,
        "receivedAt": k.received_at.isoformat(),
        "topic": k.topic,
        "productKey": k.product_key,
        "deviceKey": k.device_key,
        "clientId": k.client_id,
        "code": k.code,
        "reason": k.reason,
        "payloadBytes": k.payload_bytes,
        "payloadKept": "none" if k.payload is None else ("truncated" if k.truncated else "whole"),
        "replayedAt": k.replayed_at.isoformat() if k.replayed_at else None,
        "replayCode": k.replay_code,
        "replayReason": k.replay_reason,
    }


def _payload_text(k: kept_store.Kept) -> str | None:
    if k.payload is None:
        return None
    try:
        return k.payload.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(k.payload).decode()


Operation = Callable[[asyncpg.Connection, str], Awaitable[T]]


def _run(settings: Settings, operation: Operation[T]) -> T:
    return guard(lambda: asyncio.run(_with_database(settings, operation)))


async def _with_database(settings: Settings, operation: Operation[T]) -> T:
    database.check_embedded_choice(settings)
    async with database.database_dsn(settings) as dsn:
        conn = await database.open_connection(dsn)
        try:
            await apply_migrations(conn, migrations_dir())
            return await operation(conn, dsn)
        finally:
            await conn.close()
