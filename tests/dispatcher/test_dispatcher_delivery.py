"""The delivery engine against the real database and SMTP sink: every outcome, every recovery.

Each test runs an engine in-process on a schema of its own (the platform's dispatcher, when it
runs, never sees these messages), queues recipients through the consumer's handler as a
DispatchBatch would, steers the sink to accept, defer, reject or drop, and reads the outcome
from the message records, the outbox and the sink. Recipients carry a tag unique to the test.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any, Literal

import asyncpg
import httpx
import pytest

from dispatcher import activity, store
from dispatcher.config import Settings
from dispatcher.delivery import Engine, Handover, HandoverJournal, owner_key
from dispatcher.domain import ASSUMED_ACCEPTED
from dispatcher.handlers import when_dispatch_batch_received
from dispatcher.outcomes import outcome_events
from herald import db as herald_db
from herald import logs, migrations, outbox
from herald.devinfra.smtp_sink import SmtpSink
from herald.devinfra.stack import Stack
from herald.events import Envelope, decode
from herald.events.campaign import EmailContent
from herald.events.dispatcher import MessageDispatched
from herald.events.scheduler import DispatchBatch, Recipient
from herald.events.tracking import EmailBounced
from herald.links import ClickToken, LinkSigner, OpenToken

BASE = "https://herald.example"


class Harness:
    """An engine on a scratch schema, and ways to feed and watch it."""

    def __init__(self, stack: Stack, schema: str, pool: asyncpg.Pool, sink: httpx.AsyncClient):
        self.stack = stack
        self.schema = schema
        self.pool = pool
        self.sink = sink
        self.tag = f"d{uuid.uuid4().hex[:10]}"
        self.account_id = uuid.uuid4()
        self.engines: list[Engine] = []

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": self.stack.database_url,
            "smtp_url": self.stack.smtp_url,
            "public_base_url": BASE,
            "link_signing_keys": self.stack.secrets["LINK_SIGNING_KEYS"],
            "smtp_concurrency": 4,
            "smtp_timeout_seconds": 10,
            "retry_base_seconds": 0.3,
            "retry_max_seconds": 1,
            "poll_interval_seconds": 0.1,
            "shutdown_grace_seconds": 10,
        }
        return Settings(**(values | overrides))

    async def start(self, **overrides: Any) -> Engine:
        engine = Engine(pool=self.pool, settings=self.settings(**overrides), schema=self.schema)
        await engine.start()
        self.engines.append(engine)
        return engine

    def address(self, n: int | str) -> str:
        return f"{self.tag}-{n}@dispatch.example"

    async def queue(
        self,
        count: int = 0,
        *,
        addresses: list[str] | None = None,
        content: EmailContent | None = None,
        kind: Literal["campaign", "transactional", "system"] = "campaign",
        email_id: uuid.UUID | None = None,
    ) -> uuid.UUID:
        """Queue a DispatchBatch as the consumer would (one transaction with the handler)."""
        email_id = email_id or uuid.uuid4()
        batch = DispatchBatch(
            email_id=email_id,
            batch_no=0,
            kind=kind,
            content=content
            or EmailContent(
                subject="Hello {{ contact.first_name | default('there') }}",
                text="Hi {{ contact.first_name | default('there') }}, see https://example.com/x",
                html='<html><body><p>Hi {{ contact.first_name | default("there") }}</p>'
                '<a href="https://example.com/offer?a=1&amp;b=2">Offer</a>'
                '<a href="{{ unsubscribe_url }}">Unsubscribe</a></body></html>',
                from_name="Herald Tests",
                from_email="tests@herald.example",
            ),
            recipients=[
                Recipient(email=a, contact_id=uuid.uuid4(), first_name=f"P{i}")
                for i, a in enumerate(addresses or [self.address(i) for i in range(count)])
            ],
        )
        envelope = Envelope.wrap(batch, account_id=self.account_id)
        async with self.pool.acquire() as conn, conn.transaction():
            await when_dispatch_batch_received(envelope, conn)
        return email_id

    async def states(self, email_id: uuid.UUID) -> dict[str, str]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT recipient, state FROM messages WHERE email_id = $1", email_id
            )
        return {row["recipient"]: row["state"] for row in rows}

    async def settled(
        self, email_id: uuid.UUID, done: Callable[[dict[str, str]], bool], timeout: float = 60
    ) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            states = await self.states(email_id)
            if done(states):
                return states
            assert time.monotonic() < deadline, f"never settled: {states}"
            await asyncio.sleep(0.1)

    async def all_sent(self, email_id: uuid.UUID, count: int) -> None:
        await self.settled(
            email_id, lambda s: len(s) == count and all(v == "sent" for v in s.values())
        )

    async def events(self, email_id: uuid.UUID) -> list[Any]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT payload FROM outbox ORDER BY seq")
        found = [decode(row["payload"]).data for row in rows]
        return [e for e in found if getattr(e, "email_id", None) == email_id]

    async def received(self, match: str | None = None) -> list[dict[str, Any]]:
        """What the sink got for this test's addresses (or those containing `match`)."""
        response = await self.sink.get(
            "/api/messages", params={"to": match or self.tag, "limit": 1000}
        )
        response.raise_for_status()
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    async def raw(self, message_id: int) -> EmailMessage:
        response = await self.sink.get(f"/api/messages/{message_id}/raw")
        message = BytesParser(policy=policy.default).parsebytes(response.content)
        assert isinstance(message, EmailMessage)
        return message

    async def behave(self, *rules: dict[str, Any], refuse: bool = False) -> None:
        response = await self.sink.put(
            "/api/behaviour", json={"rules": list(rules), "refuse_connections": refuse}
        )
        response.raise_for_status()


@pytest.fixture
async def harness(
    infra: Stack, scratch_schema: str, sink: httpx.AsyncClient
) -> AsyncIterator[Harness]:
    conn = await asyncpg.connect(infra.database_url)
    try:
        await migrations.migrate(
            conn, schema=scratch_schema, migrations=migrations.migrations_for("dispatcher")
        )
    finally:
        await conn.close()
    pool = await herald_db.create_pool(infra.database_url, schema=scratch_schema, max_size=6)
    harness = Harness(infra, scratch_schema, pool, sink)
    try:
        yield harness
    finally:
        for engine in harness.engines:
            await engine.stop()
        await pool.close()


def recipients_of(items: list[dict[str, Any]]) -> list[str]:
    return sorted(rcpt for item in items for rcpt in item["rcpt_tos"])


async def test_each_recipient_gets_one_well_formed_tracked_message(harness: Harness):
    await harness.start()
    email_id = await harness.queue(12)
    await harness.all_sent(email_id, 12)

    items = await harness.received()
    assert recipients_of(items) == sorted(harness.address(i) for i in range(12))
    signer = LinkSigner.from_spec(harness.stack.secrets["LINK_SIGNING_KEYS"])
    async with harness.pool.acquire() as conn:
        ids = {
            row["recipient"]: str(row["id"])
            for row in await conn.fetch("SELECT id, recipient FROM messages")
        }
    for item in items:
        message = await harness.raw(item["id"])
        recipient = item["rcpt_tos"][0]
        assert message["Message-ID"] == f"<{ids[recipient]}@herald.example>"
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert str(message["List-Unsubscribe"]).startswith(f"<{BASE}/unsubscribe/")
        html_part = message.get_body(preferencelist=("html",))
        assert html_part is not None
        html = html_part.get_content()
        click = html.split(f'href="{BASE}/t/c/', 1)[1].split('"', 1)[0]
        assert signer.verify("click", click, ClickToken) == ClickToken(
            m=ids[recipient],
            e=email_id,
            a=harness.account_id,
            i=0,
            u="https://example.com/offer?a=1&b=2",
        )
        pixel = html.split(f'src="{BASE}/t/o/', 1)[1].split('"', 1)[0]
        assert signer.verify("open", pixel, OpenToken) == OpenToken(
            m=ids[recipient], e=email_id, a=harness.account_id
        )
        text_part = message.get_body(preferencelist=("plain",))
        assert text_part is not None
        assert text_part.get_content().startswith("Hi P")

    events = await harness.events(email_id)
    assert len(events) == 12
    for event in events:
        assert isinstance(event, MessageDispatched)
        assert (event.status, event.attempt, event.smtp_code) == ("sent", 1, 250)
        assert event.message_id == ids[event.recipient]
        assert event.smtp_reply
        assert "queued" in event.smtp_reply


async def test_a_batch_delivered_again_sends_nobody_twice(harness: Harness):
    await harness.start()
    email_id = await harness.queue(5)
    await harness.all_sent(email_id, 5)
    # The same recipients again, as a replayed or re-published batch would bring them.
    await harness.queue(addresses=[harness.address(i).upper() for i in range(5)], email_id=email_id)
    await harness.queue(6, email_id=email_id)  # and one more recipient
    await harness.all_sent(email_id, 6)
    await asyncio.sleep(0.5)
    assert recipients_of(await harness.received()) == sorted(harness.address(i) for i in range(6))


async def test_451_defers_and_the_retry_delivers(harness: Harness):
    await harness.behave({"match": harness.address(0), "action": "defer", "times": 1})
    await harness.start()
    email_id = await harness.queue(3)
    await harness.all_sent(email_id, 3)
    assert recipients_of(await harness.received()) == sorted(harness.address(i) for i in range(3))
    mine = [e for e in await harness.events(email_id) if e.recipient == harness.address(0)]
    assert [(e.status, e.attempt, e.smtp_code) for e in mine] == [
        ("deferred", 1, 451),
        ("sent", 2, 250),
    ]


async def test_recent_outcomes_count_what_the_records_went_through(harness: Harness):
    """The administrators' figures: sent, deferred and failed in the window, from the records."""
    await harness.behave(
        {"match": harness.address(0), "action": "defer", "times": 1},
        {"match": harness.address(1), "action": "reject"},
    )
    await harness.start()
    email_id = await harness.queue(4)
    await harness.settled(
        email_id, lambda s: sorted(s.values()) == ["failed", "sent", "sent", "sent"]
    )
    async with harness.pool.acquire() as conn:
        figures = await activity.recent_outcomes(conn)
    counts = {"sent": 3, "deferred": 1, "failed": 1}
    assert figures == {"last_minute": counts, "last_hour": counts, "awaiting_retry": 0}


async def test_550_fails_the_message_and_reports_a_hard_bounce(harness: Harness):
    await harness.behave({"match": harness.address(1), "action": "reject"})
    await harness.start()
    email_id = await harness.queue(3)
    states = await harness.settled(
        email_id, lambda s: len(s) == 3 and all(v in ("sent", "failed") for v in s.values())
    )
    assert states[harness.address(1)] == "failed"
    assert recipients_of(await harness.received()) == [harness.address(0), harness.address(2)]
    events = await harness.events(email_id)
    failed = [e for e in events if isinstance(e, MessageDispatched) and e.status == "failed"]
    assert [(e.recipient, e.smtp_code, e.attempt) for e in failed] == [(harness.address(1), 550, 1)]
    bounces = [e for e in events if isinstance(e, EmailBounced)]
    assert len(bounces) == 1
    bounce = bounces[0]
    assert (bounce.recipient, bounce.hard, bounce.source) == (harness.address(1), True, "smtp")
    assert bounce.message_id == failed[0].message_id
    assert bounce.contact_id is not None


async def test_a_connection_dropped_mid_data_is_retried_and_delivered_once(harness: Harness):
    await harness.behave({"match": harness.address(0), "action": "drop", "times": 1})
    await harness.start()
    email_id = await harness.queue(4)
    await harness.all_sent(email_id, 4)
    assert recipients_of(await harness.received()) == sorted(harness.address(i) for i in range(4))
    mine = [e for e in await harness.events(email_id) if e.recipient == harness.address(0)]
    assert [(e.status, e.smtp_code) for e in mine] == [("deferred", None), ("sent", 250)]
    assert mine[0].smtp_reply
    assert "no reply" in mine[0].smtp_reply


@pytest.fixture
async def pipelining_sink(tmp_path: Path) -> AsyncIterator[SmtpSink]:
    """A sink of this test's own that offers PIPELINING (the shared one does not)."""
    async with SmtpSink(tmp_path, smtp_port=0, http_port=0, pipelining=True) as sink:
        yield sink


async def test_through_a_pipelining_relay_each_recipient_gets_its_own_outcome(
    harness: Harness, pipelining_sink: SmtpSink
):
    async with httpx.AsyncClient(base_url=pipelining_sink.http_url) as http:
        harness.sink = http
        await harness.behave(
            {"match": harness.address(0), "action": "defer", "times": 1},
            {"match": harness.address(1), "action": "reject"},
            {"match": harness.address(2), "action": "drop", "times": 1},
        )
        await harness.start(smtp_url=f"smtp://127.0.0.1:{pipelining_sink.smtp_port}")
        email_id = await harness.queue(5)
        states = await harness.settled(
            email_id, lambda s: len(s) == 5 and all(v in ("sent", "failed") for v in s.values())
        )
        assert states == {harness.address(n): "failed" if n == 1 else "sent" for n in range(5)}
        assert recipients_of(await harness.received()) == sorted(
            harness.address(n) for n in (0, 2, 3, 4)
        )
    events = [e for e in await harness.events(email_id) if isinstance(e, MessageDispatched)]
    assert sorted((e.recipient, e.status, e.smtp_code) for e in events if e.attempt == 1) == [
        (harness.address(0), "deferred", 451),
        (harness.address(1), "failed", 550),
        (harness.address(2), "deferred", None),
        (harness.address(3), "sent", 250),
        (harness.address(4), "sent", 250),
    ]


async def test_a_relay_refusing_connections_delays_delivery_and_loses_nothing(
    harness: Harness,
):
    await harness.behave(refuse=True)
    try:
        engine = await harness.start()
        email_id = await harness.queue(6)
        await asyncio.sleep(1.5)
        assert await harness.received() == []
        assert not await engine.relay_ready()
        assert set((await harness.states(email_id)).values()) <= {"queued", "sending"}
    finally:
        await harness.behave()
    await harness.all_sent(email_id, 6)
    assert recipients_of(await harness.received()) == sorted(harness.address(i) for i in range(6))
    assert await engine.relay_ready()


async def test_a_relay_that_goes_down_mid_send_delays_delivery_and_loses_nothing(
    harness: Harness,
):
    await harness.start(smtp_concurrency=4, claim_batch=40)
    email_id = await harness.queue(200)
    await harness.settled(email_id, lambda s: list(s.values()).count("sent") >= 20)
    # Down: the open connections die at their next message's end, new ones are refused.
    await harness.behave({"match": "*", "action": "drop"}, refuse=True)
    try:
        await asyncio.sleep(1.5)
        sent_while_down = list((await harness.states(email_id)).values()).count("sent")
        await asyncio.sleep(1.5)
        states = await harness.states(email_id)
        assert list(states.values()).count("sent") == sent_while_down < 200
        # Nothing piles up in memory: a dead relay stops the claiming, not just the sending.
        assert list(states.values()).count("sending") <= 40 + 4
    finally:
        await harness.behave()
    await harness.all_sent(email_id, 200)
    received = recipients_of(await harness.received())
    assert received == sorted(harness.address(i) for i in range(200))


async def test_deferrals_give_up_at_the_horizon(harness: Harness):
    await harness.behave({"match": harness.address(0), "action": "defer"})
    await harness.start(retry_horizon_seconds=1.5)
    email_id = await harness.queue(1)
    await harness.settled(email_id, lambda s: s.get(harness.address(0)) == "failed")
    events = await harness.events(email_id)
    assert {e.status for e in events[:-1]} == {"deferred"}
    assert events[-1].status == "failed"
    assert "gave up" in events[-1].smtp_reply
    assert len(events) >= 2


async def test_unusable_addresses_and_templates_fail_without_smtp(harness: Harness):
    await harness.start()
    content = EmailContent(
        subject="{{ 1 // contact.attributes.zero }}", text="x", from_email="t@herald.example"
    )
    bad_addresses = ["not-an-address", f"{harness.tag} space@dispatch.example", "x" * 5000]
    email_id = await harness.queue(addresses=[*bad_addresses, harness.address(0)], content=content)
    states = await harness.settled(
        email_id, lambda s: len(s) == 4 and all(v == "failed" for v in s.values())
    )
    assert len(states) == 4
    events = await harness.events(email_id)
    replies = {e.recipient: (e.attempt, e.smtp_reply) for e in events}
    assert replies["not-an-address"][0] == 0
    assert "invalid address" in replies["not-an-address"][1]
    assert "template error" in replies[harness.address(0)][1]
    assert await harness.received() == []


async def test_stopping_finishes_transactions_and_gives_back_the_rest(harness: Harness):
    engine = await harness.start(smtp_concurrency=2, claim_batch=50)
    email_id = await harness.queue(300)
    await harness.settled(email_id, lambda s: list(s.values()).count("sent") >= 20)
    await engine.stop()
    harness.engines.remove(engine)
    states = await harness.states(email_id)
    assert set(states.values()) <= {"sent", "queued"}, states
    sent = sorted(r for r, s in states.items() if s == "sent")
    assert recipients_of(await harness.received()) == sent
    async with harness.pool.acquire() as conn:
        assert (
            await conn.fetchval("SELECT count(*) FROM messages WHERE claimed_by IS NOT NULL") == 0
        )
    await harness.start()
    await harness.all_sent(email_id, 300)
    received = recipients_of(await harness.received())
    assert received == sorted(harness.address(i) for i in range(300))


async def claim_as(
    harness: Harness, owner: uuid.UUID, count: int, *, handed_over: int
) -> list[uuid.UUID]:
    async with harness.pool.acquire() as conn:
        rows = await store.claim(conn, owner=owner, limit=count)
        ids = [row["id"] for row in rows]
        await store.mark_handed_over(conn, owner=owner, ids=ids[:handed_over])
    return ids


async def test_a_dead_process_s_messages_are_settled_or_sent_again(harness: Harness):
    email_id = await harness.queue(6)
    dead = uuid.uuid4()
    ids = await claim_as(harness, dead, 6, handed_over=2)
    await harness.start()
    await harness.all_sent(email_id, 6)
    async with harness.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT id, recipient, smtp_reply, attempts FROM messages WHERE email_id = $1",
            email_id,
        )
    by_id = {row["id"]: row for row in rows}
    handed = [by_id[i] for i in ids[:2]]
    assert all(row["smtp_reply"] == ASSUMED_ACCEPTED for row in handed)
    # Those the relay had were not sent again; the others were, as first attempts.
    received = recipients_of(await harness.received())
    assert received == sorted(by_id[i]["recipient"] for i in ids[2:])
    assert all(by_id[i]["attempts"] == 1 for i in ids)
    assumed = [e for e in await harness.events(email_id) if e.smtp_reply == ASSUMED_ACCEPTED]
    assert sorted(e.recipient for e in assumed) == sorted(row["recipient"] for row in handed)


async def test_a_live_process_keeps_its_messages(harness: Harness):
    email_id = await harness.queue(3)
    alive = uuid.uuid4()
    holder = await asyncpg.connect(harness.stack.database_url)
    try:
        assert await store.lock_owner(holder, key=owner_key(alive))
        await claim_as(harness, alive, 3, handed_over=0)
        await harness.start()
        await asyncio.sleep(1.5)  # several sweeps for orphans
        assert set((await harness.states(email_id)).values()) == {"sending"}
    finally:
        await holder.close()  # the process "dies": its lock goes with its connection
    await harness.all_sent(email_id, 3)
    assert len(await harness.received()) == 3


async def test_rates_are_kept_per_account_and_overall(harness: Harness):
    await harness.start(account_send_rate=4)
    started = time.monotonic()
    email_id = await harness.queue(10)
    await harness.all_sent(email_id, 10)
    # 4 at once (a second's burst), then one every quarter second.
    assert time.monotonic() - started >= 1.2
    for engine in harness.engines:
        await engine.stop()
    harness.engines.clear()
    await harness.start(send_rate=5)
    started = time.monotonic()
    email_id = await harness.queue(addresses=[harness.address(f"g{i}") for i in range(8)])
    await harness.all_sent(email_id, 8)
    assert time.monotonic() - started >= 1.2


async def test_a_reused_connection_closed_by_the_relay_is_reopened(harness: Harness):
    """The sink restarting stands for a relay closing idle connections."""
    engine = await harness.start(smtp_concurrency=1)
    first = await harness.queue(1)
    await harness.all_sent(first, 1)
    for connection in engine._connections:
        connection.abort()  # as if the relay had timed the idle connection out
    second = await harness.queue(addresses=[harness.address("again")])
    await harness.all_sent(second, 1)
    events = await harness.events(second)
    assert [(e.status, e.attempt) for e in events] == [("sent", 1)]


async def test_records_claimed_for_us_but_never_held_are_settled(harness: Harness):
    """A claim whose answer was lost leaves records ours in the table but not in memory."""
    engine = Engine(pool=harness.pool, settings=harness.settings(), schema=harness.schema)
    email_id = await harness.queue(4)
    ids = await claim_as(harness, engine.owner, 4, handed_over=1)
    await engine.start()
    harness.engines.append(engine)
    await harness.all_sent(email_id, 4)
    async with harness.pool.acquire() as conn:
        reply = await conn.fetchval("SELECT smtp_reply FROM messages WHERE id = $1", ids[0])
    assert reply == ASSUMED_ACCEPTED
    assert len(await harness.received()) == 3


async def test_an_end_still_in_our_buffer_is_not_marked_handed_over(harness: Harness):
    """Only an end the operating system has will reach the relay if we die."""
    email_id = await harness.queue(3)
    owner = uuid.uuid4()
    ids = await claim_as(harness, owner, 3, handed_over=0)
    journal = HandoverJournal(harness.pool, owner, senders=4)
    task = asyncio.ensure_future(journal.run())
    try:
        written: list[uuid.UUID] = []

        def end(message_id: uuid.UUID, delivered: bool) -> Callable[[], bool]:
            def write() -> bool:
                written.append(message_id)
                return delivered

            return write

        results = await asyncio.gather(
            journal.hand_over(ids[0], end(ids[0], True)),
            journal.hand_over(ids[1], end(ids[1], False)),
            journal.hand_over(uuid.uuid4(), end(ids[2], True)),  # not a record of ours
        )
        assert list(results) == [Handover.DONE, Handover.DONE, Handover.NOT_OURS]
        assert written == ids[:2]
        # The ends go out before the commit; the marks are visible once it is through.
        deadline = time.monotonic() + 10
        while True:
            async with harness.pool.acquire() as conn:
                marked = {
                    row["id"]: row["handed_over_at"] is not None
                    for row in await conn.fetch(
                        "SELECT id, handed_over_at FROM messages WHERE email_id = $1", email_id
                    )
                }
            if marked[ids[0]] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await journal.close()
    assert marked == {ids[0]: True, ids[1]: False, ids[2]: False}


async def test_a_hand_over_lane_begins_the_next_transaction_and_ends_it_unused(
    harness: Harness,
):
    """Each group's commit opens the next group's transaction; one no group takes is rolled
    back within a second or so, rather than left open."""
    email_id = await harness.queue(2)
    owner = uuid.uuid4()
    ids = await claim_as(harness, owner, 2, handed_over=0)
    journal = HandoverJournal(harness.pool, owner, senders=4, lanes=1)
    task = asyncio.ensure_future(journal.run())

    async def look() -> tuple[set[uuid.UUID], int]:
        async with harness.pool.acquire() as conn:
            marked = await conn.fetch(
                "SELECT id FROM messages WHERE email_id = $1 AND handed_over_at IS NOT NULL",
                email_id,
            )
            open_transactions = await conn.fetchval(
                """SELECT count(*) FROM pg_stat_activity
                   WHERE application_name = $1 AND state = 'idle in transaction'""",
                harness.schema,
            )
        return {row["id"] for row in marked}, open_transactions

    async def until(want: tuple[set[uuid.UUID], int], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while (seen := await look()) != want:
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.02)

    try:
        assert await journal.hand_over(ids[0], lambda: True) is Handover.DONE
        await until(({ids[0]}, 1))
        assert await journal.hand_over(ids[1], lambda: True) is Handover.DONE
        await until(({ids[0], ids[1]}, 1))
        started = time.monotonic()
        await until(({ids[0], ids[1]}, 0))
        assert time.monotonic() - started < 5
    finally:
        task.cancel()
        await journal.close()


async def test_a_hand_over_lane_whose_connection_died_takes_a_new_one(harness: Harness):
    """A lane holding a begun transaction on a connection the server ended fails one group
    (its senders retry) and carries on with a fresh connection."""
    await harness.queue(2)
    owner = uuid.uuid4()
    ids = await claim_as(harness, owner, 2, handed_over=0)
    journal = HandoverJournal(harness.pool, owner, senders=4, lanes=1)
    task = asyncio.ensure_future(journal.run())
    try:
        assert await journal.hand_over(ids[0], lambda: True) is Handover.DONE
        deadline = time.monotonic() + 10
        async with harness.pool.acquire() as conn:
            while not await conn.fetchval(
                """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                   WHERE application_name = $1 AND state = 'idle in transaction'""",
                harness.schema,
            ):
                assert time.monotonic() < deadline, "the lane began no transaction"
                await asyncio.sleep(0.02)
        # Bounded: a journal that died with the connection would leave its senders waiting.
        with pytest.raises(Exception, match=r"connection|terminat"):
            await asyncio.wait_for(journal.hand_over(ids[1], lambda: True), 10)
        assert await asyncio.wait_for(journal.hand_over(ids[1], lambda: True), 10) is Handover.DONE
        assert not task.done()
    finally:
        task.cancel()
        await journal.close()


async def test_outcomes_go_into_the_outbox_as_their_envelopes_would(harness: Harness):
    """The relay reads encoded outcomes as it reads what `outbox.write_many` wrote."""
    record: dict[str, Any] = {
        "id": uuid.uuid4(),
        "email_id": uuid.uuid4(),
        "account_id": harness.account_id,
        "recipient": harness.address("ü"),
        "contact_id": None,
        "state": "failed",
        "attempts": 2,
        "smtp_code": 550,
        "smtp_reply": "5.1.1 no such user",
    }
    encoded = outcome_events([record], bounced={record["id"]})
    envelopes = [decode(e.payload) for e in encoded]
    token = logs.correlation_id.set("corr-outcomes")
    try:
        async with harness.pool.acquire() as conn, conn.transaction():
            await outbox.write_many(conn, encoded)
            await outbox.write_many(
                conn, [Envelope.wrap(e.data, account_id=e.account_id) for e in envelopes]
            )
    finally:
        logs.correlation_id.reset(token)
    async with harness.pool.acquire() as conn:
        rows = await outbox.pending(conn, limit=10)
        ids = [r["event_id"] for r in await conn.fetch("SELECT event_id FROM outbox ORDER BY seq")]
    ours, theirs = rows[:2], rows[2:]
    assert ids[:2] == [e.id for e in envelopes]
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine["topic"] == reference["topic"]
        assert mine["key"] == reference["key"]
        assert mine["headers"] == reference["headers"]
        assert decode(mine["payload"]).data == decode(reference["payload"]).data


async def test_a_large_message_is_delivered_whole(harness: Harness):
    await harness.start()
    paragraph = "<p>" + "Long text, with ünïcode. " * 40 + "</p>\n"
    content = EmailContent(
        subject="Big", html=paragraph * 4000, text="big\n" * 1000, from_email="t@herald.example"
    )
    email_id = await harness.queue(1, content=content)
    await harness.all_sent(email_id, 1)
    (item,) = await harness.received()
    assert item["size"] > 4_000_000
    html = (await harness.raw(item["id"])).get_body(preferencelist=("html",))
    assert html is not None
    assert html.get_content().count("Long text, with ünïcode.") == 40 * 4000
