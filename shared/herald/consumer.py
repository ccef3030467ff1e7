"""The consumer runner: events in, effects committed with their inbox record, then offsets.

For each partition's batch it decodes every message; what cannot be decoded goes to the topic's
dead-letter topic with the reason. The rest are handled in one transaction per batch (each event
claimed in the inbox first, so a redelivered event is a no-op). If that transaction fails, the
batch is retried event by event, so one bad event cannot hold back its neighbours; an event
whose handler keeps failing is dead-lettered after `max_attempts`. An unreachable database is
not the event's fault: that is retried, without committing, until it comes back. Offsets are
committed only after the effects are durable.

A handler may also take a run of events of its type at once (`BatchHandler`), for events that
come by the thousand: their inbox records are claimed in one statement and the handler gets the
new ones together, with the same effects as one by one. Retried event by event, it takes them
one at a time.

A broker that lost its memory (the embedded one keeps nothing across a restart) has lost the
group too: it answers the next heartbeat with an unknown member, and the group it then forms
starts counting generations again. That is how the runner notices, whatever the new log holds by
then: an assignment whose generation is not above the last one it saw reads every assigned
partition from its beginning, where the producers' relays publish what was lost (duplicates cost
an inbox lookup). Its position or a commit cannot tell: the embedded broker takes a commit from a
member it no longer knows, so an offset of the lost log can land in the new group, and the relays
may have republished past it before anyone looks. A log lost under a group that survives (a
topic deleted and created again) shows as a position beyond the partition's high-water mark, and
is read again from its beginning too. A batch fetched before the group rebalanced is not
committed after it (its offsets may be the lost log's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from herald import db, inbox, logs
from herald.db import Conn
from herald.events import Envelope, EventData, PoisonMessage, decode
from herald.kafka import client_options
from herald.metrics import CONSUMER_LAG, CONSUMER_RESETS, EVENT_HANDLING, EVENTS_CONSUMED
from herald.settings import BaseServiceSettings

log = logging.getLogger(__name__)

Handler = Callable[[Envelope[Any], Conn], Awaitable[None]]
Handlers = Mapping[type[EventData], Sequence[Handler]]
ManyHandler = Callable[[Sequence[Envelope[Any]], Conn], Awaitable[None]]


class BatchHandler:
    """A handler that can take a run of consecutive events of its type at once.

    `many` must have the effects `each` would have on the same events one after the other, in
    order (duplicates already dropped). The runner calls `many` when the batch holds several
    such events and this is the type's only handler, and `each` when it retries event by event.
    While `many` runs, the correlation id (logs, outbox headers) is the first event's.
    """

    def __init__(self, *, each: Handler, many: ManyHandler) -> None:
        self.each = each
        self.many = many

    async def __call__(self, envelope: Envelope[Any], conn: Conn) -> None:
        await self.each(envelope, conn)

    def __repr__(self) -> str:
        return f"BatchHandler({getattr(self.each, '__name__', self.each)!r})"


def group_generation(consumer: AIOKafkaConsumer) -> int | None:
    """The generation of the consumer's group as of its latest join (None before one, or after
    the coordinator forgot the member).

    aiokafka keeps it on its group coordinator and has no public accessor, hence the private
    attribute, read here only (tests/integration/test_broker_loss.py checks it).
    """
    generation = getattr(getattr(consumer, "_coordinator", None), "generation", None)
    return generation if isinstance(generation, int) and generation >= 0 else None


class _Rebalances(ConsumerRebalanceListener):  # type: ignore[misc]
    """Counts the group's rebalances, so a batch fetched before one is not committed after it,
    and hands each new assignment to `on_assigned`."""

    def __init__(self, on_assigned: Callable[[set[TopicPartition]], Awaitable[None]]) -> None:
        self.count = 0
        self._on_assigned = on_assigned

    async def on_partitions_revoked(self, revoked: object) -> None:
        self.count += 1

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.count += 1
        await self._on_assigned(assigned)


class ConsumerRunner:
    """Consumes the topics of `handlers` in consumer group `group_id` until stopped."""

    def __init__(
        self,
        *,
        settings: BaseServiceSettings,
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        handlers: Handlers,
        group_id: str | None = None,
        max_batch: int = 500,
        max_attempts: int = 5,
        retry_delay: float = 0.2,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._producer = producer
        self._by_type: dict[str, Sequence[Handler]] = {cls.TYPE: hs for cls, hs in handlers.items()}
        self.topics = sorted({cls.TOPIC for cls in handlers})
        self.group_id = group_id or settings.service_name
        self._max_batch = max_batch
        self._max_attempts = max_attempts
        self._retry_delay = retry_delay
        self._stopping = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        # The group's generation at this runner's latest assignment: it only grows while the
        # broker remembers the group.
        self._generation: int | None = None
        self.running = False
        # Messages not yet consumed, per topic, as of the last batch (for /internal/stats).
        self.lag: dict[str, int] = {}
        self._lag_labels: set[tuple[str, str]] = set()

    def stop(self) -> None:
        """Finish and commit the batch under way, then return from `run`."""
        self._stopping.set()

    async def run(self) -> None:
        """Consume until stopped; reconnects if the broker goes away."""
        delay = 0.5
        while not self._stopping.is_set():
            try:
                await self._consume()
                delay = 0.5
            except (KafkaError, OSError) as exc:
                if self._stopping.is_set():
                    break
                log.warning("consumer interrupted, reconnecting", extra={"error": repr(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _consume(self) -> None:
        consumer = AIOKafkaConsumer(
            **client_options(self._settings),
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self._max_batch,
            session_timeout_ms=self._settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=max(self._settings.kafka_session_timeout_ms // 6, 100),
        )
        await consumer.start()

        async def on_assigned(assigned: set[TopicPartition]) -> None:
            await self._on_assigned(consumer, assigned)

        rebalances = _Rebalances(on_assigned)
        consumer.subscribe(self.topics, listener=rebalances)
        self._consumer = consumer
        self.running = True
        try:
            while not self._stopping.is_set():
                generation = rebalances.count
                batches = await consumer.getmany(timeout_ms=300, max_records=self._max_batch)
                for tp, records in batches.items():
                    if not await self._process(tp, records):
                        return  # stopping while the database was down: leave offsets as they are
                    if rebalances.count != generation:
                        # Fetched before the group changed: its offsets may belong to a log the
                        # broker has since lost, and committing them would skip the new log's
                        # head. The partition's new owner reads these again; the inbox skips them.
                        continue
                    await self._commit(consumer, tp, records[-1].offset + 1)
                await self._record_lag(consumer)
        finally:
            self.running = False
            self._consumer = None
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def _on_assigned(self, consumer: AIOKafkaConsumer, assigned: set[TopicPartition]) -> None:
        generation = group_generation(consumer)
        if generation is None:
            return
        previous, self._generation = self._generation, generation
        if previous is None or generation > previous or not assigned:
            return
        # Generations never go back in a group the broker kept: it lost the group, and with it
        # every log (offsets committed meanwhile, ours included, may be the lost logs').
        log.warning(
            "the broker forgot the consumer group; reading its partitions again from the beginning",
            extra={"group": self.group_id, "generation": generation, "previous": previous},
        )
        for tp in assigned:
            CONSUMER_RESETS.labels(self.group_id, tp.topic).inc()
        # The seek is recorded at once and done by the fetcher; no heartbeat is sent while this
        # listener runs, so do not wait long for it (a partition without a leader yet).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                await consumer.seek_to_beginning(*assigned)

    async def _commit(self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> None:
        try:
            await consumer.commit({tp: offset})
        except (CommitFailedError, IllegalStateError) as exc:
            # The partition moved to another member; it will redeliver, and the inbox dedupes.
            log.info("offset commit lost to a rebalance", extra={"error": repr(exc)})

    async def _record_lag(self, consumer: AIOKafkaConsumer) -> None:
        lag: dict[str, int] = {}
        seen: set[tuple[str, str]] = set()
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            position = await consumer.position(tp)
            if position > highwater:
                await self._rewind(consumer, tp, position, highwater)
                position = 0
            behind = highwater - position
            CONSUMER_LAG.labels(self.group_id, tp.topic, str(tp.partition)).set(behind)
            seen.add((tp.topic, str(tp.partition)))
            lag[tp.topic] = lag.get(tp.topic, 0) + behind
        for topic, partition in self._lag_labels - seen:
            # A partition given up in a rebalance is another member's to report now.
            CONSUMER_LAG.remove(self.group_id, topic, partition)
        self._lag_labels = seen
        self.lag = lag

    async def _rewind(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, position: int, highwater: int
    ) -> None:
        # Offsets never go back in a log that kept its records: the broker lost them. Reading the
        # partition from the start costs nothing more than duplicates, which the inbox skips.
        log.warning(
            "the broker lost this partition's log; reading it again from the beginning",
            extra={
                "group": self.group_id,
                "topic": tp.topic,
                "partition": tp.partition,
                "position": position,
                "highwater": highwater,
            },
        )
        CONSUMER_RESETS.labels(self.group_id, tp.topic).inc()
        await consumer.seek_to_beginning(tp)

    async def _process(self, tp: TopicPartition, records: Sequence[ConsumerRecord]) -> bool:
        """Handle one partition's batch; False if stopped before its effects were durable."""
        started = time.perf_counter()
        events: list[tuple[ConsumerRecord, Envelope[Any]]] = []
        for record in records:
            try:
                events.append((record, decode(record.value)))
            except PoisonMessage as poison:
                await self._dead_letter(record, poison.reason)
        done = await self._handle_batch(tp.topic, events)
        EVENT_HANDLING.labels(tp.topic).observe(time.perf_counter() - started)
        return done

    async def _handle_batch(
        self, topic: str, events: list[tuple[ConsumerRecord, Envelope[Any]]]
    ) -> bool:
        if not events:
            return True
        delay = self._retry_delay
        while True:
            try:
                outcomes = await self._in_one_transaction([e for _, e in events])
                for outcome, count in Counter(outcomes).items():
                    EVENTS_CONSUMED.labels(topic, outcome).inc(count)
                return True
            except Exception as exc:
                if not db.is_connection_error(exc):
                    log.warning("batch failed, retrying event by event", extra={"error": repr(exc)})
                    return await self._one_by_one(topic, events)
                if self._stopping.is_set():
                    return False
                log.warning("database unreachable, will retry", extra={"error": repr(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _one_by_one(
        self, topic: str, events: list[tuple[ConsumerRecord, Envelope[Any]]]
    ) -> bool:
        for record, envelope in events:
            attempt = 0
            delay = self._retry_delay
            while True:
                try:
                    (outcome,) = await self._in_one_transaction([envelope])
                    EVENTS_CONSUMED.labels(topic, outcome).inc()
                    break
                except Exception as exc:
                    if db.is_connection_error(exc):
                        if self._stopping.is_set():
                            return False
                    else:
                        attempt += 1
                        if attempt >= self._max_attempts:
                            log.exception("handler failed; dead-lettering", exc_info=exc)
                            reason = f"handler failed {attempt} times: {exc!r}"
                            await self._dead_letter(record, reason[:1000])
                            break
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        return True

    async def _in_one_transaction(self, envelopes: Sequence[Envelope[Any]]) -> list[str]:
        outcomes: list[str] = []
        async with self._pool.acquire() as conn, conn.transaction():
            start = 0
            while start < len(envelopes):
                envelope = envelopes[start]
                handlers = self._by_type.get(envelope.type)
                end = start + 1
                if handlers and len(handlers) == 1 and isinstance(handlers[0], BatchHandler):
                    while end < len(envelopes) and envelopes[end].type == envelope.type:
                        end += 1
                    if end - start > 1:
                        outcomes += await self._handle_run(conn, handlers[0], envelopes[start:end])
                        start = end
                        continue
                start = end
                if not handlers:
                    outcomes.append("ignored")
                    continue
                if not await inbox.claim(conn, event_id=envelope.id, topic=envelope.topic):
                    outcomes.append("duplicate")
                    continue
                token = logs.correlation_id.set(envelope.correlation_id or str(envelope.id))
                try:
                    for handler in handlers:
                        await handler(envelope, conn)
                finally:
                    logs.correlation_id.reset(token)
                outcomes.append("processed")
        return outcomes

    async def _handle_run(
        self, conn: Conn, handler: BatchHandler, envelopes: Sequence[Envelope[Any]]
    ) -> list[str]:
        """Consecutive events of one type, claimed in the inbox together and handled at once."""
        first: dict[uuid.UUID, Envelope[Any]] = {}
        for envelope in envelopes:
            first.setdefault(envelope.id, envelope)
        claimed = await inbox.claim_many(conn, event_ids=list(first), topic=envelopes[0].topic)
        fresh = [envelope for event_id, envelope in first.items() if event_id in claimed]
        if fresh:
            head = fresh[0]
            token = logs.correlation_id.set(head.correlation_id or str(head.id))
            try:
                await handler.many(fresh, conn)
            finally:
                logs.correlation_id.reset(token)
        return ["processed"] * len(fresh) + ["duplicate"] * (len(envelopes) - len(fresh))

    async def _dead_letter(self, record: ConsumerRecord, reason: str) -> None:
        headers = [
            *(record.headers or ()),
            ("dlq.reason", reason.encode()),
            ("dlq.topic", record.topic.encode()),
            ("dlq.partition", str(record.partition).encode()),
            ("dlq.offset", str(record.offset).encode()),
            ("dlq.group", self.group_id.encode()),
            ("dlq.failed_at", datetime.now(UTC).isoformat().encode()),
        ]
        await self._producer.send_and_wait(
            f"{record.topic}.dlq", value=record.value, key=record.key, headers=headers
        )
        EVENTS_CONSUMED.labels(record.topic, "dead_lettered").inc()
        log.warning(
            "message dead-lettered",
            extra={"topic": record.topic, "offset": record.offset, "reason": reason},
        )
