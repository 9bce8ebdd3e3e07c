"""Who gets a new lead: rules, pools, round-robin and weighted turns, hours, days off, caps."""

import functools
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import phonenumbers
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from connectors.errors import FlowAbort
from core.config import Condition, Pool, Rep, Settings
from core.leads import LeadEvent
from core.store import Counter, session


@dataclass(frozen=True)
class Choice:
    """The rep chosen, and why: shown in the run history."""

    rep: Rep
    rule: str | None
    pool: str | None
    strategy: str
    note: str | None = None

    def as_output(self) -> dict[str, Any]:
        """The step output recorded for the assignment."""
        return {
            "owner_id": self.rep.pipedrive_user_id,
            "rep": self.rep.key,
            "rule": self.rule,
            "pool": self.pool,
            "strategy": self.strategy,
            "note": self.note,
        }


def advance(name: str) -> int:
    """Add one to a named counter atomically and return the new value (from 1)."""
    with session() as db:
        # UPDATE ... RETURNING is a single atomic statement on SQLite and PostgreSQL, so
        # two workers can never read the same position.
        value = db.scalar(
            update(Counter)
            .where(Counter.name == name)
            .values(value=Counter.value + 1)
            .returning(Counter.value)
        )
    if value is not None:
        return value
    try:
        with session() as db:
            db.add(Counter(name=name, value=1))
        return 1
    except IntegrityError:
        # Another worker created it first; take the next position after theirs.
        return advance(name)


@functools.cache
def weighted_schedule(weights: tuple[tuple[str, int], ...]) -> tuple[str, ...]:
    """One window of turns in which each rep appears exactly `weight` times, spread evenly."""
    # Smooth weighted round-robin: every turn each rep gains its weight, the richest rep
    # takes the turn and pays back the total. A 2:1:1 split gives a, b, a, c.
    total = sum(weight for _, weight in weights)
    credit = dict.fromkeys((key for key, _ in weights), 0)
    turns = []
    for _ in range(total):
        for key, weight in weights:
            credit[key] += weight
        chosen = max(credit, key=lambda key: credit[key])
        credit[chosen] -= total
        turns.append(chosen)
    return tuple(turns)


def is_available(rep: Rep, moment: datetime) -> bool:
    """Whether the rep works at this moment in their own time zone."""
    local = moment.astimezone(ZoneInfo(rep.timezone))
    if local.date() in rep.days_off:
        return False
    window = rep.hours_on(local.weekday())
    return window is not None and window[0] <= local.time().replace(tzinfo=None) <= window[1]


def lookup(path: str, event: LeadEvent) -> Any:
    """A value of the lead event by path: source, form_id, country, answers.X, hidden.X..."""
    lead = event.lead
    head, _, rest = path.partition(".")
    if head in ("answers", "hidden") and rest:
        return getattr(lead, head).get(rest)
    if path in ("source", "form_id", "lead_source"):
        return getattr(event, path)
    if path == "country" and not lead.country and lead.phone:
        # The phone's country when the lead did not say.
        return phonenumbers.region_code_for_number(phonenumbers.parse(lead.phone))
    return getattr(lead, path, None)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def matches(condition: Condition, event: LeadEvent) -> bool:
    """Whether one rule condition holds for the lead."""
    value = lookup(condition.field, event)
    if value is None:
        return False
    text = str(value).casefold()
    if condition.equals is not None and text != str(condition.equals).casefold():
        return False
    if condition.any_of is not None and text not in {str(v).casefold() for v in condition.any_of}:
        return False
    if condition.contains is not None and condition.contains.casefold() not in text:
        return False
    number = _number(value)
    if condition.gte is not None and (number is None or number < condition.gte):
        return False
    if condition.lte is not None and (number is None or number > condition.lte):
        return False
    return True


class Assigner:
    """Chooses reps for leads with the settings, Pipedrive's active users and a clock."""

    def __init__(self, settings: Settings, active_user_ids: set[int], moment: datetime) -> None:
        self._settings = settings
        self._active = active_user_ids
        self._moment = moment

    def choose(self, event: LeadEvent) -> Choice:
        """The rep for a new lead: the first matching rule's rep or pool, else the default."""
        pools = self._settings.pools()
        for rule in self._settings.assignment.rules:
            if not all(matches(condition, event) for condition in rule.when):
                continue
            if rule.rep is not None:
                rep = self._settings.rep(rule.rep)
                if self._can_take(rep):
                    return Choice(rep, rule.name, None, "rule")
                return self._fallback(rule.name, None, f"{rep.key} is not available")
            return self._from_pool(rule.pool, pools[rule.pool], rule.name)

        name = self._settings.assignment.default_pool
        return self._from_pool(name, pools[name], None)

    def _works_now(self, rep: Rep) -> bool:
        return rep.pipedrive_user_id in self._active and is_available(rep, self._moment)

    def _can_take(self, rep: Rep) -> bool:
        return self._works_now(rep) and self._under_cap(rep)

    def _under_cap(self, rep: Rep) -> bool:
        if rep.daily_cap is None:
            return True
        # The cap counts leads per day in the rep's own calendar.
        day = self._moment.astimezone(ZoneInfo(rep.timezone)).date().isoformat()
        return advance(f"cap:{rep.key}:{day}") <= rep.daily_cap

    def _from_pool(self, name: str, pool: Pool, rule: str | None) -> Choice:
        # The turns are dealt among the reps who work right now, so the split stays exact
        # for them; a rep who is off does not make the next one take two turns.
        weights = {
            k: w for k, w in pool.weights().items() if self._works_now(self._settings.rep(k))
        }
        if not weights:
            return self._fallback(rule, name, f"nobody in pool {name} is working now")
        turns = weighted_schedule(tuple(weights.items()))
        position = advance(f"turn:{name}") - 1
        for offset in range(len(turns)):
            rep = self._settings.rep(turns[(position + offset) % len(turns)])
            if self._under_cap(rep):
                note = None if offset == 0 else "earlier turns had reached their daily cap"
                return Choice(rep, rule, name, pool.strategy, note)
        return self._fallback(rule, name, f"everyone in pool {name} reached their daily cap")

    def _fallback(self, rule: str | None, pool: str | None, why: str) -> Choice:
        fallback = self._settings.assignment.fallback_owner
        if fallback is None:
            raise FlowAbort(f"{why} and assignment.fallback_owner is not set")
        rep = self._settings.rep(fallback)
        if rep.pipedrive_user_id not in self._active:
            raise FlowAbort(f"{why} and the fallback owner {fallback} is not an active user")
        return Choice(rep, rule, pool, "fallback", why)
