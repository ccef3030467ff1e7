"""A narrowed daily series reads a UTC day's roll-up with hours added or taken away at its ends;
it must count each local day exactly as the hourly series does, whatever the offset."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from tracking.domain import Period, resolve_period, series_keys
from tracking.reports import local_day_parts

NOW = datetime(2026, 11, 3, 14, 20, tzinfo=UTC)
HOUR = timedelta(hours=1)


def by_hours(period: Period, counts: dict[datetime, int]) -> Counter[date]:
    """What the hourly series answers: each hour on the local day it starts on."""
    found: Counter[date] = Counter()
    for hour, n in counts.items():
        if period.start <= hour < period.end:
            found[hour.astimezone(period.tz).date()] += n
    return found


def by_parts(period: Period, counts: dict[datetime, int]) -> Counter[date]:
    """What the daily roll-up (hours summed per UTC day) and the signed spans answer."""
    daily: Counter[date] = Counter()
    for hour, n in counts.items():
        daily[hour.date()] += n
    days, spans = local_day_parts(period)
    found: Counter[date] = Counter()
    for key, utc_day in days:
        found[key] += daily[utc_day]
    for key, lo, hi, sign in spans:
        found[key] += sign * sum(n for hour, n in counts.items() if lo <= hour < hi)
    return found


@pytest.mark.parametrize(
    "name",
    [
        "UTC",
        "Europe/Berlin",  # clocks go back on 25 October
        "America/New_York",  # and on 1 November
        "Asia/Kolkata",  # +05:30
        "America/St_Johns",  # -03:30, with a change
        "Asia/Kathmandu",  # +05:45
        "Asia/Tokyo",
        "Pacific/Kiritimati",  # +14
        "Pacific/Pago_Pago",  # -11
        "Australia/Lord_Howe",  # +10:30, changing by half an hour
    ],
)
@pytest.mark.parametrize(
    ("start", "end"),
    [
        (None, None),
        (date(2026, 10, 20), date(2026, 11, 2)),
        (datetime(2026, 10, 24, 7, 40, tzinfo=UTC), datetime(2026, 10, 27, 3, tzinfo=UTC)),
    ],
)
def test_local_days_count_what_the_hourly_series_counts(
    name: str, start: date | datetime | None, end: date | datetime | None
) -> None:
    tz = ZoneInfo(name)
    period = resolve_period(start=start, end=end, interval="day", tz=tz, now=NOW)
    rng = random.Random(name)
    # Every hour from well before the period to well after it has something in it.
    first = period.start - timedelta(days=2)
    hours = int((period.end - first) / HOUR) + 48
    counts = {first + n * HOUR: rng.randrange(1, 1000) for n in range(hours)}

    expected = by_hours(period, counts)
    assert by_parts(period, counts) == expected
    assert set(expected) <= set(series_keys(period))


def test_a_day_off_utc_reads_one_daily_row_and_the_hours_at_its_ends() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    period = resolve_period(
        start=date(2026, 3, 2), end=date(2026, 3, 4), interval="day", tz=berlin, now=NOW
    )
    days, spans = local_day_parts(period)
    assert days == [
        (date(2026, 3, 2), date(2026, 3, 2)),
        (date(2026, 3, 3), date(2026, 3, 3)),
        (date(2026, 3, 4), date(2026, 3, 4)),
    ]
    # 2 March in Berlin is 1 March 23:00 to 2 March 23:00 UTC: the UTC day, plus the hour
    # before it, less its last hour.
    assert spans[:2] == [
        (
            date(2026, 3, 2),
            datetime(2026, 3, 1, 23, tzinfo=UTC),
            datetime(2026, 3, 2, tzinfo=UTC),
            1,
        ),
        (
            date(2026, 3, 2),
            datetime(2026, 3, 2, 23, tzinfo=UTC),
            datetime(2026, 3, 3, tzinfo=UTC),
            -1,
        ),
    ]
    assert len(spans) == 6

    # A day of only a few hours (today, so far) is read hour by hour.
    early = datetime(2026, 11, 3, 2, 20, tzinfo=UTC)
    today = resolve_period(start=date(2026, 11, 3), end=None, interval="day", tz=berlin, now=early)
    first_hours = (datetime(2026, 11, 2, 23, tzinfo=UTC), datetime(2026, 11, 3, 3, tzinfo=UTC))
    assert local_day_parts(today) == ([], [(date(2026, 11, 3), *first_hours, 1)])


@pytest.mark.parametrize("name", ["Asia/Kolkata", "America/St_Johns", "Asia/Kathmandu"])
def test_whole_days_off_the_hour_show_only_the_days_asked_for(name: str) -> None:
    # Local midnight falls mid-hour: the hour straddling the first midnight counts on the day
    # before, so it is not in the period, and no bucket of that day appears.
    period = resolve_period(
        start=date(2026, 3, 3), end=date(2026, 3, 5), interval="day", tz=ZoneInfo(name), now=NOW
    )
    assert series_keys(period) == [date(2026, 3, 3), date(2026, 3, 4), date(2026, 3, 5)]
    assert period.start.astimezone(period.tz).date() == date(2026, 3, 3)
