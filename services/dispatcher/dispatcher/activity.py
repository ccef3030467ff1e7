"""What the dispatcher did lately, for the administrators' system view (`/internal/stats`).

Counted with SQL from the per-recipient records rather than from process memory, so the
figures survive a restart and cover every replica: each replica answers the same totals.
`sent` and `failed` are records that reached that state in the window (`finished_at`, through
the `messages_finished` index); `deferred` are records whose latest deferral fell in the window
(`last_deferred_at`; a message deferred twice in the window counts once). `awaiting_retry` says
how many records are deferred now, waiting for their next attempt.
"""

from __future__ import annotations

from typing import Any

from herald.db import Conn


async def recent_outcomes(conn: Conn) -> dict[str, Any]:
    """Records sent, deferred and failed in the last minute and hour, and those awaiting a
    retry now."""
    row = await conn.fetchrow(
        """SELECT finished.*, deferred.*,
                  (SELECT count(*) FROM messages WHERE state = 'deferred') AS awaiting_retry
             FROM (SELECT count(*) FILTER (WHERE state = 'sent'
                                  AND finished_at > now() - interval '1 minute') AS sent_1m,
                          count(*) FILTER (WHERE state = 'failed'
                                  AND finished_at > now() - interval '1 minute') AS failed_1m,
                          count(*) FILTER (WHERE state = 'sent') AS sent_1h,
                          count(*) FILTER (WHERE state = 'failed') AS failed_1h
                     FROM messages
                    WHERE finished_at > now() - interval '1 hour') AS finished,
                  (SELECT count(*) FILTER (WHERE last_deferred_at > now() - interval '1 minute')
                              AS deferred_1m,
                          count(*) AS deferred_1h
                     FROM messages
                    WHERE last_deferred_at > now() - interval '1 hour') AS deferred"""
    )
    assert row is not None
    return {
        window: {
            "sent": row[f"sent_{suffix}"],
            "deferred": row[f"deferred_{suffix}"],
            "failed": row[f"failed_{suffix}"],
        }
        for window, suffix in (("last_minute", "1m"), ("last_hour", "1h"))
    } | {"awaiting_retry": row["awaiting_retry"]}
