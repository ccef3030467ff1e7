"""Prometheus metrics of the contacts service, declared once."""

from prometheus_client import Counter, Histogram

SUPPRESSIONS = Counter(
    "herald_contacts_suppressions_total",
    "Addresses newly suppressed, by reason (unsubscribed, bounced, complained, manual)",
    ["reason"],
)
SOFT_BOUNCES = Counter("herald_contacts_soft_bounces_total", "Soft bounces counted")
EVENTS_IGNORED = Counter(
    "herald_contacts_events_ignored_total",
    "Consumed events that named no account, so nothing could be suppressed",
    ["type"],
)
IMPORTS = Counter(
    "herald_contacts_imports_total",
    "CSV imports finished, by outcome (succeeded, failed)",
    ["outcome"],
)
IMPORT_ROWS = Counter(
    "herald_contacts_import_rows_total",
    "Rows of finished imports, by result (created, updated, skipped)",
    ["result"],
)
IMPORT_SECONDS = Histogram(
    "herald_contacts_import_seconds",
    "Time from an import's start to its end",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
EXPORT_ROWS = Counter("herald_contacts_export_rows_total", "Contacts written to CSV exports")
