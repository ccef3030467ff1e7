"""The flush worker's write of a batch, against the database: a batch retried after an unclear
commit (some of its events written already) counts and publishes each event once, and opens and
clicks change nothing of a recipient but its engagement."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import pytest

from herald import db as herald_db
from herald.devinfra.stack import Stack
from tracking import flows, store
from tracking.domain import RECIPIENT_COLUMNS, Activity, Recipient, Rollup
from tracking.machine import Classifier

RULES = flows.Rules(classifier=Classifier(), scanner_click_seconds=5)
ENGAGEMENT = {
    "opens",
    "human_opens",
    "first_open_at",
    "first_human_open_at",
    "clicks",
    "human_clicks",
    "first_click_at",
    "first_human_click_at",
}


@pytest.fixture
async def pool(infra: Stack) -> AsyncIterator[asyncpg.Pool]:
    pool = await herald_db.create_pool(infra.database_url, schema="tracking", max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


def opens(email: uuid.UUID, account: uuid.UUID, n: int) -> list[Activity]:
    at = datetime.now(UTC) - timedelta(minutes=5)
    return [
        Activity(
            id=uuid.uuid4(),
            kind="open",
            source="herald",
            message_id=f"{i % 2}.{email}@test",
            email_id=email,
            account_id=account,
            at=at + timedelta(seconds=i),
            reason="apple_mpp" if i == 0 else None,
            user_agent="Mozilla/5.0" if i == 0 else "Mozilla/5.0 (X11; Linux) Firefox/130",
            ip="203.0.113.5",
        )
        for i in range(n)
    ]


async def flush(pool: asyncpg.Pool, events: list[Activity]) -> list[Activity]:
    async with pool.acquire() as conn, conn.transaction():
        rollup = Rollup()
        recorded = await flows.apply_activity(conn, events, rollup, rules=RULES)
        await store.apply_rollup(conn, tables=rollup.tables())
    return recorded


async def test_a_retried_batch_counts_and_publishes_each_event_once(pool: asyncpg.Pool) -> None:
    email, account = uuid.uuid4(), uuid.uuid4()
    events = opens(email, account, 5)
    assert len(await flush(pool, events[:3])) == 3
    # The same three again (their commit was unclear) with two that are new.
    again = await flush(pool, events)
    assert [e.id for e in again] == [e.id for e in events[3:]]
    async with pool.acquire() as conn:
        stats = await conn.fetchrow(
            "SELECT opens, human_opens, unique_opens FROM email_stats WHERE email_id = $1", email
        )
        written = await conn.fetchval("SELECT count(*) FROM activity WHERE email_id = $1", email)
        published = await conn.fetch(
            "SELECT event_id, topic, key, payload FROM outbox WHERE event_id = ANY($1::uuid[])",
            [e.id for e in events],
        )
        recipients = await conn.fetch(
            "SELECT opens, human_opens FROM recipients WHERE email_id = $1 ORDER BY message_id",
            email,
        )
    assert stats is not None
    assert dict(stats) == {"opens": 5, "human_opens": 4, "unique_opens": 2}
    assert written == 5
    assert sorted(r["event_id"] for r in published) == sorted(e.id for e in events)
    for row in published:
        assert row["topic"] == "email.opened"
        assert row["key"] == str(email).encode()
        payload = orjson.loads(row["payload"])
        assert payload["id"] == str(row["event_id"])
        assert payload["data"]["email_id"] == str(email)
    assert [(r["opens"], r["human_opens"]) for r in recipients] == [(3, 2), (2, 2)]


async def test_opens_and_clicks_change_only_engagement_of_a_delivered_recipient(
    pool: asyncpg.Pool,
) -> None:
    # The flush locks only the columns opens and clicks read (store.lock_engagement): the rest
    # of the row must come through untouched, and what it did read must reach the events.
    email, account, contact = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    sent_at = datetime.now(UTC) - timedelta(seconds=2)
    message_id = f"0.{email}@test"
    delivered = Recipient(
        message_id=message_id,
        email_id=email,
        account_id=account,
        recipient="dana@example.com",
        contact_id=contact,
        status="sent",
        attempts=1,
        smtp_code=250,
        smtp_reply="250 ok",
        sent_at=sent_at,
    )
    async with pool.acquire() as conn:
        await store.ensure_emails(conn, emails=[(email, account)])
        await store.save_recipients(conn, recipients=[delivered])
    click = Activity(
        id=uuid.uuid4(),
        kind="click",
        source="herald",
        message_id=message_id,
        email_id=email,
        account_id=account,
        at=sent_at + timedelta(seconds=1),
        user_agent="Mozilla/5.0 (X11; Linux) Firefox/130",
        link_index=0,
        url="https://example.com/a",
    )
    recorded = await flush(pool, [*opens(email, account, 1), click])
    assert [(e.kind, e.reason) for e in recorded] == [
        ("open", "apple_mpp"),
        ("click", "soon_after_delivery"),
    ]
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            f"SELECT {', '.join(RECIPIENT_COLUMNS)} FROM recipients WHERE message_id = $1",
            message_id,
        )
        payloads = await conn.fetch(
            "SELECT payload FROM outbox WHERE event_id = ANY($1::uuid[])", [e.id for e in recorded]
        )
    assert row is not None
    after = Recipient.from_row(row)
    assert (after.opens, after.human_opens, after.clicks, after.human_clicks) == (1, 0, 1, 0)
    assert after.first_open_at is not None
    assert after.first_click_at == click.at
    unchanged = {name: getattr(after, name) for name in RECIPIENT_COLUMNS if name not in ENGAGEMENT}
    assert unchanged == {
        name: getattr(delivered, name) for name in RECIPIENT_COLUMNS if name not in ENGAGEMENT
    }
    for payload in payloads:
        data = orjson.loads(payload["payload"])["data"]
        assert (data["recipient"], data["contact_id"]) == ("dana@example.com", str(contact))


async def test_events_written_with_headers_keep_them_as_a_list(pool: asyncpg.Pool):
    # A string bound to `$n::jsonb` goes through the connection's JSON codec and would be
    # stored as one JSON string, which the relay cannot read as headers.
    headers = orjson.dumps([["correlation_id", "abc"]]).decode()
    event_id = uuid.uuid4()
    async with pool.acquire() as conn:
        await store.write_events(
            conn, rows=[(event_id, "email.opened", b"k", b"{}")], headers=headers
        )
        stored = await conn.fetchval("SELECT headers FROM outbox WHERE event_id = $1", event_id)
    assert stored == [["correlation_id", "abc"]]
