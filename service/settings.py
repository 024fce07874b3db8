"""The one typed settings object.

Precedence, highest first: command-line flags, ``POINTGATE_<NAME>`` environment variables, the TOML file named
by ``POINTGATE_CONFIG`` (or ``--config``), defaults. A wrong value fails at start-up with the key's name.
"""

from __future__ import annotations

import contextvars
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, PlainSerializer, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from service.errors import ConfigError
from service.resources import schemas_dir

# the TOML file for the Settings being built right now (load_settings' argument), without touching os.environ
_config_file: contextvars.ContextVar[str | None] = contextvars.ContextVar("pointgate_config_file", default=None)


DEFAULT_CONSUME_FILTERS = (
    # the topics start with "/", so the filter after the group name starts with an empty level: "//sys"
    "/sys/+/+/thing/measurepoint/resume",
    "/sys/+/+/thing/measurepoint/resume/batch",
    "/sys/+/+/thing/measurepoint/post",
    "/sys/+/+/thing/measurepoint/post/batch",
)


def _default_data_dir() -> Path:
    # As root the embedded PostgreSQL runs as an unprivileged user, which must be able to reach the data
    # directory: /root is mode 700, so root's default lives under /var/lib like any system service's.
    if os.geteuid() == 0:
        return Path("/var/lib/pointgate")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "pointgate"


_MAX_WORKERS = 64


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, lowered by a cgroup v2 CPU quota (a container limit)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))  # ceiling: 1.5 CPUs → 2 workers
    except (OSError, ValueError):
        pass
    return max(1, min(cores, _MAX_WORKERS))


def parse_bind(value: str, *, default_host: str = "0.0.0.0") -> tuple[str, int]:  # noqa: S104 - devices connect from anywhere
    """Split ``HOST:PORT`` (``[::1]:1883`` for IPv6, ``:1883`` for all interfaces) into its parts."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return (host.strip("[]") or default_host), int(port)


def parse_broker_url(value: str) -> tuple[bool, str, int]:
    """Split ``mqtt://HOST[:PORT]`` / ``mqtts://HOST[:PORT]`` into (tls, host, port); ports default to 1883/8883."""
    parts = urlsplit(value)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"expected mqtt://HOST:PORT or mqtts://HOST:PORT, got {value!r}")
    if parts.username or parts.password:
        raise ValueError("put broker credentials in broker_username/broker_password, not in the URL")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in {value!r}") from None
    tls = parts.scheme == "mqtts"
    return tls, parts.hostname, port or (8883 if tls else 1883)


_DURATION = re.compile(r"\s*(\d+)\s*([wdhm])\s*", re.IGNORECASE)
_UNIT_SECONDS = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60}


def parse_duration(value: Any) -> Any:
    """``90d``, ``12h``, ``2w``, ``30m`` (or a number of seconds) as a timedelta; ``off``/``""`` as None."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "off", "none"):
            return None
        match = _DURATION.fullmatch(text)
        if match is None:
            if text.isdigit():
                return timedelta(seconds=int(text))
            raise ValueError(f"expected a duration like 90d, 12h, 2w or 30m, got {value!r}")
        return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()])
    return value


def format_duration(value: timedelta) -> str:
    """The shortest of ``Nw``, ``Nd``, ``Nh``, ``Nm``, ``Ns`` that is exact."""
    seconds = int(value.total_seconds())
    for unit, size in (("w", 604_800), ("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _format_optional(value: timedelta | None) -> str | None:
    return None if value is None else format_duration(value)


Duration = Annotated[
    timedelta, BeforeValidator(parse_duration), PlainSerializer(format_duration, return_type=str, when_used="json")
]
OptionalDuration = Annotated[
    timedelta | None,
    BeforeValidator(parse_duration),
    PlainSerializer(_format_optional, return_type=str | None, when_used="json"),
]


class Settings(BaseSettings):
    """Everything an operator can set. Each field is also ``POINTGATE_<FIELD NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="POINTGATE_", extra="forbid", validate_default=True)

    mqtt_bind: str = Field("0.0.0.0:1883", description="plain MQTT listener, HOST:PORT")
    mqtts_bind: str | None = Field(None, description="TLS MQTT listener, HOST:PORT (needs tls_certfile/keyfile)")
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    tls_client_cafile: Path | None = Field(None, description="CA for client certificates; with it they are required")
    http_bind: str = Field("127.0.0.1:9100", description="ops endpoint (/livez, /readyz, /metrics), HOST:PORT")
    database_url: SecretStr | None = Field(None, description="PostgreSQL DSN; unset = embedded server in data_dir")
    data_dir: Path = Field(default_factory=_default_data_dir)
    models: Path = Field(default_factory=schemas_dir, description="directory of thing model JSON files")
    workers: int = Field(
        default_factory=available_cores,
        ge=1,
        le=_MAX_WORKERS,
        description="processes sharing the MQTT port (SO_REUSEPORT); default: the cores available",
    )
    allow_anonymous: bool = False
    secret_key_file: Path | None = Field(None, description="key that encrypts device secrets; default in data_dir")
    max_payload_bytes: int = Field(512 * 1024, ge=1024, le=64 * 1024 * 1024)
    connect_timeout: float = Field(10.0, gt=0, description="seconds a new connection has to send CONNECT")
    drain_timeout: float = Field(8.0, gt=0, description="seconds to commit in-flight data on SIGTERM")
    max_inflight_requests: int = Field(
        32, ge=1, le=65535, description="requests of one connection awaiting their commit before it is read no further"
    )
    max_queued_bytes: int = Field(
        1 << 20, ge=65536, description="bytes waiting towards one device; past it the device is disconnected"
    )
    max_subscriptions: int = Field(100, ge=1, description="subscriptions one session may hold")
    max_wildcard_subscriptions: int = Field(10, ge=0, description="subscriptions with + or # one session may hold")
    max_qos2_inflight: int = Field(16, ge=1, le=65535, description="QoS 2 messages one connection may have unreleased")
    max_sub_devices_per_gateway: int = Field(
        200, ge=1, le=100_000, description="sub-devices one gateway connection may have logged in (combine.login)"
    )
    session_expiry: float = Field(
        86400.0, gt=0, description="seconds a persistent session outlives its device's last connection"
    )
    write_batch_points: int = Field(5000, ge=1, description="most points in one database transaction")
    write_connections: int = Field(2, ge=1, le=32, description="database connections writing points in parallel")
    partition_width: Duration = Field(timedelta(days=1), description="time range of one points partition (e.g. 1d, 6h)")
    partitions_ahead: int = Field(3, ge=1, le=1000, description="partitions kept created ahead of now")
    partition_backfill: Duration = Field(
        timedelta(days=365), description="how far back partitions are created on demand; older goes to the default"
    )
    retention: OptionalDuration = Field(None, description="drop partitions older than this (e.g. 90d); unset: keep all")
    keep_rejected: bool = Field(True, description="keep refused requests for `pointgate rejected` (false: none)")
    rejected_payload_bytes: int = Field(65536, ge=0, description="most payload bytes kept per refused request")
    rejected_max_count: int = Field(100_000, ge=1, description="most refused requests kept (oldest go first)")
    rejected_max_age: Duration = Field(timedelta(days=7), description="refused requests older than this are dropped")
    embedded_user: str | None = Field(None, description="user that runs the embedded PostgreSQL when root")
    embedded_port: int | None = Field(None, ge=1, le=65535, description="also expose the embedded DB on 127.0.0.1")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"
    # `pointgate consume`: the cluster broker it reads requests from (docs/scale-out.md)
    broker_url: str | None = Field(None, description="mqtt://HOST:PORT or mqtts://HOST:PORT of the cluster broker")
    broker_username: str | None = None
    broker_password: SecretStr | None = None
    broker_client_id: str | None = Field(None, description="unique per consumer; default pointgate-HOSTNAME-PID")
    broker_protocol: Literal["5", "3.1.1"] = "5"
    broker_tls_cafile: Path | None = Field(None, description="CA for the broker's certificate (mqtts; default: system)")
    broker_tls_certfile: Path | None = Field(None, description="client certificate for the broker (PEM)")
    broker_tls_keyfile: Path | None = None
    broker_keepalive: int = Field(30, ge=5, le=3600)
    broker_session_expiry: int = Field(0, ge=0, description="0: clean session; >0: seconds the broker keeps it")
    consume_group: str = Field("pointgate", pattern=r"^[^/+#]+$", description="shared subscription group name")
    consume_filters: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CONSUME_FILTERS), min_length=1, description="topic filters to share"
    )
    consume_max_in_flight: int = Field(
        1000, ge=1, le=65535, description="messages held before commit (MQTT 5 Receive Maximum)"
    )
    # broker authentication endpoints (serve and consume): off unless a secret or a client CA is set
    auth_bind: str | None = Field(None, description="own listener for the auth endpoints; default: the ops one")
    auth_secret: SecretStr | None = Field(None, description="the broker sends it as 'Authorization: Bearer …'")
    auth_tls_certfile: Path | None = Field(None, description="HTTPS certificate for --auth-bind")
    auth_tls_keyfile: Path | None = None
    auth_tls_client_cafile: Path | None = Field(None, description="CA for the broker's client certificate (mTLS)")

    @field_validator("mqtt_bind", "mqtts_bind", "http_bind", "auth_bind")
    @classmethod
    def _check_bind(cls, value: str | None) -> str | None:
        if value is not None:
            parse_bind(value)
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str | None) -> str | None:
        if value is not None:
            parse_broker_url(value)
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _config_file.get() or os.environ.get("POINTGATE_CONFIG")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    def redacted(self) -> dict[str, Any]:
        """The effective settings as plain data, secrets replaced by ``'***'``."""
        data = self.model_dump(mode="json")
        if self.database_url is not None:
            data["database_url"] = _redact_dsn(self.database_url.get_secret_value())
        return data


# POINTGATE_* variables read outside `Settings`: the config file, the PostgreSQL binaries, the test database
_OTHER_ENVIRONMENT = ("POINTGATE_CONFIG", "POINTGATE_PG_BINDIR", "POINTGATE_TEST_DATABASE_URL")


def known_environment() -> set[str]:
    """Every ``POINTGATE_*`` environment variable pointgate reads; any other is a misspelling to warn about."""
    return {f"POINTGATE_{name.upper()}" for name in Settings.model_fields} | set(_OTHER_ENVIRONMENT)


def _redact_dsn(dsn: str) -> str:
    # keep host and database visible (they are what an operator checks), hide the password
    scheme, sep, rest = dsn.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in creds:
        return dsn
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"


def load_settings(overrides: dict[str, Any] | None = None, *, config_file: Path | None = None) -> Settings:
    """Build the settings, or raise `ConfigError` naming every wrong key and why."""
    if config_file is None and os.environ.get("POINTGATE_CONFIG"):
        config_file = Path(os.environ["POINTGATE_CONFIG"])
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file {config_file} does not exist")
    token = _config_file.set(str(config_file) if config_file is not None else None)
    try:
        return Settings(**{k: v for k, v in (overrides or {}).items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc
    finally:
        _config_file.reset(token)
