"""Events the auth service produces."""

from __future__ import annotations

import uuid
from typing import ClassVar, Literal

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
