"""Event handlers of the dispatcher service, named when_<event>_<action>.

Consumes `email.dispatch` and `email.retries`; what is sent is published on `email.dispatched`
(and hard bounces on `email.bounced`) by the delivery engine, which works from the records queued
here.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from dispatcher import store
from dispatcher.domain import InvalidAddress, mailbox
from dispatcher.metrics import RECIPIENTS_QUEUED
from dispatcher.outcomes import outcome_events
from herald import outbox
from herald.consumer import Handlers
from herald.db import Conn
from herald.events import Envelope
from herald.events.campaign import EmailRetryRequested
from herald.events.scheduler import DispatchBatch

log = logging.getLogger(__name__)


async def when_dispatch_batch_received(envelope: Envelope[DispatchBatch], conn: Conn) -> None:
    """Queue a message per recipient of the batch, once per email and address."""
    batch = envelope.data
    if envelope.account_id is None:
        # Links and unsubscribes are signed for an account: without one the batch is unusable.
        raise ValueError("a DispatchBatch must carry the account_id of its email")
    await store.save_content(
        conn,
        email_id=batch.email_id,
        revision=batch.revision,
        account_id=envelope.account_id,
        kind=batch.kind,
        content=batch.content.model_dump(mode="json"),
        template_vars=batch.template_vars,
    )
    good: list[Any] = []
    bad: list[tuple[str, uuid.UUID | None, str]] = []
    for recipient in batch.recipients:
        try:
            mailbox(recipient.email)
        except InvalidAddress as exc:
            # Cut to what an index entry takes: a garbage "address" must not sink the batch.
            bad.append((recipient.email[:320], recipient.contact_id, f"invalid address: {exc}"))
        else:
            good.append(recipient)
    queued = await store.queue_messages(
        conn,
        email_id=batch.email_id,
        revision=batch.revision,
        account_id=envelope.account_id,
        recipients=[r.email.strip() for r in good],
        contact_ids=[r.contact_id for r in good],
        first_names=[r.first_name for r in good],
        last_names=[r.last_name for r in good],
        attributes=[r.attributes for r in good],
    )
    if bad:
        failed = await store.record_unsendable(
            conn,
            email_id=batch.email_id,
            revision=batch.revision,
            account_id=envelope.account_id,
            recipients=[b[0] for b in bad],
            contact_ids=[b[1] for b in bad],
            reasons=[b[2] for b in bad],
        )
        await outbox.write_many(conn, outcome_events(failed))
    RECIPIENTS_QUEUED.inc(queued)


async def when_retry_requested_requeue_failed(
    envelope: Envelope[EmailRetryRequested], conn: Conn
) -> None:
    """Queue the email's messages that failed for want of more retries once more (unless
    suppressed since): the campaign service forgot exactly those failures (`retryable` on
    their outcome) and waits for `failed` new outcomes. The outcomes of the others that failed
    (refused for good, unsendable, suppressed) are published again: the campaign service
    counts a recipient's outcome once, so they change nothing there, and a campaign service
    from before `retryable`, which forgot every failure, counts them again. Sent ones are not
    touched."""
    email_id, account_id = envelope.data.email_id, envelope.account_id
    if account_id is None:
        raise ValueError("an EmailRetryRequested must carry the account_id of its email")
    requeued = await store.requeue_given_up(
        conn, email_id=email_id, account_id=account_id, besides=envelope.data.suppressed
    )
    kept = await store.failed_messages(conn, email_id=email_id, account_id=account_id)
    await outbox.write_many(conn, outcome_events(kept))
    if envelope.data.failed not in (requeued, requeued + len(kept)):
        # The campaign service waits for `failed` outcomes: a mismatch leaves it waiting.
        log.warning(
            "retry of an email's failed recipients found a different number of them",
            extra={
                "email_id": str(email_id),
                "expected": envelope.data.failed,
                "requeued": requeued,
                "kept": len(kept),
            },
        )
    RECIPIENTS_QUEUED.inc(requeued)


HANDLERS: Handlers = {
    DispatchBatch: [when_dispatch_batch_received],
    EmailRetryRequested: [when_retry_requested_requeue_failed],
}
