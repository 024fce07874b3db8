"""MQTT 3.1.1 packets the load generator sends, encoded by hand, and the bench devices' requests.

Only what the generator needs: CONNECT (clean session, no credentials), SUBSCRIBE to one filter, PUBLISH at
QoS 0/1, DISCONNECT. Request payloads are EnOS ``thing.measurepoint.resume`` messages of the ``bench01``
model (benchmarks/models), each with its own ``id`` and ``time``, so every message writes new rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, overload

import orjson

PRODUCT_KEY = "bench01"
# the bench01 model, in payload order; --points takes the first N
POINT_NAMES = (
    "power",
    "voltage",
    "current",
    "temp",
    "frequency",
    "energy",
    "powerFactor",
    "irradiance",
    "status",
    "alarms",
)
KEEP_ALIVE_S = 300  # no PINGREQ is ever needed: every phase is far shorter than 1.5 x keep-alive
PACKET_IDS = 65535  # MQTT packet identifiers 1..65535
DISCONNECT = b"\xe0\x00"


def varint(n: int) -> bytes:
    """MQTT's variable-length "remaining length" encoding."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(text: str) -> bytes:
    """A length-prefixed UTF-8 string."""
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def connect_packet(client_id: str, keep_alive: int = KEEP_ALIVE_S) -> bytes:
    """CONNECT, clean session, no credentials (pointgate runs with allow_anonymous)."""
    body = mqtt_str("MQTT") + bytes((4, 0x02)) + keep_alive.to_bytes(2, "big") + mqtt_str(client_id)
    return b"\x10" + varint(len(body)) + body


def subscribe_packet(packet_id: int, topic_filter: str, qos: int) -> bytes:
    """SUBSCRIBE to one filter."""
    body = packet_id.to_bytes(2, "big") + mqtt_str(topic_filter) + bytes((qos,))
    return b"\x82" + varint(len(body)) + body


def publish_packet(topic: str, payload: bytes, qos: int, packet_id: int) -> bytes:
    """PUBLISH at QoS 0 or 1."""
    body = mqtt_str(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + payload
    return bytes((0x30 | qos << 1,)) + varint(len(body)) + body


def packet_id_of(k: int) -> int:
    """The packet identifier of a device's message ``k``."""
    return k % PACKET_IDS + 1


def message_of(packet_id: int, sent: int) -> int:
    """The message ``k`` a PUBACK's ``packet_id`` belongs to, given that messages ``0..sent-1`` were sent and
    fewer than 65 535 are in flight: the newest ``k < sent`` with that identifier."""
    last = sent - 1
    return last - (last - (packet_id - 1)) % PACKET_IDS


def request_topic(device_key: str) -> str:
    """The measurement-point resume topic of one bench device."""
    return f"/sys/{PRODUCT_KEY}/{device_key}/thing/measurepoint/resume"


def reply_topic(device_key: str) -> str:
    """Where pointgate answers that device's resume requests."""
    return request_topic(device_key) + "_reply"


def request_payload(k: int, time_ms: int, points: int) -> bytes:
    """Message ``k`` of a device: ``points`` numeric values of bench01, all valid, varying with ``k``."""
    values: dict[str, Any] = {
        "power": {"value": (k * 7) % 50000, "quality": 0},
        "voltage": 230.0 + (k % 100) * 0.01,
        "current": 10.0 + (k % 50) * 0.1,
        "temp": 40.0 + (k % 30) * 0.25,
        "frequency": 50.0 + (k % 20) * 0.005,
        "energy": 1000.0 + k * 0.001,
        "powerFactor": 0.9 + (k % 10) * 0.01,
        "irradiance": 800.0 + (k % 400) * 0.5,
        "status": k % 4,
        "alarms": k % 65536,
    }
    measurepoints = {name: values[name] for name in POINT_NAMES[:points]}
    return orjson.dumps(
        {
            "id": str(k),
            "version": "1.0",
            "method": "thing.measurepoint.resume",
            "params": {"measurepoints": measurepoints, "time": time_ms},
        }
    )


class Requests(Sequence[bytes]):
    """The PUBLISH packets of one device's ``count`` messages; message ``k`` carries ``time = time_base_ms + k``.

    Encoded up front (``eager``: nothing is encoded while the clock runs) or on demand, which a sustained run
    needs: a minute at full speed would otherwise hold hundreds of MB of packets before it starts.
    """

    def __init__(
        self, device_key: str, count: int, *, time_base_ms: int, points: int, qos: int, eager: bool = True
    ) -> None:
        topic = request_topic(device_key)
        self._count = count
        self._encode: Callable[[int], bytes] = lambda k: publish_packet(
            topic, request_payload(k, time_base_ms + k, points), qos, packet_id_of(k)
        )
        self._packets = [self._encode(k) for k in range(count)] if eager else None

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> bytes: ...
    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...
    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        if self._packets is not None:
            return self._packets[index]
        if isinstance(index, slice):
            return [self._encode(k) for k in range(*index.indices(self._count))]
        if not -self._count <= index < self._count:
            raise IndexError(index)
        return self._encode(index % self._count)
