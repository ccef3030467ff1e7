"""Events the auth service produces."""

from __future__ import annotations

import uuid
from typing import ClassVar, Literal

from pydantic import Field

from herald.events._envelope import EventData, event


@event
class UserChanged(EventData):
    """The latest state of a user, published on every change (sign-up, verification, profile,
    status, role, quota). Token verifiers refuse tokens issued before `tokens_valid_after` at
    once; the campaign service keeps the sender identity and quota from it."""

    TYPE: ClassVar[str] = "user.changed"
    TOPIC: ClassVar[str] = "user.changed"

    user_id: uuid.UUID
    email: str
    email_verified: bool = False
    username: str | None = None
    display_name: str | None = None
    default_sender_name: str | None = None
    reply_to: str | None = None
    timezone: str = "UTC"
    status: Literal["active", "disabled"]
    role: Literal["user", "admin"]
    # None: no limit beyond the platform's.
    daily_send_quota: int | None = None
    # Tokens issued before this instant (Unix seconds) are no longer honoured.
    tokens_valid_after: float | None = None

    def partition_key(self) -> str:
        return str(self.user_id)


@event
class SessionsRevoked(EventData):
    """Login sessions of a user ended (logout, a session deleted, a reused refresh token, a
    password change). Token verifiers refuse access tokens carrying one of `session_ids` as
    `sid` at once, until `tokens_expire_at`, after which no token of those sessions is valid."""

    TYPE: ClassVar[str] = "user.sessions_revoked"
    # The same topic and key as `user.changed`: one feed, in order, for every token verifier.
    TOPIC: ClassVar[str] = "user.changed"

    user_id: uuid.UUID
    session_ids: list[uuid.UUID] = Field(min_length=1)
    # Unix seconds: the latest expiry of an access token these sessions issued.
    tokens_expire_at: float

    def partition_key(self) -> str:
        return str(self.user_id)
