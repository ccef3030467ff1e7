"""Events the scheduler produces: per-recipient delivery jobs, in batches."""

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
    """Deliver `content` to each of `recipients`. Self-contained, so any dispatcher can take it."""

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

    def partition_key(self) -> str:
        # Batches of one email spread over partitions, so several dispatchers share a big send.
        return f"{self.email_id}:{self.batch_no}"
