"""Events the contacts service produces."""

from __future__ import annotations

import uuid
from typing import ClassVar, Literal

from herald.events._envelope import EventData, event


@event
class ContactSuppressed(EventData):
    """An address must not receive campaign mail any more (unsubscribed, bounced, complained)."""

    TYPE: ClassVar[str] = "contact.suppressed"
    TOPIC: ClassVar[str] = "contact.suppressed"

    contact_id: uuid.UUID | None
    email: str
    reason: Literal["unsubscribed", "bounced", "complained", "manual"]
    email_id: uuid.UUID | None = None

    def partition_key(self) -> str:
        return self.email
