"""Recipient state transitions, roll-up deltas, rates and report periods."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

import pytest

from tracking.domain import (
    LinkState,
    PeriodError,
    Recipient,
    Rollup,
    csv_cell,
    decode_cursor,
    encode_cursor,
    normalize_message_id,
    queued,
    rates,
    record_bounce,
    record_click,
    record_complaint,
    record_confirmation,
    record_open,
    record_outcome,
    redirect_target,
    resolve_period,
    series_keys,
    split,
)

T0 = datetime(2026, 3, 2, 9, 15, tzinfo=UTC)


def recipient() -> Recipient:
    return Recipient(message_id="m1@x", email_id=uuid.uuid4(), account_id=uuid.uuid4())


def stats(rollup: Rollup) -> Counter[str]:
    tables = rollup.tables()
    return sum((c for _, c in tables.stats.values()), Counter())


def buckets(rollup: Rollup) -> Counter[str]:
    tables = rollup.tables()
    return sum((c for _, c in tables.email_hourly.values()), Counter())


def outcome(
    r: Recipient,
    rollup: Rollup,
    status: Literal["sent", "deferred", "failed"],
    attempt: int,
    at: datetime = T0,
) -> bool:
    return record_outcome(
        r, rollup, status=status, attempt=attempt, at=at, smtp_code=None, smtp_reply=None
    )


def test_deferrals_then_delivery_count_one_sent_recipient():
    r, rollup = recipient(), Rollup()
    assert outcome(r, rollup, "deferred", 1)
    assert outcome(r, rollup, "deferred", 2, T0 + timedelta(minutes=5))
    assert not outcome(r, rollup, "deferred", 2)  # a redelivery
    assert outcome(r, rollup, "sent", 3, T0 + timedelta(hours=1))
    assert not outcome(r, rollup, "sent", 3)
    assert not outcome(r, rollup, "failed", 4)  # the first final answer stands
    assert not outcome(r, rollup, "deferred", 1)  # a stale deferral after the end
    assert (r.status, r.attempts, r.sent_at) == ("sent", 3, T0 + timedelta(hours=1))
    assert +stats(rollup) == Counter(sent=1, delivered=1)
    # The buckets keep what happened: two deferrals, then the send.
    assert +buckets(rollup) == Counter(deferred=2, sent=1, delivered=1)


def test_a_bounce_takes_the_delivery_back_from_the_hour_it_was_sent():
    r, rollup = recipient(), Rollup()
    outcome(r, rollup, "sent", 1)
    later = T0 + timedelta(days=1)
    assert record_bounce(r, rollup, hard=False, at=later, detail="mailbox full")
    assert not record_bounce(r, rollup, hard=False, at=later, detail=None)
    assert record_bounce(r, rollup, hard=True, at=later, detail="no such user")
    assert not record_bounce(r, rollup, hard=False, at=later, detail=None)
    assert +stats(rollup) == Counter(sent=1, bounced=1, hard_bounced=1)
    hourly = rollup.tables().email_hourly
    sent_hour = [c for (_, hour), (_, c) in hourly.items() if hour == T0.replace(minute=0)]
    assert sent_hour == [Counter(sent=1, delivered=0)]
    assert r.bounce == "hard"


def test_a_bounce_before_the_outcome_is_never_delivered():
    r, rollup = recipient(), Rollup()
    record_bounce(r, rollup, hard=True, at=T0, detail=None)
    outcome(r, rollup, "sent", 1)
    assert +stats(rollup) == Counter(sent=1, bounced=1, hard_bounced=1)


def test_confirmations_and_complaints_count_once():
    r, rollup = recipient(), Rollup()
    assert record_confirmation(r, rollup, at=T0)
    assert not record_confirmation(r, rollup, at=T0)
    assert record_complaint(r, rollup, at=T0)
    assert not record_complaint(r, rollup, at=T0)
    assert +stats(rollup) == Counter(confirmed=1, complained=1)
    assert r.provider_status == "complained"


def test_opens_and_clicks_count_fetches_recipients_and_humans():
    r, rollup = recipient(), Rollup()
    record_open(r, rollup, at=T0, machine=True)
    record_open(r, rollup, at=T0 + timedelta(minutes=1), machine=False)
    record_open(r, rollup, at=T0 + timedelta(minutes=2), machine=False)
    link = LinkState()
    record_click(r, link, rollup, at=T0, machine=True, link_index=0, url="https://a")
    record_click(r, link, rollup, at=T0, machine=False, link_index=0, url="https://a")
    assert +stats(rollup) == Counter(
        opens=3,
        human_opens=2,
        unique_opens=1,
        unique_human_opens=1,
        clicks=2,
        human_clicks=1,
        unique_clicks=1,
        unique_human_clicks=1,
    )
    [(_, url, per_link)] = rollup.tables().link_stats.values()
    assert (url, +per_link) == (
        "https://a",
        Counter(clicks=2, human_clicks=1, unique_clicks=1, unique_human_clicks=1),
    )
    assert (link.clicks, link.human_clicks) == (2, 1)
    assert r.first_open_at == T0


def test_a_click_without_an_open_counts_as_the_first_open():
    r, rollup = recipient(), Rollup()
    record_click(r, LinkState(), rollup, at=T0, machine=False, link_index=2, url="https://b")
    assert stats(rollup)["unique_opens"] == stats(rollup)["unique_human_opens"] == 1
    assert stats(rollup)["opens"] == 0
    assert r.first_open_at == r.first_human_open_at == T0


def test_rollup_rows_are_summed_per_table():
    account, email = uuid.uuid4(), uuid.uuid4()
    rollup = Rollup()
    rollup.add("all", email, account, T0, sent=1)
    rollup.add("all", email, account, T0 + timedelta(minutes=10), sent=2)
    rollup.add("all", email, account, T0 + timedelta(hours=20), sent=4)
    rollup.add("stats", email, account, T0, deferred=-1)
    rollup.add("buckets", email, account, T0, deferred=1, opens=0)
    tables = rollup.tables()
    assert tables.stats[email] == (account, Counter(sent=7, deferred=-1))
    assert len(tables.email_hourly) == 2
    assert {day: c["sent"] for (_, day), (_, c) in tables.email_daily.items()} == {
        date(2026, 3, 2): 3,
        date(2026, 3, 3): 4,
    }
    assert tables.account_hourly[(account, T0.replace(minute=0))] == Counter(sent=3, deferred=1)
    # The two changes within one hour are one row.
    assert len(rollup) == 4


def test_an_emails_sum_is_its_buckets_and_spans_its_links_hours_too():
    account, email = uuid.uuid4(), uuid.uuid4()
    rollup = Rollup()
    rollup.add("all", email, account, T0, sent=1)
    rollup.add("stats", email, account, T0 - timedelta(days=3), failed=-1)
    rollup.add("buckets", email, account, T0 + timedelta(hours=5), deferred=1)
    rollup.add("link", email, account, T0 + timedelta(days=2), link_index=0, url="u", clicks=1)
    rollup.add("link", email, account, T0 - timedelta(hours=2), link_index=1, url="u", clicks=1)
    tables = rollup.tables()
    summed = tables.email_sums[email]
    assert summed.counts == sum((c for _, c in tables.email_hourly.values()), Counter())
    assert summed.counts == Counter(sent=1, deferred=1)
    # Totals-only changes are no bucket's, so they move neither the sums nor their bounds.
    assert summed.first_hour == (T0 - timedelta(hours=2)).replace(minute=0)
    assert summed.last_hour == (T0 + timedelta(days=2)).replace(minute=0)
    assert summed.account_id == account


def test_rates_have_their_bases_and_none_without_one():
    counts = {
        "sent": 90,
        "failed": 10,
        "delivered": 80,
        "bounced": 20,
        "complained": 2,
        "unique_opens": 40,
        "unique_human_opens": 20,
        "unique_clicks": 10,
        "unique_human_clicks": 8,
        "unsubscribed": 4,
    }
    result = rates(counts)
    assert result["delivery_rate"] == 0.8
    assert result["bounce_rate"] == 0.2
    assert result["complaint_rate"] == 0.025
    assert (result["open_rate"], result["human_open_rate"]) == (0.5, 0.25)
    assert (result["click_to_open_rate"], result["human_click_to_open_rate"]) == (0.25, 0.4)
    assert set(rates({}).values()) == {None}
    assert queued(10, {"sent": 3, "deferred": 2, "failed": 1}) == 4
    assert queued(None, {"sent": 3}) == 0


def test_periods_are_local_days_in_whole_hours():
    tokyo = ZoneInfo("Asia/Tokyo")
    now = datetime(2026, 3, 10, 5, 30, tzinfo=UTC)
    period = resolve_period(
        start=date(2026, 3, 1), end=date(2026, 3, 2), interval=None, tz=tokyo, now=now
    )
    assert (period.start, period.end) == (
        datetime(2026, 2, 28, 15, tzinfo=UTC),
        datetime(2026, 3, 2, 15, tzinfo=UTC),
    )
    assert period.interval == "hour"
    assert len(series_keys(period)) == 48
    parts = split(period)
    assert parts.days == (date(2026, 3, 1), date(2026, 3, 2))
    assert parts.hours == (
        (datetime(2026, 2, 28, 15, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC)),
        (datetime(2026, 3, 2, tzinfo=UTC), datetime(2026, 3, 2, 15, tzinfo=UTC)),
    )

    default = resolve_period(start=None, end=None, interval=None, tz=tokyo, now=now)
    assert default.interval == "day"
    keys = series_keys(default)
    assert (len(keys), keys[-1]) == (30, date(2026, 3, 10))
    assert default.end == datetime(2026, 3, 10, 6, tzinfo=UTC)

    short = resolve_period(
        start=datetime(2026, 3, 1, 10, 20, tzinfo=UTC),
        end=datetime(2026, 3, 1, 12, 5, tzinfo=UTC),
        interval="day",
        tz=ZoneInfo("UTC"),
        now=now,
    )
    assert (short.start.hour, short.end.hour) == (10, 13)
    assert split(short).days is None


@pytest.mark.parametrize(
    ("start", "end", "interval", "field"),
    [
        (date(2026, 3, 5), date(2026, 3, 1), None, "from"),
        (date(2024, 1, 1), date(2026, 3, 1), None, "from"),
        (date(2026, 1, 1), date(2026, 3, 1), "hour", "interval"),
    ],
)
def test_periods_that_cannot_be_served(start, end, interval, field):
    with pytest.raises(PeriodError) as raised:
        resolve_period(start=start, end=end, interval=interval, tz=ZoneInfo("UTC"), now=T0)
    assert raised.value.field == field


def test_redirect_targets_are_http_urls_only():
    assert redirect_target("https://example.com/a?b=c#d") == "https://example.com/a?b=c#d"
    assert (
        redirect_target("http://example.com/caf\u00e9 menu")
        == "http://example.com/caf%C3%A9%20menu"
    )
    for bad in (
        "javascript:alert(1)",
        "data:text/html,hi",
        "//evil.example/",
        "https:///nohost",
        "https://example.com/\r\nSet-Cookie: x=1",
        "ftp://example.com/",
    ):
        assert redirect_target(bad) is None, bad


def test_small_helpers():
    assert normalize_message_id(" <abc@host> ") == "abc@host"
    assert decode_cursor(encode_cursor("zoë@example.com")) == "zoë@example.com"
    with pytest.raises(ValueError, match="cursor"):
        decode_cursor("%%%")
    assert csv_cell("=HYPERLINK(1)") == "'=HYPERLINK(1)"
    assert csv_cell(-3) == -3
    assert csv_cell(None) == ""
