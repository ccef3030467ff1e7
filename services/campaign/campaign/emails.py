"""What the campaign service does with emails: compose, edit, send, schedule, cancel, preview.

The API and the `email.requests` consumer both come here. Handing an email over for sending is
one transaction: the status change, the quota check (under a per-account lock) and the
`email.scheduled` event in the outbox commit together.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg

from campaign import domain, store
from campaign.clients import AuthClient, ContactsClient, Refused, Unavailable
from campaign.config import Settings
from campaign.metrics import EMAILS_COMPOSED, EMAILS_QUEUED, QUOTA_REFUSALS
from campaign.schemas import ComposeRequest, PatchRequest, Preview, SendRequest
from herald import outbox
from herald.db import Conn
from herald.errors import ApiError, not_found
from herald.events import Envelope
from herald.events.campaign import (
    Audience,
    EmailCancelled,
    EmailContent,
    EmailRetryRequested,
    EmailScheduled,
)
from herald.events.requests import SendRequested
from herald.templates import TemplateProblem, compile_email, render_context

log = logging.getLogger(__name__)

Via = Literal["send", "schedule", "request", "test"]


@dataclass(frozen=True)
class Campaign:
    """What the email operations need: the pool, the contacts and auth services, the settings."""

    pool: asyncpg.Pool
    contacts: ContactsClient
    auth: AuthClient
    settings: Settings


def policy(settings: Settings) -> domain.SenderPolicy:
    return domain.SenderPolicy(
        require_verified=settings.require_verified_sender,
        allowed_domains=settings.sender_domains,
    )


_SENDER_FIELDS = tuple(field.name for field in dataclasses.fields(domain.Sender))


def _sender(row: asyncpg.Record | None) -> domain.Sender | None:
    if row is None:
        return None
    return domain.Sender(**{name: row[name] for name in _SENDER_FIELDS})


def _unavailable(exc: Exception, service: str = "contacts") -> ApiError:
    return ApiError(503, "unavailable", f"the {service} service is unavailable: {exc}")


async def current_sender(app: Campaign, *, account_id: uuid.UUID) -> domain.Sender | None:
    """The account's sender identity, for a decision that may refuse to send (see
    `fresh_sender`)."""
    return await fresh_sender(app.pool, app.auth, settings=app.settings, account_id=account_id)


async def fresh_sender(
    pool: asyncpg.Pool, auth: AuthClient, *, settings: Settings, account_id: uuid.UUID
) -> domain.Sender | None:
    """The account's sender identity, for a decision that may refuse to send.

    Campaign's copy follows auth's `user.changed`, which can arrive after a new user confirmed
    their address and pressed send. So when the copy is missing, or unverified while senders
    must be verified, auth (the owner) is asked and its answer used and kept; a verified copy is
    used as it is, without asking. ApiError 503 when auth cannot be asked and it matters.
    """
    async with pool.acquire() as conn:
        row = await store.get_sender(conn, account_id=account_id)
    local = _sender(row)
    must_verify = settings.require_verified_sender
    if local is not None and (local.email_verified or not must_verify):
        return local
    try:
        user = await auth.user(account_id)
    except Unavailable as exc:
        if not must_verify:
            return local
        # "Verify your address first" may be untrue (the event may just be late): the honest
        # answer is that it cannot be told now.
        raise _unavailable(exc, "auth") from None
    if user is None:
        return local
    fresh = domain.Sender(
        email=user.email,
        email_verified=user.email_verified,
        default_sender_name=user.default_sender_name,
        reply_to=user.reply_to,
        timezone=user.timezone,
        status=user.status,
        daily_send_quota=user.daily_send_quota,
    )
    if fresh != local:
        async with pool.acquire() as conn:
            # Kept only if no `user.changed` was written meanwhile: that event may be newer.
            kept = await store.put_sender_unless_changed(
                conn,
                account_id=account_id,
                seen_at=row["updated_at"] if row is not None else None,
                **dataclasses.asdict(fresh),
            )
        log.info(
            "sender of account %s taken from auth (campaign had %s): verified=%s, kept=%s",
            account_id,
            "it unverified" if local is not None else "none",
            fresh.email_verified,
            kept,
        )
    return fresh


async def _check_audience(
    app: Campaign,
    *,
    account_id: uuid.UUID,
    list_ids: list[uuid.UUID] | None,
    contact_ids: list[uuid.UUID] | None,
) -> None:
    """404 naming the field when a list or contact given is not the account's."""
    try:
        lists, contacts = await app.contacts.unknown(
            account_id=account_id, list_ids=list_ids or [], contact_ids=contact_ids or []
        )
    except Unavailable as exc:
        raise _unavailable(exc) from None
    for field, unknown, what in (("list_ids", lists, "list"), ("contact_ids", contacts, "contact")):
        if unknown:
            raise ApiError(404, "not_found", f"{what} {unknown[0]} not found", field=field)


async def compose(
    app: Campaign, *, account_id: uuid.UUID, request: ComposeRequest
) -> asyncpg.Record:
    """Validate and store a new draft."""
    content = domain.prepare_content(request.subject, request.html, request.text)
    to = domain.addresses(request.to, "to")
    await _check_audience(
        app, account_id=account_id, list_ids=request.list_ids, contact_ids=request.contact_ids
    )
    from_email = None
    if request.from_email is not None:
        sender = await current_sender(app, account_id=account_id)
        from_email = domain.check_from(request.from_email, sender, policy(app.settings))
    async with app.pool.acquire() as conn:
        row = await store.insert_email(
            conn,
            email_id=uuid.uuid4(),
            account_id=account_id,
            kind="campaign",
            subject=content.subject,
            html=content.html,
            text=content.text,
            text_derived=content.text_derived,
            from_name=request.from_name,
            from_email=from_email,
            reply_to=request.reply_to,
            list_ids=request.list_ids,
            contact_ids=request.contact_ids,
            to=to,
            tags=request.tags,
            template_vars=request.template_vars,
        )
    assert row is not None  # no idempotency key, so no conflict
    EMAILS_COMPOSED.inc()
    return row


async def get(app: Campaign, *, account_id: uuid.UUID, email_id: uuid.UUID) -> asyncpg.Record:
    """One of the account's emails, or 404."""
    async with app.pool.acquire() as conn:
        row = await store.get_email(conn, account_id=account_id, email_id=email_id)
    if row is None:
        raise not_found("email")
    return row


async def list_page(
    app: Campaign, *, account_id: uuid.UUID, status: str | None, limit: int, cursor: str | None
) -> tuple[list[asyncpg.Record], str | None]:
    """A page of the account's emails, newest first, and the cursor of the next page."""
    before = domain.decode_cursor(cursor) if cursor else None
    async with app.pool.acquire() as conn:
        rows = await store.list_emails(
            conn, account_id=account_id, status=status, limit=limit + 1, before=before
        )
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = domain.encode_cursor(rows[-1]["created_at"], rows[-1]["id"])
    return rows, next_cursor


async def update(
    app: Campaign, *, account_id: uuid.UUID, email_id: uuid.UUID, request: PatchRequest
) -> asyncpg.Record:
    """Change a draft (409 once it was handed over)."""
    given = request.model_fields_set
    for required in ("subject", "list_ids", "contact_ids", "to", "tags", "template_vars"):
        if required in given and getattr(request, required) is None:
            raise domain.invalid(required, "may not be null")
    await _check_audience(
        app, account_id=account_id, list_ids=request.list_ids, contact_ids=request.contact_ids
    )
    checks_from = "from_email" in given and request.from_email is not None
    # Asked before the transaction: it may call auth, which must not hold the email's lock.
    sender = await current_sender(app, account_id=account_id) if checks_from else None
    async with app.pool.acquire() as conn, conn.transaction():
        row = await store.get_email(conn, account_id=account_id, email_id=email_id, lock=True)
        if row is None:
            raise not_found("email")
        if row["status"] not in domain.EDITABLE:
            raise domain.conflict(f"only drafts can be changed; this email is {row['status']}")
        merged: dict[str, Any] = {
            "subject": row["subject"],
            "html": row["html"],
            "text": None if row["text_derived"] else row["text"],
            "from_name": row["from_name"],
            "from_email": row["from_email"],
            "reply_to": row["reply_to"],
            "list_ids": row["list_ids"],
            "contact_ids": row["contact_ids"],
            "to": row["to_addresses"],
            "tags": row["tags"],
            "template_vars": row["template_vars"],
        }
        merged.update({name: getattr(request, name) for name in given})
        content = domain.prepare_content(merged["subject"], merged["html"], merged["text"])
        if checks_from:
            merged["from_email"] = domain.check_from(
                merged["from_email"], sender, policy(app.settings)
            )
        return await store.update_draft(
            conn,
            email_id=email_id,
            subject=content.subject,
            html=content.html,
            text=content.text,
            text_derived=content.text_derived,
            from_name=merged["from_name"],
            from_email=merged["from_email"],
            reply_to=merged["reply_to"],
            list_ids=merged["list_ids"],
            contact_ids=merged["contact_ids"],
            to=domain.addresses(merged["to"], "to"),
            tags=merged["tags"],
            template_vars=merged["template_vars"],
        )


async def delete(app: Campaign, *, account_id: uuid.UUID, email_id: uuid.UUID) -> None:
    """Delete a draft (409 once it was handed over)."""
    async with app.pool.acquire() as conn:
        if await store.delete_draft(conn, account_id=account_id, email_id=email_id):
            return
        row = await store.get_email(conn, account_id=account_id, email_id=email_id)
    if row is None:
        raise not_found("email")
    raise domain.conflict(f"only drafts can be deleted; this email is {row['status']}")


async def _audience_size(
    app: Campaign, *, account_id: uuid.UUID, email: asyncpg.Record, sender: domain.Sender | None
) -> int:
    """Recipients the email would go to now, counted only as far as a quota needs."""
    to = email["to_addresses"]
    if sender is None or sender.daily_send_quota is None or email["kind"] == "system":
        return len(to)
    try:
        counted = await app.contacts.count(
            account_id=account_id,
            list_ids=email["list_ids"],
            contact_ids=email["contact_ids"],
            exclude={a.lower() for a in to},
            stop_after=sender.daily_send_quota,
        )
    except (Unavailable, Refused) as exc:
        raise _unavailable(exc) from None
    return len(to) + counted


async def queue(
    conn: Conn,
    *,
    settings: Settings,
    email: asyncpg.Record,
    send_at: datetime | None,
    audience_size: int,
    via: Via,
    sender: domain.Sender | None,
) -> asyncpg.Record:
    """Hand a locked email over: now (`queued`) or at `send_at` (`scheduled`), under the
    account's `sender` identity (see `current_sender`)."""
    if email["status"] not in domain.SENDABLE:
        raise domain.conflict(f"this email is {email['status']}: it cannot be sent again")
    account_id: uuid.UUID = email["account_id"]
    kind: str = email["kind"]
    if not (email["list_ids"] or email["contact_ids"] or email["to_addresses"]):
        raise domain.invalid("to", "the email has no recipients: give list_ids, contact_ids or to")
    if kind == "system":
        identity = domain.Identity(
            from_email=email["from_email"] or settings.system_from_email,
            from_name=email["from_name"],
            reply_to=email["reply_to"],
        )
    else:
        identity = domain.resolve_identity(
            from_email=email["from_email"],
            from_name=email["from_name"],
            reply_to=email["reply_to"],
            sender=sender,
            policy=policy(settings),
        )
    now = datetime.now(UTC)
    when = send_at or now
    timezone = sender.timezone if sender else None
    day = domain.quota_day(when, timezone)
    quota = sender.daily_send_quota if sender is not None and kind != "system" else None
    if quota is not None:
        await store.lock_account_quota(conn, account_id=account_id)
        # A rescheduled email gives back what it had reserved before it is counted again.
        used = await store.quota_used(conn, account_id=account_id, day=day)
        if email["quota_day"] == day and email["status"] == "scheduled":
            used -= email["reserved"]
        try:
            domain.check_quota(quota=quota, used=used, needed=audience_size)
        except ApiError:
            QUOTA_REFUSALS.inc()
            raise
    row = await store.mark_queued(
        conn,
        email_id=email["id"],
        status="scheduled" if send_at is not None else "queued",
        send_at=when,
        from_email=identity.from_email,
        from_name=identity.from_name,
        reply_to=identity.reply_to,
        day=day,
        reserved=audience_size,
    )
    scheduled = EmailScheduled(
        email_id=row["id"],
        revision=row["revision"],
        send_at=when,
        kind="transactional" if kind == "test" else kind,
        content=EmailContent(
            subject=row["subject"],
            html=row["html"],
            text=row["text"],
            from_name=row["from_name"],
            from_email=row["from_email"],
            reply_to=row["reply_to"],
            track_opens=kind != "system",
            track_clicks=kind != "system",
            tags=row["tags"],
        ),
        audience=Audience(
            list_ids=row["list_ids"], contact_ids=row["contact_ids"], to=row["to_addresses"]
        ),
        template_vars=row["template_vars"],
    )
    await outbox.write(conn, Envelope.wrap(scheduled, account_id=account_id))
    EMAILS_QUEUED.labels(kind, via).inc()
    return row


async def _hand_over(
    app: Campaign,
    *,
    account_id: uuid.UUID,
    email_id: uuid.UUID,
    send_at: datetime | None,
    via: Via,
    sender: domain.Sender | None,
) -> asyncpg.Record:
    email = await get(app, account_id=account_id, email_id=email_id)
    if email["status"] not in domain.SENDABLE:
        raise domain.conflict(f"this email is {email['status']}: it cannot be sent again")
    size = await _audience_size(app, account_id=account_id, email=email, sender=sender)
    async with app.pool.acquire() as conn, conn.transaction():
        locked = await store.get_email(conn, account_id=account_id, email_id=email_id, lock=True)
        if locked is None:
            raise not_found("email")
        return await queue(
            conn,
            settings=app.settings,
            email=locked,
            send_at=send_at,
            audience_size=size,
            via=via,
            sender=sender,
        )


async def send(app: Campaign, *, account_id: uuid.UUID, email_id: uuid.UUID) -> asyncpg.Record:
    """Send a draft (or a scheduled email) now."""
    sender = await current_sender(app, account_id=account_id)
    return await _hand_over(
        app, account_id=account_id, email_id=email_id, send_at=None, via="send", sender=sender
    )


async def send_inline(
    app: Campaign, *, account_id: uuid.UUID, request: SendRequest
) -> asyncpg.Record:
    """Create and send a transactional email in one step; a repeated idempotency key sends
    nothing more and answers with the email it created first."""
    assert request.to is not None
    assert request.subject is not None
    content = domain.prepare_content(request.subject, request.html, request.text)
    to = domain.addresses(request.to, "to")
    sender = await current_sender(app, account_id=account_id)
    async with app.pool.acquire() as conn, conn.transaction():
        if request.idempotency_key is not None:
            earlier = await store.email_by_idempotency_key(
                conn, account_id=account_id, idempotency_key=request.idempotency_key
            )
            if earlier is not None:
                return earlier
        email = await store.insert_email(
            conn,
            email_id=uuid.uuid4(),
            account_id=account_id,
            kind="transactional",
            subject=content.subject,
            html=content.html,
            text=content.text,
            text_derived=content.text_derived,
            from_name=request.from_name,
            from_email=request.from_email,
            reply_to=request.reply_to,
            list_ids=[],
            contact_ids=[],
            to=to,
            tags=request.tags,
            template_vars=request.template_vars,
            idempotency_key=request.idempotency_key,
        )
        if email is None:
            # A concurrent request with the same key committed first (the insert waited for it).
            earlier = await store.email_by_idempotency_key(
                conn, account_id=account_id, idempotency_key=request.idempotency_key or ""
            )
            if earlier is None:
                raise domain.conflict("a request with this idempotency_key is being processed")
            return earlier
        return await queue(
            conn,
            settings=app.settings,
            email=email,
            send_at=None,
            audience_size=len(to),
            via="send",
            sender=sender,
        )


async def schedule(
    app: Campaign, *, account_id: uuid.UUID, email_id: uuid.UUID, send_at: datetime
) -> asyncpg.Record:
    """Send the email at `send_at`; an email already scheduled is moved."""
    await get(app, account_id=account_id, email_id=email_id)
    sender = await current_sender(app, account_id=account_id)
    when = domain.resolve_send_at(
        send_at, timezone=sender.timezone if sender else None, now=datetime.now(UTC)
    )
    return await _hand_over(
        app, account_id=account_id, email_id=email_id, send_at=when, via="schedule", sender=sender
    )


async def cancel(app: Campaign, *, account_id: uuid.UUID, email_id: uuid.UUID) -> asyncpg.Record:
    """Take back a scheduled (or not yet started) email."""
    async with app.pool.acquire() as conn, conn.transaction():
        email = await store.get_email(conn, account_id=account_id, email_id=email_id, lock=True)
        if email is None:
            raise not_found("email")
        if email["status"] not in domain.CANCELLABLE:
            raise domain.conflict(f"this email is {email['status']}: it can no longer be cancelled")
        row = await store.mark_cancelled(conn, email_id=email_id)
        cancelled = EmailCancelled(email_id=email_id, revision=row["revision"])
        await outbox.write(conn, Envelope.wrap(cancelled, account_id=account_id))
        return row


def _check_retry(email: asyncpg.Record) -> None:
    domain.check_retry(
        status=email["status"],
        failed=email["failed_count"],
        sent_at=email["send_at"],
        now=datetime.now(UTC),
    )


async def retry_failed(
    app: Campaign, *, account_id: uuid.UUID, email_id: uuid.UUID
) -> asyncpg.Record:
    """Ask the dispatcher to try again a finished email's recipients whose failure a retry
    may cure (409 if there are none)."""
    email = await get(app, account_id=account_id, email_id=email_id)
    _check_retry(email)
    suppressed: set[str] = set()
    if email["kind"] != "system":
        # Someone may have unsubscribed (or bounced elsewhere) since: as at the first send,
        # the suppression list decides, so they keep their failure.
        async with app.pool.acquire() as conn:
            failed = await store.retryable_failures(conn, email_id=email_id)
        try:
            suppressed = await app.contacts.suppressed(account_id=account_id, emails=failed)
        except Unavailable as exc:
            raise _unavailable(exc) from None
    async with app.pool.acquire() as conn, conn.transaction():
        locked = await store.get_email(conn, account_id=account_id, email_id=email_id, lock=True)
        if locked is None:
            raise not_found("email")
        _check_retry(locked)
        row = await store.forget_failed(conn, email_id=email_id, besides=sorted(suppressed))
        if row["forgotten"] == 0:
            raise domain.conflict(
                "no recipient of this email failed for a reason a retry may cure (refused for "
                "good, unsendable or suppressed since): there is nothing to retry"
            )
        retry = EmailRetryRequested(
            email_id=email_id, failed=row["forgotten"], suppressed=sorted(suppressed)
        )
        await outbox.write(conn, Envelope.wrap(retry, account_id=account_id))
        return row


async def preview(
    app: Campaign, *, account_id: uuid.UUID, email_id: uuid.UUID, contact_id: uuid.UUID | None
) -> Preview:
    """The email rendered for one contact of the account (or a sample recipient)."""
    email = await get(app, account_id=account_id, email_id=email_id)
    if contact_id is not None:
        try:
            contact = await app.contacts.contact(account_id=account_id, contact_id=contact_id)
        except (Unavailable, Refused) as exc:
            raise _unavailable(exc) from None
        if contact is None:
            raise ApiError(
                404, "not_found", "contact not found (or not active)", field="contact_id"
            )
        address, first, last, attributes = (
            contact.email,
            contact.first_name,
            contact.last_name,
            contact.attributes,
        )
    else:
        async with app.pool.acquire() as conn:
            sender = await store.get_sender(conn, account_id=account_id)
        if email["to_addresses"]:
            address = email["to_addresses"][0]
        else:
            address = sender["email"] if sender else "recipient@example.com"
        first, last, attributes = None, None, {}
    context = render_context(
        email=address,
        first_name=first,
        last_name=last,
        attributes=attributes,
        # Not the contact's real signed link: whoever clicks it in a preview would unsubscribe
        # them. This one leads to the unsubscribe page's "not a valid link".
        unsubscribe_url=f"{app.settings.public_base_url.rstrip('/')}/unsubscribe/preview",
        template_vars=email["template_vars"],
    )
    try:
        subject, html, text = compile_email(email["subject"], email["html"], email["text"]).render(
            context
        )
    except TemplateProblem as problem:
        raise ApiError(
            422,
            "template_error",
            f"the template cannot be rendered: {problem}",
            field=problem.part,
        ) from None
    return Preview(subject=subject, html=html, text=text, to=address)


async def send_test(
    app: Campaign, *, account_id: uuid.UUID, email_id: uuid.UUID, to: str
) -> asyncpg.Record:
    """Send one copy of the email to `to`, marked as a test; the email itself is unchanged."""
    address = domain.address(to, "to")
    sender = await current_sender(app, account_id=account_id)
    async with app.pool.acquire() as conn, conn.transaction():
        email = await store.get_email(conn, account_id=account_id, email_id=email_id)
        if email is None:
            raise not_found("email")
        copy = await store.insert_email(
            conn,
            email_id=uuid.uuid4(),
            account_id=account_id,
            kind="test",
            subject=f"[Test] {email['subject']}",
            html=email["html"],
            text=email["text"],
            text_derived=email["text_derived"],
            from_name=email["from_name"],
            from_email=email["from_email"],
            reply_to=email["reply_to"],
            list_ids=[],
            contact_ids=[],
            to=[address],
            tags=email["tags"],
            template_vars=email["template_vars"],
            test_of=email_id,
        )
        assert copy is not None
        return await queue(
            conn,
            settings=app.settings,
            email=copy,
            send_at=None,
            audience_size=1,
            via="test",
            sender=sender,
        )


async def accept_request(
    conn: Conn, *, settings: Settings, account_id: uuid.UUID, request: SendRequested
) -> asyncpg.Record | None:
    """Turn a send request into a queued (or scheduled) email; None if its idempotency key was
    seen before. Raises ApiError saying what is wrong with it."""
    earlier = await store.email_by_idempotency_key(
        conn, account_id=account_id, idempotency_key=request.idempotency_key
    )
    if earlier is not None:
        return None
    content = domain.prepare_content(request.subject, request.html, request.text)
    strict = not request.system
    to = domain.addresses(request.to, "to", strict=strict)
    from_email, reply_to = (
        domain.address(value, name, strict=strict) if value else None
        for name, value in (("from_email", request.from_email), ("reply_to", request.reply_to))
    )
    # Campaign's own copy only: this runs in the consumer's transaction, where waiting on auth
    # would hold it open (the requests consumer brought the copy up to date before).
    sender = _sender(await store.get_sender(conn, account_id=account_id))
    send_at = None
    if request.send_at is not None:
        aware = request.send_at
        if aware.tzinfo is None:
            aware = aware.replace(tzinfo=domain.zone(sender.timezone if sender else None))
        # A request that waited in the topic past its time is sent at once, not refused.
        send_at = aware if aware > datetime.now(UTC) else None
    email = await store.insert_email(
        conn,
        email_id=uuid.uuid4(),
        account_id=account_id,
        kind="system" if request.system else "transactional",
        subject=content.subject,
        html=content.html,
        text=content.text,
        text_derived=content.text_derived,
        from_name=request.from_name,
        from_email=from_email,
        reply_to=reply_to,
        list_ids=[],
        contact_ids=[],
        to=to,
        tags=request.tags,
        template_vars=request.template_vars,
        idempotency_key=request.idempotency_key,
    )
    if email is None:
        return None
    return await queue(
        conn,
        settings=settings,
        email=email,
        send_at=send_at,
        audience_size=len(to),
        via="request",
        sender=sender,
    )
