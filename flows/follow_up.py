"""Follow-up: when a deal enters a stage, or is won or lost, run the configured actions."""

import base64
import hashlib
import importlib
import logging
from datetime import date, datetime, time, timedelta
from types import ModuleType
from typing import Any
from zoneinfo import ZoneInfo

from connectors import registry
from connectors.errors import FlowAbort, FlowIgnored, VendorError
from connectors.gmail import build_message
from core.config import (
    ActivityAction,
    CalendarAction,
    EmailAction,
    Rep,
    Settings,
    Trigger,
    TriggerAction,
    settings,
)
from core.pipedrive_events import PipedriveEvent
from core.runs import Result, RunContext, execute
from core.store import Event, as_utc
from core.templates import render_file, render_string

logger = logging.getLogger(__name__)

FLOW = "follow_up"


def run(event_id: str, retries_left: int = 0) -> str:
    """Run the follow-up flow for a stored Pipedrive event."""
    return execute(event_id, FLOW, _follow_up, retries_left=retries_left)


def _follow_up(ctx: RunContext, event: Event) -> None:
    current = settings()
    change = PipedriveEvent.model_validate(event.data)

    origin = ctx.step("check_origin", lambda: _origin(change))
    if origin["own_change"]:
        raise FlowIgnored("this product made the change through the API: no trigger runs")

    matched = ctx.step("match_triggers", lambda: _match(change, current))
    triggers = [t for t in current.follow_up.triggers if t.name in matched["triggers"]]
    if not triggers:
        raise FlowIgnored("no trigger in config.yaml acts on this change")

    deal: dict[str, Any] = {}
    person: dict[str, Any] = {}
    loaded = ctx.step("load_deal", lambda: _load_deal(change.entity_id, deal, person))
    if loaded["gone"]:
        raise FlowIgnored("the deal was deleted before its triggers ran")

    owner = _owner(deal["owner_id"], current)
    context = {
        "deal": deal,
        "person": person,
        "owner": owner,
        "rep": owner,
        "company_name": current.company_name,
    }
    for trigger in triggers:
        for index, action in enumerate(trigger.actions):
            key = _key(change, trigger, index)
            step = _step_name(trigger, index, action)
            ctx.step(
                step, lambda t=trigger, a=action, k=key: _act(ctx, event, t, a, k, deal, context)
            )


# -- which triggers fire ----------------------------------------------------------------


def _origin(change: PipedriveEvent) -> Result:
    """Our own API writes come back as webhooks: they must not set off triggers again."""
    if change.change_source != "api":
        return {"own_change": False, "change_source": change.change_source}
    # change_source "api" with our token's own user is a change this product made. Other
    # integrations, with tokens of other users, still set off triggers.
    own_user = registry.pipedrive().me()["id"]
    return {"own_change": change.user_id == own_user, "change_source": "api"}


def _match(change: PipedriveEvent, current: Settings) -> Result:
    pipedrive = registry.pipedrive()
    deal = change.current
    fired = []
    for trigger in current.follow_up.triggers:
        if trigger.stage is not None:
            entered = change.stage_changed or change.action == "created"
            if not entered or deal.get("status", "open") != "open":
                continue
            _, stage_id = pipedrive.stage_ids(trigger.pipeline or "", trigger.stage)
            if deal.get("stage_id") != stage_id:
                continue
        else:
            if not change.status_changed or deal.get("status") != trigger.status:
                continue
            if trigger.pipeline and deal.get("pipeline_id") != pipedrive.pipeline_id(
                trigger.pipeline
            ):
                continue
        fired.append(trigger.name)
    return {"triggers": fired}


def _entered_at(change: PipedriveEvent, trigger: Trigger) -> str:
    """When the deal entered the stage or status: the same in v1 and v2 bodies."""
    deal = change.current
    if trigger.status is not None:
        field = f"{trigger.status}_time"
    else:
        field = "add_time" if change.action == "created" else "stage_change_time"
    raw = deal.get(field)
    try:
        moment = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    except ValueError:
        # No time in the body: the event's own identity keys it instead.
        return hashlib.sha256(change.dedup_key.encode()).hexdigest()[:16]
    return str(int(as_utc(moment).timestamp()))


def _key(change: PipedriveEvent, trigger: Trigger, index: int) -> str:
    # Keyed by the deal and the moment it entered, not the delivery: a v1 and a v2
    # subscription reporting the same move share these keys and act once.
    name = hashlib.sha256(trigger.name.encode()).hexdigest()[:12]
    return f"follow_up:{change.entity_id}:{name}:{index}:{_entered_at(change, trigger)}"


def _step_name(trigger: Trigger, index: int, action: TriggerAction) -> str:
    return f"{action.kind} {index + 1}: {trigger.name}"[:64]


# -- the deal and its people ------------------------------------------------------------


def _load_deal(deal_id: int, deal: dict[str, Any], person: dict[str, Any]) -> Result:
    """Read the deal and its person now: the templates want today's values."""
    try:
        deal.update(registry.pipedrive().get_deal(deal_id))
    except VendorError as exc:
        if exc.status in (404, 410):
            return {"deal_id": deal_id, "gone": True}
        raise
    person.update(_person(deal))
    # Ids only: the run history is no place for names and addresses.
    return {
        "deal_id": deal_id,
        "gone": False,
        "owner_id": deal.get("owner_id"),
        "person_id": deal.get("person_id"),
        "person_has_email": bool(person.get("email")),
        "stage_id": deal.get("stage_id"),
        "status": deal.get("status"),
    }


def _owner(owner_id: int, current: Settings) -> Rep:
    for rep in current.reps:
        if rep.pipedrive_user_id == owner_id:
            return rep
    # An owner outside the rotation still owns the deal and gets its reminders.
    user = registry.pipedrive().user(owner_id)
    zone = user.get("timezone_name") or "UTC"
    try:
        ZoneInfo(zone)
    except (ValueError, KeyError):
        zone = "UTC"
    return Rep(name=user["name"], email=user["email"], pipedrive_user_id=owner_id, timezone=zone)


def _person(deal: dict[str, Any]) -> dict[str, Any]:
    if not deal.get("person_id"):
        return {}
    person = registry.pipedrive().get_person(deal["person_id"])
    emails = person.get("emails") or []
    primary = next((e for e in emails if e.get("primary")), emails[0] if emails else {})
    return {
        "id": person["id"],
        "name": person.get("name"),
        "first_name": person.get("first_name"),
        "last_name": person.get("last_name"),
        "email": primary.get("value"),
    }


# -- dates ------------------------------------------------------------------------------


def add_business_days(start: date, days: int) -> date:
    """The date `days` weekdays after start; a weekend start moves to Monday first."""
    moment = start
    while moment.weekday() >= 5:
        moment += timedelta(days=1)
    for _ in range(days):
        moment += timedelta(days=1)
        while moment.weekday() >= 5:
            moment += timedelta(days=1)
    return moment


def _local_due(event: Event, owner: Rep, days: int, clock: str) -> datetime:
    # From the event's arrival, not from now: a replay a week later computes the same day.
    zone = ZoneInfo(owner.timezone)
    today = as_utc(event.received_at).astimezone(zone).date()
    hours, minutes = (int(part) for part in clock.split(":"))
    return datetime.combine(add_business_days(today, days), time(hours, minutes), zone)


# -- actions ----------------------------------------------------------------------------


def _act(
    ctx: RunContext,
    event: Event,
    trigger: Trigger,
    action: TriggerAction,
    key: str,
    deal: dict[str, Any],
    context: dict[str, Any],
) -> Result:
    if action.email is not None:
        return _email(ctx, action.email, key, deal, context)
    if action.activity is not None:
        return _activity(ctx, event, action.activity, key, deal, context)
    if action.calendar_reminder is not None:
        return _calendar(ctx, event, action.calendar_reminder, key, deal, context)
    if action.start_sequence is not None:
        return _sequences().start(ctx, deal["id"], action.start_sequence)
    if action.send_contract:
        from flows import contract  # here: flows.contract uses this module's owner lookup

        return contract.send(ctx, deal["id"], key)
    return _sequences().stop(ctx, deal["id"], _stop_reason(trigger))


def _stop_reason(trigger: Trigger) -> str:
    """What the run history says stopped the sequences: the event, not the mechanism."""
    if trigger.status is not None:
        return f"the deal was {trigger.status}"
    return f"the deal entered the stage {trigger.stage!r}"


def _sequences() -> ModuleType:
    try:
        return importlib.import_module("flows.sequences")
    except ModuleNotFoundError as exc:
        if exc.name != "flows.sequences":
            raise
        raise FlowAbort(
            "config.yaml names a sequence, but flows.sequences is not installed"
        ) from None


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _email(
    ctx: RunContext, action: EmailAction, key: str, deal: dict[str, Any], context: dict[str, Any]
) -> Result:
    person = context["person"]
    if not person.get("email"):
        return {"skipped": "the deal's person has no email address"}
    owner: Rep = context["owner"]
    gmail = registry.gmail()
    domain = owner.email.partition("@")[2] or "salesflow.invalid"
    # Derived from the trigger, so a retry that lost Gmail's answer finds the message.
    message_id = f"<follow-up.{_digest(key)}@{domain}>"

    def send() -> Result:
        message = build_message(
            sender_name=owner.name,
            sender_email=owner.email,
            to_name=person.get("name"),
            to_email=person["email"],
            reply_to=owner.email,
            subject=render_string(action.subject, context),
            text=render_file(f"email/{action.template}.txt.j2", context),
            html=render_file(f"email/{action.template}.html.j2", context),
            message_id=message_id,
        )
        sent = gmail.send(message)
        return {"message_id": sent["id"], "thread_id": sent.get("threadId")}

    def recover() -> Result | None:
        found = gmail.find_by_message_id(message_id)
        return {"message_id": found["id"], "thread_id": found.get("threadId")} if found else None

    return ctx.once(key, send, recover)


def _activity(
    ctx: RunContext,
    event: Event,
    action: ActivityAction,
    key: str,
    deal: dict[str, Any],
    context: dict[str, Any],
) -> Result:
    pipedrive = registry.pipedrive()
    owner: Rep = context["owner"]
    marker = f"salesflow {key}"
    fields: dict[str, Any] = {
        "subject": render_string(action.subject, context) or "Follow up",
        "type": action.type,
        "owner_id": owner.pipedrive_user_id,
        "deal_id": deal["id"],
    }
    if action.due_time:
        # Pipedrive keeps due_time in UTC; the date can move with it.
        due = _local_due(event, owner, action.due_in_business_days, action.due_time)
        utc = due.astimezone(ZoneInfo("UTC"))
        fields["due_date"], fields["due_time"] = utc.date().isoformat(), utc.strftime("%H:%M")
    else:
        due = _local_due(event, owner, action.due_in_business_days, "00:00")
        fields["due_date"] = due.date().isoformat()
    if deal.get("person_id"):
        fields["participants"] = [{"person_id": deal["person_id"], "primary": True}]
    if deal.get("org_id"):
        fields["org_id"] = deal["org_id"]
    note = render_string(action.note, context) if action.note else ""
    # The marker lets a retry that lost Pipedrive's answer find the activity.
    fields["note"] = f"{note}<p><small>{marker}</small></p>" if note else marker

    def create() -> Result:
        activity = pipedrive.create_activity(fields)
        return {"activity_id": activity["id"], "due_date": fields["due_date"]}

    def recover() -> Result | None:
        found = pipedrive.find_activity(deal["id"], marker)
        return {"activity_id": found["id"], "due_date": found.get("due_date")} if found else None

    return ctx.once(key, create, recover)


def calendar_event_id(key: str) -> str:
    """A Calendar event id from the trigger key: base32hex (a-v, 0-9), as Calendar demands."""
    digest = hashlib.sha256(key.encode()).digest()
    return base64.b32hexencode(digest).decode().rstrip("=").lower()


def _calendar(
    ctx: RunContext,
    event: Event,
    action: CalendarAction,
    key: str,
    deal: dict[str, Any],
    context: dict[str, Any],
) -> Result:
    calendar = registry.calendar()
    owner: Rep = context["owner"]
    start = _local_due(event, owner, action.in_business_days, action.at)
    end = start + timedelta(minutes=action.duration_minutes)
    event_id = calendar_event_id(key)
    body = {
        "id": event_id,
        "summary": render_string(action.summary, context) or "Follow up",
        "start": {"dateTime": start.isoformat(), "timeZone": owner.timezone},
        "end": {"dateTime": end.isoformat(), "timeZone": owner.timezone},
        "reminders": {"useDefault": True},
        "extendedProperties": {"private": {"salesflow_deal_id": str(deal["id"])}},
    }
    if action.description:
        body["description"] = render_string(action.description, context)

    def insert() -> Result:
        # A 409 on our own id means an earlier attempt made it; the client treats it as done.
        made = calendar.insert_event(owner.email, body)
        return {"event_id": made["id"], "start": body["start"]["dateTime"]}

    def recover() -> Result | None:
        found = calendar.get_event(owner.email, event_id)
        return {"event_id": found["id"], "start": body["start"]["dateTime"]} if found else None

    return ctx.once(key, insert, recover)
