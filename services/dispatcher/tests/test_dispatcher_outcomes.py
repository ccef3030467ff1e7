"""Outcome events encoded with orjson read back as the events pydantic would have made."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dispatcher.domain import gave_up_reply, retryable
from dispatcher.outcomes import outcome_events
from herald.encoded_events import EnvelopeEncoder
from herald.events import decode
from herald.events.dispatcher import MessageDispatched
from herald.events.tracking import EmailBounced


def record(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "email_id": uuid.uuid4(),
        "account_id": uuid.uuid4(),
        "recipient": "Ann.Example+news@example.com",
        "contact_id": uuid.uuid4(),
        "state": "sent",
        "attempts": 1,
        "smtp_code": 250,
        "smtp_reply": "2.0.0 Ok: queued as 4Xk9",
    }
    return values | overrides


def expected_dispatched(row: dict[str, Any], *, retryable: bool = False) -> MessageDispatched:
    return MessageDispatched(
        email_id=row["email_id"],
        message_id=str(row["id"]),
        recipient=row["recipient"],
        contact_id=row["contact_id"],
        status=row["state"],
        attempt=row["attempts"],
        smtp_code=row["smtp_code"],
        smtp_reply=row["smtp_reply"],
        retryable=retryable,
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"contact_id": None},
        {"state": "deferred", "smtp_code": 451, "smtp_reply": "4.7.1 Try again later"},
        {"state": "failed", "smtp_code": None, "smtp_reply": "invalid address: not an address"},
        {"recipient": "jörg@bücher.example", "smtp_reply": 'quoted "reply" \\ with ünïcode ☃'},
        {"attempts": 7, "smtp_code": None, "smtp_reply": None},
    ],
)
def test_a_dispatched_event_decodes_to_the_model_it_encodes(overrides: dict[str, Any]):
    row = record(**overrides)
    before = datetime.now(UTC)
    [event] = outcome_events([row])
    envelope = decode(event.payload)
    assert envelope.data == expected_dispatched(row)
    assert envelope.id == uuid.UUID(event.id)
    assert envelope.type == MessageDispatched.TYPE
    assert envelope.version == 1
    assert envelope.account_id == row["account_id"]
    assert envelope.correlation_id is None
    assert before <= envelope.occurred_at <= datetime.now(UTC) + timedelta(seconds=1)
    assert event.topic == MessageDispatched.TOPIC
    assert event.key == envelope.data.partition_key().encode()


def test_only_failures_whose_retries_ran_out_are_retryable():
    gave_up = record(state="failed", smtp_code=451, smtp_reply=gave_up_reply(9, "451 busy"))
    refused = record(state="failed", smtp_code=550, smtp_reply="5.1.1 no such user")
    unsendable = record(state="failed", smtp_code=None, smtp_reply="invalid address: too long")
    events = outcome_events([gave_up, refused, unsendable])
    assert [decode(e.payload).data.retryable for e in events] == [True, False, False]
    assert decode(events[0].payload).data == expected_dispatched(gave_up, retryable=True)
    assert retryable("failed", gave_up["smtp_reply"])
    assert not retryable("sent", gave_up["smtp_reply"])


def test_a_hard_bounce_follows_its_outcome_keyed_by_the_address():
    bounced, kept = record(state="failed", smtp_code=550), record()
    events = outcome_events([bounced, kept], bounced={bounced["id"]})
    assert [decode(e.payload).type for e in events] == [
        "email.dispatched",
        "email.bounced",
        "email.dispatched",
    ]
    envelope = decode(events[1].payload)
    assert envelope.data == EmailBounced(
        email_id=bounced["email_id"],
        message_id=str(bounced["id"]),
        recipient=bounced["recipient"],
        contact_id=bounced["contact_id"],
        hard=True,
        source="smtp",
        detail=bounced["smtp_reply"],
    )
    assert envelope.account_id == bounced["account_id"]
    assert events[1].topic == EmailBounced.TOPIC
    assert events[1].key == envelope.data.partition_key().encode()
    assert len({e.id for e in events}) == 3


def test_the_encoder_takes_exactly_the_fields_of_the_model():
    encoder = EnvelopeEncoder(MessageDispatched)
    data = expected_dispatched(record()).model_dump(mode="json")
    now = datetime.now(UTC)
    encoder.encode(data, account_id=None, key=None, occurred_at=now)
    with pytest.raises(ValueError, match="retryable"):
        encoder.encode(
            {k: v for k, v in data.items() if k != "retryable"},
            account_id=None,
            key=None,
            occurred_at=now,
        )
    with pytest.raises(ValueError, match="extra"):
        encoder.encode(data | {"extra": 1}, account_id=None, key=None, occurred_at=now)
