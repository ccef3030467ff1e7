"""Prometheus metrics of the campaign service, declared once."""

from prometheus_client import Counter, Gauge

EMAILS_COMPOSED = Counter("herald_campaign_emails_composed_total", "Drafts composed")
EMAILS_QUEUED = Counter(
    "herald_campaign_emails_queued_total",
    "Emails handed to the scheduler, by kind and how (send, schedule, request, test)",
    ["kind", "via"],
)
EMAILS_FINISHED = Counter(
    "herald_campaign_emails_finished_total", "Emails that reached a final status", ["status"]
)
RECIPIENT_OUTCOMES = Counter(
    "herald_campaign_recipient_outcomes_total",
    "Final delivery outcomes rolled up from email.dispatched",
    ["status"],
)
REQUESTS = Counter(
    "herald_campaign_send_requests_total",
    "Send requests read from email.requests, by outcome (accepted, rejected)",
    ["outcome"],
)
QUOTA_REFUSALS = Counter(
    "herald_campaign_quota_refusals_total", "Emails refused for the daily send quota"
)
EMAILS_BY_STATUS = Gauge(
    "herald_campaign_emails",
    "Emails in each status now, over all accounts (refreshed every few seconds)",
    # Every replica counts the same table: dashboards take `max`, never `sum`, over replicas.
    ["status"],
)
