"""Send requests: the public inbound contract on `email.requests`.

Other systems publish these (identified by an API key), and so does the auth service for its
system mails (confirmation, password reset), identified by its account id.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from pydantic import Field

from herald.events._envelope import EventData, event


@event
class SendRequested(EventData):
    """Send one email now or at `send_at`; `idempotency_key` makes a repeat a no-op."""

    TYPE: ClassVar[str] = "email.requested"
    TOPIC: ClassVar[str] = "email.requests"

    idempotency_key: str = Field(min_length=1, max_length=200)
    api_key: str | None = None
    to: list[str] = Field(min_length=1, max_length=1000)
    subject: str = Field(min_length=1, max_length=998)
    html: str | None = None
    text: str | None = None
    from_name: str | None = None
    from_email: str | None = None
    reply_to: str | None = None
    send_at: datetime | None = None
    template_vars: dict[str, Any] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)
    # System mails (sign-up confirmation, reset) are sent even to unknown or suppressed contacts.
    system: bool = False

    def partition_key(self) -> str:
        return self.idempotency_key
