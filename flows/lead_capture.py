"""Lead capture: a person and a deal in Pipedrive, owned by a rep, and a welcome email."""

import hashlib
import logging
from typing import Any

from markupsafe import escape

from connectors import registry
from connectors.errors import FlowAbort
from connectors.gmail import build_message
from core import metrics
from core.assignment import Assigner, lookup
from core.config import Rep, Settings, settings
from core.leads import Lead, LeadEvent, MalformedPayload, email_key, lead_from_graph
from core.runs import Result, RunContext, execute
from core.store import Event, as_utc, session, utcnow
from core.templates import render_file, render_string

logger = logging.getLogger(__name__)

FLOW = "lead_capture"


def run(event_id: str, retries_left: int = 0) -> str:
    """Run the lead-capture flow for a stored lead event."""
    return execute(event_id, FLOW, _capture, retries_left=retries_left)


def _capture(ctx: RunContext, event: Event) -> None:
    current = settings()
    lead_event = LeadEvent.model_validate(event.data)
    if lead_event.source == "facebook" and lead_event.external_id:
        lead_event = _with_fetched_lead(ctx, lead_event, current)
    lead = lead_event.lead
    if not lead.email and (lead_event.require_email or not lead.phone):
        missing = "email address" if lead_event.require_email else "email address or phone"
        raise FlowAbort(f"the lead has no {missing}")

    person = ctx.step("find_person", lambda: _find_person(lead, current))

    assigned = ctx.step("assign_owner", lambda: _assign(ctx, lead_event, person, current))

    if person["person_id"] is None:
        person = ctx.step("create_person", lambda: _create_person(ctx, lead, assigned["owner_id"]))

    owner = _owner(assigned["owner_id"], current)
    context = {"lead": lead, "rep": owner, "company_name": current.company_name}
    deal = ctx.step("create_deal", lambda: _deal(ctx, lead_event, person, owner, context, current))

    ctx.step("add_note", lambda: _note(ctx, lead_event, deal["deal_id"]))

    if lead.email:
        ctx.step("send_welcome_email", lambda: _welcome(ctx, event, owner, context, current))


def _with_fetched_lead(ctx: RunContext, lead_event: LeadEvent, current: Settings) -> LeadEvent:
    """Read the lead from the Graph API once and keep it with the event."""
    if lead_event.lead.email or lead_event.lead.phone:
        return lead_event
    forms = current.lead_capture.sources.facebook
    form = forms.get(lead_event.form_id) or forms["default"]

    def fetch() -> Result:
        graph_lead = registry.graph().lead(lead_event.external_id or "")
        try:
            lead = lead_from_graph(graph_lead.get("field_data"), form, current.default_region)
        except MalformedPayload as exc:
            raise FlowAbort(f"the Graph lead cannot be used: {exc}") from exc
        with session() as db:
            stored = db.get(Event, ctx.event_id)
            stored.data = {**stored.data, "lead": lead.model_dump(mode="json")}
        return {
            "fields": len(graph_lead.get("field_data") or []),
            "has_email": bool(lead.email),
            "has_phone": bool(lead.phone),
        }

    ctx.step("fetch_lead", fetch)
    with session() as db:
        return LeadEvent.model_validate(db.get(Event, ctx.event_id).data)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _person_result(person: dict[str, Any] | None, created: bool = False) -> Result:
    if person is None:
        return {"person_id": None, "owner_id": None, "org_id": None, "created": False}
    owner = person.get("owner_id") or (person.get("owner") or {}).get("id")
    org = person.get("org_id") or (person.get("organization") or {}).get("id")
    return {"person_id": person["id"], "owner_id": owner, "org_id": org, "created": created}


def _find_person(lead: Lead, current: Settings) -> Result:
    pipedrive = registry.pipedrive()
    found = pipedrive.find_person_by_email(lead.email) if lead.email else None
    if found is None and lead.phone:
        found = pipedrive.find_person_by_phone(lead.phone, current.default_region)
    return _person_result(found)


def _assign(ctx: RunContext, lead_event: LeadEvent, person: Result, current: Settings) -> Result:
    if person["person_id"] is not None and current.assignment.keep_existing_owner:
        # An existing person keeps the owner the team gave them.
        return {"owner_id": person["owner_id"], "strategy": "existing_owner"}

    def choose() -> Result:
        assigner = Assigner(current, registry.pipedrive().active_user_ids(), utcnow())
        return assigner.choose(lead_event).as_output()

    return ctx.once(f"assign:{ctx.event_id}", choose)


def _create_person(ctx: RunContext, lead: Lead, owner_id: int) -> Result:
    pipedrive = registry.pipedrive()

    def create() -> Result:
        org_id = _organization(ctx, lead.company, owner_id) if lead.company else None
        fields: dict[str, Any] = {
            "name": lead.display_name or lead.email or lead.phone,
            "owner_id": owner_id,
        }
        if lead.email:
            fields["emails"] = [{"value": lead.email, "primary": True, "label": "work"}]
        if lead.phone:
            fields["phones"] = [{"value": lead.phone, "primary": True, "label": "work"}]
        if org_id:
            fields["org_id"] = org_id
        return _person_result(pipedrive.create_person(fields), created=True)

    def recover() -> Result | None:
        again = _find_person(lead, settings())
        return {**again, "created": True} if again["person_id"] else None

    # Keyed by the address (or phone), not the event: two sources sending the same lead at
    # once must end with one person, and search may not yet see a person just created.
    identity = email_key(lead.email) if lead.email else f"phone:{lead.phone}"
    return ctx.once(f"person:{_digest(identity)}", create, recover)


def _organization(ctx: RunContext, company: str, owner_id: int) -> int:
    pipedrive = registry.pipedrive()
    found = pipedrive.find_organization(company)
    if found is not None:
        return found["id"]

    def recover() -> Result | None:
        again = pipedrive.find_organization(company)
        return {"org_id": again["id"]} if again else None

    result = ctx.once(
        f"organization:{_digest(company.strip().casefold())}",
        lambda: {"org_id": pipedrive.create_organization(company.strip(), owner_id)["id"]},
        recover,
    )
    return result["org_id"]


def _owner(owner_id: int, current: Settings) -> Rep:
    for rep in current.reps:
        if rep.pipedrive_user_id == owner_id:
            return rep
    # The person belongs to someone outside the rotation: they still own the lead.
    user = registry.pipedrive().user(owner_id)
    return Rep(name=user["name"], email=user["email"], pipedrive_user_id=owner_id)


def _field_value(field: dict[str, Any], value: Any) -> Any:
    kind = field.get("field_type")
    options = {str(o["label"]).casefold(): o["id"] for o in field.get("options") or []}
    if kind == "enum":
        return options.get(str(value).casefold())
    if kind == "set":
        labels = value if isinstance(value, list) else [value]
        chosen = [options[str(v).casefold()] for v in labels if str(v).casefold() in options]
        return chosen or None
    if kind in ("double", "monetary"):
        return float(value)
    if kind == "int":
        return int(value)
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _custom_fields(lead_event: LeadEvent, current: Settings) -> dict[str, Any]:
    fields = registry.pipedrive().deal_fields()
    values: dict[str, Any] = {}
    for name, path in current.lead_capture.custom_fields.items():
        field = fields.get(name)
        if field is None:
            raise FlowAbort(
                f"lead_capture.custom_fields names {name!r}, a deal field Pipedrive does not have"
            )
        raw = lookup(path, lead_event)
        if raw in (None, "", []):
            continue
        try:
            value = _field_value(field, raw)
        except ValueError:
            logger.warning("custom field skipped field=%s: value does not fit", name)
            continue
        if value is not None:
            values[field["field_code"]] = value
    return values


def _deal(
    ctx: RunContext,
    lead_event: LeadEvent,
    person: Result,
    owner: Rep,
    context: dict[str, Any],
    current: Settings,
) -> Result:
    pipedrive = registry.pipedrive()
    capture = current.lead_capture
    title = render_string(capture.deal_title, context) or "New lead"

    def create() -> Result:
        pipeline_id, stage_id = pipedrive.stage_ids(capture.pipeline, capture.stage)
        fields: dict[str, Any] = {
            "title": title,
            "owner_id": owner.pipedrive_user_id,
            "person_id": person["person_id"],
            "pipeline_id": pipeline_id,
            "stage_id": stage_id,
            "currency": capture.currency,
        }
        if person["org_id"]:
            fields["org_id"] = person["org_id"]
        value = render_string(capture.deal_value, context) if capture.deal_value else ""
        if value:
            try:
                fields["value"] = float(value)
            except ValueError:
                logger.warning("deal value skipped event_id=%s: not a number", ctx.event_id)
        custom = _custom_fields(lead_event, current)
        if custom:
            fields["custom_fields"] = custom
        deal = pipedrive.create_deal(fields)
        return {"deal_id": deal["id"]}

    def recover() -> Result | None:
        deal = pipedrive.find_deal(person["person_id"], title)
        return {"deal_id": deal["id"]} if deal else None

    return ctx.once(f"deal:{ctx.event_id}", create, recover)


def _note_html(lead_event: LeadEvent, event_id: str) -> str:
    lead = lead_event.lead
    lines = [
        f"<p><b>New lead from {escape(lead_event.lead_source)}</b> "
        f"(form {escape(lead_event.form_id)})</p>",
        "<ul>",
    ]
    for key, value in lead.answers.items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        lines.append(f"<li>{escape(key)}: {escape(shown)}</li>")
    for key, value in lead.hidden.items():
        lines.append(f"<li>{escape(key)}: {escape(value)}</li>")
    lines.append("</ul>")
    lines.append(f"<p><small>salesflow event {escape(event_id)}</small></p>")
    return "\n".join(lines)


def _note(ctx: RunContext, lead_event: LeadEvent, deal_id: int) -> Result:
    pipedrive = registry.pipedrive()
    marker = f"salesflow event {ctx.event_id}"

    def recover() -> Result | None:
        note = pipedrive.find_note(deal_id, marker)
        return {"note_id": note["id"]} if note else None

    return ctx.once(
        f"note:{ctx.event_id}",
        lambda: {
            "note_id": pipedrive.add_note(deal_id, _note_html(lead_event, ctx.event_id))["id"]
        },
        recover,
    )


def _welcome(
    ctx: RunContext, event: Event, owner: Rep, context: dict[str, Any], current: Settings
) -> Result:
    gmail = registry.gmail()
    lead: Lead = context["lead"]
    template = current.lead_capture.welcome_email
    domain = owner.email.partition("@")[2] or "salesflow.invalid"
    # A Message-ID derived from the event lets a retry find a send that lost its answer.
    message_id = f"<welcome.{ctx.event_id}@{domain}>"

    def send() -> Result:
        message = build_message(
            sender_name=owner.name,
            sender_email=owner.email,
            to_name=lead.display_name,
            to_email=lead.email,
            reply_to=owner.email,
            subject=render_string(template.subject, context),
            text=render_file(f"email/{template.template}.txt.j2", context),
            html=render_file(f"email/{template.template}.html.j2", context),
            message_id=message_id,
        )
        sent = gmail.send(message)
        # Speed to lead: from the webhook's arrival to Gmail accepting the welcome email.
        seconds = (utcnow() - as_utc(event.received_at)).total_seconds()
        metrics.observe_speed_to_lead(event.source, seconds)
        return {
            "message_id": sent["id"],
            "thread_id": sent.get("threadId"),
            "speed_to_lead_ms": round(seconds * 1000),
        }

    def recover() -> Result | None:
        found = gmail.find_by_message_id(message_id)
        return {"message_id": found["id"], "thread_id": found.get("threadId")} if found else None

    return ctx.once(f"welcome:{ctx.event_id}", send, recover)
