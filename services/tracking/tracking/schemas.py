"""Response models of the tracking service."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Counts(BaseModel):
    """What happened, per recipient state; `human_*` leave out machine activity (proxies and
    scanners). In a report's buckets `deferred` counts deferrals; an email's `deferred` is its
    recipients waiting for a retry now."""

    sent: int = Field(0, description="accepted by the relay")
    failed: int = Field(0, description="refused for good by the relay")
    deferred: int = 0
    delivered: int = Field(0, description="sent and not bounced")
    confirmed: int = Field(0, description="delivery confirmed by the provider (SES, SendGrid)")
    bounced: int = Field(0, description="recipients with a bounce, hard or soft")
    hard_bounced: int = 0
    complained: int = 0
    unsubscribed: int = 0
    opens: int = Field(0, description="every fetch of the pixel")
    human_opens: int = 0
    unique_opens: int = Field(0, description="recipients who opened")
    unique_human_opens: int = 0
    clicks: int = Field(0, description="every followed link")
    human_clicks: int = 0
    unique_clicks: int = Field(0, description="recipients who clicked")
    unique_human_clicks: int = 0


class EmailCounts(Counts):
    queued: int = Field(0, description="handed out, no answer from the relay yet")


class Rates(BaseModel):
    """Shares, 0 to 1 (null when the base is zero). Delivery and bounce rates are over
    recipients the relay answered for good (sent + failed); open, click, complaint and
    unsubscribe rates over delivered recipients; click-to-open over unique openers."""

    delivery_rate: float | None = None
    bounce_rate: float | None = None
    complaint_rate: float | None = None
    unsubscribe_rate: float | None = None
    open_rate: float | None = None
    human_open_rate: float | None = None
    click_rate: float | None = None
    human_click_rate: float | None = None
    click_to_open_rate: float | None = None
    human_click_to_open_rate: float | None = None


class LinkClicks(BaseModel):
    """Clicks on one link (`link_index`: its position in the email)."""

    link_index: int
    url: str
    clicks: int
    human_clicks: int
    unique_clicks: int
    unique_human_clicks: int


class RecipientOut(BaseModel):
    """One recipient of the email: delivery status and first open and click."""

    recipient: str
    contact_id: uuid.UUID | None
    message_id: str
    status: Literal["queued", "deferred", "sent", "failed"]
    attempts: int
    smtp_code: int | None
    smtp_reply: str | None
    sent_at: datetime | None
    confirmed_at: datetime | None
    provider_status: str | None = Field(
        None, description="the provider's last word: delivered, deferred, dropped, bounced…"
    )
    bounce: Literal["soft", "hard"] | None
    bounced_at: datetime | None
    complained_at: datetime | None
    unsubscribed_at: datetime | None
    opens: int
    human_opens: int
    first_open_at: datetime | None
    first_human_open_at: datetime | None
    clicks: int
    human_clicks: int
    first_click_at: datetime | None
    first_human_click_at: datetime | None


class RecipientPage(BaseModel):
    items: list[RecipientOut]
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next page")


class TrackingOut(BaseModel):
    """An email's delivery and engagement."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "email_id": "6f1c7a52-2f4b-4a4e-9a51-0d7e8c6f1b2a",
                "subject": "Our spring news",
                "kind": "campaign",
                "tags": ["newsletter"],
                "total_recipients": 3,
                "first_sent_at": "2026-03-02T09:00:04Z",
                "counts": {"queued": 0, "sent": 3, "delivered": 2, "bounced": 1, "opens": 4},
                "rates": {"delivery_rate": 0.6667, "open_rate": 1.0},
                "links": [],
                "recipients": {"items": [], "next_cursor": None},
            }
        }
    )

    email_id: uuid.UUID
    subject: str | None
    kind: str | None
    tags: list[str]
    total_recipients: int | None
    first_sent_at: datetime | None
    counts: EmailCounts
    rates: Rates
    links: list[LinkClicks]
    recipients: RecipientPage


class SeriesPoint(Counts):
    bucket: str = Field(
        description="an hour (local time with offset) or a day (local date) of the account"
    )


class EmailRow(Counts):
    """One email's figures within the period."""

    email_id: uuid.UUID
    subject: str | None
    tags: list[str]
    first_sent_at: datetime | None
    rates: Rates


class LinkRow(LinkClicks):
    email_id: uuid.UUID


class ReportOut(BaseModel):
    """Totals, rates, a time series, a per-email table and top links for a period."""

    model_config = ConfigDict(populate_by_name=True)

    timezone: str
    from_: datetime = Field(alias="from")
    to: datetime
    interval: Literal["hour", "day"]
    email_id: uuid.UUID | None
    tag: str | None
    totals: Counts
    rates: Rates
    series: list[SeriesPoint]
    emails: list[EmailRow]
    top_links: list[LinkRow]
