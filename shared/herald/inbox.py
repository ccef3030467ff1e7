"""The idempotent inbox: an event's effect and the record of its id commit together."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from herald.db import Conn


async def claim(conn: Conn, *, event_id: uuid.UUID, topic: str) -> bool:
    """Record `event_id` in this transaction; False when it was processed before (skip it)."""
    row = await conn.fetchval(
        "INSERT INTO inbox (event_id, topic) VALUES ($1, $2)"
        " ON CONFLICT (event_id) DO NOTHING RETURNING true",
        event_id,
        topic,
    )
    return row is True


async def claim_many(conn: Conn, *, event_ids: Sequence[uuid.UUID], topic: str) -> set[uuid.UUID]:
    """Record each of `event_ids` (distinct) in this transaction; those not processed before."""
    rows = await conn.fetch(
        "INSERT INTO inbox (event_id, topic) SELECT unnest($1::uuid[]), $2"
        " ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
        event_ids,
        topic,
    )
    return {row["event_id"] for row in rows}


async def prune(conn: Conn, *, older_than_days: int) -> int:
    """Forget ids older than Kafka could redeliver; returns how many were removed."""
    status: str = await conn.execute(
        "DELETE FROM inbox WHERE received_at < now() - make_interval(days => $1)", older_than_days
    )
    return int(status.split()[-1])
