"""All SQL of the tracking service."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from herald.db import Conn
from tracking.domain import (
    COUNTERS,
    LINK_COUNTERS,
    RECIPIENT_COLUMNS,
    Activity,
    Delta,
    LinkState,
    Recipient,
    Split,
    Tables,
)
from tracking.providers import ProviderEvent

# Column lists below are constants of ours interpolated into SQL, never input.
_COUNTERS = ", ".join(COUNTERS)
_SUMS = ", ".join(f"sum({c})::bigint AS {c}" for c in COUNTERS)
_LINK_COUNTERS = ", ".join(LINK_COUNTERS)
_LINK_SUMS = ", ".join(f"sum({c})::bigint AS {c}" for c in LINK_COUNTERS)

_RECIPIENT_TYPES = {
    "message_id": "text",
    "email_id": "uuid",
    "account_id": "uuid",
    "recipient": "text",
    "contact_id": "uuid",
    "status": "text",
    "attempts": "int",
    "smtp_code": "int",
    "smtp_reply": "text",
    "sent_at": "timestamptz",
    "confirmed_at": "timestamptz",
    "provider_status": "text",
    "bounce": "text",
    "bounced_at": "timestamptz",
    "bounce_detail": "text",
    "complained_at": "timestamptz",
    "unsubscribed_at": "timestamptz",
    "opens": "int",
    "human_opens": "int",
    "first_open_at": "timestamptz",
    "first_human_open_at": "timestamptz",
    "clicks": "int",
    "human_clicks": "int",
    "first_click_at": "timestamptz",
    "first_human_click_at": "timestamptz",
}
assert tuple(_RECIPIENT_TYPES) == RECIPIENT_COLUMNS, "recipient columns out of step with domain"
_RCOLS = ", ".join(RECIPIENT_COLUMNS)
_RARRAYS = ", ".join(f"${n}::{t}[]" for n, t in enumerate(_RECIPIENT_TYPES.values(), start=1))
_RUPDATES = ", ".join(f"{c} = excluded.{c}" for c in RECIPIENT_COLUMNS if c != "message_id")


# Emails.


async def ensure_emails(conn: Conn, *, emails: Sequence[tuple[uuid.UUID, uuid.UUID]]) -> None:
    """Give each (email id, account id) a row; the account first named keeps the email."""
    if not emails:
        return
    ordered = sorted(set(emails))
    await conn.execute(
        """INSERT INTO emails (email_id, account_id)
           SELECT * FROM unnest($1::uuid[], $2::uuid[]) ON CONFLICT (email_id) DO NOTHING""",
        [e for e, _ in ordered],
        [a for _, a in ordered],
    )


async def put_email_details(
    conn: Conn,
    *,
    email_id: uuid.UUID,
    account_id: uuid.UUID,
    subject: str,
    kind: str,
    tags: Sequence[str],
    track_opens: bool,
    track_clicks: bool,
) -> None:
    """Record what the campaign service scheduled (subject, kind, tags, tracking choices)."""
    await conn.execute(
        """INSERT INTO emails (email_id, account_id, subject, kind, tags, track_opens,
                               track_clicks)
           VALUES ($1, $2, $3, $4, $5, $6, $7)
           ON CONFLICT (email_id) DO UPDATE
           SET subject = excluded.subject, kind = excluded.kind, tags = excluded.tags,
               track_opens = excluded.track_opens, track_clicks = excluded.track_clicks
           WHERE emails.account_id = excluded.account_id""",
        email_id,
        account_id,
        subject,
        kind,
        list(tags),
        track_opens,
        track_clicks,
    )


async def put_fanout(
    conn: Conn, *, email_id: uuid.UUID, account_id: uuid.UUID, total: int, revision: int
) -> None:
    """Record how many recipients the latest fan-out of the email handed out."""
    await conn.execute(
        """INSERT INTO emails (email_id, account_id, total_recipients, fanout_revision)
           VALUES ($1, $2, $3, $4)
           ON CONFLICT (email_id) DO UPDATE
           SET total_recipients = excluded.total_recipients,
               fanout_revision = excluded.fanout_revision
           WHERE emails.account_id = excluded.account_id
             AND (emails.fanout_revision IS NULL
                  OR emails.fanout_revision <= excluded.fanout_revision)""",
        email_id,
        account_id,
        total,
        revision,
    )


async def mark_first_sent(conn: Conn, *, email_id: uuid.UUID, at: datetime) -> None:
    """Remember when the email's first message was accepted by the relay."""
    await conn.execute(
        "UPDATE emails SET first_sent_at = LEAST(first_sent_at, $2) WHERE email_id = $1",
        email_id,
        at,
    )


async def email_account(conn: Conn, *, email_id: uuid.UUID) -> uuid.UUID | None:
    """The account that owns the email, if it is known."""
    account: uuid.UUID | None = await conn.fetchval(
        "SELECT account_id FROM emails WHERE email_id = $1", email_id
    )
    return account


async def email_accounts(
    conn: Conn, *, email_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, uuid.UUID]:
    """The account that owns each of these emails, for those known."""
    rows = await conn.fetch(
        "SELECT email_id, account_id FROM emails WHERE email_id = ANY($1::uuid[])",
        list(email_ids),
    )
    return {r[0]: r[1] for r in rows}


async def tracking_choices(
    conn: Conn, *, email_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, tuple[bool, bool]]:
    """Per email: whether Herald tracked (opens, clicks) itself."""
    rows = await conn.fetch(
        "SELECT email_id, track_opens, track_clicks FROM emails WHERE email_id = ANY($1::uuid[])",
        list(email_ids),
    )
    return {r["email_id"]: (r["track_opens"], r["track_clicks"]) for r in rows}


# Recipients.


async def ensure_recipients(
    conn: Conn, *, rows: Sequence[tuple[str, uuid.UUID, uuid.UUID]]
) -> None:
    """Give each (message id, email id, account id) a row, not yet naming its recipient."""
    if not rows:
        return
    ordered = sorted(set(rows))
    await conn.execute(
        """INSERT INTO recipients (message_id, email_id, account_id)
           SELECT * FROM unnest($1::text[], $2::uuid[], $3::uuid[])
           ON CONFLICT (message_id) DO NOTHING""",
        [r[0] for r in ordered],
        [r[1] for r in ordered],
        [r[2] for r in ordered],
    )


async def lock_recipients(conn: Conn, *, message_ids: Sequence[str]) -> dict[str, Recipient]:
    """The rows of these messages, locked until the transaction ends."""
    rows = await conn.fetch(
        f"""SELECT {_RCOLS} FROM recipients WHERE message_id = ANY($1::text[])
            ORDER BY message_id FOR UPDATE""",
        sorted(set(message_ids)),
    )
    return {r["message_id"]: Recipient.from_row(r) for r in rows}


async def lock_engagement(conn: Conn, *, message_ids: Sequence[str]) -> dict[str, Recipient]:
    """The rows of these messages, locked, with only what opens and clicks read and change:
    the rest of each `Recipient` is left at its default, so save them with `save_engagement`."""
    rows = await conn.fetch(
        f"""SELECT message_id, email_id, account_id, recipient, contact_id, sent_at,
                   {", ".join(_ENGAGEMENT)}
            FROM recipients WHERE message_id = ANY($1::text[])
            ORDER BY message_id FOR UPDATE""",
        sorted(set(message_ids)),
    )
    # Positional reads and one keyword call per row: a flush locks thousands of rows, and the
    # full row through `Recipient.from_row` was the largest single cost of writing an open.
    return {
        row[0]: Recipient(
            message_id=row[0],
            email_id=row[1],
            account_id=row[2],
            recipient=row[3],
            contact_id=row[4],
            sent_at=row[5],
            opens=row[6],
            human_opens=row[7],
            first_open_at=row[8],
            first_human_open_at=row[9],
            clicks=row[10],
            human_clicks=row[11],
            first_click_at=row[12],
            first_human_click_at=row[13],
        )
        for row in rows
    }


async def lock_for_outcome(
    conn: Conn, *, message_id: str, email_id: uuid.UUID, recipient: str
) -> list[Recipient]:
    """The row of this message, and the row of this email's recipient if that is another."""
    rows = await conn.fetch(
        f"""SELECT {_RCOLS} FROM recipients
            WHERE message_id = $1 OR (email_id = $2 AND recipient = $3)
            ORDER BY message_id FOR UPDATE""",
        message_id,
        email_id,
        recipient,
    )
    return [Recipient.from_row(r) for r in rows]


async def lock_for_outcomes(
    conn: Conn, *, keys: Sequence[tuple[str, uuid.UUID, str]]
) -> dict[str, Recipient]:
    """`lock_for_outcome` of many (message id, email id, recipient) at once: the rows of these
    messages and of these emails' recipients, by message id, locked in message id order."""
    if not keys:
        return {}
    addresses = sorted({(e, r) for _, e, r in keys})
    # The message ids, with those of the addresses' rows (found first, by index, in an
    # InitPlan), as one array: an OR of both conditions is planned as a scan, and so was an
    # IN over their UNION, a hash join over every row of the table (23 ms a batch at 40,000
    # rows, growing with the table); `= ANY(array)` is one index scan of the primary key.
    rows = await conn.fetch(
        f"""SELECT {_RCOLS} FROM recipients
            WHERE message_id = ANY($1::text[] || ARRAY(
                SELECT r.message_id
                FROM unnest($2::uuid[], $3::text[]) AS k(email_id, recipient)
                JOIN recipients r ON r.email_id = k.email_id AND r.recipient = k.recipient
                WHERE r.recipient IS NOT NULL))
            ORDER BY message_id FOR UPDATE""",
        sorted({m for m, _, _ in keys}),
        [e for e, _ in addresses],
        [r for _, r in addresses],
    )
    return {r["message_id"]: Recipient.from_row(r) for r in rows}


async def find_recipient(conn: Conn, *, email_id: uuid.UUID, recipient: str) -> Recipient | None:
    """The row of an email's recipient by address, locked."""
    row = await conn.fetchrow(
        f"""SELECT {_RCOLS} FROM recipients WHERE email_id = $1 AND recipient = $2
            FOR UPDATE""",
        email_id,
        recipient,
    )
    return Recipient.from_row(row) if row is not None else None


async def save_recipients(conn: Conn, *, recipients: Sequence[Recipient]) -> None:
    """Write these rows as they are now (insert or replace)."""
    if not recipients:
        return
    ordered = sorted(recipients, key=lambda r: r.message_id)
    columns = list(zip(*(r.as_row() for r in ordered), strict=True))
    await conn.execute(
        f"""INSERT INTO recipients ({_RCOLS})
            SELECT * FROM unnest({_RARRAYS})
            ON CONFLICT (message_id) DO UPDATE SET {_RUPDATES}, updated_at = now()""",
        *[list(c) for c in columns],
    )


_ENGAGEMENT = (
    "opens",
    "human_opens",
    "first_open_at",
    "first_human_open_at",
    "clicks",
    "human_clicks",
    "first_click_at",
    "first_human_click_at",
)


async def save_engagement(conn: Conn, *, recipients: Sequence[Recipient]) -> None:
    """Write the open and click figures of these (locked, existing) rows."""
    if not recipients:
        return
    columns = [[getattr(r, c) for r in recipients] for c in ("message_id", *_ENGAGEMENT)]
    await conn.execute(
        f"""UPDATE recipients r
            SET {", ".join(f"{c} = v.{c}" for c in _ENGAGEMENT)}, updated_at = now()
            FROM unnest($1::text[], $2::int[], $3::int[], $4::timestamptz[], $5::timestamptz[],
                        $6::int[], $7::int[], $8::timestamptz[], $9::timestamptz[])
                 AS v(message_id, {", ".join(_ENGAGEMENT)})
            WHERE r.message_id = v.message_id""",
        *columns,
    )


async def mark_unsubscribed(conn: Conn, *, email_id: uuid.UUID, address: str, at: datetime) -> None:
    """Note on the recipient's row that they unsubscribed from this email."""
    await conn.execute(
        """UPDATE recipients SET unsubscribed_at = coalesce(unsubscribed_at, $3)
           WHERE email_id = $1 AND recipient = $2""",
        email_id,
        address,
        at,
    )


async def recipients_page(
    conn: Conn, *, email_id: uuid.UUID, after: str | None, limit: int
) -> list[asyncpg.Record]:
    """One page of an email's recipients in address order, after the address `after`."""
    return list(
        await conn.fetch(
            f"""SELECT {_RCOLS} FROM recipients
                WHERE email_id = $1 AND recipient IS NOT NULL AND recipient > $2
                ORDER BY recipient LIMIT $3""",
            email_id,
            after or "",
            limit,
        )
    )


# Links each recipient clicked.


async def lock_links(
    conn: Conn, *, keys: Sequence[tuple[str, int]]
) -> dict[tuple[str, int], LinkState]:
    """The per-recipient link rows for these (message id, link) pairs, locked."""
    if not keys:
        return {}
    ordered = sorted(set(keys))
    rows = await conn.fetch(
        """SELECT l.message_id, l.link_index, l.clicks, l.human_clicks, l.first_click_at,
                  l.first_human_click_at
           FROM recipient_links l
           JOIN unnest($1::text[], $2::int[]) AS k(message_id, link_index)
             ON l.message_id = k.message_id AND l.link_index = k.link_index
           ORDER BY l.message_id, l.link_index FOR UPDATE OF l""",
        [k[0] for k in ordered],
        [k[1] for k in ordered],
    )
    return {
        (r["message_id"], r["link_index"]): LinkState(
            r["clicks"], r["human_clicks"], r["first_click_at"], r["first_human_click_at"]
        )
        for r in rows
    }


async def save_links(conn: Conn, *, links: Mapping[tuple[str, int], LinkState]) -> None:
    """Write these per-recipient link rows as they are now."""
    if not links:
        return
    ordered = sorted(links.items())
    await conn.execute(
        """INSERT INTO recipient_links (message_id, link_index, clicks, human_clicks,
                                        first_click_at, first_human_click_at)
           SELECT * FROM unnest($1::text[], $2::int[], $3::int[], $4::int[],
                                $5::timestamptz[], $6::timestamptz[])
           ON CONFLICT (message_id, link_index) DO UPDATE
           SET clicks = excluded.clicks, human_clicks = excluded.human_clicks,
               first_click_at = excluded.first_click_at,
               first_human_click_at = excluded.first_human_click_at""",
        [k[0] for k, _ in ordered],
        [k[1] for k, _ in ordered],
        [s.clicks for _, s in ordered],
        [s.human_clicks for _, s in ordered],
        [s.first_click_at for _, s in ordered],
        [s.first_human_click_at for _, s in ordered],
    )


# Opens and clicks as recorded.


_ACTIVITY_COLUMNS = (
    "id",
    "kind",
    "source",
    "message_id",
    "email_id",
    "account_id",
    "at",
    "link_index",
    "url",
    "machine",
    "reason",
    "user_agent",
    "ip",
)


async def insert_activity(conn: Conn, *, events: Sequence[Activity]) -> set[uuid.UUID]:
    """Record opens and clicks; returns the ids that were new (not written before)."""
    if not events:
        return set()
    records = [
        (
            e.id,
            e.kind,
            e.source,
            e.message_id,
            e.email_id,
            e.account_id,
            e.at,
            e.link_index,
            e.url,
            e.reason is not None,
            e.reason,
            e.user_agent,
            e.ip,
        )
        for e in events
    ]
    try:
        # COPY costs a fraction of an INSERT from arrays per row (asyncpg checks every array
        # element's type); it cannot skip a row written before, which only a batch retried
        # after an unclear commit has: then the savepoint is undone and the slow way taken.
        async with conn.transaction():
            await conn.copy_records_to_table("activity", records=records, columns=_ACTIVITY_COLUMNS)
        return {e.id for e in events}
    except asyncpg.UniqueViolationError:
        pass
    rows = await conn.fetch(
        """INSERT INTO activity (id, kind, source, message_id, email_id, account_id, at,
                                 link_index, url, machine, reason, user_agent, ip)
           SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::uuid[],
                                $6::uuid[], $7::timestamptz[], $8::int[], $9::text[],
                                $10::bool[], $11::text[], $12::text[], $13::text[])
           ON CONFLICT (id) DO NOTHING RETURNING id""",
        *[list(column) for column in zip(*records, strict=True)],
    )
    return {r["id"] for r in rows}


async def write_events(
    conn: Conn, *, rows: Sequence[tuple[uuid.UUID, str, bytes, bytes]], headers: str
) -> None:
    """Put already encoded events into the outbox, as `herald.outbox.write_many` would: rows
    of (event id, topic, key, payload), all with the same `headers` (JSON). Thousands of opens
    a batch, and their ids are new activity ids, so none was written before: COPY them."""
    if not rows:
        return
    if headers == "[]":
        # The column's default; asyncpg's jsonb codec here has no binary form for COPY.
        await conn.copy_records_to_table(
            "outbox", records=rows, columns=("event_id", "topic", "key", "payload")
        )
        return
    await conn.execute(
        """INSERT INTO outbox (event_id, topic, key, payload, headers)
           SELECT e, t, k, p, $5::text::jsonb
           FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::bytea[]) AS batch(e, t, k, p)""",
        *[list(column) for column in zip(*rows, strict=True)],
        headers,
    )


# Unsubscribes.


async def insert_unsubscribe(
    conn: Conn, *, email_id: uuid.UUID, address: str, account_id: uuid.UUID, at: datetime
) -> bool:
    """Record an unsubscribe from an email; False if this address was counted already."""
    inserted = await conn.fetchval(
        """INSERT INTO unsubscribes (email_id, address, account_id, at) VALUES ($1, $2, $3, $4)
           ON CONFLICT DO NOTHING RETURNING true""",
        email_id,
        address,
        account_id,
        at,
    )
    return inserted is True


# Provider notifications.


async def insert_provider_event(conn: Conn, *, event: ProviderEvent) -> bool:
    """Record a provider's notification; False if it was received before."""
    inserted = await conn.fetchval(
        """INSERT INTO provider_events (provider, event_id, kind, message_id,
                                        provider_message_id, recipient, at, detail)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
           ON CONFLICT DO NOTHING RETURNING true""",
        event.provider,
        event.event_id,
        event.kind,
        event.message_id,
        event.provider_message_id,
        event.recipient,
        event.at,
        event.extra(),
    )
    return inserted is True


async def mark_provider_event(conn: Conn, *, provider: str, event_id: str, message_id: str) -> None:
    """The notification was applied to this message."""
    await conn.execute(
        """UPDATE provider_events SET matched = true, message_id = $3
           WHERE provider = $1 AND event_id = $2""",
        provider,
        event_id,
        message_id,
    )


async def message_for_provider_id(
    conn: Conn, *, provider: str, provider_message_id: str
) -> str | None:
    """Our Message-ID for a provider's own message id, learnt from an earlier notification."""
    found: str | None = await conn.fetchval(
        """SELECT message_id FROM provider_events
           WHERE provider = $1 AND provider_message_id = $2 AND message_id IS NOT NULL
           LIMIT 1""",
        provider,
        provider_message_id,
    )
    return found


async def unmatched_provider_events(conn: Conn, *, message_id: str) -> list[ProviderEvent]:
    """Notifications about this message that arrived before we knew it, oldest first (named
    by the message's id or by a Message-ID whose local part it is)."""
    rows = await conn.fetch(
        """SELECT provider, event_id, kind, at, message_id, provider_message_id, recipient,
                  detail
           FROM provider_events
           WHERE split_part(message_id, '@', 1) = split_part($1, '@', 1) AND NOT matched
           ORDER BY at FOR UPDATE""",
        message_id,
    )
    return [_provider_event(r) for r in rows]


async def unmatched_provider_events_of(
    conn: Conn, *, message_ids: Sequence[str]
) -> dict[str, list[ProviderEvent]]:
    """`unmatched_provider_events` of many messages at once, for those that have some; the
    notifications are locked in key order, each message's listed oldest first."""
    if not message_ids:
        return {}
    locals_ = sorted({m.split("@", 1)[0] for m in message_ids})
    rows = await conn.fetch(
        """SELECT provider, event_id, kind, at, message_id, provider_message_id, recipient,
                  detail
           FROM provider_events
           WHERE split_part(message_id, '@', 1) = ANY($1::text[]) AND NOT matched
           ORDER BY provider, event_id FOR UPDATE""",
        locals_,
    )
    by_local: dict[str, list[ProviderEvent]] = {}
    for r in sorted(rows, key=lambda r: r["at"]):
        by_local.setdefault(r["message_id"].split("@", 1)[0], []).append(_provider_event(r))
    found = {}
    for message_id in message_ids:
        events = by_local.get(message_id.split("@", 1)[0])
        if events:
            found[message_id] = events
    return found


def _provider_event(r: asyncpg.Record) -> ProviderEvent:
    extra: dict[str, Any] = r["detail"]
    return ProviderEvent(
        provider=r["provider"],
        event_id=r["event_id"],
        kind=r["kind"],
        at=r["at"],
        message_id=r["message_id"],
        provider_message_id=r["provider_message_id"],
        recipient=r["recipient"],
        raw_type=str(extra.get("raw_type", "")),
        hard=bool(extra.get("hard")),
        detail=extra.get("detail"),
        user_agent=extra.get("user_agent"),
        ip=extra.get("ip"),
        url=extra.get("url"),
        machine=bool(extra.get("machine")),
    )


# Roll-ups.


async def queue_deltas(conn: Conn, *, deltas: Sequence[Delta]) -> None:
    """Leave roll-up changes for the flush worker (the one writer of the roll-ups)."""
    if not deltas:
        return
    await conn.execute(
        """INSERT INTO rollup_deltas (scope, email_id, account_id, at, link_index, url, counts)
           SELECT s, e, a, t, l, u, c::jsonb
           FROM unnest($1::text[], $2::uuid[], $3::uuid[], $4::timestamptz[], $5::int[],
                       $6::text[], $7::text[]) AS d(s, e, a, t, l, u, c)""",
        [d.scope for d in deltas],
        [d.email_id for d in deltas],
        [d.account_id for d in deltas],
        [d.at for d in deltas],
        [d.link_index for d in deltas],
        [d.url for d in deltas],
        [orjson.dumps(dict(d.counts)).decode() for d in deltas],
    )


async def drain_deltas(conn: Conn, *, limit: int) -> list[Delta]:
    """Take up to `limit` queued changes (others' in-flight ones are skipped, not waited for)."""
    rows = await conn.fetch(
        """DELETE FROM rollup_deltas
           WHERE seq IN (SELECT seq FROM rollup_deltas ORDER BY seq LIMIT $1
                         FOR UPDATE SKIP LOCKED)
           RETURNING scope, email_id, account_id, at, link_index, url, counts""",
        limit,
    )
    return [
        Delta(
            r["scope"],
            r["email_id"],
            r["account_id"],
            r["at"],
            r["counts"],
            r["link_index"],
            r["url"],
        )
        for r in rows
    ]


async def queued_deltas(conn: Conn) -> int:
    """How many roll-up changes wait for the flush worker."""
    count: int = await conn.fetchval("SELECT count(*) FROM rollup_deltas")
    return count


def _counter_arrays(counters: Sequence[Mapping[str, int]], names: Sequence[str]) -> list[list[int]]:
    return [[c.get(name, 0) for c in counters] for name in names]


def _upsert(
    table: str,
    keys: Sequence[tuple[str, str]],
    names: Sequence[str],
    conflict: str,
    also: Sequence[str] = (),
) -> str:
    """INSERT … ON CONFLICT (`conflict`) adding up counters (and setting `also`); `keys` are
    the (column, type) of the row's other columns, in the order their arrays are passed."""
    columns = [k for k, _ in keys] + list(names)
    types = [t for _, t in keys] + ["bigint"] * len(names)
    arrays = ", ".join(f"${n}::{t}[]" for n, t in enumerate(types, start=1))
    adds = ", ".join([*also, *(f"{c} = {table}.{c} + excluded.{c}" for c in names)])
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM unnest({arrays})"
        f" ON CONFLICT ({conflict}) DO UPDATE SET {adds}"
    )


_STATS_SQL = _upsert(
    "email_stats", [("email_id", "uuid"), ("account_id", "uuid")], COUNTERS, "email_id"
)
_EMAIL_HOURLY_SQL = _upsert(
    "email_hourly",
    [("email_id", "uuid"), ("hour", "timestamptz"), ("account_id", "uuid")],
    COUNTERS,
    "email_id, hour",
)
_EMAIL_DAILY_SQL = _upsert(
    "email_daily",
    [("email_id", "uuid"), ("day", "date"), ("account_id", "uuid")],
    COUNTERS,
    "email_id, day",
)
_ACCOUNT_HOURLY_SQL = _upsert(
    "account_hourly",
    [("account_id", "uuid"), ("hour", "timestamptz")],
    COUNTERS,
    "account_id, hour",
)
_EMAIL_SUMS_SQL = _upsert(
    "email_sums",
    [
        ("email_id", "uuid"),
        ("account_id", "uuid"),
        ("first_hour", "timestamptz"),
        ("last_hour", "timestamptz"),
    ],
    COUNTERS,
    "email_id",
    also=(
        "first_hour = least(email_sums.first_hour, excluded.first_hour)",
        "last_hour = greatest(email_sums.last_hour, excluded.last_hour)",
    ),
)
_LINK_STATS_SQL = _upsert(
    "link_stats",
    [("email_id", "uuid"), ("link_index", "int"), ("account_id", "uuid"), ("url", "text")],
    LINK_COUNTERS,
    "email_id, link_index",
)
_LINK_HOURLY_SQL = _upsert(
    "link_hourly",
    [("email_id", "uuid"), ("link_index", "int"), ("hour", "timestamptz"), ("account_id", "uuid")],
    LINK_COUNTERS,
    "email_id, link_index, hour",
)
_LINK_DAILY_SQL = _upsert(
    "link_daily",
    [("email_id", "uuid"), ("link_index", "int"), ("day", "date"), ("account_id", "uuid")],
    LINK_COUNTERS,
    "email_id, link_index, day",
)


async def apply_rollup(conn: Conn, *, tables: Tables) -> None:
    """Add summed changes to every roll-up, each table's rows in key order (lock order)."""
    if tables.stats:
        items = sorted(tables.stats.items())
        await conn.execute(
            _STATS_SQL,
            [k for k, _ in items],
            [a for _, (a, _) in items],
            *_counter_arrays([c for _, (_, c) in items], COUNTERS),
        )
    if tables.email_hourly:
        hourly = sorted(tables.email_hourly.items())
        await conn.execute(
            _EMAIL_HOURLY_SQL,
            [k[0] for k, _ in hourly],
            [k[1] for k, _ in hourly],
            [a for _, (a, _) in hourly],
            *_counter_arrays([c for _, (_, c) in hourly], COUNTERS),
        )
    if tables.email_daily:
        daily = sorted(tables.email_daily.items())
        await conn.execute(
            _EMAIL_DAILY_SQL,
            [k[0] for k, _ in daily],
            [k[1] for k, _ in daily],
            [a for _, (a, _) in daily],
            *_counter_arrays([c for _, (_, c) in daily], COUNTERS),
        )
    if tables.account_hourly:
        accounts = sorted(tables.account_hourly.items())
        await conn.execute(
            _ACCOUNT_HOURLY_SQL,
            [k[0] for k, _ in accounts],
            [k[1] for k, _ in accounts],
            *_counter_arrays([c for _, c in accounts], COUNTERS),
        )
    if tables.email_sums:
        sums = sorted(tables.email_sums.items())
        await conn.execute(
            _EMAIL_SUMS_SQL,
            [k for k, _ in sums],
            [e.account_id for _, e in sums],
            [e.first_hour for _, e in sums],
            [e.last_hour for _, e in sums],
            *_counter_arrays([e.counts for _, e in sums], COUNTERS),
        )
    if tables.link_stats:
        links = sorted(tables.link_stats.items())
        await conn.execute(
            _LINK_STATS_SQL,
            [k[0] for k, _ in links],
            [k[1] for k, _ in links],
            [a for _, (a, _, _) in links],
            [u for _, (_, u, _) in links],
            *_counter_arrays([c for _, (_, _, c) in links], LINK_COUNTERS),
        )
    if tables.link_hourly:
        link_hours = sorted(tables.link_hourly.items())
        await conn.execute(
            _LINK_HOURLY_SQL,
            [k[0] for k, _ in link_hours],
            [k[1] for k, _ in link_hours],
            [k[2] for k, _ in link_hours],
            [a for _, (a, _) in link_hours],
            *_counter_arrays([c for _, (_, c) in link_hours], LINK_COUNTERS),
        )
    if tables.link_daily:
        link_days = sorted(tables.link_daily.items())
        await conn.execute(
            _LINK_DAILY_SQL,
            [k[0] for k, _ in link_days],
            [k[1] for k, _ in link_days],
            [k[2] for k, _ in link_days],
            [a for _, (a, _) in link_days],
            *_counter_arrays([c for _, (_, c) in link_days], LINK_COUNTERS),
        )


# Account settings.


async def put_timezone(conn: Conn, *, account_id: uuid.UUID, timezone: str) -> None:
    """Keep the account's timezone as auth last published it."""
    await conn.execute(
        """INSERT INTO account_settings (account_id, timezone) VALUES ($1, $2)
           ON CONFLICT (account_id) DO UPDATE
           SET timezone = excluded.timezone, updated_at = now()""",
        account_id,
        timezone,
    )


async def account_timezone(conn: Conn, *, account_id: uuid.UUID) -> str | None:
    """The account's timezone name, if auth has told us."""
    name: str | None = await conn.fetchval(
        "SELECT timezone FROM account_settings WHERE account_id = $1", account_id
    )
    return name


# Reads for /tracking and /reports (roll-ups only, never the activity table).


async def email_overview(
    conn: Conn, *, email_id: uuid.UUID, account_id: uuid.UUID
) -> asyncpg.Record | None:
    """The email's details and current totals, if it belongs to the account."""
    return await conn.fetchrow(
        f"""SELECT e.email_id, e.subject, e.kind, e.tags, e.total_recipients, e.first_sent_at,
                   {", ".join(f"coalesce(s.{c}, 0)::bigint AS {c}" for c in COUNTERS)}
            FROM emails e LEFT JOIN email_stats s ON s.email_id = e.email_id
            WHERE e.email_id = $1 AND e.account_id = $2""",
        email_id,
        account_id,
    )


async def email_links(conn: Conn, *, email_id: uuid.UUID) -> list[asyncpg.Record]:
    """Clicks per link of one email, in link order."""
    return list(
        await conn.fetch(
            f"""SELECT link_index, url, {_LINK_COUNTERS} FROM link_stats WHERE email_id = $1
                ORDER BY link_index""",
            email_id,
        )
    )


def _narrow(args: list[Any], *, email_id: uuid.UUID | None, tag: str | None) -> str:
    """A condition keeping the roll-up rows of one email and/or of the account's emails carrying
    `tag` (`$1` is always the account); its parameters are appended to `args`. The tag is
    matched here rather than as a list of ids: a semi-join, not a scan of a long array per row."""
    condition = ""
    if email_id is not None:
        args.append(email_id)
        condition += f" AND email_id = ${len(args)}"
    if tag is not None:
        args.append(tag)
        condition += (
            " AND email_id IN (SELECT email_id FROM emails"
            f" WHERE account_id = $1 AND tags @> ARRAY[${len(args)}::text])"
        )
    return condition


async def _fetch_report(
    conn: Conn, sql: str, args: Sequence[Any], *, where: str
) -> list[asyncpg.Record]:
    """Run a report read; one narrowed by `where` is planned for its very arguments, as an
    unnamed statement. The plan a cached statement settles on after five runs is made for no
    arguments in particular: it takes a tag to name one email and an array to hold ten, and then
    reads the roll-ups once per email (the top links of the bench's 1M-event account: 66 ms
    instead of 3). Whole-account reads keep the cached statement: their plan does not hinge on
    that, and preparing anew costs a round trip and a planning."""
    if not where:
        return list(await conn.fetch(sql, *args))
    statement = await conn.prepare(sql, name="")
    return list(await statement.fetch(*args))


_NO_DAYS = (date(1970, 1, 1), date(1970, 1, 1))
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_HOUR = timedelta(hours=1)


def _split_args(parts: Split) -> list[Any]:
    days = parts.days or _NO_DAYS
    hours = list(parts.hours)
    while len(hours) < 2:
        hours.append((_EPOCH, _EPOCH))
    return [days[0], days[1], hours[0][0], hours[0][1], hours[1][0], hours[1][1]]


def _hybrid(columns: str, daily: str, hourly: str, key: str, where: str) -> str:
    return f"""
        SELECT {key}, {columns} FROM {daily}
        WHERE account_id = $1 AND day >= $2 AND day < $3{where}
        UNION ALL
        SELECT {key}, {columns} FROM {hourly}
        WHERE account_id = $1 AND ((hour >= $4 AND hour < $5) OR (hour >= $6 AND hour < $7)){where}
    """


async def series(
    conn: Conn,
    *,
    account_id: uuid.UUID,
    start: datetime,
    end: datetime,
    interval: str,
    timezone: str,
    email_id: uuid.UUID | None = None,
    tag: str | None = None,
) -> list[asyncpg.Record]:
    """Counts per bucket: UTC hours (`interval` hour) or the account's local days, from the
    hourly roll-ups (the account's own, or its emails' when narrowed)."""
    args: list[Any] = [account_id, start, end]
    table = "account_hourly"
    where = ""
    if email_id is not None or tag is not None:
        table = "email_hourly"
        where = _narrow(args, email_id=email_id, tag=tag)
    key = "hour"
    if interval == "day":
        args.append(timezone)
        key = f"(hour AT TIME ZONE ${len(args)}::text)::date"
    return await _fetch_report(
        conn,
        f"""SELECT {key} AS key, {_SUMS} FROM {table}
            WHERE account_id = $1 AND hour >= $2 AND hour < $3{where}
            GROUP BY 1 ORDER BY 1""",
        args,
        where=where,
    )


async def day_series(
    conn: Conn,
    *,
    account_id: uuid.UUID,
    days: Sequence[tuple[date, date]],
    hours: Sequence[tuple[date, datetime, datetime, int]],
    email_id: uuid.UUID | None,
    tag: str | None,
) -> list[asyncpg.Record]:
    """Counts per local day of some emails: each day is (bucket, UTC day) rows of the daily
    roll-up plus (bucket, from, to, sign) spans of the hourly one, added or taken away."""
    # Hour by hour, so the hourly rows are matched by equality (a hash join), not by range,
    # and found through the account's index by those hours, not among all its hours.
    each = [
        (key, lo + n * _ONE_HOUR, sign)
        for key, lo, hi, sign in hours
        for n in range((hi - lo) // _ONE_HOUR)
    ]
    args: list[Any] = [
        account_id,
        [k for k, _ in days],
        [d for _, d in days],
        [h[0] for h in each],
        [h[1] for h in each],
        [h[2] for h in each],
    ]
    where = _narrow(args, email_id=email_id, tag=tag)
    signed = ", ".join(f"h.sign * {c} AS {c}" for c in COUNTERS)
    return await _fetch_report(
        conn,
        f"""WITH d AS (SELECT * FROM unnest($2::date[], $3::date[]) AS d(key, day)),
                 h AS (SELECT * FROM unnest($4::date[], $5::timestamptz[], $6::int[])
                              AS h(key, hour, sign)),
                 parts AS (
                     SELECT d.key, {_COUNTERS} FROM email_daily JOIN d USING (day)
                     WHERE account_id = $1{where}
                     UNION ALL
                     SELECT h.key, {signed} FROM email_hourly JOIN h USING (hour)
                     WHERE account_id = $1 AND hour = ANY($5::timestamptz[]){where})
            SELECT key, {_SUMS} FROM parts GROUP BY key ORDER BY key""",
        args,
        where=where,
    )


def _spans(where: str) -> str:
    """The account's emails counted in the period ($9 to $10), and whether all their hours lie
    within it (`whole`): those are read as their summed row, the others from their buckets."""
    return f"""
        SELECT email_id, first_hour >= $9 AND last_hour < $10 AS whole, {_COUNTERS}
        FROM email_sums
        WHERE account_id = $1 AND last_hour >= $9 AND first_hour < $10{where}
    """


async def emails_table(
    conn: Conn,
    *,
    account_id: uuid.UUID,
    start: datetime,
    end: datetime,
    parts: Split,
    email_id: uuid.UUID | None,
    tag: str | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Per email, what happened from `start` to `end` (whole days daily, the edges hourly; an
    email counted only within the period, as its summed row)."""
    args: list[Any] = [account_id, *_split_args(parts), limit, start, end]
    where = _narrow(args, email_id=email_id, tag=tag)
    partial = " AND email_id IN (SELECT email_id FROM spans WHERE NOT whole)"
    edges = _hybrid(_COUNTERS, "email_daily", "email_hourly", "email_id", partial)
    return await _fetch_report(
        conn,
        f"""WITH spans AS MATERIALIZED ({_spans(where)}),
                 parts AS (SELECT email_id, {_COUNTERS} FROM spans WHERE whole
                           UNION ALL {edges}),
                 totals AS (SELECT email_id, {_SUMS} FROM parts GROUP BY email_id)
            SELECT t.*, e.subject, e.tags, e.first_sent_at
            FROM totals t JOIN emails e ON e.email_id = t.email_id
            ORDER BY e.first_sent_at DESC NULLS LAST, t.email_id
            LIMIT $8""",
        args,
        where=where,
    )


async def top_links(
    conn: Conn,
    *,
    account_id: uuid.UUID,
    start: datetime,
    end: datetime,
    parts: Split,
    email_id: uuid.UUID | None,
    tag: str | None,
    limit: int,
) -> list[asyncpg.Record]:
    """The most clicked links from `start` to `end`: those of emails counted only within the
    period as they stand in `link_stats` (walked in click order, so only the first few are
    read), those of emails reaching past its edges summed from their buckets."""
    args: list[Any] = [account_id, *_split_args(parts), limit, start, end]
    where = _narrow(args, email_id=email_id, tag=tag)
    partial = " AND email_id IN (SELECT email_id FROM partial)"
    edges = _hybrid(_LINK_COUNTERS, "link_daily", "link_hourly", "email_id, link_index", partial)
    return await _fetch_report(
        conn,
        f"""WITH partial AS MATERIALIZED (
                     SELECT email_id FROM email_sums
                     WHERE account_id = $1 AND last_hour >= $9 AND first_hour < $10
                       AND (first_hour < $9 OR last_hour >= $10){where}),
                 ranked AS (
                     (SELECT email_id, link_index, {_LINK_COUNTERS} FROM link_stats l
                      WHERE account_id = $1 AND EXISTS (
                          SELECT FROM email_sums
                          WHERE email_sums.email_id = l.email_id
                            AND first_hour >= $9 AND last_hour < $10{where})
                      ORDER BY clicks DESC, email_id, link_index LIMIT $8)
                     UNION ALL
                     (SELECT email_id, link_index, {_LINK_SUMS} FROM ({edges}) AS e
                      GROUP BY email_id, link_index)
                     ORDER BY clicks DESC, email_id, link_index LIMIT $8)
            SELECT r.*, s.url FROM ranked r
            JOIN link_stats s ON s.email_id = r.email_id AND s.link_index = r.link_index
            ORDER BY r.clicks DESC, r.email_id, r.link_index""",
        args,
        where=where,
    )


async def name_provider_event(conn: Conn, *, provider: str, event_id: str, message_id: str) -> None:
    """Note which message an unmatched notification is about (found by the provider's id)."""
    await conn.execute(
        "UPDATE provider_events SET message_id = $3 WHERE provider = $1 AND event_id = $2",
        provider,
        event_id,
        message_id,
    )
