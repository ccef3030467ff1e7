"""The outbox publishes a pass as record batches per partition: each key on the partition every
murmur2 client gives it, in the order of the rows, with each row's own acknowledgement."""

import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from confluent_kafka import Producer
from prometheus_client import REGISTRY

from herald import outbox
from herald.devinfra.stack import Stack
from tests.integration.test_outbox_inbox import Service

TOPIC = "test.pinged"  # three partitions


@pytest.fixture
async def service(infra: Stack, scratch_schema: str) -> AsyncIterator[Service]:
    svc = Service(infra, scratch_schema)
    await svc.start()
    yield svc
    await svc.stop()


async def write_rows(service: Service, rows: list[tuple[bytes | None, bytes, Any]]) -> None:
    """Outbox rows as they are written, in this order (key, payload, headers)."""
    async with service.pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO outbox (event_id, topic, key, payload, headers) "
            "VALUES ($1, $2, $3, $4, $5::text::jsonb)",
            [(uuid.uuid4(), TOPIC, k, p, orjson.dumps(h).decode()) for k, p, h in rows],
        )


async def records_at(stack: Stack, acks: list[Any]) -> dict[tuple[int, int], Any]:
    """The records of TOPIC at the partitions and offsets acknowledged."""
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka_bootstrap_servers, group_id=None)
    await consumer.start()
    try:
        wanted = {(a.partition, a.offset) for a in acks}
        partitions = sorted({TopicPartition(TOPIC, p) for p, _ in wanted})
        consumer.assign(partitions)
        for tp in partitions:
            consumer.seek(tp, min(o for p, o in wanted if p == tp.partition))
        found: dict[tuple[int, int], Any] = {}
        while not wanted <= found.keys():
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                found.update({(r.partition, r.offset): r for r in records})
        return found
    finally:
        await consumer.stop()


async def test_each_row_is_acknowledged_where_the_broker_put_it_keys_in_order(
    service: Service, infra: Stack
):
    run = uuid.uuid4().hex
    big = f"{run}-big".encode()
    rows: list[tuple[bytes | None, bytes, Any]] = []
    for n in range(150):  # 600 kB on one key: several record batches of one partition
        rows.append((big, f"{run} big {n} ".encode() + b"x" * 4000, [["correlation_id", "c1"]]))
        if n % 3 == 0:
            key = f"{run}-{n % 20}".encode()
            rows.append((key, f"{run} small {n}".encode(), [["correlation_id", f"c{n % 2}"]]))
        if n % 15 == 0:
            rows.append((None, f"{run} keyless {n}".encode(), []))
    await write_rows(service, rows)
    published = REGISTRY.get_sample_value("herald_events_published_total", {"topic": TOPIC}) or 0

    async with service.pool.acquire() as conn:
        pending = await outbox.pending(conn, limit=1000)
    acks = await outbox.publish(service.producer, pending)

    assert len(acks) == len(pending) == len(rows)
    assert REGISTRY.get_sample_value("herald_events_published_total", {"topic": TOPIC}) == (
        published + len(rows)
    )
    on_broker = await records_at(infra, acks)
    last: dict[bytes | None, tuple[int, int]] = {}
    for row, ack in zip(pending, acks, strict=True):
        assert (ack.topic, ack.topic_partition) == (TOPIC, TopicPartition(TOPIC, ack.partition))
        record = on_broker[ack.partition, ack.offset]
        assert (record.key, record.value) == (row["key"], row["payload"])
        assert record.headers == tuple(
            (name, str(value).encode()) for name, value in orjson.loads(row["headers"])
        )
        assert ack.timestamp == record.timestamp
        if row["key"] is not None:
            # The mapping every client had so far (aiokafka's default partitioner).
            assert ack.partition == DefaultPartitioner()(row["key"], [0, 1, 2], [0, 1, 2])
            # One key: one partition, offsets rising in the order the rows were written.
            if row["key"] in last:
                assert last[row["key"]][0] == ack.partition
                assert last[row["key"]][1] < ack.offset
            last[row["key"]] = (ack.partition, ack.offset)


async def test_keys_land_where_librdkafkas_murmur2_partitioner_puts_them(
    service: Service, infra: Stack
):
    keys = [f"{uuid.uuid4()}".encode() for _ in range(30)]
    await write_rows(service, [(key, b"ours", []) for key in keys])
    async with service.pool.acquire() as conn:
        ours = await outbox.publish(service.producer, await outbox.pending(conn, limit=1000))

    theirs: dict[bytes | None, int | None] = {}
    producer = Producer(
        {"bootstrap.servers": infra.kafka_bootstrap_servers, "partitioner": "murmur2_random"}
    )
    for key in keys:
        producer.produce(
            TOPIC,
            b"theirs",
            key=key,
            on_delivery=lambda _, m: theirs.update({m.key(): m.partition()}),
        )
    assert producer.flush(30) == 0
    assert [a.partition for a in ours] == [theirs[key] for key in keys]
    # And the producer's own partitioner, for what services send without the outbox.
    for key, ack in zip(keys[:5], ours, strict=False):
        sent = await service.producer.send_and_wait(TOPIC, b"direct", key=key)
        assert sent.partition == ack.partition
