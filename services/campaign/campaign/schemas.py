"""Request and response models of the campaign API."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, EmailStr, Field, model_validator

Status = Literal["draft", "scheduled", "queued", "sending", "sent", "cancelled", "failed"]
Subject = Field(min_length=1, max_length=998, examples=["Hello {{ contact.first_name }}"])


def _single_line(value: str) -> str:
    # These end up in mail headers: a line break there would start a header of its own.
    if "\r" in value or "\n" in value:
        raise ValueError("must be a single line (no CR or LF)")
    return value


Line = Annotated[str, AfterValidator(_single_line)]
HTML_EXAMPLE = (
    '<p>Hi {{ contact.first_name | default("there") }},</p>'
    "<p>Your plan: {{ contact.attributes.plan }}</p>"
    '<p><a href="{{ unsubscribe_url }}">Unsubscribe</a></p>'
)
MAX_BODY = 512 * 1024


class _Strict(BaseModel):
    # An unknown field is a mistake worth a clear 422, not something to drop silently.
    model_config = ConfigDict(extra="forbid")


class ComposeRequest(_Strict):
    """A new draft: templates, sender and audience."""

    subject: Line = Subject
    html: str | None = Field(None, max_length=MAX_BODY, examples=[HTML_EXAMPLE])
    text: str | None = Field(None, max_length=MAX_BODY)
    from_name: Line | None = Field(None, max_length=200, examples=["Acme News"])
    from_email: EmailStr | None = Field(None, examples=["news@acme.example"])
    reply_to: EmailStr | None = None
    list_ids: list[uuid.UUID] = Field(default_factory=list, max_length=100)
    contact_ids: list[uuid.UUID] = Field(default_factory=list, max_length=1000)
    to: list[EmailStr] = Field(default_factory=list, max_length=1000)
    tags: list[Line] = Field(default_factory=list, max_length=20)
    template_vars: dict[str, Any] = Field(default_factory=dict)


class PatchRequest(_Strict):
    """Changes to a draft; fields left out stay as they are."""

    subject: Line | None = Field(None, min_length=1, max_length=998)
    html: str | None = Field(None, max_length=MAX_BODY)
    text: str | None = Field(None, max_length=MAX_BODY)
    from_name: Line | None = Field(None, max_length=200)
    from_email: EmailStr | None = None
    reply_to: EmailStr | None = None
    list_ids: list[uuid.UUID] | None = Field(None, max_length=100)
    contact_ids: list[uuid.UUID] | None = Field(None, max_length=1000)
    to: list[EmailStr] | None = Field(None, max_length=1000)
    tags: list[Line] | None = Field(None, max_length=20)
    template_vars: dict[str, Any] | None = None


class SendRequest(_Strict):
    """Send a composed email now (`email_id`), or inline content to `to` without a compose."""

    email_id: uuid.UUID | None = None
    to: list[EmailStr] | None = Field(None, min_length=1, max_length=1000)
    subject: Line | None = Field(None, min_length=1, max_length=998)
    html: str | None = Field(None, max_length=MAX_BODY)
    text: str | None = Field(None, max_length=MAX_BODY)
    from_name: Line | None = Field(None, max_length=200)
    from_email: EmailStr | None = None
    reply_to: EmailStr | None = None
    tags: list[Line] = Field(default_factory=list, max_length=20)
    template_vars: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)

    @model_validator(mode="after")
    def _one_form(self) -> SendRequest:
        inline = self.to is not None or self.subject is not None
        if self.email_id is not None and inline:
            raise ValueError("give either email_id or inline content (to, subject), not both")
        if self.email_id is None and (self.to is None or self.subject is None):
            raise ValueError("give email_id, or to and subject (with html or text)")
        return self


class ScheduleRequest(_Strict):
    """Send `email_id` at `send_at` (ISO 8601; without a zone, the profile's timezone)."""

    email_id: uuid.UUID
    send_at: datetime = Field(examples=["2030-01-01T09:00:00+01:00"])


class PreviewRequest(_Strict):
    """Render for one of the account's contacts, or for a sample recipient."""

    contact_id: uuid.UUID | None = None


class CopyRequest(_Strict):
    """Send one copy, rendered for the address given, marked as a test."""

    to: EmailStr


class Counts(BaseModel):
    """Recipients handed out (`queued`, known when the fan-out ends), and their outcomes."""

    queued: int | None
    sent: int
    failed: int


class EmailOut(BaseModel):
    """An email: content, audience, status and delivery counts."""

    id: uuid.UUID
    kind: Literal["campaign", "transactional", "system", "test"]
    status: Status
    subject: str
    html: str | None
    text: str | None
    from_name: str | None
    from_email: str | None
    reply_to: str | None
    list_ids: list[uuid.UUID]
    contact_ids: list[uuid.UUID]
    to: list[str]
    tags: list[str]
    template_vars: dict[str, Any]
    send_at: datetime | None
    counts: Counts
    failure_reason: str | None
    test_of: uuid.UUID | None
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None


class EmailPage(BaseModel):
    items: list[EmailOut]
    next_cursor: str | None


class Accepted(BaseModel):
    """The email was handed over for sending (`queued`) or to its timer (`scheduled`); a
    repeated idempotency key answers with the email it created first, as it stands."""

    id: uuid.UUID
    status: Status
    send_at: datetime | None = None


class CopyAccepted(BaseModel):
    id: uuid.UUID
    status: Literal["queued"]
    to: str
    test_of: uuid.UUID


class Preview(BaseModel):
    subject: str
    html: str | None
    text: str | None
    to: str


class UsageDay(BaseModel):
    """Recipients of one account on one day (the account's day, as the quota counts it)."""

    account_id: uuid.UUID
    day: date
    sent: int
    failed: int


class AccountQuota(BaseModel):
    """An account's daily quota (None: unlimited) and the recipients counted against it today."""

    account_id: uuid.UUID
    daily_send_quota: int | None
    used_today: int


class Usage(BaseModel):
    """`GET /internal/usage`: what the gateway's `/admin/usage` is built from."""

    days: list[UsageDay]
    quotas: list[AccountQuota]
