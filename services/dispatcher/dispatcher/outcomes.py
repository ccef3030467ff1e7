"""What the dispatcher publishes about each attempt: `MessageDispatched`, and hard bounces."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable
from typing import Any

import asyncpg

from herald.events import Envelope
from herald.events.dispatcher import MessageDispatched
from herald.events.tracking import EmailBounced


def outcome_events(
    records: Iterable[asyncpg.Record], *, bounced: Collection[uuid.UUID] = ()
) -> list[Envelope[Any]]:
    """The events of settled message records (see `store._OUTCOME_COLUMNS`).

    `bounced` names the records whose relay reply condemned the address itself.
    """
    events: list[Envelope[Any]] = []
    for record in records:
        message_id = str(record["id"])
        events.append(
            Envelope.wrap(
                MessageDispatched(
                    email_id=record["email_id"],
                    message_id=message_id,
                    recipient=record["recipient"],
                    contact_id=record["contact_id"],
                    status=record["state"],
                    attempt=record["attempts"],
                    smtp_code=record["smtp_code"],
                    smtp_reply=record["smtp_reply"],
                ),
                account_id=record["account_id"],
            )
        )
        if record["id"] in bounced:
            events.append(
                Envelope.wrap(
                    EmailBounced(
                        email_id=record["email_id"],
                        message_id=message_id,
                        recipient=record["recipient"],
                        contact_id=record["contact_id"],
                        hard=True,
                        source="smtp",
                        detail=record["smtp_reply"],
                    ),
                    account_id=record["account_id"],
                )
            )
    return events
