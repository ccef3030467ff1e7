"""Event handlers of the contacts service, named when_<event>_<action>."""

from __future__ import annotations

import logging
from typing import Any

from contacts import flows
from contacts.metrics import EVENTS_IGNORED
from herald.consumer import Handlers
from herald.db import Conn
from herald.events import Envelope
from herald.events.tracking import EmailBounced, EmailComplained

log = logging.getLogger(__name__)


def _account(envelope: Envelope[Any]) -> bool:
    if envelope.account_id is None:
        # Without an account there is no suppression list to put the address on.
        EVENTS_IGNORED.labels(envelope.type).inc()
        log.warning("event names no account; ignored", extra={"event_id": str(envelope.id)})
        return False
    return True


async def when_email_bounced_suppress(envelope: Envelope[EmailBounced], conn: Conn) -> None:
    """A hard bounce suppresses the address; a soft one is only counted."""
    if not _account(envelope):
        return
    assert envelope.account_id is not None
    bounce = envelope.data
    if not bounce.hard:
        await flows.count_soft_bounce(conn, account_id=envelope.account_id, email=bounce.recipient)
        return
    await flows.suppress(
        conn,
        account_id=envelope.account_id,
        email=flows.normalise_or_lower(bounce.recipient),
        reason="bounced",
        email_id=bounce.email_id,
    )


async def when_email_complained_suppress(envelope: Envelope[EmailComplained], conn: Conn) -> None:
    """A spam complaint suppresses the address."""
    if not _account(envelope):
        return
    assert envelope.account_id is not None
    await flows.suppress(
        conn,
        account_id=envelope.account_id,
        email=flows.normalise_or_lower(envelope.data.recipient),
        reason="complained",
        email_id=envelope.data.email_id,
    )


HANDLERS: Handlers = {
    EmailBounced: [when_email_bounced_suppress],
    EmailComplained: [when_email_complained_suppress],
}
