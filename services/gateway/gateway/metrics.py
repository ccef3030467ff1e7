"""The gateway's Prometheus metrics, declared once."""

from prometheus_client import Counter, Histogram

UPSTREAM_REQUESTS = Counter(
    "herald_gateway_upstream_requests_total",
    "Requests forwarded to a service, by outcome (answered, retried, unavailable, timeout)",
    ["service", "outcome"],
)
UPSTREAM_LATENCY = Histogram(
    "herald_gateway_upstream_seconds",
    "Time until a service's answer starts",
    ["service"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
REJECTED = Counter(
    "herald_gateway_rejected_total",
    "Requests the gateway answered itself with an error, by reason",
    ["reason"],
)
CACHE = Counter(
    "herald_gateway_cache_total", "Cached reads, by result (hit, miss, not_modified)", ["result"]
)
