"""Event handlers of the dispatcher service, named when_<event>_<action>.

Consumes `email.dispatch`; what is sent is published on `email.dispatched` (and hard bounces on
`email.bounced`) by the delivery engine, which works from the records queued here.
"""

from __future__ import annotations

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
from herald.events.scheduler import DispatchBatch


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


HANDLERS: Handlers = {DispatchBatch: [when_dispatch_batch_received]}
