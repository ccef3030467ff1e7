"""Opens and clicks are published without pydantic, so their envelopes must be exactly what
`Envelope[...]` writes and what every consumer reads back."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

import pytest
from asyncpg.pgproto import pgproto

from herald.events import Envelope, decode
from herald.events.tracking import EmailClicked, EmailOpened
from tracking.domain import Activity, Recipient
from tracking.flows import event_payload

OCCURRED = datetime(2026, 3, 2, 9, 30, 0, 120_000, tzinfo=UTC)


def recipient(*, named: bool) -> Recipient:
    # What asyncpg hands back for uuid columns.
    return Recipient(
        message_id="17.abc@example.com",
        email_id=pgproto.UUID(str(uuid.uuid4())),
        account_id=pgproto.UUID(str(uuid.uuid4())),
        recipient="ann@example.com" if named else None,
        contact_id=pgproto.UUID(str(uuid.uuid4())) if named else None,
    )


def activity(kind: Literal["open", "click"], r: Recipient, reason: str | None) -> Activity:
    return Activity(
        id=uuid.uuid4(),
        kind=kind,
        source="herald",
        message_id=r.message_id,
        email_id=r.email_id,
        account_id=r.account_id,
        # Whole seconds and fractions are written differently: both are covered.
        at=datetime(2026, 3, 2, 9, 29, 59, 0 if reason else 5, tzinfo=UTC),
        reason=reason,
        user_agent='Mozilla/5.0 "quoted" \u00e9' if reason is None else None,
        ip="203.0.113.9",
        link_index=3 if kind == "click" else None,
        url="https://example.com/a?b=c&d=\u00e9" if kind == "click" else None,
    )


@pytest.mark.parametrize("kind", ["open", "click"])
@pytest.mark.parametrize("reason", [None, "apple_mpp"])
@pytest.mark.parametrize("named", [True, False])
def test_payload_is_the_envelope_pydantic_writes(
    kind: Literal["open", "click"], reason: str | None, named: bool
) -> None:
    r = recipient(named=named)
    event = activity(kind, r, reason)
    common = {
        "email_id": r.email_id,
        "message_id": r.message_id,
        "recipient": r.recipient or "",
        "contact_id": r.contact_id,
        "at": event.at,
        "machine": reason is not None,
        "reason": reason,
        "user_agent": event.user_agent,
    }
    data: EmailOpened | EmailClicked
    if kind == "open":
        data = EmailOpened(**common)
    else:
        data = EmailClicked(**common, url=event.url, link_index=event.link_index)
    envelope: type[Envelope[Any]] = Envelope[type(data)]  # type: ignore[misc, assignment]
    expected = envelope(
        id=event.id,
        type=data.TYPE,
        version=data.VERSION,
        occurred_at=OCCURRED,
        account_id=r.account_id,
        data=data,
    )
    written = event_payload(event, r, OCCURRED)
    assert written == expected.to_bytes()
    assert decode(written) == expected
