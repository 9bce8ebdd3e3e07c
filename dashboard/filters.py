"""The events list's filters: source, type, status, dates, and a search by email or deal id."""

from dataclasses import asdict, dataclass
from datetime import date, timedelta
from typing import Any

from sqlalchemy import Select, and_, func, or_, select
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import BadRequest

from core.store import Event, FlowRun, Step
from dashboard.stats import Window

STATUSES = ("queued", "running", "succeeded", "failed", "ignored")


@dataclass(frozen=True)
class EventFilter:
    """What the operator asked for; empty strings mean no filter."""

    source: str = ""
    type: str = ""
    status: str = ""
    since: str = ""
    until: str = ""
    q: str = ""

    @classmethod
    def from_args(cls, args: MultiDict[str, str]) -> "EventFilter":
        """Read the filter from a query string or form; a bad date is a 400 with a sentence."""
        values = {name: args.get(name, "").strip()[:320] for name in cls.__dataclass_fields__}
        for name in ("since", "until"):
            if values[name]:
                _day(name, values[name])
        if values["status"] and values["status"] not in STATUSES:
            raise BadRequest(f"status must be one of {', '.join(STATUSES)}.")
        return cls(**values)

    def as_args(self) -> dict[str, str]:
        """The non-empty filters, for links and hidden form fields."""
        return {name: value for name, value in asdict(self).items() if value}

    def apply(self, query: Select[Any], span: Window) -> Select[Any]:
        """The query narrowed to the matching events."""
        for name in ("source", "type", "status"):
            if getattr(self, name):
                query = query.where(getattr(Event, name) == getattr(self, name))
        if self.since:
            query = query.where(Event.received_at >= span.start(_day("since", self.since)))
        if self.until:
            end = _day("until", self.until) + timedelta(days=1)
            query = query.where(Event.received_at < span.start(end))
        if self.q:
            query = query.where(_search(self.q))
        return query


def _day(name: str, value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"{name} must be a date such as 2026-12-01, not {value!r}.") from None


def _search(text: str) -> Any:
    """An email (exact, case-folded), a Pipedrive deal id, or an event id."""
    if "@" in text:
        # Addresses live inside the event's JSON, kept as the lead typed them.
        return func.lower(Event.data["lead"]["email"].as_string()) == text.casefold()
    if text.isdigit():
        deal_id = int(text)
        created = (
            select(FlowRun.event_id)
            .join(Step, Step.run_id == FlowRun.id)
            .where(Step.name == "create_deal", Step.output["deal_id"].as_integer() == deal_id)
        )
        changed = and_(
            Event.source == "pipedrive",
            Event.data["entity"].as_string() == "deal",
            Event.data["entity_id"].as_integer() == deal_id,
        )
        return or_(Event.id.in_(created), changed)
    return Event.id == text
