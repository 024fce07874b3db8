"""The benchmark's own logic (benchmarks/): packet ids, lazy requests, the raw client's bookkeeping, and one
short end-to-end run of ``benchmarks/ingest.py`` against a real pointgate and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from array import array
from pathlib import Path
from typing import Any

import pytest

from benchmarks.client import Client, GenState, Refill
from benchmarks.phase import latency_summary, percentile, steady_rate
from benchmarks.wire import Requests, message_of, packet_id_of, publish_packet, varint

ROOT = Path(__file__).resolve().parent.parent


def test_message_of_inverts_packet_ids_across_the_wrap() -> None:
    for sent in (1, 10, 65535, 65536, 65540, 200_000):
        for k in range(max(0, sent - 20), sent):
            assert message_of(packet_id_of(k), sent) == k


def test_varint_matches_the_mqtt_examples() -> None:
    assert varint(0) == b"\x00"
    assert varint(127) == b"\x7f"
    assert varint(128) == b"\x80\x01"
    assert varint(16_383) == b"\xff\x7f"
    assert varint(2_097_152) == b"\x80\x80\x80\x01"


def test_lazy_requests_equal_eager_ones() -> None:
    eager = Requests("dev", 5, time_base_ms=1000, points=3, qos=1)
    lazy = Requests("dev", 5, time_base_ms=1000, points=3, qos=1, eager=False)
    assert list(lazy[1:4]) == list(eager[1:4])
    assert lazy[4] == eager[4]
    assert len(lazy) == 5
    with pytest.raises(IndexError):
        lazy[5]
    assert b'"time":1003' in eager[3] and b'"id":"3"' in eager[3]


def test_percentiles_and_steady_rate() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    # 100 events 10 ms apart: the middle 80 % span 79 intervals of 10 ms
    assert steady_rate([i * 0.01 for i in range(100)]) == pytest.approx(100.0)
    summary = latency_summary([(float(i), i + 0.001 * (i % 10 + 1)) for i in range(100)])
    assert summary["max_all"] == pytest.approx(10.0)
    assert summary["p50"] == pytest.approx(5.0)


class _Transport:
    """Collects what the client writes."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        pass


def _puback(packet_id: int) -> bytes:
    return b"\x40\x02" + packet_id.to_bytes(2, "big")


def _reply(k: int) -> bytes:
    payload = json.dumps({"id": str(k), "code": 200, "data": None}).encode()
    return publish_packet("/sys/bench01/d/thing/measurepoint/resume_reply", payload, 1, 500 + k)


def _device(refill: Refill, total: int = 5, window: int = 2) -> tuple[Client, GenState, _Transport]:
    loop = asyncio.get_running_loop()
    state = GenState(
        send=_zeros(total), recv=_zeros(total), ack=_zeros(total), senders=1, finished=loop.create_future()
    )
    packets = Requests("d", total, time_base_ms=0, points=1, qos=1)
    client = Client(state, packets=packets, window=window, refill=refill)
    transport = _Transport()
    client.transport = transport  # type: ignore[assignment]
    client.data_received(b"\x20\x02\x00\x00" + b"\x90\x03\x00\x01\x01")  # CONNACK, SUBACK
    assert client.ready.done()
    return client, state, transport


def _zeros(n: int) -> array[float]:
    return array("d", bytes(8 * n))


async def test_refill_on_puback_sends_on_puback_and_counts_it_overtaking_the_reply() -> None:
    client, state, transport = _device("puback")
    client.send_now(2, 0.0)
    assert client.sent == 2
    client.data_received(_puback(packet_id_of(0)))  # PUBACK before its reply
    assert state.puback_before_reply == 1
    assert client.sent == 3  # the PUBACK freed a place
    client.data_received(_reply(1) + _puback(packet_id_of(1)))  # reply first, then PUBACK: in order
    assert state.puback_before_reply == 1
    assert client.sent == 4
    # the reply's QoS 1 PUBLISH is acknowledged in the same write as the refill
    assert any(b"\x40\x02\x01\xf5" in w for w in transport.written)


async def test_refill_on_reply_ignores_pubacks_and_drains_when_all_answered() -> None:
    client, state, _ = _device("reply", total=3, window=3)
    client.send_now(3, 0.0)
    for k in range(3):
        client.data_received(_puback(packet_id_of(k)))
    assert client.sent == 3 and not state.finished.done()
    client.data_received(_reply(0) + _reply(1) + _reply(2))
    assert state.puback_before_reply == 3
    assert client.drained and state.finished.done()
    assert state.replies == 3 and state.acks == 3 and not state.errors


async def test_a_reply_split_across_reads_is_parsed_once() -> None:
    client, state, _ = _device("reply", total=2, window=2)
    client.send_now(2, 0.0)
    data = _reply(0) + _puback(packet_id_of(0))
    client.data_received(data[:7])
    assert state.replies == 0
    client.data_received(data[7:])
    assert state.replies == 1 and state.acks == 1 and state.puback_before_reply == 0


@pytest.mark.slow
def test_ingest_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    """The README's command, tiny: both refill styles and the stock baseline, every message stored."""
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/ingest.py",
            "--devices",
            "2",
            "--messages",
            "200",
            "--refill",
            "reply,puback",
            "--compare-stock",
            "--timeout",
            "60",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.exists(), proc.stderr[-3000:]
    record = json.loads(out.read_text())
    phases = {p["name"]: p for p in record["phases"]}
    assert set(phases) == {"2 dev reply max", "2 dev puback max", "2 dev relay"}
    for name in ("2 dev reply max", "2 dev puback max"):
        phase = phases[name]
        assert phase["completed"] == phase["sent"] == 200
        assert phase["acks"] == 200
        assert phase["acked_not_stored"] == 0
        assert phase["rows_found"] == phase["rows_expected"] == 2000
        assert phase["msg_s"] > 0 and phase["latency_ms"]["p99"] > 0
        assert phase["server_us_per_msg"] > 0 and phase["db_us_per_point"] > 0
    assert phases["2 dev relay"]["completed"] == 200
    assert record["targets"]["acknowledged_lost"] == {"messages": 0, "ok": True}
    # the exit code says whether every check held (a PUBACK overtaking its reply fails the run)
    early = record["targets"]["puback_before_reply"]["count"]
    assert proc.returncode == (0 if early == 0 else 1), proc.stderr[-3000:]


def _record(pointgate_msg_s: float, stock_msg_s: float, p99: float) -> dict[str, Any]:
    common = {"devices": 10, "refill": "reply", "workers": 1, "idle_devices": 0, "rate": 0.0, "duration": 0.0}
    return {
        "args": {"idle": False, "rate": 0.0},
        "extra": {},
        "phases": [
            dict(common, server="pointgate", msg_s=pointgate_msg_s, latency_ms={"p99": p99}, load_before=[1, 1, 1]),
            dict(common, server="amqtt", refill="puback", msg_s=stock_msg_s, latency_ms={}, load_before=[2, 1, 1]),
        ],
    }


def test_summarise_takes_the_ratio_inside_each_run_then_the_median() -> None:
    from benchmarks.summarise import collect, table

    groups = collect([_record(1000, 500, 10), _record(3000, 1000, 30), _record(2000, 2000, 20)])
    rows = groups[("pointgate", 1, 10, "reply", "max")]
    assert [round(r["ratio"], 2) for r in rows] == [2.0, 3.0, 1.0]
    line = next(x for x in table(groups) if x.startswith("pointgate"))
    assert "| 2000 (1000–3000) | 2.00 (1.00–3.00) |" in line
    assert "| 20.0 (10.0–30.0) |" in line


async def test_a_lost_connection_ends_that_device_and_is_counted() -> None:
    client, state, _ = _device("reply", total=3, window=3)
    client.send_now(3, 0.0)
    client.connection_lost(ConnectionResetError())
    assert state.errors["connection lost"] == 1
    assert client.drained and state.finished.done()  # the phase does not wait for answers that cannot come
