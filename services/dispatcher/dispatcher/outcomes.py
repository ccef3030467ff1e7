"""What the dispatcher publishes about each attempt: `MessageDispatched`, and hard bounces.

One event per message sent: they are encoded straight from the records with orjson
(`herald.encoded_events`), as building and dumping pydantic envelopes cost more than the rest
of recording an outcome. `tests/test_dispatcher_outcomes.py` holds them to the models.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable
from datetime import UTC, datetime
from typing import Any, Protocol

from dispatcher.domain import retryable
from herald.encoded_events import EncodedEvent, EnvelopeEncoder
from herald.events.dispatcher import MessageDispatched
from herald.events.tracking import EmailBounced

_DISPATCHED = EnvelopeEncoder(MessageDispatched)
_BOUNCED = EnvelopeEncoder(EmailBounced)


class OutcomeRecord(Protocol):
    """A message record with `store._OUTCOME_COLUMNS` (an asyncpg record)."""

    def __getitem__(self, column: str, /) -> Any: ...


def outcome_events(
    records: Iterable[OutcomeRecord], *, bounced: Collection[uuid.UUID] = ()
) -> list[EncodedEvent]:
    """The events of settled message records.

    `bounced` names the records whose relay reply condemned the address itself.
    """
    occurred_at = datetime.now(UTC)
    events: list[EncodedEvent] = []
    for record in records:
        email_id = str(record["email_id"])
        message_id = str(record["id"])
        account_id = str(record["account_id"])
        contact_id = record["contact_id"]
        contact = str(contact_id) if contact_id is not None else None
        status, reply = record["state"], record["smtp_reply"]
        events.append(
            _DISPATCHED.encode(
                {
                    "email_id": email_id,
                    "message_id": message_id,
                    "recipient": record["recipient"],
                    "contact_id": contact,
                    "status": status,
                    "attempt": record["attempts"],
                    "smtp_code": record["smtp_code"],
                    "smtp_reply": reply,
                    "retryable": retryable(status, reply),
                },
                account_id=account_id,
                key=email_id,
                occurred_at=occurred_at,
            )
        )
        if record["id"] in bounced:
            events.append(
                _BOUNCED.encode(
                    {
                        "email_id": email_id,
                        "message_id": message_id,
                        "recipient": record["recipient"],
                        "contact_id": contact,
                        "hard": True,
                        "source": "smtp",
                        "detail": reply,
                    },
                    account_id=account_id,
                    key=record["recipient"],
                    occurred_at=occurred_at,
                )
            )
    return events
