"""Events the dispatcher produces: the outcome of each delivery attempt."""

from __future__ import annotations

import uuid
from typing import ClassVar, Literal

from herald.events._envelope import EventData, event


@event
class MessageDispatched(EventData):
    """What the relay said about one recipient's message."""

    TYPE: ClassVar[str] = "email.dispatched"
    TOPIC: ClassVar[str] = "email.dispatched"

    email_id: uuid.UUID
    message_id: str
    recipient: str
    contact_id: uuid.UUID | None = None
    status: Literal["sent", "deferred", "failed"]
    attempt: int
    smtp_code: int | None = None
    smtp_reply: str | None = None
    # A failure a later try may cure: retries ran out on temporary trouble (4xx replies,
    # timeouts, lost connections), unlike a refusal for good (5xx) or an unsendable message.
    retryable: bool = False

    def partition_key(self) -> str:
        return str(self.email_id)
