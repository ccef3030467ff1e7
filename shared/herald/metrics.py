"""Prometheus metrics every service exposes, declared once, and the HTTP middleware behind them."""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

# `_created` series double the exposition for no dashboard we draw.
disable_created_metrics()  # type: ignore[no-untyped-call]

HTTP_REQUESTS = Counter(
    "herald_http_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "herald_http_request_duration_seconds",
    "Time to answer an HTTP request",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
EVENTS_PUBLISHED = Counter(
    "herald_events_published_total", "Events the outbox relay published", ["topic"]
)
EVENTS_CONSUMED = Counter(
    "herald_events_consumed_total",
    "Events consumed, by outcome (processed, duplicate, ignored, dead_lettered)",
    ["topic", "outcome"],
)
EVENT_HANDLING = Histogram(
    "herald_event_batch_seconds", "Time to process one consumed batch", ["topic"]
)
CONSUMER_LAG = Gauge(
    "herald_consumer_lag", "Messages not yet consumed", ["group", "topic", "partition"]
)
OUTBOX_BACKLOG = Gauge("herald_outbox_backlog", "Events written but not yet published")
OUTBOX_REPUBLISHED = Counter(
    "herald_outbox_republished_total",
    "Published events queued again because the broker lost them",
)
CONSUMER_RESETS = Counter(
    "herald_consumer_resets_total",
    "Partitions read again from the beginning because the broker lost their log or the group",
    ["group", "topic"],
)
SERVICE_INFO = Gauge("herald_service_info", "Service identity (always 1)", ["service", "version"])


def metrics_response() -> Response:
    """The Prometheus exposition of this process's registry."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


class MetricsMiddleware:
    """Counts and times every request by route template (not raw path: keeps labels few)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: dict[str, object]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])  # type: ignore[call-overload]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)  # type: ignore[arg-type]
        finally:
            route = _route_template(scope)
            method = scope["method"]
            HTTP_REQUESTS.labels(method, route, str(status)).inc()
            HTTP_LATENCY.labels(method, route).observe(time.perf_counter() - started)


def _route_template(scope: Scope) -> str:
    # The router leaves the matched route in the scope; unmatched paths share one label.
    route = scope.get("route")
    return str(getattr(route, "path", "unmatched"))
