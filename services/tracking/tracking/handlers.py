"""Event handlers of the tracking service, named when_<event>_<action>."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from herald.consumer import BatchHandler, Handler, Handlers
from herald.db import Conn
from herald.events import Envelope, EventData
from herald.events.auth import UserChanged
from herald.events.campaign import EmailScheduled
from herald.events.contacts import ContactSuppressed
from herald.events.dispatcher import MessageDispatched
from herald.events.scheduler import EmailFannedOut
from herald.events.tracking import EmailBounced
from tracking import flows, store
from tracking.metrics import SKIPPED

log = logging.getLogger(__name__)


async def when_message_dispatched_record_outcome(
    envelope: Envelope[Any], conn: Conn, *, rules: flows.Rules
) -> None:
    """Record the relay's answer for one recipient (sent, deferred, failed) in its account."""
    data: MessageDispatched = envelope.data
    if envelope.account_id is None:
        SKIPPED.labels(MessageDispatched.TYPE, "no_account").inc()
        log.warning("email.dispatched without an account ignored", extra={"event": envelope.id})
        return
    await flows.record_dispatch(
        conn, account_id=envelope.account_id, data=data, at=envelope.occurred_at, rules=rules
    )


async def when_messages_dispatched_record_outcomes(
    envelopes: Sequence[Envelope[Any]], conn: Conn, *, rules: flows.Rules
) -> None:
    """`when_message_dispatched_record_outcome` of each event in turn, sharing per-email work."""
    events = []
    for envelope in envelopes:
        if envelope.account_id is None:
            SKIPPED.labels(MessageDispatched.TYPE, "no_account").inc()
            log.warning("email.dispatched without an account ignored", extra={"event": envelope.id})
            continue
        events.append(
            flows.Dispatched(
                account_id=envelope.account_id, data=envelope.data, at=envelope.occurred_at
            )
        )
    await flows.record_dispatches(conn, events=events, rules=rules)


async def when_email_bounced_count_bounce(
    envelope: Envelope[Any], conn: Conn, *, rules: flows.Rules
) -> None:
    """Count a bounce the dispatcher reported (an SMTP 5xx); ours come back as no-ops."""
    data: EmailBounced = envelope.data
    await flows.record_reported_bounce(
        conn, account_id=envelope.account_id, data=data, at=envelope.occurred_at
    )


async def when_contact_suppressed_count_unsubscribe(
    envelope: Envelope[Any], conn: Conn, *, rules: flows.Rules
) -> None:
    """Count an unsubscribe that came from one of the account's emails."""
    data: ContactSuppressed = envelope.data
    await flows.record_unsubscribe(
        conn, account_id=envelope.account_id, data=data, at=envelope.occurred_at
    )


async def when_email_scheduled_store_details(
    envelope: Envelope[Any], conn: Conn, *, rules: flows.Rules
) -> None:
    """Keep the email's subject, kind, tags and tracking choices for reports and filters."""
    data: EmailScheduled = envelope.data
    if envelope.account_id is None:
        SKIPPED.labels(EmailScheduled.TYPE, "no_account").inc()
        return
    await store.put_email_details(
        conn,
        email_id=data.email_id,
        account_id=envelope.account_id,
        subject=data.content.subject,
        kind=data.kind,
        tags=data.content.tags,
        track_opens=data.content.track_opens,
        track_clicks=data.content.track_clicks,
    )


async def when_email_fanned_out_store_total(
    envelope: Envelope[Any], conn: Conn, *, rules: flows.Rules
) -> None:
    """Keep how many recipients the email was handed out to (the base of `queued`)."""
    data: EmailFannedOut = envelope.data
    if envelope.account_id is None:
        SKIPPED.labels(EmailFannedOut.TYPE, "no_account").inc()
        return
    await store.put_fanout(
        conn,
        email_id=data.email_id,
        account_id=envelope.account_id,
        total=data.total_recipients,
        revision=data.revision,
    )


async def when_user_changed_store_timezone(
    envelope: Envelope[Any], conn: Conn, *, rules: flows.Rules
) -> None:
    """Keep the account's timezone, in which reports bucket their series."""
    data: UserChanged = envelope.data
    await store.put_timezone(conn, account_id=data.user_id, timezone=data.timezone)


RuleHandler = Callable[..., Awaitable[None]]

# Each handler also takes the service's machine-activity rules; `bind` gives them.
HANDLERS: dict[type[EventData], list[RuleHandler]] = {
    MessageDispatched: [when_message_dispatched_record_outcome],
    EmailBounced: [when_email_bounced_count_bounce],
    ContactSuppressed: [when_contact_suppressed_count_unsubscribe],
    EmailScheduled: [when_email_scheduled_store_details],
    EmailFannedOut: [when_email_fanned_out_store_total],
    UserChanged: [when_user_changed_store_timezone],
}


# Handlers that also take a batch's events of their type at once: the form that does.
BATCHED: dict[RuleHandler, Callable[..., Awaitable[None]]] = {
    when_message_dispatched_record_outcome: when_messages_dispatched_record_outcomes,
}


def bind(rules: flows.Rules) -> Handlers:
    """HANDLERS with the service's rules given, as the consumer calls them."""
    return {
        event: [_bind(handler, rules) for handler in handlers]
        for event, handlers in HANDLERS.items()
    }


def _bind(handler: RuleHandler, rules: flows.Rules) -> Handler:
    each = functools.partial(handler, rules=rules)
    many = BATCHED.get(handler)
    if many is None:
        return each
    return BatchHandler(each=each, many=functools.partial(many, rules=rules))
