"""CPU of the outbox relay per event: the per-record path it had against batches per partition.

Run: `.venv/bin/python bench/outbox_publish.py [--events 50000] [--rounds 2]`.

It starts the embedded PostgreSQL (without fsync: the relay's own CPU is measured, not the
disk's) and broker, writes `--events` outbox rows (`email.dispatched` events, as the dispatcher
writes them: one correlation id per 500), and lets a relay publish them all, timing its process:

- before: the relay as it was, kept here: `pending` decoding each row's headers, `publish`
  awaiting `producer.send` per row (aiokafka's pure-Python murmur2 per record, a future each) and
  counting each row, on a producer with aiokafka's default partitioner;
- after: `herald.outbox` as it is, on `create_producer`'s producer.

Two key mixes: `shared`, 100 emails' results (a key is seen again and again, as in a campaign),
and `distinct`, a key per event (as for sign-ups; more keys than the partitioner remembers).
Both paths run alternately, `--rounds` times, in one process; the lower CPU of each is kept.
The relay's CPU includes its database round trips (`pending`, `mark_published`), the same in
both. Then `publish` alone on 1,000 fetched rows, and the cost of mapping a key to a partition.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
import timeit
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from aiokafka.structs import RecordMetadata

from herald import db, migrations, outbox, partitioning
from herald.db import Conn
from herald.devinfra.process import free_port
from herald.devinfra.stack import SERVICES, Stack, StackConfig
from herald.events import Envelope
from herald.events.dispatcher import MessageDispatched
from herald.kafka import client_options, create_producer
from herald.metrics import EVENTS_PUBLISHED, OUTBOX_BACKLOG
from herald.migrations import SHARED_MIGRATIONS
from herald.settings import BaseServiceSettings

RELAY_BATCH = 1000
PER_CORRELATION = 500


# ---- the relay's path before: kept as it was, as the baseline --------------------------------


def per_record_producer(settings: BaseServiceSettings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **client_options(settings),
        acks="all",
        enable_idempotence=settings.kafka_idempotent_producer,
        linger_ms=5,
        max_batch_size=256 * 1024,
        request_timeout_ms=15000,
    )


async def per_record_pending(conn: Conn, *, limit: int) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            """SELECT seq, topic, key, payload, headers FROM outbox
               WHERE published_at IS NULL ORDER BY seq LIMIT $1""",
            limit,
        )
    )


async def per_record_publish(
    producer: AIOKafkaProducer, rows: Sequence[asyncpg.Record]
) -> list[RecordMetadata]:
    futures = []
    for row in rows:
        headers = [(name, str(value).encode()) for name, value in row["headers"]]
        futures.append(
            await producer.send(row["topic"], value=row["payload"], key=row["key"], headers=headers)
        )
    acks: list[RecordMetadata] = await asyncio.gather(*futures)
    for row in rows:
        EVENTS_PUBLISHED.labels(row["topic"]).inc()
    return acks


class PerRecordRelay(outbox.OutboxRelay):
    """`OutboxRelay.relay_once` as it was."""

    async def relay_once(self, conn: Conn) -> int:
        self._wake.clear()
        rows = await per_record_pending(conn, limit=self._batch_size)
        if rows:
            acks = await per_record_publish(self._producer, rows)
            await outbox.mark_published(conn, seqs=[r["seq"] for r in rows], acks=acks)
            went_back = self._note(acks)
            if went_back:
                await self._recover(conn, went_back, "an acknowledgement")
        OUTBOX_BACKLOG.set(await outbox.backlog(conn) if len(rows) == self._batch_size else 0)
        return len(rows)


# ---- the measurement ----------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    make_producer: Callable[[BaseServiceSettings], AIOKafkaProducer]
    relay: type[outbox.OutboxRelay]
    pending: Callable[..., Awaitable[list[asyncpg.Record]]]
    publish: Callable[[AIOKafkaProducer, Sequence[asyncpg.Record]], Awaitable[Any]]


BEFORE = Variant(
    "before", per_record_producer, PerRecordRelay, per_record_pending, per_record_publish
)
AFTER = Variant("after", create_producer, outbox.OutboxRelay, outbox.pending, outbox.publish)


@dataclass
class Measure:
    events: int
    seconds: float
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu_seconds / self.events * 1e6


def envelopes(count: int, mix: str) -> list[Envelope[MessageDispatched]]:
    emails = [uuid.uuid4() for _ in range(100 if mix == "shared" else count)]
    account = uuid.uuid4()
    correlation = uuid.uuid4().hex
    return [
        Envelope.wrap(
            MessageDispatched(
                email_id=emails[i % len(emails)],
                message_id=f"<{uuid.uuid4().hex}@herald.example>",
                recipient=f"reader{i}@bench.example",
                contact_id=uuid.uuid4(),
                status="sent",
                attempt=1,
                smtp_code=250,
                smtp_reply="2.0.0 Ok: queued as 4BcD1234",
            ),
            account_id=account,
            correlation_id=f"{correlation}-{i // PER_CORRELATION}",
        )
        for i in range(count)
    ]


async def fill(conn: Conn, count: int, mix: str) -> None:
    batch = envelopes(count, mix)
    for start in range(0, count, 5000):
        async with conn.transaction():
            await outbox.write_many(conn, batch[start : start + 5000])


async def relay_all(
    variant: Variant, settings: BaseServiceSettings, conn: Conn, schema: str, count: int
) -> Measure:
    """Time a relay publishing every pending row, as its leader loop does."""
    producer = variant.make_producer(settings)
    await producer.start()
    try:
        relay = variant.relay(dsn=settings.database_url, schema=schema, producer=producer)
        # Metadata fetched and connections open before timing, as in a running service.
        await producer.send_and_wait(MessageDispatched.TOPIC, b"warm", key=b"warm")
        cpu, started = time.process_time(), time.perf_counter()
        published = 0
        while published < count:
            published += await relay.relay_once(conn)
        return Measure(published, time.perf_counter() - started, time.process_time() - cpu)
    finally:
        await producer.stop()


async def publish_alone(
    variant: Variant, settings: BaseServiceSettings, conn: Conn, times: int
) -> Measure:
    """`publish` of the same 1,000 fetched rows again and again (nothing marked)."""
    await fill(conn, RELAY_BATCH, "shared")
    producer = variant.make_producer(settings)
    await producer.start()
    try:
        rows = await variant.pending(conn, limit=RELAY_BATCH)
        await variant.publish(producer, rows)
        cpu, started = time.process_time(), time.perf_counter()
        for _ in range(times):
            await variant.publish(producer, rows)
        seconds, spent = time.perf_counter() - started, time.process_time() - cpu
        return Measure(len(rows) * times, seconds, spent)
    finally:
        await producer.stop()
        await conn.execute("DELETE FROM outbox")


def key_costs() -> list[tuple[str, float]]:
    """Microseconds to map one UUID key to one of 6 partitions, by each means at hand."""
    key = str(uuid.uuid4()).encode()
    partitions = list(range(6))
    ways: list[tuple[str, Callable[[], object]]] = [
        ("aiokafka murmur2 (pure Python)", lambda: (aiokafka_murmur2(key) & 0x7FFFFFFF) % 6),
        ("herald.partitioning.murmur2", lambda: (partitioning.murmur2(key) & 0x7FFFFFFF) % 6),
        ("herald.partitioning, key cached", lambda: partitioning.partition_for(key, partitions)),
    ]
    try:  # librdkafka's C murmur2 (a dev dependency only); the same mapping
        from confluent_kafka import murmur2 as librdkafka_murmur2

        ways.append(("confluent-kafka murmur2 (C)", lambda: librdkafka_murmur2(key, 6)))
    except ImportError:
        pass
    return [
        (name, min(timeit.repeat(way, number=20000, repeat=3)) / 20000 * 1e6) for name, way in ways
    ]


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
            kafka_partitions=6,
        )
    )
    relayed: dict[tuple[str, str], list[Measure]] = {}
    alone: dict[str, list[Measure]] = {}
    try:
        await stack.start_infrastructure()
        await stack.create_topics()
        schema = f"bench_{uuid.uuid4().hex[:10]}"
        conn = await asyncpg.connect(stack.database_url)
        try:
            await migrations.migrate(
                conn, schema=schema, migrations=migrations.load("herald", SHARED_MIGRATIONS)
            )
        finally:
            await conn.close()
        settings = BaseServiceSettings(
            service_name="bench",
            database_url=stack.database_url,
            kafka_bootstrap_servers=stack.kafka_bootstrap_servers,
        )
        conn = await db.connect(stack.database_url, schema=schema)
        try:
            for n in range(rounds):
                # Alternate which goes first, so that a drift of the machine weighs on both.
                order = (BEFORE, AFTER) if n % 2 == 0 else (AFTER, BEFORE)
                for mix in ("shared", "distinct"):
                    for variant in order:
                        await fill(conn, events, mix)
                        measure = await relay_all(variant, settings, conn, schema, events)
                        relayed.setdefault((mix, variant.name), []).append(measure)
                        print(
                            f"  round {n + 1} {mix:8} {variant.name:6}: {measure.rate:7.0f} "
                            f"events/s, {measure.cpu_us:5.1f} us CPU each",
                            flush=True,
                        )
                        await conn.execute("DELETE FROM outbox")
                for variant in order:
                    times = max(events // RELAY_BATCH, 1)
                    alone.setdefault(variant.name, []).append(
                        await publish_alone(variant, settings, conn, times)
                    )
        finally:
            await conn.close()
    finally:
        await stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)

    def best(measures: list[Measure]) -> Measure:
        return min(measures, key=lambda m: m.cpu_seconds / m.events)

    print(f"outbox relay, {events} email.dispatched rows, 6 partitions, best of {rounds}:")
    for mix in ("shared", "distinct"):
        before, after = best(relayed[mix, "before"]), best(relayed[mix, "after"])
        print(
            f"  {mix:8} keys: before {before.rate:6.0f} events/s, {before.cpu_us:5.1f} us CPU; "
            f"after {after.rate:6.0f} events/s, {after.cpu_us:5.1f} us CPU; "
            f"CPU ratio after/before {after.cpu_us / before.cpu_us:.2f}, "
            f"rate ratio {after.rate / before.rate:.2f}"
        )
    before, after = best(alone["before"]), best(alone["after"])
    print(
        f"  publish() alone, 1000 rows (shared keys): before {before.cpu_us:.1f} us CPU each, "
        f"after {after.cpu_us:.1f} us; ratio {after.cpu_us / before.cpu_us:.2f}"
    )
    print("a UUID key to one of 6 partitions:")
    for name, micros in key_costs():
        print(f"  {name:34} {micros:6.2f} us")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50000)
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args()
    asyncio.run(main(options.events, options.rounds))
