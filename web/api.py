"""GET /api/events and /api/events/ID: the run history, personal data masked."""

import hmac
import os
from typing import Any

from flask import Blueprint, abort, jsonify, request
from flask.typing import ResponseReturnValue
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from core.masking import mask_lead
from core.store import Event, FlowRun, session

api = Blueprint("api", __name__, url_prefix="/api")

PAGE_SIZE = 50


@api.before_request
def require_admin_token() -> None:
    """Bearer ADMIN_TOKEN on every call; no token configured means no access."""
    expected = os.environ.get("ADMIN_TOKEN", "")
    given = request.headers.get("Authorization", "")
    if not expected:
        abort(403, "The run-history API is off: set ADMIN_TOKEN to turn it on.")
    if not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
        abort(401, "Send Authorization: Bearer <ADMIN_TOKEN>.")


def _time(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _event_summary(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "source": event.source,
        "type": event.type,
        "status": event.status,
        "reason": event.reason,
        "deliveries": event.deliveries,
        "received_at": _time(event.received_at),
        "updated_at": _time(event.updated_at),
    }


def _run(run: FlowRun) -> dict[str, Any]:
    return {
        "flow": run.flow,
        "status": run.status,
        "attempts": run.attempts,
        "error": run.error,
        "started_at": _time(run.started_at),
        "finished_at": _time(run.finished_at),
        "steps": [
            {
                "name": step.name,
                "attempt": step.attempt,
                "status": step.status,
                "started_at": _time(step.started_at),
                "finished_at": _time(step.finished_at),
                "error": step.error,
                "output": step.output,
            }
            for step in run.steps
        ],
    }


@api.get("/events")
def list_events() -> ResponseReturnValue:
    """The newest events first; filter with ?source= and ?status=."""
    query = select(Event).order_by(Event.received_at.desc()).limit(PAGE_SIZE)
    for name in ("source", "status"):
        if request.args.get(name):
            query = query.where(getattr(Event, name) == request.args[name])
    with session() as db:
        events = db.scalars(query).all()
        return jsonify(events=[_event_summary(event) for event in events])


@api.get("/events/<event_id>")
def get_event(event_id: str) -> ResponseReturnValue:
    """One event with its runs and steps; the lead's personal data masked."""
    with session() as db:
        event = db.scalar(
            select(Event)
            .where(Event.id == event_id)
            .options(selectinload(Event.runs).selectinload(FlowRun.steps))
        )
        if event is None:
            abort(404, f"There is no event {event_id}.")
        body = _event_summary(event)
        data = dict(event.data or {})
        if isinstance(data.get("lead"), dict):
            data["lead"] = mask_lead(data["lead"])
        body["data"] = data
        body["runs"] = [_run(run) for run in event.runs]
        return jsonify(body)
