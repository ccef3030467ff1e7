"""Reports against the database: narrowed to a tag or an email, a daily series still counts each
hour on the local day it starts on, also for half-hour offsets, and leaves other emails out."""

from __future__ import annotations

import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from herald import db as herald_db
from herald.devinfra.stack import Stack
from tracking import reports, store
from tracking.domain import Period, Rollup, resolve_period

NOW = datetime(2026, 3, 20, 12, 10, tzinfo=UTC)
START = datetime(2026, 3, 1, 0, 25, tzinfo=UTC)


@pytest.fixture
async def pool(infra: Stack) -> AsyncIterator[asyncpg.Pool]:
    pool = await herald_db.create_pool(infra.database_url, schema="tracking", max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


async def seed(
    pool: asyncpg.Pool, account: uuid.UUID, tags: dict[uuid.UUID, list[str]]
) -> dict[uuid.UUID, list[datetime]]:
    """Opens (and a click of link 0 with every third) at random moments over 19 days."""
    rng = random.Random(str(account))
    opened: dict[uuid.UUID, list[datetime]] = {}
    rollup = Rollup()
    for email in tags:
        moments = [START + timedelta(minutes=rng.randrange(19 * 24 * 60)) for _ in range(400)]
        for n, at in enumerate(moments):
            rollup.add("all", email, account, at, opens=1, unique_opens=1)
            if n % 3 == 0:
                rollup.add("link", email, account, at, link_index=0, url="https://e.x/", clicks=1)
        opened[email] = moments
    async with pool.acquire() as conn, conn.transaction():
        for email, email_tags in tags.items():
            await store.put_email_details(
                conn,
                email_id=email,
                account_id=account,
                subject="s",
                kind="campaign",
                tags=email_tags,
                track_opens=True,
                track_clicks=True,
            )
        await store.apply_rollup(conn, tables=rollup.tables())
    return opened


def per_day(moments: list[datetime], period: Period) -> dict[str, int]:
    """Opens per local day, each counted on the day its hour starts on (with a half-hour
    offset the period's first hour starts on the day before `from`)."""
    days: Counter[str] = Counter()
    for at in moments:
        hour = at.replace(minute=0, second=0, microsecond=0)
        if period.start <= hour < period.end:
            days[hour.astimezone(period.tz).date().isoformat()] += 1
    return dict(days)


@pytest.mark.parametrize("timezone", ["Asia/Kolkata", "America/St_Johns", "Europe/Berlin"])
async def test_narrowed_daily_series_count_local_days(pool: asyncpg.Pool, timezone: str) -> None:
    account = uuid.uuid4()
    news, both, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    opened = await seed(pool, account, {news: ["news"], both: ["news", "promo"], other: []})
    async with pool.acquire() as conn:
        await store.put_timezone(conn, account_id=account, timezone=timezone)
    first, last = date(2026, 3, 3), date(2026, 3, 14)  # across St John's change of clocks
    period = resolve_period(start=first, end=last, interval=None, tz=ZoneInfo(timezone), now=NOW)

    async def report(email_id: uuid.UUID | None, tag: str | None) -> dict[str, Any]:
        query = reports.ReportQuery(
            account_id=account,
            start=first,
            end=last,
            interval=None,
            email_id=email_id,
            tag=tag,
            limit=10,
            links=10,
        )
        return await reports.report(pool, query, now=NOW)

    everyone = opened[news] + opened[both] + opened[other]
    cases: list[tuple[uuid.UUID | None, str | None, list[datetime], set[uuid.UUID]]] = [
        (None, None, everyone, {news, both, other}),
        (None, "news", opened[news] + opened[both], {news, both}),
        (None, "promo", opened[both], {both}),
        (other, None, opened[other], {other}),
        (news, "promo", [], set()),
        (None, "none", [], set()),
    ]
    for email_id, tag, moments, emails in cases:
        body = await report(email_id, tag)
        expected = per_day(moments, period)
        assert {p["bucket"]: p["opens"] for p in body["series"] if p["opens"]} == expected
        assert body["totals"]["opens"] == sum(expected.values())
        assert {row["email_id"] for row in body["emails"]} == emails
        assert sum(row["opens"] for row in body["emails"]) == sum(expected.values())
        assert {link["email_id"] for link in body["top_links"]} == emails


async def test_a_narrowed_hourly_series_keeps_other_emails_out(pool: asyncpg.Pool) -> None:
    account = uuid.uuid4()
    news, other = uuid.uuid4(), uuid.uuid4()
    opened = await seed(pool, account, {news: ["news"], other: ["promo"]})
    query = reports.ReportQuery(
        account_id=account,
        start=date(2026, 3, 5),
        end=date(2026, 3, 6),
        interval="hour",
        email_id=None,
        tag="news",
        limit=10,
        links=10,
    )
    body = await reports.report(pool, query, now=NOW)
    start, end = datetime(2026, 3, 5, tzinfo=UTC), datetime(2026, 3, 7, tzinfo=UTC)
    assert body["totals"]["opens"] == sum(start <= at < end for at in opened[news])
    assert len(body["series"]) == 48


async def test_emails_within_the_period_count_as_their_buckets(pool: asyncpg.Pool) -> None:
    """An email all of whose hours lie within the period is read as its summed row (and its
    links from `link_stats`), one reaching past either edge from its buckets: the per-email
    table and the top links count both exactly as the buckets would."""
    account = uuid.uuid4()
    rng = random.Random(str(account))
    start, end = datetime(2026, 3, 5, tzinfo=UTC), datetime(2026, 3, 12, tzinfo=UTC)
    windows = {
        uuid.uuid4(): (datetime(2026, 3, 5, 0, 10, tzinfo=UTC), timedelta(days=6)),  # inside
        uuid.uuid4(): (datetime(2026, 3, 1, tzinfo=UTC), timedelta(days=8)),  # before start
        uuid.uuid4(): (datetime(2026, 3, 9, tzinfo=UTC), timedelta(days=8)),  # after end
        uuid.uuid4(): (datetime(2026, 3, 1, tzinfo=UTC), timedelta(days=3)),  # all before
        uuid.uuid4(): (datetime(2026, 3, 6, tzinfo=UTC), timedelta(days=4)),  # inside
    }
    opens: Counter[uuid.UUID] = Counter()
    clicks: Counter[tuple[uuid.UUID, int]] = Counter()
    rollup = Rollup()
    for email, (first, span) in windows.items():
        for n in range(300):
            at = first + timedelta(minutes=rng.randrange(int(span / timedelta(minutes=1))))
            counted = start <= at.replace(minute=0, second=0, microsecond=0) < end
            rollup.add("all", email, account, at, opens=1, unique_opens=1)
            opens[email] += counted
            if n % 2:
                link = n % 5
                rollup.add(
                    "link", email, account, at, link_index=link, url="https://e.x/", clicks=1
                )
                clicks[email, link] += counted
    # One email read whole and one from buckets carry the tag, and one of each does not.
    tagged = set(list(windows)[:2])
    async with pool.acquire() as conn, conn.transaction():
        for email in windows:
            await store.put_email_details(
                conn,
                email_id=email,
                account_id=account,
                subject="s",
                kind="campaign",
                tags=["t"] if email in tagged else [],
                track_opens=True,
                track_clicks=True,
            )
        await store.apply_rollup(conn, tables=rollup.tables())

    async def report(tag: str | None, links: int) -> dict[str, Any]:
        query = reports.ReportQuery(
            account_id=account,
            start=start,
            end=end,
            interval=None,
            email_id=None,
            tag=tag,
            limit=10,
            links=links,
        )
        return await reports.report(pool, query, now=NOW)

    for tag, emails in ((None, set(windows)), ("t", tagged)):
        body = await report(tag, 100)
        expected = +Counter({email: n for email, n in opens.items() if email in emails})
        assert {row["email_id"]: row["opens"] for row in body["emails"]} == expected
        assert body["totals"]["opens"] == sum(expected.values())
        ranked = sorted(
            ((n, key) for key, n in (+clicks).items() if key[0] in emails),
            key=lambda item: (-item[0], item[1]),
        )
        found = [
            ((link["email_id"], link["link_index"]), link["clicks"]) for link in body["top_links"]
        ]
        assert found == [(key, n) for n, key in ranked]
        # Fewer than all: the first of the emails read whole, and of those read from buckets.
        top = (await report(tag, 3))["top_links"]
        assert [(link["email_id"], link["link_index"]) for link in top] == [
            k for _, k in ranked[:3]
        ]
