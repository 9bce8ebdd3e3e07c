"""Contracts: a filled document out for e-signature through DocuSign, and what signing does."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any

import phonenumbers
from babel import Locale, UnknownLocaleError
from babel.dates import format_date
from babel.numbers import format_currency
from jinja2 import TemplateError, pass_context
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment
from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError

from connectors import registry
from connectors.errors import FlowAbort, FlowIgnored, PermanentVendorError, VendorError
from connectors.gmail import build_message
from core import queue
from core.config import ContractDocument, Contracts, Rep, Settings, settings
from core.docusign_events import (
    DEAL_FIELD,
    FINAL,
    KEY_FIELD,
    RANKS,
    EnvelopeEvent,
    envelope_details,
    parse_time,
)
from core.runs import Result, RunContext, execute
from core.store import ContractEnvelope, Event, as_utc, new_id, session, utcnow
from core.templates import render_file

if TYPE_CHECKING:
    import docusign_esign as ds

logger = logging.getLogger(__name__)

FLOW = "contract"
# DocuSign's rule for polling: never more than once per 15 minutes per envelope.
POLL_INTERVAL = timedelta(minutes=15)
# How far back the lookup of a lost envelope create searches.
LOOKUP_SLACK = timedelta(days=1)
LIVE = ("sending", "sent", "delivered", "completed")


def run(event_id: str, retries_left: int = 0) -> str:
    """Run the contract flow: an operator's send, or a Connect message (or a poll's finding)."""
    return execute(event_id, FLOW, _dispatch, retries_left=retries_left)


def _dispatch(ctx: RunContext, event: Event) -> None:
    if event.source == "operator":
        data = event.data or {}
        key = f"contract:operator:{event.id}"
        ctx.step("send_contract", lambda: send(ctx, int(data["deal_id"]), key, data.get("force")))
        return
    _connect(ctx, event)


# -- templates: amounts and dates in the client's locale --------------------------------


@pass_context
def _money(context: Context, value: Any, currency: str | None = None) -> str:
    if value in (None, ""):
        return ""
    code = currency or (context.get("deal") or {}).get("currency") or "EUR"
    return format_currency(float(value), code, locale=context.get("locale") or "en_US")


@pass_context
def _date(context: Context, value: Any, style: str = "long") -> str:
    if value in (None, ""):
        return ""
    moment = value if isinstance(value, date) else date.fromisoformat(str(value)[:10])
    return format_date(moment, style, locale=context.get("locale") or "en_US")


@functools.cache
def _environment() -> SandboxedEnvironment:
    # Sandboxed: contract expressions are written by sales ops in config.yaml.
    # finalize: a field Pipedrive leaves null is a missing value, not the word "None".
    env = SandboxedEnvironment(autoescape=False, finalize=lambda v: "" if v is None else v)
    env.filters["money"] = _money
    env.filters["date"] = _date
    return env


def _render(source: str, context: dict[str, Any]) -> str:
    return _environment().from_string(source).render(context).strip()


def _client_locale(document: ContractDocument, context: dict[str, Any], region: str) -> str:
    """The configured locale, else the one of the country of the person's phone number."""
    if document.locale:
        wanted = _render(document.locale, context)
    else:
        phone = context["person"].get("phone")
        try:
            number = phonenumbers.parse(phone or "", region)
            region = phonenumbers.region_code_for_number(number) or region
        except phonenumbers.NumberParseException:
            pass
        wanted = f"und_{region}"
    try:
        return str(Locale.parse(wanted))
    except (UnknownLocaleError, ValueError):
        raise FlowAbort(f"contract {document.name!r}: {wanted!r} is not a known locale") from None


# -- the deal and its people ------------------------------------------------------------


@dataclass
class Deal:
    """What a contract is filled from, read from Pipedrive when it is sent."""

    deal: dict[str, Any]
    person: dict[str, Any]
    org: dict[str, Any]
    owner: Rep
    fields: dict[str, Any] = field(default_factory=dict)


def _primary(items: list[dict[str, Any]] | None) -> str | None:
    items = items or []
    chosen = next((item for item in items if item.get("primary")), items[0] if items else {})
    return chosen.get("value")


def _load(deal_id: int, current: Settings) -> Deal:
    from flows.follow_up import _owner  # the owner as a Rep, also for users outside config

    pipedrive = registry.pipedrive()
    deal = pipedrive.get_deal(deal_id)
    person: dict[str, Any] = {}
    if deal.get("person_id"):
        raw = pipedrive.get_person(deal["person_id"])
        person = {key: raw.get(key) for key in ("id", "name", "first_name", "last_name", "org_id")}
        person.update(email=_primary(raw.get("emails")), phone=_primary(raw.get("phones")))
    org = pipedrive.get_organization(deal["org_id"]) if deal.get("org_id") else {}
    return Deal(deal, person, org, _owner(deal["owner_id"], current), _deal_fields(deal))


def _deal_fields(deal: dict[str, Any]) -> dict[str, Any]:
    """Custom field values by field name, option ids turned into their labels."""
    values: dict[str, Any] = {}
    custom = deal.get("custom_fields") or {}
    for name, spec in registry.pipedrive().deal_fields().items():
        raw = custom.get(spec["field_code"])
        labels = {option["id"]: option["label"] for option in spec.get("options") or []}
        if isinstance(raw, list):
            values[name] = [labels.get(item, item) for item in raw]
        else:
            values[name] = labels.get(raw, raw)
    return values


def _choose(loaded: Deal, contracts: Contracts) -> ContractDocument:
    pipedrive = registry.pipedrive()
    product = loaded.fields.get(contracts.product_field) if contracts.product_field else None
    products = product if isinstance(product, list) else [product]
    for document in contracts.documents:
        if loaded.deal.get("pipeline_id") != pipedrive.pipeline_id(document.pipeline):
            continue
        if document.product is None or document.product in products:
            return document
    raise FlowAbort(
        f"no contract in config.yaml fits deal {loaded.deal['id']} (its pipeline and product)"
    )


# -- what goes into the envelope --------------------------------------------------------


@dataclass
class Plan:
    """A contract ready to send: checked, every value rendered."""

    document: ContractDocument
    signer: tuple[str, str]
    copies: list[tuple[str, str, str | None]]
    subject: str
    values: dict[str, str]
    envelope_field: str | None
    # The Docs copy's and the PDF's name (Google Docs contracts).
    file_name: str = ""


def _context(loaded: Deal, current: Settings, today: date) -> dict[str, Any]:
    return {
        "deal": loaded.deal,
        "person": loaded.person,
        "org": loaded.org,
        "owner": loaded.owner,
        "rep": loaded.owner,
        "fields": loaded.fields,
        "company_name": current.company_name,
        "today": today,
    }


def _values(expressions: dict[str, str], context: dict[str, Any], what: str) -> tuple[dict, list]:
    values, missing = {}, []
    for name, source in expressions.items():
        try:
            values[name] = _render(source, context)
        except (TemplateError, ValueError, TypeError) as exc:
            missing.append(f"{what} {name!r} cannot be filled ({exc})")
            continue
        if not values[name]:
            missing.append(f"{what} {name!r} has no value ({source.strip()})")
    return values, missing


def _check_template(document: ContractDocument, values: dict[str, str]) -> list[str]:
    template = document.template
    assert template is not None
    roles = registry.docusign().template_roles(template.template_id)
    known = ", ".join(sorted(roles)) or "none"
    signer = roles.get(template.signer_role)
    problems = []
    if signer is None or signer["kind"] != "signers":
        problems.append(
            f"template {template.template_id} has no signer role {template.signer_role!r} "
            f"(its roles: {known})"
        )
    for copy in document.carbon_copies:
        role = roles.get(copy.role or "")
        if role is None or role["kind"] != "carbonCopies":
            problems.append(
                f"template {template.template_id} has no carbon-copy role {copy.role!r} "
                f"(its roles: {known})"
            )
    labels = set((signer or {}).get("tabs", {}).get("textTabs", []))
    for label in values:
        if signer is not None and label not in labels:
            problems.append(f"the signer role has no text tab labelled {label!r}")
    return problems


def _check_google_doc(document: ContractDocument, values: dict[str, str]) -> list[str]:
    doc = document.google_doc
    assert doc is not None
    docs = registry.google_docs()
    text = docs.text(doc.document_id)
    problems = [
        f"the document's placeholder {{{{{name}}}}} has no value in config.yaml"
        for name in sorted(set(re.findall(r"\{\{\s*([A-Za-z0-9_.-]+)\s*\}\}", text)) - set(values))
    ]
    if doc.signature_anchor not in text:
        problems.append(f"the document has no signature anchor {doc.signature_anchor!r}")
    return problems


def _plan(document: ContractDocument, loaded: Deal, contracts: Contracts, today: date) -> Plan:
    """Render and check everything first: nothing is sent while something is missing."""
    current = settings()
    context = _context(loaded, current, today)
    context["locale"] = _client_locale(document, context, current.default_region)
    problems = []
    person = loaded.person
    if not person:
        problems.append("the deal has no person to sign")
    elif not person.get("email"):
        problems.append("the deal's person has no email address")
    elif not (person.get("name") or "").strip():
        problems.append("the deal's person has no name")

    if document.template is not None:
        values, missing = _values(document.template.tabs, context, "tab")
        problems += missing + _check_template(document, values)
    else:
        assert document.google_doc is not None
        values, missing = _values(document.google_doc.placeholders, context, "placeholder")
        problems += missing + _check_google_doc(document, values)
    field_code = _envelope_field(contracts, problems)

    subject = _render(document.email_subject, context) or f"Please DocuSign: {document.name}"
    if problems:
        raise FlowAbort(
            f"contract {document.name!r} for deal {loaded.deal['id']} was not sent: "
            + "; ".join(problems)
        )
    copies = [
        (loaded.owner.name, loaded.owner.email, cc.role)
        if cc.owner
        else (cc.name or "", cc.email or "", cc.role)
        for cc in document.carbon_copies
    ]
    signer = ((person.get("name") or "").strip(), str(person["email"]).strip())
    file_name = ""
    if document.google_doc is not None:
        file_name = _render(document.google_doc.file_name, context) or document.name
    # DocuSign cuts subjects at 100 characters; cut them ourselves so the end is ours.
    return Plan(document, signer, copies, subject[:100], values, field_code, file_name[:120])


def _envelope_field(contracts: Contracts, problems: list[str]) -> str | None:
    if not contracts.envelope_field:
        return None
    spec = registry.pipedrive().deal_fields().get(contracts.envelope_field)
    if spec is None:
        problems.append(f"Pipedrive has no deal field named {contracts.envelope_field!r}")
        return None
    return spec["field_code"]


def _sdk() -> Any:
    # Imported when a contract is built: docusign_esign loads all of its ~590 model modules
    # at once (about 32 MB resident), which a worker that sends no contract never needs.
    import docusign_esign

    return docusign_esign


def _custom_fields(deal_id: int, key: str) -> ds.CustomFields:
    # DocuSign has no idempotency key: this one lets a lost create be found again.
    ds = _sdk()
    return ds.CustomFields(
        text_custom_fields=[
            ds.TextCustomField(name=DEAL_FIELD, value=str(deal_id), show="false"),
            ds.TextCustomField(name=KEY_FIELD, value=key, show="false"),
        ]
    )


def _from_template(plan: Plan, deal_id: int, key: str) -> ds.EnvelopeDefinition:
    ds = _sdk()
    template = plan.document.template
    assert template is not None
    tabs = ds.Tabs(
        text_tabs=[ds.Text(tab_label=label, value=value) for label, value in plan.values.items()]
    )
    roles = [
        ds.TemplateRole(
            role_name=template.signer_role, name=plan.signer[0], email=plan.signer[1], tabs=tabs
        )
    ]
    roles += [ds.TemplateRole(role_name=role, name=n, email=e) for n, e, role in plan.copies]
    return ds.EnvelopeDefinition(
        template_id=template.template_id,
        template_roles=roles,
        email_subject=plan.subject,
        custom_fields=_custom_fields(deal_id, key),
        status="sent",
    )


def _rendered_pdf(plan: Plan, context_name: str) -> bytes:
    """Copy the Docs template, fill it, export it to PDF; the copy is deleted either way."""
    doc = plan.document.google_doc
    assert doc is not None
    docs = registry.google_docs()
    # TODO: a copy whose answer was lost stays in Drive; key the copy once Drive's
    # files.list is emulated so that a retry can find it by name.
    copy_id = docs.copy(doc.document_id, context_name)
    try:
        docs.replace_all(copy_id, plan.values)
        return docs.export_pdf(copy_id)
    finally:
        docs.delete(copy_id)


def _from_google_doc(plan: Plan, deal_id: int, key: str) -> ds.EnvelopeDefinition:
    ds = _sdk()
    doc = plan.document.google_doc
    assert doc is not None
    pdf = _rendered_pdf(plan, plan.file_name)
    sign_here = ds.SignHere(
        anchor_string=doc.signature_anchor,
        anchor_units="pixels",
        anchor_x_offset="0",
        anchor_y_offset="-10",
    )
    signer = ds.Signer(
        name=plan.signer[0],
        email=plan.signer[1],
        recipient_id="1",
        routing_order="1",
        tabs=ds.Tabs(sign_here_tabs=[sign_here]),
    )
    copies = [
        ds.CarbonCopy(name=n, email=e, recipient_id=str(i), routing_order="2")
        for i, (n, e, _role) in enumerate(plan.copies, start=2)
    ]
    document = ds.Document(
        document_base64=base64.b64encode(pdf).decode("ascii"),
        name=f"{plan.file_name}.pdf",
        file_extension="pdf",
        document_id="1",
    )
    return ds.EnvelopeDefinition(
        email_subject=plan.subject,
        documents=[document],
        recipients=ds.Recipients(signers=[signer], carbon_copies=copies or None),
        custom_fields=_custom_fields(deal_id, key),
        status="sent",
    )


# -- sending, once per proposal ---------------------------------------------------------


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:40]


def _earlier(deal_id: int, contract: str, key: str, window: timedelta) -> ContractEnvelope | None:
    """An envelope of the same contract for the deal within the window, claimed before ours."""
    with session() as db:
        mine = db.scalar(select(ContractEnvelope.id).where(ContractEnvelope.key == key))
        query = select(ContractEnvelope).where(
            ContractEnvelope.deal_id == deal_id,
            ContractEnvelope.contract == contract,
            ContractEnvelope.key != key,
            ContractEnvelope.status.in_(LIVE),
            ContractEnvelope.created_at >= utcnow() - window,
        )
        if mine is not None:
            # Two entries racing: the one claimed first sends, the other stands down.
            query = query.where(ContractEnvelope.id < mine)
        return db.scalar(query.order_by(ContractEnvelope.id).limit(1))


def _claim(key: str, deal_id: int, contract: str, event_id: str) -> ContractEnvelope:
    try:
        with session() as db:
            row = ContractEnvelope(
                key=key, deal_id=deal_id, contract=contract, status="sending", event_id=event_id
            )
            db.add(row)
    except IntegrityError:
        pass  # a retry of the same proposal: its row is there already
    with session() as db:
        return db.scalar(select(ContractEnvelope).where(ContractEnvelope.key == key))


def _set(key: str, **values: Any) -> None:
    with session() as db:
        db.execute(update(ContractEnvelope).where(ContractEnvelope.key == key).values(**values))


def send(ctx: RunContext, deal_id: int, key: str, force: bool = False) -> Result:
    """Send the deal's contract once per proposal; a second entry within the window sends none."""
    current = settings()
    contracts = current.contracts
    if contracts is None:
        raise FlowAbort("config.yaml has no `contracts` section")
    loaded = _load(deal_id, current)
    document = _choose(loaded, contracts)
    digest = _digest(key)
    window = timedelta(0) if force else contracts.window

    earlier = _earlier(deal_id, document.name, digest, window)
    if earlier is not None:
        return _skipped(earlier, contracts)
    today = as_utc(_claimed_at(digest) or utcnow()).date()
    plan = _plan(document, loaded, contracts, today)
    row = _claim(digest, deal_id, document.name, ctx.event_id)
    earlier = _earlier(deal_id, document.name, digest, window)
    if earlier is not None:
        _set(digest, status="skipped")
        return _skipped(earlier, contracts)

    sent = _send_envelope(ctx, plan, loaded, digest, row.created_at)
    with session() as db:
        db.execute(
            update(ContractEnvelope)
            .where(ContractEnvelope.key == digest)
            .values(envelope_id=sent["envelope_id"], sent_at=utcnow())
        )
        db.execute(
            update(ContractEnvelope)
            .where(ContractEnvelope.key == digest, ContractEnvelope.status == "sending")
            .values(status="sent")
        )
    _after_send(ctx, plan, deal_id, digest, sent)
    logger.info(
        "contract sent event_id=%s deal_id=%s envelope_id=%s",
        ctx.event_id,
        deal_id,
        sent["envelope_id"],
    )
    return {"contract": document.name, "deal_id": deal_id, **sent}


def _claimed_at(key: str) -> datetime | None:
    # A retry renders the dates of the first try, not of the day it runs again.
    with session() as db:
        return db.scalar(select(ContractEnvelope.created_at).where(ContractEnvelope.key == key))


def _skipped(earlier: ContractEnvelope, contracts: Contracts) -> Result:
    return {
        "skipped": f"an envelope for this contract went out within {contracts.resend_window}",
        "envelope_id": earlier.envelope_id,
        "contract": earlier.contract,
    }


def _send_envelope(
    ctx: RunContext, plan: Plan, loaded: Deal, key: str, claimed: datetime
) -> Result:
    docusign = registry.docusign()
    deal_id = loaded.deal["id"]

    def create() -> Result:
        if plan.document.template is not None:
            definition = _from_template(plan, deal_id, key)
        else:
            definition = _from_google_doc(plan, deal_id, key)
        return docusign.create_envelope(definition)

    def recover() -> Result | None:
        return docusign.find_envelope(KEY_FIELD, key, as_utc(claimed) - LOOKUP_SLACK)

    try:
        return ctx.once(f"contract:{key}:envelope", create, recover)
    except (FlowAbort, PermanentVendorError):
        # Refused for good (a bad address, a changed template): this claim blocks nothing.
        _set(key, status="failed")
        raise


def _after_send(ctx: RunContext, plan: Plan, deal_id: int, key: str, sent: Result) -> None:
    pipedrive = registry.pipedrive()
    envelope_id = sent["envelope_id"]
    if plan.envelope_field:
        fields = {"custom_fields": {plan.envelope_field: envelope_id}}
        ctx.once(
            f"contract:{key}:field",
            lambda: {"deal_id": pipedrive.update_deal(deal_id, fields)["id"]},
        )
    marker = f"salesflow contract:{key}:note"
    content = (
        f"<p>Contract <b>{plan.document.name}</b> sent for e-signature through DocuSign.</p>"
        f"<p>Envelope {envelope_id}: {sent.get('status') or 'sent'}.</p>"
        f"<p><small>{marker}</small></p>"
    )
    _note(ctx, f"contract:{key}:note", deal_id, content, marker)


def _note(ctx: RunContext, key: str, deal_id: int, content: str, marker: str) -> Result:
    pipedrive = registry.pipedrive()

    def recover() -> Result | None:
        found = pipedrive.find_note(deal_id, marker)
        return {"note_id": found["id"]} if found else None

    return ctx.once(key, lambda: {"note_id": pipedrive.add_note(deal_id, content)["id"]}, recover)


def send_now(deal_id: int, force: bool = False) -> Result:
    """`flask send-contract`: store an operator event for the deal and run it here."""
    data = {"deal_id": deal_id, "force": force}
    with session() as db:
        event = Event(
            source="operator",
            type="contract.send",
            dedup_key=f"operator:send-contract:{deal_id}:{new_id()}",
            status="queued",
            data=data,
            payload=json.dumps(data),
        )
        db.add(event)
    status = run(event.id)
    with session() as db:
        stored = db.get(Event, event.id)
        outputs = [step.output for run_ in stored.runs for step in run_.steps if step.output]
        return {
            "event_id": event.id,
            "status": status,
            "reason": stored.reason,
            "result": outputs[-1] if outputs else None,
        }


# -- Connect: the state only moves forward, each transition acts once -------------------


def _rank(status: str | None) -> int:
    return RANKS.get(status or "", 0)


def _record(change: EnvelopeEvent) -> Result:
    """Compare the message's snapshot with the stored state and move it forward if newer."""
    with session() as db:
        row = db.scalar(
            select(ContractEnvelope).where(ContractEnvelope.envelope_id == change.envelope_id)
        )
        if row is None and change.idempotency_key:
            # Connect can beat the create's own answer (or the create's answer was lost).
            row = db.scalar(
                select(ContractEnvelope).where(ContractEnvelope.key == change.idempotency_key)
            )
            if row is not None:
                row.envelope_id = change.envelope_id
        if row is None:
            return {"known": False, "envelope_id": change.envelope_id}
        before = row.status
        advanced = _rank(change.status) > _rank(before)
        if advanced:
            row.status, row.status_changed_at = change.status, change.status_changed_at
        row.last_message_at = utcnow()
        return {
            "known": True,
            "envelope_id": change.envelope_id,
            "deal_id": row.deal_id,
            "contract": row.contract,
            "before": before,
            "status": row.status,
            "advanced": advanced,
        }


def _connect(ctx: RunContext, event: Event) -> None:
    change = EnvelopeEvent.model_validate(event.data)
    recorded = ctx.step("record_status", lambda: _record(change))
    if not recorded["known"]:
        raise FlowIgnored("the envelope was not sent by this product")
    status = recorded["status"]
    if status != change.status or status not in FINAL:
        raise FlowIgnored(
            f"the message reports {change.status}; the envelope is {status}: nothing to do"
        )

    current = settings()
    document = _document(current, recorded["contract"])
    deal_id = recorded["deal_id"]
    loaded = ctx.step("load_deal", lambda: _load_ids(deal_id, current))
    owner = _owner_of(loaded["owner_id"], current)
    envelope_id = change.envelope_id
    key = f"contract:{envelope_id}:{status}"
    if status == "completed":
        ctx.step("move_deal", lambda: _move(ctx, key, document, deal_id))
        ctx.step("attach_signed_pdf", lambda: _attach(ctx, key, event, change, document, deal_id))
        ctx.step("email_owner", lambda: _email_owner(ctx, key, document, loaded, owner))
    elif status == "declined":
        reason = (
            envelope_details(event.payload).decline_reason if change.format != "poll" else None
        )
        ctx.step("declined_activity", lambda: _declined(ctx, key, document, loaded, owner, reason))
    else:
        void_reason = _void_reason(event, change)
        ctx.step("voided_note", lambda: _voided_note(ctx, key, document, deal_id, void_reason))
        ctx.step(
            "voided_activity", lambda: _voided_activity(ctx, key, document, loaded, void_reason)
        )


def _document(current: Settings, name: str) -> ContractDocument:
    documents = current.contracts.documents if current.contracts else []
    found = next((document for document in documents if document.name == name), None)
    if found is None:
        raise FlowAbort(f"config.yaml no longer has the contract {name!r}")
    return found


def _load_ids(deal_id: int, current: Settings) -> Result:
    deal = registry.pipedrive().get_deal(deal_id)
    # Ids only: the run history is no place for names and addresses.
    return {
        "deal_id": deal_id,
        "owner_id": deal["owner_id"],
        "title": deal.get("title") or f"deal {deal_id}",
        "pipeline_id": deal.get("pipeline_id"),
        "person_id": deal.get("person_id"),
    }


def _owner_of(owner_id: int, current: Settings) -> Rep:
    from flows.follow_up import _owner

    return _owner(owner_id, current)


def _void_reason(event: Event, change: EnvelopeEvent) -> str | None:
    if change.format != "poll":
        return envelope_details(event.payload).void_reason
    return (json.loads(event.payload or "{}") or {}).get("voidedReason")


def _move(ctx: RunContext, key: str, document: ContractDocument, deal_id: int) -> Result:
    pipedrive = registry.pipedrive()
    if document.on_completed == "won":
        fields: dict[str, Any] = {"status": "won"}
    else:
        _, stage_id = pipedrive.stage_ids(document.pipeline, document.on_completed)
        fields = {"stage_id": stage_id}
    # A PATCH to the same values twice leaves the deal as once: no lookup needed.
    return ctx.once(
        f"{key}:move", lambda: {"deal_id": pipedrive.update_deal(deal_id, fields)["id"], **fields}
    )


def _signed_pdf(event: Event, change: EnvelopeEvent, envelope_id: str) -> tuple[bytes, str]:
    """The signed PDF from the message when it carried exactly one, else DocuSign's combined."""
    if change.format != "poll" and change.documents == 1:
        documents = envelope_details(event.payload).documents
        if len(documents) == 1 and documents[0][1].startswith(b"%PDF-"):
            return documents[0][1], "message"
    return registry.docusign().combined_pdf(envelope_id), "combined"


def _attach(
    ctx: RunContext,
    key: str,
    event: Event,
    change: EnvelopeEvent,
    document: ContractDocument,
    deal_id: int,
) -> Result:
    pipedrive = registry.pipedrive()
    envelope_id = change.envelope_id
    name = f"{document.name} - signed - {envelope_id}.pdf"

    def attach() -> Result:
        pdf, origin = _signed_pdf(event, change, envelope_id)
        made = pipedrive.attach_file(deal_id, name, pdf, "application/pdf")
        # The PDF itself stays out of the run history: its size and digest say enough.
        digest = hashlib.sha256(pdf).hexdigest()
        return {"file_id": made["id"], "size": len(pdf), "sha256": digest, "from": origin}

    def recover() -> Result | None:
        found = next((f for f in pipedrive.deal_files(deal_id) if envelope_id in f["name"]), None)
        return {"file_id": found["id"], "size": found.get("file_size")} if found else None

    return ctx.once(f"{key}:attach", attach, recover)


def _email_owner(
    ctx: RunContext, key: str, document: ContractDocument, loaded: Result, owner: Rep
) -> Result:
    gmail = registry.gmail()
    domain = owner.email.partition("@")[2] or "salesflow.invalid"
    message_id = f"<contract.{hashlib.sha256(key.encode()).hexdigest()[:32]}@{domain}>"
    context = {"deal": loaded, "owner": owner, "contract": document.name}

    def send_email() -> Result:
        message = build_message(
            sender_name=owner.name,
            sender_email=owner.email,
            to_name=owner.name,
            to_email=owner.email,
            reply_to=owner.email,
            subject=f"Signed: {document.name} for {loaded['title']}"[:200],
            text=render_file("email/contract_signed.txt.j2", context),
            html=render_file("email/contract_signed.html.j2", context),
            message_id=message_id,
        )
        return {"message_id": gmail.send(message)["id"]}

    def recover() -> Result | None:
        found = gmail.find_by_message_id(message_id)
        return {"message_id": found["id"]} if found else None

    return ctx.once(f"{key}:email", send_email, recover)


def _activity(
    ctx: RunContext, key: str, loaded: Result, owner_id: int, subject: str, note: str
) -> Result:
    pipedrive = registry.pipedrive()
    marker = f"salesflow {key}"
    fields: dict[str, Any] = {
        "subject": subject[:250],
        "type": "task",
        "owner_id": owner_id,
        "deal_id": loaded["deal_id"],
        "due_date": utcnow().date().isoformat(),
        "note": f"{note}<p><small>{marker}</small></p>",
    }
    if loaded.get("person_id"):
        fields["participants"] = [{"person_id": loaded["person_id"], "primary": True}]

    def recover() -> Result | None:
        found = pipedrive.find_activity(loaded["deal_id"], marker)
        return {"activity_id": found["id"]} if found else None

    return ctx.once(key, lambda: {"activity_id": pipedrive.create_activity(fields)["id"]}, recover)


def _declined(
    ctx: RunContext,
    key: str,
    document: ContractDocument,
    loaded: Result,
    owner: Rep,
    reason: str | None,
) -> Result:
    from markupsafe import escape

    note = f"<p>The client declined to sign {escape(document.name)}.</p>"
    note += f"<p>Reason: {escape(reason)}</p>" if reason else "<p>No reason was given.</p>"
    subject = f"Contract declined: {loaded['title']}"
    return _activity(ctx, f"{key}:activity", loaded, owner.pipedrive_user_id, subject, note)


def _voided_word(reason: str | None) -> str:
    # DocuSign voids an envelope that ran out of time with this reason.
    return "expired" if reason and "expired" in reason.lower() else "voided"


def _voided_note(
    ctx: RunContext, key: str, document: ContractDocument, deal_id: int, reason: str | None
) -> Result:
    from markupsafe import escape

    marker = f"salesflow {key}:note"
    content = (
        f"<p>The DocuSign envelope for <b>{escape(document.name)}</b> was "
        f"{_voided_word(reason)}: {escape(reason or 'no reason given')}.</p>"
        f"<p><small>{marker}</small></p>"
    )
    return _note(ctx, f"{key}:note", deal_id, content, marker)


def _voided_activity(
    ctx: RunContext, key: str, document: ContractDocument, loaded: Result, reason: str | None
) -> Result:
    word = _voided_word(reason)
    subject = f"Contract {word}: {loaded['title']} (send a new one?)"
    note = f"<p>The envelope for {document.name} was {word}.</p>"
    owner_id = loaded["owner_id"]
    return _activity(ctx, f"{key}:activity", loaded, owner_id, subject, note)


# -- polling, when Connect stays silent -------------------------------------------------


def poll_envelopes(now: datetime | None = None, limit: int = 20) -> int:
    """Ask DocuSign about envelopes Connect said nothing of for a while; returns how many."""
    contracts = settings().contracts
    if contracts is None or not contracts.docusign.account_id:
        return 0
    now = now or utcnow()
    silent_since = now - contracts.poll_delay
    with session() as db:
        rows = db.scalars(
            select(ContractEnvelope)
            .where(
                ContractEnvelope.status.in_(("sent", "delivered")),
                ContractEnvelope.envelope_id.is_not(None),
                or_(
                    ContractEnvelope.last_message_at < silent_since,
                    ContractEnvelope.last_message_at.is_(None)
                    & (ContractEnvelope.sent_at < silent_since),
                ),
                or_(
                    ContractEnvelope.last_polled_at.is_(None),
                    ContractEnvelope.last_polled_at < now - POLL_INTERVAL,
                ),
            )
            .order_by(ContractEnvelope.last_polled_at.is_not(None), ContractEnvelope.id)
            .limit(limit)
        ).all()
    polled = 0
    for row in rows:
        if _claim_poll(row.id, now):
            _poll_one(row)
            polled += 1
    return polled


def _claim_poll(row_id: int, now: datetime) -> bool:
    """Take the envelope's poll turn; another worker that took it first wins."""
    with session() as db:
        taken = db.execute(
            update(ContractEnvelope)
            .where(
                ContractEnvelope.id == row_id,
                or_(
                    ContractEnvelope.last_polled_at.is_(None),
                    ContractEnvelope.last_polled_at < now - POLL_INTERVAL,
                ),
            )
            .values(last_polled_at=now)
        )
        return taken.rowcount == 1


def _poll_one(row: ContractEnvelope) -> None:
    try:
        envelope = registry.docusign().get_envelope(row.envelope_id or "")
    except VendorError as exc:
        logger.warning(
            "envelope poll failed envelope_id=%s error=%s", row.envelope_id, exc.__class__.__name__
        )
        return
    status = str(envelope.get("status") or "")
    logger.info("envelope polled envelope_id=%s status=%s", row.envelope_id, status)
    if _rank(status) <= _rank(row.status):
        return
    change = EnvelopeEvent(
        format="poll",
        event="poll",
        envelope_id=row.envelope_id or "",
        status=status,
        status_changed_at=parse_time(envelope.get("statusChangedDateTime")),
        deal_id=row.deal_id,
        idempotency_key=row.key,
    )
    # Only what the flow reads: the envelope's recipients stay with DocuSign.
    payload = {"status": status, "voidedReason": envelope.get("voidedReason")}
    _store_polled(change, payload)


def _store_polled(change: EnvelopeEvent, payload: dict[str, Any]) -> None:
    """Store the poll's finding as an event (a Connect message of the same is a duplicate)."""
    try:
        with session() as db:
            event = Event(
                source="docusign",
                type=change.type,
                dedup_key=change.dedup_key,
                status="queued",
                data=change.model_dump(mode="json"),
                payload=json.dumps(payload),
            )
            db.add(event)
    except IntegrityError:
        return  # Connect told us in the meantime
    queue.enqueue_event(event.id)
