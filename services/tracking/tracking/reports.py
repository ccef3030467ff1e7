"""Reading the roll-ups into what `/tracking/{id}` and `/reports` answer (never raw events)."""

from __future__ import annotations

import asyncio
import csv
import io
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import asyncpg
import orjson

from herald.db import Conn
from tracking import store
from tracking.domain import (
    COUNTERS,
    LINK_COUNTERS,
    RATES,
    RECIPIENT_COLUMNS,
    Interval,
    csv_cell,
    decode_cursor,
    encode_cursor,
    queued,
    rates,
    resolve_period,
    series_keys,
    split,
    zone,
)
from tracking.domain import bucket_label as label


class NotFound(Exception):
    """The email is not one of the caller's account."""


def _counts(row: Mapping[str, Any] | asyncpg.Record | None) -> dict[str, int]:
    return {c: int(row[c]) if row is not None else 0 for c in COUNTERS}


async def email_tracking(
    conn: Conn, *, account_id: uuid.UUID, email_id: uuid.UUID, cursor: str | None, limit: int
) -> dict[str, Any]:
    """An email's status counts, rates, per-link clicks and a page of its recipients."""
    row = await store.email_overview(conn, email_id=email_id, account_id=account_id)
    if row is None:
        raise NotFound
    counts = _counts(row)
    after = decode_cursor(cursor) if cursor else None
    page = await store.recipients_page(conn, email_id=email_id, after=after, limit=limit + 1)
    more = len(page) > limit
    items = [{c: r[c] for c in RECIPIENT_COLUMNS} for r in page[:limit]]
    return {
        "email_id": row["email_id"],
        "subject": row["subject"],
        "kind": row["kind"],
        "tags": list(row["tags"]),
        "total_recipients": row["total_recipients"],
        "first_sent_at": row["first_sent_at"],
        "counts": {**counts, "queued": queued(row["total_recipients"], counts)},
        "rates": rates(counts),
        "links": [dict(link) for link in await store.email_links(conn, email_id=email_id)],
        "recipients": {
            "items": items,
            "next_cursor": encode_cursor(items[-1]["recipient"]) if more else None,
        },
    }


@dataclass(frozen=True)
class ReportQuery:
    account_id: uuid.UUID
    start: date | datetime | None
    end: date | datetime | None
    interval: Interval | None
    email_id: uuid.UUID | None
    tag: str | None
    limit: int
    links: int


async def report(pool: asyncpg.Pool, query: ReportQuery, *, now: datetime) -> dict[str, Any]:
    """Totals and rates, a series in the account's timezone, per-email rows and top links."""
    async with pool.acquire() as conn:
        timezone = await store.account_timezone(conn, account_id=query.account_id) or "UTC"
        tz = zone(timezone)
        period = resolve_period(
            start=query.start, end=query.end, interval=query.interval, tz=tz, now=now
        )
        email_ids: list[uuid.UUID] | None = None
        if query.email_id is not None:
            if await store.email_account(conn, email_id=query.email_id) != query.account_id:
                raise NotFound
            email_ids = [query.email_id]
        if query.tag is not None:
            tagged = await store.email_ids_with_tag(
                conn, account_id=query.account_id, tag=query.tag
            )
            email_ids = tagged if email_ids is None else [e for e in email_ids if e in tagged]
    rows: list[asyncpg.Record] = []
    emails: list[asyncpg.Record] = []
    links: list[asyncpg.Record] = []
    if email_ids != []:
        parts = split(period)
        # Three independent reads: each on its own connection, they run side by side.
        rows, emails, links = await asyncio.gather(
            _read(
                pool,
                store.series,
                account_id=query.account_id,
                start=period.start,
                end=period.end,
                interval=period.interval,
                timezone=timezone,
                email_ids=email_ids,
            ),
            _read(
                pool,
                store.emails_table,
                account_id=query.account_id,
                parts=parts,
                email_ids=email_ids,
                limit=query.limit,
            ),
            _read(
                pool,
                store.top_links,
                account_id=query.account_id,
                parts=parts,
                email_ids=email_ids,
                limit=query.links,
            ),
        )
    by_key = {r["key"]: _counts(r) for r in rows}
    empty = _counts(None)
    points = [(label(key, tz), by_key.get(key, empty)) for key in series_keys(period)]
    totals = {c: sum(counts[c] for _, counts in points) for c in COUNTERS}
    return {
        "timezone": timezone,
        "from": period.start,
        "to": period.end,
        "interval": period.interval,
        "email_id": query.email_id,
        "tag": query.tag,
        "totals": totals,
        "rates": rates(totals),
        "series": [{"bucket": bucket, **counts} for bucket, counts in points],
        "emails": [_email_row(e) for e in emails],
        "top_links": [
            {"email_id": link["email_id"], "link_index": link["link_index"], "url": link["url"]}
            | {c: int(link[c]) for c in LINK_COUNTERS}
            for link in links
        ],
    }


async def _read(
    pool: asyncpg.Pool, read: Callable[..., Awaitable[list[asyncpg.Record]]], **kwargs: Any
) -> list[asyncpg.Record]:
    async with pool.acquire() as conn:
        return await read(conn, **kwargs)


def to_json(body: Mapping[str, Any]) -> bytes:
    """A report as `ReportOut` would serialise it (a test holds the two together), without
    validating again what was just built from typed rows: on a large report that is most of the
    time the answer takes."""
    return orjson.dumps(body, default=_json_default, option=orjson.OPT_UTC_Z)


def _json_default(value: object) -> str:
    # asyncpg's own UUID type, which orjson does not know as a UUID.
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"not serialisable: {type(value).__name__}")


def _email_row(row: Mapping[str, Any] | asyncpg.Record) -> dict[str, Any]:
    counts = _counts(row)
    return {
        "email_id": row["email_id"],
        "subject": row["subject"],
        "tags": list(row["tags"]),
        "first_sent_at": row["first_sent_at"],
        **counts,
        "rates": rates(counts),
    }


def to_csv(body: Mapping[str, Any], table: str) -> str:
    """One table of a report as CSV (text cells that look like formulas are defused)."""
    out = io.StringIO()
    writer = csv.writer(out)
    if table == "series":
        writer.writerow(["bucket", *COUNTERS])
        for point in body["series"]:
            writer.writerow([point["bucket"], *(point[c] for c in COUNTERS)])
    elif table == "links":
        writer.writerow(["email_id", "link_index", "url", *LINK_COUNTERS])
        for link in body["top_links"]:
            writer.writerow(
                [
                    link["email_id"],
                    link["link_index"],
                    csv_cell(link["url"]),
                    *(link[c] for c in LINK_COUNTERS),
                ]
            )
    else:
        writer.writerow(["email_id", "subject", "tags", "first_sent_at", *COUNTERS, *RATES])
        for e in body["emails"]:
            sent_at = e["first_sent_at"].isoformat() if e["first_sent_at"] else ""
            writer.writerow(
                [
                    e["email_id"],
                    csv_cell(e["subject"]),
                    csv_cell(";".join(e["tags"])),
                    sent_at,
                    *(e[c] for c in COUNTERS),
                    *(csv_cell(e["rates"][r]) for r in RATES),
                ]
            )
    return out.getvalue()
