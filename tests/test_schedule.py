"""Sending windows and delays: wall-clock arithmetic across DST, whatever the process TZ."""

import time
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import pytest

from core import schedule
from core.config import SendingWindow, Sequence, parse_delay

BERLIN, NEW_YORK = "Europe/Berlin", "America/New_York"


@pytest.fixture(autouse=True, params=["Asia/Tokyo", "Pacific/Chatham"])
def process_zone(request, monkeypatch):
    """Run every test with the process in a zone far from the ones the windows use."""
    monkeypatch.setenv("TZ", request.param)
    time.tzset()
    yield request.param
    monkeypatch.undo()
    time.tzset()


def window(zone: str, holidays: tuple[date, ...] = ()) -> schedule.Window:
    config = SendingWindow(hours={"mon-fri": "09:00-17:00"}, holidays=list(holidays))
    return schedule.Window.from_config(config, zone)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_a_week_after_berlins_spring_change_monday_nine_is_seven_utc(process_zone) -> None:
    assert time.tzname[0] != "CET"  # the process really is elsewhere
    # Monday 23 March 2026, 09:00 CET is 08:00Z; CEST starts on Sunday 29 March.
    sent = utc(2026, 3, 23, 8, 0)
    due = schedule.due_at(sent, "1 week", window(BERLIN))
    assert due == utc(2026, 3, 30, 7, 0)
    assert due.astimezone(ZoneInfo(BERLIN)).hour == 9


def test_a_week_after_berlins_autumn_change_monday_nine_is_eight_utc() -> None:
    # Monday 19 October 2026, 09:00 CEST is 07:00Z; CET is back from Sunday 25 October.
    assert schedule.due_at(utc(2026, 10, 19, 7, 0), "1 week", window(BERLIN)) == utc(
        2026, 10, 26, 8, 0
    )


def test_new_york_keeps_nine_oclock_across_its_march_change() -> None:
    # Monday 2 March 2026 09:00 EST is 14:00Z; EDT starts on Sunday 8 March.
    ny = window(NEW_YORK)
    assert schedule.due_at(utc(2026, 3, 2, 14, 0), "1 week", ny) == utc(2026, 3, 9, 13, 0)
    # Business days across the change keep the wall clock too: Friday 09:00 -> Monday 09:00.
    assert schedule.due_at(utc(2026, 3, 6, 14, 0), "1 business day", ny) == utc(2026, 3, 9, 13, 0)


def test_new_york_november_change_and_the_window_opening() -> None:
    ny = window(NEW_YORK)
    # Saturday 31 October 2026 18:00 EDT: the window next opens Monday 2 November 09:00 EST.
    assert schedule.next_open(utc(2026, 10, 31, 22, 0), ny) == utc(2026, 11, 2, 14, 0)


def test_hours_and_minutes_are_elapsed_time_not_wall_clock() -> None:
    # Friday 27 March 2026 16:00 CET + 12 hours = Saturday 04:00 UTC+1 -> Monday 09:00 CEST.
    berlin = window(BERLIN)
    assert schedule.add_delay(utc(2026, 3, 27, 15, 0), "12 hours", berlin) == utc(
        2026, 3, 28, 3, 0
    )
    assert schedule.due_at(utc(2026, 3, 27, 15, 0), "12 hours", berlin) == utc(2026, 3, 30, 7, 0)
    assert schedule.due_at(utc(2026, 3, 25, 10, 0), "90 minutes", berlin) == utc(
        2026, 3, 25, 11, 30
    )


def test_business_days_skip_weekends_and_holidays() -> None:
    holidays = (date(2026, 12, 24), date(2026, 12, 25))
    berlin = window(BERLIN, holidays)
    # Wednesday 23 December 10:00 + 2 business days: Thu and Fri are holidays -> Tue 29th.
    due = schedule.due_at(utc(2026, 12, 23, 9, 0), "2 business days", berlin)
    assert due == utc(2026, 12, 29, 9, 0)


def test_the_window_moves_late_and_early_times_and_leaves_open_ones() -> None:
    berlin = window(BERLIN, (date(2026, 12, 7),))
    inside = utc(2026, 12, 2, 12, 30)
    assert schedule.next_open(inside, berlin) == inside
    assert schedule.is_open(inside, berlin)
    # 06:00 local -> 09:00 the same day; 17:00 sharp is closed -> next morning.
    assert schedule.next_open(utc(2026, 12, 2, 5, 0), berlin) == utc(2026, 12, 2, 8, 0)
    assert schedule.next_open(utc(2026, 12, 2, 16, 0), berlin) == utc(2026, 12, 3, 8, 0)
    # Friday evening -> Monday 7th is a holiday -> Tuesday 8th.
    assert schedule.next_open(utc(2026, 12, 4, 18, 0), berlin) == utc(2026, 12, 8, 8, 0)


def test_a_day_shift_into_a_dst_gap_moves_forward() -> None:
    night = schedule.Window.from_config(SendingWindow(hours={"mon-sun": "00:00-24:00"}), BERLIN)
    # Saturday 28 March 2026 02:30 CET + 1 day: 02:30 does not exist on the 29th -> 03:30 CEST.
    due = schedule.add_delay(utc(2026, 3, 28, 1, 30), "1 day", night)
    assert due == utc(2026, 3, 29, 1, 30)
    assert due.astimezone(ZoneInfo(BERLIN)).strftime("%H:%M") == "03:30"


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        schedule.next_open(datetime(2026, 12, 2, 12, 0), window(BERLIN))


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("0 minutes", (0, "minutes")),
        ("1 hour", (1, "hours")),
        ("3 business days", (3, "business_days")),
        ("1 Business Day", (1, "business_days")),
        ("2 weeks", (2, "weeks")),
        ("5 days", (5, "days")),
    ],
)
def test_delays_parse(spec: str, parsed: tuple[int, str]) -> None:
    assert parse_delay(spec) == parsed


@pytest.mark.parametrize("spec", ["soon", "3 fortnights", "-1 days", "1.5 hours", ""])
def test_bad_delays_say_what_is_expected(spec: str) -> None:
    with pytest.raises(ValueError, match="expected a delay such as"):
        parse_delay(spec)


def test_sequence_config_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="first email step needs a `subject`"):
        Sequence(steps=[{"action": "email", "template": "intro"}])
    with pytest.raises(ValueError, match="later emails reply in its thread"):
        Sequence(
            steps=[
                {"action": "email", "template": "intro", "subject": "Hi"},
                {"action": "email", "template": "followup", "subject": "Other"},
            ]
        )
    with pytest.raises(ValueError, match="sequence_nope.txt.j2 does not exist"):
        Sequence(steps=[{"action": "email", "template": "nope", "subject": "Hi"}])
    with pytest.raises(ValueError, match="ends before it starts"):
        SendingWindow(hours={"mon-fri": "17:00-09:00"})
    with pytest.raises(ValueError, match="IANA time zone"):
        SendingWindow(timezone="Berlin")
