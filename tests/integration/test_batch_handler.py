"""A `BatchHandler` takes a batch's events of its type at once, with the inbox's guarantees: each
event's effect once, and a failing batch retried event by event. Against the real database."""

import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar, cast

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord

from herald import db as herald_db
from herald import migrations
from herald.consumer import BatchHandler, ConsumerRunner
from herald.db import Conn
from herald.devinfra.stack import Stack
from herald.events import Envelope, EventData, event
from herald.migrations import SHARED_MIGRATIONS, Migration
from herald.settings import BaseServiceSettings


@event
class Tallied(EventData):
    TYPE: ClassVar[str] = "test.tallied"
    TOPIC: ClassVar[str] = "test.tallied"

    thing_id: uuid.UUID
    fail: bool = False


SCHEMA_SQL = "CREATE TABLE tallies (thing_id uuid PRIMARY KEY, times int NOT NULL);"


class Calls:
    """The handler under test: counts each event's effect, and how it was called."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.singles = 0

    async def each(self, envelope: Envelope[Any], conn: Conn) -> None:
        self.singles += 1
        await self._tally(conn, [envelope])

    async def many(self, envelopes: Sequence[Envelope[Any]], conn: Conn) -> None:
        self.batches.append(len(envelopes))
        await self._tally(conn, envelopes)

    async def _tally(self, conn: Conn, envelopes: Sequence[Envelope[Any]]) -> None:
        if any(e.data.fail for e in envelopes):
            raise RuntimeError("this event always fails")
        await conn.executemany(
            """INSERT INTO tallies (thing_id, times) VALUES ($1, 1)
               ON CONFLICT (thing_id) DO UPDATE SET times = tallies.times + 1""",
            [(e.data.thing_id,) for e in envelopes],
        )


class DeadLetters:
    """Stands in for the producer: what was sent to a dead-letter topic."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send_and_wait(self, topic: str, *, value: bytes, **_: Any) -> None:
        self.sent.append(value)


@pytest.fixture
async def pool(infra: Stack, scratch_schema: str) -> AsyncIterator[asyncpg.Pool]:
    conn = await asyncpg.connect(infra.database_url)
    try:
        await migrations.migrate(
            conn,
            schema=scratch_schema,
            migrations=[
                *migrations.load("herald", SHARED_MIGRATIONS),
                Migration("test", 1, "tallies", SCHEMA_SQL),
            ],
        )
    finally:
        await conn.close()
    pool = await herald_db.create_pool(infra.database_url, schema=scratch_schema, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


def runner_for(infra: Stack, pool: asyncpg.Pool, calls: Calls, dlq: DeadLetters) -> ConsumerRunner:
    return ConsumerRunner(
        settings=BaseServiceSettings(
            service_name="test",
            database_url=infra.database_url,
            kafka_bootstrap_servers=infra.kafka_bootstrap_servers,
        ),
        pool=pool,
        producer=cast(AIOKafkaProducer, dlq),
        handlers={Tallied: [BatchHandler(each=calls.each, many=calls.many)]},
        max_attempts=2,
        retry_delay=0.01,
    )


def records(*envelopes: Envelope[Any]) -> list[tuple[ConsumerRecord, Envelope[Any]]]:
    return [
        (
            ConsumerRecord(
                Tallied.TOPIC, 0, offset, 0, 0, None, envelope.to_bytes(), None, 0, 0, ()
            ),
            envelope,
        )
        for offset, envelope in enumerate(envelopes)
    ]


async def times(pool: asyncpg.Pool, thing_id: uuid.UUID) -> int | None:
    value: int | None = await pool.fetchval(
        "SELECT times FROM tallies WHERE thing_id = $1", thing_id
    )
    return value


async def test_a_batch_is_handled_at_once_and_each_event_takes_effect_once(
    infra: Stack, pool: asyncpg.Pool
):
    calls, dlq = Calls(), DeadLetters()
    runner = runner_for(infra, pool, calls, dlq)
    things = [uuid.uuid4() for _ in range(4)]
    events = [Envelope.wrap(Tallied(thing_id=t), account_id=None) for t in things]

    assert await runner._handle_batch(Tallied.TOPIC, records(events[0]))
    # The first again (handled before), the second twice in one batch (a republished copy).
    assert await runner._handle_batch(Tallied.TOPIC, records(*events, events[1]))
    assert calls.batches == [3]
    assert calls.singles == 1
    assert [await times(pool, t) for t in things] == [1, 1, 1, 1]
    inbox = await pool.fetchval(
        "SELECT count(*) FROM inbox WHERE event_id = ANY($1::uuid[])", [e.id for e in events]
    )
    assert inbox == 4
    assert dlq.sent == []


async def test_a_failing_batch_is_retried_event_by_event(infra: Stack, pool: asyncpg.Pool):
    calls, dlq = Calls(), DeadLetters()
    runner = runner_for(infra, pool, calls, dlq)
    good, bad = uuid.uuid4(), uuid.uuid4()
    events = [
        Envelope.wrap(Tallied(thing_id=good), account_id=None),
        Envelope.wrap(Tallied(thing_id=bad, fail=True), account_id=None),
    ]

    assert await runner._handle_batch(Tallied.TOPIC, records(*events))
    assert calls.batches == [2]
    assert await times(pool, good) == 1
    assert await times(pool, bad) is None
    assert dlq.sent == [events[1].to_bytes()]
    claimed = await pool.fetch("SELECT event_id FROM inbox")
    assert {row["event_id"] for row in claimed} == {events[0].id}
