"""Kafka clients configured from settings, topic creation, and a broker reachability check."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from aiokafka.protocol.offset import OffsetRequest

from herald.partitioning import default_partitioner
from herald.settings import BaseServiceSettings

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36
_LATEST = -1  # ListOffsets "timestamp" asking for the log-end offset


def client_options(settings: BaseServiceSettings) -> dict[str, Any]:
    """Connection options shared by producers, consumers and the admin client."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
        "client_id": f"herald-{settings.service_name}",
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = ssl.create_default_context()
    if settings.kafka_sasl_mechanism:
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        password = settings.kafka_sasl_password
        options["sasl_plain_password"] = password.get_secret_value() if password else None
    return options


def create_producer(settings: BaseServiceSettings) -> AIOKafkaProducer:
    """A producer that waits for all in-sync replicas; idempotence only where the broker has it.
    Keys map to partitions as the Java client's default partitioner maps them (hashes cached)."""
    return AIOKafkaProducer(
        **client_options(settings),
        acks="all",
        partitioner=default_partitioner,
        enable_idempotence=settings.kafka_idempotent_producer,
        linger_ms=5,
        max_batch_size=256 * 1024,
        request_timeout_ms=15000,
    )


async def ensure_topics(
    settings: BaseServiceSettings, topics: list[str], *, partitions: int | None = None
) -> list[str]:
    """Create the topics that do not exist yet; returns those created. Safe to run concurrently."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if not missing:
            return []
        count = partitions or settings.kafka_partitions
        new = [
            NewTopic(t, _partitions(t, count), settings.kafka_replication_factor) for t in missing
        ]
        response = await admin.create_topics(new)
        created = []
        for topic, code, message in (e[:3] for e in response.topic_errors):
            if code == 0:
                created.append(topic)
            elif code != _TOPIC_ALREADY_EXISTS:
                raise KafkaError(f"cannot create topic {topic}: {code} {message}")
        return created
    finally:
        await admin.close()


async def recreate_misshapen_topics(
    settings: BaseServiceSettings, topics: list[str], *, attempts: int = 10
) -> list[str]:
    """Delete and create again those of `topics` whose partition count is not Herald's; returns
    them. Only for a broker that has just started empty: the embedded one creates a topic that a
    client's metadata request names, with its own partition count, and keys would then map to
    other partitions. What was written to them goes with them; the outbox relays publish it again.
    """
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    redone: set[str] = set()
    try:
        for _ in range(attempts):
            counts = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics()}
            wrong = [
                t
                for t in topics
                if t in counts and counts[t] != _partitions(t, settings.kafka_partitions)
            ]
            if not wrong:
                break
            redone.update(wrong)
            log.warning(
                "topics created by the broker with its own partition count; recreating",
                extra={"topics": wrong},
            )
            await admin.delete_topics(wrong)
            # Clients may name them again in between: then they are recreated once more.
            await admin.create_topics(
                [
                    NewTopic(
                        t,
                        _partitions(t, settings.kafka_partitions),
                        settings.kafka_replication_factor,
                    )
                    for t in wrong
                ]
            )
        return sorted(redone)
    finally:
        await admin.close()


def _partitions(topic: str, count: int) -> int:
    # Dead-letter topics are low-volume; one partition keeps them easy to read in order.
    return 1 if topic.endswith(".dlq") else count


async def broker_reachable(producer: AIOKafkaProducer, timeout: float = 2.0) -> bool:
    """Whether the producer's client can fetch cluster metadata right now."""
    try:
        async with asyncio.timeout(timeout):
            await producer.client.fetch_all_metadata()
    except (KafkaError, TimeoutError, OSError):
        return False
    return True


async def end_offsets(
    producer: AIOKafkaProducer, partitions: Iterable[TopicPartition]
) -> dict[TopicPartition, int]:
    """The log-end offset of each partition, asked of its leader over the producer's connections.

    Partitions whose leader is unknown or that answer with an error (a topic not created again yet
    after a broker restart) are left out: the caller asks again later.
    """
    client = producer.client
    await client.force_metadata_update()
    by_leader: defaultdict[int, defaultdict[str, list[tuple[int, int]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for tp in partitions:
        leader = client.cluster.leader_for_partition(tp)
        if leader is None or leader < 0:
            client.add_topic(tp.topic)
            continue
        by_leader[leader][tp.topic].append((tp.partition, _LATEST))
    ends: dict[TopicPartition, int] = {}
    for leader, topics in by_leader.items():
        response = await client.send(leader, OffsetRequest(-1, 0, list(topics.items())))
        for topic, answers in response.topics:
            for partition, error_code, *info in answers:
                if error_code != 0:
                    continue
                # v0 answers a list of offsets; later versions (timestamp, offset[, epoch]).
                offset = (info[0] or [None])[0] if response.API_VERSION == 0 else info[1]
                if offset is not None and offset >= 0:
                    ends[TopicPartition(topic, partition)] = offset
    return ends
