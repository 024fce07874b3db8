"""Dynamic activation (secure mode 3) end to end: the official SDK and raw clients against pointgate and PostgreSQL.

A registered device that is not yet activated signs in with its product's secret, receives its device secret
on ``/ext/session/{pk}/{dk}/thing/activate/info`` and from then on must use secure mode 2.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from enos.core.internal.Profile import Profile
from enos.core.MqttClient import MqttClient
from enos.message.upstream.resume.MeasurepointResumeRequest import MeasurepointResumeRequest

from service.devices.activation import set_product
from service.devices.registry import set_enabled
from tests.integration._login import PK, Login, _registry, connect, login, raw_connack, register
from tests.integration.test_sdk import CONNECT_WAIT, _Connected, connected, sdk_client
from tests.support import RunningService, fetch

pytestmark = [
    pytest.mark.filterwarnings("ignore:Callback API version 1 is deprecated:DeprecationWarning"),
]

PRODUCT_SECRET = "product-secret-1"
DEVICE_SECRET = "device-secret-1"
ACCEPTED, REFUSED = b"\x20\x02\x00\x00", b"\x20\x02\x00\x05"


def product(running: RunningService, *, secret: str | None = PRODUCT_SECRET, dynamic: bool | None = True) -> None:
    _registry(running, lambda conn, box: set_product(conn, box, PK, secret=secret, dynamic_activation=dynamic))


def mode3(dk: str, secret: str = PRODUCT_SECRET, *, mode: str = "3") -> Login:
    """A secure-mode-3 login: the same signature as mode 2, over the product secret."""
    creds = login(dk, secret)
    return Login(creds.client_id.replace("securemode=2", f"securemode={mode}"), creds.username, creds.password)


@pytest.fixture
def service(start_service: Callable[..., RunningService]) -> RunningService:
    """A signed-in-only service whose product inverter01 allows dynamic activation; dev1 registered, not activated."""
    running = start_service(allow_anonymous=False)
    register(running, "dev1", DEVICE_SECRET)
    product(running)
    return running


def activated_at(dsn: str, dk: str) -> Any:
    return fetch(dsn, "SELECT activated_at FROM devices WHERE device_key = $1", dk)[0]["activated_at"]


def test_sdk_activates_then_signs_in_with_its_device_secret(service: RunningService, migrated_dsn: str) -> None:
    """The SDK with only the product secret is activated and handed its device secret; with that secret it then
    signs in (mode 2) and stores data; the product secret no longer lets it in."""
    got: list[str] = []
    delivered = threading.Event()

    def on_activated(secret: str) -> None:
        got.append(secret)
        delivered.set()

    profile = Profile(f"tcp://127.0.0.1:{service.port}", PK, "dev1", None, PRODUCT_SECRET)
    profile.set_operation_timeout(3)
    profile.set_auto_reconnect(False)
    client = MqttClient(profile=profile)
    client.on_device_dynamic_active = on_activated
    callback = _Connected()
    try:
        client.connect(callback)
        connected(client, callback)
        assert delivered.wait(CONNECT_WAIT), "the SDK was not handed its device secret"
    finally:
        client.disconnect()
        client.close()
    assert got == [DEVICE_SECRET]
    assert activated_at(migrated_dsn, "dev1") is not None

    with sdk_client(service.port, "dev1", got[0]) as (sdk, ready):
        connected(sdk, ready)
        request = MeasurepointResumeRequest.builder().add_measure_point("temp", 3.5).set_timestamp(1700000000000)
        assert sdk.publish(request.build()).get_code() == 200
    assert raw_connack(service.port, mode3("dev1")) == REFUSED  # activated: mode 3 is over for it


def test_raw_activation_message_is_what_the_sdks_read(service: RunningService) -> None:
    """Without subscribing, the activated device gets one QoS 1 message with its keys and secret."""
    device, code = connect(service.port, mode3("dev1"))
    try:
        assert code == 0
        topic = f"/ext/session/{PK}/dev1/thing/activate/info"
        _, body, qos = device.wait_message(topic)
        assert qos == 1
        message = json.loads(body)
        assert message["method"] == "thing.activate.info" and isinstance(message["id"], str)
        assert message["params"] == {"productKey": PK, "deviceKey": "dev1", "deviceSecret": DEVICE_SECRET}
    finally:
        device.close()


def test_first_secure_mode_2_login_closes_the_activation_window(service: RunningService, migrated_dsn: str) -> None:
    """A device that signed in with its device secret once can no longer be activated with the product secret."""
    assert activated_at(migrated_dsn, "dev1") is None
    assert raw_connack(service.port, login("dev1", DEVICE_SECRET)) == ACCEPTED
    assert activated_at(migrated_dsn, "dev1") is not None
    assert raw_connack(service.port, mode3("dev1")) == REFUSED


@pytest.mark.parametrize(
    ("setup", "creds"),
    [
        ("none", mode3("dev1", "not-the-product-secret")),  # wrong product secret
        ("disabled-policy", mode3("dev1")),  # the product does not allow dynamic activation
        ("no-product-secret", mode3("dev1")),
        ("none", mode3("nobody")),  # not registered: activation never registers a device
        ("disabled-device", mode3("dev1")),
        ("none", mode3("dev1", mode="4")),  # the integration channel is not served
    ],
    ids=["wrong-secret", "policy-off", "no-product-secret", "unknown-device", "disabled-device", "secure-mode-4"],
)
def test_refused_activations_get_connack_5_and_change_nothing(
    start_service: Callable[..., RunningService], migrated_dsn: str, setup: str, creds: Login
) -> None:
    """Wrong product secret, activation off or impossible, unknown or disabled device: CONNACK 5, not activated."""
    running = start_service(allow_anonymous=False)
    register(running, "dev1", DEVICE_SECRET)
    if setup == "disabled-policy":
        product(running, dynamic=False)
    elif setup == "no-product-secret":
        product(running, secret=None, dynamic=None)
    else:
        product(running)
    if setup == "disabled-device":
        _registry(running, lambda conn, box: set_enabled(conn, PK, "dev1", False))
    assert raw_connack(running.port, creds) == REFUSED
    assert activated_at(migrated_dsn, "dev1") is None


def test_two_instances_racing_activate_the_device_once(
    start_service: Callable[..., RunningService], migrated_dsn: str
) -> None:
    """Two services on one database (as --workers N): of simultaneous activations exactly one is accepted."""
    first = start_service(allow_anonymous=False)
    second = start_service(allow_anonymous=False)
    register(first, "dev1", DEVICE_SECRET)
    product(first)
    ports = [first.port, second.port] * 4
    barrier = threading.Barrier(len(ports))

    def attempt(port: int) -> bytes:
        barrier.wait(5)
        return raw_connack(port, mode3("dev1"))

    with ThreadPoolExecutor(len(ports)) as pool:
        answers = list(pool.map(attempt, ports))
    assert sorted(answers) == sorted([ACCEPTED] + [REFUSED] * (len(ports) - 1))
    assert activated_at(migrated_dsn, "dev1") is not None
