"""Find work that is stored but not queued or whose worker died, and queue it again."""

import logging
from datetime import timedelta

import redis
from sqlalchemy import or_, select

from core import queue
from core.store import Event, session, utcnow

logger = logging.getLogger(__name__)

# The receiver stores, then enqueues: give it this long before calling an event stranded.
ENQUEUE_GRACE = timedelta(seconds=10)
# A run that has not moved for a job timeout and a minute lost its worker; with the sweep
# every 30 s it runs again within twice the job timeout. RQ's own clean-up of abandoned
# jobs usually retries it sooner.
RUNNING_GRACE = timedelta(seconds=queue.JOB_TIMEOUT_S + 60)
SWEEP_LOCK = "salesflow:sweep"


def stranded_event_ids(limit: int = 500) -> list[str]:
    """Events queued or running whose job may be gone, oldest first."""
    now = utcnow()
    with session() as db:
        rows = db.scalars(
            select(Event.id)
            .where(
                or_(
                    (Event.status == "queued") & (Event.received_at < now - ENQUEUE_GRACE),
                    (Event.status == "running") & (Event.updated_at < now - RUNNING_GRACE),
                )
            )
            .order_by(Event.received_at)
            .limit(limit)
        )
        return list(rows)


def requeue_stranded() -> int:
    """Queue again every stranded event whose job is not waiting or running; returns a count."""
    try:
        lock = queue.connection().lock(SWEEP_LOCK, timeout=120, blocking=False)
        if not lock.acquire():
            return 0
    except redis.RedisError as exc:
        logger.warning("sweep skipped: redis unavailable error=%s", exc.__class__.__name__)
        return 0

    requeued = 0
    try:
        for event_id in stranded_event_ids():
            if queue.requeue_event(event_id):
                requeued += 1
                logger.info("requeued stranded event event_id=%s", event_id)
    except redis.RedisError as exc:
        logger.warning("sweep stopped: redis unavailable error=%s", exc.__class__.__name__)
    finally:
        try:
            lock.release()
        except redis.RedisError:
            pass
    return requeued
