"""HTTP routes of the campaign service: compose, list, edit, preview, test, send, schedule."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from typing import Annotated, Literal

import asyncpg
from fastapi import APIRouter, Body, Depends, Query, Request, Response

from campaign import emails, operators
from campaign.emails import Campaign
from campaign.schemas import (
    Accepted,
    ComposeRequest,
    CopyAccepted,
    CopyRequest,
    Counts,
    EmailOut,
    EmailPage,
    PatchRequest,
    Preview,
    PreviewRequest,
    ScheduleRequest,
    SendRequest,
    Usage,
)
from herald.errors import ERROR_RESPONSES
from herald.security import Principal, current_principal, full_access, internal_caller

router = APIRouter(tags=["emails"], responses=ERROR_RESPONSES)

StatusFilter = Literal["draft", "scheduled", "queued", "sending", "sent", "cancelled", "failed"]


def _campaign(request: Request) -> Campaign:
    app = request.app.state.runtime.extras["campaign"]
    assert isinstance(app, Campaign)
    return app


def _out(row: asyncpg.Record) -> EmailOut:
    return EmailOut(
        id=row["id"],
        kind=row["kind"],
        status=row["status"],
        subject=row["subject"],
        html=row["html"],
        text=row["text"],
        from_name=row["from_name"],
        from_email=row["from_email"],
        reply_to=row["reply_to"],
        list_ids=row["list_ids"],
        contact_ids=row["contact_ids"],
        to=row["to_addresses"],
        tags=row["tags"],
        template_vars=row["template_vars"],
        send_at=row["send_at"],
        counts=Counts(queued=row["recipients"], sent=row["sent_count"], failed=row["failed_count"]),
        failure_reason=row["failure_reason"],
        test_of=row["test_of"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        completed_at=row["completed_at"],
    )


@router.post("/compose", status_code=201)
async def compose(
    body: ComposeRequest,
    request: Request,
    principal: Principal = Depends(full_access),
) -> EmailOut:
    """Create a draft. Subject, HTML and text are Jinja templates (`{{ contact.first_name }}`,
    `{{ contact.attributes.plan }}`, `{{ unsubscribe_url }}`); one that does not parse is a 422
    naming the line. Without `text`, a plain-text part is derived from the HTML."""
    row = await emails.compose(_campaign(request), account_id=principal.account_id, request=body)
    return _out(row)


@router.get("/emails")
async def list_emails(
    request: Request,
    status: StatusFilter | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    principal: Principal = Depends(full_access),
) -> EmailPage:
    """The account's emails, newest first; pass `next_cursor` back as `cursor` for more."""
    rows, next_cursor = await emails.list_page(
        _campaign(request),
        account_id=principal.account_id,
        status=status,
        limit=limit,
        cursor=cursor,
    )
    return EmailPage(items=[_out(r) for r in rows], next_cursor=next_cursor)


@router.get("/emails/{email_id}")
async def get_email(
    email_id: uuid.UUID, request: Request, principal: Principal = Depends(full_access)
) -> EmailOut:
    """One email with its status and delivery counts."""
    row = await emails.get(_campaign(request), account_id=principal.account_id, email_id=email_id)
    return _out(row)


@router.patch("/emails/{email_id}")
async def patch_email(
    email_id: uuid.UUID,
    body: PatchRequest,
    request: Request,
    principal: Principal = Depends(full_access),
) -> EmailOut:
    """Change a draft (409 once it is scheduled or sent)."""
    row = await emails.update(
        _campaign(request), account_id=principal.account_id, email_id=email_id, request=body
    )
    return _out(row)


@router.delete("/emails/{email_id}", status_code=204)
async def delete_email(
    email_id: uuid.UUID, request: Request, principal: Principal = Depends(full_access)
) -> Response:
    """Delete a draft (409 once it is scheduled or sent)."""
    await emails.delete(_campaign(request), account_id=principal.account_id, email_id=email_id)
    return Response(status_code=204)


@router.post("/emails/{email_id}/preview")
async def preview_email(
    email_id: uuid.UUID,
    request: Request,
    body: Annotated[PreviewRequest | None, Body()] = None,
    principal: Principal = Depends(full_access),
) -> Preview:
    """The subject, HTML and text as `contact_id` would receive them (or a sample recipient)."""
    return await emails.preview(
        _campaign(request),
        account_id=principal.account_id,
        email_id=email_id,
        contact_id=body.contact_id if body else None,
    )


@router.post("/emails/{email_id}/test", status_code=202)
async def send_test(
    email_id: uuid.UUID,
    body: CopyRequest,
    request: Request,
    principal: Principal = Depends(full_access),
) -> CopyAccepted:
    """Send one test copy to `to` (subject marked `[Test]`); the email itself is unchanged."""
    row = await emails.send_test(
        _campaign(request), account_id=principal.account_id, email_id=email_id, to=body.to
    )
    return CopyAccepted(id=row["id"], status="queued", to=row["to_addresses"][0], test_of=email_id)


@router.post("/emails/{email_id}/cancel")
async def cancel_email(
    email_id: uuid.UUID, request: Request, principal: Principal = Depends(full_access)
) -> EmailOut:
    """Cancel a scheduled email before it goes (409 once it is sending)."""
    row = await emails.cancel(
        _campaign(request), account_id=principal.account_id, email_id=email_id
    )
    return _out(row)


@router.post("/emails/{email_id}/retry-failed", status_code=202)
async def retry_failed(
    email_id: uuid.UUID, request: Request, principal: Principal = Depends(full_access)
) -> EmailOut:
    """Send a finished email again to the recipients that failed because of a temporary
    problem (deferred past the retry horizon, unreachable relay); those refused for good (5xx,
    hard bounces), unsendable or suppressed since keep their failure. Nobody already sent gets a
    second copy. The email is `sending` again, its `failed` count less those retried, until each
    of them has an outcome again. 409 while it is under way, when no failure is one a retry may
    cure, or more than 7 days after it went out."""
    row = await emails.retry_failed(
        _campaign(request), account_id=principal.account_id, email_id=email_id
    )
    return _out(row)


@router.post("/send", status_code=202, response_model_exclude_none=True)
async def send(
    body: SendRequest, request: Request, principal: Principal = Depends(current_principal)
) -> Accepted:
    """Send now: a composed email (`email_id`), or inline content to `to` (`subject`, `html`
    and/or `text`), where the same `idempotency_key` twice creates one email. Send-scoped API
    keys may call this."""
    app = _campaign(request)
    if body.email_id is not None:
        row = await emails.send(app, account_id=principal.account_id, email_id=body.email_id)
    else:
        row = await emails.send_inline(app, account_id=principal.account_id, request=body)
    return Accepted(id=row["id"], status=row["status"])


@router.post("/schedule", status_code=202)
async def schedule(
    body: ScheduleRequest, request: Request, principal: Principal = Depends(full_access)
) -> Accepted:
    """Send an email at `send_at` (ISO 8601 with a zone, or in the profile's timezone); it must
    be in the future. Scheduling a scheduled email again moves it."""
    row = await emails.schedule(
        _campaign(request),
        account_id=principal.account_id,
        email_id=body.email_id,
        send_at=body.send_at,
    )
    return Accepted(id=row["id"], status="scheduled", send_at=row["send_at"])


@router.get("/internal/usage", include_in_schema=False, dependencies=[Depends(internal_caller)])
async def usage(
    request: Request,
    start: Annotated[date, Query(alias="from")],
    end: Annotated[date, Query(alias="to")],
) -> Usage:
    """Recipients per account per quota day (`from`..`to`), and quota use today (internal)."""
    return await operators.usage(
        request.app.state.runtime.db, start=start, end=end, now=datetime.now(UTC)
    )
