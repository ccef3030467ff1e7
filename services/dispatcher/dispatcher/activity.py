"""What the dispatcher did lately, for the administrators' system view (`/internal/stats`).

Counted with SQL from the per-recipient records rather than from process memory, so the
figures survive a restart and cover every replica: each replica answers the same totals.
`sent` and `failed` are records that reached that state in the window (`finished_at`, through
the `messages_finished` index). A deferral leaves no time on the record, so "deferred in the
window" cannot be read back: `deferred` is null and `awaiting_retry` says how many records are
deferred now, waiting for their next attempt.
"""

from __future__ import annotations

from typing import Any

from herald.db import Conn


async def recent_outcomes(conn: Conn) -> dict[str, Any]:
    """Records sent and failed in the last minute and hour, and those awaiting a retry now."""
    row = await conn.fetchrow(
        """SELECT count(*) FILTER (WHERE state = 'sent'
                                     AND finished_at > now() - interval '1 minute') AS sent_1m,
                  count(*) FILTER (WHERE state = 'failed'
                                     AND finished_at > now() - interval '1 minute') AS failed_1m,
                  count(*) FILTER (WHERE state = 'sent') AS sent_1h,
                  count(*) FILTER (WHERE state = 'failed') AS failed_1h,
                  (SELECT count(*) FROM messages WHERE state = 'deferred') AS awaiting_retry
             FROM messages
            WHERE finished_at > now() - interval '1 hour'"""
    )
    assert row is not None
    return {
        "last_minute": {"sent": row["sent_1m"], "deferred": None, "failed": row["failed_1m"]},
        "last_hour": {"sent": row["sent_1h"], "deferred": None, "failed": row["failed_1h"]},
        "awaiting_retry": row["awaiting_retry"],
    }
