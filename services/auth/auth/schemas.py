"""Request and response models of the auth service."""

from __future__ import annotations

import uuid
import zoneinfo
from datetime import datetime
from typing import Literal

from email_validator import EmailNotValidError, validate_email
from pydantic import BaseModel, ConfigDict, Field, field_validator


def normalise_email(value: str) -> str:
    """Syntax-checked and normalised, lower-cased whole; no DNS lookup.

    Mailbox names are case-sensitive in theory and never in practice: one person, one account.
    """
    try:
        return validate_email(value.strip(), check_deliverability=False).normalized.lower()
    except EmailNotValidError as exc:
        raise ValueError(str(exc)) from None


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class SignupRequest(_In):
    username: str = Field(min_length=1, max_length=64, examples=["ada"])
    email: str = Field(min_length=3, max_length=254, examples=["ada@example.com"])
    password: str = Field(min_length=1, max_length=1024, examples=["correct horse battery staple"])

    _email = field_validator("email")(normalise_email)

    @field_validator("username")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()


class UserOut(BaseModel):
    id: uuid.UUID
    username: str
    email: str
    email_verified: bool


class EmailRequest(_In):
    email: str = Field(min_length=3, max_length=254, examples=["ada@example.com"])

    _email = field_validator("email")(normalise_email)


class Accepted(BaseModel):
    status: Literal["accepted"] = "accepted"


class LoginRequest(_In):
    email: str = Field(min_length=1, max_length=254, examples=["ada@example.com"])
    password: str = Field(min_length=1, max_length=1024)

    @field_validator("email")
    @classmethod
    def _normalise(cls, value: str) -> str:
        # A malformed address is just a wrong credential here, not a validation error to reveal.
        try:
            return normalise_email(value)
        except ValueError:
            return value.strip().lower()


class TokenPair(BaseModel):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the OAuth 2 token type
    expires_in: int


class MfaRequired(BaseModel):
    mfa_required: Literal[True] = True
    mfa_token: str


class MfaLoginRequest(_In):
    mfa_token: str = Field(min_length=1, max_length=200)
    code: str = Field(min_length=6, max_length=20, examples=["123456"])


class RefreshRequest(_In):
    refresh_token: str = Field(min_length=1, max_length=200)


class SessionOut(BaseModel):
    id: uuid.UUID
    created_at: datetime
    last_used_at: datetime
    expires_at: datetime
    user_agent: str | None
    ip: str | None
    current: bool


class TotpSetup(BaseModel):
    secret: str
    otpauth_uri: str


class CodeRequest(_In):
    code: str = Field(min_length=6, max_length=20)


class RecoveryCodes(BaseModel):
    recovery_codes: list[str]


class MfaDisableRequest(_In):
    password: str = Field(min_length=1, max_length=1024)
    code: str = Field(min_length=6, max_length=20)


class ProfileOut(BaseModel):
    id: uuid.UUID
    username: str
    email: str
    email_verified: bool
    pending_email: str | None
    display_name: str | None
    timezone: str
    default_sender_name: str | None
    reply_to: str | None
    role: Literal["user", "admin"]
    mfa_enabled: bool
    daily_send_quota: int | None
    created_at: datetime


class ProfileUpdate(_In):
    username: str | None = Field(None, min_length=1, max_length=64)
    display_name: str | None = Field(None, max_length=100)
    timezone: str | None = Field(None, max_length=64, examples=["Europe/Paris"])
    default_sender_name: str | None = Field(None, max_length=100)
    reply_to: str | None = Field(None, max_length=254)
    email: str | None = Field(None, max_length=254)

    @field_validator("username")
    @classmethod
    def _lower(cls, value: str | None) -> str | None:
        # Omitted means unchanged; an explicit null would clear a name every account must have.
        if value is None:
            raise ValueError("a username cannot be removed; omit the field to keep it")
        return value.strip().lower()

    @field_validator("email", "reply_to")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        return normalise_email(value) if value else value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is None:
            raise ValueError("a time zone cannot be removed; omit the field to keep it")
        if value not in zoneinfo.available_timezones():
            raise ValueError("unknown time zone (use an IANA name such as Europe/Paris)")
        return value

    @field_validator("display_name", "default_sender_name")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        if value is not None and any(c in value for c in "\r\n\0"):
            raise ValueError("must be a single line")
        return value


class PasswordChange(_In):
    current_password: str = Field(min_length=1, max_length=1024)
    new_password: str = Field(min_length=1, max_length=1024)


class PasswordReset(_In):
    token: str = Field(min_length=1, max_length=200)
    new_password: str = Field(min_length=1, max_length=1024)


class ApiKeyCreate(_In):
    name: str = Field(min_length=1, max_length=100, examples=["billing server"])
    scope: Literal["send", "full"] = "send"


class ApiKeyOut(BaseModel):
    id: uuid.UUID
    name: str
    scope: Literal["send", "full"]
    prefix: str
    created_at: datetime
    last_used_at: datetime | None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="Shown once; store it now.")


class ApiKeyLookup(_In):
    api_key: str = Field(min_length=1, max_length=200)


class ApiKeyIdentity(BaseModel):
    account_id: uuid.UUID
    user_id: uuid.UUID
    scope: Literal["send", "full"]


class ExchangedToken(BaseModel):
    access_token: str
    expires_in: int
    scope: Literal["send", "full"]
    account_id: uuid.UUID


class AdminUserOut(ProfileOut):
    status: Literal["active", "disabled"]
    updated_at: datetime


class AdminUserPage(BaseModel):
    items: list[AdminUserOut]
    next_cursor: str | None


class AdminUserPatch(_In):
    disabled: bool | None = None
    role: Literal["user", "admin"] | None = None
    daily_send_quota: int | None = Field(None, ge=0, le=100_000_000)


class AuditEntry(BaseModel):
    id: int
    at: datetime
    actor_id: uuid.UUID | None
    actor_email: str | None
    action: str
    target_id: uuid.UUID | None
    target_email: str | None
    details: dict[str, object]
    ip: str | None


class AuditPage(BaseModel):
    items: list[AuditEntry]
    next_cursor: str | None
