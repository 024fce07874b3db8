"""The amqtt configuration pointgate runs with, built from `Settings`."""

from __future__ import annotations

from typing import Any

from service.errors import ConfigError
from service.settings import Settings


def broker_config(settings: Settings, *, mqtt_bind: str | None = None) -> dict[str, Any]:
    """Listeners (plain and optional TLS) and our plugin set; amqtt's defaults are deliberately not loaded.

    amqtt's default plugins log every packet and run ``$SYS`` (30–40 % of throughput, reference/amqtt.md §4.2),
    and its anonymous plugin would mark every session anonymous: an explicit ``plugins`` mapping replaces them.
    """
    listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": mqtt_bind or settings.mqtt_bind}}
    if settings.mqtts_bind:
        if settings.tls_certfile is None or settings.tls_keyfile is None:
            raise ConfigError("mqtts_bind needs tls_certfile and tls_keyfile")
        for name in ("tls_certfile", "tls_keyfile", "tls_client_cafile"):
            path = getattr(settings, name)
            if path is not None and not path.is_file():
                raise ConfigError(f"{name}: {path} does not exist")
        tls: dict[str, Any] = {
            "type": "tcp",
            "bind": settings.mqtts_bind,
            "ssl": True,
            "certfile": str(settings.tls_certfile),
            "keyfile": str(settings.tls_keyfile),
        }
        if settings.tls_client_cafile is not None:
            tls["cafile"] = str(settings.tls_client_cafile)
        listeners["tls"] = tls
    return {
        "listeners": listeners,
        "timeout_disconnect_delay": 0,
        "plugins": {"service.broker.plugins.DeviceAuthPlugin": {}},
    }
