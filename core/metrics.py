"""Prometheus series shared by the web and the workers."""

from prometheus_client import Counter, Histogram

WEBHOOKS = Counter(
    "salesflow_webhooks_total", "Webhook deliveries answered, by source and outcome.",
    ["source", "status"],
)
ACK_SECONDS = Histogram(
    "salesflow_webhook_ack_seconds", "Time from request start to the answer, by source.",
    ["source"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
ENQUEUE_FAILURES = Counter(
    "salesflow_enqueue_failures_total", "Stored events that could not be queued at once."
)
