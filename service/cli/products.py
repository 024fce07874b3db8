"""``pointgate product …``: a product's secret and its dynamic-activation policy (secure mode 3).

``set`` prints a secret only when it generated one (``--generate-secret``), alone on stdout so a script can
capture it; ``show`` never shows it. The registry plumbing (database, migrations, key file, error messages)
is shared with ``pointgate device …``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Literal

import asyncpg
import typer

from service.cli.common import ConfigOpt, DatabaseOpt, DataDirOpt, JsonOpt, remember, settings_from
from service.cli.devices import _run
from service.devices import activation
from service.devices.secretbox import SecretBox
from service.errors import RegistryError

app = typer.Typer(help="Product secrets and dynamic activation (secure mode 3).", no_args_is_help=True)

ProductKey = Annotated[str, typer.Argument(help="the product key")]


@app.callback()
def product_options(
    ctx: typer.Context, config: ConfigOpt = None, database_url: DatabaseOpt = None, data_dir: DataDirOpt = None
) -> None:
    """Product secrets and dynamic activation (secure mode 3)."""
    remember(ctx, config=config, database_url=database_url, data_dir=data_dir)


def _product_json(product: activation.Product) -> dict[str, object]:
    return {
        "productKey": product.product_key,
        "secret": product.has_secret,
        "dynamicActivation": product.dynamic_activation,
    }


def _describe(product: activation.Product) -> str:
    return (
        f"{product.product_key}: product secret {'set' if product.has_secret else 'not set'}, "
        f"dynamic activation {'on' if product.dynamic_activation else 'off'}"
    )


@app.command("set")
def set_(
    ctx: typer.Context,
    product_key: ProductKey,
    secret: Annotated[str | None, typer.Option("--secret", help="set this product secret")] = None,
    generate_secret: Annotated[
        bool, typer.Option("--generate-secret", help="generate a product secret and print it")
    ] = False,
    dynamic_activation: Annotated[
        Literal["on", "off"] | None,
        typer.Option("--dynamic-activation", help="let registered devices activate with the product secret"),
    ] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Set a product's secret and/or its dynamic-activation policy (on needs a secret)."""
    if secret is None and not generate_secret and dynamic_activation is None:
        raise typer.BadParameter("give --secret, --generate-secret and/or --dynamic-activation on|off")
    policy = None if dynamic_activation is None else dynamic_activation == "on"
    settings = settings_from(ctx, config=config, database_url=database_url, data_dir=data_dir)
    product, generated = _run(
        settings,
        lambda conn, box: activation.set_product(
            conn, box(), product_key, secret=secret, generate_secret=generate_secret, dynamic_activation=policy
        ),
    )
    if as_json:
        typer.echo(json.dumps(_product_json(product) | ({"generatedSecret": generated} if generated else {})))
        return
    typer.echo(_describe(product), err=True)
    if generated is not None:
        typer.echo(generated)  # alone on stdout: PRODUCT_SECRET=$(pointgate product set … --generate-secret)


@app.command()
def show(
    ctx: typer.Context,
    product_key: ProductKey,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Whether a product has a secret (never the secret itself) and whether dynamic activation is on."""
    settings = settings_from(ctx, config=config, database_url=database_url, data_dir=data_dir)

    async def get(conn: asyncpg.Connection, _box: Callable[[], SecretBox]) -> activation.Product:
        product = await activation.get_product(conn, product_key)
        if product is None:
            raise RegistryError(f"product {product_key} is not registered")
        return product

    product = _run(settings, get)
    typer.echo(json.dumps(_product_json(product)) if as_json else _describe(product))
