"""Event handlers of the campaign service, named when_<event>_<action>."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg

from campaign import domain, emails, store
from campaign.config import Settings
from campaign.metrics import EMAILS_FINISHED, RECIPIENT_OUTCOMES, REQUESTS
from herald.consumer import BatchHandler, Handlers
from herald.db import Conn
from herald.events import Envelope
from herald.events.auth import UserChanged
from herald.events.dispatcher import MessageDispatched
from herald.events.requests import SendRequested
from herald.events.scheduler import EmailFannedOut, EmailFanoutStarted

log = logging.getLogger(__name__)


async def when_user_changed_store_sender(envelope: Envelope[Any], conn: Conn) -> None:
    """Keep the account's sender identity, timezone and quota as auth last published them."""
    data: UserChanged = envelope.data
    await store.put_sender(
        conn,
        account_id=data.user_id,
        email=data.email,
        email_verified=data.email_verified,
        default_sender_name=data.default_sender_name,
        reply_to=data.reply_to,
        timezone=data.timezone,
        status=data.status,
        daily_send_quota=data.daily_send_quota,
    )


async def when_fanout_started_mark_queued(envelope: Envelope[Any], conn: Conn) -> None:
    """The scheduler's timer fired: a scheduled email is now queued for delivery."""
    data: EmailFanoutStarted = envelope.data
    await store.mark_fired(conn, email_id=data.email_id)


async def _finish_if_complete(
    conn: Conn, email_id: uuid.UUID, state: asyncpg.Record | None
) -> None:
    if state is None:
        return
    final = domain.completion(
        status=state["status"],
        recipients=state["recipients"],
        sent=state["sent_count"],
        failed=state["failed_count"],
    )
    if final is not None:
        await store.finish(conn, email_id=email_id, status=final)
        EMAILS_FINISHED.labels(final).inc()


async def when_email_fanned_out_record_total(envelope: Envelope[Any], conn: Conn) -> None:
    """Record how many recipients the email went to; it is sent once all have an outcome."""
    data: EmailFannedOut = envelope.data
    reason = f"audience could not be resolved: {data.reason}" if data.outcome == "failed" else None
    state = await store.record_fanout(
        conn, email_id=data.email_id, total=data.total_recipients, reason=reason
    )
    if data.outcome == "failed" and data.total_recipients == 0:
        # Nobody was handed out: nothing will be sent, so it cannot count as sent.
        await store.finish(conn, email_id=data.email_id, status="failed")
        EMAILS_FINISHED.labels("failed").inc()
        return
    await _finish_if_complete(conn, data.email_id, state)


async def when_message_dispatched_count_outcome(envelope: Envelope[Any], conn: Conn) -> None:
    """Count a recipient's final outcome once (a deferral is not final) and roll the status up."""
    data: MessageDispatched = envelope.data
    if data.status == "deferred":
        await store.mark_sending(conn, email_id=data.email_id)
        return
    state = await store.record_outcome(
        conn,
        email_id=data.email_id,
        recipient=data.recipient,
        status=data.status,
        retryable=data.retryable,
    )
    if state is not None:
        RECIPIENT_OUTCOMES.labels(data.status).inc()
    await _finish_if_complete(conn, data.email_id, state)


async def when_messages_dispatched_count_outcomes(
    envelopes: Sequence[Envelope[Any]], conn: Conn
) -> None:
    """`when_message_dispatched_count_outcome` of each event in turn, in two or three statements."""
    deferred: dict[uuid.UUID, None] = {}
    # The first final outcome of a recipient counts, as it would one event at a time.
    final: dict[tuple[uuid.UUID, str], tuple[str, bool]] = {}
    for envelope in envelopes:
        data: MessageDispatched = envelope.data
        if data.status == "deferred":
            deferred[data.email_id] = None
        else:
            final.setdefault((data.email_id, data.recipient.lower()), (data.status, data.retryable))
    if deferred:
        await store.mark_sending_many(conn, email_ids=list(deferred))
    if not final:
        return
    states = await store.record_outcomes(
        conn,
        email_ids=[email_id for email_id, _ in final],
        recipients=[recipient for _, recipient in final],
        statuses=[status for status, _ in final.values()],
        retryable=[retryable for _, retryable in final.values()],
    )
    for state in states:
        RECIPIENT_OUTCOMES.labels("sent").inc(state["newly_sent"])
        RECIPIENT_OUTCOMES.labels("failed").inc(state["newly_failed"])
        await _finish_if_complete(conn, state["id"], state)


async def when_send_requested_queue(
    envelope: Envelope[Any], conn: Conn, *, settings: Settings
) -> None:
    """Queue the requested email like `POST /send` (a repeated idempotency key is a no-op)."""
    data: SendRequested = envelope.data
    if envelope.account_id is None:
        raise ValueError("a send request reached the handler without an account")
    row = await emails.accept_request(
        conn, settings=settings, account_id=envelope.account_id, request=data
    )
    REQUESTS.labels("accepted" if row is not None else "repeated").inc()


HANDLERS: Handlers = {
    UserChanged: [when_user_changed_store_sender],
    EmailFanoutStarted: [when_fanout_started_mark_queued],
    EmailFannedOut: [when_email_fanned_out_record_total],
    MessageDispatched: [
        BatchHandler(
            each=when_message_dispatched_count_outcome,
            many=when_messages_dispatched_count_outcomes,
        )
    ],
}

# Read by their own consumer (see campaign.requests), which binds the settings.
REQUEST_HANDLERS = {SendRequested: [when_send_requested_queue]}
ALSO_CONSUMES = tuple(cls.TOPIC for cls in REQUEST_HANDLERS)
