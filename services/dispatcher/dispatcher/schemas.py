"""Response models of the dispatcher's internal endpoints."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class DeliverySummary(BaseModel):
    """How far one email's delivery got: its messages by state."""

    email_id: uuid.UUID
    total: int = Field(ge=0, examples=[20000])
    queued: int = Field(0, ge=0, description="waiting for a first attempt")
    sending: int = Field(0, ge=0, description="claimed by a dispatcher, attempt under way")
    deferred: int = Field(0, ge=0, description="waiting to be tried again")
    sent: int = Field(0, ge=0, description="accepted by the relay")
    failed: int = Field(0, ge=0, description="refused for good, or given up on")


class MessageRecord(BaseModel):
    """One recipient's message and what became of it."""

    id: uuid.UUID = Field(description="the left part of its Message-ID")
    email_id: uuid.UUID
    account_id: uuid.UUID
    recipient: str = Field(examples=["ann@example.com"])
    contact_id: uuid.UUID | None = None
    state: Literal["queued", "sending", "sent", "deferred", "failed"]
    attempts: int = Field(ge=0)
    next_attempt_at: datetime | None = None
    smtp_code: int | None = Field(None, examples=[250])
    smtp_reply: str | None = Field(None, examples=["2.0.0 Ok: queued as 4Xk2"])
    queued_at: datetime
    finished_at: datetime | None = None
