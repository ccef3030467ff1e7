"""The transactional outbox: events are written with the state change, then relayed to Kafka.

`write` inserts into the service's `outbox` table inside the caller's transaction, so an event
exists if and only if its state change committed. One relay per service (a Postgres advisory
lock elects it among replicas, which keeps per-key order) publishes pending rows, waits for the
broker's acknowledgement, and only then deletes them. A relay that dies between publishing and
deleting publishes those rows again: delivery is at least once, and consumers deduplicate by
event id in their inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

from herald import db, logs
from herald.db import Conn
from herald.events import Envelope
from herald.metrics import EVENTS_PUBLISHED, OUTBOX_BACKLOG

log = logging.getLogger(__name__)


def _row(envelope: Envelope[Any]) -> tuple[Any, ...]:
    key = envelope.data.partition_key()
    cid = envelope.correlation_id or logs.correlation_id.get()
    headers = [["correlation_id", cid]] if cid else []
    return (
        envelope.id,
        envelope.topic,
        key.encode() if key is not None else None,
        envelope.to_bytes(),
        # As JSON text: asyncpg would read a list of lists as a two-dimensional array.
        orjson.dumps(headers).decode(),
    )


async def write(conn: Conn, envelope: Envelope[Any]) -> None:
    """Record `envelope` for publication; call inside the transaction of the state change."""
    await write_many(conn, [envelope])


async def write_many(conn: Conn, envelopes: Iterable[Envelope[Any]]) -> None:
    """Record several events in one statement (fan-outs write thousands)."""
    rows = [_row(e) for e in envelopes]
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
            "SELECT seq, topic, key, payload, headers FROM outbox ORDER BY seq LIMIT $1", limit
        )
    )


async def publish(producer: AIOKafkaProducer, rows: Sequence[asyncpg.Record]) -> None:
    """Send every row and wait until the broker acknowledged all of them."""
    futures = []
    for row in rows:
        headers = [(name, str(value).encode()) for name, value in row["headers"]]
        futures.append(
            await producer.send(row["topic"], value=row["payload"], key=row["key"], headers=headers)
        )
    await asyncio.gather(*futures)
    for row in rows:
        EVENTS_PUBLISHED.labels(row["topic"]).inc()


async def mark_published(conn: Conn, *, seqs: Sequence[int]) -> None:
    """Forget rows the broker has acknowledged."""
    await conn.execute("DELETE FROM outbox WHERE seq = ANY($1::bigint[])", list(seqs))


async def backlog(conn: Conn) -> int:
    """How many events wait for publication."""
    count: int = await conn.fetchval("SELECT count(*) FROM outbox")
    return count


class OutboxRelay:
    """Publishes a service's outbox; wakes on NOTIFY and polls as a fallback."""

    def __init__(
        self,
        *,
        dsn: str,
        schema: str,
        producer: AIOKafkaProducer,
        batch_size: int = 1000,
        poll_interval: float = 1.0,
    ) -> None:
        self._dsn = dsn
        self._schema = schema
        self._producer = producer
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
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
            while not self._stopping.is_set():
                published = await self.relay_once(conn)
                if published < self._batch_size:
                    await self._sleep(self._poll_interval)
        finally:
            self.is_leader = False
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)

    async def relay_once(self, conn: Conn) -> int:
        """Publish one batch of pending events; returns how many."""
        self._wake.clear()
        rows = await pending(conn, limit=self._batch_size)
        if rows:
            await publish(self._producer, rows)
            await mark_published(conn, seqs=[r["seq"] for r in rows])
        OUTBOX_BACKLOG.set(await backlog(conn) if len(rows) == self._batch_size else 0)
        return len(rows)

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
