"""Prometheus series; speed to lead is counted in Redis, so every worker's leads show."""

import logging
from collections.abc import Iterator

import redis
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from core import queue

logger = logging.getLogger(__name__)

WEBHOOKS = Counter(
    "salesflow_webhooks_total",
    "Webhook deliveries answered, by source and outcome.",
    ["source", "status"],
)
ACK_SECONDS = Histogram(
    "salesflow_webhook_ack_seconds",
    "Time from request start to the answer, by source.",
    ["source"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
ENQUEUE_FAILURES = Counter(
    "salesflow_enqueue_failures_total", "Stored events that could not be queued at once."
)

SPEED_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
_SPEED_KEY = "salesflow:metrics:speed_to_lead:"
_SPEED_SOURCES = "salesflow:metrics:speed_to_lead_sources"


def observe_speed_to_lead(source: str, seconds: float) -> None:
    """Count one lead's webhook-to-welcome time in the shared histogram."""
    key = _SPEED_KEY + source
    try:
        pipe = queue.connection().pipeline()
        # Cumulative buckets, as Prometheus exposes them.
        for bound in SPEED_BUCKETS:
            if seconds <= bound:
                pipe.hincrby(key, str(bound), 1)
        pipe.hincrby(key, "+Inf", 1)
        pipe.hincrbyfloat(key, "sum", seconds)
        pipe.sadd(_SPEED_SOURCES, source)
        pipe.execute()
    except redis.RedisError as exc:
        logger.warning(
            "speed to lead not counted source=%s error=%s", source, exc.__class__.__name__
        )


class SpeedToLeadCollector(Collector):
    """Reads the shared histogram at scrape time."""

    def collect(self) -> Iterator[HistogramMetricFamily]:
        """One histogram with the source as a label."""
        family = HistogramMetricFamily(
            "salesflow_speed_to_lead_seconds",
            "Seconds from a lead's webhook to Gmail accepting its welcome email.",
            labels=["source"],
        )
        try:
            connection = queue.connection()
            for source in sorted(s.decode() for s in connection.smembers(_SPEED_SOURCES)):
                counts = {
                    k.decode(): v.decode()
                    for k, v in connection.hgetall(_SPEED_KEY + source).items()
                }
                buckets = [(str(b), float(counts.get(str(b), 0))) for b in SPEED_BUCKETS]
                buckets.append(("+Inf", float(counts.get("+Inf", 0))))
                family.add_metric([source], buckets, float(counts.get("sum", 0)))
        except (redis.RedisError, RuntimeError) as exc:
            logger.warning("speed to lead not read error=%s", exc.__class__.__name__)
        yield family


REGISTRY.register(SpeedToLeadCollector())
