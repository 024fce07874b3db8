"""Partition planning without a database: buckets, names, gaps between existing ranges, the window, retention."""

from __future__ import annotations

from datetime import timedelta

import pytest

from service.errors import ConfigError
from service.settings import load_settings
from service.storage.partitions import (
    MS_PER_DAY,
    MS_PER_HOUR,
    Partition,
    Policy,
    bucket_range,
    expired,
    managed_buckets,
    partition_name,
    plan_gaps,
    policy_from_settings,
    to_datetime,
    to_ms,
)

DAY = MS_PER_DAY
NOW = 20_000 * DAY + 5 * MS_PER_HOUR  # 2024-10-04 05:00 UTC


def test_names_follow_the_range_start() -> None:
    """Daily partitions are named by date; a range not starting at midnight also by hour and minute."""
    assert partition_name(20_000 * DAY) == "points_p20241004"
    assert partition_name(20_000 * DAY + 6 * MS_PER_HOUR) == "points_p20241004_0600"


def test_bucket_range_and_time_conversion_round_trip() -> None:
    """Bucket n covers [n*w, (n+1)*w); milliseconds survive datetime conversion exactly."""
    assert bucket_range(3, 10) == (30, 40)
    assert to_ms(to_datetime(1_700_000_000_123)) == 1_700_000_000_123


@pytest.mark.parametrize(
    ("existing", "lo", "hi", "gaps"),
    [
        ([], 0, 10, [(0, 10)]),
        ([(0, 10)], 0, 10, []),
        ([(0, 5)], 0, 10, [(5, 10)]),
        ([(3, 5), (7, 8)], 0, 10, [(0, 3), (5, 7), (8, 10)]),
        ([(-10, 2), (9, 30)], 0, 10, [(2, 9)]),
        ([(20, 30)], 0, 10, [(0, 10)]),
    ],
)
def test_gaps_never_overlap_existing_partitions(
    existing: list[tuple[int, int]], lo: int, hi: int, gaps: list[tuple[int, int]]
) -> None:
    """What is left to create of [lo, hi) after existing ranges (e.g. daily ones, then a 7-day width)."""
    assert plan_gaps(existing, lo, hi) == gaps


def test_managed_window_uses_the_shorter_of_backfill_and_retention() -> None:
    """From now − backfill (or − retention when shorter) to ``ahead`` buckets past the current one."""
    policy = Policy(width=timedelta(days=1), ahead=3, backfill=timedelta(days=30))
    assert managed_buckets(policy, NOW) == (19_970, 20_003)
    short = Policy(width=timedelta(days=1), ahead=2, backfill=timedelta(days=30), retention=timedelta(days=7))
    assert managed_buckets(short, NOW) == (19_993, 20_002)


def test_expired_drops_only_whole_ranges_past_retention_never_the_default() -> None:
    """A partition goes when its end is at least ``retention`` old; the default partition never does."""
    parts = [Partition("points_default", None, None)] + [
        Partition(partition_name(d * DAY), d * DAY, (d + 1) * DAY) for d in range(19_990, 20_001)
    ]
    policy = Policy(retention=timedelta(days=7))
    cutoff_day = (NOW - 7 * DAY) // DAY  # 19_993: its partition still holds rows younger than the cutoff
    assert [p.lo_ms for p in expired(parts, policy, NOW)] == [d * DAY for d in range(19_990, cutoff_day)]
    assert expired(parts, Policy(), NOW) == [], "retention off by default"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"partition_width": "30m"}, "whole number of hours"),
        ({"partition_width": "90m"}, "whole number of hours"),
        ({"partition_width": "1d", "retention": "12h"}, "at least one partition width"),
    ],
)
def test_unworkable_policies_are_refused_with_the_setting_named(overrides: dict[str, str], message: str) -> None:
    """A width below an hour or not whole hours, or retention shorter than a partition, is a config error."""
    with pytest.raises(ConfigError, match=message):
        policy_from_settings(load_settings(overrides))


def test_settings_durations() -> None:
    """Durations read as 90d / 12h / 2w; retention is off by default and 'off' turns it off."""
    settings = load_settings({"retention": "2w", "partition_width": "12h"})
    policy = policy_from_settings(settings)
    assert (policy.retention, policy.width) == (timedelta(days=14), timedelta(hours=12))
    assert load_settings({}).retention is None
    assert load_settings({"retention": "off"}).retention is None
    assert settings.redacted()["retention"] == "2w"
    with pytest.raises(ConfigError, match="retention"):
        load_settings({"retention": "soon"})
