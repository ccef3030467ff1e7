"""The scheduler as a process: timers survive a restart, and replicas never fan out twice.

Emails are handed to the scheduler as campaign does (`email.scheduled` on Kafka); what it
publishes is read back from `email.dispatch` and `email.fanout`. System mails to literal
addresses need no other service, so these tests depend on nothing but the scheduler.
"""

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from herald.devinfra.process import free_port
from herald.devinfra.stack import ServiceProcess, Stack
from herald.events import Envelope, decode
from herald.events.campaign import Audience, EmailContent, EmailScheduled
from herald.events.scheduler import DispatchBatch, EmailFannedOut, EmailFanoutStarted


async def hand_over(stack: Stack, event: EmailScheduled) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap_servers)
    await producer.start()
    try:
        envelope = Envelope.wrap(event, account_id=uuid.uuid4())
        await producer.send_and_wait(
            event.TOPIC, envelope.to_bytes(), key=event.partition_key().encode()
        )
    finally:
        await producer.stop()


def system_mail(send_at: datetime, recipients: int = 3) -> EmailScheduled:
    email_id = uuid.uuid4()
    return EmailScheduled(
        email_id=email_id,
        revision=1,
        send_at=send_at,
        kind="system",
        content=EmailContent(subject="Timer", text="t", from_email="no-reply@example.com"),
        audience=Audience(to=[f"r{i}-{email_id.hex[:8]}@example.com" for i in range(recipients)]),
    )


async def read_topic(
    stack: Stack, topic: str, keep: Callable[[Any], bool], *, settle: float, timeout: float = 60
) -> list[Any]:
    """Every event on `topic` that `keep` accepts, read from the beginning until nothing new
    has come for `settle` seconds after at least one was found (or `timeout`)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka_bootstrap_servers, group_id=None)
    await consumer.start()
    found: list[Any] = []
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        if not partitions:
            await consumer.topics()
            partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        deadline = time.monotonic() + timeout
        last_found = time.monotonic()
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    data = decode(record.value).data
                    if keep(data):
                        found.append(data)
                        last_found = time.monotonic()
            if found and time.monotonic() - last_found > settle:
                break
    finally:
        await consumer.stop()
    return found


def of(email_id: uuid.UUID) -> Callable[[Any], bool]:
    return lambda data: getattr(data, "email_id", None) == email_id


async def wait_for_timer(db: asyncpg.Connection, email_id: uuid.UUID) -> None:
    deadline = time.monotonic() + 30
    while await db.fetchval("SELECT 1 FROM scheduler.timers WHERE email_id = $1", email_id) is None:
        assert time.monotonic() < deadline, "the scheduler never stored the timer"
        await asyncio.sleep(0.1)


async def test_a_timer_pending_across_a_restart_fires_once(platform: Stack, db: asyncpg.Connection):
    event = system_mail(datetime.now(UTC) + timedelta(seconds=6))
    await hand_over(platform, event)
    await wait_for_timer(db, event.email_id)
    await platform.stop_service("scheduler")
    try:
        await asyncio.sleep(max((event.send_at - datetime.now(UTC)).total_seconds(), 0) + 0.5)
        assert (
            await db.fetchval(
                "SELECT state FROM scheduler.timers WHERE email_id = $1", event.email_id
            )
            == "pending"
        )
    finally:
        await platform.start_service("scheduler")
        await platform.wait_ready(60, ["scheduler"])

    batches = await read_topic(platform, "email.dispatch", of(event.email_id), settle=3)
    assert len(batches) == 1
    batch = batches[0]
    assert isinstance(batch, DispatchBatch)
    assert sorted(r.email for r in batch.recipients) == sorted(event.audience.to)
    fanout = await read_topic(platform, "email.fanout", of(event.email_id), settle=1)
    assert [type(e) for e in fanout] == [EmailFanoutStarted, EmailFannedOut]


async def test_two_scheduler_replicas_fan_each_email_out_once(
    platform: Stack, db: asyncpg.Connection
):
    port = free_port()
    env = platform.service_env("scheduler") | {"SCHEDULER_PORT": str(port)}
    replica = ServiceProcess("scheduler", env, platform.logs_dir / "scheduler-2.log", None)
    await replica.start()
    try:
        platform.config.service_ports["scheduler-2"] = port
        platform.services["scheduler-2"] = replica
        await platform.wait_ready(60, ["scheduler-2"])
        send_at = datetime.now(UTC) + timedelta(seconds=3)
        events = [system_mail(send_at, recipients=5) for _ in range(8)]
        for event in events:
            await hand_over(platform, event)
        ids = {e.email_id for e in events}
        batches = await read_topic(
            platform,
            "email.dispatch",
            lambda d: isinstance(d, DispatchBatch) and d.email_id in ids,
            settle=3,
        )
        by_email: dict[uuid.UUID, list[str]] = {}
        for batch in batches:
            by_email.setdefault(batch.email_id, []).extend(r.email for r in batch.recipients)
        assert {k: sorted(v) for k, v in by_email.items()} == {
            e.email_id: sorted(e.audience.to) for e in events
        }
        fired = await db.fetchval(
            "SELECT count(*) FROM scheduler.fanouts WHERE email_id = ANY($1::uuid[])", list(ids)
        )
        assert fired == 8
    finally:
        platform.services.pop("scheduler-2", None)
        platform.config.service_ports.pop("scheduler-2", None)
        await replica.stop()
