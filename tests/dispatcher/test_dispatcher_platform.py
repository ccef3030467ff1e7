"""The dispatcher as a process: DispatchBatch events in on Kafka, mail out to the sink, outcomes
out on `email.dispatched`, and a SIGKILL half way through a send costs nobody a copy or a
duplicate. Batches are published here directly, so nothing but the dispatcher is relied on.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from herald.devinfra.stack import Stack
from herald.events import Envelope, decode
from herald.events.campaign import EmailContent
from herald.events.dispatcher import MessageDispatched
from herald.events.scheduler import DispatchBatch, Recipient

CONTENT = EmailContent(
    subject="Crash course {{ contact.first_name }}",
    text="Hello {{ contact.first_name }}.\n",
    html='<p>Hello {{ contact.first_name }}</p><a href="https://example.com/">more</a>',
    from_email="platform@herald.example",
)


def batches_for(email_id: uuid.UUID, addresses: list[str], size: int = 500) -> list[DispatchBatch]:
    return [
        DispatchBatch(
            email_id=email_id,
            batch_no=n,
            kind="campaign",
            content=CONTENT,
            recipients=[
                Recipient(email=a, first_name=f"R{n}") for a in addresses[start : start + size]
            ],
            revision=1,
        )
        for n, start in enumerate(range(0, len(addresses), size))
    ]


async def publish(stack: Stack, account_id: uuid.UUID, batches: list[DispatchBatch]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap_servers, linger_ms=5)
    await producer.start()
    try:
        sent = [
            await producer.send(
                DispatchBatch.TOPIC,
                Envelope.wrap(batch, account_id=account_id).to_bytes(),
                key=batch.partition_key().encode(),
            )
            for batch in batches
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def count(sink: httpx.AsyncClient, tag: str) -> int:
    response = await sink.get("/api/messages/count", params={"to": tag})
    response.raise_for_status()
    total: int = response.json()["count"]
    return total


async def wait_for_count(
    sink: httpx.AsyncClient, tag: str, at_least: int, timeout: float = 180
) -> int:
    deadline = time.monotonic() + timeout
    while (found := await count(sink, tag)) < at_least:
        assert time.monotonic() < deadline, f"only {found} of {at_least} arrived"
        await asyncio.sleep(0.1)
    return found


async def everything_received(sink: httpx.AsyncClient, tag: str) -> list[str]:
    """Every recipient of every message the sink holds for `tag`, paging through them all."""
    recipients: list[str] = []
    after = 0
    while True:
        response = await sink.get(
            "/api/messages", params={"to": tag, "limit": 1000, "after": after}
        )
        response.raise_for_status()
        items: list[dict[str, Any]] = response.json()["items"]
        if not items:
            return recipients
        for item in items:
            recipients += item["rcpt_tos"]
        after = items[-1]["id"]


async def dispatched(stack: Stack, email_id: uuid.UUID, *, at_least: int) -> list[Any]:
    """The `email.dispatched` events of `email_id` (each once, by event id)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka_bootstrap_servers)
    await consumer.start()
    seen: dict[uuid.UUID, Any] = {}
    try:
        topic = MessageDispatched.TOPIC
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        while not partitions:
            await consumer.topics()
            partitions = [
                TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()
            ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        deadline = time.monotonic() + 120
        while len(seen) < at_least and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=300)).values():
                for record in records:
                    envelope = decode(record.value)
                    if getattr(envelope.data, "email_id", None) == email_id:
                        seen[envelope.id] = envelope.data
    finally:
        await consumer.stop()
    return list(seen.values())


async def test_batches_on_kafka_are_delivered_and_reported(
    platform: Stack, sink: httpx.AsyncClient
):
    tag = f"p{uuid.uuid4().hex[:10]}"
    email_id = uuid.uuid4()
    addresses = [f"{tag}-{i}@platform.example" for i in range(30)]
    await publish(platform, uuid.uuid4(), batches_for(email_id, addresses, size=7))
    await wait_for_count(sink, tag, 30)
    assert sorted(await everything_received(sink, tag)) == sorted(addresses)

    events = await dispatched(platform, email_id, at_least=30)
    assert sorted(e.recipient for e in events) == sorted(addresses)
    assert {(e.status, e.smtp_code, e.attempt) for e in events} == {("sent", 250, 1)}

    async with httpx.AsyncClient(base_url=platform.url("dispatcher"), timeout=10) as client:
        ready = (await client.get("/readyz")).json()
        assert ready["checks"]["smtp_relay"] == "ok"
        path = f"/internal/emails/{email_id}/deliveries"
        assert (await client.get(path)).status_code == 403
        headers = {"X-Internal-Token": platform.secrets["INTERNAL_TOKEN"]}
        summary = (await client.get(path, headers=headers)).json()
        assert summary == {
            "email_id": str(email_id),
            "total": 30,
            "queued": 0,
            "sending": 0,
            "deferred": 0,
            "sent": 30,
            "failed": 0,
        }
        one = events[0]
        record = await client.get(f"/internal/messages/{one.message_id}", headers=headers)
        assert record.json()["recipient"] == one.recipient
        missing = await client.get(f"/internal/messages/{uuid.uuid4()}", headers=headers)
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"


async def test_a_dispatcher_killed_mid_send_delivers_everyone_exactly_once(
    platform: Stack, sink: httpx.AsyncClient
):
    tag = f"k{uuid.uuid4().hex[:10]}"
    email_id = uuid.uuid4()
    addresses = [f"{tag}-{i}@crash.example" for i in range(5000)]
    await publish(platform, uuid.uuid4(), batches_for(email_id, addresses))

    before = await wait_for_count(sink, tag, 1500)
    await platform.stop_service("dispatcher", signal.SIGKILL)
    at_kill = await count(sink, tag)
    assert before <= at_kill < 5000, "the kill came too late to test anything"
    await platform.start_service("dispatcher")
    await platform.wait_ready(90, ["dispatcher"])

    await wait_for_count(sink, tag, 5000)
    await asyncio.sleep(2)  # anything sent twice would arrive by now
    received = await everything_received(sink, tag)
    twice = [address for address, n in Counter(received).items() if n > 1]
    assert twice == []
    assert sorted(received) == sorted(addresses)

    events = await dispatched(platform, email_id, at_least=5000)
    sent = Counter(e.recipient for e in events if e.status == "sent")
    assert set(sent) == set(addresses)
    assert max(sent.values()) == 1
