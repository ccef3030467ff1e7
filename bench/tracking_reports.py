"""`GET /reports` latency for an account with 1,000,000 recorded events over 200 emails, against
accounts with 1,000 events (over 200 emails, so the answer has the same size, and over one), in
one run.

The events are recorded through the tracking service's own code (the delivery rules for the
200,000 sends, the flush worker's `apply_activity` for 500,000 opens and 300,000 clicks), so the
roll-ups are the ones the service keeps; the outbox rows that recording produces are then
discarded (publishing them is not what is measured). Sends are spread over 30 days, opens and
clicks over the 3 days after each send (up to now for the last few: nothing is recorded before
it happens). Every email is tagged `newsletter`, every other one `spring` too, so one tag filter
names all of an account's emails and the other half of them.

Reports are asked of the tracking service directly, not through the gateway: the gateway keeps
an account's report for a few seconds (`REPORTS_CACHE_SECONDS`), and a repeated request answered
from that cache would measure the cache, not the report.

    .venv/bin/python bench/tracking_reports.py [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import asyncpg
import httpx

from auth.tokens import SigningKey, issue_access_token
from herald import db
from herald.devinfra.process import free_port
from herald.devinfra.stack import SERVICES, Stack, StackConfig
from tracking import flows, store
from tracking.domain import Activity, Recipient, Rollup, record_outcome
from tracking.machine import Classifier

BROWSER = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Safari/605.1.15"
LINKS = 8
ROUNDS = 10


async def record_sends(
    pool: asyncpg.Pool,
    account: uuid.UUID,
    email: uuid.UUID,
    at: datetime,
    recipients: int,
    tags: list[str],
) -> list[str]:
    """The dispatcher's `sent` outcomes for every recipient, by the delivery rules."""
    rollup, rows = Rollup(), []
    for n in range(recipients):
        r = Recipient(message_id=f"{n}.{email}@bench", email_id=email, account_id=account)
        r.recipient = f"r{n}@example.com"
        record_outcome(r, rollup, status="sent", attempt=1, at=at, smtp_code=250, smtp_reply="ok")
        rows.append(r)
    async with pool.acquire() as conn, conn.transaction():
        await store.ensure_emails(conn, emails=[(email, account)])
        await store.put_email_details(
            conn,
            email_id=email,
            account_id=account,
            subject=f"Issue {email.hex[:6]}",
            kind="campaign",
            tags=tags,
            track_opens=True,
            track_clicks=True,
        )
        await store.mark_first_sent(conn, email_id=email, at=at)
        await store.save_recipients(conn, recipients=rows)
        await store.apply_rollup(conn, tables=rollup.tables())
    return [r.message_id for r in rows]


def activity(
    rng: random.Random,
    account: uuid.UUID,
    email: uuid.UUID,
    sent: datetime,
    messages: list[str],
    opens: int,
    clicks: int,
    now: datetime,
) -> list[Activity]:
    """Opens and clicks in the three days after `sent` (or until `now`), most of them early;
    some by machines."""
    window = min(72.0, (now - sent) / timedelta(hours=1)) - 0.1
    events = []
    for n in range(opens + clicks):
        delay = min(rng.expovariate(1 / 6), window)
        machine = rng.random() < 0.15
        kind: Literal["open", "click"] = "open" if n < opens else "click"
        index = rng.randrange(LINKS) if kind == "click" else None
        events.append(
            Activity(
                id=uuid.uuid4(),
                kind=kind,
                source="herald",
                message_id=rng.choice(messages),
                email_id=email,
                account_id=account,
                at=sent + timedelta(hours=delay),
                reason=("apple_mpp" if kind == "open" else "scanner_agent") if machine else None,
                user_agent="Mozilla/5.0" if machine else BROWSER,
                ip="17.58.1.1" if machine and kind == "open" else "203.0.113.7",
                link_index=index,
                url=f"https://example.com/{email.hex[:6]}/{index}" if index is not None else None,
            )
        )
    return events


async def record(pool: asyncpg.Pool, events: list[Activity], rules: flows.Rules) -> None:
    """Write events as the flush worker does, a batch per transaction."""
    for start in range(0, len(events), 5000):
        async with pool.acquire() as conn, conn.transaction():
            rollup = Rollup()
            await flows.apply_activity(conn, events[start : start + 5000], rollup, rules=rules)
            await store.apply_rollup(conn, tables=rollup.tables())


async def seed(
    pool: asyncpg.Pool,
    account: uuid.UUID,
    *,
    emails: int,
    recipients: int,
    opens: int,
    clicks: int,
    now: datetime,
) -> int:
    rng = random.Random(7)
    rules = flows.Rules(classifier=Classifier(), scanner_click_seconds=5)
    total = 0
    for n in range(emails):
        email = uuid.uuid4()
        sent = now - timedelta(days=29) + timedelta(days=29) * n / max(emails, 1)
        tags = ["newsletter", "spring"] if n % 2 == 0 else ["newsletter"]
        messages = await record_sends(pool, account, email, sent, recipients, tags)
        events = activity(rng, account, email, sent, messages, opens, clicks, now)
        await record(pool, events, rules)
        total += recipients + len(events)
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM outbox")
    return total


async def latencies(
    client: httpx.AsyncClient, token: str, params: dict[str, str], n: int
) -> list[float]:
    headers = {"Authorization": f"Bearer {token}"}
    for _ in range(3):
        (await client.get("/reports", headers=headers, params=params)).raise_for_status()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        response = await client.get("/reports", headers=headers, params=params)
        samples.append(time.perf_counter() - started)
        response.raise_for_status()
    return samples


def percentiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    return statistics.median(samples) * 1000, statistics.quantiles(samples, n=100)[98] * 1000


async def main(requests: int) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="herald-bench-"))
    data_dir.chmod(0o755)
    stack = Stack(
        StackConfig(
            data_dir=data_dir,
            service_ports={s: free_port() for s in SERVICES},
            pg_port=free_port(),
            broker_port=free_port(),
            sink_smtp_port=free_port(),
            sink_http_port=free_port(),
            durable=False,
            env={"LOG_LEVEL": "WARNING"},
        )
    )
    big, small, single = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    try:
        await stack.start_infrastructure()
        await asyncio.gather(stack.create_topics(), stack.migrate())
        pool = await db.create_pool(stack.database_url, schema="tracking", max_size=4)
        now = datetime.now(UTC)
        started = time.perf_counter()
        try:
            big_events = await seed(
                pool, big, emails=200, recipients=1000, opens=2500, clicks=1500, now=now
            )
            small_events = await seed(
                pool, small, emails=200, recipients=2, opens=2, clicks=1, now=now
            )
            single_events = await seed(
                pool, single, emails=1, recipients=200, opens=500, clicks=300, now=now
            )
            async with pool.acquire() as conn:
                for account in (big, small, single):
                    await store.put_timezone(conn, account_id=account, timezone="Europe/Berlin")
                await conn.execute("VACUUM ANALYZE")
                rows = await conn.fetchval("SELECT count(*) FROM email_hourly")
        finally:
            await pool.close()
        seeded = time.perf_counter() - started
        for name in ("auth", "tracking"):
            await stack.start_service(name)
        await stack.wait_ready(90, ["auth", "tracking"])
        key = SigningKey.from_pem(stack.secrets["JWT_PRIVATE_KEY"])

        def token(account: uuid.UUID) -> str:
            return issue_access_token(
                key,
                user_id=account,
                role="user",
                issuer="herald",
                audience="herald-api",
                ttl_seconds=3600,
            ).token

        cases = {
            "last 30 days, daily (default)": {},
            "last 7 days, hourly": {
                "from": (now - timedelta(days=6)).date().isoformat(),
                "interval": "hour",
            },
            "tag filter (all emails), 30 days": {"tag": "newsletter"},
            "tag filter (half the emails), 30 days": {"tag": "spring"},
        }
        results = []
        async with httpx.AsyncClient(base_url=stack.url("tracking"), timeout=30) as client:
            for label, params in cases.items():
                # Alternate often, so every account sees the same machine (its other load
                # comes and goes within seconds).
                samples: dict[uuid.UUID, list[float]] = {big: [], small: [], single: []}
                for _ in range(ROUNDS):
                    for account, found in samples.items():
                        found += await latencies(
                            client, token(account), params, max(requests // ROUNDS, 1)
                        )
                results.append((label, samples))
    finally:
        await stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    print(
        f"seeded {big_events:,} events over 200 emails, {small_events:,} over 200 emails and"
        f" {single_events:,} over 1 email in {seeded:.0f} s ({rows:,} email-hour roll-up rows)"
    )
    names = {
        big: f"{big_events:>9,} events, 200 emails",
        small: f"{small_events:>9,} events, 200 emails",
        single: f"{single_events:>9,} events,   1 email ",
    }
    for label, samples in results:
        print(f"GET /reports, {label}, {requests} requests each:")
        base50, base99 = percentiles(samples[small])
        for account, found in samples.items():
            p50, p99 = percentiles(found)
            print(
                f"  {names[account]}: p50 {p50:6.1f} ms, p99 {p99:6.1f} ms"
                f"  (x{p50 / base50:.2f}, x{p99 / base99:.2f} of 1,000 events over 200 emails)"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    options = parser.parse_args()
    asyncio.run(main(options.requests))
