"""The overview's numbers, computed from the event store."""

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from core.config import Settings
from core.store import ContractEnvelope, Enrollment, Event, FlowRun, Step, as_utc, session

# The sources flows/dispatch.py routes to lead capture (a test keeps the two in step).
LEAD_SOURCES = ("typeform", "form", "browser_form", "facebook")
# Stored leads; "ignored" ones (another form, no address) are not leads of the team.
LEAD_STATUSES = ("queued", "running", "succeeded", "failed")
CHART_DAYS = 14
ASSIGNMENT_DAYS = 30


@dataclass(frozen=True)
class Window:
    """Day boundaries in the dashboard's time zone, as UTC moments."""

    zone: ZoneInfo
    today: date
    now: datetime

    def start(self, day: date) -> datetime:
        """Local midnight of a day, in UTC (SQLite compares the stored UTC text)."""
        return datetime.combine(day, time(0), self.zone).astimezone(UTC)

    def local_day(self, moment: datetime) -> date:
        """The local date of a stored moment."""
        return as_utc(moment).astimezone(self.zone).date()

    @property
    def week_start(self) -> date:
        """Monday of this week."""
        return self.today - timedelta(days=self.today.weekday())


def window(current: Settings, now: datetime) -> Window:
    """Today and this week where the team works."""
    zone = ZoneInfo(current.dashboard.timezone)
    return Window(zone=zone, today=now.astimezone(zone).date(), now=now)


@dataclass
class SourceCounts:
    """Leads of one source today, this week and in the last 30 days."""

    source: str
    today: int = 0
    week: int = 0
    month: int = 0


def lead_counts(span: Window) -> list[SourceCounts]:
    """Leads per source; the first row is every source together."""
    since = min(span.start(span.today - timedelta(days=29)), span.start(span.week_start))
    with session() as db:
        rows = db.execute(
            select(Event.source, Event.received_at).where(
                Event.source.in_(LEAD_SOURCES),
                Event.status.in_(LEAD_STATUSES),
                Event.received_at >= since,
            )
        ).all()
    total = SourceCounts("all sources")
    by_source: dict[str, SourceCounts] = {}
    for source, received in rows:
        day = span.local_day(received)
        for counts in (total, by_source.setdefault(source, SourceCounts(source))):
            counts.today += day == span.today
            counts.week += day >= span.week_start
            counts.month += day > span.today - timedelta(days=30)
    return [total, *sorted(by_source.values(), key=lambda c: -c.month)]


def _first_outputs(step_name: str, since: datetime) -> list[tuple[datetime, dict[str, Any]]]:
    """(event received, output) of a succeeded step, once per run (replays repeat steps)."""
    with session() as db:
        rows = db.execute(
            select(Step.run_id, Event.received_at, Step.output)
            .join(FlowRun, Step.run_id == FlowRun.id)
            .join(Event, FlowRun.event_id == Event.id)
            .where(Step.name == step_name, Step.status == "succeeded", Event.received_at >= since)
            .order_by(Step.id)
        ).all()
    first: dict[int, tuple[datetime, dict[str, Any]]] = {}
    for run_id, received, output in rows:
        first.setdefault(run_id, (received, output or {}))
    return list(first.values())


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile: a value that was measured, even for a handful of leads."""
    ordered = sorted(values)
    return ordered[max(math.ceil(share * len(ordered)) - 1, 0)]


@dataclass(frozen=True)
class SpeedDay:
    """Speed to lead of one day's leads, in seconds."""

    day: date
    leads: int
    median_s: float | None
    p90_s: float | None


def speed_to_lead(span: Window, days: int = CHART_DAYS) -> list[SpeedDay]:
    """Median and 90th percentile of webhook-to-welcome time per day, oldest day first."""
    first_day = span.today - timedelta(days=days - 1)
    per_day: dict[date, list[float]] = {}
    for received, output in _first_outputs("send_welcome_email", span.start(first_day)):
        # A welcome recovered after a crash has no measurement of its own.
        if isinstance(output.get("speed_to_lead_ms"), int | float):
            per_day.setdefault(span.local_day(received), []).append(output["speed_to_lead_ms"])
    result = []
    for offset in range(days):
        day = first_day + timedelta(days=offset)
        values = [ms / 1000 for ms in per_day.get(day, [])]
        median = statistics.median(values) if values else None
        result.append(
            SpeedDay(day, len(values), median, percentile(values, 0.9) if values else None)
        )
    return result


@dataclass
class RepShare:
    """The leads one rep was given, and how."""

    rep: str
    name: str
    leads: int = 0
    strategies: Counter[str] = field(default_factory=Counter)
    rules: Counter[str] = field(default_factory=Counter)


def assignments(span: Window, current: Settings) -> list[RepShare]:
    """Leads per rep over the last 30 days, with the strategy and rule that chose them."""
    names = {rep.key: rep.name for rep in current.reps}
    by_user = {rep.pipedrive_user_id: rep.key for rep in current.reps}
    since = span.start(span.today - timedelta(days=ASSIGNMENT_DAYS - 1))
    shares: dict[str, RepShare] = {}
    for _received, output in _first_outputs("assign_owner", since):
        # An existing person keeps their owner: the output has the owner, not a rep id.
        key = output.get("rep") or by_user.get(output.get("owner_id")) or "outside the rotation"
        share = shares.setdefault(key, RepShare(key, names.get(key, key)))
        share.leads += 1
        share.strategies[output.get("strategy") or "unknown"] += 1
        if output.get("rule"):
            share.rules[output["rule"]] += 1
    return sorted(shares.values(), key=lambda s: -s.leads)


@dataclass(frozen=True)
class SequenceCounts:
    """Enrollments by status and the reasons the stopped ones stopped."""

    statuses: dict[str, int]
    stop_reasons: list[tuple[str, int]]


def sequences(current: Settings) -> SequenceCounts | None:
    """Sequence enrollments, or None while no sequence is configured or stored."""
    try:
        with session() as db:
            statuses = dict(
                db.execute(
                    select(Enrollment.status, func.count()).group_by(Enrollment.status)
                ).all()
            )
            reasons = db.execute(
                select(Enrollment.stop_reason, func.count())
                .where(Enrollment.status == "stopped")
                .group_by(Enrollment.stop_reason)
                .order_by(func.count().desc())
            ).all()
    except SQLAlchemyError:
        # A database the sequences migration has not reached yet.
        return None
    if not statuses and not current.sequences:
        return None
    return SequenceCounts(statuses, [(reason or "no reason", count) for reason, count in reasons])


@dataclass(frozen=True)
class ContractCounts:
    """Envelopes sent, signed and declined, and how long clients take to sign."""

    sent: int
    signed: int
    declined: int
    voided: int
    median_hours_to_sign: float | None


def contracts(current: Settings) -> ContractCounts | None:
    """Contract envelopes from the store, or None while contracts are not configured."""
    with session() as db:
        rows = db.execute(
            select(
                ContractEnvelope.status,
                ContractEnvelope.sent_at,
                ContractEnvelope.status_changed_at,
            )
        ).all()
    if not rows and current.contracts is None:
        return None
    sent_states = {"sent", "delivered", "completed", "declined", "voided"}
    waits = [
        (as_utc(changed) - as_utc(sent)).total_seconds() / 3600
        for status, sent, changed in rows
        if status == "completed" and sent is not None and changed is not None
    ]
    return ContractCounts(
        sent=sum(1 for status, _, _ in rows if status in sent_states),
        signed=sum(1 for status, _, _ in rows if status == "completed"),
        declined=sum(1 for status, _, _ in rows if status == "declined"),
        voided=sum(1 for status, _, _ in rows if status == "voided"),
        median_hours_to_sign=percentile(waits, 0.5) if waits else None,
    )
