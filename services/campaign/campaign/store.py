"""All SQL of the campaign service."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any

import asyncpg

from herald.db import Conn

_EMAIL_COLUMNS = """id, account_id, kind, status, revision, subject, html, text, text_derived,
    from_name, from_email, reply_to, list_ids, contact_ids, to_addresses, tags, template_vars,
    idempotency_key, test_of, send_at, quota_day, reserved, recipients, sent_count, failed_count,
    failure_reason, created_at, updated_at, queued_at, completed_at"""


async def put_sender(
    conn: Conn,
    *,
    account_id: uuid.UUID,
    email: str,
    email_verified: bool,
    default_sender_name: str | None,
    reply_to: str | None,
    timezone: str,
    status: str,
    daily_send_quota: int | None,
) -> None:
    """Keep the latest identity and quota of an account, as auth published it."""
    await conn.execute(
        """INSERT INTO senders (account_id, email, email_verified, default_sender_name, reply_to,
                                timezone, status, daily_send_quota)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
           ON CONFLICT (account_id) DO UPDATE
              SET email = EXCLUDED.email, email_verified = EXCLUDED.email_verified,
                  default_sender_name = EXCLUDED.default_sender_name,
                  reply_to = EXCLUDED.reply_to, timezone = EXCLUDED.timezone,
                  status = EXCLUDED.status, daily_send_quota = EXCLUDED.daily_send_quota,
                  updated_at = now()""",
        account_id,
        email,
        email_verified,
        default_sender_name,
        reply_to,
        timezone,
        status,
        daily_send_quota,
    )


async def put_sender_unless_changed(
    conn: Conn,
    *,
    account_id: uuid.UUID,
    seen_at: datetime | None,
    email: str,
    email_verified: bool,
    default_sender_name: str | None,
    reply_to: str | None,
    timezone: str,
    status: str,
    daily_send_quota: int | None,
) -> bool:
    """Keep what auth answered when asked directly, only if the row is still as it was read
    before asking (`seen_at`: its `updated_at`, None: there was none); False if `user.changed`
    wrote it meanwhile, since that event may be newer than the answer."""
    values = (
        account_id,
        email,
        email_verified,
        default_sender_name,
        reply_to,
        timezone,
        status,
        daily_send_quota,
    )
    if seen_at is None:
        return (
            await conn.fetchval(
                """INSERT INTO senders (account_id, email, email_verified, default_sender_name,
                                        reply_to, timezone, status, daily_send_quota)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                   ON CONFLICT (account_id) DO NOTHING RETURNING true""",
                *values,
            )
            is not None
        )
    return (
        await conn.fetchval(
            """UPDATE senders
                  SET email = $2, email_verified = $3, default_sender_name = $4, reply_to = $5,
                      timezone = $6, status = $7, daily_send_quota = $8, updated_at = now()
                WHERE account_id = $1 AND updated_at = $9
            RETURNING true""",
            *values,
            seen_at,
        )
        is not None
    )


async def get_sender(conn: Conn, *, account_id: uuid.UUID) -> asyncpg.Record | None:
    """The account's sender identity and quota, if auth has told us about it (`updated_at`:
    when it was last written)."""
    return await conn.fetchrow(
        """SELECT email, email_verified, default_sender_name, reply_to, timezone, status,
                  daily_send_quota, updated_at
             FROM senders WHERE account_id = $1""",
        account_id,
    )


async def insert_email(
    conn: Conn,
    *,
    email_id: uuid.UUID,
    account_id: uuid.UUID,
    kind: str,
    subject: str,
    html: str | None,
    text: str | None,
    text_derived: bool,
    from_name: str | None,
    from_email: str | None,
    reply_to: str | None,
    list_ids: Sequence[uuid.UUID],
    contact_ids: Sequence[uuid.UUID],
    to: Sequence[str],
    tags: Sequence[str],
    template_vars: dict[str, Any],
    idempotency_key: str | None = None,
    test_of: uuid.UUID | None = None,
) -> asyncpg.Record | None:
    """A new draft; None if the account already has an email with this idempotency key."""
    return await conn.fetchrow(
        f"""INSERT INTO emails (id, account_id, kind, subject, html, text, text_derived,
                               from_name, from_email, reply_to, list_ids, contact_ids,
                               to_addresses, tags, template_vars, idempotency_key, test_of)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
            ON CONFLICT (account_id, idempotency_key) WHERE idempotency_key IS NOT NULL
            DO NOTHING
            RETURNING {_EMAIL_COLUMNS}""",
        email_id,
        account_id,
        kind,
        subject,
        html,
        text,
        text_derived,
        from_name,
        from_email,
        reply_to,
        list(list_ids),
        list(contact_ids),
        list(to),
        list(tags),
        template_vars,
        idempotency_key,
        test_of,
    )


async def email_by_idempotency_key(
    conn: Conn, *, account_id: uuid.UUID, idempotency_key: str
) -> asyncpg.Record | None:
    """The email the account created with this idempotency key, if any."""
    return await conn.fetchrow(
        f"SELECT {_EMAIL_COLUMNS} FROM emails WHERE account_id = $1 AND idempotency_key = $2",
        account_id,
        idempotency_key,
    )


async def get_email(
    conn: Conn, *, account_id: uuid.UUID, email_id: uuid.UUID, lock: bool = False
) -> asyncpg.Record | None:
    """One of the account's emails (locked for this transaction with `lock`)."""
    return await conn.fetchrow(
        f"SELECT {_EMAIL_COLUMNS} FROM emails"
        " WHERE id = $1 AND account_id = $2" + (" FOR UPDATE" if lock else ""),
        email_id,
        account_id,
    )


async def list_emails(
    conn: Conn,
    *,
    account_id: uuid.UUID,
    status: str | None,
    limit: int,
    before: tuple[datetime, uuid.UUID] | None,
) -> list[asyncpg.Record]:
    """The account's emails, newest first, after the keyset position `before` (test copies and
    Herald's own system mail to the account are left out)."""
    return list(
        await conn.fetch(
            f"""SELECT {_EMAIL_COLUMNS} FROM emails
                 WHERE account_id = $1 AND kind IN ('campaign', 'transactional')
                   AND ($2::text IS NULL OR status = $2)
                   AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4::uuid))
                 ORDER BY created_at DESC, id DESC
                 LIMIT $5""",
            account_id,
            status,
            before[0] if before else None,
            before[1] if before else None,
            limit,
        )
    )


async def update_draft(
    conn: Conn,
    *,
    email_id: uuid.UUID,
    subject: str,
    html: str | None,
    text: str | None,
    text_derived: bool,
    from_name: str | None,
    from_email: str | None,
    reply_to: str | None,
    list_ids: Sequence[uuid.UUID],
    contact_ids: Sequence[uuid.UUID],
    to: Sequence[str],
    tags: Sequence[str],
    template_vars: dict[str, Any],
) -> asyncpg.Record:
    """Replace a draft's content and audience."""
    row = await conn.fetchrow(
        f"""UPDATE emails
               SET subject = $2, html = $3, text = $4, text_derived = $5, from_name = $6,
                   from_email = $7, reply_to = $8, list_ids = $9, contact_ids = $10,
                   to_addresses = $11, tags = $12, template_vars = $13, updated_at = now()
             WHERE id = $1
         RETURNING {_EMAIL_COLUMNS}""",
        email_id,
        subject,
        html,
        text,
        text_derived,
        from_name,
        from_email,
        reply_to,
        list(list_ids),
        list(contact_ids),
        list(to),
        list(tags),
        template_vars,
    )
    assert row is not None
    return row


async def delete_draft(conn: Conn, *, account_id: uuid.UUID, email_id: uuid.UUID) -> bool:
    """Delete one of the account's drafts; False if there is no such draft."""
    status: str = await conn.execute(
        "DELETE FROM emails WHERE id = $1 AND account_id = $2 AND status = 'draft'",
        email_id,
        account_id,
    )
    return status.endswith(" 1")


async def lock_account_quota(conn: Conn, *, account_id: uuid.UUID) -> None:
    """Serialise quota checks of one account until this transaction ends."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"campaign-quota:{account_id}"
    )


async def quota_used(conn: Conn, *, account_id: uuid.UUID, day: date) -> int:
    """Recipients already counted against the account's quota on `day`."""
    used: int = await conn.fetchval(
        """SELECT COALESCE(sum(COALESCE(recipients, reserved)), 0) FROM emails
            WHERE account_id = $1 AND quota_day = $2 AND kind <> 'system'
              AND status NOT IN ('draft', 'cancelled')""",
        account_id,
        day,
    )
    return used


async def mark_queued(
    conn: Conn,
    *,
    email_id: uuid.UUID,
    status: str,
    send_at: datetime,
    from_email: str,
    from_name: str | None,
    reply_to: str | None,
    day: date,
    reserved: int,
) -> asyncpg.Record:
    """Hand the email over (queued now, or scheduled): bumps its revision."""
    row = await conn.fetchrow(
        f"""UPDATE emails
               SET status = $2, send_at = $3, from_email = $4, from_name = $5, reply_to = $6,
                   quota_day = $7, reserved = $8, revision = revision + 1,
                   queued_at = now(), updated_at = now()
             WHERE id = $1
         RETURNING {_EMAIL_COLUMNS}""",
        email_id,
        status,
        send_at,
        from_email,
        from_name,
        reply_to,
        day,
        reserved,
    )
    assert row is not None
    return row


async def mark_cancelled(conn: Conn, *, email_id: uuid.UUID) -> asyncpg.Record:
    """Cancel the email: bumps its revision so the scheduler drops the timer."""
    row = await conn.fetchrow(
        f"""UPDATE emails
               SET status = 'cancelled', revision = revision + 1, updated_at = now(),
                   completed_at = now()
             WHERE id = $1
         RETURNING {_EMAIL_COLUMNS}""",
        email_id,
    )
    assert row is not None
    return row


async def mark_fired(conn: Conn, *, email_id: uuid.UUID) -> None:
    """The scheduler's timer fired: a scheduled email is queued for delivery."""
    await conn.execute(
        """UPDATE emails SET status = 'queued', updated_at = now()
            WHERE id = $1 AND status = 'scheduled'""",
        email_id,
    )


async def mark_sending(conn: Conn, *, email_id: uuid.UUID) -> None:
    """A first delivery attempt was reported: the email is going out."""
    await conn.execute(
        """UPDATE emails SET status = 'sending', updated_at = now()
            WHERE id = $1 AND status IN ('scheduled', 'queued')""",
        email_id,
    )


async def mark_sending_many(conn: Conn, *, email_ids: Sequence[uuid.UUID]) -> None:
    """`mark_sending` of each of `email_ids`."""
    await conn.execute(
        """UPDATE emails SET status = 'sending', updated_at = now()
            WHERE id = ANY($1::uuid[]) AND status IN ('scheduled', 'queued')""",
        email_ids,
    )


async def record_fanout(
    conn: Conn, *, email_id: uuid.UUID, total: int, reason: str | None
) -> asyncpg.Record | None:
    """How many recipients the fan-out handed out; the email's status and counts after it."""
    return await conn.fetchrow(
        """UPDATE emails
              SET recipients = $2, failure_reason = COALESCE($3, failure_reason),
                  updated_at = now()
            WHERE id = $1
        RETURNING status, recipients, sent_count, failed_count""",
        email_id,
        total,
        reason,
    )


async def record_outcome(
    conn: Conn, *, email_id: uuid.UUID, recipient: str, status: str, retryable: bool = False
) -> asyncpg.Record | None:
    """Count a recipient's final outcome once; the email's status and counts, None if repeated
    (or the email is not ours)."""
    inserted = await conn.fetchval(
        """INSERT INTO outcomes (email_id, recipient, status, retryable)
           SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM emails WHERE id = $1)
           ON CONFLICT (email_id, recipient) DO NOTHING
           RETURNING true""",
        email_id,
        recipient.lower(),
        status,
        retryable,
    )
    if not inserted:
        return None
    return await conn.fetchrow(
        """UPDATE emails
              SET sent_count = sent_count + CASE WHEN $2 = 'sent' THEN 1 ELSE 0 END,
                  failed_count = failed_count + CASE WHEN $2 = 'failed' THEN 1 ELSE 0 END,
                  status = CASE WHEN status IN ('scheduled', 'queued') THEN 'sending'
                                ELSE status END,
                  updated_at = now()
            WHERE id = $1
        RETURNING status, recipients, sent_count, failed_count""",
        email_id,
        status,
    )


async def record_outcomes(
    conn: Conn,
    *,
    email_ids: Sequence[uuid.UUID],
    recipients: Sequence[str],
    statuses: Sequence[str],
    retryable: Sequence[bool],
) -> list[asyncpg.Record]:
    """`record_outcome` of each (email, recipient, status, retryable), the pairs distinct and
    the recipients lower-cased: per email that counted any, its status and counts after them,
    with `newly_sent` and `newly_failed`."""
    return list(
        await conn.fetch(
            """WITH inserted AS (
                   INSERT INTO outcomes (email_id, recipient, status, retryable)
                   SELECT o.email_id, o.recipient, o.status, o.retryable
                     FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bool[])
                          AS o(email_id, recipient, status, retryable)
                    WHERE EXISTS (SELECT 1 FROM emails WHERE id = o.email_id)
                   ON CONFLICT (email_id, recipient) DO NOTHING
                   RETURNING email_id, status),
               counted AS (
                   SELECT email_id,
                          (count(*) FILTER (WHERE status = 'sent'))::int AS newly_sent,
                          (count(*) FILTER (WHERE status = 'failed'))::int AS newly_failed
                     FROM inserted
                    GROUP BY email_id)
               UPDATE emails
                  SET sent_count = sent_count + counted.newly_sent,
                      failed_count = failed_count + counted.newly_failed,
                      status = CASE WHEN status IN ('scheduled', 'queued') THEN 'sending'
                                    ELSE status END,
                      updated_at = now()
                 FROM counted
                WHERE emails.id = counted.email_id
            RETURNING emails.id, emails.status, emails.recipients, emails.sent_count,
                      emails.failed_count, counted.newly_sent, counted.newly_failed""",
            email_ids,
            recipients,
            statuses,
            retryable,
        )
    )


async def finish(conn: Conn, *, email_id: uuid.UUID, status: str) -> None:
    """The email reached its final status."""
    await conn.execute(
        """UPDATE emails SET status = $2, completed_at = now(), updated_at = now()
            WHERE id = $1 AND status IN ('scheduled', 'queued', 'sending')""",
        email_id,
        status,
    )


async def retryable_failures(conn: Conn, *, email_id: uuid.UUID) -> list[str]:
    """The (lower-cased) recipients of the email whose failure a retry may cure."""
    rows = await conn.fetch(
        """SELECT recipient FROM outcomes
            WHERE email_id = $1 AND status = 'failed' AND retryable IS NOT FALSE""",
        email_id,
    )
    return [row["recipient"] for row in rows]


async def forget_failed(
    conn: Conn, *, email_id: uuid.UUID, besides: Sequence[str] = ()
) -> asyncpg.Record:
    """Drop the email's retryable failed outcomes but those of the lower-cased `besides`, so
    they are counted again when retried; the email, back to `sending`, with `forgotten` (how
    many were dropped)."""
    row = await conn.fetchrow(
        f"""WITH forgotten AS (
                DELETE FROM outcomes
                 WHERE email_id = $1 AND status = 'failed' AND retryable IS NOT FALSE
                   AND recipient <> ALL($2::text[])
             RETURNING 1)
            UPDATE emails
               SET failed_count = failed_count - (SELECT count(*) FROM forgotten),
                   status = 'sending', completed_at = NULL, updated_at = now()
             WHERE id = $1
         RETURNING {_EMAIL_COLUMNS}, (SELECT count(*) FROM forgotten)::int AS forgotten""",
        email_id,
        list(besides),
    )
    assert row is not None
    return row


async def usage_by_day(conn: Conn, *, start: date, end: date) -> list[asyncpg.Record]:
    """Recipients sent and failed per account per quota day, `start` to `end` inclusive."""
    return list(
        await conn.fetch(
            """SELECT account_id, quota_day AS day, sum(sent_count)::bigint AS sent,
                      sum(failed_count)::bigint AS failed
                 FROM emails
                WHERE quota_day BETWEEN $1 AND $2 AND kind <> 'system'
                  AND status NOT IN ('draft', 'cancelled')
                GROUP BY account_id, quota_day
               HAVING sum(sent_count) + sum(failed_count) > 0""",
            start,
            end,
        )
    )


async def timezones(conn: Conn) -> list[str]:
    """The distinct timezones of known senders."""
    return [row["timezone"] for row in await conn.fetch("SELECT DISTINCT timezone FROM senders")]


async def quota_use_today(
    conn: Conn, *, zones: Sequence[str], days: Sequence[date]
) -> list[asyncpg.Record]:
    """Accounts with recipients counted today (each in its timezone's day) and their quota.

    `zones[i]`'s today is `days[i]`; counted as `quota_used` counts."""
    return list(
        await conn.fetch(
            """SELECT s.account_id, s.daily_send_quota,
                      sum(COALESCE(e.recipients, e.reserved))::bigint AS used_today
                 FROM unnest($1::text[], $2::date[]) AS z(timezone, today)
                 JOIN senders s ON s.timezone = z.timezone
                 JOIN emails e ON e.account_id = s.account_id AND e.quota_day = z.today
                WHERE e.kind <> 'system' AND e.status NOT IN ('draft', 'cancelled')
                GROUP BY s.account_id, s.daily_send_quota
               HAVING sum(COALESCE(e.recipients, e.reserved)) > 0""",
            list(zones),
            list(days),
        )
    )


async def status_counts(conn: Conn) -> dict[str, int]:
    """Emails by status, over all accounts."""
    rows = await conn.fetch("SELECT status, count(*) AS n FROM emails GROUP BY status")
    return {row["status"]: row["n"] for row in rows}
