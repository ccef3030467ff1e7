"""Events the auth service produces."""

from __future__ import annotations

import uuid
from typing import ClassVar, Literal

from herald.events._envelope import EventData, event


@event
class UserChanged(EventData):
    """A user was created, or their status, role or quota changed; verifiers honour it at once."""

    TYPE: ClassVar[str] = "user.changed"
    TOPIC: ClassVar[str] = "user.changed"

    user_id: uuid.UUID
    email: str
    status: Literal["active", "disabled"]
    role: Literal["user", "admin"]
    daily_send_quota: int | None = None
    # Tokens issued before this instant are no longer honoured (logout everywhere, disable).
    tokens_valid_after: float | None = None

    def partition_key(self) -> str:
        return str(self.user_id)
