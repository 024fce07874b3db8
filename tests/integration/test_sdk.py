"""Conformance with the official EnOS Python SDK (enos-mqtt-sdk-python 0.1.1) as an independent client.

The SDK signs its own logins, builds its own payloads and matches replies strictly (id string, integer code,
exact reply topic; reference/enos-protocol.md §5.2), so a 200 here means a stock device works unmodified.
It is synchronous and threaded; the service runs on its own thread (RunningService), so these tests are sync.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme
from enos.core.MqttClient import MqttClient
from enos.message.upstream.resume.MeasurepointResumeBatchRequest import MeasurepointResumeBatchRequest
from enos.message.upstream.resume.MeasurepointResumeRequest import MeasurepointResumeRequest
from enos.message.upstream.tsl.MeasurepointPostRequest import MeasurepointPostRequest

from tests.integration._login import PK, register
from tests.support import RunningService, fetch

# the SDK's known noise (reference/enos-protocol.md §9.1): paho's VERSION1 callbacks and PROTOCOL_SSLv23
pytestmark = [
    pytest.mark.filterwarnings("ignore:Callback API version 1 is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLS is deprecated:DeprecationWarning"),
]

SECRET = "sdk-secret"
CONNECT_WAIT = 5.0


class _Connected:
    """The SDK's IConnectCallback: `connect(callback)` reports the CONNACK here instead of racing a 10 s wait."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def on_connect(self) -> None:
        self.event.set()

    def on_disconnect(self) -> None:
        pass

    def on_connect_failed(self) -> None:
        pass


class _RefusalSeen(logging.Handler):
    """Notices the SDK's log line for a refused CONNACK (the SDK raises nothing and has no callback for it)."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "bad connection, error code: 5" in record.getMessage():
            self.refused.set()


@contextmanager
def sdk_client(
    port: int,
    device_key: str,
    secret: str,
    *,
    sign_method: str | None = None,
    tls: tuple[Path, Path, Path] | None = None,
) -> Iterator[tuple[MqttClient, _Connected]]:
    """An SDK client (short timeouts, no auto reconnect) connecting asynchronously; closed afterwards, always."""
    client = MqttClient(f"tcp://127.0.0.1:{port}", PK, device_key, secret)
    profile = client.get_profile()
    profile.set_operation_timeout(3)
    profile.set_auto_reconnect(False)
    if sign_method is not None:
        profile.set_sign_method(sign_method)
    if tls is not None:
        profile.set_ssl_context(*(str(path) for path in tls))
    callback = _Connected()
    try:
        client.connect(callback)
        yield client, callback
    finally:
        # The SDK's close() stops paho's network thread only for a connected client, and paho's callbacks fail
        # once close() has dropped the client; so end the connection (or the refused client's thread) first,
        # through the paho client the SDK keeps private.
        connection = getattr(client, "_MqttClient__connection", None)
        paho = getattr(connection, "_MqttConnection__paho_client", None)
        if paho is not None and paho.is_connected():
            client.disconnect()
        elif paho is not None:
            paho.loop_stop()
        client.close()


def connected(client: MqttClient, callback: _Connected) -> MqttClient:
    assert callback.event.wait(CONNECT_WAIT), "the SDK did not connect"
    assert client.is_connected()
    return client


@pytest.fixture
def service(start_service: Callable[..., RunningService]) -> RunningService:
    """A service admitting only signed-in devices, with dev1 registered."""
    running = start_service(allow_anonymous=False)
    register(running, "dev1", SECRET)
    return running


def rows(dsn: str) -> list[tuple[str, str, Any, int | None, float]]:
    return [
        (r["device_key"], r["point"], r["value_num"], r["quality"], r["ts"].timestamp())
        for r in fetch(dsn, "SELECT * FROM measurepoints ORDER BY device_key, ts, point")
    ]


def resume(time_ms: int, **points: Any) -> MeasurepointResumeRequest:
    builder = MeasurepointResumeRequest.builder().set_timestamp(time_ms)
    for name, value in points.items():
        builder.add_measure_point(name, value)
    return builder.build()


@pytest.mark.parametrize("sign_method", [None, "hmacsha256", "hmacsha1", "hmacmd5"])
def test_sdk_signs_in_and_its_resume_lands(service: RunningService, migrated_dsn: str, sign_method: str | None) -> None:
    """The SDK logs in with each of its sign methods, its resume gets a 200 it accepts, and the points are stored."""
    with sdk_client(service.port, "dev1", SECRET, sign_method=sign_method) as (client, callback):
        connected(client, callback)
        request = (
            MeasurepointResumeRequest.builder()
            .add_measure_point("temp", 21.5)
            .add_measure_point_with_quality("Power", 7, 2)
            .add_measure_point("branchCurr", ["1.5", "2.5"])
            .set_timestamp(1700000000000)
            .build()
        )
        response = client.publish(request)
    assert (response.get_code(), response.is_success(), response.get_data()) == (200, True, {})
    assert response.get_id() == request.get_id()
    assert rows(migrated_dsn) == [
        ("dev1", "Power", 7.0, 2, 1700000000.0),
        ("dev1", "branchCurr", None, None, 1700000000.0),
        ("dev1", "temp", 21.5, None, 1700000000.0),
    ]


def test_sdk_sees_1204_naming_the_invalid_point(service: RunningService, migrated_dsn: str) -> None:
    """A resume with a point outside the model comes back to the SDK as code 1204 naming it, and nothing is stored."""
    with sdk_client(service.port, "dev1", SECRET) as (client, callback):
        connected(client, callback)
        response = client.publish(resume(1700000000000, temp=1.0, notInTheModel=5))
    assert response.get_code() == 1204 and not response.is_success()
    assert "notInTheModel" in response.get_message()
    assert rows(migrated_dsn) == []


def test_sdk_batch_resume_stores_every_item(service: RunningService, migrated_dsn: str) -> None:
    """The SDK's batch resume (default "" flags, items without device keys) gets 200 and stores every item."""
    with sdk_client(service.port, "dev1", SECRET) as (client, callback):
        connected(client, callback)
        batch = (
            MeasurepointResumeBatchRequest.builder()
            .add_request(resume(1700000000000, temp=1.0))
            .add_request(resume(1700000060000, temp=2.0))
            .build()
        )
        response = client.publish(batch)
    assert response.get_code() == 200
    assert rows(migrated_dsn) == [("dev1", "temp", 1.0, None, 1700000000.0), ("dev1", "temp", 2.0, None, 1700000060.0)]


def test_sdk_live_post_is_stored(service: RunningService, migrated_dsn: str) -> None:
    """The SDK's live measurepoint post gets 200 on its own reply topic and is stored like a resume."""
    with sdk_client(service.port, "dev1", SECRET) as (client, callback):
        connected(client, callback)
        post = MeasurepointPostRequest.builder().add_measurepoint("temp", 4.5).set_timestamp(1700000000000).build()
        response = client.publish(post)
    assert response.get_code() == 200
    assert rows(migrated_dsn) == [("dev1", "temp", 4.5, None, 1700000000.0)]


def test_sdk_with_a_wrong_secret_stays_unconnected(service: RunningService) -> None:
    """A wrong secret leaves the SDK refused (CONNACK 5) and unconnected, without an exception."""
    seen = _RefusalSeen()
    sdk_log = logging.getLogger("enos.core.internal.MqttConnection")
    sdk_log.addHandler(seen)
    try:
        with sdk_client(service.port, "dev1", "not-the-secret") as (client, callback):
            assert seen.refused.wait(CONNECT_WAIT), "the SDK never logged a refused CONNACK"
            assert not callback.event.is_set()
            assert not client.is_connected()
    finally:
        sdk_log.removeHandler(seen)


def test_sdk_over_mutual_tls(start_service: Callable[..., RunningService], tmp_path: Path, migrated_dsn: str) -> None:
    """The SDK's own TLS set-up (CA, client certificate and key) signs in on a client-certificate listener."""
    server_ca, client_ca = trustme.CA(), trustme.CA()
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key", "client_ca", "server", "server_key")}
    server = server_ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(files["server"]))
    server.private_key_pem.write_to_path(str(files["server_key"]))
    client_ca.cert_pem.write_to_path(str(files["client_ca"]))
    server_ca.cert_pem.write_to_path(str(files["ca"]))
    device_cert = client_ca.issue_cert("dev1")
    device_cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    device_cert.private_key_pem.write_to_path(str(files["key"]))
    running = start_service(
        allow_anonymous=False,
        mqtts_bind="127.0.0.1:0",
        tls_certfile=files["server"],
        tls_keyfile=files["server_key"],
        tls_client_cafile=files["client_ca"],
    )
    register(running, "dev1", SECRET)
    tls = (files["ca"], files["cert"], files["key"])
    with sdk_client(running.service.mqtts_port, "dev1", SECRET, tls=tls) as (client, callback):
        connected(client, callback)
        response = client.publish(resume(1700000000000, temp=9.5))
    assert response.get_code() == 200
    assert rows(migrated_dsn) == [("dev1", "temp", 9.5, None, 1700000000.0)]


def test_sdk_requests_back_to_back_each_get_their_own_reply(service: RunningService, migrated_dsn: str) -> None:
    """Several SDK requests in a row (ids "n", "n+1", …) are each answered on time with their own id."""
    started = time.monotonic()
    with sdk_client(service.port, "dev1", SECRET) as (client, callback):
        connected(client, callback)
        codes = [client.publish(resume(1700000000000 + i, temp=float(i))).get_code() for i in range(20)]
    assert codes == [200] * 20
    assert time.monotonic() - started < 3, "a reply went unmatched and the SDK waited for its timeout"
    assert len(rows(migrated_dsn)) == 20
