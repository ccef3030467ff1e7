"""Prometheus metrics of the scheduler service, declared once."""

from prometheus_client import Counter, Gauge, Histogram

TIMERS_FIRED = Counter("herald_scheduler_timers_fired_total", "Timers that fired")
TIMER_LATENESS = Histogram(
    "herald_scheduler_timer_lateness_seconds",
    "How long after its send_at a timer fired",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 15, 60, 300),
)
TIMERS_PENDING = Gauge("herald_scheduler_timers_pending", "Timers waiting for their time")
FANOUTS = Counter("herald_scheduler_fanouts_total", "Fan-outs finished, by outcome", ["outcome"])
RECIPIENTS_QUEUED = Counter(
    "herald_scheduler_recipients_total", "Recipients handed out in delivery batches"
)
BATCHES_QUEUED = Counter("herald_scheduler_batches_total", "Delivery batches written")
FANOUT_SECONDS = Histogram(
    "herald_scheduler_fanout_seconds",
    "Time from a fan-out's start to its end",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
)
CONTACTS_ERRORS = Counter(
    "herald_scheduler_contacts_errors_total", "Failed calls to the contacts service", ["kind"]
)
