"""The transactional outbox: events are written with the state change, then relayed to Kafka.

`write` inserts into the service's `outbox` table inside the caller's transaction, so an event
exists if and only if its state change committed. One relay per service (a Postgres advisory
lock elects it among replicas, which keeps per-key order) publishes pending rows, waits for the
broker's acknowledgement, and only then marks them published, with the partition and offset the
broker gave each. A relay that dies between publishing and marking publishes those rows again:
delivery is at least once, and consumers deduplicate by event id in their inbox.

Published rows are kept for `OUTBOX_RETENTION_HOURS`, because a broker can lose what it
acknowledged: the embedded one keeps nothing across a restart, and Kafka loses a log to a topic
deleted and created again or an unclean leader election. The relay notices a partition whose log
went back (a new acknowledgement at or below an offset it was given before, the log's end at or
below its latest publication there, or the partition gone from a topic created again with fewer)
and queues that partition's retained rows again.
`republish` (and `python -m herald.outbox republish --since 15m`) does the same by time, for an
operator.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import re
import time
from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata

from herald import db, logs
from herald.db import Conn
from herald.encoded_events import EncodedEvent
from herald.events import Envelope
from herald.kafka import end_offsets
from herald.metrics import EVENTS_PUBLISHED, OUTBOX_BACKLOG, OUTBOX_REPUBLISHED
from herald.partitioning import positive_hash

log = logging.getLogger(__name__)

DEFAULT_RETENTION_HOURS = 72


def _headers(cid: str | None) -> str:
    # As JSON text: asyncpg would read a list of lists as a two-dimensional array.
    return orjson.dumps([["correlation_id", cid]] if cid else []).decode()


def _row(event: Envelope[Any] | EncodedEvent, context_headers: str) -> tuple[Any, ...]:
    if isinstance(event, EncodedEvent):
        return (event.id, event.topic, event.key, event.payload, context_headers)
    key = event.data.partition_key()
    return (
        event.id,
        event.topic,
        key.encode() if key is not None else None,
        event.to_bytes(),
        _headers(event.correlation_id) if event.correlation_id else context_headers,
    )


async def write(conn: Conn, envelope: Envelope[Any]) -> None:
    """Record `envelope` for publication; call inside the transaction of the state change."""
    await write_many(conn, [envelope])


async def write_many(conn: Conn, events: Iterable[Envelope[Any] | EncodedEvent]) -> None:
    """Record several events in one statement (fan-outs write thousands), as envelopes or
    already encoded (`herald.encoded_events`, for producers that write them by the thousand)."""
    context_headers = _headers(logs.correlation_id.get())  # of the events that carry none
    rows = [_row(e, context_headers) for e in events]
    if not rows:
        return
    await conn.execute(
        """INSERT INTO outbox (event_id, topic, key, payload, headers)
           SELECT e, t, k, p, h::jsonb
           FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::bytea[], $5::text[])
                AS batch(e, t, k, p, h)""",
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
        [r[4] for r in rows],
    )


async def pending(conn: Conn, *, limit: int) -> list[asyncpg.Record]:
    """The oldest unpublished events, in the order they were written."""
    return list(
        await conn.fetch(
            # Headers as text: rows sharing them are decoded once, in `publish`.
            """SELECT seq, topic, key, payload, headers::text AS headers FROM outbox
               WHERE published_at IS NULL ORDER BY seq LIMIT $1""",
            limit,
        )
    )


async def publish(
    producer: AIOKafkaProducer, rows: Sequence[asyncpg.Record]
) -> list[RecordMetadata]:
    """Send every row and wait until the broker acknowledged all of them; their acknowledgements.

    Rows go out as whole record batches, one per partition (more when one fills up), each in the
    order of the rows, instead of one `send` (a future and an append) per row. A key goes to the
    partition Kafka's default partitioner gives it, as with `create_producer`'s producer."""
    by_partition: dict[tuple[str, int], list[int]] = {}
    numbers: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        topic, key = row["topic"], row["key"]
        partitions = numbers.get(topic)
        if partitions is None:
            partitions = numbers[topic] = sorted(await producer.partitions_for(topic))
        if key is None:
            available = producer.client.cluster.available_partitions_for_topic(topic)
            partition = random.choice(list(available) or partitions)  # noqa: S311 - spreading
        else:
            partition = partitions[positive_hash(key) % len(partitions)]
        by_partition.setdefault((topic, partition), []).append(index)

    headers: dict[str, list[tuple[str, bytes]]] = {}
    sent: list[tuple[asyncio.Future[RecordMetadata], list[tuple[int, Any]]]] = []
    for (topic, partition), indexes in by_partition.items():
        batch = producer.create_batch()
        appended: list[tuple[int, Any]] = []
        for index in indexes:
            row = rows[index]
            # Rows of one request or consumed event share their headers: encode them once.
            text = row["headers"]
            encoded = headers.get(text)
            if encoded is None:
                encoded = headers[text] = [(n, str(v).encode()) for n, v in orjson.loads(text)]
            key, value = row["key"], row["payload"]
            record = batch.append(timestamp=None, key=key, value=value, headers=encoded)
            if record is None:  # full: it goes, and this row starts the next one
                sent.append((await _send(producer, batch, topic, partition), appended))
                batch, appended = producer.create_batch(), []
                # A batch always takes its first record, whatever its size.
                record = batch.append(timestamp=None, key=key, value=value, headers=encoded)
            appended.append((index, record))
        sent.append((await _send(producer, batch, topic, partition), appended))

    outcomes = await asyncio.gather(*(future for future, _ in sent), return_exceptions=True)
    acks: list[RecordMetadata] = [None] * len(rows)
    for outcome, (_, appended) in zip(outcomes, sent, strict=True):
        if isinstance(outcome, BaseException):
            raise outcome
        for index, record in appended:
            acks[index] = _ack(outcome, record)
    for (topic, _), indexes in by_partition.items():
        EVENTS_PUBLISHED.labels(topic).inc(len(indexes))
    return acks


async def _send(
    producer: AIOKafkaProducer, batch: Any, topic: str, partition: int
) -> asyncio.Future[RecordMetadata]:
    # Closed, so the producer sends it at once rather than lingering for records it cannot get.
    batch.close()
    future: asyncio.Future[RecordMetadata] = await producer.send_batch(
        batch, topic, partition=partition
    )
    return future


def _ack(batch: RecordMetadata, record: Any) -> RecordMetadata:
    """One record's acknowledgement, as `send` would have given it, from its batch's."""
    # -1: the broker keeps the producer's timestamps (CreateTime), so each record has its own.
    timestamp = record.timestamp if batch.timestamp == -1 else batch.timestamp
    return RecordMetadata(
        batch.topic,
        batch.partition,
        batch.topic_partition,
        batch.offset + record.offset,
        timestamp,
        batch.timestamp_type,
        batch.log_start_offset,
    )


async def mark_published(
    conn: Conn, *, seqs: Sequence[int], acks: Sequence[RecordMetadata]
) -> None:
    """Record that the broker acknowledged these rows, and where it put each."""
    await conn.execute(
        """UPDATE outbox SET published_at = now(), kafka_partition = a.p, kafka_offset = a.o
           FROM unnest($1::bigint[], $2::int[], $3::bigint[]) AS a(s, p, o)
           WHERE outbox.seq = a.s""",
        list(seqs),
        [a.partition for a in acks],
        [a.offset for a in acks],
    )


async def backlog(conn: Conn) -> int:
    """How many events wait for publication."""
    count: int = await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
    return count


async def republish(
    conn: Conn, since: datetime | None, *, partitions: Collection[TopicPartition] | None = None
) -> int:
    """Queue again the events published at or after `since` (None: all retained), optionally only
    those put on `partitions`; returns how many. Safe: consumers skip event ids they have seen."""
    topics = [tp.topic for tp in partitions or ()]
    numbers = [tp.partition for tp in partitions or ()]
    async with conn.transaction():
        status: str = await conn.execute(
            """UPDATE outbox SET published_at = NULL, kafka_partition = NULL, kafka_offset = NULL
               WHERE published_at IS NOT NULL
                 AND ($1::timestamptz IS NULL OR published_at >= $1)
                 AND ($2::boolean OR (topic, kafka_partition) IN (
                        SELECT * FROM unnest($3::text[], $4::int[])))""",
            since,
            partitions is None,
            topics,
            numbers,
        )
        # Wakes the relay at once (the trigger fires on INSERT only).
        await conn.execute("SELECT pg_notify(current_schema() || '_outbox', '')")
    return int(status.split()[-1])


async def sweep(conn: Conn, *, older_than_hours: int, limit: int = 10000) -> int:
    """Forget up to `limit` events published more than `older_than_hours` ago; how many."""
    status: str = await conn.execute(
        """DELETE FROM outbox WHERE seq IN (
               SELECT seq FROM outbox
               WHERE published_at < now() - make_interval(hours => $1) LIMIT $2)""",
        older_than_hours,
        limit,
    )
    return int(status.split()[-1])


async def acknowledged(conn: Conn) -> dict[TopicPartition, tuple[int, int]]:
    """Per partition, the lowest offset of the relay's latest publication there (one statement
    marks a publication, so its rows share `published_at`) and the highest offset overall."""
    rows = await conn.fetch(
        """SELECT topic, kafka_partition, max(kafka_offset) AS highest,
                  min(kafka_offset) FILTER (WHERE published_at = latest) AS floor
           FROM (SELECT topic, kafka_partition, kafka_offset, published_at,
                        max(published_at) OVER (PARTITION BY topic, kafka_partition) AS latest
                 FROM outbox WHERE kafka_offset IS NOT NULL) AS published
           GROUP BY topic, kafka_partition"""
    )
    return {
        TopicPartition(r["topic"], r["kafka_partition"]): (r["floor"], r["highest"]) for r in rows
    }


class OutboxRelay:
    """Publishes a service's outbox; wakes on NOTIFY and polls as a fallback. As leader it also
    watches for a broker that lost what it acknowledged, and sweeps out expired published rows."""

    def __init__(
        self,
        *,
        dsn: str,
        schema: str,
        producer: AIOKafkaProducer,
        batch_size: int = 1000,
        poll_interval: float = 1.0,
        retention_hours: int = DEFAULT_RETENTION_HOURS,
        broker_check_interval: float = 2.0,
        sweep_interval: float = 600.0,
    ) -> None:
        self._dsn = dsn
        self._schema = schema
        self._producer = producer
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._retention_hours = retention_hours
        self._broker_check_interval = broker_check_interval
        self._sweep_interval = sweep_interval
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        # Per partition, the highest offset the broker gave us (a later one at or below it means a
        # new log), and the lowest of our latest publication there: a log whose end is at or
        # below that one lost events. Not the highest: the embedded broker reports the end of a
        # log as its last batch's first offset plus one.
        self._acked: dict[TopicPartition, int] = {}
        self._floor: dict[TopicPartition, int] = {}
        self.is_leader = False

    def stop(self) -> None:
        """Finish the pass under way, then return from `run`."""
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        """Relay until stopped, reconnecting after database or broker failures."""
        delay = 0.5
        while not self._stopping.is_set():
            try:
                await self._lead_and_relay()
                delay = 0.5
            except Exception as exc:
                if self._stopping.is_set():
                    break
                log.warning("outbox relay interrupted, retrying", extra={"error": repr(exc)})
                await self._sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _lead_and_relay(self) -> None:
        conn = await db.connect(self._dsn, schema=self._schema)
        try:
            while not await conn.fetchval(
                "SELECT pg_try_advisory_lock(hashtext($1))", f"herald-outbox:{self._schema}"
            ):
                await self._sleep(self._poll_interval * 2)
                if self._stopping.is_set():
                    return
            self.is_leader = True
            await conn.add_listener(f"{self._schema}_outbox", self._on_notify)
            # From the database, so a relay started after the broker lost its memory notices too.
            known = await acknowledged(conn)
            self._floor = {tp: floor for tp, (floor, _) in known.items()}
            self._acked = {tp: highest for tp, (_, highest) in known.items()}
            next_check = next_sweep = time.monotonic()
            while not self._stopping.is_set():
                published = await self.relay_once(conn)
                now = time.monotonic()
                if now >= next_check:
                    await self.check_broker(conn)
                    next_check = now + self._broker_check_interval
                if now >= next_sweep:
                    await self._sweep(conn)
                    next_sweep = now + self._sweep_interval
                if published < self._batch_size:
                    await self._sleep(min(self._poll_interval, self._broker_check_interval))
        finally:
            self.is_leader = False
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)

    async def relay_once(self, conn: Conn) -> int:
        """Publish one batch of pending events; returns how many."""
        self._wake.clear()
        rows = await pending(conn, limit=self._batch_size)
        if rows:
            acks = await publish(self._producer, rows)
            await mark_published(conn, seqs=[r["seq"] for r in rows], acks=acks)
            went_back = self._note(acks)
            if went_back:
                await self._recover(conn, went_back, "an acknowledgement")
        OUTBOX_BACKLOG.set(await backlog(conn) if len(rows) == self._batch_size else 0)
        return len(rows)

    async def check_broker(self, conn: Conn) -> None:
        """Queue again what this service published on partitions whose log now ends too early."""
        if not self._floor:
            return
        try:
            async with asyncio.timeout(5):
                ends = await end_offsets(self._producer, list(self._floor))
        except (KafkaError, OSError, TimeoutError) as exc:
            log.debug("cannot read end offsets", extra={"error": repr(exc)})
            return
        lost = {tp for tp, end in ends.items() if end <= self._floor.get(tp, -1)}
        lost |= self._vanished()
        if lost:
            await self._recover(conn, lost, "the end offsets")

    def _vanished(self) -> set[TopicPartition]:
        """Partitions we published on that the topic, as the broker now has it, does not have: a
        topic created again with fewer partitions (the embedded broker creates a topic a client
        asks for before Herald does, with its own count) lost them, and `end_offsets` leaves
        them out."""
        cluster = self._producer.client.cluster
        vanished = set()
        for tp in self._floor:
            partitions = cluster.partitions_for_topic(tp.topic)
            if partitions and tp.partition not in partitions:
                vanished.add(tp)
        return vanished

    def _note(self, acks: Iterable[RecordMetadata]) -> set[TopicPartition]:
        """Remember where the broker put this publication; the partitions whose log went back."""
        went_back: set[TopicPartition] = set()
        lowest: dict[TopicPartition, int] = {}
        highest: dict[TopicPartition, int] = {}
        for ack in acks:
            tp = TopicPartition(ack.topic, ack.partition)
            if ack.offset <= self._acked.get(tp, -1):
                went_back.add(tp)
            lowest[tp] = min(ack.offset, lowest.get(tp, ack.offset))
            highest[tp] = max(ack.offset, highest.get(tp, ack.offset))
        for tp in lowest.keys() - went_back:
            self._floor[tp] = lowest[tp]
            self._acked[tp] = highest[tp]
        return went_back

    async def _recover(self, conn: Conn, lost: set[TopicPartition], seen_in: str) -> None:
        # Every retained row of those partitions, not only recent ones: the broker may have held
        # events for a long time that no consumer had read. Rows already in the new log arrive
        # twice, and consumers' inboxes skip them.
        count = await republish(conn, None, partitions=lost)
        for tp in lost:
            self._acked.pop(tp, None)
            self._floor.pop(tp, None)
        OUTBOX_REPUBLISHED.inc(count)
        log.warning(
            "the broker lost published events; publishing them again",
            extra={
                "schema": self._schema,
                "partitions": sorted(f"{tp.topic}/{tp.partition}" for tp in lost),
                "events": count,
                "seen_in": seen_in,
            },
        )

    async def _sweep(self, conn: Conn) -> None:
        # In slices, so a long backlog of expired rows never holds locks for long.
        for _ in range(1000):
            if await sweep(conn, older_than_hours=self._retention_hours) == 0:
                break

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)


_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """`15m`, `2h`, `3d`, `90s` before now, or an ISO 8601 time (UTC unless it says)."""
    if match := _DURATION.match(text.strip()):
        delta = timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
        return (now or datetime.now(UTC)) - delta
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since: expected 15m, 2h, 1d or an ISO time, not {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _since_argument(text: str) -> datetime:
    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def republish_services(dsn: str, services: list[str], since: datetime) -> dict[str, int]:
    """Queue again, in each service's schema, what its outbox published since `since`."""
    counts = {}
    for service in services:
        conn = await db.connect(dsn, schema=service)
        try:
            counts[service] = await republish(conn, since)
        finally:
            await conn.close()
    return counts


def main(argv: list[str] | None = None) -> None:
    from herald.settings import EMBEDDED_DATABASE_URL, SERVICE_PORTS

    services = [s for s in SERVICE_PORTS if s != "gateway"]
    parser = argparse.ArgumentParser(description="Operate services' outboxes.")
    commands = parser.add_subparsers(dest="command", required=True)
    again = commands.add_parser(
        "republish",
        help="publish again what the outboxes published since a time (after a broker lost it)",
    )
    again.add_argument("--since", required=True, type=_since_argument, help="15m, 2h, 1d, ISO time")
    again.add_argument("--service", choices=services, help="one service (default: all)")
    again.add_argument("--database-url", default=None)
    args = parser.parse_args(argv)
    dsn = args.database_url or os.environ.get("DATABASE_URL") or EMBEDDED_DATABASE_URL
    chosen = [args.service] if args.service else services
    for service, count in asyncio.run(republish_services(dsn, chosen, args.since)).items():
        print(f"{service}: {count} events queued again (published since {args.since.isoformat()})")


if __name__ == "__main__":
    main()
