"""What each input does to the stored state: outcomes, provider notifications, opens and clicks.

Every function runs inside the caller's transaction. Roll-up changes are collected in a
`Rollup`: the flush worker applies its own at once, consumers and webhooks queue theirs in
`rollup_deltas` for it, so the roll-ups have a single writer.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import orjson

from herald import logs, outbox
from herald.db import Conn
from herald.events import Envelope, EventData
from herald.events.contacts import ContactSuppressed
from herald.events.dispatcher import MessageDispatched
from herald.events.tracking import EmailBounced, EmailClicked, EmailComplained, EmailOpened
from tracking import store
from tracking.domain import (
    Activity,
    LinkState,
    Recipient,
    Rollup,
    message_keys,
    normalize_address,
    normalize_message_id,
    record_bounce,
    record_click,
    record_complaint,
    record_confirmation,
    record_open,
    record_outcome,
)
from tracking.machine import Classifier, soon_after_delivery
from tracking.metrics import SKIPPED
from tracking.providers import ProviderEvent, link_key

log = logging.getLogger(__name__)

# Provider opens and clicks get ids derived from the provider's event id, so a repeat is one.
_PROVIDER_ACTIVITY = uuid.UUID("5b0e5a52-61c4-4d7e-9f57-1d7b3c1f0a11")


@dataclass(frozen=True)
class Rules:
    """The machine-activity rules that need more than the request (see tracking.machine)."""

    classifier: Classifier
    scanner_click_seconds: float


async def apply_activity(
    conn: Conn, events: Sequence[Activity], rollup: Rollup, *, rules: Rules
) -> list[Activity]:
    """Record opens and clicks and publish them; returns those new (a repeat id is skipped),
    with their final machine flag."""
    if not events:
        return []
    await store.ensure_emails(conn, emails=[(e.email_id, e.account_id) for e in events])
    recipients = await store.lock_engagement(conn, message_ids=[e.message_id for e in events])
    missing = [
        (e.message_id, e.email_id, e.account_id) for e in events if e.message_id not in recipients
    ]
    if missing:
        # Opens that came before the delivery outcome named their recipient.
        await store.ensure_recipients(conn, rows=missing)
        recipients |= await store.lock_engagement(conn, message_ids=[m for m, _, _ in missing])
    links = await store.lock_links(
        conn,
        keys=[(e.message_id, e.link_index) for e in events if e.link_index is not None],
    )
    judged = []
    for event in sorted(events, key=lambda e: e.at):
        r = recipients[event.message_id]
        if (
            event.kind == "click"
            and event.reason is None
            and soon_after_delivery(event.at, r.sent_at, rules.scanner_click_seconds)
        ):
            event = replace(event, reason="soon_after_delivery")
        judged.append(event)
    new = await store.insert_activity(conn, events=judged)
    recorded = [e for e in judged if e.id in new]
    outbox_rows: list[tuple[uuid.UUID, str, bytes, bytes]] = []
    occurred_at = datetime.now(UTC)
    correlation = logs.correlation_id.get()
    headers = orjson.dumps([["correlation_id", correlation]]).decode() if correlation else "[]"
    touched: dict[tuple[str, int], LinkState] = {}
    for n, event in enumerate(recorded, start=1):
        if n % 500 == 0:
            # A big batch is CPU work: let the pixel and click requests in between.
            await asyncio.sleep(0)
        r = recipients[event.message_id]
        if event.kind == "open":
            record_open(r, rollup, at=event.at, machine=event.machine)
        else:
            assert event.link_index is not None
            assert event.url is not None
            key = (event.message_id, event.link_index)
            link = touched[key] = links.setdefault(key, LinkState())
            record_click(
                r,
                link,
                rollup,
                at=event.at,
                machine=event.machine,
                link_index=event.link_index,
                url=event.url,
            )
        outbox_rows.append(
            (
                event.id,
                _EVENT_TYPES[event.kind].TOPIC,
                str(r.email_id).encode(),
                event_payload(event, r, occurred_at),
            )
        )
    changed = {e.message_id for e in recorded}
    await store.save_engagement(conn, recipients=[recipients[m] for m in sorted(changed)])
    await store.save_links(conn, links=touched)
    await store.write_events(conn, rows=outbox_rows, headers=headers)
    return recorded


_EVENT_TYPES: dict[str, type[EmailOpened | EmailClicked]] = {
    "open": EmailOpened,
    "click": EmailClicked,
}


def event_payload(event: Activity, r: Recipient, occurred_at: datetime) -> bytes:
    """The `email.opened` / `email.clicked` envelope of a recorded open or click, as JSON.

    The same bytes `Envelope[EmailOpened](...).to_bytes()` gives (a test holds them
    together), written with orjson straight from our own typed values: building and
    serialising two pydantic models per event cost more than everything else a flush does.
    The event is the activity: one id for both keeps a replayed one recognisable.
    """
    data: dict[str, Any] = {
        "email_id": r.email_id,
        "message_id": r.message_id,
        "recipient": r.recipient or "",
    }
    if event.kind == "click":
        data["url"] = event.url
        data["link_index"] = event.link_index
    data["at"] = event.at
    data["machine"] = event.reason is not None
    data["user_agent"] = event.user_agent
    data["reason"] = event.reason
    data["contact_id"] = r.contact_id
    kind = _EVENT_TYPES[event.kind]
    envelope = {
        "id": event.id,
        "type": kind.TYPE,
        "version": kind.VERSION,
        "occurred_at": occurred_at,
        "account_id": r.account_id,
        "correlation_id": None,
        "data": data,
    }
    return orjson.dumps(envelope, default=_as_text, option=orjson.OPT_UTC_Z)


def _as_text(value: object) -> str:
    # asyncpg's own UUID type, which orjson does not take for a UUID.
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"not serialisable: {type(value).__name__}")


@dataclass(frozen=True)
class Dispatched:
    """One `email.dispatched` event, as `record_dispatches` takes it."""

    account_id: uuid.UUID
    data: MessageDispatched
    at: datetime


async def record_dispatch(
    conn: Conn,
    *,
    account_id: uuid.UUID,
    data: MessageDispatched,
    at: datetime,
    rules: Rules,
) -> None:
    """The relay's answer for one recipient (sent, deferred or failed)."""
    await _record_dispatches(
        conn, [Dispatched(account_id=account_id, data=data, at=at)], rules=rules, batched=False
    )


async def record_dispatches(conn: Conn, *, events: Sequence[Dispatched], rules: Rules) -> None:
    """The relay's answers, in order, as `record_dispatch` of each: the rows are locked, read
    and written once for the batch, and the answers applied to them in memory."""
    await _record_dispatches(conn, events, rules=rules, batched=True)


async def _record_dispatches(
    conn: Conn, events: Sequence[Dispatched], *, rules: Rules, batched: bool
) -> None:
    if not events:
        return
    # The account first named keeps the email, in the order of the events.
    named: dict[uuid.UUID, uuid.UUID] = {}
    for event in events:
        named.setdefault(event.data.email_id, event.account_id)
    await store.ensure_emails(conn, emails=list(named.items()))
    owners = await store.email_accounts(conn, email_ids=list(named))
    mine = []
    for event in events:
        email_id = event.data.email_id
        if owners.get(email_id) != event.account_id:
            SKIPPED.labels(MessageDispatched.TYPE, "account_mismatch").inc()
            log.warning("outcome for another account's email ignored", extra={"email": email_id})
            continue
        mine.append(event)
    rollup = Rollup()
    first_sent: dict[uuid.UUID, datetime] = {}
    if not batched or not await _record_in_memory(conn, mine, rollup, first_sent):
        # Notifications waiting for a newly named recipient apply between its outcome and the
        # next (rare: the provider told before the relay's answer came): one by one, then.
        rollup, first_sent = Rollup(), {}
        for event in mine:
            if await _record_one_dispatch(conn, event, rollup, rules=rules) and (
                event.data.status == "sent"
            ):
                _note_first_sent(first_sent, event)
    for email_id, at in first_sent.items():
        await store.mark_first_sent(conn, email_id=email_id, at=at)
    await store.queue_deltas(conn, deltas=rollup.deltas)


def _note_first_sent(first_sent: dict[uuid.UUID, datetime], event: Dispatched) -> None:
    email_id = event.data.email_id
    first_sent[email_id] = min(first_sent.get(email_id, event.at), event.at)


async def _record_in_memory(
    conn: Conn,
    events: Sequence[Dispatched],
    rollup: Rollup,
    first_sent: dict[uuid.UUID, datetime],
) -> bool:
    """`_record_one_dispatch` of each event, on rows locked and written once; False, with
    nothing written, when a recipient it names for the first time has notifications waiting."""
    keys = [
        (
            normalize_message_id(e.data.message_id),
            e.data.email_id,
            normalize_address(e.data.recipient),
        )
        for e in events
    ]
    rows = await store.lock_for_outcomes(conn, keys=keys)
    # Every row an event could name is locked above: one of its message id, or one of its
    # address (then or after an earlier event in the batch gave it that address).
    by_address = {(r.email_id, r.recipient): r for r in rows.values() if r.recipient is not None}
    touched: dict[str, Recipient] = {}
    newly_named: list[str] = []
    for event, (message_id, email_id, address) in zip(events, keys, strict=True):
        data = event.data
        found = rows.get(message_id)
        candidates = [r for r in (found, by_address.get((email_id, address))) if r is not None]
        named = min(
            (r for r in candidates if r.recipient == address),
            key=lambda r: r.message_id,
            default=None,
        )
        if named is not None and named.message_id != message_id:
            log.warning(
                "recipient's Message-ID changed between attempts",
                extra={"email": email_id, "message_id": message_id},
            )
        r = named or found
        if r is None:
            r = rows[message_id] = Recipient(
                message_id=message_id, email_id=email_id, account_id=event.account_id
            )
        if r.recipient is None:
            newly_named.append(r.message_id)
        if r.recipient != address:
            if r.recipient is not None and by_address.get((r.email_id, r.recipient)) is r:
                del by_address[(r.email_id, r.recipient)]
            r.recipient = address
            by_address[(r.email_id, address)] = r
        r.contact_id = data.contact_id or r.contact_id
        changed = record_outcome(
            r,
            rollup,
            status=data.status,
            attempt=data.attempt,
            at=event.at,
            smtp_code=data.smtp_code,
            smtp_reply=data.smtp_reply[:1000] if data.smtp_reply else None,
        )
        touched[r.message_id] = r
        if changed and data.status == "sent":
            _note_first_sent(first_sent, event)
    if await store.unmatched_provider_events_of(conn, message_ids=newly_named):
        return False
    # One statement: should the batch move an address from one row to another, the unique
    # index may refuse the order it is written in, and the consumer retries event by event.
    await store.save_recipients(conn, recipients=list(touched.values()))
    return True


async def _record_one_dispatch(
    conn: Conn, event: Dispatched, rollup: Rollup, *, rules: Rules
) -> bool:
    """Apply one answer to its recipient's row; False when it changes nothing (a repeat)."""
    data = event.data
    message_id = normalize_message_id(data.message_id)
    address = normalize_address(data.recipient)
    rows = await store.lock_for_outcome(
        conn, message_id=message_id, email_id=data.email_id, recipient=address
    )
    named = next((r for r in rows if r.recipient == address), None)
    if named is not None and named.message_id != message_id:
        # Tokens in the mail name the first Message-ID; keep counting under it.
        log.warning(
            "recipient's Message-ID changed between attempts",
            extra={"email": data.email_id, "message_id": message_id},
        )
    r = named or next((r for r in rows if r.message_id == message_id), None)
    if r is None:
        r = Recipient(message_id=message_id, email_id=data.email_id, account_id=event.account_id)
    newly_named = r.recipient is None
    r.recipient = address
    r.contact_id = data.contact_id or r.contact_id
    changed = record_outcome(
        r,
        rollup,
        status=data.status,
        attempt=data.attempt,
        at=event.at,
        smtp_code=data.smtp_code,
        smtp_reply=data.smtp_reply[:1000] if data.smtp_reply else None,
    )
    await store.save_recipients(conn, recipients=[r])
    if newly_named:
        # Notifications that arrived before this outcome was known apply now.
        for notification in await store.unmatched_provider_events(conn, message_id=r.message_id):
            await apply_provider_event(conn, r.message_id, notification, rollup, rules=rules)
    return changed


async def record_provider_events(
    conn: Conn, events: Sequence[ProviderEvent], *, rules: Rules
) -> Counter[str]:
    """Apply a webhook's notifications; counts them by outcome (matched, unmatched, duplicate)."""
    outcomes: Counter[str] = Counter()
    rollup = Rollup()
    for event in events:
        if not await store.insert_provider_event(conn, event=event):
            outcomes["duplicate"] += 1
            continue
        message_id = event.message_id
        if message_id is None and event.provider_message_id is not None:
            message_id = await store.message_for_provider_id(
                conn, provider=event.provider, provider_message_id=event.provider_message_id
            )
        if message_id is None or not await apply_provider_event(
            conn, message_id, event, rollup, rules=rules
        ):
            # Kept unmatched (under the id we found, if any) until that message is known.
            if message_id is not None and event.message_id is None:
                await store.name_provider_event(
                    conn, provider=event.provider, event_id=event.event_id, message_id=message_id
                )
            outcomes["unmatched"] += 1
            continue
        outcomes["matched"] += 1
    await store.queue_deltas(conn, deltas=rollup.deltas)
    return outcomes


async def apply_provider_event(
    conn: Conn, message_id: str, event: ProviderEvent, rollup: Rollup, *, rules: Rules
) -> bool:
    """Apply one notification to its message; False when the message is unknown."""
    keys = message_keys(message_id)
    found = await store.lock_recipients(conn, message_ids=keys)
    r = next((found[k] for k in keys if k in found), None)
    if r is None:
        return False
    message_id = r.message_id
    await store.mark_provider_event(
        conn, provider=event.provider, event_id=event.event_id, message_id=message_id
    )
    if event.kind in ("open", "click"):
        activity = await _provider_activity(conn, r, event, rules)
        if activity is not None:
            await apply_activity(conn, [activity], rollup, rules=rules)
        return True
    envelope: Envelope[EventData] | None = None
    address = r.recipient or event.recipient or ""
    if event.kind == "delivered":
        record_confirmation(r, rollup, at=event.at)
    elif event.kind == "bounce" or (event.kind == "dropped" and event.hard):
        if record_bounce(r, rollup, hard=event.hard, at=event.at, detail=event.detail):
            envelope = Envelope.wrap(
                EmailBounced(
                    email_id=r.email_id,
                    message_id=r.message_id,
                    recipient=address,
                    contact_id=r.contact_id,
                    hard=event.hard,
                    source=event.provider,
                    detail=event.detail,
                ),
                account_id=r.account_id,
            )
    elif event.kind == "complaint":
        if record_complaint(r, rollup, at=event.at):
            envelope = Envelope.wrap(
                EmailComplained(
                    email_id=r.email_id,
                    message_id=r.message_id,
                    recipient=address,
                    contact_id=r.contact_id,
                    source=event.provider,
                    detail=event.detail,
                ),
                account_id=r.account_id,
            )
    elif event.kind in ("deferred", "dropped") and r.provider_status in (None, "deferred"):
        r.provider_status = event.kind
    await store.save_recipients(conn, recipients=[r])
    if envelope is not None:
        await outbox.write(conn, envelope)
    return True


async def _provider_activity(
    conn: Conn, r: Recipient, event: ProviderEvent, rules: Rules
) -> Activity | None:
    """A provider's open or click as ours, when Herald did not track that itself (else it
    would be counted twice: Herald's own pixel and links are the record)."""
    choices = await store.tracking_choices(conn, email_ids=[r.email_id])
    track_opens, track_clicks = choices.get(r.email_id, (True, True))
    if event.kind == "open":
        if track_opens:
            return None
        reason = "apple_mpp" if event.machine else None
        reason = reason or rules.classifier.open_reason(event.user_agent, event.ip)
        link_index, url = None, None
    else:
        if track_clicks or event.url is None:
            return None
        reason = rules.classifier.click_reason(event.user_agent)
        link_index, url = link_key(event.url), event.url
    return Activity(
        id=uuid.uuid5(_PROVIDER_ACTIVITY, f"{event.provider}:{event.event_id}"),
        kind="open" if event.kind == "open" else "click",
        source=event.provider,
        message_id=r.message_id,
        email_id=r.email_id,
        account_id=r.account_id,
        at=event.at,
        reason=reason,
        user_agent=event.user_agent,
        ip=event.ip,
        link_index=link_index,
        url=url,
    )


async def record_reported_bounce(
    conn: Conn, *, account_id: uuid.UUID | None, data: EmailBounced, at: datetime
) -> None:
    """A bounce another service reported (the dispatcher's SMTP 5xx); counted, not republished."""
    r: Recipient | None = None
    if data.message_id:
        keys = message_keys(normalize_message_id(data.message_id))
        found = await store.lock_recipients(conn, message_ids=keys)
        r = next((found[k] for k in keys if k in found), None)
    if r is None and data.email_id is not None:
        r = await store.find_recipient(
            conn, email_id=data.email_id, recipient=normalize_address(data.recipient)
        )
    if r is None or (account_id is not None and r.account_id != account_id):
        SKIPPED.labels(EmailBounced.TYPE, "unknown_message").inc()
        return
    rollup = Rollup()
    if record_bounce(r, rollup, hard=data.hard, at=at, detail=data.detail):
        await store.save_recipients(conn, recipients=[r])
        await store.queue_deltas(conn, deltas=rollup.deltas)


async def record_unsubscribe(
    conn: Conn, *, account_id: uuid.UUID | None, data: ContactSuppressed, at: datetime
) -> None:
    """Count an unsubscribe that came from an email, once per (email, address)."""
    if data.reason != "unsubscribed" or data.email_id is None or account_id is None:
        return
    await store.ensure_emails(conn, emails=[(data.email_id, account_id)])
    if await store.email_account(conn, email_id=data.email_id) != account_id:
        SKIPPED.labels(ContactSuppressed.TYPE, "account_mismatch").inc()
        return
    address = normalize_address(data.email)
    if not await store.insert_unsubscribe(
        conn, email_id=data.email_id, address=address, account_id=account_id, at=at
    ):
        return
    await store.mark_unsubscribed(conn, email_id=data.email_id, address=address, at=at)
    rollup = Rollup()
    rollup.add("all", data.email_id, account_id, at, unsubscribed=1)
    await store.queue_deltas(conn, deltas=rollup.deltas)
