"""A broker that loses what it acknowledged (the embedded one keeps nothing across a restart):
the outbox keeps published events and publishes them again, consumers read the new log from its
start, and every effect still happens exactly once. Each test restarts a broker of its own."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.metadata import MetadataRequest
from prometheus_client import REGISTRY

from herald import outbox
from herald.consumer import ConsumerRunner, group_generation
from herald.devinfra.broker import EmbeddedBroker
from herald.devinfra.process import free_port
from herald.devinfra.stack import Stack
from herald.events import Envelope
from herald.kafka import end_offsets, ensure_topics, recreate_misshapen_topics
from tests.integration.test_outbox_inbox import Pinged, Service, _is, count_effect, eventually

TOPICS = ["test.pinged", "test.pinged.dlq"]


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[EmbeddedBroker]:
    own = EmbeddedBroker(port=free_port(), log_path=tmp_path / "broker.log")
    await asyncio.to_thread(own.start)
    yield own
    await asyncio.to_thread(own.stop)


async def _service(infra: Stack, broker: EmbeddedBroker, schema: str) -> Service:
    service = Service(infra, schema, kafka=broker.bootstrap_servers)
    await service.start()
    return service


@pytest.fixture
async def service(
    infra: Stack, broker: EmbeddedBroker, scratch_schema: str
) -> AsyncIterator[Service]:
    svc = await _service(infra, broker, scratch_schema)
    yield svc
    await svc.stop()


async def restart(broker: EmbeddedBroker, service: Service) -> None:
    """Kill the broker and start it again, empty, with the topics created anew."""
    await asyncio.to_thread(broker.stop, kill=True)
    await asyncio.to_thread(broker.start)
    await ensure_topics(service.settings, TOPICS)


async def on_broker(broker: EmbeddedBroker, envelope: Envelope[Pinged]) -> int:
    """How many copies of `envelope` the broker's `test.pinged` holds."""
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap_servers, group_id=None)
    await consumer.start()
    try:
        await consumer.topics()
        partitions = [
            TopicPartition("test.pinged", p)
            for p in consumer.partitions_for_topic("test.pinged") or ()
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        copies = 0
        while [tp for tp in partitions if await consumer.position(tp) < end[tp]]:
            for records in (await consumer.getmany(timeout_ms=300)).values():
                copies += sum(r.value == envelope.to_bytes() for r in records)
        return copies
    finally:
        await consumer.stop()


async def _copies(broker: EmbeddedBroker, envelopes: list[Envelope[Pinged]], n: int) -> bool:
    return all([await on_broker(broker, e) == n for e in envelopes])


async def test_published_events_are_kept_with_their_offsets_until_retention_ends(
    service: Service,
):
    relay = service.relay()
    envelope = await service.emit(uuid.uuid4())

    async def published() -> bool:
        async with service.pool.acquire() as conn:
            return await outbox.backlog(conn) == 0

    await eventually(published)
    row = await service.pool.fetchrow(
        "SELECT published_at, kafka_partition, kafka_offset FROM outbox WHERE event_id = $1",
        envelope.id,
    )
    assert row is not None
    assert row["published_at"] is not None
    tp = TopicPartition("test.pinged", row["kafka_partition"])
    assert (await end_offsets(service.producer, [tp]))[tp] == row["kafka_offset"] + 1

    relay.stop()
    await eventually(lambda: _is(_leading(relay), False))
    pending = Envelope.wrap(Pinged(thing_id=uuid.uuid4()), account_id=None)
    async with service.pool.acquire() as conn:
        await conn.execute(
            "UPDATE outbox SET published_at = now() - interval '73 hours' WHERE event_id = $1",
            envelope.id,
        )
        # Never published, however old: retention must leave it alone.
        await outbox.write(conn, pending)
        await conn.execute("UPDATE outbox SET created_at = now() - interval '1 year'")
        assert await outbox.sweep(conn, older_than_hours=74) == 0
        assert await outbox.sweep(conn, older_than_hours=72) == 1
        left = await conn.fetch("SELECT event_id FROM outbox")
    assert [r["event_id"] for r in left] == [pending.id]


async def test_an_intact_log_is_never_taken_for_one_the_broker_lost(
    service: Service, broker: EmbeddedBroker
):
    # One key, one transaction: the relay publishes them as one batch on one partition, whose end
    # the embedded broker reports as that batch's first offset plus one.
    thing = uuid.uuid4()
    envelopes = [Envelope.wrap(Pinged(thing_id=thing), account_id=None) for _ in range(20)]
    async with service.pool.acquire() as conn:
        await outbox.write_many(conn, envelopes)
    republished = _republished()
    service.relay(broker_check_interval=0.1)
    await eventually(lambda: _copies(broker, envelopes, 1))
    await asyncio.sleep(1.5)  # a dozen checks of the end offsets
    assert _republished() == republished
    assert await _copies(broker, envelopes, 1)


async def test_republishing_sends_events_again_and_each_takes_effect_once(
    service: Service, broker: EmbeddedBroker
):
    service.relay()
    service.consume(count_effect)
    things = [uuid.uuid4() for _ in range(5)]
    envelopes = [await service.emit(t) for t in things]
    await eventually(lambda: _all_once(service, things))

    since = datetime.now(UTC) - timedelta(minutes=15)
    counts = await outbox.republish_services(service.settings.database_url, [service.schema], since)
    assert counts == {service.schema: 5}
    await eventually(lambda: _copies(broker, envelopes, 2))

    async def duplicates_seen() -> bool:
        async with service.pool.acquire() as conn:
            done = await outbox.backlog(conn) == 0
        return done and all([await service.times_applied(t) == 1 for t in things])

    await eventually(duplicates_seen)
    await asyncio.sleep(1)  # the second copies have been read by now: still once each
    assert [await service.times_applied(t) for t in things] == [1] * 5
    async with service.pool.acquire() as conn:
        assert await outbox.republish(conn, datetime.now(UTC) + timedelta(minutes=1)) == 0


async def _leading(relay: outbox.OutboxRelay) -> bool:
    return relay.is_leader


async def _consuming(runner: ConsumerRunner) -> bool:
    return runner.running


def _resets(group: str) -> float:
    labels = {"group": group, "topic": "test.pinged"}
    return REGISTRY.get_sample_value("herald_consumer_resets_total", labels) or 0.0


def _republished() -> float:
    return REGISTRY.get_sample_value("herald_outbox_republished_total") or 0.0


def test_since_takes_durations_and_times():
    now = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)
    assert outbox.parse_since("15m", now=now) == now - timedelta(minutes=15)
    assert outbox.parse_since("2h", now=now) == now - timedelta(hours=2)
    assert outbox.parse_since("2026-01-02T11:00") == datetime(2026, 1, 2, 11, tzinfo=UTC)
    with pytest.raises(ValueError, match="--since"):
        outbox.parse_since("yesterday")


async def test_a_consumer_past_the_end_of_a_lost_log_reads_it_again_from_the_start(
    service: Service, broker: EmbeddedBroker
):
    """The topic is deleted and created again under a running consumer: its group and position
    survive, the log does not. The broker answers a fetch there with nothing, not an error;
    only the consumer's rewind finds what is written after (straight to the broker, no outbox)."""
    runner = service.consume(count_effect)
    key = uuid.uuid4().hex.encode()  # one partition, whose position ends up at 8
    before = [uuid.uuid4() for _ in range(8)]
    for thing in before:
        await _send(service, thing, key)
    await eventually(lambda: _all_once(service, before))
    resets = _resets(runner.group_id)

    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    await admin.start()
    try:
        await admin.delete_topics(["test.pinged"])
    finally:
        await admin.close()
    await ensure_topics(service.settings, TOPICS)
    after = [uuid.uuid4() for _ in range(2)]
    for thing in after:
        await _send(service, thing, key)
    await eventually(lambda: _all_once(service, [*before, *after]), timeout=40)
    assert _resets(runner.group_id) > resets


async def _send(service: Service, thing: uuid.UUID, key: bytes) -> None:
    envelope = Envelope.wrap(Pinged(thing_id=thing), account_id=None)
    await service.producer.send_and_wait("test.pinged", envelope.to_bytes(), key=key)


async def _all_once(service: Service, things: list[uuid.UUID]) -> bool:
    return all([await service.times_applied(t) == 1 for t in things])


async def test_the_relay_publishes_again_what_the_broker_lost_and_effects_stay_once(
    service: Service, broker: EmbeddedBroker
):
    service.relay(broker_check_interval=0.2)
    first = service.consume(count_effect)
    read = [uuid.uuid4() for _ in range(5)]
    for thing in read:
        await service.emit(thing)
    await eventually(lambda: _all_once(service, read))
    first.stop()
    await eventually(lambda: _is(_consuming(first), False))

    # Acknowledged by the broker and not yet read by anyone when it loses its memory.
    unread = [uuid.uuid4() for _ in range(5)]
    envelopes = [await service.emit(thing) for thing in unread]

    async def all_published() -> bool:
        async with service.pool.acquire() as conn:
            return await outbox.backlog(conn) == 0

    await eventually(all_published)
    republished = _republished()
    await restart(broker, service)
    await eventually(lambda: _copies(broker, envelopes, 1), timeout=40)
    assert _republished() - republished >= 10

    service.consume(count_effect)
    await eventually(lambda: _all_once(service, unread), timeout=40)
    await asyncio.sleep(1)
    assert [await service.times_applied(t) for t in read + unread] == [1] * 10


async def test_the_group_generation_goes_back_when_the_broker_forgets_the_group(
    broker: EmbeddedBroker, service: Service
):
    """What the runner relies on, read through the one private attribute it uses: the group the
    broker forms after losing its memory counts generations again."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker.bootstrap_servers,
        group_id=f"gen-{uuid.uuid4().hex[:8]}",
        session_timeout_ms=2000,
        heartbeat_interval_ms=300,
    )
    await consumer.start()
    try:
        assert group_generation(consumer) is None
        consumer.subscribe(["test.pinged"])
        seen: list[int] = []

        async def joined() -> bool:
            await consumer.getmany(timeout_ms=100)
            generation = group_generation(consumer)
            if generation is not None and consumer.assignment():
                seen.append(generation)
                return True
            return False

        await eventually(joined)
        await restart(broker, service)
        first = seen[-1]
        seen.clear()
        await eventually(joined, timeout=40)
        assert seen[-1] <= first
    finally:
        await consumer.stop()


async def test_a_consumer_reads_all_of_a_lost_log_even_once_the_new_one_outgrew_its_position(
    service: Service, broker: EmbeddedBroker
):
    """The race of issue 9: before the consumer looks, the new log already holds more than its old
    position (relays republish fast), so its position never lies beyond the end."""
    runner = service.consume(count_effect)
    key = uuid.uuid4().hex.encode()
    before = [uuid.uuid4() for _ in range(5)]
    for thing in before:
        await _send(service, thing, key)
    await eventually(lambda: _all_once(service, before))
    resets = _resets(runner.group_id)

    await restart(broker, service)
    after = [uuid.uuid4() for _ in range(20)]
    for thing in after:
        await _send(service, thing, key)
    await eventually(lambda: _all_once(service, [*before, *after]), timeout=40)
    assert _resets(runner.group_id) > resets


async def test_topics_the_broker_created_with_its_own_partition_count_are_created_again(
    broker: EmbeddedBroker, service: Service
):
    topic = f"test.shape.{uuid.uuid4().hex[:8]}"
    client = AIOKafkaClient(bootstrap_servers=broker.bootstrap_servers)
    await client.bootstrap()
    try:
        # A metadata request naming a topic creates it, as a client reconnecting does.
        node = next(iter(client.cluster.brokers())).nodeId
        response = await client.send(node, MetadataRequest([topic]))
        assert [len(t[-1]) for t in response.topics if t[1] == topic] != [3]
    finally:
        await client.close()
    assert await recreate_misshapen_topics(service.settings, [topic, "test.pinged"]) == [topic]
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
        assert len(described["partitions"]) == 3
    finally:
        await admin.close()
