"""Events the scheduler produces: per-recipient delivery jobs in batches, and fan-out progress."""

from __future__ import annotations

import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from herald.events._envelope import EventData, event
from herald.events.campaign import EmailContent


class Recipient(BaseModel):
    """One address to deliver to, with what personalisation needs."""

    model_config = ConfigDict(frozen=True)

    email: str
    contact_id: uuid.UUID | None = None
    first_name: str | None = None
    last_name: str | None = None
    attributes: dict[str, Any] = Field(default_factory=dict)


@event
class DispatchBatch(EventData):
    """Deliver `content` to each of `recipients`. Self-contained, so any dispatcher can take it.

    `last_batch` and `total_recipients` are set on the final batch when the scheduler can tell
    it is the final one; `EmailFannedOut` always says when an email's fan-out is complete.
    """

    TYPE: ClassVar[str] = "email.dispatch"
    TOPIC: ClassVar[str] = "email.dispatch"

    email_id: uuid.UUID
    batch_no: int = Field(ge=0)
    kind: Literal["campaign", "transactional", "system"]
    content: EmailContent
    template_vars: dict[str, Any] = Field(default_factory=dict)
    recipients: list[Recipient] = Field(min_length=1)
    last_batch: bool = False
    total_recipients: int | None = None
    # Which schedule of the email this batch belongs to (campaign's revision counter).
    revision: int = 0

    def partition_key(self) -> str:
        # Batches of one email spread over partitions, so several dispatchers share a big send.
        return f"{self.email_id}:{self.batch_no}"


@event
class EmailFanoutStarted(EventData):
    """The timer of `email_id` fired: its audience is being resolved and handed out."""

    TYPE: ClassVar[str] = "email.fanout_started"
    TOPIC: ClassVar[str] = "email.fanout"

    email_id: uuid.UUID
    revision: int

    def partition_key(self) -> str:
        return str(self.email_id)


@event
class EmailFannedOut(EventData):
    """Fan-out of `email_id` ended: `total_recipients` delivery jobs in `batches` batches.

    `completed`: everyone was handed out. `cancelled`: stopped by a cancellation part way, after
    `total_recipients`. `failed`: the audience could not be resolved (`reason` says why).
    """

    TYPE: ClassVar[str] = "email.fanned_out"
    TOPIC: ClassVar[str] = "email.fanout"

    email_id: uuid.UUID
    revision: int
    total_recipients: int = Field(ge=0)
    batches: int = Field(ge=0)
    outcome: Literal["completed", "cancelled", "failed"] = "completed"
    reason: str | None = None

    def partition_key(self) -> str:
        return str(self.email_id)
