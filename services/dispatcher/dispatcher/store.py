"""All SQL of the dispatcher service."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from dispatcher.domain import GAVE_UP
from herald.db import Conn

# Columns a dispatcher needs to build and account for a claimed message (constant, ours).
_JOB_COLUMNS = """m.id, m.email_id, m.revision, m.account_id, m.recipient, m.contact_id,
    m.first_name, m.last_name, m.attributes, m.attempts, m.queued_at"""
# Columns an outcome event is made of.
_OUTCOME_COLUMNS = """m.id, m.email_id, m.account_id, m.recipient, m.contact_id, m.state,
    m.attempts, m.smtp_code, m.smtp_reply"""


async def save_content(
    conn: Conn,
    *,
    email_id: uuid.UUID,
    revision: int,
    account_id: uuid.UUID,
    kind: str,
    content: dict[str, Any],
    template_vars: dict[str, Any],
) -> None:
    """Keep what an email's messages are built from (the first copy of a revision wins)."""
    await conn.execute(
        """INSERT INTO email_contents (email_id, revision, account_id, kind, content, template_vars)
           VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING""",
        email_id,
        revision,
        account_id,
        kind,
        content,
        template_vars,
    )


async def queue_messages(
    conn: Conn,
    *,
    email_id: uuid.UUID,
    revision: int,
    account_id: uuid.UUID,
    recipients: Sequence[str],
    contact_ids: Sequence[uuid.UUID | None],
    first_names: Sequence[str | None],
    last_names: Sequence[str | None],
    attributes: Sequence[dict[str, Any]],
) -> int:
    """Queue a message per recipient not queued for this email before; returns how many."""
    status: str = await conn.execute(
        """INSERT INTO messages (email_id, revision, account_id, recipient, contact_id,
                                 first_name, last_name, attributes)
           SELECT $1, $2, $3, r, c, f, l, a
           FROM unnest($4::text[], $5::uuid[], $6::text[], $7::text[], $8::jsonb[])
                AS batch(r, c, f, l, a)
           ON CONFLICT (email_id, lower(recipient)) DO NOTHING""",
        email_id,
        revision,
        account_id,
        list(recipients),
        list(contact_ids),
        list(first_names),
        list(last_names),
        list(attributes),
    )
    return int(status.split()[-1])


async def record_unsendable(
    conn: Conn,
    *,
    email_id: uuid.UUID,
    revision: int,
    account_id: uuid.UUID,
    recipients: Sequence[str],
    contact_ids: Sequence[uuid.UUID | None],
    reasons: Sequence[str],
) -> list[asyncpg.Record]:
    """Record recipients that cannot be mailed as failed at once; returns the new records."""
    return list(
        await conn.fetch(
            f"""INSERT INTO messages AS m (email_id, revision, account_id, recipient, contact_id,
                                           state, smtp_reply, finished_at)
                SELECT $1, $2, $3, r, c, 'failed', why, now()
                FROM unnest($4::text[], $5::uuid[], $6::text[]) AS batch(r, c, why)
                ON CONFLICT (email_id, lower(recipient)) DO NOTHING
                RETURNING {_OUTCOME_COLUMNS}""",
            email_id,
            revision,
            account_id,
            list(recipients),
            list(contact_ids),
            list(reasons),
        )
    )


async def requeue_given_up(
    conn: Conn, *, email_id: uuid.UUID, account_id: uuid.UUID, besides: Sequence[str] = ()
) -> int:
    """Queue again the email's messages that failed only because their retries ran out (the
    delivery engine's `GAVE_UP` reply: 4xx, timeouts, lost connections), but those to the
    lower-cased addresses `besides`, due now with a fresh retry horizon; returns how many.
    `attempts` goes on counting."""
    status: str = await conn.execute(
        """UPDATE messages
           SET state = 'queued', next_attempt_at = now(), queued_at = now(), finished_at = NULL,
               smtp_code = NULL, smtp_reply = NULL, claimed_by = NULL, handed_over_at = NULL
           WHERE email_id = $1 AND account_id = $2 AND state = 'failed'
             AND starts_with(smtp_reply, $4) AND lower(recipient) <> ALL($3::text[])""",
        email_id,
        account_id,
        list(besides),
        GAVE_UP,
    )
    requeued = int(status.split()[-1])
    if requeued:
        # Wake the dispatchers listening, as new messages do.
        await conn.execute("SELECT pg_notify(current_schema() || '_messages', '')")
    return requeued


async def failed_messages(
    conn: Conn, *, email_id: uuid.UUID, account_id: uuid.UUID
) -> list[asyncpg.Record]:
    """The email's failed message records, as outcome events are made of them."""
    return list(
        await conn.fetch(
            f"""SELECT {_OUTCOME_COLUMNS} FROM messages m
                WHERE m.email_id = $1 AND m.account_id = $2 AND m.state = 'failed'""",
            email_id,
            account_id,
        )
    )


async def claim(
    conn: Conn, *, owner: uuid.UUID, limit: int, skip_accounts: Sequence[uuid.UUID] = ()
) -> list[asyncpg.Record]:
    """Take up to `limit` due messages for `owner` (queued/deferred -> sending, one more attempt).

    Rows other dispatchers are taking are skipped, not waited for.
    """
    return list(
        await conn.fetch(
            f"""UPDATE messages m
                SET state = 'sending', claimed_by = $1, attempts = m.attempts + 1,
                    handed_over_at = NULL
                FROM (SELECT id FROM messages
                      WHERE state IN ('queued', 'deferred') AND next_attempt_at <= now()
                        AND account_id <> ALL($3::uuid[])
                      ORDER BY next_attempt_at
                      LIMIT $2
                      FOR UPDATE SKIP LOCKED) due
                WHERE m.id = due.id
                RETURNING {_JOB_COLUMNS}""",
            owner,
            limit,
            list(skip_accounts),
        )
    )


async def release(
    conn: Conn,
    *,
    owner: uuid.UUID,
    ids: Sequence[uuid.UUID],
    due_at: Sequence[datetime] | None = None,
) -> int:
    """Give claimed messages back unsent (the attempt did not happen), due at `due_at` or now."""
    status: str = await conn.execute(
        """UPDATE messages m
           SET state = CASE WHEN m.attempts > 1 THEN 'deferred' ELSE 'queued' END,
               attempts = m.attempts - 1, claimed_by = NULL, handed_over_at = NULL,
               next_attempt_at = coalesce(r.due, now())
           FROM unnest($2::uuid[], $3::timestamptz[]) AS r(id, due)
           WHERE m.id = r.id AND m.claimed_by = $1 AND m.state = 'sending'""",
        owner,
        list(ids),
        list(due_at) if due_at is not None else [None] * len(ids),
    )
    return int(status.split()[-1])


async def contents(conn: Conn, *, keys: Sequence[tuple[uuid.UUID, int]]) -> list[asyncpg.Record]:
    """The stored content of each (email id, revision)."""
    return list(
        await conn.fetch(
            """SELECT c.email_id, c.revision, c.account_id, c.kind, c.content, c.template_vars
               FROM email_contents c
               JOIN unnest($1::uuid[], $2::int[]) AS k(e, r)
                 ON c.email_id = k.e AND c.revision = k.r""",
            [k[0] for k in keys],
            [k[1] for k in keys],
        )
    )


async def begin(conn: Conn) -> None:
    """Open a transaction on a connection that manages its own (see `commit_and_begin`)."""
    await conn.execute("BEGIN")


async def commit_and_begin(conn: Conn) -> None:
    """Commit the transaction under way and open the next one, in one round trip."""
    await conn.execute("COMMIT; BEGIN")


async def rollback(conn: Conn) -> None:
    """Roll back the transaction under way."""
    await conn.execute("ROLLBACK")


async def mark_handed_over(
    conn: Conn, *, owner: uuid.UUID, ids: Sequence[uuid.UUID]
) -> list[uuid.UUID]:
    """Note that these messages' ends go to the relay now; returns those still ours to send."""
    # The statement's time: the transaction may have begun a while before (`commit_and_begin`).
    rows = await conn.fetch(
        """UPDATE messages SET handed_over_at = statement_timestamp()
           WHERE id = ANY($2::uuid[]) AND claimed_by = $1 AND state = 'sending'
           RETURNING id""",
        owner,
        list(ids),
    )
    return [row["id"] for row in rows]


async def unmark_handed_over(conn: Conn, *, ids: Sequence[uuid.UUID]) -> None:
    """Take the note back for messages whose end could not be written after all."""
    await conn.execute(
        "UPDATE messages SET handed_over_at = NULL WHERE id = ANY($1::uuid[])", list(ids)
    )


async def record_outcomes(
    conn: Conn,
    *,
    owner: uuid.UUID,
    ids: Sequence[uuid.UUID],
    states: Sequence[str],
    codes: Sequence[int | None],
    replies: Sequence[str],
    next_attempts: Sequence[datetime | None],
) -> list[asyncpg.Record]:
    """Settle attempts of `owner`'s messages; returns the records that were still its own."""
    return list(
        await conn.fetch(
            f"""UPDATE messages m
                SET state = o.state, smtp_code = o.code, smtp_reply = o.reply,
                    claimed_by = NULL,
                    handed_over_at = CASE WHEN o.state = 'sent' THEN m.handed_over_at END,
                    next_attempt_at = coalesce(o.next_at, m.next_attempt_at),
                    finished_at = CASE WHEN o.state IN ('sent', 'failed') THEN now() END,
                    last_deferred_at = CASE WHEN o.state = 'deferred' THEN now()
                                            ELSE m.last_deferred_at END
                FROM unnest($2::uuid[], $3::text[], $4::int[], $5::text[], $6::timestamptz[])
                     AS o(id, state, code, reply, next_at)
                WHERE m.id = o.id AND m.claimed_by = $1 AND m.state = 'sending'
                RETURNING {_OUTCOME_COLUMNS}""",
            owner,
            list(ids),
            list(states),
            list(codes),
            list(replies),
            list(next_attempts),
        )
    )


async def lock_owner(conn: Conn, *, key: int) -> bool:
    """Hold `key` for this session: the mark of a live dispatcher process."""
    return bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", key))


async def owner_is_gone(conn: Conn, *, key: int) -> bool:
    """Whether no session holds `key` (its process is dead); holds it till the transaction ends."""
    return bool(await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", key))


async def owners_in_flight(conn: Conn, *, besides: uuid.UUID) -> list[uuid.UUID]:
    """Processes other than `besides` that have messages in `sending`."""
    rows = await conn.fetch(
        "SELECT DISTINCT claimed_by FROM messages WHERE state = 'sending' AND claimed_by <> $1",
        besides,
    )
    return [row["claimed_by"] for row in rows]


async def settle_orphans(
    conn: Conn, *, owner: uuid.UUID, reply: str, ids: Sequence[uuid.UUID] | None = None
) -> list[asyncpg.Record]:
    """`owner`'s messages (all, or those of `ids`) the relay had whole: sent. Returns them."""
    return list(
        await conn.fetch(
            f"""UPDATE messages m
                SET state = 'sent', smtp_code = NULL, smtp_reply = $2, claimed_by = NULL,
                    finished_at = now()
                WHERE m.claimed_by = $1 AND m.state = 'sending' AND m.handed_over_at IS NOT NULL
                  AND ($3::uuid[] IS NULL OR m.id = ANY($3::uuid[]))
                RETURNING {_OUTCOME_COLUMNS}""",
            owner,
            reply,
            list(ids) if ids is not None else None,
        )
    )


async def requeue_orphans(
    conn: Conn, *, owner: uuid.UUID, ids: Sequence[uuid.UUID] | None = None
) -> int:
    """`owner`'s other messages, never handed over: due again as if never claimed."""
    status: str = await conn.execute(
        """UPDATE messages
           SET state = CASE WHEN attempts > 1 THEN 'deferred' ELSE 'queued' END,
               attempts = attempts - 1, claimed_by = NULL, next_attempt_at = now()
           WHERE claimed_by = $1 AND state = 'sending' AND handed_over_at IS NULL
             AND ($2::uuid[] IS NULL OR id = ANY($2::uuid[]))""",
        owner,
        list(ids) if ids is not None else None,
    )
    return int(status.split()[-1])


async def claimed_by(conn: Conn, *, owner: uuid.UUID) -> list[uuid.UUID]:
    """The records `owner` has in `sending`."""
    rows = await conn.fetch(
        "SELECT id FROM messages WHERE claimed_by = $1 AND state = 'sending'", owner
    )
    return [row["id"] for row in rows]


async def backlog(conn: Conn) -> int:
    """Messages waiting to be sent (queued, or deferred until later)."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM messages WHERE state IN ('queued', 'deferred')"
    )
    return count


async def state_counts(conn: Conn, *, email_id: uuid.UUID | None = None) -> dict[str, int]:
    """Messages by state, of one email or (unfinished ones) of all."""
    if email_id is None:
        rows = await conn.fetch(
            """SELECT state, count(*) AS n FROM messages
               WHERE state IN ('queued', 'sending', 'deferred') GROUP BY state"""
        )
    else:
        rows = await conn.fetch(
            "SELECT state, count(*) AS n FROM messages WHERE email_id = $1 GROUP BY state",
            email_id,
        )
    return {row["state"]: row["n"] for row in rows}


async def message_by_id(conn: Conn, *, message_id: uuid.UUID) -> asyncpg.Record | None:
    """One message record."""
    return await conn.fetchrow(
        """SELECT id, email_id, account_id, recipient, contact_id, state, attempts,
                  next_attempt_at, smtp_code, smtp_reply, queued_at, finished_at
           FROM messages WHERE id = $1""",
        message_id,
    )


async def prune(conn: Conn, *, older_than_days: int, limit: int = 10000) -> int:
    """Delete finished messages (and contents left without any) older than the retention."""
    status: str = await conn.execute(
        """DELETE FROM messages WHERE id IN (
               SELECT id FROM messages
               WHERE finished_at < now() - make_interval(days => $1)
               LIMIT $2)""",
        older_than_days,
        limit,
    )
    await conn.execute(
        """DELETE FROM email_contents c
           WHERE c.received_at < now() - make_interval(days => $1)
             AND NOT EXISTS (SELECT 1 FROM messages m
                             WHERE m.email_id = c.email_id AND m.revision = c.revision)""",
        older_than_days,
    )
    return int(status.split()[-1])
