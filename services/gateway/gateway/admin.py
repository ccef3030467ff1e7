"""What administrators see: every service's health and figures, and usage per account.

The gateway asks each service (`/healthz`, `/readyz`, `/internal/stats`) at request time,
concurrently and with short timeouts, so a service that is down shows as down instead of
holding the answer up.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime
from typing import Any

import httpx
from pydantic import ValidationError

from gateway.schemas import (
    CampaignUsage,
    ConsumerLag,
    DatabaseSize,
    MessageWindows,
    QuotaUse,
    ServiceStats,
    ServiceStatus,
    SystemView,
    TopSender,
    UsageReport,
)
from herald.errors import ApiError

_TIMEOUT = 3.0
TOP_SENDERS = 10


async def _get(client: httpx.AsyncClient, url: str, **options: Any) -> httpx.Response:
    try:
        return await client.get(url, **options)
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
        # A pooled connection the service closed (it restarted): a GET is asked once more.
        return await client.get(url, **options)


async def _json(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> tuple[int, Any]:
    response = await _get(client, url, headers=headers, timeout=_TIMEOUT)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, None


async def _status(
    client: httpx.AsyncClient, name: str, url: str, headers: dict[str, str]
) -> tuple[ServiceStatus, ServiceStats | None]:
    answers: tuple[tuple[int, Any] | BaseException, ...] = await asyncio.gather(
        _json(client, f"{url}/healthz", {}),
        _json(client, f"{url}/readyz", {}),
        _json(client, f"{url}/internal/stats", headers),
        return_exceptions=True,
    )
    health, ready, stats = answers
    status = ServiceStatus(name=name, healthy=False, ready=False)
    errors: list[str] = []
    if isinstance(health, tuple) and health[0] == 200 and isinstance(health[1], dict):
        status.healthy = True
        status.version = str(health[1].get("version")) if health[1].get("version") else None
    else:
        errors.append("not answering /healthz")
    if isinstance(ready, tuple) and isinstance(ready[1], dict):
        status.ready = ready[0] == 200
        status.checks = {str(k): str(v) for k, v in dict(ready[1].get("checks", {})).items()}
    parsed: ServiceStats | None = None
    if isinstance(stats, tuple) and stats[0] == 200:
        try:
            parsed = ServiceStats.model_validate(stats[1])
        except ValidationError as exc:
            errors.append(f"unreadable /internal/stats: {exc.error_count()} errors")
    elif status.healthy:
        errors.append("no /internal/stats")
    if parsed is not None:
        status.outbox_backlog = parsed.outbox_backlog
        status.schema_bytes = parsed.schema_bytes
        status.figures = dict(parsed.model_extra or {})
        if parsed.messages is not None:
            status.figures["messages"] = parsed.messages.model_dump()
        if parsed.events_per_minute is not None:
            status.figures["events_per_minute"] = parsed.events_per_minute
    status.error = "; ".join(errors) or None
    return status, parsed


async def system_view(
    client: httpx.AsyncClient, urls: dict[str, str], headers: dict[str, str]
) -> SystemView:
    """Every service's state and figures, gathered now."""
    results = await asyncio.gather(
        *(_status(client, name, url, headers) for name, url in urls.items())
    )
    lags: list[ConsumerLag] = []
    backlog: dict[str, int] = {}
    sizes: dict[str, int] = {}
    # Each service counts from its own database: one answer is the whole platform's figure.
    messages: MessageWindows | None = None
    events: float | None = None
    for status, stats in results:
        if stats is None:
            continue
        for group, topics in sorted(stats.consumer_lag.items()):
            lags += [
                ConsumerLag(service=status.name, group=group, topic=topic, lag=max(0, lag))
                for topic, lag in sorted(topics.items())
            ]
        if stats.outbox_backlog is not None:
            backlog[status.name] = stats.outbox_backlog
        if stats.schema_bytes is not None:
            sizes[status.name] = stats.schema_bytes
        messages = stats.messages or messages
        if stats.events_per_minute is not None:
            events = stats.events_per_minute
    return SystemView(
        generated_at=datetime.now(UTC),
        services=[status for status, _ in results],
        consumer_lag=lags,
        outbox_backlog=backlog,
        database=DatabaseSize(schemas=sizes, total_bytes=sum(sizes.values())),
        messages=messages,
        tracking_events_per_minute=events,
    )


async def usage_report(
    client: httpx.AsyncClient,
    campaign_url: str,
    headers: dict[str, str],
    *,
    start: date,
    end: date,
) -> UsageReport:
    """Recipients sent per account per day, top senders and quota use, from the campaign service."""
    try:
        response = await _get(
            client,
            f"{campaign_url}/internal/usage",
            params={"from": start.isoformat(), "to": end.isoformat()},
            headers=headers,
            timeout=_TIMEOUT * 3,
        )
    except httpx.TimeoutException:
        raise ApiError(
            504, "upstream_timeout", "the campaign service did not answer in time"
        ) from None
    except httpx.HTTPError:
        raise ApiError(503, "service_unavailable", "the campaign service is unavailable") from None
    if response.status_code in (404, 405):
        raise ApiError(503, "usage_unavailable", "the campaign service does not report usage (yet)")
    if response.status_code != 200:
        raise ApiError(503, "service_unavailable", "the campaign service could not report usage")
    try:
        usage = CampaignUsage.model_validate_json(response.content)
    except ValidationError:
        raise ApiError(
            503, "usage_unavailable", "the campaign service's usage report is unreadable"
        ) from None
    totals: dict[Any, tuple[int, int]] = {}
    for day in usage.days:
        sent, failed = totals.get(day.account_id, (0, 0))
        totals[day.account_id] = (sent + day.sent, failed + day.failed)
    top = sorted(totals.items(), key=lambda item: (-item[1][0], str(item[0])))[:TOP_SENDERS]
    return UsageReport(
        from_=start,
        to=end,
        days=sorted(usage.days, key=lambda d: (d.day, str(d.account_id))),
        top_senders=[TopSender(account_id=a, sent=s, failed=f) for a, (s, f) in top],
        quotas=[
            QuotaUse(
                account_id=q.account_id,
                daily_send_quota=q.daily_send_quota,
                used_today=q.used_today,
                used_ratio=(
                    round(q.used_today / q.daily_send_quota, 4) if q.daily_send_quota else None
                ),
            )
            for q in sorted(usage.quotas, key=lambda q: -q.used_today)
        ],
    )
