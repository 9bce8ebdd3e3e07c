"""Prometheus series; speed to lead is counted in Redis, so every worker's leads show."""

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import redis
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from rq.job import Job
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from core import queue
from core.store import FlowRun, session

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


@dataclass(frozen=True)
class QueueStats:
    """The flows queue at one moment: jobs per state and the oldest waiting job's age."""

    queued: int
    scheduled: int
    started: int
    failed: int
    deferred: int
    oldest_queued_age_s: float | None


def queue_stats() -> QueueStats:
    """Read the flows queue's depth and registries from Redis (raises RedisError)."""
    flows = queue.queue()
    oldest: float | None = None
    first = flows.get_job_ids(0, 0)
    job = Job.fetch(first[0], connection=flows.connection) if first else None
    if job is not None and job.enqueued_at is not None:
        enqueued = job.enqueued_at
        enqueued = enqueued if enqueued.tzinfo else enqueued.replace(tzinfo=UTC)
        oldest = max((datetime.now(UTC) - enqueued).total_seconds(), 0.0)
    return QueueStats(
        queued=flows.count,
        scheduled=flows.scheduled_job_registry.count,
        started=flows.started_job_registry.count,
        failed=flows.failed_job_registry.count,
        deferred=flows.deferred_job_registry.count,
        oldest_queued_age_s=oldest,
    )


def failed_runs() -> int:
    """Flow runs that ended failed and wait for a fix and a replay."""
    with session() as db:
        return db.scalar(select(func.count()).where(FlowRun.status == "failed")) or 0


class QueueCollector(Collector):
    """Queue depth, oldest waiting job and failed runs, read at scrape time."""

    def collect(self) -> Iterator[Metric]:
        """Gauges from Redis and the store; a source that does not answer is left out."""
        try:
            stats = queue_stats()
        except (redis.RedisError, RuntimeError) as exc:
            logger.warning("queue gauges not read error=%s", exc.__class__.__name__)
        else:
            yield from _queue_gauges(stats)
        try:
            count = failed_runs()
        except SQLAlchemyError as exc:
            logger.warning("failed runs not counted error=%s", exc.__class__.__name__)
        else:
            yield GaugeMetricFamily(
                "salesflow_failed_runs", "Flow runs that ended failed (replayable).", value=count
            )


def _queue_gauges(stats: QueueStats) -> Iterator[Metric]:
    depth = GaugeMetricFamily(
        "salesflow_queue_depth", "Jobs waiting in the queue.", labels=["queue"]
    )
    depth.add_metric([queue.QUEUE_NAME], stats.queued)
    yield depth
    jobs = GaugeMetricFamily(
        "salesflow_queue_jobs",
        "Jobs in each of the queue's registries.",
        labels=["queue", "state"],
    )
    for state in ("scheduled", "started", "failed", "deferred"):
        jobs.add_metric([queue.QUEUE_NAME, state], getattr(stats, state))
    yield jobs
    oldest = GaugeMetricFamily(
        "salesflow_queue_oldest_job_age_seconds",
        "Age of the oldest job waiting in the queue; 0 when none waits.",
        labels=["queue"],
    )
    oldest.add_metric([queue.QUEUE_NAME], stats.oldest_queued_age_s or 0.0)
    yield oldest


REGISTRY.register(SpeedToLeadCollector())
REGISTRY.register(QueueCollector())
