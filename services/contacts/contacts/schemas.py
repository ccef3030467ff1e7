"""Request and response models of the contacts API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from contacts import domain
from herald.errors import ErrorBody

Status = Literal["active", "unsubscribed", "bounced", "complained"]
Name = Field(None, max_length=domain.MAX_NAME, examples=["Ada"])


class _Strict(BaseModel):
    # An unknown field is a mistake worth a clear 422, not something to drop silently.
    model_config = ConfigDict(extra="forbid")


def _attributes(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None and (problem := domain.attribute_problem(value)):
        raise ValueError(problem)
    return value


def _name(value: str | None) -> str | None:
    if problem := domain.name_problem(value):
        raise ValueError(problem)
    return value


def _email(value: str) -> str:
    try:
        return domain.normalise_email(value)
    except domain.InvalidEmail as exc:
        raise ValueError(str(exc)) from None


class ContactCreate(_Strict):
    """A new contact; `list_ids` adds it to those lists of yours."""

    email: str = Field(max_length=domain.MAX_EMAIL * 4, examples=["Ada@Example.com"])
    first_name: str | None = Name
    last_name: str | None = Field(None, max_length=domain.MAX_NAME, examples=["Lovelace"])
    attributes: dict[str, Any] = Field(
        default_factory=dict, examples=[{"plan": "pro", "city": "London"}]
    )
    list_ids: list[uuid.UUID] = Field(default_factory=list, max_length=100)

    _check_email = field_validator("email")(_email)
    _check_names = field_validator("first_name", "last_name")(_name)
    _check_attributes = field_validator("attributes")(_attributes)


class ContactPatch(_Strict):
    """Changes to a contact; fields left out stay as they are. `attributes` replaces them all.

    `status` may only be set to `unsubscribed` (a manual suppression); no one is resubscribed.
    """

    email: str | None = Field(None, max_length=domain.MAX_EMAIL * 4)
    first_name: str | None = Name
    last_name: str | None = Field(None, max_length=domain.MAX_NAME)
    attributes: dict[str, Any] | None = None
    status: Literal["unsubscribed"] | None = None

    @field_validator("email")
    @classmethod
    def _check_email(cls, value: str | None) -> str | None:
        return None if value is None else _email(value)

    _check_names = field_validator("first_name", "last_name")(_name)
    _check_attributes = field_validator("attributes")(_attributes)


class ContactOut(BaseModel):
    id: uuid.UUID
    email: str = Field(examples=["Ada@example.com"])
    first_name: str | None
    last_name: str | None
    attributes: dict[str, Any]
    status: Status
    soft_bounces: int = 0
    created_at: datetime
    updated_at: datetime


class ContactDetail(ContactOut):
    list_ids: list[uuid.UUID] = Field(description="The lists the contact is on.")


class ContactPage(BaseModel):
    items: list[ContactOut]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )


class BulkItem(BaseModel):
    """The outcome of one item of a bulk create, in the order given."""

    index: int
    status: int = Field(examples=[201, 409, 422])
    contact: ContactOut | None = None
    error: ErrorBody | None = None


class BulkResult(BaseModel):
    created: int
    failed: int
    items: list[BulkItem]


class ListCreate(_Strict):
    name: str = Field(min_length=1, max_length=200, examples=["Newsletter"])
    description: str | None = Field(None, max_length=2000)


class ListPatch(_Strict):
    name: str | None = Field(None, min_length=1, max_length=200)
    description: str | None = Field(None, max_length=2000)


class ListOut(BaseModel):
    id: uuid.UUID
    name: str
    description: str | None
    member_count: int
    created_at: datetime
    updated_at: datetime


class ListPage(BaseModel):
    items: list[ListOut]
    next_cursor: str | None


class MembersChange(_Strict):
    contact_ids: list[uuid.UUID] = Field(min_length=1, max_length=5000)


class MembersChanged(BaseModel):
    changed: int = Field(description="How many memberships were added (or removed).")


class ImportAccepted(BaseModel):
    job_id: uuid.UUID
    status: Literal["queued"] = "queued"


class ImportRowError(BaseModel):
    row: int = Field(description="As a spreadsheet numbers it: the header is row 1.")
    field: str
    message: str


class ImportDuplicateRow(BaseModel):
    row: int = Field(description="A row whose address comes again later in the file.")
    kept_row: int = Field(description="The last row with that address: the one applied.")


class ImportJobOut(BaseModel):
    """An import's progress; `status` is final once `succeeded` or `failed`.

    Nothing of a failed import is applied: the contacts and list memberships change in one
    transaction at the end, all together or not at all.
    """

    id: uuid.UUID
    status: Literal["queued", "running", "succeeded", "failed"]
    list_id: uuid.UUID | None
    filename: str | None
    rows_read: int
    created: int
    updated: int
    skipped: int = Field(description="Rows not applied: those with errors and the duplicates.")
    error_count: int
    errors: list[ImportRowError]
    duplicate_count: int = Field(
        description="Rows whose address (compared case-insensitively) comes again later in the"
        " file; the last row of an address is applied, whole, and these are not."
    )
    duplicates: list[ImportDuplicateRow] = Field(
        description="The first duplicate rows, by row number (as many as `errors` may hold)."
    )
    failure_reason: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


# -- internal ------------------------------------------------------------------------------------


class _Audience(_Strict):
    """An email's audience: lists and contacts of an account, each kept once, in order."""

    account_id: uuid.UUID
    list_ids: list[uuid.UUID] = Field(default_factory=list, max_length=1000)
    contact_ids: list[uuid.UUID] = Field(default_factory=list, max_length=10_000)

    @field_validator("list_ids", "contact_ids")
    @classmethod
    def _once_each(cls, value: list[uuid.UUID]) -> list[uuid.UUID]:
        return list(dict.fromkeys(value))


class RecipientsQuery(_Audience):
    after: str | None = None
    limit: int = Field(1000, ge=1, le=5000)


class Recipient(BaseModel):
    email: str
    contact_id: uuid.UUID
    first_name: str | None
    last_name: str | None
    attributes: dict[str, Any]


class RecipientsPage(BaseModel):
    items: list[Recipient]
    next_cursor: str | None


class OwnedQuery(_Audience):
    """Which of these lists and contacts are not the account's."""


class OwnedAnswer(BaseModel):
    """The ids asked about that are not the account's (never were, or were deleted)."""

    unknown_list_ids: list[uuid.UUID]
    unknown_contact_ids: list[uuid.UUID]


class SuppressedQuery(_Strict):
    account_id: uuid.UUID
    emails: list[str] = Field(max_length=5000)


class SuppressedAnswer(BaseModel):
    suppressed: list[str]


class Unsubscribed(BaseModel):
    unsubscribed: bool = True
    email: str
