"""``pointgate device …``: register devices, list them, switch them on and off, rotate their secrets.

Each command opens one connection, brings the schema up to date (so ``device add`` works on a fresh
install), and does one registry operation. Secrets are printed only by ``add`` and ``rotate``, on stdout
alone so a script can capture them; ``list`` never shows them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, NoReturn, TypeVar

import asyncpg
import typer

from service.devices import registry as devices
from service.devices.secretbox import SecretBox, key_path, load_or_create_key
from service.errors import ConfigError, DeviceNotFound, PointgateError
from service.resources import migrations_dir
from service.settings import Settings, load_settings
from service.storage import database
from service.storage.migrate import apply_migrations

T = TypeVar("T")

app = typer.Typer(help="Register devices and manage their secrets.", no_args_is_help=True)

ProductKey = Annotated[str, typer.Argument(help="the device's product key")]
DeviceKey = Annotated[str, typer.Argument(help="the device key")]
SecretOpt = Annotated[str | None, typer.Option("--secret", help="use this secret instead of generating one")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


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
) -> None:
    """Register a device and print its secret (generated unless --secret is given)."""
    gateway_keys = _parse_gateway(gateway)
    new = _run(
        ctx,
        lambda conn, box: devices.add_device(conn, box(), product_key, device_key, secret=secret, gateway=gateway_keys),
    )
    _print_secret(product_key, device_key, new, as_json=as_json, what="registered")


@app.command("list")
def list_(
    ctx: typer.Context,
    product: Annotated[str | None, typer.Option("--product", help="only this product's devices")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List registered devices (never their secrets)."""
    found = _run(ctx, lambda conn, _box: devices.list_devices(conn, product_key=product))
    if as_json:
        typer.echo(json.dumps([_device_json(d) for d in found], indent=2))
        return
    rows = [("PRODUCT KEY", "DEVICE KEY", "ENABLED", "GATEWAY", "CREATED")]
    rows += [
        (
            d.product_key,
            d.device_key,
            "yes" if d.enabled else "no",
            "/".join(d.gateway) if d.gateway else "-",
            d.created_at.isoformat(timespec="seconds"),
        )
        for d in found
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@app.command()
def disable(ctx: typer.Context, product_key: ProductKey, device_key: DeviceKey) -> None:
    """Refuse the device's new logins (existing sessions are not closed by this command)."""
    _run(ctx, lambda conn, _box: devices.set_enabled(conn, product_key, device_key, False))
    typer.echo(f"disabled {product_key}/{device_key}")


@app.command()
def enable(ctx: typer.Context, product_key: ProductKey, device_key: DeviceKey) -> None:
    """Allow a disabled device to log in again."""
    _run(ctx, lambda conn, _box: devices.set_enabled(conn, product_key, device_key, True))
    typer.echo(f"enabled {product_key}/{device_key}")


@app.command()
def rotate(
    ctx: typer.Context,
    product_key: ProductKey,
    device_key: DeviceKey,
    secret: SecretOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Give a device a new secret and print it; the old secret stops working."""
    new = _run(ctx, lambda conn, box: devices.rotate_secret(conn, box(), product_key, device_key, secret=secret))
    _print_secret(product_key, device_key, new, as_json=as_json, what="new secret for")


topo_app = typer.Typer(
    help="A gateway's topology: which sub-devices report through it (as thing.topo.* over MQTT).",
    no_args_is_help=True,
)
app.add_typer(topo_app, name="topo")

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
def topo_add(ctx: typer.Context, gateway: GatewayArg, sub_devices: SubDevicesArg) -> None:
    """Make devices sub-devices of GATEWAY: all of them, or none (one of another gateway, the gateway itself…)."""
    gateway_keys, keys = _parse_key(gateway), _keys(sub_devices)

    async def attach(conn: asyncpg.Connection, _box: Callable[[], SecretBox]) -> None:
        await devices.attach_sub_devices(conn, gateway_keys, keys)

    _run(ctx, attach)
    typer.echo(f"{gateway}: added {' '.join(sub_devices)}")


@topo_app.command("get")
def topo_get(ctx: typer.Context, gateway: GatewayArg, as_json: JsonOpt = False) -> None:
    """List GATEWAY's sub-devices, one PRODUCT_KEY/DEVICE_KEY a line."""
    gateway_keys = _parse_key(gateway)

    async def read(conn: asyncpg.Connection, _box: Callable[[], SecretBox]) -> list[tuple[str, str]]:
        if await devices.get_device(conn, *gateway_keys) is None:
            raise DeviceNotFound(*gateway_keys, role="gateway")
        return await devices.sub_devices_of(conn, gateway_keys)

    found = _run(ctx, read)
    if as_json:
        typer.echo(json.dumps([{"productKey": pk, "deviceKey": dk} for pk, dk in found]))
        return
    for pk, dk in found:
        typer.echo(f"{pk}/{dk}")


@topo_app.command("delete")
def topo_delete(ctx: typer.Context, gateway: GatewayArg, sub_devices: SubDevicesArg) -> None:
    """Remove sub-devices from GATEWAY (all or none); a running service ends their sessions within seconds."""
    gateway_keys, keys = _parse_key(gateway), _keys(sub_devices)

    async def detach(conn: asyncpg.Connection, _box: Callable[[], SecretBox]) -> None:
        await devices.detach_sub_devices(conn, gateway_keys, keys)

    _run(ctx, detach)
    typer.echo(f"{gateway}: removed {' '.join(sub_devices)}")


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
    }


Operation = Callable[[asyncpg.Connection, Callable[[], SecretBox]], Awaitable[T]]


def _run(ctx: typer.Context, operation: Operation[T]) -> T:
    """Run one registry operation against the configured database; turn every expected failure into a message."""
    try:
        return asyncio.run(_with_registry(_settings(ctx), operation))
    except ConfigError as exc:
        _fail(str(exc), code=2)
    except PointgateError as exc:  # DeviceExists, DeviceNotFound, InvalidKey, DatabaseError, MigrationError…
        _fail(str(exc))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        _fail(f"database: {exc}")


def _settings(ctx: typer.Context) -> Settings:
    # the main CLI hands down its shared flags (--config, --database-url, --data-dir) as a dict of overrides;
    # a caller embedding this app may hand down finished Settings instead
    if isinstance(ctx.obj, Settings):
        return ctx.obj
    overrides: dict[str, Any] = dict(ctx.obj) if isinstance(ctx.obj, dict) else {}
    config_file = overrides.pop("config", None)
    return load_settings(overrides, config_file=config_file)


async def _with_registry(settings: Settings, operation: Operation[T]) -> T:
    def box() -> SecretBox:
        # only commands that seal or open secrets touch (and on first use create) the key file
        return SecretBox(load_or_create_key(key_path(settings)))

    async with database.connect(settings) as conn:
        await apply_migrations(conn, migrations_dir())
        return await operation(conn, box)


def _fail(message: str, *, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)
