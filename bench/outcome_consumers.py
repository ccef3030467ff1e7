"""CPU per `email.dispatched` event in the campaign and tracking consumers: one by one against
batched.

Run: `.venv/bin/python bench/outcome_consumers.py [--events 5000] [--rounds 3]`.

It starts the embedded PostgreSQL (without fsync: CPU is measured, not the disk) with a campaign
and a tracking schema, queues an email to `--events` recipients in campaign (the fan-out total
already known), and feeds its `email.dispatched` events, as bytes from the wire, through
`ConsumerRunner._process` in partition batches of 500, as the consumer does after a fetch
(decode, one transaction per batch, inbox, handlers). 97% of recipients are sent, 3% failed,
and 2% have a deferral first; the last batch finishes the email. Per service, two handler
tables, alternately, `--rounds` times in one process:

- before, event by event: campaign's `when_message_dispatched_count_outcome` (an inbox insert,
  an outcome insert and a count update per event, a completion check per counted outcome), and
  tracking's `when_message_dispatched_record_outcome` (an inbox insert, the email's row and
  owner, the recipient's row locked and written, unmatched notifications looked up, the first
  send time and the roll-up changes, per event);
- after, the services' handler tables, where those are `BatchHandler`s: campaign has one inbox
  insert, one outcome insert with the count updates and a completion check per email, per
  batch; tracking locks the batch's recipient rows and looks up waiting notifications in one
  query each, applies the outcomes in order in memory and saves the rows in one statement.

Both run the same `herald.consumer` otherwise. Reported per event, lowest of the rounds: this
process's CPU, the CPU of the PostgreSQL backend serving it, and the wall time; then decoding
alone (the same in all).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import asyncpg
import psutil
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

import tracking.handlers
from campaign import handlers, store
from herald import db, migrations
from herald.consumer import ConsumerRunner, Handlers
from herald.devinfra.process import free_port
from herald.devinfra.stack import SERVICES, Stack, StackConfig
from herald.events import Envelope, decode
from herald.events.dispatcher import MessageDispatched
from herald.settings import BaseServiceSettings
from tracking import flows
from tracking.machine import Classifier

BATCH = 500
ACCOUNT = uuid.uuid4()
TOPIC = MessageDispatched.TOPIC

RULES = flows.Rules(classifier=Classifier(()), scanner_click_seconds=2.0)
# service -> variant -> the handler table its consumer runs.
VARIANTS: dict[str, dict[str, Handlers]] = {
    "campaign": {
        "before": {MessageDispatched: [handlers.when_message_dispatched_count_outcome]},
        "after": handlers.HANDLERS,
    },
    "tracking": {
        "before": {
            MessageDispatched: [
                functools.partial(
                    tracking.handlers.when_message_dispatched_record_outcome, rules=RULES
                )
            ]
        },
        "after": tracking.handlers.bind(RULES),
    },
}


@dataclass
class Measure:
    events: int
    wall: float
    cpu: float
    server_cpu: float

    def per_event(self, seconds: float) -> float:
        return seconds / self.events * 1e6


async def queued_email(pool: asyncpg.Pool, recipients: int) -> uuid.UUID:
    email_id = uuid.uuid4()
    async with pool.acquire() as conn, conn.transaction():
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
        now = datetime.now(UTC)
        await store.mark_queued(
            conn,
            email_id=email_id,
            status="queued",
            send_at=now,
            from_email="a@example.com",
            from_name=None,
            reply_to=None,
            day=now.date(),
            reserved=recipients,
        )
        await store.record_fanout(conn, email_id=email_id, total=recipients, reason=None)
    return email_id


def dispatched(email_id: uuid.UUID, recipients: int, seed: int) -> list[ConsumerRecord]:
    """The email's events as the dispatcher publishes them, one correlation id per 500."""
    rng = random.Random(seed)
    events: list[MessageDispatched] = []
    for n in range(recipients):
        recipient = f"r{n}@example.com"
        message_id = f"<{uuid.uuid4()}@bench>"
        if rng.random() < 0.02:
            events.append(_outcome(email_id, message_id, recipient, "deferred", 1))
        status = "failed" if rng.random() < 0.03 else "sent"
        events.append(_outcome(email_id, message_id, recipient, status, 1))
    key = str(email_id).encode()
    return [
        ConsumerRecord(
            topic=TOPIC,
            partition=0,
            offset=offset,
            timestamp=0,
            timestamp_type=0,
            key=key,
            value=Envelope.wrap(
                data, account_id=ACCOUNT, correlation_id=f"c{offset // BATCH}"
            ).to_bytes(),
            checksum=None,
            serialized_key_size=len(key),
            serialized_value_size=0,
            headers=(),
        )
        for offset, data in enumerate(events)
    ]


def _outcome(
    email_id: uuid.UUID, message_id: str, recipient: str, status: str, attempt: int
) -> MessageDispatched:
    return MessageDispatched(
        email_id=email_id,
        message_id=message_id,
        recipient=recipient,
        status=cast(Any, status),
        attempt=attempt,
        smtp_code=250 if status == "sent" else 550,
        smtp_reply="2.0.0 Ok: queued" if status == "sent" else "5.1.1 no such user",
    )


async def consume(
    runner: ConsumerRunner, pool: asyncpg.Pool, records: list[ConsumerRecord]
) -> Measure:
    backend = psutil.Process(await pool.fetchval("SELECT pg_backend_pid()"))
    tp = TopicPartition(TOPIC, 0)
    server, cpu, started = backend.cpu_times(), time.process_time(), time.perf_counter()
    for start in range(0, len(records), BATCH):
        assert await runner._process(tp, records[start : start + BATCH])
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    after = backend.cpu_times()
    server_cpu = (after.user + after.system) - (server.user + server.system)
    return Measure(len(records), wall, cpu, server_cpu)


async def check(
    service: str, pool: asyncpg.Pool, email_id: uuid.UUID, records: list[ConsumerRecord]
) -> None:
    """The email's counts say what its events said, whichever way they were handled."""
    finals = [decode(r.value).data for r in records]
    sent = sum(1 for d in finals if d.status == "sent")
    failed = sum(1 for d in finals if d.status == "failed")
    if service == "campaign":
        async with pool.acquire() as conn:
            row = await store.get_email(conn, account_id=ACCOUNT, email_id=email_id)
        assert row is not None
        got = (row["status"], row["sent_count"], row["failed_count"])
        assert got == ("sent", sent, failed), (got, sent, failed)
    else:
        rows = await pool.fetch(
            "SELECT status, count(*) AS n FROM recipients WHERE email_id = $1 GROUP BY status",
            email_id,
        )
        assert {r["status"]: r["n"] for r in rows} == {"sent": sent, "failed": failed}, rows


async def main(events: int, rounds: int) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="herald-bench-"))
    data_dir.chmod(0o755)  # readable by PostgreSQL's own user
    stack = Stack(
        StackConfig(
            data_dir=data_dir,
            service_ports={s: free_port() for s in SERVICES},
            smtp_url="smtp://127.0.0.1:1",  # no mail here: no sink either
            pg_port=free_port(),
            broker_port=free_port(),
            durable=False,
        )
    )
    measures: dict[tuple[str, str], list[Measure]] = {}
    try:
        await stack.start_infrastructure()
        schemas = {service: f"bench_{service}_{uuid.uuid4().hex[:8]}" for service in VARIANTS}
        conn = await asyncpg.connect(stack.database_url)
        try:
            for service, schema in schemas.items():
                await migrations.migrate(
                    conn, schema=schema, migrations=migrations.migrations_for(service)
                )
        finally:
            await conn.close()
        for service, variants in VARIANTS.items():
            schema = schemas[service]
            settings = BaseServiceSettings(
                service_name=service,
                database_url=stack.database_url,
                kafka_bootstrap_servers=stack.kafka_bootstrap_servers,
            )
            # One connection, so the backend whose CPU is read is the one doing the work.
            pool = await db.create_pool(
                stack.database_url, schema=schema, min_size=1, max_size=1, max_queries=10**9
            )
            # Campaign's schema holds the emails the events are about.
            emails = await db.create_pool(
                stack.database_url, schema=schemas["campaign"], max_size=1
            )
            try:
                runners = {
                    name: ConsumerRunner(
                        settings=settings,
                        pool=pool,
                        producer=cast(AIOKafkaProducer, None),  # nothing is dead-lettered here
                        handlers=table,
                    )
                    for name, table in variants.items()
                }
                for runner in runners.values():
                    warm_id = await queued_email(emails, 2 * BATCH)
                    await consume(runner, pool, dispatched(warm_id, BATCH, seed=0))
                for n in range(rounds):
                    # Alternate which goes first, so that a drift of the machine weighs on both.
                    order = ("before", "after") if n % 2 == 0 else ("after", "before")
                    for name in order:
                        email_id = await queued_email(emails, events)
                        records = dispatched(email_id, events, seed=n)
                        measure = await consume(runners[name], pool, records)
                        await check(service, pool, email_id, records)
                        measures.setdefault((service, name), []).append(measure)
                        print(
                            f"  round {n + 1} {service} {name:6}:"
                            f" {measure.per_event(measure.cpu):6.1f} us CPU,"
                            f" {measure.per_event(measure.server_cpu):6.1f} us PostgreSQL CPU,"
                            f" {measure.per_event(measure.wall):6.1f} us wall per event",
                            flush=True,
                        )
            finally:
                await emails.close()
                await pool.close()
        sample = dispatched(uuid.uuid4(), BATCH, seed=0)
        cpu = time.process_time()
        for _ in range(10):
            for record in sample:
                decode(record.value)
        decode_us = (time.process_time() - cpu) / (10 * len(sample)) * 1e6
    finally:
        await stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)

    def best(service: str, name: str) -> Measure:
        return min(measures[service, name], key=lambda m: m.cpu / m.events)

    print(
        f"email.dispatched, {events} recipients of one email ({events * 1.02:.0f} events),"
        f" batches of {BATCH}, best of {rounds}:"
    )
    for service in VARIANTS:
        before, after = best(service, "before"), best(service, "after")
        for name, m in (("before", before), ("after", after)):
            print(
                f"  {service} {name:6}: {m.per_event(m.cpu):6.1f} us CPU +"
                f" {m.per_event(m.server_cpu):6.1f} us PostgreSQL CPU,"
                f" {m.per_event(m.wall):6.1f} us wall per event ({m.events / m.wall:6.0f} events/s)"
            )
        print(
            f"  {service} ratio after/before: CPU {after.cpu / before.cpu:.2f}, PostgreSQL CPU"
            f" {after.server_cpu / before.server_cpu:.2f}, wall {after.wall / before.wall:.2f}"
        )
    print(f"  of which decoding an event (all): {decode_us:.1f} us CPU")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    asyncio.run(main(options.events, options.rounds))
