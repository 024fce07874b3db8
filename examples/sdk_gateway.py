"""A gateway built on the official EnOS Python SDK: its sub-devices join its topology, log in, and backfill.

pip install enos-mqtt-sdk-python "paho-mqtt>=1.6,!=2.0.*,<3"
GW=$(pointgate device add inverter01 gw1); M1=$(pointgate device add inverter01 meter1)
python examples/sdk_gateway.py tcp://127.0.0.1:1883 inverter01 gw1 "$GW" meter1="$M1"

For each sub-device (``deviceKey=secret``, same product as the gateway): add it to the gateway's topology if
it is not there yet (``thing.topo.add``, signed with the sub-device's secret), log them all in at once
(``combine.login.batch``), send a resume for each on its own topic over the gateway's connection, and log them
out. Prints each step's reply code; exits 0 when every one is 200.
"""

from __future__ import annotations

import sys
import threading

from enos.core.MqttClient import MqttClient
from enos.message.upstream.resume.MeasurepointResumeRequest import MeasurepointResumeRequest
from enos.message.upstream.status.SubDeviceLoginBatchRequest import SubDeviceLoginBatchRequest
from enos.message.upstream.status.SubDeviceLogoutRequest import SubDeviceLogoutRequest
from enos.message.upstream.topo.SubDeviceInfo import SubDeviceInfo
from enos.message.upstream.topo.TopoAddRequest import TopoAddRequest
from enos.message.upstream.topo.TopoGetRequest import TopoGetRequest


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


def main(url: str, product_key: str, device_key: str, secret: str, sub_devices: dict[str, str]) -> int:
    client = MqttClient(url, product_key, device_key, secret)
    client.get_profile().set_auto_reconnect(False)
    client.get_profile().set_operation_timeout(5)
    connected = Connected()
    client.connect(connected)
    if not connected.event.wait(5):
        print("gateway not connected: wrong secret, unknown or disabled device (CONNACK 5)", file=sys.stderr)
        return 1
    codes: list[int] = []

    def step(name: str, response: object) -> None:
        code = response.get_code()  # type: ignore[attr-defined]
        print(f"{name}: {code} {response.get_message() or ''}".rstrip())  # type: ignore[attr-defined]
        codes.append(code)

    try:
        topology = client.publish(TopoGetRequest.builder().build())
        step("topo get", topology)
        known = {item["deviceKey"] for item in topology.get_data() or []}
        missing = [dk for dk in sub_devices if dk not in known]
        if missing:
            add = TopoAddRequest.builder()
            for dk in missing:
                add.add_sub_device(SubDeviceInfo(product_key, dk, sub_devices[dk]))
            step("topo add " + " ".join(missing), client.publish(add.build()))

        login = SubDeviceLoginBatchRequest.builder()
        for dk, sub_secret in sub_devices.items():
            login.add_sub_device_info(product_key, dk, sub_secret)
        step("login " + " ".join(sub_devices), client.publish(login.build()))

        for index, dk in enumerate(sub_devices):
            # a sub-device's points go on its own topic: pk/dk set on the request, sent over the gateway
            resume = (
                MeasurepointResumeRequest.builder()
                .set_product_key(product_key)
                .set_device_key(dk)
                .add_measure_point("temp", 20.0 + index)
                .set_timestamp(1700000000000)
                .build()
            )
            step(f"resume {dk}", client.publish(resume))

        for dk in sub_devices:
            logout = SubDeviceLogoutRequest.builder().set_sub_product_key(product_key).set_sub_device_key(dk).build()
            step(f"logout {dk}", client.publish(logout))
        return 0 if all(code == 200 for code in codes) else 1
    finally:
        client.disconnect()
        client.close()


if __name__ == "__main__":
    if len(sys.argv) < 6:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    url, product, gateway, gateway_secret = sys.argv[1:5]
    pairs = dict(arg.split("=", 1) for arg in sys.argv[5:])
    sys.exit(main(url, product, gateway, gateway_secret, pairs))
