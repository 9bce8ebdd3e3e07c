"""Replay: queue failed events again; their side effects stay single through once()."""

import logging
from datetime import datetime

from sqlalchemy import select

from core import queue
from core.store import Event, session

logger = logging.getLogger(__name__)

REPLAYABLE = {"failed"}


def replay(event_id: str, *, force: bool = False) -> str:
    """Queue one event again; returns what happened ("queued", "not found", "skipped: ...")."""
    with session() as db:
        event = db.get(Event, event_id)
        if event is None:
            return "not found"
        if event.status not in REPLAYABLE and not force:
            return f"skipped: the event is {event.status}"
        event.status, event.reason = "queued", None

    # requeue_event drops a failed job left in Redis so the unique enqueue can take place.
    if not queue.requeue_event(event_id):
        return "skipped: a job for it is already waiting or running"
    logger.info("event replayed event_id=%s", event_id)
    return "queued"


def failed_event_ids(since: datetime | None = None, limit: int = 1000) -> list[str]:
    """Failed events, oldest first, received at or after `since`."""
    query = select(Event.id).where(Event.status == "failed").order_by(Event.received_at)
    if since is not None:
        query = query.where(Event.received_at >= since)
    with session() as db:
        return list(db.scalars(query.limit(limit)))
