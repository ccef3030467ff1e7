"""Fan-out rate of the scheduler: recipients/s handed out for a 100,000-contact list.

Run: `.venv/bin/python bench/scheduler_fanout.py [--contacts 100000] [--batch-size 500]`.

It starts the embedded PostgreSQL and broker, the auth and contacts services as processes, and
imports the list through the contacts API (CSV upload with `list_id`); 100
members then unsubscribe by their one-click link. The fan-out resolves that list through the
real contacts service (`/internal/recipients` over HTTP, keyset pages). Measured in one run:

1. baseline, bare outbox: the same DispatchBatch payloads inserted into the outbox, one
   transaction a batch (what the fan-out writes, without resolving anybody);
2. baseline, contacts paging: the same pages of the list asked of the contacts service alone;
3. baseline, raw producer: the same payloads sent straight to Kafka;
4. the scheduler: a due timer fired, the audience fetched page by page from contacts and written
   as batches with their progress (the real TimerPoller and FanoutRunner), then published by the
   outbox relay: recipients/s from the timer firing to the last batch acknowledged by Kafka.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx

from auth.tokens import SigningKey, issue_access_token
from herald import db, migrations, outbox
from herald.devinfra.process import free_port
from herald.devinfra.stack import SERVICES, Stack, StackConfig
from herald.events import Envelope
from herald.events.campaign import Audience, EmailContent, EmailScheduled
from herald.events.scheduler import DispatchBatch, Recipient
from herald.kafka import create_producer
from herald.links import LinkSigner, UnsubscribeToken
from herald.settings import BaseServiceSettings
from scheduler.contacts import ContactsClient
from scheduler.fanout import FanoutRunner, TimerPoller
from scheduler.handlers import when_email_scheduled_set_timer

CONTENT = EmailContent(
    subject="Hello {{ contact.first_name }}",
    html="<p>Hi {{ contact.first_name }}, your plan is {{ contact.attributes.plan }}.</p>" * 5,
    from_email="news@example.com",
)
UNSUBSCRIBED = 100


def address(i: int) -> str:
    return f"person{i:07d}@example.com"


def write_csv(path: Path, total: int) -> None:
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write("email,first_name,last_name,plan\r\n")
        for i in range(total):
            out.write(f"{address(i)},First{i},Last{i},{'pro' if i % 3 else 'free'}\r\n")


class Platform:
    """The stack, and an account whose list was imported through the contacts API."""

    def __init__(self, stack: Stack, account_id: uuid.UUID, list_id: uuid.UUID) -> None:
        self.stack = stack
        self.account_id = account_id
        self.list_id = list_id

    def contacts(self, http: httpx.AsyncClient) -> ContactsClient:
        return ContactsClient(
            http,
            base_url=self.stack.url("contacts"),
            headers={"X-Internal-Token": self.stack.secrets["INTERNAL_TOKEN"]},
        )


async def import_list(stack: Stack, account_id: uuid.UUID, total: int) -> tuple[uuid.UUID, float]:
    """A list of `total` contacts imported by CSV, less UNSUBSCRIBED who unsubscribed."""
    key = SigningKey.from_pem(stack.secrets["JWT_PRIVATE_KEY"])
    token = issue_access_token(
        key,
        user_id=account_id,
        role="user",
        issuer="herald",
        audience="herald-api",
        ttl_seconds=3600,
    ).token
    headers = {"Authorization": f"Bearer {token}"}
    csv_path = stack.config.data_dir / "list.csv"
    await asyncio.to_thread(write_csv, csv_path, total)
    async with httpx.AsyncClient(base_url=stack.url("contacts"), timeout=600) as client:
        created = await client.post("/lists", json={"name": "bench"}, headers=headers)
        created.raise_for_status()
        list_id = uuid.UUID(created.json()["id"])
        started = time.perf_counter()
        with csv_path.open("rb") as file:
            response = await client.post(
                "/contacts/import",
                headers=headers,
                files={"file": ("list.csv", file, "text/csv")},
                data={"list_id": str(list_id)},
            )
        response.raise_for_status()
        job_id = response.json()["job_id"]
        while True:
            job = (await client.get(f"/contacts/import/{job_id}", headers=headers)).json()
            if job["status"] in ("succeeded", "failed"):
                break
            await asyncio.sleep(0.2)
        if job["status"] != "succeeded" or job["created"] != total:
            raise SystemExit(f"import failed: {job}")
        imported = time.perf_counter() - started
        signer = LinkSigner.from_spec(stack.secrets["LINK_SIGNING_KEYS"])
        for i in range(0, total, max(total // UNSUBSCRIBED, 1))[:UNSUBSCRIBED]:
            link = signer.sign("unsubscribe", UnsubscribeToken(a=account_id, r=address(i)))
            answer = await client.post(
                f"/unsubscribe/{link}",
                content=b"List-Unsubscribe=One-Click",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            answer.raise_for_status()
    return list_id, imported


@contextlib.asynccontextmanager
async def platform(total: int) -> AsyncIterator[tuple[Platform, float]]:
    data_dir = Path(tempfile.mkdtemp(prefix="herald-bench-"))
    data_dir.chmod(0o755)  # readable by PostgreSQL's own user
    stack = Stack(
        StackConfig(
            data_dir=data_dir,
            service_ports={s: free_port() for s in SERVICES},
            pg_port=free_port(),
            broker_port=free_port(),
            sink_smtp_port=free_port(),
            sink_http_port=free_port(),
            durable=False,
            kafka_partitions=6,
            env={"CONTACTS_IMPORT_DIR": str(data_dir / "imports")},
        )
    )
    try:
        await stack.start_infrastructure()
        await asyncio.gather(stack.create_topics(), stack.migrate())
        for name in ("auth", "contacts"):
            await stack.start_service(name)
        await stack.wait_ready(90, ["auth", "contacts"])
        account_id = uuid.uuid4()
        list_id, imported = await import_list(stack, account_id, total)
        yield Platform(stack, account_id, list_id), imported
    finally:
        await stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


async def fresh_schema(dsn: str) -> str:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(dsn)
    try:
        await migrations.migrate(
            conn, schema=schema, migrations=migrations.migrations_for("scheduler")
        )
    finally:
        await conn.close()
    return schema


async def drop_schema(dsn: str, schema: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await conn.close()


async def resolved(where: Platform, batch_size: int) -> tuple[list[Recipient], float]:
    """The list's active members as contacts serves them page by page, and the seconds taken."""
    members: list[Recipient] = []
    cursor: str | None = None
    async with httpx.AsyncClient(timeout=60) as http:
        contacts = where.contacts(http)
        started = time.perf_counter()
        while True:
            page = await contacts.recipients(
                account_id=where.account_id,
                list_ids=[where.list_id],
                contact_ids=[],
                after=cursor,
                limit=batch_size,
            )
            members += page.items
            if page.next_cursor is None:
                return members, time.perf_counter() - started
            cursor = page.next_cursor


def batches(members: list[Recipient], size: int) -> list[Envelope[DispatchBatch]]:
    email_id = uuid.uuid4()
    return [
        Envelope.wrap(
            DispatchBatch(
                email_id=email_id,
                batch_no=n,
                kind="campaign",
                content=CONTENT,
                recipients=members[i : i + size],
            ),
            account_id=uuid.uuid4(),
        )
        for n, i in enumerate(range(0, len(members), size))
    ]


async def raw_producer(
    settings: BaseServiceSettings, envelopes: list[Envelope[DispatchBatch]]
) -> float:
    producer = create_producer(settings)
    await producer.start()
    try:
        payloads = [(e.to_bytes(), e.data.partition_key().encode()) for e in envelopes]
        started = time.perf_counter()
        futures = [await producer.send("email.dispatch", value=v, key=k) for v, k in payloads]
        await asyncio.gather(*futures)
        return time.perf_counter() - started
    finally:
        await producer.stop()


async def bare_outbox(dsn: str, envelopes: list[Envelope[DispatchBatch]]) -> float:
    schema = await fresh_schema(dsn)
    pool = await db.create_pool(dsn, schema=schema)
    try:
        started = time.perf_counter()
        for envelope in envelopes:
            async with pool.acquire() as conn, conn.transaction():
                await outbox.write(conn, envelope)
        return time.perf_counter() - started
    finally:
        await pool.close()
        await drop_schema(dsn, schema)


async def scheduler_fanout(
    where: Platform, settings: BaseServiceSettings, expected: int, batch_size: int
) -> tuple[float, float]:
    """(seconds until every batch was written, seconds until Kafka acknowledged the last)."""
    dsn = where.stack.database_url
    schema = await fresh_schema(dsn)
    pool = await db.create_pool(dsn, schema=schema, max_size=4)
    producer = create_producer(settings)
    await producer.start()
    relay = outbox.OutboxRelay(dsn=dsn, schema=schema, producer=producer, poll_interval=0.2)
    relay_task = asyncio.create_task(relay.run())
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            event = EmailScheduled(
                email_id=uuid.uuid4(),
                revision=1,
                send_at=datetime.now(UTC) - timedelta(seconds=1),
                kind="campaign",
                content=CONTENT,
                audience=Audience(list_ids=[where.list_id]),
            )
            async with pool.acquire() as conn, conn.transaction():
                await when_email_scheduled_set_timer(
                    Envelope.wrap(event, account_id=where.account_id), conn
                )
            runner = FanoutRunner(
                pool=pool, contacts=where.contacts(http), batch_size=batch_size, lease_seconds=60
            )
            started = time.perf_counter()
            assert await TimerPoller(pool=pool, poll_interval=0.1).fire_due() == 1
            assert await runner.run_one()
            written = time.perf_counter() - started
            async with pool.acquire() as conn:
                progress = await conn.fetchrow("SELECT state, total FROM fanouts")
                assert progress is not None
                assert tuple(progress) == ("completed", expected), progress
                while await outbox.backlog(conn):  # noqa: ASYNC110 - the relay signals nothing
                    await asyncio.sleep(0.01)
            return written, time.perf_counter() - started
    finally:
        relay.stop()
        await relay_task
        await producer.stop()
        await pool.close()
        await drop_schema(dsn, schema)


def rate(what: str, recipients: int, seconds: float) -> None:
    print(f"{what:<34}{recipients / seconds:10,.0f} recipients/s ({seconds:.2f} s)")


async def main(total: int, batch_size: int) -> None:
    async with platform(total) as (where, imported):
        print(f"{total:,} contacts imported through the contacts API in {imported:.1f} s")
        dsn = where.stack.database_url
        settings = BaseServiceSettings(
            kafka_bootstrap_servers=where.stack.kafka_bootstrap_servers, database_url=dsn
        )
        members, paged = await resolved(where, batch_size)
        active = len(members)
        assert active == total - UNSUBSCRIBED, active
        envelopes = batches(members, batch_size)
        size = sum(len(e.to_bytes()) for e in envelopes)
        print(
            f"{active:,} active members ({UNSUBSCRIBED} unsubscribed) in {len(envelopes)} batches"
            f" of {batch_size} ({size / 1e6:.1f} MB)"
        )
        rate("baseline, bare outbox insert:", active, inserted := await bare_outbox(dsn, envelopes))
        rate("baseline, contacts paging alone:", active, paged)
        rate("baseline, raw producer:", active, produced := await raw_producer(settings, envelopes))
        written, published = await scheduler_fanout(where, settings, active, batch_size)
        rate("scheduler fan-out, written:", active, written)
        rate("  … and published to Kafka:", active, published)
        print(f"fan-out / bare outbox insert:     {inserted / written:10.2f}")
        print(f"fan-out / (paging + outbox):      {(paged + inserted) / written:10.2f}")
        print(f"published / raw producer:         {produced / published:10.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()
    asyncio.run(main(args.contacts, args.batch_size))
