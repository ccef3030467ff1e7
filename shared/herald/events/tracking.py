"""Events the tracking service produces (the dispatcher publishes hard bounces too)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import ClassVar, Literal

from herald.events._envelope import EventData, event


@event
class EmailOpened(EventData):
    """A recipient's mail client fetched the tracking pixel; `machine` when a privacy proxy or
    scanner fetched it (`reason` says which rule). `recipient` is empty in the rare case the
    open was written before the delivery outcome that names the address."""

    TYPE: ClassVar[str] = "email.opened"
    TOPIC: ClassVar[str] = "email.opened"

    email_id: uuid.UUID
    message_id: str
    recipient: str
    at: datetime
    machine: bool = False
    user_agent: str | None = None
    reason: str | None = None
    contact_id: uuid.UUID | None = None

    def partition_key(self) -> str:
        return str(self.email_id)


@event
class EmailClicked(EventData):
    """A recipient followed the link at `link_index` to `url`; `machine` when a link scanner
    did (`reason` says which rule). `recipient` as in `email.opened`."""

    TYPE: ClassVar[str] = "email.clicked"
    TOPIC: ClassVar[str] = "email.clicked"

    email_id: uuid.UUID
    message_id: str
    recipient: str
    url: str
    link_index: int
    at: datetime
    machine: bool = False
    user_agent: str | None = None
    reason: str | None = None
    contact_id: uuid.UUID | None = None

    def partition_key(self) -> str:
        return str(self.email_id)


@event
class EmailBounced(EventData):
    """A recipient's address bounced; `hard` ones are suppressed by the contacts service."""

    TYPE: ClassVar[str] = "email.bounced"
    TOPIC: ClassVar[str] = "email.bounced"

    email_id: uuid.UUID | None
    message_id: str | None
    recipient: str
    contact_id: uuid.UUID | None = None
    hard: bool
    source: Literal["smtp", "ses", "sendgrid"]
    detail: str | None = None

    def partition_key(self) -> str:
        return self.recipient


@event
class EmailComplained(EventData):
    """A recipient reported the message as spam (a provider's feedback loop); the contacts
    service suppresses the address."""

    TYPE: ClassVar[str] = "email.complained"
    TOPIC: ClassVar[str] = "email.complained"

    email_id: uuid.UUID | None
    message_id: str | None
    recipient: str
    contact_id: uuid.UUID | None = None
    source: Literal["ses", "sendgrid"]
    detail: str | None = None

    def partition_key(self) -> str:
        return self.recipient
