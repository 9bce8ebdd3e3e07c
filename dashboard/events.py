"""Events: the filtered list, one event's runs and steps, replay of failed ones."""

import logging

from flask import abort, flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy import func, select
from sqlalchemy.orm import selectinload

from core.config import settings
from core.replay import replay
from core.store import Event, FlowRun, session, utcnow
from dashboard import present
from dashboard.blueprint import bp
from dashboard.filters import STATUSES, EventFilter
from dashboard.stats import Window, window

logger = logging.getLogger(__name__)

PAGE_SIZE = 50
# One click must not queue the whole history: replay in batches of this many.
BULK_LIMIT = 500
REPLAY_MESSAGES = {
    "queued": "The event is queued again; its status changes when a worker takes it.",
    "not found": "There is no such event.",
}


def _span() -> Window:
    return window(settings(), utcnow())


def _choices() -> dict[str, list[str]]:
    with session() as db:
        sources = db.scalars(select(Event.source).distinct().order_by(Event.source)).all()
        types = db.scalars(select(Event.type).distinct().order_by(Event.type)).all()
    return {"sources": list(sources), "types": list(types), "statuses": list(STATUSES)}


@bp.get("/events")
def events() -> ResponseReturnValue:
    """The newest events first, filtered and paged."""
    chosen = EventFilter.from_args(request.args)
    page = max(request.args.get("page", 1, type=int) or 1, 1)
    span = _span()
    with session() as db:
        total = db.scalar(chosen.apply(select(func.count(Event.id)), span)) or 0
        rows = db.scalars(
            chosen.apply(select(Event), span)
            .order_by(Event.received_at.desc(), Event.id)
            .offset((page - 1) * PAGE_SIZE)
            .limit(PAGE_SIZE)
        ).all()
        failed = db.scalar(
            chosen.apply(select(func.count(Event.id)), span).where(Event.status == "failed")
        )
    return render_template(
        "dashboard/events.html",
        events=rows,
        total=total,
        failed=failed or 0,
        page=page,
        pages=max((total + PAGE_SIZE - 1) // PAGE_SIZE, 1),
        chosen=chosen,
        choices=_choices(),
        zone=span.zone,
        present=present,
    )


@bp.get("/events/<event_id>")
def event(event_id: str) -> ResponseReturnValue:
    """One event: its masked data, each run with its steps, attempts, durations, errors."""
    with session() as db:
        found = db.scalar(
            select(Event)
            .where(Event.id == event_id)
            .options(selectinload(Event.runs).selectinload(FlowRun.steps))
        )
    if found is None:
        abort(404, f"There is no event {event_id}.")
    return render_template("dashboard/event.html", event=found, zone=_span().zone, present=present)


@bp.post("/events/<event_id>/replay")
def replay_one(event_id: str) -> ResponseReturnValue:
    """Queue one failed event again."""
    outcome = replay(event_id)
    logger.info("dashboard replay event_id=%s outcome=%s", event_id, outcome)
    flash(REPLAY_MESSAGES.get(outcome, f"Not replayed: {outcome.removeprefix('skipped: ')}."))
    return redirect(url_for("dashboard.event", event_id=event_id))


@bp.post("/events/replay")
def replay_many() -> ResponseReturnValue:
    """Queue again the failed events that match the list's filters."""
    chosen = EventFilter.from_args(request.form)
    query = chosen.apply(select(Event.id), _span()).where(Event.status == "failed")
    with session() as db:
        ids = db.scalars(query.order_by(Event.received_at).limit(BULK_LIMIT)).all()
    queued = sum(replay(event_id) == "queued" for event_id in ids)
    logger.info("dashboard bulk replay matched=%d queued=%d", len(ids), queued)
    more = " (the first ones; replay again for the rest)" if len(ids) == BULK_LIMIT else ""
    flash(f"Queued {queued} of {len(ids)} failed events again{more}.")
    return redirect(url_for("dashboard.events", **chosen.as_args()))
