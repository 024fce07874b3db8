"""``pointgate device …``: register devices, see who is connected, switch them on and off, rotate their secrets.

Each command opens one connection, brings the schema up to date (so ``device add`` works on a fresh
install), and does one registry operation. Secrets are printed only by ``add``, ``rotate`` and
``credentials``, on stdout alone so a script can capture them; ``list`` and ``show`` never show them.
Disabling, rotating or deleting a device closes its live connections within seconds: the registry's trigger
notifies every running ``serve`` (migrations, ``pointgate_devices`` channel).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import asyncpg
import typer

from service.cli.common import ConfigOpt, DatabaseOpt, DataDirOpt, JsonOpt, guard, remember, settings_from, warn
from service.devices import registry as devices
from service.devices.secretbox import SecretBox, key_path, load_or_create_key
from service.errors import DeviceNotFound
from service.resources import migrations_dir
from service.settings import Settings
from service.storage import database
from service.storage.migrate import apply_migrations

T = TypeVar("T")

app = typer.Typer(help="Register devices, see who is connected, manage their secrets.", no_args_is_help=True)

ProductKey = Annotated[str, typer.Argument(help="the device's product key")]
DeviceKey = Annotated[str, typer.Argument(help="the device key")]
SecretOpt = Annotated[str | None, typer.Option("--secret", help="use this secret instead of generating one")]


@app.callback()
def device_options(
    ctx: typer.Context, config: ConfigOpt = None, database_url: DatabaseOpt = None, data_dir: DataDirOpt = None
) -> None:
    """Register devices, see who is connected, manage their secrets."""
    remember(ctx, config=config, database_url=database_url, data_dir=data_dir)


def _parse_gateway(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    product_key, slash, device_key = value.partition("/")
    if not slash or not product_key or not device_key or "/" in device_key:
        raise typer.BadParameter(f"expected PRODUCT_KEY/DEVICE_KEY, got {value!r}")
    return product_key, device_key


@app.command()
def add(
    ctx: typer.Context,
    product_key: ProductKey,
    device_key: DeviceKey,
    secret: SecretOpt = None,
    gateway: Annotated[
        str | None, typer.Option("--gateway", metavar="PK/DK", help="the gateway this sub-device reports through")
    ] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Register a device and print its secret (generated unless --secret is given)."""
    gateway_keys = _parse_gateway(gateway)
    settings = settings_from(ctx, config=config, database_url=database_url, data_dir=data_dir)
    new = _run(
        settings,
        lambda conn, box: devices.add_device(conn, box(), product_key, device_key, secret=secret, gateway=gateway_keys),
    )
    _warn_without_model(settings.models, product_key)
    _print_secret(product_key, device_key, new, as_json=as_json, what="registered")


def _warn_without_model(models: Path, product_key: str) -> None:
    from service.errors import ModelError
    from service.model.thingmodel import load_models

    try:
        known = load_models(models)
    except ModelError:
        return  # `model check` and `serve` report a broken model directory; not this command's business
    if product_key not in known:
        warn(
            f"no thing model for product {product_key!r} in {models}: its devices can log in, but every "
            f"measurement they send is refused (1204) until {models}/{product_key}.json exists"
        )


@app.command("list")
def list_(
    ctx: typer.Context,
    product: Annotated[str | None, typer.Option("--product", help="only this product's devices")] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """List registered devices with their connection state (never their secrets)."""
    settings = settings_from(ctx, config=config, database_url=database_url, data_dir=data_dir)
    found = _run(settings, lambda conn, _box: devices.list_devices(conn, product_key=product))
    if as_json:
        typer.echo(json.dumps([_device_json(d) for d in found], indent=2))
        return
    rows: list[tuple[str, ...]] = [
        ("PRODUCT KEY", "DEVICE KEY", "ENABLED", "STATE", "LAST SEEN", "PEER", "CLIENT ID", "GATEWAY", "CREATED")
    ]
    rows += [
        (
            d.product_key,
            d.device_key,
            "yes" if d.enabled else "no",
            "online" if d.online else "offline",
            d.last_seen.isoformat(timespec="seconds") if d.last_seen else "never",
            d.peer or "-",
            d.client_id or "-",
            "/".join(d.gateway) if d.gateway else "-",
            d.created_at.isoformat(timespec="seconds"),
        )
        for d in found
    ]
    _table(rows)


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@app.command()
def show(
    ctx: typer.Context,
    product_key: ProductKey,
    device_key: DeviceKey,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """One device: enabled, gateway, connection state, last seen, peer address, client id, activation time."""
    settings = settings_from(ctx, config=config, database_url=database_url, data_dir=data_dir)
    found = _run(settings, lambda conn, _box: devices.require_device(conn, product_key, device_key))
    shown = _device_json(found)
    if as_json:
        typer.echo(json.dumps(shown, indent=2))
        return
    for key, value in shown.items():
        if isinstance(value, dict):
            value = f"{value['productKey']}/{value['deviceKey']}"
        typer.echo(f"{key + ':':<13} {'-' if value is None else value}")


@app.command()
def delete(
    ctx: typer.Context,
    product_key: ProductKey,
    device_key: DeviceKey,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Remove a device from the registry (its stored points stay); its live connections are closed."""
    settings = settings_from(ctx, config=config, database_url=database_url, data_dir=data_dir)
    _run(settings, lambda conn, _box: devices.delete_device(conn, product_key, device_key))
    typer.echo(f"deleted {product_key}/{device_key}")


@app.command()
def disable(
    ctx: typer.Context,
    product_key: ProductKey,
    device_key: DeviceKey,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Refuse the device's logins and close its live connections."""
    settings = settings_from(ctx, config=config, database_url=database_url, data_dir=data_dir)
    _run(settings, lambda conn, _box: devices.set_enabled(conn, product_key, device_key, False))
    typer.echo(f"disabled {product_key}/{device_key}")


@app.command()
def enable(
    ctx: typer.Context,
    product_key: ProductKey,
    device_key: DeviceKey,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Allow a disabled device to log in again."""
    settings = settings_from(ctx, config=config, database_url=database_url, data_dir=data_dir)
    _run(settings, lambda conn, _box: devices.set_enabled(conn, product_key, device_key, True))
    typer.echo(f"enabled {product_key}/{device_key}")


@app.command()
def rotate(
    ctx: typer.Context,
    product_key: ProductKey,
    device_key: DeviceKey,
    secret: SecretOpt = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Give a device a new secret and print it; the old secret stops working and live connections close."""
    settings = settings_from(ctx, config=config, database_url=database_url, data_dir=data_dir)
    new = _run(settings, lambda conn, box: devices.rotate_secret(conn, box(), product_key, device_key, secret=secret))
    _print_secret(product_key, device_key, new, as_json=as_json, what="new secret for")


topo_app = typer.Typer(
    help="A gateway's topology: which sub-devices report through it (as thing.topo.* over MQTT).",
    no_args_is_help=True,
)
app.add_typer(topo_app, name="topo")


@topo_app.callback()
def topo_options(
    ctx: typer.Context, config: ConfigOpt = None, database_url: DatabaseOpt = None, data_dir: DataDirOpt = None
) -> None:
    """A gateway's topology: which sub-devices report through it."""
    remember(ctx, config=config, database_url=database_url, data_dir=data_dir)


GatewayArg = Annotated[str, typer.Argument(metavar="GATEWAY", help="the gateway, PRODUCT_KEY/DEVICE_KEY")]
SubDevicesArg = Annotated[list[str], typer.Argument(metavar="SUB_DEVICE...", help="PRODUCT_KEY/DEVICE_KEY each")]


def _keys(values: list[str]) -> list[tuple[str, str]]:
    keys = [_parse_key(value) for value in values]
    if len(set(keys)) != len(keys):
        raise typer.BadParameter("a sub-device is named twice")
    return keys


def _parse_key(value: str) -> tuple[str, str]:
    keys = _parse_gateway(value)
    assert keys is not None
    return keys


@topo_app.command("add")
def topo_add(
    ctx: typer.Context,
    gateway: GatewayArg,
    sub_devices: SubDevicesArg,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Make devices sub-devices of GATEWAY: all of them, or none (one of another gateway, the gateway itself…)."""
    settings = settings_from(ctx, config=config, database_url=database_url, data_dir=data_dir)
    gateway_keys, keys = _parse_key(gateway), _keys(sub_devices)

    async def attach(conn: asyncpg.Connection, _box: Callable[[], SecretBox]) -> None:
        await devices.attach_sub_devices(conn, gateway_keys, keys)

    _run(settings, attach)
    typer.echo(f"{gateway}: added {' '.join(sub_devices)}")


@topo_app.command("get")
def topo_get(
    ctx: typer.Context,
    gateway: GatewayArg,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """List GATEWAY's sub-devices, one PRODUCT_KEY/DEVICE_KEY a line."""
    settings = settings_from(ctx, config=config, database_url=database_url, data_dir=data_dir)
    gateway_keys = _parse_key(gateway)

    async def read(conn: asyncpg.Connection, _box: Callable[[], SecretBox]) -> list[tuple[str, str]]:
        if await devices.get_device(conn, *gateway_keys) is None:
            raise DeviceNotFound(*gateway_keys, role="gateway")
        return await devices.sub_devices_of(conn, gateway_keys)

    found = _run(settings, read)
    if as_json:
        typer.echo(json.dumps([{"productKey": pk, "deviceKey": dk} for pk, dk in found]))
        return
    for pk, dk in found:
        typer.echo(f"{pk}/{dk}")


@topo_app.command("delete")
def topo_delete(
    ctx: typer.Context,
    gateway: GatewayArg,
    sub_devices: SubDevicesArg,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Remove sub-devices from GATEWAY (all or none); a running service ends their sessions within seconds."""
    settings = settings_from(ctx, config=config, database_url=database_url, data_dir=data_dir)
    gateway_keys, keys = _parse_key(gateway), _keys(sub_devices)

    async def detach(conn: asyncpg.Connection, _box: Callable[[], SecretBox]) -> None:
        await devices.detach_sub_devices(conn, gateway_keys, keys)

    _run(settings, detach)
    typer.echo(f"{gateway}: removed {' '.join(sub_devices)}")


@app.command()
def credentials(
    ctx: typer.Context,
    product_key: ProductKey,
    device_key: DeviceKey,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Print a ready-to-use MQTT client id, username and password for the device (a quick test with any client)."""
    from service.protocol.signing import expected_password, parse_login

    settings = settings_from(ctx, config=config, database_url=database_url, data_dir=data_dir)
    secret, enabled = _run(
        settings, lambda conn, box: devices.require_credentials(conn, box(), product_key, device_key)
    )
    client_id = f"{device_key}|securemode=2,signmethod=sha256,timestamp={int(time.time() * 1000)}|"
    username = f"{device_key}&{product_key}"
    password = expected_password(parse_login(client_id, username), secret)
    if not enabled:
        warn(f"device {product_key}/{device_key} is disabled: these credentials are refused until `device enable`")
    if as_json:
        typer.echo(json.dumps({"clientId": client_id, "username": username, "password": password}))
        return
    typer.echo(f"client id: {client_id}")
    typer.echo(f"username:  {username}")
    typer.echo(f"password:  {password}")


def _print_secret(product_key: str, device_key: str, secret: str, *, as_json: bool, what: str) -> None:
    if as_json:
        typer.echo(json.dumps({"productKey": product_key, "deviceKey": device_key, "secret": secret}))
        return
    # the secret alone on stdout, so `SECRET=$(pointgate device add …)` works; the label goes to stderr
    typer.echo(f"{what} {product_key}/{device_key}; device secret:", err=True)
    typer.echo(secret)


def _device_json(device: devices.Device) -> dict[str, Any]:
    gateway = device.gateway
    return {
        "productKey": device.product_key,
        "deviceKey": device.device_key,
        "enabled": device.enabled,
        "gateway": {"productKey": gateway[0], "deviceKey": gateway[1]} if gateway else None,
        "createdAt": device.created_at.isoformat(),
        "online": device.online,
        "lastSeen": device.last_seen.isoformat() if device.last_seen else None,
        "peer": device.peer,
        "clientId": device.client_id,
        "activatedAt": device.activated_at.isoformat() if device.activated_at else None,
    }


Operation = Callable[[asyncpg.Connection, Callable[[], SecretBox]], Awaitable[T]]


def _run(settings: Settings, operation: Operation[T]) -> T:
    """Run one registry operation against the configured database; every expected failure is one line."""
    return guard(lambda: asyncio.run(_with_registry(settings, operation)))


async def _with_registry(settings: Settings, operation: Operation[T]) -> T:
    def box() -> SecretBox:
        # only commands that seal or open secrets touch (and on first use create) the key file
        return SecretBox(load_or_create_key(key_path(settings)))

    async with database.connect(settings) as conn:
        await apply_migrations(conn, migrations_dir())
        return await operation(conn, box)
