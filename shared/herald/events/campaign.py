"""Events the campaign service produces: an email handed to the scheduler, or taken back."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from herald.events._envelope import EventData, event


class EmailContent(BaseModel):
    """A snapshot of what is sent: templates, rendered per recipient by the dispatcher."""

    model_config = ConfigDict(frozen=True)

    subject: str
    html: str | None = None
    text: str | None = None
    from_name: str | None = None
    from_email: str
    reply_to: str | None = None
    track_opens: bool = True
    track_clicks: bool = True
    tags: list[str] = Field(default_factory=list)


class Audience(BaseModel):
    """Who receives it: lists and contacts resolved at send time, and literal addresses."""

    model_config = ConfigDict(frozen=True)

    list_ids: list[uuid.UUID] = Field(default_factory=list)
    contact_ids: list[uuid.UUID] = Field(default_factory=list)
    to: list[str] = Field(default_factory=list)


@event
class EmailScheduled(EventData):
    """Send `email_id` at `send_at`; a later revision replaces an earlier one (reschedule)."""

    TYPE: ClassVar[str] = "email.scheduled"
    TOPIC: ClassVar[str] = "email.scheduled"

    email_id: uuid.UUID
    revision: int
    send_at: datetime
    kind: Literal["campaign", "transactional", "system"]
    content: EmailContent
    audience: Audience
    template_vars: dict[str, object] = Field(default_factory=dict)

    def partition_key(self) -> str:
        return str(self.email_id)


@event
class EmailCancelled(EventData):
    """Do not send `email_id` (travels on the same topic, so it stays ordered after scheduling)."""

    TYPE: ClassVar[str] = "email.cancelled"
    TOPIC: ClassVar[str] = "email.scheduled"

    email_id: uuid.UUID
    revision: int

    def partition_key(self) -> str:
        return str(self.email_id)


@event
class EmailRetryRequested(EventData):
    """Try `email_id`'s failed recipients again: those refused for good (5xx), unsendable, or
    `suppressed` since (lower-cased addresses) keep their failure and have it published again;
    the others (`retryable` failures) are queued once more. `failed`: how many outcomes the
    campaign service forgot and waits for again."""

    TYPE: ClassVar[str] = "email.retry_requested"
    TOPIC: ClassVar[str] = "email.retries"

    email_id: uuid.UUID
    failed: int
    suppressed: list[str] = Field(default_factory=list)

    def partition_key(self) -> str:
        return str(self.email_id)
