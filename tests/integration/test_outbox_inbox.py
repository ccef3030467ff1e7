"""The event path every service relies on: outbox -> Kafka -> consumer -> inbox, at least once
on the wire and exactly once in effect, against the real database and broker."""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from herald import db as herald_db
from herald import migrations, outbox
from herald.consumer import ConsumerRunner, Handler
from herald.db import Conn
from herald.devinfra.stack import Stack
from herald.events import Envelope, EventData, event
from herald.kafka import create_producer, ensure_topics
from herald.migrations import SHARED_MIGRATIONS, Migration
from herald.settings import BaseServiceSettings


@event
class Pinged(EventData):
    TYPE: ClassVar[str] = "test.pinged"
    TOPIC: ClassVar[str] = "test.pinged"

    thing_id: uuid.UUID
    fail: bool = False

    def partition_key(self) -> str:
        return str(self.thing_id)


SCHEMA_SQL = """
CREATE TABLE things (id uuid PRIMARY KEY);
CREATE TABLE effects (thing_id uuid PRIMARY KEY, times int NOT NULL);
"""


class Service:
    """A throwaway service: its own schema, pool and producer, like a real one."""

    def __init__(self, stack: Stack, schema: str, *, kafka: str | None = None) -> None:
        self.settings = BaseServiceSettings(
            service_name=schema,
            database_url=stack.database_url,
            kafka_bootstrap_servers=kafka or stack.kafka_bootstrap_servers,
            kafka_partitions=3,
            kafka_session_timeout_ms=2000,
        )
        self.schema = schema
        self.pool: asyncpg.Pool
        self.producer: AIOKafkaProducer
        self.tasks: list[tuple[Callable[[], None], asyncio.Task[None]]] = []

    async def start(self) -> None:
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            await migrations.migrate(
                conn,
                schema=self.schema,
                migrations=[
                    *migrations.load("herald", SHARED_MIGRATIONS),
                    Migration("test", 1, "things", SCHEMA_SQL),
                ],
            )
        finally:
            await conn.close()
        await ensure_topics(self.settings, ["test.pinged", "test.pinged.dlq"])
        self.pool = await herald_db.create_pool(self.settings.database_url, schema=self.schema)
        self.producer = create_producer(self.settings)
        await self.producer.start()

    def relay(self, poll_interval: float = 0.2, **options: Any) -> outbox.OutboxRelay:
        relay = outbox.OutboxRelay(
            dsn=self.settings.database_url,
            schema=self.schema,
            producer=self.producer,
            poll_interval=poll_interval,
            **options,
        )
        self.tasks.append((relay.stop, asyncio.create_task(relay.run())))
        return relay

    def consume(self, handler: Handler, group_id: str | None = None) -> ConsumerRunner:
        runner = ConsumerRunner(
            settings=self.settings,
            pool=self.pool,
            producer=self.producer,
            handlers={Pinged: [handler]},
            group_id=group_id or f"g-{self.schema}",
            max_attempts=2,
            retry_delay=0.01,
        )
        self.tasks.append((runner.stop, asyncio.create_task(runner.run())))
        return runner

    async def emit(self, thing_id: uuid.UUID, *, fail: bool = False) -> Envelope[Pinged]:
        """Change state and write the event in one transaction, as services do."""
        envelope = Envelope.wrap(Pinged(thing_id=thing_id, fail=fail), account_id=None)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO things (id) VALUES ($1)", thing_id)
            await outbox.write(conn, envelope)
        return envelope

    async def times_applied(self, thing_id: uuid.UUID) -> int | None:
        value: int | None = await self.pool.fetchval(
            "SELECT times FROM effects WHERE thing_id = $1", thing_id
        )
        return value

    async def stop(self) -> None:
        for stop, task in self.tasks:
            stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 15)
        await self.producer.stop()
        await self.pool.close()


async def count_effect(envelope: Envelope[Any], conn: Conn) -> None:
    """The effect under test: counts how often it ran (exactly once is the goal)."""
    if envelope.data.fail:
        raise RuntimeError("this event always fails")
    await conn.execute(
        """INSERT INTO effects (thing_id, times) VALUES ($1, 1)
           ON CONFLICT (thing_id) DO UPDATE SET times = effects.times + 1""",
        envelope.data.thing_id,
    )


@pytest.fixture
async def service(infra: Stack, scratch_schema: str) -> AsyncIterator[Service]:
    svc = Service(infra, scratch_schema)
    await svc.start()
    yield svc
    await svc.stop()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def read_topic(stack: Stack, topic: str, want: Callable[[Any], bool]) -> list[Any]:
    """All records of `topic` so far that satisfy `want`."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=stack.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    try:
        partitions = consumer.assignment()
        while not partitions:
            await asyncio.sleep(0.05)
            partitions = consumer.assignment()
        end = await consumer.end_offsets(list(partitions))
        found = []
        while [tp for tp in partitions if await consumer.position(tp) < end[tp]]:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                found += [r for r in records if want(r)]
        return found
    finally:
        await consumer.stop()


async def test_relay_killed_between_publish_and_mark_still_yields_one_effect(service: Service):
    thing = uuid.uuid4()
    envelope = await service.emit(thing)

    # A relay that published and then died before marking the row: the row is still pending.
    async with service.pool.acquire() as conn:
        rows = await outbox.pending(conn, limit=10)
        await outbox.publish(service.producer, rows)
    assert [r["payload"] for r in rows] == [envelope.to_bytes()]

    service.relay()  # the next relay publishes it again: the broker now holds two copies
    runner = service.consume(count_effect)

    async def published_and_applied() -> bool:
        async with service.pool.acquire() as conn:
            pending = await outbox.backlog(conn)
        return pending == 0 and await service.times_applied(thing) == 1

    await eventually(published_and_applied)
    copies = await read_topic(
        service_infra(service), "test.pinged", lambda r: r.value == envelope.to_bytes()
    )
    assert len(copies) == 2
    assert (
        await service.pool.fetchval("SELECT count(*) FROM inbox WHERE event_id = $1", envelope.id)
        == 1
    )
    await asyncio.sleep(0.5)  # give the second copy time to arrive and be skipped
    assert await service.times_applied(thing) == 1
    assert runner.running


def service_infra(service: Service) -> Stack:
    return _STACKS[service.schema]


_STACKS: dict[str, Stack] = {}


@pytest.fixture(autouse=True)
def _remember_stack(infra: Stack, scratch_schema: str) -> None:
    _STACKS[scratch_schema] = infra


async def test_the_same_event_delivered_twice_takes_effect_once(service: Service):
    thing = uuid.uuid4()
    envelope = Envelope.wrap(Pinged(thing_id=thing), account_id=None)
    for _ in range(2):
        await service.producer.send_and_wait("test.pinged", envelope.to_bytes(), key=b"k")
    service.consume(count_effect)
    await eventually(lambda: _is(service.times_applied(thing), 1))
    await asyncio.sleep(0.5)
    assert await service.times_applied(thing) == 1


async def _is(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def test_relay_wakes_on_notify_without_waiting_for_its_poll(service: Service):
    service.relay(poll_interval=60)
    service.consume(count_effect)
    await asyncio.sleep(1)  # let the relay become leader and listen
    thing = uuid.uuid4()
    started = asyncio.get_running_loop().time()
    await service.emit(thing)
    await eventually(lambda: _is(service.times_applied(thing), 1), timeout=10)
    assert asyncio.get_running_loop().time() - started < 10


async def test_only_one_relay_per_service_publishes(service: Service):
    first, second = service.relay(), service.relay()
    await eventually(lambda: _is(_leaders(first, second), 1))
    await asyncio.sleep(0.5)
    assert (first.is_leader, second.is_leader).count(True) == 1


async def _leaders(*relays: outbox.OutboxRelay) -> int:
    return sum(r.is_leader for r in relays)


async def test_poison_and_failing_events_are_dead_lettered_and_the_pipeline_goes_on(
    service: Service, infra: Stack
):
    marker = uuid.uuid4().hex.encode()
    await service.producer.send_and_wait("test.pinged", b"{garbage " + marker, key=b"k")
    failing = await service.emit(uuid.uuid4(), fail=True)
    good = uuid.uuid4()
    await service.emit(good)
    service.relay()
    service.consume(count_effect)

    def ours(record: Any) -> bool:
        return marker in (record.value or b"") or record.value == failing.to_bytes()

    async def both_dead_lettered() -> bool:
        return len(await read_topic(infra, "test.pinged.dlq", ours)) == 2

    await eventually(lambda: _is(service.times_applied(good), 1))
    await eventually(both_dead_lettered)
    dead = await read_topic(infra, "test.pinged.dlq", ours)
    reasons = sorted(dict(r.headers)["dlq.reason"].decode() for r in dead)
    assert len(reasons) == 2
    assert reasons[0].startswith("handler failed 2 times")
    assert reasons[1].startswith("not JSON")
    assert all(dict(r.headers)["dlq.topic"] == b"test.pinged" for r in dead)
    assert await service.times_applied(failing.data.thing_id) is None


async def test_two_consumers_in_one_group_apply_each_event_once(service: Service):
    things = [uuid.uuid4() for _ in range(60)]
    group = f"shared-{uuid.uuid4().hex[:8]}"
    service.consume(count_effect, group_id=group)
    service.consume(count_effect, group_id=group)
    service.relay()
    for thing in things:
        await service.emit(thing)

    async def all_applied() -> bool:
        n = await service.pool.fetchval(
            "SELECT count(*) FROM effects WHERE thing_id = ANY($1::uuid[])", things
        )
        return bool(n == len(things))

    await eventually(all_applied, timeout=40)
    assert (
        await service.pool.fetchval(
            "SELECT max(times) FROM effects WHERE thing_id = ANY($1::uuid[])", things
        )
        == 1
    )
