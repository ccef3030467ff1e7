"""Fan-out rate of the scheduler: recipients/s handed out for a 100,000-contact list.

Run: `.venv/bin/python bench/scheduler_fanout.py [--contacts 100000] [--batch-size 500]`.

It starts the embedded PostgreSQL and broker (or uses DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS),
serves the contacts service's internal recipients port from an in-process HTTP app over the
generated list (real HTTP and JSON, keyset pages), and measures in one run:

1. baseline, raw producer: the same DispatchBatch payloads sent straight to Kafka;
2. baseline, bare outbox: the same payloads inserted into the outbox, one transaction a batch;
3. the scheduler: a due timer fired, the audience fetched page by page over HTTP and written as
   batches with their progress (the real TimerPoller and FanoutRunner), then published by the
   outbox relay: recipients/s from the timer firing to the last batch acknowledged by Kafka.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response

from herald import db, migrations, outbox
from herald.devinfra.process import free_port
from herald.devinfra.stack import Stack, StackConfig
from herald.events import Envelope
from herald.events.campaign import Audience, EmailContent, EmailScheduled
from herald.events.scheduler import DispatchBatch, Recipient
from herald.kafka import create_producer
from herald.settings import BaseServiceSettings
from scheduler.contacts import ContactsClient
from scheduler.fanout import FanoutRunner, TimerPoller
from scheduler.handlers import when_email_scheduled_set_timer

CONTENT = EmailContent(
    subject="Hello {{ contact.first_name }}",
    html="<p>Hi {{ contact.first_name }}, your plan is {{ contact.attributes.plan }}.</p>" * 5,
    from_email="news@example.com",
)


def people(n: int) -> list[dict[str, Any]]:
    return [
        {
            "email": f"person{i:07d}@example.com",
            "contact_id": str(uuid.UUID(int=i + 1)),
            "first_name": f"First{i}",
            "last_name": f"Last{i}",
            "attributes": {"plan": "pro" if i % 3 else "free", "n": i},
        }
        for i in range(n)
    ]


def contacts_app(audience: list[dict[str, Any]]) -> FastAPI:
    """The contacts service's `/internal/recipients` over a fixed audience."""
    app = FastAPI()

    @app.post("/internal/recipients")
    async def recipients(request: Request) -> Response:
        body = orjson.loads(await request.body())
        start = int(body["after"]) if body["after"] else 0
        items = audience[start : start + int(body["limit"])]
        end = start + len(items)
        cursor = str(end) if end < len(audience) else None
        return Response(
            orjson.dumps({"items": items, "next_cursor": cursor}), media_type="application/json"
        )

    @app.post("/internal/suppressed")
    async def suppressed() -> dict[str, list[str]]:
        return {"suppressed": []}

    return app


@contextlib.asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event to wait on
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def infrastructure() -> AsyncIterator[tuple[str, str]]:
    if os.environ.get("DATABASE_URL") and os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["DATABASE_URL"], os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    data_dir = Path(tempfile.mkdtemp(prefix="herald-bench-"))
    os.chmod(data_dir, 0o755)  # noqa: S103 - readable by PostgreSQL's own user
    stack = Stack(
        StackConfig(
            data_dir=data_dir,
            pg_port=free_port(),
            broker_port=free_port(),
            sink_smtp_port=free_port(),
            sink_http_port=free_port(),
            durable=False,
            kafka_partitions=6,
        )
    )
    try:
        await stack.start_infrastructure()
        await stack.create_topics()
        yield stack.database_url, stack.kafka_bootstrap_servers
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


def batches(audience: list[dict[str, Any]], size: int) -> list[Envelope[DispatchBatch]]:
    email_id = uuid.uuid4()
    return [
        Envelope.wrap(
            DispatchBatch(
                email_id=email_id,
                batch_no=n,
                kind="campaign",
                content=CONTENT,
                recipients=[Recipient.model_validate(p) for p in audience[i : i + size]],
            ),
            account_id=uuid.uuid4(),
        )
        for n, i in enumerate(range(0, len(audience), size))
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
    dsn: str, settings: BaseServiceSettings, contacts_url: str, total: int, batch_size: int
) -> tuple[float, float]:
    schema = await fresh_schema(dsn)
    pool = await db.create_pool(dsn, schema=schema, max_size=4)
    producer = create_producer(settings)
    await producer.start()
    relay = outbox.OutboxRelay(dsn=dsn, schema=schema, producer=producer, poll_interval=0.2)
    relay_task = asyncio.create_task(relay.run())
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            contacts = ContactsClient(
                http, base_url=contacts_url, headers={"X-Internal-Token": "x"}
            )
            event = EmailScheduled(
                email_id=uuid.uuid4(),
                revision=1,
                send_at=datetime.now(UTC) - timedelta(seconds=1),
                kind="campaign",
                content=CONTENT,
                audience=Audience(list_ids=[uuid.uuid4()]),
            )
            async with pool.acquire() as conn, conn.transaction():
                await when_email_scheduled_set_timer(
                    Envelope.wrap(event, account_id=uuid.uuid4()), conn
                )
            runner = FanoutRunner(
                pool=pool, contacts=contacts, batch_size=batch_size, lease_seconds=60
            )
            started = time.perf_counter()
            assert await TimerPoller(pool=pool, poll_interval=0.1).fire_due() == 1
            assert await runner.run_one()
            written = time.perf_counter() - started
            async with pool.acquire() as conn:
                progress = await conn.fetchrow("SELECT state, total FROM fanouts")
                assert progress is not None
                assert tuple(progress) == ("completed", total), progress
                while await outbox.backlog(conn):  # noqa: ASYNC110 - the relay signals nothing
                    await asyncio.sleep(0.01)
            return written, time.perf_counter() - started
    finally:
        relay.stop()
        await relay_task
        await producer.stop()
        await pool.close()
        await drop_schema(dsn, schema)


async def main(total: int, batch_size: int) -> None:
    audience = people(total)
    async with infrastructure() as (dsn, kafka), serve(contacts_app(audience)) as contacts_url:
        settings = BaseServiceSettings(kafka_bootstrap_servers=kafka, database_url=dsn)
        envelopes = batches(audience, batch_size)
        size = sum(len(e.to_bytes()) for e in envelopes)
        print(
            f"{total} recipients in {len(envelopes)} batches of {batch_size} ({size / 1e6:.1f} MB)"
        )
        produced = await raw_producer(settings, envelopes)
        print(f"baseline raw producer:   {total / produced:10,.0f} recipients/s ({produced:.2f} s)")
        inserted = await bare_outbox(dsn, envelopes)
        print(f"baseline bare outbox:    {total / inserted:10,.0f} recipients/s ({inserted:.2f} s)")
        written, published = await scheduler_fanout(dsn, settings, contacts_url, total, batch_size)
        print(
            f"scheduler fan-out:       {total / written:10,.0f} recipients/s written"
            f" ({written:.2f} s)"
        )
        print(
            f"  … and published:       {total / published:10,.0f} recipients/s ({published:.2f} s)"
        )
        print(f"fan-out / bare outbox:   {inserted / written:10.2f}")
        print(f"published / raw producer:{produced / published:10.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()
    asyncio.run(main(args.contacts, args.batch_size))
