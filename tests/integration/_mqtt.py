"""A raw MQTT 3.1.1 client for tests: it sends bytes as given (what paho will not send) and parses what comes back."""

from __future__ import annotations

import socket
import time

from tests.integration._login import Login

CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK, PINGRESP = 2, 3, 4, 5, 6, 7, 9, 11, 13


def _length(n: int) -> bytes:
    out = b""
    while True:  # MQTT's variable-length "remaining length"
        n, digit = divmod(n, 128)
        out += bytes([digit | (0x80 if n else 0)])
        if not n:
            return out


def _field(data: str | bytes) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return len(raw).to_bytes(2, "big") + raw


def frame(first_byte: int, body: bytes) -> bytes:
    """One packet: fixed header byte, remaining length, body."""
    return bytes([first_byte]) + _length(len(body)) + body


def connect_packet(
    client_id: str,
    creds: Login | None = None,
    *,
    password: str | None = None,
    keepalive: int = 60,
    clean: bool = True,
    will: tuple[str, bytes] | None = None,
) -> bytes:
    """A CONNECT, signed in with ``creds`` (``password`` overrides theirs) or anonymous without them."""
    flags = 0x02 if clean else 0
    payload = _field(client_id)
    if will is not None:
        flags |= 0x04
        payload += _field(will[0]) + _field(will[1])
    if creds is not None:
        flags |= 0x80 | 0x40
        payload += _field(creds.username) + _field(password if password is not None else creds.password)
    return frame(0x10, _field("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big") + payload)


def publish_packet(topic: str, payload: bytes, *, qos: int = 0, packet_id: int = 1) -> bytes:
    """A PUBLISH; ``qos`` goes into the header bits as given (3 included)."""
    body = _field(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + payload
    return frame(0x30 | (qos << 1), body)


def subscribe_packet(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    return frame(0x82, packet_id.to_bytes(2, "big") + b"".join(_field(f) + bytes([q]) for f, q in filters))


PINGREQ = frame(0xC0, b"")


class RawClient:
    """A TCP connection that sends bytes as given and parses whatever packets come back."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.packets: list[tuple[int, bytes]] = []  # (packet type, body), in arrival order
        self.closed = False
        self._buffer = b""

    def send(self, data: bytes) -> bool:
        """Send; False if the broker has closed the connection."""
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True
            return False
        return True

    def read_packet(self, timeout: float) -> tuple[int, bytes] | None:
        """The next packet, or None if none came within ``timeout`` or the connection closed."""
        deadline = time.monotonic() + timeout
        while True:
            packet = self._parse()
            if packet is not None:
                self.packets.append(packet)
                return packet
            left = deadline - time.monotonic()
            if self.closed or left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            except OSError:
                chunk = b""
            if not chunk:
                self.closed = True
            self._buffer += chunk

    def _parse(self) -> tuple[int, bytes] | None:
        buffer, length, shift, i = self._buffer, 0, 0, 1
        while True:
            if i >= len(buffer):
                return None
            length += (buffer[i] & 0x7F) << shift
            shift += 7
            i += 1
            if not buffer[i - 1] & 0x80:
                break
        if len(buffer) < i + length:
            return None
        self._buffer = buffer[i + length :]
        return buffer[0] >> 4, buffer[i : i + length]

    def connect(self, packet: bytes) -> int:
        """Send a CONNECT; return the CONNACK's return code (-1: closed without one)."""
        self.send(packet)
        reply = self.read_packet(5)
        if reply is None:
            return -1
        assert reply[0] == CONNACK
        return reply[1][1]

    def wait_closed(self, timeout: float) -> float | None:
        """Seconds until the broker closed the connection, reading meanwhile; None if still open at ``timeout``."""
        start = time.monotonic()
        while not self.closed and time.monotonic() - start < timeout:
            self.read_packet(timeout - (time.monotonic() - start))
        return time.monotonic() - start if self.closed else None

    def received(self, packet_type: int) -> list[bytes]:
        return [body for kind, body in self.packets if kind == packet_type]

    def close(self) -> None:
        self.sock.close()
