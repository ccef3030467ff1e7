"""Event handlers of the scheduler service, named when_<event>_<action>."""

from __future__ import annotations

import logging
from typing import Any

from herald import outbox
from herald.consumer import Handlers
from herald.db import Conn
from herald.events import Envelope
from herald.events.campaign import EmailCancelled, EmailScheduled
from herald.events.scheduler import EmailFannedOut
from scheduler import domain, store
from scheduler.metrics import FANOUTS

log = logging.getLogger(__name__)


async def when_email_scheduled_set_timer(envelope: Envelope[Any], conn: Conn) -> None:
    """Store (or move) the email's timer; an older revision than the stored one is ignored."""
    data: EmailScheduled = envelope.data
    current = await store.timer_state(conn, email_id=data.email_id)
    if not domain.replaces(
        incoming_revision=data.revision,
        current_revision=current["revision"] if current else None,
        current_state=current["state"] if current else None,
    ):
        log.info(
            "schedule ignored: superseded or already fired",
            extra={"email_id": str(data.email_id), "revision": data.revision},
        )
        return
    await store.put_timer(
        conn,
        email_id=data.email_id,
        account_id=envelope.account_id,
        revision=data.revision,
        send_at=data.send_at,
        payload=data.model_dump(mode="json"),
    )


async def when_email_cancelled_cancel_timer(envelope: Envelope[Any], conn: Conn) -> None:
    """Cancel the pending timer, or stop a fan-out under way before its next batch."""
    data: EmailCancelled = envelope.data
    await store.cancel_timer(
        conn, email_id=data.email_id, account_id=envelope.account_id, revision=data.revision
    )
    stopped = await store.cancel_fanout(conn, email_id=data.email_id)
    if stopped is not None:
        ended = EmailFannedOut(
            email_id=data.email_id,
            revision=stopped["revision"],
            total_recipients=stopped["total"],
            batches=stopped["batch_no"],
            outcome="cancelled",
        )
        await outbox.write(conn, Envelope.wrap(ended, account_id=envelope.account_id))
        FANOUTS.labels("cancelled").inc()


HANDLERS: Handlers = {
    EmailScheduled: [when_email_scheduled_set_timer],
    EmailCancelled: [when_email_cancelled_cancel_timer],
}
