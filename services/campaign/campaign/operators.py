"""What operators and administrators read about the campaign service: usage per account and
day, and emails per status as a Prometheus gauge."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import date, datetime

import asyncpg

from campaign import domain, store
from campaign.metrics import EMAILS_BY_STATUS
from campaign.schemas import AccountQuota, Usage, UsageDay
from herald.service import Runtime, Worker

log = logging.getLogger(__name__)

STATUSES = ("draft", "scheduled", "queued", "sending", "sent", "cancelled", "failed")
MAX_DAYS = 366


def check_range(start: date, end: date) -> None:
    """422 naming the field when the range is backwards or longer than `MAX_DAYS`."""
    if start > end:
        raise domain.invalid("from", "must not be after to")
    if (end - start).days >= MAX_DAYS:
        raise domain.invalid("to", f"at most {MAX_DAYS} days at once")


async def usage(pool: asyncpg.Pool, *, start: date, end: date, now: datetime) -> Usage:
    """Recipients per account per day in `start`..`end`, and every account's quota use today."""
    check_range(start, end)
    async with pool.acquire() as conn:
        days = await store.usage_by_day(conn, start=start, end=end)
        # Each account's today is in its own timezone, as the quota counts it.
        zones = await store.timezones(conn)
        today = [now.astimezone(domain.zone(z)).date() for z in zones]
        quotas = await store.quota_use_today(conn, zones=zones, days=today)
    return Usage(
        days=[
            UsageDay(account_id=r["account_id"], day=r["day"], sent=r["sent"], failed=r["failed"])
            for r in days
        ],
        quotas=[
            AccountQuota(
                account_id=r["account_id"],
                daily_send_quota=r["daily_send_quota"],
                used_today=r["used_today"],
            )
            for r in quotas
        ],
    )


async def refresh_status_gauge(pool: asyncpg.Pool) -> None:
    """Set `herald_campaign_emails` to the count of emails in each status now."""
    async with pool.acquire() as conn:
        counts = await store.status_counts(conn)
    for status in STATUSES:
        EMAILS_BY_STATUS.labels(status).set(counts.get(status, 0))


def status_gauge(*, interval: float) -> Worker:
    """Refreshes the emails-per-status gauge every `interval` seconds: one GROUP BY per
    interval, however often Prometheus scrapes."""

    @contextlib.asynccontextmanager
    async def worker(runtime: Runtime) -> AsyncIterator[None]:
        async def run() -> None:
            while True:
                try:
                    await refresh_status_gauge(runtime.db)
                except (
                    OSError,
                    TimeoutError,
                    asyncpg.PostgresError,
                    asyncpg.InterfaceError,
                ) as exc:
                    log.warning("emails per status not counted", extra={"error": repr(exc)})
                await asyncio.sleep(interval)

        task = asyncio.create_task(run(), name="emails-by-status")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return worker
