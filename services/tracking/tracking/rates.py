"""Tracking events per minute, for the administrators' system view (`/internal/stats`).

Counted with SQL from what this service recorded, so the figure survives a restart and covers
every replica: events consumed from Kafka (the inbox: delivery outcomes, fan-outs), provider
notifications received (SES, SendGrid), and opens and clicks written from the pixel and click
links (Herald's own), in the last 60 seconds. Opens and clicks still in a replica's buffer
count once flushed.
"""

from __future__ import annotations

from herald.db import Conn


async def events_last_minute(conn: Conn) -> dict[str, int]:
    """Events recorded in the last 60 seconds, by source."""
    row = await conn.fetchrow(
        """SELECT (SELECT count(*) FROM inbox
                    WHERE received_at > now() - interval '1 minute') AS consumed,
                  (SELECT count(*) FROM provider_events
                    WHERE received_at > now() - interval '1 minute') AS provider,
                  count(*) FILTER (WHERE kind = 'open') AS opens,
                  count(*) FILTER (WHERE kind = 'click') AS clicks
             FROM activity
            -- A provider's opens and clicks are counted as notifications, once.
            WHERE at > now() - interval '1 minute' AND source = 'herald'"""
    )
    assert row is not None
    return {name: int(row[name]) for name in ("consumed", "provider", "opens", "clicks")}
