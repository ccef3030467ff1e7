"""All SQL of the scheduler service."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg

from herald.db import Conn
from scheduler.domain import Progress


async def timer_state(conn: Conn, *, email_id: uuid.UUID) -> asyncpg.Record | None:
    """The timer of `email_id` (revision and state), locked for this transaction."""
    return await conn.fetchrow(
        "SELECT revision, state FROM timers WHERE email_id = $1 FOR UPDATE", email_id
    )


async def put_timer(
    conn: Conn,
    *,
    email_id: uuid.UUID,
    account_id: uuid.UUID | None,
    revision: int,
    send_at: datetime,
    payload: dict[str, Any],
) -> None:
    """Create the timer of `email_id`, or replace it with a newer revision (pending again)."""
    await conn.execute(
        """INSERT INTO timers (email_id, account_id, revision, send_at, payload)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (email_id) DO UPDATE
              SET revision = EXCLUDED.revision, send_at = EXCLUDED.send_at,
                  payload = EXCLUDED.payload, state = 'pending', updated_at = now()""",
        email_id,
        account_id,
        revision,
        send_at,
        payload,
    )


async def cancel_timer(
    conn: Conn, *, email_id: uuid.UUID, account_id: uuid.UUID | None, revision: int
) -> None:
    """Cancel the timer (a tombstone if none yet, so an older schedule arriving late is ignored)."""
    await conn.execute(
        """INSERT INTO timers (email_id, account_id, revision, send_at, payload, state)
           VALUES ($1, $2, $3, now(), '{}'::jsonb, 'cancelled')
           ON CONFLICT (email_id) DO UPDATE
              SET state = 'cancelled', revision = GREATEST(timers.revision, EXCLUDED.revision),
                  updated_at = now()
            WHERE timers.state = 'pending' AND timers.revision <= EXCLUDED.revision""",
        email_id,
        account_id,
        revision,
    )


async def cancel_fanout(conn: Conn, *, email_id: uuid.UUID) -> asyncpg.Record | None:
    """Stop a running fan-out before its next batch; how far it got, None if none was running."""
    return await conn.fetchrow(
        """UPDATE fanouts SET state = 'cancelled', finished_at = now()
            WHERE email_id = $1 AND state = 'running'
        RETURNING revision, total, batch_no""",
        email_id,
    )


async def claim_due_timers(conn: Conn, *, limit: int) -> list[asyncpg.Record]:
    """Due pending timers, locked so that no other replica fires them; call in a transaction."""
    return list(
        await conn.fetch(
            """SELECT email_id, account_id, revision, send_at, payload FROM timers
                WHERE state = 'pending' AND send_at <= now()
                ORDER BY send_at
                LIMIT $1
                FOR UPDATE SKIP LOCKED""",
            limit,
        )
    )


async def fire_timer(conn: Conn, *, email_id: uuid.UUID, revision: int) -> None:
    """Mark the timer fired and open its fan-out at the start of the audience."""
    await conn.execute(
        "UPDATE timers SET state = 'fired', fired_at = now(), updated_at = now()"
        " WHERE email_id = $1",
        email_id,
    )
    # An email fans out once: a fired timer never becomes pending again (see domain.replaces).
    await conn.execute(
        """INSERT INTO fanouts (email_id, revision) VALUES ($1, $2)
           ON CONFLICT (email_id) DO NOTHING""",
        email_id,
        revision,
    )


async def pending_timers(conn: Conn) -> int:
    """How many timers wait for their time."""
    count: int = await conn.fetchval("SELECT count(*) FROM timers WHERE state = 'pending'")
    return count


async def next_due(conn: Conn) -> datetime | None:
    """When the earliest pending timer is due."""
    due: datetime | None = await conn.fetchval(
        "SELECT min(send_at) FROM timers WHERE state = 'pending'"
    )
    return due


async def claim_fanout(
    conn: Conn, *, owner: uuid.UUID, lease_seconds: float
) -> asyncpg.Record | None:
    """Take one running fan-out nobody holds (or whose holder stopped renewing it)."""
    return await conn.fetchrow(
        """UPDATE fanouts f
              SET owner = $1, lease_until = now() + make_interval(secs => $2)
             FROM timers t
            WHERE t.email_id = f.email_id
              AND f.email_id = (SELECT email_id FROM fanouts
                                 WHERE state = 'running' AND lease_until < now()
                                 ORDER BY started_at
                                 LIMIT 1
                                 FOR UPDATE SKIP LOCKED)
        RETURNING f.email_id, f.revision, f.phase, f.to_offset, f.cursor, f.batch_no, f.total,
                  f.attempts, f.started_at, t.account_id, t.payload""",
        owner,
        lease_seconds,
    )


async def advance_fanout(
    conn: Conn,
    *,
    email_id: uuid.UUID,
    owner: uuid.UUID,
    before: Progress,
    after: Progress,
    lease_seconds: float,
    finished: str | None = None,
) -> bool:
    """Move the fan-out from `before` to `after` if it is still ours and still there.

    False means another replica took it over, or it was cancelled: the caller's transaction
    (holding the batch's outbox rows) must roll back.
    """
    status: str = await conn.execute(
        """UPDATE fanouts
              SET phase = $4, to_offset = $5, cursor = $6, batch_no = $7, total = $8,
                  lease_until = now() + make_interval(secs => $9), attempts = 0,
                  state = COALESCE($10, state),
                  finished_at = CASE WHEN $10::text IS NULL THEN NULL ELSE now() END
            WHERE email_id = $1 AND owner = $2 AND state = 'running'
              AND phase = $3 AND to_offset = $11 AND cursor IS NOT DISTINCT FROM $12
              AND batch_no = $13""",
        email_id,
        owner,
        before.phase,
        after.phase,
        after.to_offset,
        after.cursor,
        after.batch_no,
        after.total,
        lease_seconds,
        finished,
        before.to_offset,
        before.cursor,
        before.batch_no,
    )
    return status.endswith(" 1")


async def postpone_fanout(
    conn: Conn, *, email_id: uuid.UUID, owner: uuid.UUID, delay_seconds: float, error: str
) -> None:
    """Give a fan-out back to be tried again after `delay_seconds` (its audience was not
    reachable), so that the replica goes on with other fan-outs meanwhile."""
    await conn.execute(
        """UPDATE fanouts
              SET owner = NULL, lease_until = now() + make_interval(secs => $3),
                  attempts = attempts + 1, last_error = $4
            WHERE email_id = $1 AND owner = $2 AND state = 'running'""",
        email_id,
        owner,
        delay_seconds,
        error,
    )


async def release_fanout(conn: Conn, *, email_id: uuid.UUID, owner: uuid.UUID) -> None:
    """Give a fan-out back at once (on shutdown), so another replica need not wait for the lease."""
    await conn.execute(
        "UPDATE fanouts SET owner = NULL, lease_until = '-infinity'"
        " WHERE email_id = $1 AND owner = $2",
        email_id,
        owner,
    )


async def fanout_progress(conn: Conn, *, email_id: uuid.UUID) -> asyncpg.Record | None:
    """The fan-out of `email_id` as stored (for tests and operators)."""
    return await conn.fetchrow("SELECT * FROM fanouts WHERE email_id = $1", email_id)
