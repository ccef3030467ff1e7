"""Prometheus metrics of the dispatcher service, declared once."""

from prometheus_client import Counter, Gauge, Histogram

RECIPIENTS_QUEUED = Counter(
    "herald_dispatcher_recipients_queued_total", "Recipients queued from delivery batches"
)
MESSAGES = Counter(
    "herald_dispatcher_messages_total",
    "Delivery attempts by outcome (sent, deferred, failed)",
    ["outcome"],
)
BOUNCES = Counter("herald_dispatcher_bounces_total", "Hard bounces the relay reported")
RECOVERED = Counter(
    "herald_dispatcher_recovered_total",
    "Messages of dead dispatcher processes taken over, by what became of them",
    ["result"],
)
RELAY_ERRORS = Counter(
    "herald_dispatcher_relay_errors_total",
    "Connections to the relay that failed, by where",
    ["stage"],
)
SMTP_SECONDS = Histogram(
    "herald_dispatcher_smtp_seconds",
    "Time of one SMTP transaction, MAIL FROM to the final reply",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60),
)
BUILD_SECONDS = Histogram(
    "herald_dispatcher_build_seconds",
    "Time to render and encode one message",
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
)
QUEUE_DEPTH = Gauge("herald_dispatcher_queue_depth", "Claimed messages waiting in memory")
BACKLOG = Gauge("herald_dispatcher_backlog", "Messages waiting in the database to be sent")
CONNECTIONS = Gauge("herald_dispatcher_smtp_connections", "Open connections to the relay")
