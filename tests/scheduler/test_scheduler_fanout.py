"""The scheduler's timers and fan-out against the real database and the real contacts service.

Each test runs the scheduler's loops in-process on a schema of its own (so the platform's own
scheduler never sees these timers) and reads what they wrote to the outbox. Audiences are made
as a user makes them: lists and contacts imported through the contacts API (via the gateway),
unsubscribes by the one-click link; the fan-out resolves them through the contacts service's
internal port over HTTP, exactly as the scheduler process does.
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
import pytest

from herald import db as herald_db
from herald import migrations
from herald.devinfra.stack import Stack
from herald.events import Envelope, decode
from herald.events.campaign import Audience, EmailCancelled, EmailContent, EmailScheduled
from herald.events.scheduler import DispatchBatch, EmailFannedOut, EmailFanoutStarted
from herald.links import LinkSigner, UnsubscribeToken
from scheduler.contacts import ContactsClient
from scheduler.fanout import FanoutRunner, TimerPoller
from scheduler.handlers import when_email_cancelled_cancel_timer, when_email_scheduled_set_timer
from tests.conftest import TokenMaker


class ContactsAccount:
    """An account's contacts, made through the public contacts API."""

    def __init__(self, gateway: httpx.AsyncClient, platform: Stack, token: str, id: uuid.UUID):
        self.gateway = gateway
        self.id = id
        self.tag = id.hex[:8]
        self.headers = {"Authorization": f"Bearer {token}"}
        self._signer = LinkSigner.from_spec(platform.secrets["LINK_SIGNING_KEYS"])

    def address(self, n: int) -> str:
        return f"p{n}-{self.tag}@example.com"

    async def import_list(self, numbers: range) -> str:
        """A new list of the contacts numbered `numbers`, imported from a CSV file."""
        response = await self.gateway.post(
            "/lists", json={"name": uuid.uuid4().hex}, headers=self.headers
        )
        assert response.status_code == 201, response.text
        list_id: str = response.json()["id"]
        rows = "".join(f"{self.address(n)},First{n},{n}\r\n" for n in numbers)
        response = await self.gateway.post(
            "/contacts/import",
            headers=self.headers,
            files={"file": ("list.csv", f"email,first_name,n\r\n{rows}".encode(), "text/csv")},
            data={"list_id": list_id},
        )
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
        for _ in range(600):
            job = (
                await self.gateway.get(f"/contacts/import/{job_id}", headers=self.headers)
            ).json()
            if job["status"] in ("succeeded", "failed"):
                break
            await asyncio.sleep(0.1)
        assert job["status"] == "succeeded", job
        assert job["skipped"] == 0, job
        return list_id

    async def unsubscribe(self, email: str) -> None:
        """Unsubscribe `email` by the one-click link of a mail the account sent."""
        token = self._signer.sign("unsubscribe", UnsubscribeToken(a=self.id, r=email))
        response = await self.gateway.post(
            f"/unsubscribe/{token}",
            content=b"List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert response.status_code in (200, 204), response.text


class HangingTransport(httpx.AsyncHTTPTransport):
    """Real HTTP to the contacts service, except that the `hold_at`-th page request never
    gets its answer: the replica dies (or is cancelled) while it waits there."""

    def __init__(self, hold_at: int) -> None:
        super().__init__()
        self.hold_at = hold_at
        self.pages = 0
        self.held = asyncio.Event()
        self.release = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/internal/recipients":
            self.pages += 1
            if self.pages == self.hold_at:
                self.held.set()
                await self.release.wait()
        return await super().handle_async_request(request)


class Scheduler:
    """The scheduler's tables in a scratch schema, and its loops built on them."""

    def __init__(self, pool: asyncpg.Pool, platform: Stack) -> None:
        self.pool = pool
        self.platform = platform
        self._clients: list[httpx.AsyncClient] = []

    def contacts(self, transport: httpx.AsyncBaseTransport | None = None) -> ContactsClient:
        http = httpx.AsyncClient(transport=transport, timeout=30)
        self._clients.append(http)
        return ContactsClient(
            http,
            base_url=self.platform.url("contacts"),
            headers={"X-Internal-Token": self.platform.secrets["INTERNAL_TOKEN"]},
        )

    async def close(self) -> None:
        for http in self._clients:
            await http.aclose()

    def runner(
        self,
        *,
        batch_size: int = 100,
        lease: float = 30,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> FanoutRunner:
        return FanoutRunner(
            pool=self.pool,
            contacts=self.contacts(transport),
            batch_size=batch_size,
            lease_seconds=lease,
            retry_delay=0.01,
            max_retry_delay=0.05,
        )

    def poller(self, limit: int = 100) -> TimerPoller:
        return TimerPoller(pool=self.pool, poll_interval=0.05, limit=limit)

    async def deliver(self, data: Any, account_id: uuid.UUID, handler: Callable[..., Any]) -> None:
        envelope = Envelope.wrap(data, account_id=account_id)
        async with self.pool.acquire() as conn, conn.transaction():
            await handler(envelope, conn)

    async def schedule(self, event: EmailScheduled, account_id: uuid.UUID) -> None:
        await self.deliver(event, account_id, when_email_scheduled_set_timer)

    async def cancel(self, email_id: uuid.UUID, account_id: uuid.UUID, revision: int) -> None:
        await self.deliver(
            EmailCancelled(email_id=email_id, revision=revision),
            account_id,
            when_email_cancelled_cancel_timer,
        )

    async def published(self, email_id: uuid.UUID | None = None) -> list[Any]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT payload FROM outbox ORDER BY seq")
        events = [decode(r["payload"]).data for r in rows]
        return [e for e in events if email_id is None or e.email_id == email_id]

    async def batches(self, email_id: uuid.UUID) -> list[DispatchBatch]:
        return [e for e in await self.published(email_id) if isinstance(e, DispatchBatch)]

    async def recipients(self, email_id: uuid.UUID) -> list[str]:
        return [r.email for b in await self.batches(email_id) for r in b.recipients]

    async def ended(self, email_id: uuid.UUID) -> list[EmailFannedOut]:
        return [e for e in await self.published(email_id) if isinstance(e, EmailFannedOut)]


@pytest.fixture
async def sched(platform: Stack, scratch_schema: str) -> AsyncIterator[Scheduler]:
    conn = await asyncpg.connect(platform.database_url)
    try:
        await migrations.migrate(
            conn, schema=scratch_schema, migrations=migrations.migrations_for("scheduler")
        )
    finally:
        await conn.close()
    pool = await herald_db.create_pool(platform.database_url, schema=scratch_schema, max_size=6)
    scheduler = Scheduler(pool, platform)
    try:
        yield scheduler
    finally:
        await scheduler.close()
        await pool.close()


@pytest.fixture
def account(gateway: httpx.AsyncClient, platform: Stack, mint_token: TokenMaker) -> ContactsAccount:
    account_id = uuid.uuid4()
    return ContactsAccount(gateway, platform, mint_token(account_id), account_id)


def scheduled(
    *,
    list_ids: list[str] | None = None,
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
        audience=Audience(list_ids=[uuid.UUID(i) for i in list_ids or []], to=to or []),
        template_vars={"promo": "SPRING"},
    )


async def test_a_due_timer_fans_out_every_active_member_once_in_ordered_batches(
    sched: Scheduler, account: ContactsAccount
):
    # Two overlapping lists (200..399 on both), five members unsubscribed, one of them also
    # named as a literal address; another literal address is a list member too.
    first = await account.import_list(range(1000))
    second = await account.import_list(range(200, 1234))
    gone = [account.address(n) for n in (3, 250, 700, 999, 1233)]
    for email in gone:
        await account.unsubscribe(email)
    literal = ["Literal@Example.com", account.address(250), account.address(7).upper()]
    event = scheduled(list_ids=[first, second], to=literal)
    await sched.schedule(event, account.id)

    assert await sched.poller().fire_due() == 1
    assert await sched.runner().run_one()

    published = await sched.published(event.email_id)
    assert isinstance(published[0], EmailFanoutStarted)
    batches = await sched.batches(event.email_id)
    assert [b.batch_no for b in batches] == list(range(len(batches)))
    recipients = [r.email for b in batches for r in b.recipients]
    # Literal addresses first (less the suppressed one); p7 once, under its literal spelling.
    assert recipients[:2] == ["Literal@Example.com", account.address(7).upper()]
    members = {account.address(n) for n in range(1234)} - set(gone) - {account.address(7)}
    assert len(recipients) == len(set(recipients)) == 2 + len(members)
    assert set(recipients[2:]) == members
    assert all(len(b.recipients) <= 100 for b in batches)
    assert [b.last_batch for b in batches] == [False] * (len(batches) - 1) + [True]
    assert batches[-1].total_recipients == len(recipients)
    assert all(b.template_vars == {"promo": "SPRING"} and b.revision == 1 for b in batches)
    # What personalisation needs comes from the contacts service with each recipient.
    by_email = {r.email: r for b in batches for r in b.recipients}
    p42 = by_email[account.address(42)]
    assert (p42.first_name, p42.attributes) == ("First42", {"n": "42"})
    assert p42.contact_id is not None
    (ended,) = await sched.ended(event.email_id)
    assert (ended.total_recipients, ended.batches, ended.outcome) == (
        len(recipients),
        len(batches),
        "completed",
    )
    # Nothing left to do: the timer does not fire again and no fan-out is left running.
    assert await sched.poller().fire_due() == 0
    assert not await sched.runner().run_one()


async def test_a_timer_waits_for_its_time(sched: Scheduler):
    event = scheduled(send_at=datetime.now(UTC) + timedelta(seconds=1.5))
    await sched.schedule(event, uuid.uuid4())
    poller = sched.poller()
    assert await poller.fire_due() == 0
    await asyncio.sleep(1.6)
    assert await poller.fire_due() == 1


async def test_system_mail_reaches_suppressed_addresses_and_campaign_mail_does_not(
    sched: Scheduler, account: ContactsAccount
):
    blocked, fine = f"blocked-{account.tag}@example.com", f"fine-{account.tag}@example.com"
    await account.unsubscribe(blocked)  # an address that is no contact: suppressed all the same
    system = scheduled(to=[blocked, fine], kind="system")
    campaign = scheduled(to=[blocked, fine])
    await sched.schedule(system, account.id)
    await sched.schedule(campaign, account.id)
    assert await sched.poller().fire_due() == 2
    runner = sched.runner()
    while await runner.run_one():
        pass
    assert await sched.recipients(system.email_id) == [blocked, fine]
    assert await sched.recipients(campaign.email_id) == [fine]
    for email_id, total in ((system.email_id, 2), (campaign.email_id, 1)):
        (batch,) = await sched.batches(email_id)
        assert (batch.last_batch, batch.total_recipients) == (True, total)


async def test_a_fanout_killed_half_way_resumes_without_sending_anyone_twice(
    sched: Scheduler, account: ContactsAccount
):
    list_id = await account.import_list(range(2000))
    event = scheduled(list_ids=[list_id])
    await sched.schedule(event, account.id)
    await sched.poller().fire_due()

    dying = HangingTransport(hold_at=8)  # the 8th page request hangs, and the replica dies there
    task = asyncio.create_task(sched.runner(lease=1, transport=dying).run_one())
    await asyncio.wait_for(dying.held.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    done_before = len(await sched.batches(event.email_id))
    assert 0 < done_before < 20

    second = sched.runner(lease=1)
    # The dead replica's lease has to run out before anyone else may take the fan-out over.
    assert not await second.run_one()
    await asyncio.sleep(1.1)
    assert await second.run_one()

    batches = await sched.batches(event.email_id)
    recipients = [r.email for b in batches for r in b.recipients]
    assert len(recipients) == len(set(recipients)) == 2000
    assert set(recipients) == {account.address(n) for n in range(2000)}
    assert [b.batch_no for b in batches] == list(range(20))
    assert [e.total_recipients for e in await sched.ended(event.email_id)] == [2000]


async def test_two_replicas_fire_each_timer_once_and_share_no_fanout(
    sched: Scheduler, account: ContactsAccount
):
    list_id = await account.import_list(range(450))
    events = [scheduled(list_ids=[list_id]) for _ in range(30)]
    for event in events:
        await sched.schedule(event, account.id)
    pollers = [sched.poller(limit=4), sched.poller(limit=4)]

    async def drain(poller: TimerPoller) -> int:
        fired = 0
        while n := await poller.fire_due():
            fired += n
        return fired

    counts = await asyncio.gather(*(drain(p) for p in pollers))
    assert sum(counts) == 30

    runners = [sched.runner() for _ in range(3)]

    async def work(runner: FanoutRunner) -> None:
        while await runner.run_one():
            pass

    await asyncio.gather(*(work(r) for r in runners))
    people = sorted(account.address(n) for n in range(450))
    for event in events:
        published = await sched.published(event.email_id)
        assert sum(isinstance(e, EmailFanoutStarted) for e in published) == 1
        assert sorted(await sched.recipients(event.email_id)) == people


async def test_reschedule_moves_the_timer_and_older_revisions_are_ignored(sched: Scheduler):
    email_id, account_id = uuid.uuid4(), uuid.uuid4()
    later = datetime.now(UTC) + timedelta(hours=1)
    await sched.schedule(scheduled(email_id=email_id, revision=2, send_at=later), account_id)
    # A stale revision (delivered late) does not bring the timer forward.
    await sched.schedule(scheduled(email_id=email_id, revision=1), account_id)
    assert await sched.poller().fire_due() == 0
    await sched.schedule(scheduled(email_id=email_id, revision=3), account_id)
    assert await sched.poller().fire_due() == 1


async def test_a_cancelled_timer_never_fires(sched: Scheduler):
    account_id = uuid.uuid4()
    event = scheduled(send_at=datetime.now(UTC) + timedelta(seconds=1))
    await sched.schedule(event, account_id)
    await sched.cancel(event.email_id, account_id, revision=2)
    # The original schedule delivered again (Kafka redelivery) does not revive it.
    await sched.schedule(event, account_id)
    await asyncio.sleep(1.1)
    assert await sched.poller().fire_due() == 0
    assert await sched.published(event.email_id) == []


async def test_cancelling_during_a_fanout_stops_it_before_the_next_batch(
    sched: Scheduler, account: ContactsAccount
):
    list_id = await account.import_list(range(1000))
    event = scheduled(list_ids=[list_id])
    await sched.schedule(event, account.id)
    await sched.poller().fire_due()
    paused = HangingTransport(hold_at=4)
    task = asyncio.create_task(sched.runner(transport=paused).run_one())
    await asyncio.wait_for(paused.held.wait(), 30)
    await sched.cancel(event.email_id, account.id, revision=2)
    paused.release.set()  # the page arrives after the cancellation: its batch must not go out
    assert await asyncio.wait_for(task, 30)
    sent = await sched.recipients(event.email_id)
    assert 0 < len(sent) < 1000
    ended = await sched.ended(event.email_id)
    assert [(e.outcome, e.total_recipients) for e in ended] == [("cancelled", len(sent))]
    assert not await sched.runner(lease=1).run_one()


async def test_a_contacts_outage_is_waited_out_and_a_refusal_fails_the_fanout(
    sched: Scheduler, account: ContactsAccount, platform: Stack
):
    list_id = await account.import_list(range(250))
    event = scheduled(list_ids=[list_id])
    await sched.schedule(event, account.id)
    await sched.poller().fire_due()
    runner = sched.runner()
    await platform.stop_service("contacts")
    try:
        # The outage gives the fan-out back (so the replica can go on with others) for a while.
        assert await runner.run_one()
        assert await sched.batches(event.email_id) == []
        async with sched.pool.acquire() as conn:
            progress = await conn.fetchrow(
                "SELECT state, attempts, last_error FROM fanouts WHERE email_id = $1",
                event.email_id,
            )
        assert progress is not None
        assert (progress["state"], progress["attempts"]) == ("running", 1)
        assert "/internal/recipients" in progress["last_error"]
        await platform.start_service("contacts")
        # The same replica takes the fan-out up again once contacts answers.
        deadline = asyncio.get_running_loop().time() + 90
        while not await sched.ended(event.email_id):
            assert asyncio.get_running_loop().time() < deadline
            await runner.run_one()
            await asyncio.sleep(0.05)
    finally:
        if "contacts" not in platform.services:
            await platform.start_service("contacts")
        await platform.wait_ready(90, ["contacts"])
    assert sorted(await sched.recipients(event.email_id)) == sorted(
        account.address(n) for n in range(250)
    )

    # Pages larger than contacts serves (5,000): it refuses, and asking again would not help.
    doomed = scheduled(list_ids=[list_id])
    await sched.schedule(doomed, account.id)
    await sched.poller().fire_due()
    assert await sched.runner(batch_size=5001).run_one()
    (ended,) = await sched.ended(doomed.email_id)
    assert ended.outcome == "failed"
    assert "422" in (ended.reason or "")
    assert await sched.batches(doomed.email_id) == []


async def test_a_fanout_crashing_again_and_again_still_hands_everyone_out_once(
    sched: Scheduler, account: ContactsAccount
):
    list_id = await account.import_list(range(5000))
    event = scheduled(list_ids=[list_id])
    await sched.schedule(event, account.id)
    await sched.poller().fire_due()
    crashes = 0
    for _ in range(300):
        task = asyncio.create_task(sched.runner(batch_size=100).run_one())
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
    # On a busy machine the crashes may come faster than pages: a replica left in peace then
    # finishes what the others left.
    for _ in range(10):
        async with sched.pool.acquire() as conn:
            if await conn.fetchval("SELECT state FROM fanouts") == "completed":
                break
        await sched.runner(batch_size=100).run_one()
    batches = await sched.batches(event.email_id)
    recipients = [r.email for b in batches for r in b.recipients]
    assert len(recipients) == len(set(recipients)) == 5000
    assert [b.batch_no for b in batches] == list(range(50))
    assert [e.total_recipients for e in await sched.ended(event.email_id)] == [5000]
