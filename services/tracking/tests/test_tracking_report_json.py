"""A report is written out without pydantic, so it must read exactly as `ReportOut` writes it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from asyncpg.pgproto import pgproto

from tracking.domain import COUNTERS, rates
from tracking.reports import _email_row, to_json
from tracking.schemas import ReportOut


def counts(n: int) -> dict[str, int]:
    return {c: (n * (i + 3)) % 17 for i, c in enumerate(COUNTERS)}


def body() -> dict[str, Any]:
    start = datetime(2026, 3, 1, 23, tzinfo=UTC)
    email = pgproto.UUID(str(uuid.uuid4()))  # what asyncpg hands back for a uuid column
    berlin = ZoneInfo("Europe/Berlin")
    totals = counts(7)
    return {
        "timezone": "Europe/Berlin",
        "from": start,
        "to": start + timedelta(days=2, microseconds=5),
        "interval": "hour",
        "email_id": None,
        "tag": "news",
        "totals": totals,
        "rates": rates(totals),
        "series": [
            {"bucket": (start + timedelta(hours=n)).astimezone(berlin).isoformat(), **counts(n)}
            for n in range(3)
        ],
        "emails": [
            _email_row(
                {
                    "email_id": email,
                    "subject": 'Spring "news" — ünïcode',
                    "tags": ["news", "b"],
                    "first_sent_at": start + timedelta(seconds=1.5),
                    **counts(3),
                }
            ),
            _email_row(
                {
                    "email_id": uuid.uuid4(),
                    "subject": None,
                    "tags": [],
                    "first_sent_at": None,
                    **{c: 0 for c in COUNTERS},
                }
            ),
        ],
        "top_links": [
            {
                "email_id": email,
                "link_index": 2,
                "url": "https://example.com/?a=1&b=2",
                "clicks": 5,
                "human_clicks": 4,
                "unique_clicks": 3,
                "unique_human_clicks": 2,
            }
        ],
    }


def test_the_report_reads_as_the_response_model_writes_it():
    report = body()
    ours = orjson.loads(to_json(report))
    models = orjson.loads(ReportOut.model_validate(report).model_dump_json(by_alias=True))
    assert ours == models
    # Not vacuous: instants, ids and rates are all in there, in the same spelling.
    assert ours["from"] == "2026-03-01T23:00:00Z"
    assert ours["emails"][0]["first_sent_at"] == "2026-03-01T23:00:01.500000Z"
    assert ours["emails"][1]["rates"]["open_rate"] is None
    assert ours["top_links"][0]["email_id"] == str(report["top_links"][0]["email_id"])
