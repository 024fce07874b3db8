"""A device built on the official EnOS Python SDK, backfilling points into pointgate.

pip install enos-mqtt-sdk-python "paho-mqtt>=1.6,!=2.0.*,<3"
pointgate device add inverter01 dev2            # prints SECRET
python examples/sdk_resume.py tcp://127.0.0.1:1883 inverter01 dev2 SECRET
"""

from __future__ import annotations

import socket
import sys
import threading
from urllib.parse import urlsplit

from enos.core.MqttClient import MqttClient
from enos.message.upstream.resume.MeasurepointResumeRequest import MeasurepointResumeRequest


class Connected:
    """The SDK's connect callback: `connect(callback)` returns at once instead of stalling up to 10 s."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def on_connect(self) -> None:
        self.event.set()

    def on_disconnect(self) -> None:
        pass

    def on_connect_failed(self) -> None:
        pass


def reachable(url: str) -> str | None:
    """None if something accepts TCP connections at ``url``; otherwise why not (before blaming the secret)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 1883
    try:
        with socket.create_connection((host, port), timeout=5):
            return None
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc} (is pointgate serve running there?)"


def main(url: str, product_key: str, device_key: str, secret: str) -> int:
    problem = reachable(url)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    client = MqttClient(url, product_key, device_key, secret)
    client.get_profile().set_auto_reconnect(False)
    client.get_profile().set_operation_timeout(5)
    connected = Connected()
    client.connect(connected)
    if not connected.event.wait(5):
        print("not connected: wrong secret, unknown or disabled device (CONNACK 5)", file=sys.stderr)
        return 1
    try:
        request = (
            MeasurepointResumeRequest.builder()
            .add_measure_point("temp", 1.02)
            .add_measure_point("branchCurr", ["1.02", "2.02", "7.93"])
            .add_measure_point_with_quality("Power", 1, 9)
            .set_timestamp(1700000000000)
            .build()
        )
        response = client.publish(request)
        print(response.get_code(), response.get_message())  # 200 once the points are committed
        return 0 if response.get_code() == 200 else 1
    finally:
        client.disconnect()
        client.close()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
