"""The writer's pure parts, without I/O: value columns, last-write-wins, sharding, batching, transient errors."""

from __future__ import annotations

import asyncio
from collections import deque

import asyncpg
import pytest

from service.pipeline import Row
from service.storage.writer import (
    Part,
    _Job,
    is_transient,
    last_writes,
    partition_buckets,
    series_keys,
    shard_of,
    split_by_shard,
    take_batch,
    to_columns,
    value_columns,
)


def row(dk: str = "d1", point: str = "p", t: int = 1000, value: object = 1.5, *, pk: str = "prod") -> Row:
    return Row(pk, dk, point, t, value, None, 5000)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.5, (1.5, None, None, None)),
        (7, (7.0, None, None, None)),
        ("on", (None, "on", None, None)),
        (True, (None, None, True, None)),
        (False, (None, None, False, None)),
        ([1, "a"], (None, None, None, '[1,"a"]')),
        ({"a": 1}, (None, None, None, '{"a":1}')),
        (None, (None, None, None, "null")),
    ],
)
def test_value_goes_to_the_column_of_its_json_type(value: object, expected: tuple[object, ...]) -> None:
    """Numbers, strings, booleans (not numbers, though bool is an int) and JSON each get their own column."""
    assert value_columns(value) == expected


def test_last_writes_keeps_the_later_row_per_key_in_order() -> None:
    """Two rows for one (device, point, ts): the later one stays; different keys all stay, in order."""
    rows = [row(t=1, value=1), row(t=2, value=2), row(t=1, value=3), row(dk="d2", t=1, value=4)]
    assert [r.value for r in last_writes(rows)] == [3, 2, 4]


def test_to_columns_builds_parallel_arrays_and_marks_each_series_newest() -> None:
    """Nine arrays of equal length: series ids from the dictionary, values by type, and one newest row per series."""
    rows = [row(t=5, value=1), row(t=9, value=2), row(t=7, value=3), row(point="s", value="x")._replace(quality=9)]
    series = {("prod", "d1", "p"): 11, ("prod", "d1", "s"): 12}
    sid, ts, vn, vt, vb, vj, q, r, newest = to_columns(rows, series)
    assert sid == [11, 11, 11, 12] and ts == [5, 9, 7, 1000]
    assert (vn, vt, vb, vj) == ([1.0, 2.0, 3.0, None], [None, None, None, "x"], [None] * 4, [None] * 4)
    assert (q, r) == ([None, None, None, 9], [5000] * 4)
    assert newest == [False, True, False, True], "the newest time per series, not the last submitted"


def test_series_keys_and_partition_buckets() -> None:
    """Distinct (product, device, point) keys; distinct time // width buckets."""
    rows = [row(t=0), row(t=999), row(t=1000), row(dk="d2", t=2500)]
    assert series_keys(rows) == {("prod", "d1", "p"), ("prod", "d2", "p")}
    assert partition_buckets(rows, 1000) == {0, 1, 2}


def test_shard_of_is_stable_and_spreads_devices() -> None:
    """Same device, same shard (a fixed hash, not Python's per-process one); 100 devices reach every shard."""
    assert shard_of("prod", "d1", 4) == shard_of("prod", "d1", 4)
    assert shard_of("prod", "d1", 1) == 0
    assert {shard_of("prod", f"d{i}", 4) for i in range(100)} == {0, 1, 2, 3}
    # the separator matters: ("ab", "c") and ("a", "bc") are different devices
    assert {shard_of("ab", "c", 1000), shard_of("a", "bc", 1000)} != {shard_of("ab", "c", 1000)}


def test_split_keeps_each_device_on_its_shard_in_order() -> None:
    """A batch for several devices splits by device; every row of a device lands on that device's shard."""
    devices = [f"d{i}" for i in range(20)]
    rows = [row(dk=d, t=t) for t in range(3) for d in devices]
    groups = split_by_shard(rows, 3)
    assert sum(len(g) for g in groups.values()) == len(rows)
    for shard, group in groups.items():
        assert all(shard_of("prod", r.device_key, 3) == shard for r in group)
        for d in devices:
            assert [r.time_ms for r in group if r.device_key == d] in ([], [0, 1, 2])


def test_split_single_device_is_one_group() -> None:
    """The usual message (one device) is not split."""
    rows = [row(point=f"p{i}") for i in range(10)]
    assert split_by_shard(rows, 4) == {shard_of("prod", "d1", 4): rows}


def _parts(*sizes: int) -> deque[Part]:
    loop = asyncio.new_event_loop()
    try:
        return deque(Part(_Job(loop.create_future()), [row(t=i) for i in range(n)]) for n in sizes)
    finally:
        loop.close()


def test_take_batch_fills_up_to_the_limit_in_order() -> None:
    """Parts are taken oldest first while they fit; the rest waits for the next batch."""
    parts = _parts(3, 4, 2, 5)
    batch = take_batch(parts, 9)
    assert [len(p.rows) for p in batch] == [3, 4, 2]
    assert [len(p.rows) for p in parts] == [5]


def test_take_batch_takes_an_oversized_part_alone() -> None:
    """A part larger than the limit still goes (alone): it must not block the queue."""
    parts = _parts(50, 1)
    assert [len(p.rows) for p in take_batch(parts, 10)] == [50]
    assert len(parts) == 1


class _Pg(asyncpg.PostgresError):
    def __init__(self, sqlstate: str) -> None:
        super().__init__("x")
        self.sqlstate = sqlstate  # type: ignore[misc]  # a ClassVar in asyncpg-stubs; per-instance here on purpose


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionResetError(), True),
        (OSError("refused"), True),
        (TimeoutError(), True),
        (asyncpg.InterfaceError("closed"), True),
        (_Pg("08006"), True),  # connection failure
        (_Pg("57P01"), True),  # admin shutdown
        (_Pg("53300"), True),  # too many connections
        (_Pg("40P01"), True),  # deadlock
        (_Pg("22P02"), False),  # bad input: the data, not the database
        (_Pg("23514"), False),  # check violation
        (ValueError("x"), False),
    ],
)
def test_is_transient(exc: BaseException, transient: bool) -> None:
    """Only the database being away (or a rollback it asks us to retry) is retried; bad data is not."""
    assert is_transient(exc) is transient
