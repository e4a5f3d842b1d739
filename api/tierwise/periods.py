"""When a budget's period starts and ends: one pure function, shared by the sidecar (which counts
spend per period) and the operator (which reports it).

Calendar periods (what finance counts) start at local midnight in the budget's IANA time zone:
a day, a week from Monday, a month from the 1st. A day across a DST change is 23 or 25 hours
long; where a zone skips midnight itself, the day starts at the first instant that exists.
Rolling windows (how rate limits count: the last 24 hours, 7 or 30 days) have no start: spend
ages out continuously, counted in buckets of 1/48 of the window, a bucket leaving the window
whole: spend counts for at least the window's length and at most one bucket-width longer, never
less.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from tierwise.api.budget import Period

ROLLING_SECONDS = {
    Period.ROLLING_24_HOURS: 24 * 3600,
    Period.ROLLING_7_DAYS: 7 * 24 * 3600,
    Period.ROLLING_30_DAYS: 30 * 24 * 3600,
}
BUCKETS = 48


@dataclass(frozen=True, slots=True)
class Window:
    """The span spend is counted over, as seen at one instant.

    Calendar: [start, end). Rolling: buckets `first_bucket`..`last_bucket` of `bucket_seconds`
    each (the one holding `now` is the last); `start` is the oldest bucket's start and `end` the
    instant it leaves the window.
    """

    period: Period
    start: float
    end: float
    bucket_seconds: float = 0.0
    first_bucket: int = 0
    last_bucket: int = 0
    # Stable name of a calendar period (its start in epoch seconds) or of a rolling window.
    id: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        name = self.period.value if self.rolling else f"{self.period.value}:{int(self.start)}"
        object.__setattr__(self, "id", name)

    @property
    def rolling(self) -> bool:
        return self.bucket_seconds > 0

    def bucket(self, t: float) -> int:
        return int(t // self.bucket_seconds)


def is_rolling(period: Period) -> bool:
    return period in ROLLING_SECONDS


@lru_cache(maxsize=256)
def zone(name: str) -> ZoneInfo:
    """An IANA time zone; ValueError naming it when it is not one."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ValueError(f"{name!r} is not an IANA time zone") from e


def _midnight(d: date, tz: ZoneInfo) -> datetime:
    """The first instant of local date `d`. A midnight that does not exist (clocks jump over it)
    takes the offset before the jump, which is the instant the day's first existing minute has;
    a midnight that happens twice (fold=0) is its first occurrence."""
    return datetime(d.year, d.month, d.day, tzinfo=tz)


def _calendar(period: Period, tz: ZoneInfo, now: float) -> tuple[datetime, datetime]:
    today = datetime.fromtimestamp(now, tz).date()
    if period is Period.DAILY:
        first, nxt = today, today + timedelta(days=1)
    elif period is Period.WEEKLY:
        first = today - timedelta(days=today.weekday())
        nxt = first + timedelta(days=7)
    else:
        first = today.replace(day=1)
        nxt = (first + timedelta(days=32)).replace(day=1)
    return _midnight(first, tz), _midnight(nxt, tz)


def window(period: Period, time_zone: str, now: float) -> Window:
    """The window of `period` that holds `now` (seconds since the epoch)."""
    length = ROLLING_SECONDS.get(period)
    if length is not None:
        width = length / BUCKETS
        last = int(now // width)
        # The bucket holding now-length is the oldest that still holds spend of the last `length`.
        first = last - BUCKETS
        return Window(period, first * width, (last + 1) * width, width, first, last)
    start, end = _calendar(period, zone(time_zone), now)
    return Window(period, start.astimezone(UTC).timestamp(), end.astimezone(UTC).timestamp())


def seconds_to_relief(w: Window, now: float) -> int:
    """Whole seconds (at least 1) until some counted spend stops counting: the period's end, or
    (rolling) the oldest bucket leaving the window."""
    return max(1, int(-(-(w.end - now) // 1)))
