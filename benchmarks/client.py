"""The generator's raw MQTT client: one asyncio protocol per connection, no MQTT library in the way.

A connection is a bench device (it sends requests and records, per message, when it sent it, when the reply
came and when the PUBACK came), an idle device (it only holds a subscription), or the subscriber that
counts what stock amqtt relays. The parser understands CONNACK, SUBACK, PUBACK and PUBLISH, and PUBACKs QoS 1
PUBLISHes in the same write as whatever the device sends next.

A device keeps at most ``window`` requests in flight and refills its window either on the **reply** (the
request is answered) or on the **PUBACK** (as the official EnOS SDKs and paho do). Either way it records
both, and counts a PUBACK that arrives before the reply it belongs to (pointgate must never let that happen
to a subscribed device).
"""

from __future__ import annotations

import asyncio
import math
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import orjson

from benchmarks.wire import message_of

Refill = Literal["reply", "puback"]
TICK_S = 0.001  # open-loop pacing period


@dataclass
class GenState:
    """What one generator process records; per-message arrays are indexed by device base offset + k."""

    send: array[float]
    recv: array[float]  # reply received (0.0: never)
    ack: array[float]  # PUBACK received (0.0: never)
    senders: int  # devices that must drain before the process is finished
    finished: asyncio.Future[None]
    drained: int = 0
    replies: int = 0
    acks: int = 0
    codes: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    puback_before_reply: int = 0  # PUBACKs that overtook the reply of the same request
    sub_recv: array[float] = field(default_factory=lambda: array("d"))
    sub_expected: int = 0
    late_sends: int = 0  # open loop: messages sent more than 2 ticks after they were due
    max_lag: float = 0.0  # open loop: the latest of them, seconds
    window_full: int = 0  # open loop: ticks at which a device had messages due but a full window

    def check_finished(self) -> None:
        """Resolve ``finished`` once every device has drained and the subscriber has everything."""
        if self.drained >= self.senders and len(self.sub_recv) >= self.sub_expected and not self.finished.done():
            self.finished.set_result(None)


class Client(asyncio.Protocol):
    """One MQTT connection of the generator: a device, an idle device (``state`` None) or the subscriber."""

    def __init__(
        self,
        state: GenState | None,
        *,
        base: int = 0,
        packets: Sequence[bytes] = (),
        window: int = 1,
        refill: Refill = "reply",
        expect_reply: bool = True,
        expect_ack: bool = True,
        subscriber: bool = False,
        expect_suback: bool = True,
    ) -> None:
        self.state = state
        self.base = base
        self.packets = packets
        self.window = window
        self.refill: Refill = refill
        self.expect_reply = expect_reply
        self.expect_ack = expect_ack
        self.subscriber = subscriber
        self.expect_suback = expect_suback
        self.sent = 0
        self.replies = 0
        self.acks = 0
        self.stop_at = math.inf  # no request is sent from then on (sustained runs)
        self.stopped = False  # sends no more requests
        self.drained = False  # stopped, and every request sent has its reply and PUBACK
        self.closed_loop = True
        self.t0 = 0.0  # open loop: when message 0 is due
        self.period = 0.0  # open loop: seconds between this device's messages
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buf = bytearray()
        self._lost = False

    @property
    def in_flight(self) -> int:
        """Requests that still hold a place in the window."""
        return self.sent - (self.replies if self.refill == "reply" else self.acks)

    # asyncio.Protocol ----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport (uvloop's is not an ``asyncio.Transport`` subclass, hence the assignment)."""
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail the handshake, or count a device that lost its connection while it still had work."""
        self._lost = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("connection closed before SUBACK"))
        elif self.state is not None and not self.subscriber and not self.drained:
            # what it had in flight is never answered: the device is done (the run records the loss)
            self.state.errors["connection lost"] += 1
            self.stopped = self.drained = True
            self.state.drained += 1
            self.state.check_finished()

    def data_received(self, data: bytes) -> None:
        """Parse every complete packet, record it, then write PUBACKs and refills in one go."""
        buf = self._buf
        buf += data
        now = time.monotonic()
        size = len(buf)
        pos = 0
        out: list[bytes] = []
        freed = 0
        while size - pos >= 2:
            first = buf[pos]
            length, multiplier, i = 0, 1, pos + 1
            while i < size:
                byte = buf[i]
                length += (byte & 0x7F) * multiplier
                multiplier *= 128
                i += 1
                if not byte & 0x80:
                    break
            else:
                break  # the remaining length itself is incomplete
            end = i + length
            if end > size:
                break
            kind = first & 0xF0
            if kind == 0x30:
                freed += self._publish(first, buf, i, end, now, out)
            elif kind == 0x40:
                freed += self._puback(int.from_bytes(buf[i : i + 2]), now)
            elif kind == 0x20:
                if buf[i + 1] != 0:
                    self._fail(f"CONNACK return code {buf[i + 1]}")
                elif not self.expect_suback and not self.ready.done():
                    self.ready.set_result(None)
            elif kind == 0x90:
                if buf[end - 1] == 0x80:
                    self._fail("SUBACK refused the subscription")
                elif not self.ready.done():
                    self.ready.set_result(None)
            pos = end
        del buf[:pos]
        if freed and self.closed_loop and not self.stopped:
            self._send(min(freed, len(self.packets) - self.sent), now, out)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))
        if self.stopped and not self.drained:
            self._check_drained()

    # ----------------------------------------------------------------------------------------------------
    def _publish(self, first: int, buf: bytearray, start: int, end: int, now: float, out: list[bytes]) -> int:
        qos = (first >> 1) & 0x03
        topic_end = start + 2 + int.from_bytes(buf[start : start + 2])
        payload_start = topic_end
        if qos:
            out.append(b"\x40\x02" + bytes(buf[topic_end : topic_end + 2]))
            payload_start += 2
        state = self.state
        if state is None:
            return 0
        if self.subscriber:
            state.sub_recv.append(now)
            if len(state.sub_recv) >= state.sub_expected:
                state.check_finished()
            return 0
        try:
            reply = orjson.loads(bytes(buf[payload_start:end]))
            k = int(reply["id"])
            code = int(reply["code"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            state.errors["unparsable reply"] += 1
            return 0
        state.codes[code] += 1
        if not self.expect_reply or not 0 <= k < self.sent:
            state.errors["unexpected reply"] += 1
            return 0
        index = self.base + k
        if state.recv[index] != 0.0:
            state.errors["duplicate reply"] += 1
            return 0
        state.recv[index] = now
        state.replies += 1
        self.replies += 1
        return 1 if self.refill == "reply" else 0

    def _puback(self, packet_id: int, now: float) -> int:
        state = self.state
        if state is None or self.subscriber:
            return 0
        if not self.expect_ack or self.sent == 0:
            state.errors["unexpected PUBACK"] += 1
            return 0
        index = self.base + message_of(packet_id, self.sent)
        if state.ack[index] != 0.0:
            state.errors["duplicate PUBACK"] += 1
            return 0
        state.ack[index] = now
        if self.expect_reply and state.recv[index] == 0.0:
            state.puback_before_reply += 1
        state.acks += 1
        self.acks += 1
        return 1 if self.refill == "puback" else 0

    def _send(self, count: int, now: float, out: list[bytes]) -> None:
        if now >= self.stop_at or self.sent >= len(self.packets):
            self.stopped = True
            return
        assert self.state is not None
        send, base = self.state.send, self.base
        first = self.sent
        for k in range(first, first + count):
            if self.closed_loop:
                send[base + k] = now
            else:
                # open loop: a message held back (window full, or the generator late) counts from when it
                # was due, so a backlog is measured as latency
                due = self.t0 + k * self.period
                if now - due <= 2 * TICK_S:
                    send[base + k] = now
                else:
                    send[base + k] = due
                    self.state.late_sends += 1
                    self.state.max_lag = max(self.state.max_lag, now - due)
        out.extend(self.packets[first : first + count])
        self.sent = first + count
        if self.sent >= len(self.packets):
            self.stopped = True

    def send_now(self, count: int, now: float) -> None:
        """Send the next ``count`` requests (the start of a closed loop, or a pacing tick)."""
        if self.transport is None or self._lost or self.stopped:
            return
        out: list[bytes] = []
        if count > 0:
            self._send(count, now, out)
        if out:
            self.transport.write(b"".join(out))
        if self.stopped:
            self._check_drained()

    def stop(self) -> None:
        """Send nothing more (the end of a sustained run); drained once the answers are in."""
        if not self.stopped:
            self.stopped = True
            self._check_drained()

    def _check_drained(self) -> None:
        if self.drained or self.state is None:
            return
        if (not self.expect_reply or self.replies >= self.sent) and (not self.expect_ack or self.acks >= self.sent):
            self.drained = True
            self.state.drained += 1
            self.state.check_finished()

    def _fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        elif self.state is not None:
            self.state.errors[reason] += 1
