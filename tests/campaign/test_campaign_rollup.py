"""Status and counts rolled up from the scheduler's and dispatcher's events, on the real database.

The handlers run in-process on a schema of their own, fed the events exactly as the consumer
would hand them over (including repeats and out-of-order arrivals).
"""

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from campaign import handlers, store
from herald import db as herald_db
from herald import migrations
from herald.devinfra.stack import Stack
from herald.events import Envelope, EventData
from herald.events.dispatcher import MessageDispatched
from herald.events.scheduler import EmailFannedOut, EmailFanoutStarted

ACCOUNT = uuid.uuid4()
HANDLERS = {
    MessageDispatched: handlers.when_message_dispatched_count_outcome,
    EmailFannedOut: handlers.when_email_fanned_out_record_total,
    EmailFanoutStarted: handlers.when_fanout_started_mark_queued,
}


@pytest.fixture
async def pool(infra: Stack, scratch_schema: str) -> AsyncIterator[asyncpg.Pool]:
    conn = await asyncpg.connect(infra.database_url)
    try:
        await migrations.migrate(
            conn, schema=scratch_schema, migrations=migrations.migrations_for("campaign")
        )
    finally:
        await conn.close()
    pool = await herald_db.create_pool(infra.database_url, schema=scratch_schema, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


async def queued_email(pool: asyncpg.Pool, status: str = "queued") -> uuid.UUID:
    email_id = uuid.uuid4()
    async with pool.acquire() as conn:
        await store.insert_email(
            conn,
            email_id=email_id,
            account_id=ACCOUNT,
            kind="campaign",
            subject="s",
            html=None,
            text="t",
            text_derived=False,
            from_name=None,
            from_email="a@example.com",
            reply_to=None,
            list_ids=[uuid.uuid4()],
            contact_ids=[],
            to=[],
            tags=[],
            template_vars={},
        )
        await store.mark_queued(
            conn,
            email_id=email_id,
            status=status,
            send_at=datetime.now(UTC),
            from_email="a@example.com",
            from_name=None,
            reply_to=None,
            day=datetime.now(UTC).date(),
            reserved=3,
        )
    return email_id


async def feed(pool: asyncpg.Pool, *events: EventData) -> None:
    for data in events:
        async with pool.acquire() as conn, conn.transaction():
            await HANDLERS[type(data)](Envelope.wrap(data, account_id=ACCOUNT), conn)


async def state(pool: asyncpg.Pool, email_id: uuid.UUID) -> dict[str, Any]:
    async with pool.acquire() as conn:
        row = await store.get_email(conn, account_id=ACCOUNT, email_id=email_id)
    assert row is not None
    return {
        k: row[k] for k in ("status", "recipients", "sent_count", "failed_count", "failure_reason")
    }


def outcome(
    email_id: uuid.UUID, recipient: str, status: str, attempt: int = 1, *, retryable: bool = False
):
    return MessageDispatched(
        email_id=email_id,
        message_id=f"<{uuid.uuid4()}@h>",
        recipient=recipient,
        status=status,
        attempt=attempt,
        retryable=retryable,
    )


async def test_each_recipient_counts_once_and_the_email_is_sent_when_all_have_an_outcome(
    pool: asyncpg.Pool,
):
    email_id = await queued_email(pool, status="scheduled")
    await feed(pool, EmailFanoutStarted(email_id=email_id, revision=1))
    assert (await state(pool, email_id))["status"] == "queued"
    await feed(pool, outcome(email_id, "a@example.com", "deferred"))
    assert (await state(pool, email_id))["status"] == "sending"
    await feed(
        pool,
        outcome(email_id, "a@example.com", "deferred"),
        outcome(email_id, "a@example.com", "deferred", 2),
        outcome(email_id, "a@example.com", "sent", 3),
        outcome(email_id, "A@example.com", "sent", 3),  # a repeated outcome (another event id)
        outcome(email_id, "b@example.com", "failed"),
        EmailFannedOut(email_id=email_id, revision=1, total_recipients=3, batches=1),
    )
    assert await state(pool, email_id) == {
        "status": "sending",
        "recipients": 3,
        "sent_count": 1,
        "failed_count": 1,
        "failure_reason": None,
    }
    await feed(pool, outcome(email_id, "c@example.com", "sent"))
    assert (await state(pool, email_id))["status"] == "sent"
    assert (await state(pool, email_id))["sent_count"] == 2


async def test_outcomes_may_arrive_before_the_fanout_total(pool: asyncpg.Pool):
    email_id = await queued_email(pool)
    await feed(pool, outcome(email_id, "a@example.com", "sent"))
    assert (await state(pool, email_id))["status"] == "sending"
    await feed(pool, EmailFannedOut(email_id=email_id, revision=1, total_recipients=1, batches=1))
    assert (await state(pool, email_id))["status"] == "sent"


async def test_an_email_nobody_received_is_failed(pool: asyncpg.Pool):
    everyone_failed = await queued_email(pool)
    await feed(
        pool,
        EmailFannedOut(email_id=everyone_failed, revision=1, total_recipients=1, batches=1),
        outcome(everyone_failed, "a@example.com", "failed"),
    )
    assert (await state(pool, everyone_failed))["status"] == "failed"

    unresolved = await queued_email(pool)
    await feed(
        pool,
        EmailFannedOut(
            email_id=unresolved,
            revision=1,
            total_recipients=0,
            batches=0,
            outcome="failed",
            reason="contacts: HTTP 422",
        ),
    )
    final = await state(pool, unresolved)
    assert final["status"] == "failed"
    assert "HTTP 422" in final["failure_reason"]

    empty = await queued_email(pool)
    await feed(pool, EmailFannedOut(email_id=empty, revision=1, total_recipients=0, batches=0))
    assert (await state(pool, empty))["status"] == "sent"


async def test_events_of_unknown_emails_are_ignored(pool: asyncpg.Pool):
    stranger = uuid.uuid4()
    await feed(
        pool,
        outcome(stranger, "a@example.com", "sent"),
        EmailFannedOut(email_id=stranger, revision=1, total_recipients=1, batches=1),
        EmailFanoutStarted(email_id=stranger, revision=1),
    )


async def feed_as_one_batch(pool: asyncpg.Pool, *events: MessageDispatched) -> None:
    """All of `events` handed to the batch form of the handler at once, as the consumer does."""
    async with pool.acquire() as conn, conn.transaction():
        await handlers.when_messages_dispatched_count_outcomes(
            [Envelope.wrap(data, account_id=ACCOUNT) for data in events], conn
        )


async def outcomes_of(pool: asyncpg.Pool, email_id: uuid.UUID) -> list[tuple[str, str]]:
    rows = await pool.fetch(
        "SELECT recipient, status FROM outcomes WHERE email_id = $1 ORDER BY recipient", email_id
    )
    return [(row["recipient"], row["status"]) for row in rows]


async def test_a_batch_of_outcomes_has_the_effects_of_its_events_one_by_one(pool: asyncpg.Pool):
    def story(email_id: uuid.UUID, stranger: uuid.UUID) -> list[MessageDispatched]:
        return [
            outcome(email_id, "a@example.com", "deferred"),
            outcome(email_id, "a@example.com", "failed", 2),
            outcome(email_id, "A@Example.com", "sent", 3),  # the first final outcome counts
            outcome(stranger, "a@example.com", "sent"),
            outcome(email_id, "b@example.com", "sent"),
            outcome(email_id, "c@example.com", "sent"),
            outcome(email_id, "c@example.com", "deferred"),  # late: the email stays finished
        ]

    states, outcomes = [], []
    for batched in (False, True):
        email_id = await queued_email(pool)
        await feed(
            pool, EmailFannedOut(email_id=email_id, revision=1, total_recipients=3, batches=1)
        )
        events = story(email_id, uuid.uuid4())
        await (feed_as_one_batch(pool, *events) if batched else feed(pool, *events))
        states.append(await state(pool, email_id))
        outcomes.append(await outcomes_of(pool, email_id))
    assert (
        states[0]
        == states[1]
        == {
            "status": "sent",
            "recipients": 3,
            "sent_count": 2,
            "failed_count": 1,
            "failure_reason": None,
        }
    )
    assert outcomes[0] == outcomes[1]


async def test_a_batch_counts_a_retried_failure_again_once_forgotten(pool: asyncpg.Pool):
    email_id = await queued_email(pool)
    await feed(pool, EmailFannedOut(email_id=email_id, revision=1, total_recipients=2, batches=1))
    await feed_as_one_batch(
        pool,
        outcome(email_id, "a@example.com", "failed", retryable=True),
        outcome(email_id, "b@example.com", "failed", retryable=True),
    )
    assert (await state(pool, email_id))["status"] == "failed"
    async with pool.acquire() as conn, conn.transaction():
        retryable = await store.retryable_failures(conn, email_id=email_id)
        assert sorted(retryable) == ["a@example.com", "b@example.com"]
        assert (await store.forget_failed(conn, email_id=email_id))["forgotten"] == 2
    await feed_as_one_batch(
        pool,
        outcome(email_id, "a@example.com", "sent", 2),
        outcome(email_id, "a@example.com", "failed", 3),  # a repeat of an outcome: not counted
    )
    assert await state(pool, email_id) == {
        "status": "sending",
        "recipients": 2,
        "sent_count": 1,
        "failed_count": 0,
        "failure_reason": None,
    }
    await feed_as_one_batch(pool, outcome(email_id, "b@example.com", "failed", 2))
    assert (await state(pool, email_id)) == {
        "status": "sent",
        "recipients": 2,
        "sent_count": 1,
        "failed_count": 1,
        "failure_reason": None,
    }


async def test_a_batch_of_deferrals_marks_the_email_sending(pool: asyncpg.Pool):
    email_id = await queued_email(pool, status="scheduled")
    await feed_as_one_batch(
        pool,
        outcome(email_id, "a@example.com", "deferred"),
        outcome(email_id, "b@example.com", "deferred"),
        outcome(uuid.uuid4(), "a@example.com", "deferred"),
    )
    assert (await state(pool, email_id))["status"] == "sending"
    assert await outcomes_of(pool, email_id) == []


async def test_only_failures_a_retry_may_cure_are_forgotten(pool: asyncpg.Pool):
    email_id = await queued_email(pool)
    await feed(pool, EmailFannedOut(email_id=email_id, revision=1, total_recipients=4, batches=1))
    await feed_as_one_batch(
        pool,
        outcome(email_id, "sent@example.com", "sent"),
        outcome(email_id, "refused@example.com", "failed"),  # 5xx: refused for good
        outcome(email_id, "late@example.com", "failed", retryable=True),
        outcome(email_id, "gone@example.com", "failed", retryable=True),
    )
    async with pool.acquire() as conn, conn.transaction():
        retryable = await store.retryable_failures(conn, email_id=email_id)
        assert sorted(retryable) == ["gone@example.com", "late@example.com"]
        # gone@ unsubscribed since: it keeps its failure.
        row = await store.forget_failed(conn, email_id=email_id, besides=["gone@example.com"])
        assert (row["forgotten"], row["failed_count"], row["status"]) == (1, 2, "sending")
        assert await store.retryable_failures(conn, email_id=email_id) == ["gone@example.com"]
    await feed(pool, outcome(email_id, "late@example.com", "sent", 2))
    assert await state(pool, email_id) == {
        "status": "sent",
        "recipients": 4,
        "sent_count": 2,
        "failed_count": 2,
        "failure_reason": None,
    }
