"""Reading the roll-ups into what `/tracking/{id}` and `/reports` answer (never raw events)."""

from __future__ import annotations

import asyncio
import csv
import io
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

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
    Period,
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
    # Every counter is read as bigint (sums cast back from numeric), so already an int.
    if row is None:
        return dict.fromkeys(COUNTERS, 0)
    return {c: row[c] for c in COUNTERS}


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
        if (
            query.email_id is not None
            and await store.email_account(conn, email_id=query.email_id) != query.account_id
        ):
            raise NotFound
    narrow: dict[str, Any] = {"email_id": query.email_id, "tag": query.tag}
    series: Awaitable[list[asyncpg.Record]]
    if period.interval == "day" and (query.email_id is not None or query.tag is not None):
        days, spans = local_day_parts(period)
        series = _read(
            pool, store.day_series, account_id=query.account_id, days=days, hours=spans, **narrow
        )
    else:
        series = _read(
            pool,
            store.series,
            account_id=query.account_id,
            start=period.start,
            end=period.end,
            interval=period.interval,
            timezone=timezone,
            **narrow,
        )
    parts = split(period)
    # Three independent reads: each on its own connection, they run side by side.
    rows, emails, links = await asyncio.gather(
        series,
        _read(
            pool,
            store.emails_table,
            account_id=query.account_id,
            start=period.start,
            end=period.end,
            parts=parts,
            limit=query.limit,
            **narrow,
        ),
        _read(
            pool,
            store.top_links,
            account_id=query.account_id,
            start=period.start,
            end=period.end,
            parts=parts,
            limit=query.links,
            **narrow,
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


_HOUR = timedelta(hours=1)


def local_day_parts(
    period: Period,
) -> tuple[list[tuple[date, date]], list[tuple[date, datetime, datetime, int]]]:
    """How to count each local day of a daily series from roll-ups kept per UTC day and hour:
    (day, UTC day) rows of the daily roll-up and (day, from, to, sign) spans of the hourly one.

    A local day holds the hours that start on it, as the hourly series counts them (an hour
    cannot be split, so with a half-hour offset it counts on the day it starts in). Off UTC
    those hours are no UTC day, but they are a UTC day with a few hours added or taken away at
    either end: per email one daily row and a few hourly ones instead of 24 hourly ones. A day
    for which that saves nothing (a short one at the period's edge, a 12-hour offset) is
    read from the hourly roll-up alone.
    """
    keys = series_keys(period)
    edges = [_first_hour(day, period.tz) for day in keys]
    edges.append(_first_hour(keys[-1] + timedelta(days=1), period.tz))
    days: list[tuple[date, date]] = []
    spans: list[tuple[date, datetime, datetime, int]] = []
    for key, lo, hi in zip(keys, edges, edges[1:], strict=False):
        lo, hi = max(lo, period.start), min(hi, period.end)
        if lo >= hi:
            continue
        best, cost = None, (hi - lo) / _HOUR
        for utc_day in sorted({lo.date(), (hi - _HOUR).date()}):
            start = datetime.combine(utc_day, time(), tzinfo=UTC)
            extra = (abs(start - lo) + abs(start + timedelta(days=1) - hi)) / _HOUR
            if extra < cost:
                best, cost = start, extra
        if best is None:
            spans.append((key, lo, hi, 1))
            continue
        end = best + timedelta(days=1)
        days.append((key, best.date()))
        if lo != best:
            spans.append((key, lo, best, 1) if lo < best else (key, best, lo, -1))
        if hi != end:
            spans.append((key, end, hi, 1) if hi > end else (key, hi, end, -1))
    return days, spans


def _first_hour(day: date, tz: ZoneInfo) -> datetime:
    """The first whole UTC hour that starts on `day` or later in `tz` (a local midnight may
    fall within an hour, or not exist on a day the clocks change)."""
    at = datetime.combine(day, time(), tzinfo=tz).astimezone(UTC)
    at = at.replace(minute=0, second=0, microsecond=0)
    while (at - _HOUR).astimezone(tz).date() >= day:
        at -= _HOUR
    while at.astimezone(tz).date() < day:
        at += _HOUR
    return at


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
    # Built in place, with no intermediate dicts: a report has up to a thousand of these, and
    # they were most of the CPU time a report took.
    out = {
        "email_id": row["email_id"],
        "subject": row["subject"],
        "tags": list(row["tags"]),
        "first_sent_at": row["first_sent_at"],
    }
    for c in COUNTERS:
        out[c] = row[c]
    out["rates"] = rates(out)
    return out


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
