"""Pure rules of the campaign service: content, senders, time, quota, status and counts."""

from __future__ import annotations

import base64
import re
import uuid
import zoneinfo
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Literal

from email_validator import EmailNotValidError, validate_email

from herald.errors import ApiError
from herald.templates import TemplateProblem, compile_email, html_to_text

Status = Literal["draft", "scheduled", "queued", "sending", "sent", "cancelled", "failed"]
Kind = Literal["campaign", "transactional", "system", "test"]

EDITABLE: frozenset[str] = frozenset({"draft"})
SENDABLE: frozenset[str] = frozenset({"draft", "scheduled"})
CANCELLABLE: frozenset[str] = frozenset({"scheduled", "queued"})
UNDER_WAY: frozenset[str] = frozenset({"scheduled", "queued", "sending"})
FINISHED: frozenset[str] = frozenset({"sent", "failed"})
# How long after it went out an email's failed recipients can be retried: the dispatcher keeps
# its delivery records at least 8 days (DISPATCHER_RETENTION_DAYS), and a retry needs them.
RETRY_WINDOW = timedelta(days=7)


def invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "validation_error", f"{field}: {message}", field=field)


def conflict(message: str) -> ApiError:
    return ApiError(409, "conflict", message)


_PLAIN_ADDRESS = re.compile(r"[^@\s<>,;\"]+@[^@\s<>,;\"]+")


def address(value: str, field: str, *, strict: bool = True) -> str:
    """A syntactically valid email address, normalised (domain lower-cased), or 422.

    `strict=False` (Herald's own system mail) accepts any plain `local@domain`, including the
    reserved domains (`.example`, `.localhost`) development set-ups give their administrators.
    """
    if not strict:
        if not _PLAIN_ADDRESS.fullmatch(value.strip()):
            raise invalid(field, f"{value!r} is not a valid email address")
        return value.strip()
    try:
        return validate_email(value.strip(), check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise invalid(field, f"{value!r} is not a valid email address: {exc}") from None


def addresses(values: Iterable[str], field: str, *, strict: bool = True) -> list[str]:
    """Valid addresses without repeats (case-insensitive), in the order given."""
    seen: set[str] = set()
    result = []
    for value in values:
        normalised = address(value, field, strict=strict)
        if normalised.lower() not in seen:
            seen.add(normalised.lower())
            result.append(normalised)
    return result


@dataclass(frozen=True)
class Content:
    """An email's templates as stored: the text part derived from the HTML when not given."""

    subject: str
    html: str | None
    text: str | None
    text_derived: bool


def prepare_content(subject: str, html: str | None, text: str | None) -> Content:
    """Check that the templates parse (422 naming part and line) and fill in the text part."""
    if html is None and text is None:
        raise invalid("html", "give html or text (or both)")
    derived = text is None
    if derived:
        assert html is not None
        text = html_to_text(html)
    try:
        compile_email(subject, html, text)
    except TemplateProblem as problem:
        part = "html" if problem.part == "text" and derived else problem.part
        raise invalid(part, f"template does not parse: {problem}") from None
    return Content(subject=subject, html=html, text=text, text_derived=derived)


@dataclass(frozen=True)
class Sender:
    """The account's identity as auth last published it."""

    email: str
    email_verified: bool
    default_sender_name: str | None
    reply_to: str | None
    timezone: str
    status: str
    daily_send_quota: int | None


@dataclass(frozen=True)
class SenderPolicy:
    require_verified: bool
    allowed_domains: frozenset[str]


def check_from(from_email: str, sender: Sender | None, policy: SenderPolicy) -> str:
    """`from_email` if the account may send as it, else 422 on `from_email`."""
    normalised = address(from_email, "from_email")
    if not policy.require_verified:
        return normalised
    if normalised.rsplit("@", 1)[1].lower() in policy.allowed_domains:
        return normalised
    if sender is not None and sender.email_verified and sender.email.lower() == normalised.lower():
        return normalised
    raise invalid(
        "from_email",
        f"{normalised} is not a sender this account may use: use the account's verified address",
    )


@dataclass(frozen=True)
class Identity:
    from_email: str
    from_name: str | None
    reply_to: str | None


def resolve_identity(
    *,
    from_email: str | None,
    from_name: str | None,
    reply_to: str | None,
    sender: Sender | None,
    policy: SenderPolicy,
) -> Identity:
    """From and Reply-To for sending: what the email says, else the account's defaults."""
    if sender is not None and sender.status != "active":
        raise ApiError(403, "account_disabled", "this account may not send email")
    if from_email is None:
        if sender is None or (policy.require_verified and not sender.email_verified):
            raise invalid(
                "from_email", "no verified sender address: verify the account's email first"
            )
        from_email = sender.email
    if sender is not None:
        from_name = from_name if from_name is not None else sender.default_sender_name
        reply_to = reply_to if reply_to is not None else sender.reply_to
    return Identity(
        from_email=check_from(from_email, sender, policy), from_name=from_name, reply_to=reply_to
    )


def zone(name: str | None) -> zoneinfo.ZoneInfo:
    """The named timezone, UTC when unknown."""
    try:
        return zoneinfo.ZoneInfo(name or "UTC")
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return zoneinfo.ZoneInfo("UTC")


def resolve_send_at(send_at: datetime, *, timezone: str | None, now: datetime) -> datetime:
    """`send_at` as an aware instant (a naive one is in the profile's timezone); 422 if past."""
    aware = send_at if send_at.tzinfo is not None else send_at.replace(tzinfo=zone(timezone))
    if aware <= now:
        raise invalid("send_at", "must be in the future")
    if aware > now + timedelta(days=366):
        raise invalid("send_at", "must be within a year")
    return aware


def quota_day(at: datetime, timezone: str | None) -> date:
    """The account's calendar day (in its timezone) an email sent at `at` counts against."""
    return at.astimezone(zone(timezone)).date()


def check_quota(*, quota: int | None, used: int, needed: int) -> None:
    """429 if `needed` more recipients would exceed the daily `quota` (None: unlimited)."""
    if quota is None or used + needed <= quota:
        return
    raise ApiError(
        429,
        "quota_exceeded",
        f"daily send quota exceeded: {needed} recipients would bring today's total to"
        f" {used + needed}, over the quota of {quota} ({max(quota - used, 0)} left today)",
    )


def completion(
    *, status: str, recipients: int | None, sent: int, failed: int
) -> Literal["sent", "failed"] | None:
    """The final status an email reaches once every recipient has an outcome, else None."""
    if status not in UNDER_WAY or recipients is None or sent + failed < recipients:
        return None
    return "failed" if recipients > 0 and sent == 0 else "sent"


def check_retry(*, status: str, failed: int, sent_at: datetime | None, now: datetime) -> None:
    """409 naming why an email's failed recipients cannot be retried now."""
    if status not in FINISHED:
        raise conflict(
            f"this email is {status}: only a sent or failed email's failed recipients can be"
            " retried, once every recipient has an outcome"
        )
    if failed == 0:
        raise conflict("no recipient of this email failed: there is nothing to retry")
    if sent_at is not None and now - sent_at > RETRY_WINDOW:
        raise conflict(
            f"this email went out more than {RETRY_WINDOW.days} days ago: its delivery records"
            " may be gone, so its failed recipients can no longer be retried"
        )


def encode_cursor(created_at: datetime, email_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{email_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The position a listing cursor names, or 422 on `cursor`."""
    try:
        created, _, email_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        return datetime.fromisoformat(created), uuid.UUID(email_id)
    except (ValueError, UnicodeError):
        raise invalid("cursor", "not a cursor this endpoint returned") from None
