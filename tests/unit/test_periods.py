"""Budget periods: local midnight in the budget's zone, DST days of 23 and 25 hours, zones that skip
midnight itself, weeks from Monday, months from the 1st, and rolling windows that age out."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

from tests.cases import budget
from tierwise.api.budget import Period
from tierwise.compiler import build_world, check
from tierwise.loader import load
from tierwise.periods import BUCKETS, seconds_to_relief, window


def at(zone: str, *parts: int) -> float:
    return datetime(*parts, tzinfo=ZoneInfo(zone)).timestamp()  # type: ignore[misc]


def local(ts: float, zone: str) -> str:
    return datetime.fromtimestamp(ts, ZoneInfo(zone)).isoformat()


def test_a_day_starts_at_local_midnight() -> None:
    w = window(Period.DAILY, "Asia/Tokyo", at("Asia/Tokyo", 2026, 12, 3, 8, 0))
    assert local(w.start, "Asia/Tokyo") == "2026-12-03T00:00:00+09:00"
    assert w.end - w.start == 24 * 3600
    # 23:30 UTC on the 2nd is already the 3rd in Tokyo.
    assert window(Period.DAILY, "Asia/Tokyo", datetime(2026, 12, 2, 23, 30, tzinfo=UTC).timestamp()) == w


@pytest.mark.parametrize(
    ("zone", "day", "hours"),
    [
        ("Europe/Berlin", (2026, 3, 29), 23),  # clocks forward at 02:00
        ("Europe/Berlin", (2026, 10, 25), 25),  # clocks back at 03:00
        ("America/New_York", (2026, 3, 8), 23),
        ("America/New_York", (2026, 11, 1), 25),
        ("Australia/Sydney", (2026, 4, 5), 25),  # southern hemisphere: back in April
    ],
)
def test_dst_days_are_23_or_25_hours(zone: str, day: tuple[int, int, int], hours: int) -> None:
    w = window(Period.DAILY, zone, at(zone, *day, 12, 0))
    assert local(w.start, zone).startswith(f"{day[0]}-{day[1]:02d}-{day[2]:02d}T00:00:00")
    assert (w.end - w.start) / 3600 == hours
    # The instant before the end is still that day; the end is the next day's first instant.
    assert window(Period.DAILY, zone, w.end - 1) == w
    assert window(Period.DAILY, zone, w.end).start == w.end


def test_a_zone_that_skips_midnight_starts_the_day_at_its_first_instant() -> None:
    # Chile moved clocks from 00:00 to 01:00 on 2022-09-11: that day has no midnight.
    zone = "America/Santiago"
    w = window(Period.DAILY, zone, at(zone, 2022, 9, 11, 12, 0))
    assert local(w.start, zone) == "2022-09-11T01:00:00-03:00"
    assert (w.end - w.start) / 3600 == 23
    before = window(Period.DAILY, zone, w.start - 1)
    assert before.end == w.start and local(before.start, zone) == "2022-09-10T00:00:00-04:00"


def test_weeks_start_on_monday_and_months_on_the_first() -> None:
    zone = "Europe/Berlin"
    wk = window(Period.WEEKLY, zone, at(zone, 2026, 12, 3, 15, 0))  # a Thursday
    assert local(wk.start, zone) == "2026-11-30T00:00:00+01:00" and local(wk.end, zone) == "2026-12-07T00:00:00+01:00"
    mo = window(Period.MONTHLY, zone, at(zone, 2026, 3, 31, 23, 59))
    assert local(mo.start, zone) == "2026-03-01T00:00:00+01:00"
    assert local(mo.end, zone) == "2026-04-01T00:00:00+02:00"  # the month holds the DST change
    dec = window(Period.MONTHLY, zone, at(zone, 2026, 12, 31, 12, 0))
    assert local(dec.end, zone) == "2027-01-01T00:00:00+01:00"
    assert mo.id != dec.id and mo.id == window(Period.MONTHLY, zone, mo.start).id


def test_a_rolling_window_ages_out_bucket_by_bucket() -> None:
    now = 1_800_000_000.0
    w = window(Period.ROLLING_24_HOURS, "UTC", now)
    assert w.rolling and w.last_bucket - w.first_bucket == BUCKETS
    assert w.bucket_seconds == 1800 and w.bucket(now) == w.last_bucket
    # Never less than the window: the oldest bucket counted starts at most one bucket before now-24h.
    assert now - 24 * 3600 - w.bucket_seconds < w.start <= now - 24 * 3600
    later = window(Period.ROLLING_24_HOURS, "UTC", now + w.bucket_seconds)
    assert later.first_bucket == w.first_bucket + 1 and later.id == w.id
    assert 0 < seconds_to_relief(w, now) <= w.bucket_seconds
    assert window(Period.ROLLING_30_DAYS, "UTC", now).bucket_seconds == 15 * 3600


def test_relief_is_the_period_end() -> None:
    zone = "UTC"
    now = at(zone, 2026, 12, 31, 23, 59, 30)
    assert seconds_to_relief(window(Period.DAILY, zone, now), now) == 30
    assert seconds_to_relief(window(Period.MONTHLY, zone, now), now) == 30


def test_a_time_zone_that_is_not_iana_is_a_problem(tmp_path: Path) -> None:
    for bad in ("Mars/Olympus_Mons", "UTC+25", "../etc/passwd"):
        b = budget(timeZone=bad)
        b["metadata"]["namespace"] = "apps"
        (tmp_path / "b.yaml").write_text(yaml.safe_dump(b))
        found = load(tmp_path / "b.yaml")
        problems = check(build_world(found.resources), found.resources)
        assert [(p.field, "not an IANA time zone" in p.reason) for p in problems] == [("spec.timeZone", True)]
    with pytest.raises(ValueError, match="IANA"):
        window(Period.DAILY, "Mars/Olympus_Mons", 0)
