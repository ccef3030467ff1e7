"""Send requests: the public inbound contract on `email.requests`.

Other systems publish these (identified by an API key), and so does the auth service for its
system mails (confirmation, password reset), identified by its account id.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from pydantic import Field, field_validator

from herald.events._envelope import EventData, event


@event
class SendRequested(EventData):
    """Send one email now or at `send_at`; `idempotency_key` makes a repeat a no-op (per account).

    Published as a Herald envelope of type `email.requested`, or by other systems as a bare JSON
    object with these fields (`api_key` then names the account). `to` is one address or a list;
    `send_at` is ISO 8601 (without a zone: the account's timezone); `template_vars` are available
    to the subject, HTML and text templates. An invalid request goes to `email.requests.dlq`.
    """

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

    @field_validator("to", mode="before")
    @classmethod
    def _one_address_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    def partition_key(self) -> str:
        return self.idempotency_key
