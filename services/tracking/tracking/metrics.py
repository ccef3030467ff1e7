"""Prometheus metrics of the tracking service, declared once."""

from prometheus_client import Counter, Gauge, Histogram

REJECTED_TOKENS = Counter(
    "herald_tracking_rejected_tokens_total",
    "Pixel and click requests with a forged, altered or misused token (answered 404)",
    ["kind"],
)
BUFFERED = Gauge("herald_tracking_buffer_events", "Opens and clicks answered but not yet written")
DROPPED = Counter(
    "herald_tracking_events_dropped_total",
    "Opens and clicks answered but never written: the buffer stayed full (buffer_full), or the"
    " database was unreachable through a shutdown (shutdown)",
    ["kind", "reason"],
)
RECORDED = Counter(
    "herald_tracking_activity_total",
    "Opens and clicks written, by who made them (human, or the machine rule that caught it)",
    ["kind", "by"],
)
FLUSH_SECONDS = Histogram(
    "herald_tracking_flush_seconds",
    "Time of one flush transaction (opens, clicks and queued roll-up changes)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
FLUSH_FAILURES = Counter(
    "herald_tracking_flush_failures_total", "Flush transactions that failed (retried)"
)
WEBHOOK_EVENTS = Counter(
    "herald_tracking_webhook_events_total",
    "Provider notifications by provider and outcome (matched, unmatched, duplicate)",
    ["provider", "outcome"],
)
WEBHOOK_REJECTED = Counter(
    "herald_tracking_webhook_rejected_total",
    "Webhook calls refused (bad signature, unknown topic, malformed)",
    ["provider", "reason"],
)
SKIPPED = Counter(
    "herald_tracking_events_skipped_total",
    "Consumed events that could not be attributed to a message of their account",
    ["type", "reason"],
)
