"""The broker auth endpoints' pure parts: identities from usernames, the EMQX ACL, and refused settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from service.devices.brokerauth import check_auth_settings, device_identity, emqx_acl, may
from service.errors import ConfigError
from service.settings import Settings


def test_device_identity_reads_enos_usernames_only() -> None:
    assert device_identity("dev1&inverter01") == ("inverter01", "dev1")
    for username in (None, "", "dev1", "&inverter01", "dev1&", "dev/1&inverter01", "dev1&inv+"):
        assert device_identity(username) is None


def test_emqx_acl_allows_the_devices_trees_then_denies_everything() -> None:
    acl = emqx_acl("pk", "dk")
    assert acl[-1] == {"permission": "deny", "action": "all", "topic": "#"}
    assert {(r["action"], r["topic"]) for r in acl[:-1]} == {
        (a, t) for a in ("publish", "subscribe") for t in ("/sys/pk/dk/#", "/ext/session/pk/dk/#")
    }


@pytest.mark.parametrize(
    ("action", "topic", "allowed"),
    [
        ("publish", "/sys/pk/dk/thing/measurepoint/resume", True),
        ("publish", "/sys/pk/other/thing/measurepoint/resume", False),
        ("subscribe", "/sys/pk/dk/#", True),
        ("subscribe", "/sys/pk/+/#", False),
        ("read", "/sys/pk/dk/thing/measurepoint/resume_reply", True),
        ("readwrite", "/sys/pk/other/x", False),
        ("delete", "/sys/pk/dk/x", False),
        ("publish", "", False),
    ],
)
def test_may_applies_serves_rules(action: str, topic: str, allowed: bool) -> None:
    assert may(("pk", "dk"), action, topic) is allowed
    assert may(None, action, topic) is False  # no identity, no permission (unlike an anonymous serve session)


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"auth_bind": "127.0.0.1:0"}, "unguarded"),
        ({"auth_tls_certfile": "c.pem", "auth_secret": "s"}, "go together"),
        ({"auth_tls_certfile": "c.pem", "auth_tls_keyfile": "k.pem", "auth_secret": "s"}, "need auth_bind"),
        ({"auth_tls_client_cafile": "ca.pem", "auth_bind": "127.0.0.1:0"}, "needs auth_tls_certfile"),
    ],
)
def test_half_configured_auth_is_refused(values: dict[str, Any], problem: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, **values)
    with pytest.raises(ConfigError, match=problem):
        check_auth_settings(settings)


def test_secret_alone_or_full_mtls_is_accepted(tmp_path: Path) -> None:
    check_auth_settings(Settings(data_dir=tmp_path, auth_secret="s"))
    check_auth_settings(
        Settings(
            data_dir=tmp_path,
            auth_bind="127.0.0.1:0",
            auth_tls_certfile="c.pem",
            auth_tls_keyfile="k.pem",
            auth_tls_client_cafile="ca.pem",
        )
    )
