"""The overview: leads, speed to lead, assignment, the funnel, sequences, contracts."""

from typing import Any

from flask import redirect, render_template, url_for
from flask.typing import ResponseReturnValue

from core.config import settings
from core.store import utcnow
from dashboard import funnel, stats
from dashboard.blueprint import bp


@bp.get("/")
def index() -> ResponseReturnValue:
    """/dashboard/ opens the overview."""
    return redirect(url_for("dashboard.overview"))


def _chart(days: list[stats.SpeedDay]) -> dict[str, Any]:
    """The speed-to-lead chart's data, read by overview.js from a JSON script element."""
    return {
        "labels": [day.day.isoformat() for day in days],
        "median": [day.median_s for day in days],
        "p90": [day.p90_s for day in days],
        "leads": [day.leads for day in days],
    }


@bp.get("/overview")
def overview() -> ResponseReturnValue:
    """The numbers that decide sales, from the event store."""
    current = settings()
    span = stats.window(current, utcnow())
    speed = stats.speed_to_lead(span)
    return render_template(
        "dashboard/overview.html",
        span=span,
        timezone=current.dashboard.timezone,
        leads=stats.lead_counts(span),
        speed=speed,
        chart=_chart(speed),
        reps=stats.assignments(span, current),
        sequences=stats.sequences(current),
        funnel=funnel.funnel(current),
        contracts=stats.contracts(current),
    )
