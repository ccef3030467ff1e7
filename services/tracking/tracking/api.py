"""HTTP routes of the tracking service (the pixel and click links are answered in hotpath)."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from herald.errors import ERROR_RESPONSES, ApiError
from herald.security import Principal, full_access
from tracking import reports
from tracking.domain import PeriodError
from tracking.metrics import WEBHOOK_REJECTED
from tracking.schemas import ReportOut, TrackingOut
from tracking.signatures import WebhookRejected
from tracking.webhooks import Webhooks

router = APIRouter(responses=ERROR_RESPONSES)

FullCaller = Annotated[Principal, Depends(full_access)]


def _webhooks(request: Request) -> Webhooks:
    hooks = request.app.state.runtime.extras["webhooks"]
    assert isinstance(hooks, Webhooks)
    return hooks


def _not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


async def _body(request: Request) -> bytes:
    limit: int = request.app.state.runtime.settings.webhook_max_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "payload_too_large", f"at most {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large", f"at most {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _rejected(exc: WebhookRejected, provider: str) -> ApiError:
    WEBHOOK_REJECTED.labels(provider, exc.reason).inc()
    return ApiError(exc.status, exc.reason, exc.message)


@router.post("/webhooks/ses", tags=["webhooks"])
async def ses_webhook(request: Request) -> dict[str, Any]:
    """Amazon SES notifications through an SNS HTTPS subscription.

    Confirms the subscription (SubscriptionConfirmation), then records Delivery, Bounce
    (Permanent: hard), Complaint, DeliveryDelay and Reject notifications of our messages. Every
    message's SNS signature is verified against the signing certificate from SNS. Hard bounces
    and complaints are published for the contacts service to suppress the address.
    """
    body = await _body(request)
    try:
        return await _webhooks(request).ses(body)
    except WebhookRejected as exc:
        raise _rejected(exc, "ses") from None


@router.post("/webhooks/sendgrid", tags=["webhooks"])
async def sendgrid_webhook(request: Request) -> dict[str, Any]:
    """SendGrid's Event Webhook (a JSON array of events).

    Records delivered, deferred, bounce, dropped and spamreport events of our messages; opens and
    clicks count only for emails Herald did not track itself. With `SENDGRID_PUBLIC_KEY` set,
    the ECDSA signature (`X-Twilio-Email-Event-Webhook-Signature` over the `-Timestamp` header
    and the body) must verify; without it, production (`HERALD_ENV=production`) refuses every
    post (403), since unsigned events would let anyone suppress contacts.
    """
    body = await _body(request)
    try:
        return await _webhooks(request).sendgrid(
            body,
            signature=request.headers.get("x-twilio-email-event-webhook-signature"),
            timestamp=request.headers.get("x-twilio-email-event-webhook-timestamp"),
        )
    except WebhookRejected as exc:
        raise _rejected(exc, "sendgrid") from None


@router.get("/tracking/{email_id}", response_model=TrackingOut, tags=["reports"])
async def email_tracking(
    email_id: uuid.UUID,
    request: Request,
    caller: FullCaller,
    limit: Annotated[int, Query(ge=1, le=500, description="recipients per page")] = 50,
    cursor: Annotated[str | None, Query(max_length=2000)] = None,
) -> Any:
    """An email's delivery and engagement: status counts (queued, sent, delivered, deferred,
    failed, bounced, complained), opens and clicks with unique and human figures, unsubscribes,
    clicks per link, and its recipients (paged, in address order) with each one's status and
    first open and click."""
    try:
        async with request.app.state.runtime.db.acquire() as conn:
            return await reports.email_tracking(
                conn, account_id=caller.account_id, email_id=email_id, cursor=cursor, limit=limit
            )
    except reports.NotFound:
        raise _not_found("email") from None
    except ValueError:
        raise ApiError(422, "validation_error", "not a valid cursor", field="cursor") from None


def _moment(value: str | None, name: str) -> date | datetime | None:
    if value is None:
        return None
    try:
        if len(value) == 10:
            return date.fromisoformat(value)
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(
            422,
            "validation_error",
            "a date (2026-03-01) or a date-time (2026-03-01T09:00:00+01:00)",
            field=name,
        ) from None


@router.get(
    "/reports",
    response_model=ReportOut,
    tags=["reports"],
    responses={200: {"content": {"text/csv": {}}}},
)
async def account_report(
    request: Request,
    caller: FullCaller,
    from_: Annotated[
        str | None,
        Query(alias="from", max_length=40, description="a date (local day) or date-time"),
    ] = None,
    to: Annotated[
        str | None, Query(max_length=40, description="a date (included) or date-time")
    ] = None,
    email_id: uuid.UUID | None = None,
    tag: Annotated[str | None, Query(min_length=1, max_length=100)] = None,
    interval: Literal["hour", "day"] | None = None,
    format: Literal["json", "csv"] = "json",
    table: Annotated[
        Literal["emails", "series", "links"], Query(description="which table `format=csv` exports")
    ] = "emails",
    limit: Annotated[int, Query(ge=1, le=1000, description="rows of the per-email table")] = 200,
    links: Annotated[int, Query(ge=1, le=100, description="how many top links")] = 10,
) -> Any:
    """The account's figures for a period (default: the last 30 days), in its timezone.

    Totals and rates (delivery, open, click, click-to-open, bounce, complaint; human and total
    side by side), a time series in hour or day buckets, a per-email table and the top links;
    `email_id` and `tag` narrow it. `format=csv` exports one table (`table`). Read from
    pre-aggregated roll-ups: as fast for a million events as for a thousand.
    """
    query = reports.ReportQuery(
        account_id=caller.account_id,
        start=_moment(from_, "from"),
        end=_moment(to, "to"),
        interval=interval,
        email_id=email_id,
        tag=tag,
        limit=limit,
        links=links,
    )
    try:
        body = await reports.report(request.app.state.runtime.db, query, now=datetime.now(UTC))
    except reports.NotFound:
        raise _not_found("email") from None
    except PeriodError as exc:
        raise ApiError(422, "validation_error", str(exc), field=exc.field) from None
    if format == "csv":
        return Response(
            reports.to_csv(body, table),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="herald-{table}.csv"'},
        )
    # Built from typed rows already: serialised as `ReportOut` describes it, not validated again.
    return Response(reports.to_json(body), media_type="application/json")
