"""CSV export: streamed page by page, every text cell safe to open in a spreadsheet."""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import AsyncIterator, Sequence

import asyncpg

from contacts import domain, store
from contacts.metrics import EXPORT_ROWS

PAGE = 2000


def _line(writer_buffer: io.StringIO, rows: Sequence[Sequence[str]]) -> bytes:
    writer = csv.writer(writer_buffer, lineterminator="\r\n")
    writer.writerows(rows)
    data = writer_buffer.getvalue().encode()
    writer_buffer.seek(0)
    writer_buffer.truncate()
    return data


async def export_csv(
    pool: asyncpg.Pool, *, account_id: uuid.UUID, list_id: uuid.UUID | None
) -> AsyncIterator[bytes]:
    """The account's contacts (or one list's) as CSV, in id order, a page of rows at a time.

    Pages are read in turn, each on a connection borrowed briefly, so a slow download holds no
    database connection; a contact changed during the export may show either version.
    """
    limit = domain.MAX_EXPORT_ATTRIBUTE_COLUMNS
    async with pool.acquire() as conn:
        keys = await store.attribute_keys(
            conn, account_id=account_id, list_id=list_id, limit=limit + 1
        )
    # Past a few hundred distinct names one column per name helps nobody: one JSON column.
    as_json = len(keys) > limit
    if as_json:
        keys = []
    header = domain.export_header(keys) + (["attributes"] if as_json else [])
    buffer = io.StringIO()
    yield _line(buffer, [header])
    after = store.FIRST
    safe = domain.neutralise
    cell = domain.export_cell
    while True:
        async with pool.acquire() as conn:
            rows = await store.page_contacts(
                conn, account_id=account_id, after=after, limit=PAGE, list_id=list_id
            )
        lines = []
        for r in rows:
            attributes = r["attributes"]
            line = [
                str(r["id"]),
                safe(r["email"]),
                safe(r["first_name"] or ""),
                safe(r["last_name"] or ""),
                r["status"],
                r["created_at"].isoformat(),
                r["updated_at"].isoformat(),
            ]
            if as_json:
                line.append(safe(cell(attributes)))
            else:
                line.extend(safe(cell(attributes.get(k))) for k in keys)
            lines.append(line)
        if lines:
            EXPORT_ROWS.inc(len(lines))
            yield _line(buffer, lines)
        if len(rows) < PAGE:
            return
        after = rows[-1]["id"]
