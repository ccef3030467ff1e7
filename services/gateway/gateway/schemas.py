"""Request and response models of the gateway's own endpoints, and what it reads from services."""

from __future__ import annotations

import uuid
from datetime import date, datetime

from pydantic import BaseModel, ConfigDict, Field, JsonValue


class MessageCounts(BaseModel):
    """Per-recipient outcomes in one window."""

    sent: int = Field(ge=0, description="recipients whose message the relay accepted")
    deferred: int | None = Field(
        None,
        ge=0,
        description="recipients whose latest attempt in the window was deferred (a temporary "
        "refusal; retried later); null from a dispatcher too old to count them",
    )
    failed: int = Field(ge=0, description="recipients given up on (refused, or out of retries)")


class MessageWindows(BaseModel):
    """What the dispatcher reports under `messages` in its `/internal/stats`, counted from its
    per-recipient records (so over every replica, and across restarts)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "last_minute": {"sent": 1180, "deferred": 7, "failed": 3},
                    "last_hour": {"sent": 52210, "deferred": 95, "failed": 41},
                    "awaiting_retry": 12,
                }
            ]
        }
    )

    last_minute: MessageCounts
    last_hour: MessageCounts
    awaiting_retry: int | None = Field(
        None, ge=0, description="recipients deferred now, waiting for their next attempt"
    )


class ServiceStats(BaseModel):
    """A service's `/internal/stats`: the shared figures, plus ones the service names itself.

    Known service-specific figures: `messages` (dispatcher: sent/deferred/failed in the last
    minute and hour) and `events_per_minute` (tracking: events consumed, provider notifications
    and opens and clicks recorded in the last 60 seconds).
    """

    model_config = ConfigDict(extra="allow")

    service: str
    version: str
    consumer_lag: dict[str, dict[str, int]] = {}
    outbox_backlog: int | None = None
    schema_bytes: int | None = None
    messages: MessageWindows | None = None
    events_per_minute: float | None = None


class ServiceStatus(BaseModel):
    name: str = Field(examples=["contacts"])
    healthy: bool = Field(description="`/healthz` answered")
    ready: bool = Field(description="`/readyz` answered ready")
    version: str | None = Field(None, examples=["0.1.0"])
    checks: dict[str, str] = Field(default={}, examples=[{"database": "ok", "broker": "ok"}])
    outbox_backlog: int | None = Field(None, description="events written, not yet published")
    schema_bytes: int | None = Field(None, description="size of the service's schema")
    figures: dict[str, JsonValue] = Field(
        default={}, description="further figures the service reports about itself"
    )
    error: str | None = Field(None, description="why some of the above is missing")


class ConsumerLag(BaseModel):
    service: str = Field(examples=["campaign"])
    group: str = Field(examples=["campaign"])
    topic: str = Field(examples=["email.dispatched"])
    lag: int = Field(ge=0, description="messages published but not yet consumed")


class DatabaseSize(BaseModel):
    schemas: dict[str, int] = Field(description="bytes per schema (tables, indexes, TOAST)")
    total_bytes: int


class SystemView(BaseModel):
    """The platform at a glance, for administrators."""

    generated_at: datetime
    services: list[ServiceStatus]
    consumer_lag: list[ConsumerLag]
    outbox_backlog: dict[str, int] = Field(description="per service")
    database: DatabaseSize
    messages: MessageWindows | None = Field(
        None, description="the dispatcher's outcomes; null until it reports them"
    )
    tracking_events_per_minute: float | None = Field(
        None, description="tracking events recorded in the last minute; null until reported"
    )


class UsageDay(BaseModel):
    """Recipients of one account on one day (the account's day, as the quota counts it)."""

    account_id: uuid.UUID
    day: date
    sent: int = Field(ge=0)
    failed: int = Field(0, ge=0)


class AccountQuota(BaseModel):
    account_id: uuid.UUID
    daily_send_quota: int | None = Field(None, ge=0)
    used_today: int = Field(ge=0)


class CampaignUsage(BaseModel):
    """What the campaign service answers at `GET /internal/usage?from=&to=`."""

    days: list[UsageDay]
    quotas: list[AccountQuota]


class TopSender(BaseModel):
    account_id: uuid.UUID
    sent: int
    failed: int


class QuotaUse(AccountQuota):
    used_ratio: float | None = Field(None, description="used_today / daily_send_quota")


class UsageReport(BaseModel):
    """Emails sent per account per day, the top senders, and quota use today."""

    model_config = ConfigDict(populate_by_name=True)

    from_: date = Field(alias="from")
    to: date
    days: list[UsageDay]
    top_senders: list[TopSender]
    quotas: list[QuotaUse]
