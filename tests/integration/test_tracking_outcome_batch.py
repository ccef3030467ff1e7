"""Tracking's batch of `email.dispatched` outcomes leaves what the same events one by one leave:
the recipients' rows, the email's owner and first send, and the roll-up changes. On the real
database."""

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from herald import db as herald_db
from herald import migrations
from herald.devinfra.stack import Stack
from herald.events.dispatcher import MessageDispatched
from tracking import flows, store
from tracking.domain import Rollup
from tracking.machine import Classifier
from tracking.providers import ProviderEvent

RULES = flows.Rules(classifier=Classifier(()), scanner_click_seconds=2.0)
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


@pytest.fixture
async def pool(infra: Stack, scratch_schema: str) -> AsyncIterator[asyncpg.Pool]:
    conn = await asyncpg.connect(infra.database_url)
    try:
        await migrations.migrate(
            conn, schema=scratch_schema, migrations=migrations.migrations_for("tracking")
        )
    finally:
        await conn.close()
    pool = await herald_db.create_pool(infra.database_url, schema=scratch_schema, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


def story(email_id: uuid.UUID, account: uuid.UUID, stranger: uuid.UUID) -> list[flows.Dispatched]:
    def event(
        minutes: int,
        message: str,
        recipient: str,
        status: str,
        attempt: int = 1,
        owner: uuid.UUID = account,
    ) -> flows.Dispatched:
        data = MessageDispatched(
            email_id=email_id,
            message_id=f"<{message}.{email_id}@h>",
            recipient=recipient,
            status=status,
            attempt=attempt,
            smtp_code=250 if status == "sent" else 450 if status == "deferred" else 550,
        )
        return flows.Dispatched(account_id=owner, data=data, at=T0 + timedelta(minutes=minutes))

    return [
        event(0, "a", "a@example.com", "deferred"),
        event(5, "a", "A@example.com", "sent", 2),
        event(6, "a", "a@example.com", "sent", 2),  # a repeat
        event(1, "b", "b@example.com", "failed"),
        event(90, "b", "b@example.com", "failed"),  # the failure published again
        event(95, "b", "b@example.com", "sent", 2),  # retried, and sent
        event(2, "c", "c@example.com", "sent"),
        event(3, "c2", "c@example.com", "sent"),  # another Message-ID for the same recipient
        event(4, "d", "d@example.com", "sent", owner=stranger),  # not this account's email
    ]


async def outcome_of(pool: asyncpg.Pool, email_id: uuid.UUID) -> dict[str, Any]:
    rows = await pool.fetch(
        "SELECT * FROM recipients WHERE email_id = $1 ORDER BY recipient", email_id
    )
    recipients = [
        {
            k: (v.replace(str(email_id), "E") if isinstance(v, str) else v)
            for k, v in row.items()
            if k not in ("email_id", "updated_at", "created_at")
        }
        for row in rows
    ]
    email = await pool.fetchrow(
        "SELECT account_id, first_sent_at FROM emails WHERE email_id = $1", email_id
    )
    async with pool.acquire() as conn:
        deltas = [d for d in await store.drain_deltas(conn, limit=10_000) if d.email_id == email_id]
    rollup = Rollup()
    rollup.extend(deltas)
    sums = sorted(
        (d.scope, d.at, d.link_index, d.url, sorted(d.counts.items())) for d in rollup.deltas
    )
    return {"recipients": recipients, "email": dict(email or {}), "rollup": sums}


async def test_a_batch_of_outcomes_has_the_effects_of_its_events_one_by_one(pool: asyncpg.Pool):
    account, stranger = uuid.uuid4(), uuid.uuid4()
    results = []
    for batched in (False, True):
        email_id = uuid.uuid4()
        events = story(email_id, account, stranger)
        if batched:
            async with pool.acquire() as conn, conn.transaction():
                await flows.record_dispatches(conn, events=events, rules=RULES)
        else:
            for e in events:
                async with pool.acquire() as conn, conn.transaction():
                    await flows.record_dispatch(
                        conn, account_id=e.account_id, data=e.data, at=e.at, rules=RULES
                    )
        results.append(await outcome_of(pool, email_id))
    assert results[0] == results[1]
    assert results[0]["rollup"]
    assert [(r["recipient"], r["status"]) for r in results[0]["recipients"]] == [
        ("a@example.com", "sent"),
        ("b@example.com", "sent"),
        ("c@example.com", "sent"),
    ]
    assert results[0]["email"] == {
        "account_id": account,
        "first_sent_at": T0 + timedelta(minutes=2),
    }


async def before_outcomes(
    pool: asyncpg.Pool, email_id: uuid.UUID, account: uuid.UUID, *, notified: bool
) -> None:
    """An open of `a` before its outcome (its row, not naming the recipient), and, if
    `notified`, the provider's hard bounce of `b` before its outcome."""
    async with pool.acquire() as conn, conn.transaction():
        await store.ensure_emails(conn, emails=[(email_id, account)])
        await store.ensure_recipients(conn, rows=[(f"a.{email_id}@h", email_id, account)])
        if notified:
            await store.insert_provider_event(
                conn,
                event=ProviderEvent(
                    provider="sendgrid",
                    event_id=f"bounce-{email_id}",
                    kind="bounce",
                    at=T0 + timedelta(minutes=3),
                    message_id=f"b.{email_id}",
                    hard=True,
                ),
            )


@pytest.mark.parametrize("notified", [False, True], ids=["rows_before", "notified_before"])
async def test_rows_and_notifications_from_before_the_outcome_apply_as_one_by_one(
    pool: asyncpg.Pool, notified: bool
):
    account, stranger = uuid.uuid4(), uuid.uuid4()
    results = []
    for batched in (False, True):
        email_id = uuid.uuid4()
        await before_outcomes(pool, email_id, account, notified=notified)
        events = story(email_id, account, stranger)
        if batched:
            async with pool.acquire() as conn, conn.transaction():
                await flows.record_dispatches(conn, events=events, rules=RULES)
        else:
            for e in events:
                async with pool.acquire() as conn, conn.transaction():
                    await flows.record_dispatch(
                        conn, account_id=e.account_id, data=e.data, at=e.at, rules=RULES
                    )
        result = await outcome_of(pool, email_id)
        result["unmatched"] = await pool.fetchval(
            "SELECT count(*) FROM provider_events WHERE message_id LIKE $1 AND NOT matched",
            f"%{email_id}%",
        )
        results.append(result)
    assert results[0] == results[1]
    assert results[0]["unmatched"] == 0
    bounces = {r["recipient"]: r["bounce"] for r in results[0]["recipients"]}
    assert bounces["b@example.com"] == ("hard" if notified else None)


async def test_unmatched_notifications_of_many_messages_are_found_by_local_part(
    pool: asyncpg.Pool,
):
    async with pool.acquire() as conn, conn.transaction():
        for n, message_id in enumerate(["x@h", "y", "x@other", "z@h"]):
            await store.insert_provider_event(
                conn,
                event=ProviderEvent(
                    provider="sendgrid",
                    event_id=f"e{n}",
                    kind="delivered",
                    at=T0 - timedelta(minutes=n),
                    message_id=message_id,
                ),
            )
        await store.mark_provider_event(conn, provider="sendgrid", event_id="e3", message_id="z@h")
        found = await store.unmatched_provider_events_of(conn, message_ids=["x@h", "y@h", "z@h"])
    assert {m: [e.event_id for e in events] for m, events in found.items()} == {
        "x@h": ["e2", "e0"],
        "y@h": ["e1"],
    }
