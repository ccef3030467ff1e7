"""The scheduler's timers and fan-out against the real database, with a fake contacts service.

Each test runs the scheduler's loops in-process on a schema of its own (so the platform's own
scheduler, if running, never sees these timers) and reads what they wrote to the outbox.
"""

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from herald import db as herald_db
from herald import migrations
from herald.devinfra.stack import Stack
from herald.events import Envelope, decode
from herald.events.campaign import Audience, EmailCancelled, EmailContent, EmailScheduled
from herald.events.scheduler import DispatchBatch, EmailFannedOut, EmailFanoutStarted
from scheduler.contacts import ContactsClient
from scheduler.fanout import FanoutRunner, TimerPoller
from scheduler.handlers import when_email_cancelled_cancel_timer, when_email_scheduled_set_timer

ACCOUNT = uuid.uuid4()


class FakeContacts:
    """The contacts service's internal port: keyset pages over a fixed audience."""

    def __init__(self, emails: list[str], suppressed: set[str] | None = None) -> None:
        self.people = [
            {
                "email": e,
                "contact_id": str(uuid.uuid4()),
                "first_name": f"First{i}",
                "last_name": None,
                "attributes": {"n": i},
            }
            for i, e in enumerate(emails)
        ]
        self.suppressed = {s.lower() for s in suppressed or set()}
        self.pages = 0
        self.failures: list[int] = []  # statuses to answer with, one per coming call
        self.hold_at_page: int | None = None
        self.held = asyncio.Event()

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        assert request.headers["x-internal-token"]
        assert body["account_id"] == str(ACCOUNT)
        if self.failures:
            return httpx.Response(self.failures.pop(0), json={"error": {"code": "x"}})
        if request.url.path == "/internal/suppressed":
            return httpx.Response(
                200,
                json={"suppressed": [e for e in body["emails"] if e.lower() in self.suppressed]},
            )
        assert request.url.path == "/internal/recipients"
        assert 1 <= body["limit"] <= 5000
        self.pages += 1
        if self.hold_at_page is not None and self.pages >= self.hold_at_page:
            self.held.set()
            await asyncio.Event().wait()  # never answers: the caller is killed while waiting
        start = int(body["after"]) if body["after"] else 0
        items = self.people[start : start + body["limit"]]
        end = start + len(items)
        return httpx.Response(
            200,
            json={"items": items, "next_cursor": str(end) if end < len(self.people) else None},
        )

    def client(self) -> ContactsClient:
        http = httpx.AsyncClient(transport=httpx.MockTransport(self.handle))
        return ContactsClient(http, base_url="http://contacts", headers={"X-Internal-Token": "t"})


class Scheduler:
    """The scheduler's tables in a scratch schema, and its loops built on them."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    def runner(self, contacts: FakeContacts, *, batch_size: int = 100, lease: float = 30):
        return FanoutRunner(
            pool=self.pool,
            contacts=contacts.client(),
            batch_size=batch_size,
            lease_seconds=lease,
            retry_delay=0.01,
            max_retry_delay=0.05,
        )

    def poller(self, limit: int = 100) -> TimerPoller:
        return TimerPoller(pool=self.pool, poll_interval=0.05, limit=limit)

    async def deliver(self, data: Any, handler: Callable[..., Any]) -> None:
        envelope = Envelope.wrap(data, account_id=ACCOUNT)
        async with self.pool.acquire() as conn, conn.transaction():
            await handler(envelope, conn)

    async def schedule(self, event: EmailScheduled) -> None:
        await self.deliver(event, when_email_scheduled_set_timer)

    async def cancel(self, email_id: uuid.UUID, revision: int) -> None:
        await self.deliver(
            EmailCancelled(email_id=email_id, revision=revision), when_email_cancelled_cancel_timer
        )

    async def published(self, email_id: uuid.UUID | None = None) -> list[Any]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT payload FROM outbox ORDER BY seq")
        events = [decode(r["payload"]).data for r in rows]
        return [e for e in events if email_id is None or e.email_id == email_id]

    async def batches(self, email_id: uuid.UUID) -> list[DispatchBatch]:
        return [e for e in await self.published(email_id) if isinstance(e, DispatchBatch)]


@pytest.fixture
async def sched(infra: Stack, scratch_schema: str) -> AsyncIterator[Scheduler]:
    conn = await asyncpg.connect(infra.database_url)
    try:
        await migrations.migrate(
            conn, schema=scratch_schema, migrations=migrations.migrations_for("scheduler")
        )
    finally:
        await conn.close()
    pool = await herald_db.create_pool(infra.database_url, schema=scratch_schema, max_size=6)
    try:
        yield Scheduler(pool)
    finally:
        await pool.close()


def scheduled(
    *,
    lists: int = 1,
    to: list[str] | None = None,
    send_at: datetime | None = None,
    revision: int = 1,
    kind: str = "campaign",
    email_id: uuid.UUID | None = None,
) -> EmailScheduled:
    return EmailScheduled(
        email_id=email_id or uuid.uuid4(),
        revision=revision,
        send_at=send_at or datetime.now(UTC) - timedelta(seconds=1),
        kind=kind,
        content=EmailContent(
            subject="Hi {{ contact.first_name }}", html="<p>x</p>", from_email="a@x.io"
        ),
        audience=Audience(list_ids=[uuid.uuid4() for _ in range(lists)], to=to or []),
        template_vars={"promo": "SPRING"},
    )


def addresses(n: int) -> list[str]:
    return [f"person{i}@example.com" for i in range(n)]


async def test_a_due_timer_fans_out_everyone_once_in_ordered_batches(sched: Scheduler):
    people = addresses(1234)
    contacts = FakeContacts(people, suppressed={"blocked@example.com"})
    event = scheduled(to=["Literal@Example.com", "blocked@example.com", "person7@example.com"])
    await sched.schedule(event)

    assert await sched.poller().fire_due() == 1
    assert await sched.runner(contacts).run_one()

    published = await sched.published(event.email_id)
    assert isinstance(published[0], EmailFanoutStarted)
    batches = await sched.batches(event.email_id)
    assert [b.batch_no for b in batches] == list(range(len(batches)))
    recipients = [r.email for b in batches for r in b.recipients]
    # The literal address first; the suppressed one left out; person7 (also a list member) once.
    assert recipients[0] == "Literal@Example.com"
    assert "blocked@example.com" not in recipients
    assert sorted(recipients) == sorted(["Literal@Example.com", *people])
    assert all(len(b.recipients) <= 100 for b in batches)
    assert [b.last_batch for b in batches] == [False] * (len(batches) - 1) + [True]
    assert batches[-1].total_recipients == 1235
    assert all(b.template_vars == {"promo": "SPRING"} and b.revision == 1 for b in batches)
    first_contact = batches[1].recipients[0]
    assert first_contact.first_name == "First0"
    assert first_contact.attributes == {"n": 0}
    (ended,) = [e for e in published if isinstance(e, EmailFannedOut)]
    assert (ended.total_recipients, ended.batches, ended.outcome) == (
        1235,
        len(batches),
        "completed",
    )
    # Nothing left to do: the timer does not fire again and no fan-out is left running.
    assert await sched.poller().fire_due() == 0
    assert not await sched.runner(contacts).run_one()


async def test_a_timer_waits_for_its_time(sched: Scheduler):
    event = scheduled(send_at=datetime.now(UTC) + timedelta(seconds=1.5))
    await sched.schedule(event)
    poller = sched.poller()
    assert await poller.fire_due() == 0
    await asyncio.sleep(1.6)
    assert await poller.fire_due() == 1


async def test_system_mail_to_literal_addresses_skips_contacts(sched: Scheduler):
    contacts = FakeContacts([], suppressed={"a@example.com"})
    contacts.failures = [500] * 10  # contacts is down: a system mail does not need it
    event = scheduled(lists=0, to=["a@example.com"], kind="system")
    await sched.schedule(event)
    await sched.poller().fire_due()
    await sched.runner(contacts).run_one()
    (batch,) = await sched.batches(event.email_id)
    assert [r.email for r in batch.recipients] == ["a@example.com"]
    assert batch.last_batch
    assert batch.total_recipients == 1


async def test_a_fanout_killed_half_way_resumes_without_sending_anyone_twice(sched: Scheduler):
    people = addresses(2000)
    event = scheduled()
    await sched.schedule(event)
    await sched.poller().fire_due()

    dying = FakeContacts(people)
    dying.hold_at_page = 8  # the 8th page request hangs, and the replica dies there
    first = sched.runner(dying, lease=1)
    task = asyncio.create_task(first.run_one())
    await asyncio.wait_for(dying.held.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    done_before = len(await sched.batches(event.email_id))
    assert 0 < done_before < 20

    second = sched.runner(FakeContacts(people), lease=1)
    # The dead replica's lease has to run out before anyone else may take the fan-out over.
    assert not await second.run_one()
    await asyncio.sleep(1.1)
    assert await second.run_one()

    batches = await sched.batches(event.email_id)
    recipients = [r.email for b in batches for r in b.recipients]
    assert len(recipients) == len(set(recipients)) == 2000
    assert [b.batch_no for b in batches] == list(range(20))
    ended = [e for e in await sched.published(event.email_id) if isinstance(e, EmailFannedOut)]
    assert [e.total_recipients for e in ended] == [2000]


async def test_two_replicas_fire_each_timer_once_and_share_no_fanout(sched: Scheduler):
    events = [scheduled() for _ in range(30)]
    for event in events:
        await sched.schedule(event)
    pollers = [sched.poller(limit=4), sched.poller(limit=4)]

    async def drain(poller: TimerPoller) -> int:
        fired = 0
        while n := await poller.fire_due():
            fired += n
        return fired

    counts = await asyncio.gather(*(drain(p) for p in pollers))
    assert sum(counts) == 30

    people = addresses(450)
    runners = [sched.runner(FakeContacts(people)) for _ in range(3)]

    async def work(runner: FanoutRunner) -> None:
        while await runner.run_one():
            pass

    await asyncio.gather(*(work(r) for r in runners))
    for event in events:
        published = await sched.published(event.email_id)
        assert sum(isinstance(e, EmailFanoutStarted) for e in published) == 1
        recipients = [
            r.email for e in published if isinstance(e, DispatchBatch) for r in e.recipients
        ]
        assert sorted(recipients) == sorted(people)


async def test_reschedule_moves_the_timer_and_older_revisions_are_ignored(sched: Scheduler):
    email_id = uuid.uuid4()
    later = datetime.now(UTC) + timedelta(hours=1)
    await sched.schedule(scheduled(email_id=email_id, revision=2, send_at=later))
    # A stale revision (delivered late) does not bring the timer forward.
    await sched.schedule(scheduled(email_id=email_id, revision=1))
    assert await sched.poller().fire_due() == 0
    await sched.schedule(scheduled(email_id=email_id, revision=3))
    assert await sched.poller().fire_due() == 1


async def test_a_cancelled_timer_never_fires(sched: Scheduler):
    event = scheduled(send_at=datetime.now(UTC) + timedelta(seconds=1))
    await sched.schedule(event)
    await sched.cancel(event.email_id, revision=2)
    # The original schedule delivered again (Kafka redelivery) does not revive it.
    await sched.schedule(event)
    await asyncio.sleep(1.1)
    assert await sched.poller().fire_due() == 0
    assert await sched.published(event.email_id) == []


async def test_cancelling_during_a_fanout_stops_it_before_the_next_batch(sched: Scheduler):
    event = scheduled()
    await sched.schedule(event)
    await sched.poller().fire_due()
    contacts = FakeContacts(addresses(1000))
    contacts.hold_at_page = 4
    runner = sched.runner(contacts)
    task = asyncio.create_task(runner.run_one())
    await asyncio.wait_for(contacts.held.wait(), 30)
    await sched.cancel(event.email_id, revision=2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    sent = sum(len(b.recipients) for b in await sched.batches(event.email_id))
    ended = [e for e in await sched.published(event.email_id) if isinstance(e, EmailFannedOut)]
    assert [(e.outcome, e.total_recipients) for e in ended] == [("cancelled", sent)]
    assert not await sched.runner(FakeContacts(addresses(1000)), lease=1).run_one()


async def test_contacts_outages_are_waited_out_and_refusals_fail_the_fanout(sched: Scheduler):
    flaky = FakeContacts(addresses(250))
    flaky.failures = [503, 502]
    event = scheduled()
    await sched.schedule(event)
    await sched.poller().fire_due()
    runner = sched.runner(flaky)
    # Each outage gives the fan-out back (so the replica can go on with others) for a while.
    assert await runner.run_one()
    assert await sched.batches(event.email_id) == []
    deadline = asyncio.get_running_loop().time() + 10
    while len(await sched.batches(event.email_id)) < 3:
        assert asyncio.get_running_loop().time() < deadline
        await runner.run_one()
        await asyncio.sleep(0.01)
    assert sum(len(b.recipients) for b in await sched.batches(event.email_id)) == 250

    refusing = FakeContacts(addresses(10))
    refusing.failures = [422]
    doomed = scheduled()
    await sched.schedule(doomed)
    await sched.poller().fire_due()
    assert await sched.runner(refusing).run_one()
    (ended,) = [e for e in await sched.published(doomed.email_id) if isinstance(e, EmailFannedOut)]
    assert ended.outcome == "failed"
    assert "422" in (ended.reason or "")


async def test_a_fanout_crashing_again_and_again_still_hands_everyone_out_once(sched: Scheduler):
    people = addresses(5000)
    event = scheduled()
    await sched.schedule(event)
    await sched.poller().fire_due()
    crashes = 0
    for _ in range(200):
        runner = sched.runner(FakeContacts(people), batch_size=100)
        task = asyncio.create_task(runner.run_one())
        await asyncio.sleep(random.uniform(0.005, 0.05))
        if task.done():
            await task
        else:
            task.cancel()  # the replica dies wherever it is: mid-request, mid-transaction
            with contextlib.suppress(asyncio.CancelledError):
                await task
            crashes += 1
        async with sched.pool.acquire() as conn:
            # Time passes: the dead replica's lease runs out.
            await conn.execute("UPDATE fanouts SET lease_until = '-infinity'")
            if await conn.fetchval("SELECT state FROM fanouts") == "completed":
                break
    assert crashes > 3
    batches = await sched.batches(event.email_id)
    recipients = [r.email for b in batches for r in b.recipients]
    assert len(recipients) == len(set(recipients)) == 5000
    assert [b.batch_no for b in batches] == list(range(50))
    ended = [e for e in await sched.published(event.email_id) if isinstance(e, EmailFannedOut)]
    assert [e.total_recipients for e in ended] == [5000]
