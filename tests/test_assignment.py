"""Assignment: weighted and round-robin splits, rules, hours across DST, caps, fallback."""

import multiprocessing
import os
from collections import Counter
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.assignment import Assigner, is_available, weighted_schedule
from core.config import Rep, Settings, load_settings
from core.leads import Lead, LeadEvent

ROOT = Path(__file__).resolve().parent.parent
ACTIVE = {21458870, 21458877, 21458878, 21458879}
MONDAY_NOON_UTC = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def make_settings(environment: dict[str, str], **overrides: Any) -> Settings:
    """The repo's config.yaml with parts replaced, validated like the real thing."""
    base = load_settings(ROOT / "config.yaml").model_dump()
    base.update(overrides)
    return Settings.model_validate(base)


def lead_event(**lead: Any) -> LeadEvent:
    answers = lead.pop("answers", {})
    hidden = lead.pop("hidden", {})
    return LeadEvent(
        source="typeform",
        dedup_key="k",
        form_id="Xq7RkP2d",
        lead_source="Typeform",
        lead=Lead(answers=answers, hidden=hidden, **lead),
    )


@given(st.dictionaries(st.sampled_from("abcdefg"), st.integers(1, 9), min_size=1))
def test_weighted_schedule_is_exact_over_each_window(weights: dict[str, int]) -> None:
    turns = weighted_schedule(tuple(weights.items()))
    assert Counter(turns) == weights
    # Spread out: no rep takes more than its share plus one in any prefix.
    total = sum(weights.values())
    for length in range(1, total + 1):
        prefix = Counter(turns[:length])
        for key, weight in weights.items():
            assert prefix[key] <= weight * length / total + 1


def test_two_one_one_interleaves() -> None:
    assert weighted_schedule((("a", 2), ("b", 1), ("c", 1))) == ("a", "b", "c", "a")


def rep(**fields: Any) -> Rep:
    return Rep(name="R", email="r@example.com", pipedrive_user_id=1, **fields)


@pytest.mark.parametrize(
    "moment, expected",
    [
        # Berlin went to summer time on 29 March 2026: 07:30Z is 09:30 there on Monday ...
        (datetime(2026, 3, 30, 7, 30, tzinfo=UTC), True),
        # ... but 08:30 on the Friday before, outside 09:00-17:00.
        (datetime(2026, 3, 27, 7, 30, tzinfo=UTC), False),
        # 16:30Z on Monday 30 March is 18:30 in Berlin: gone home.
        (datetime(2026, 3, 30, 16, 30, tzinfo=UTC), False),
        # Winter again after 25 October: 16:30Z is 17:30, still gone; 15:30Z is 16:30.
        (datetime(2026, 10, 26, 15, 30, tzinfo=UTC), True),
        (datetime(2026, 10, 26, 16, 30, tzinfo=UTC), False),
        # Saturday.
        (datetime(2026, 3, 28, 10, 0, tzinfo=UTC), False),
    ],
)
def test_working_hours_follow_the_reps_zone_across_dst(moment: datetime, expected: bool) -> None:
    berlin = rep(timezone="Europe/Berlin", working_hours={"mon-fri": "09:00-17:00"})
    assert is_available(berlin, moment) is expected


def test_process_time_zone_does_not_matter(monkeypatch) -> None:
    import time

    monkeypatch.setenv("TZ", "Pacific/Auckland")
    time.tzset()
    try:
        new_york = rep(timezone="America/New_York", working_hours={"mon-fri": "09:00-17:00"})
        # 8 March 2026 is DST day in New York: Monday 9 March 13:30Z is 09:30 EDT.
        assert is_available(new_york, datetime(2026, 3, 9, 13, 30, tzinfo=UTC))
        assert not is_available(new_york, datetime(2026, 3, 6, 13, 30, tzinfo=UTC))
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_day_off_is_skipped() -> None:
    off = rep(days_off=[date(2026, 12, 7)])
    assert not is_available(off, MONDAY_NOON_UTC)
    assert is_available(off, datetime(2026, 12, 8, 12, 0, tzinfo=UTC))


def test_round_robin_deals_turns_to_the_reps_working_now(clean, environment) -> None:
    current = make_settings(environment)
    assigner = Assigner(current, ACTIVE - {21458879}, MONDAY_NOON_UTC)
    owners = [assigner.choose(lead_event(email=f"x{i}@e.com")).rep.key for i in range(6)]
    assert owners == ["luka", "mariam"] * 3


def test_rule_sends_large_budgets_to_the_weighted_senior_pool(clean, environment) -> None:
    assigner = Assigner(make_settings(environment), ACTIVE, MONDAY_NOON_UTC)
    choices = [assigner.choose(lead_event(answers={"budget": 25000})) for _ in range(6)]
    assert [c.rep.key for c in choices] == ["luka", "mariam", "luka"] * 2
    assert {(c.rule, c.pool, c.strategy) for c in choices} == {
        ("large budgets go to the senior pool", "senior", "weighted")
    }
    small = assigner.choose(lead_event(answers={"budget": 4500}))
    assert small.rule is None and small.pool == "everyone"


@pytest.mark.parametrize(
    "condition, lead, expected",
    [
        ({"field": "country", "equals": "GE"}, {"phone": "+995599123456"}, True),
        ({"field": "country", "equals": "GE"}, {"phone": "+385912345678"}, False),
        (
            {"field": "hidden.utm_source", "any_of": ["facebook", "ig"]},
            {"hidden": {"utm_source": "Facebook"}},
            True,
        ),
        ({"field": "source", "equals": "typeform"}, {}, True),
        ({"field": "form_id", "equals": "other"}, {}, False),
        ({"field": "answers.budget", "lte": 1000}, {"answers": {"budget": "900"}}, True),
        ({"field": "answers.budget", "gte": 1000}, {"answers": {"budget": "n/a"}}, False),
        (
            {"field": "answers.language", "contains": "ka"},
            {"answers": {"language": "ka-GE"}},
            True,
        ),
    ],
)
def test_rule_conditions(clean, environment, condition, lead, expected) -> None:
    rules = [{"name": "r", "when": [condition], "rep": "mariam"}]
    current = make_settings(
        environment,
        assignment={**load_settings(ROOT / "config.yaml").assignment.model_dump(), "rules": rules},
    )
    choice = Assigner(current, ACTIVE, MONDAY_NOON_UTC).choose(lead_event(**lead))
    assert (choice.rule == "r") is expected


def test_nobody_working_goes_to_the_fallback_owner(clean, environment) -> None:
    reps = [r.model_dump() for r in load_settings(ROOT / "config.yaml").reps]
    for entry in reps[:3]:
        entry["working_hours"] = {"sat-sun": "10:00-12:00"}
    current = make_settings(environment, reps=reps)
    choice = Assigner(current, ACTIVE, MONDAY_NOON_UTC).choose(lead_event())
    assert choice.rep.key == "sales-desk" and choice.strategy == "fallback"
    assert "nobody in pool everyone" in choice.note


def test_daily_cap_passes_the_turn_on(clean, environment) -> None:
    reps = [r.model_dump() for r in load_settings(ROOT / "config.yaml").reps]
    reps[0]["daily_cap"] = 1
    current = make_settings(environment, reps=reps)
    assigner = Assigner(current, ACTIVE - {21458879}, MONDAY_NOON_UTC)
    owners = [assigner.choose(lead_event()).rep.key for _ in range(4)]
    assert owners == ["luka", "mariam", "mariam", "mariam"]


def _assign_many(environ: dict[str, str], assignment: dict[str, Any], count: int) -> list[str]:
    """One worker process: assign `count` large-budget leads through the shared counter."""
    os.environ.update(environ)
    current = make_settings(environ, assignment=assignment)
    assigner = Assigner(current, ACTIVE, MONDAY_NOON_UTC)
    return [assigner.choose(lead_event(answers={"budget": 50000})).rep.key for _ in range(count)]


def test_thousand_leads_by_four_processes_split_exactly(clean, environment) -> None:
    pools = {
        "everyone": {"strategy": "round_robin", "reps": ["luka", "mariam"]},
        "senior": {"strategy": "weighted", "reps": {"luka": 2, "mariam": 1, "davit": 1}},
    }
    assignment = {**load_settings(ROOT / "config.yaml").assignment.model_dump(), "pools": pools}
    # Separate processes, as separate RQ workers are, all turning one counter in the database.
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        results = pool.starmap(_assign_many, [(dict(environment), assignment, 250)] * 4)

    split = Counter(key for result in results for key in result)
    assert split == {"luka": 500, "mariam": 250, "davit": 250}


@given(
    budget=st.one_of(
        st.integers(-(10**6), 10**6), st.floats(allow_nan=False, allow_infinity=False)
    )
)
def test_budget_rule_routes_exactly_at_its_threshold(budget: float) -> None:
    from core.assignment import matches
    from core.config import Condition

    condition = Condition(field="answers.budget", gte=20000)
    event = lead_event(answers={"budget": budget})
    assert matches(condition, event) is (budget >= 20000)
    assert matches(condition, lead_event(answers={"budget": str(budget)})) is (budget >= 20000)
