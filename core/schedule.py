"""Sending windows and delays: wall-clock arithmetic in the window's zone, answers in UTC."""

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from core.config import SendingWindow, parse_delay

# A window open on at least one weekday opens within a week, holidays aside; a year of
# holidays in a row is a configuration mistake, not a schedule.
SEARCH_DAYS = 400


@dataclass(frozen=True)
class Window:
    """Open hours per weekday and holidays, in one time zone."""

    zone: ZoneInfo
    hours: dict[int, tuple[time, time]]
    holidays: frozenset[date] = frozenset()

    @classmethod
    def from_config(cls, window: SendingWindow, zone: str) -> "Window":
        """The config's window, resolved to a concrete zone (the lead's or the rep's)."""
        return cls(ZoneInfo(zone), window.opening_hours(), frozenset(window.holidays))

    def is_working_day(self, day: date) -> bool:
        """True on a weekday with hours that is not a holiday."""
        return day.weekday() in self.hours and day not in self.holidays


def _require_aware(moment: datetime) -> None:
    if moment.tzinfo is None:
        # A naive time would silently take the process's TZ; refuse it.
        raise ValueError(f"expected an aware datetime, got naive {moment!r}")


def local_to_utc(day: date, clock: time, zone: ZoneInfo) -> datetime:
    """A wall-clock time in a zone as UTC; a time skipped by DST moves forward by the gap."""
    return datetime.combine(day, clock, tzinfo=zone).astimezone(UTC)


def next_open(moment: datetime, window: Window) -> datetime:
    """The moment itself when the window is open, else the next opening, in UTC."""
    _require_aware(moment)
    local = moment.astimezone(window.zone)
    for offset in range(SEARCH_DAYS):
        day = local.date() + timedelta(days=offset)
        if not window.is_working_day(day):
            continue
        start, end = window.hours[day.weekday()]
        opens, closes = local_to_utc(day, start, window.zone), local_to_utc(day, end, window.zone)
        if moment < opens:
            return opens
        if moment < closes:
            return moment.astimezone(UTC)
    raise ValueError(f"the sending window does not open within {SEARCH_DAYS} days")


def is_open(moment: datetime, window: Window) -> bool:
    """True when a step may go out at this moment."""
    return next_open(moment, window) == moment.astimezone(UTC)


def _shift_local(moment: datetime, zone: ZoneInfo, days: int) -> datetime:
    # Same wall-clock time `days` later: 09:00 stays 09:00 across a DST change.
    local = moment.astimezone(zone)
    return local_to_utc(local.date() + timedelta(days=days), local.time(), zone)


def add_delay(moment: datetime, delay: str, window: Window) -> datetime:
    """When a step with this delay is due after `moment`, before the window is applied."""
    _require_aware(moment)
    amount, unit = parse_delay(delay)
    if unit == "minutes":
        return (moment + timedelta(minutes=amount)).astimezone(UTC)
    if unit == "hours":
        return (moment + timedelta(hours=amount)).astimezone(UTC)
    if unit == "days":
        return _shift_local(moment, window.zone, amount)
    if unit == "weeks":
        return _shift_local(moment, window.zone, 7 * amount)
    return add_business_days(moment, amount, window)


def add_business_days(moment: datetime, days: int, window: Window) -> datetime:
    """The same wall-clock time `days` working days later (weekends and holidays skipped)."""
    local = moment.astimezone(window.zone)
    day = local.date()
    remaining = days
    for _ in range(SEARCH_DAYS + days):
        if remaining == 0:
            return local_to_utc(day, local.time(), window.zone)
        day += timedelta(days=1)
        if window.is_working_day(day):
            remaining -= 1
    raise ValueError(f"no {days} working days within {SEARCH_DAYS} days")


def due_at(moment: datetime, delay: str, window: Window) -> datetime:
    """When the step runs: the delay after `moment`, moved into the sending window (UTC)."""
    return next_open(add_delay(moment, delay, window), window)
