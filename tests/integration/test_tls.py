"""The TLS listener end to end, with certificates minted in the test (trustme): server-only and mutual TLS."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from service.app import Service
from service.errors import ConfigError
from service.settings import Settings
from tests.integration._login import PK, Login, connect, exchange_connect, login, raw_connack, register
from tests.support import SAMPLE, RunningService, fetch, resume_topic

SECRET = "tls-secret"


@dataclass
class Pki:
    """A server CA with the broker's certificate, and a separate CA for device certificates."""

    server_ca: trustme.CA
    client_ca: trustme.CA
    certfile: Path
    keyfile: Path
    client_cafile: Path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    server_ca, client_ca = trustme.CA(), trustme.CA()
    server = server_ca.issue_cert("127.0.0.1", "localhost")
    pki = Pki(server_ca, client_ca, tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "clients-ca.pem")
    server.cert_chain_pems[0].write_to_path(str(pki.certfile))
    server.private_key_pem.write_to_path(str(pki.keyfile))
    client_ca.cert_pem.write_to_path(str(pki.client_cafile))
    return pki


def client_context(pki: Pki, client_cert_from: trustme.CA | None = None) -> ssl.SSLContext:
    """A device's TLS context trusting the server CA, with a certificate from ``client_cert_from`` if given."""
    context = ssl.create_default_context()
    pki.server_ca.configure_trust(context)
    if client_cert_from is not None:
        client_cert_from.issue_cert("device-dev1").configure_cert(context)
    return context


def tls_connack(port: int, creds: Login, context: ssl.SSLContext) -> bytes:
    """The CONNACK bytes a raw CONNECT gets over TLS; b"" when the broker closes the connection instead."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        return exchange_connect(sock, creds)


def stored_rows(dsn: str) -> int:
    (row,) = fetch(dsn, "SELECT count(*) AS n FROM measurepoints WHERE device_key = 'dev1'")
    return int(row["n"])


def test_tls_listener_signs_in_and_stores_while_plain_tcp_still_works(
    start_service: Callable[..., RunningService], pki: Pki, migrated_dsn: str
) -> None:
    """A device over TLS (server CA trusted) signs in and gets 200; the plain listener keeps working alongside."""
    service = start_service(
        allow_anonymous=False, mqtts_bind="127.0.0.1:0", tls_certfile=pki.certfile, tls_keyfile=pki.keyfile
    )
    assert service.service.mqtts_port != service.port
    register(service, "dev1", SECRET)
    secure, code = connect(service.service.mqtts_port, login("dev1", SECRET), tls=client_context(pki))
    try:
        assert code == 0
        assert secure.client.socket().version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[union-attr]
        assert secure.request(resume_topic(PK, "dev1"), SAMPLE)["code"] == 200
    finally:
        secure.close()
    plain, code = connect(service.port, login("dev1", SECRET))
    try:
        assert code == 0
        later = {**SAMPLE, "params": {"measurepoints": {"temp": 2.0}, "time": 1700000009000}}
        assert plain.request(resume_topic(PK, "dev1"), later)["code"] == 200
    finally:
        plain.close()
    assert stored_rows(migrated_dsn) == 4


def test_plain_mqtt_on_the_tls_port_gets_no_connack(start_service: Callable[..., RunningService], pki: Pki) -> None:
    """A client skipping TLS on the TLS port is never answered with a CONNACK."""
    service = start_service(
        allow_anonymous=False, mqtts_bind="127.0.0.1:0", tls_certfile=pki.certfile, tls_keyfile=pki.keyfile
    )
    register(service, "dev1", SECRET)
    try:
        answer = raw_connack(service.service.mqtts_port, login("dev1", SECRET), timeout=3)
    except (ConnectionError, TimeoutError):
        answer = b""
    assert answer[:2] != b"\x20\x02"


@pytest.fixture
def mutual_tls(start_service: Callable[..., RunningService], pki: Pki) -> RunningService:
    """A service whose TLS listener requires a device certificate issued by the client CA."""
    service = start_service(
        allow_anonymous=False,
        mqtts_bind="127.0.0.1:0",
        tls_certfile=pki.certfile,
        tls_keyfile=pki.keyfile,
        tls_client_cafile=pki.client_cafile,
    )
    register(service, "dev1", SECRET)
    return service


def test_client_certificate_from_the_ca_is_admitted(mutual_tls: RunningService, pki: Pki, migrated_dsn: str) -> None:
    """With a client CA configured, a device presenting a certificate it issued signs in and gets 200."""
    tls = client_context(pki, pki.client_ca)
    device, code = connect(mutual_tls.service.mqtts_port, login("dev1", SECRET), tls=tls)
    try:
        assert code == 0
        assert device.request(resume_topic(PK, "dev1"), SAMPLE)["code"] == 200
    finally:
        device.close()
    assert stored_rows(migrated_dsn) == 3


@pytest.mark.parametrize("cert_from", ["none", "other-ca"])
def test_client_without_a_trusted_certificate_never_gets_in(
    mutual_tls: RunningService, pki: Pki, migrated_dsn: str, cert_from: str
) -> None:
    """With a client CA configured, a device without a certificate, or with one from another CA, gets no CONNACK 0."""
    issuer = {"none": None, "other-ca": trustme.CA()}[cert_from]
    context = client_context(pki, issuer)
    try:
        answer = tls_connack(mutual_tls.service.mqtts_port, login("dev1", SECRET), context)
    except (ssl.SSLError, ConnectionError):
        answer = b""  # the handshake failed (TLS 1.2) or the server's alert arrived on the first read (TLS 1.3)
    assert answer == b""
    # the control: the same login over the same listener with the CA's certificate is accepted
    assert tls_connack(mutual_tls.service.mqtts_port, login("dev1", SECRET), client_context(pki, pki.client_ca)) == (
        b"\x20\x02\x00\x00"
    )


@pytest.mark.parametrize("missing", ["tls_certfile", "tls_keyfile", "tls_client_cafile"])
def test_missing_tls_file_refuses_to_start(
    make_settings: Callable[..., Settings], pki: Pki, tmp_path: Path, missing: str
) -> None:
    """A TLS file that does not exist stops start-up with a ConfigError naming the setting and the file."""
    files: dict[str, Any] = {
        "tls_certfile": pki.certfile,
        "tls_keyfile": pki.keyfile,
        "tls_client_cafile": pki.client_cafile,
    }
    files[missing] = tmp_path / "nowhere" / f"{missing}.pem"
    service = Service(make_settings(mqtts_bind="127.0.0.1:0", **files))
    with pytest.raises(ConfigError) as refused:
        # refused before any listener or database is started, so there is nothing to stop afterwards
        asyncio.run(service.start())
    assert missing in str(refused.value) and f"nowhere/{missing}.pem" in str(refused.value)
