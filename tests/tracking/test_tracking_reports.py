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
