"""Typed lead events and the parsers that turn vendor payloads into them."""

import hashlib
from datetime import datetime
from typing import Any

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from pydantic import BaseModel, Field

from core.config import BrowserForm, FacebookForm, TypeformForm, WebsiteForm

# Meta's standard lead-ad field names; a form's own mapping adds to these.
FACEBOOK_STANDARD_FIELDS = {
    "full_name": "name",
    "first_name": "first_name",
    "last_name": "last_name",
    "email": "email",
    "phone_number": "phone",
    "company_name": "company",
    "city": "city",
    "country": "country",
}


class MalformedPayload(ValueError):
    """The body is not what the sender's contract promises; the message is a sentence."""


class Lead(BaseModel):
    """A person who asked to be contacted, normalised from any source."""

    name: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    email: str | None = None
    phone: str | None = None
    phone_as_typed: str | None = None
    company: str | None = None
    city: str | None = None
    country: str | None = None
    answers: dict[str, Any] = Field(default_factory=dict)
    hidden: dict[str, str] = Field(default_factory=dict)

    @property
    def display_name(self) -> str | None:
        """The full name, or first and last joined."""
        if self.name:
            return self.name
        joined = " ".join(part for part in (self.first_name, self.last_name) if part)
        return joined or None


class LeadEvent(BaseModel):
    """A lead submission as stored in the event store and read by the lead flow."""

    source: str
    type: str = "lead"
    dedup_key: str
    form_id: str
    lead_source: str
    submitted_at: datetime | None = None
    lead: Lead
    # Leads that arrive as ids only (Facebook) are fetched by the worker; these say which.
    external_id: str | None = None
    meta: dict[str, str] = Field(default_factory=dict)
    require_email: bool = True


def email_key(email: str) -> str:
    """The form used to compare addresses: trimmed and case-folded; a +tag stays."""
    return email.strip().casefold()


def normalise_phone(raw: str, region: str) -> str | None:
    """E.164 for a number written any common way, or None when it is not a number."""
    try:
        parsed = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


Scalar = str | int | float | bool
MAX_TEXT = 2000


def _scalar(value: Any, what: str) -> Scalar:
    # bool is an int in Python; both are fine as answers, never as containers.
    if not isinstance(value, Scalar):
        raise MalformedPayload(f"{what} must be a string, number or boolean.")
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise MalformedPayload(f"{what} is longer than {MAX_TEXT} characters.")
    return value


def _answer(value: Any, what: str) -> Scalar | list[Scalar]:
    """An answer value: a scalar, or a list of scalars (multiple choice)."""
    if isinstance(value, list):
        return [_scalar(item, what) for item in value]
    return _scalar(value, what)


def _assign(lead: dict[str, Any], attribute: str, value: Any) -> None:
    if value is None or value == "":
        return
    text = str(_scalar(value, f"The {attribute} value")).strip()
    if attribute == "phone":
        # Normalised in _finish(), once the lead's own country is known.
        lead["phone_as_typed"] = text
    elif attribute == "email":
        try:
            validate_email(text, check_deliverability=False)
        except EmailNotValidError:
            raise MalformedPayload("The email address is not valid.") from None
        # Kept as typed (a +tag and case included); compared through email_key().
        lead["email"] = text
    else:
        # A line break in a name would end up in an email header: fold whitespace.
        lead[attribute] = " ".join(text.split())


def _finish(lead: dict[str, Any], region: str) -> "Lead":
    """Normalise the phone, in the lead's own country when it gave one, and validate."""
    country = str(lead.get("country") or "").strip().upper()
    if country in phonenumbers.SUPPORTED_REGIONS:
        region = country
    if lead.get("phone_as_typed"):
        lead["phone"] = normalise_phone(lead["phone_as_typed"], region)
    return Lead.model_validate(lead)


def typeform_answer_value(answer: dict[str, Any]) -> Any:
    """The value of one Typeform answer; it sits under a key named by the answer's type."""
    kind = answer.get("type")
    value = answer.get(kind) if isinstance(kind, str) else None
    what = f"The {kind} answer"
    if kind == "choice" and value is not None:
        choice = _object(value, what)
        return _answer(choice.get("label") or choice.get("other"), what)
    if kind == "choices" and value is not None:
        choices = _object(value, what)
        labels = _answer(choices.get("labels") or [], what)
        if not isinstance(labels, list):
            raise MalformedPayload(f"{what} must carry a list of labels.")
        if choices.get("other"):
            labels.append(_scalar(choices["other"], what))
        return labels
    if kind == "payment" and value is not None:
        return _answer(_object(value, what).get("amount"), what)
    return None if value is None else _answer(value, what)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedPayload(f"{what} must be a JSON object.")
    return value


def typeform_form_id(payload: Any) -> tuple[str, str]:
    """The event type and form id of a Typeform webhook body, checked for shape."""
    body = _object(payload, "The body")
    event_type = body.get("event_type")
    if not isinstance(event_type, str):
        raise MalformedPayload("The body has no event_type string.")
    response = _object(body.get("form_response"), "form_response")
    form_id, token = response.get("form_id"), response.get("token")
    if not isinstance(form_id, str) or not isinstance(token, str) or not token:
        raise MalformedPayload("form_response needs form_id and token strings.")
    return event_type, form_id


def lead_from_typeform(payload: dict[str, Any], form: TypeformForm, region: str) -> LeadEvent:
    """Map a Typeform form_response to a lead through the form's field refs."""
    response = payload["form_response"]
    # Typeform leaves answers out when none were given.
    answers = response.get("answers", [])
    if not isinstance(answers, list):
        raise MalformedPayload("form_response.answers must be a list when present.")

    lead: dict[str, Any] = {"answers": {}, "hidden": {}}
    for answer in answers:
        field = _object(_object(answer, "Each answer").get("field"), "Each answer's field")
        ref = field.get("ref")
        if not isinstance(ref, str):
            raise MalformedPayload("Each answer needs a field.ref string.")
        value = typeform_answer_value(answer)
        if ref in form.fields:
            _assign(lead, form.fields[ref], value)
        elif value is not None:
            lead["answers"][ref] = value

    hidden = _object(response.get("hidden") or {}, "hidden")
    lead["hidden"] = {k: str(_scalar(v, f"hidden.{k}")) for k, v in hidden.items() if v}
    return LeadEvent(
        source="typeform",
        dedup_key=f"typeform:{response['form_id']}:{response['token']}",
        form_id=response["form_id"],
        lead_source=form.lead_source,
        submitted_at=response.get("submitted_at"),
        lead=_finish(lead, form.region or region),
    )


def lead_from_form(payload: Any, raw: bytes, form: WebsiteForm, region: str) -> LeadEvent:
    """Map the website backend's signed JSON ({fields, utm, submission_id}) to a lead."""
    body = _object(payload, "The body")
    fields = _object(body.get("fields"), "fields")
    utm = _object(body.get("utm") or {}, "utm")
    submission_id = body.get("submission_id")
    if submission_id is not None and (
        isinstance(submission_id, bool) or not isinstance(submission_id, str | int)
    ):
        raise MalformedPayload("submission_id must be a string when present.")
    form_name = body.get("form")
    if form_name is not None and not isinstance(form_name, str):
        raise MalformedPayload("form must be a string when present.")

    hidden = {k: str(_scalar(v, f"utm.{k}")) for k, v in utm.items() if v}
    lead: dict[str, Any] = {"answers": {}, "hidden": hidden}
    for key, value in fields.items():
        if key in form.fields:
            _assign(lead, form.fields[key], value)
        elif value not in (None, ""):
            lead["answers"][key] = _answer(value, "Each field")

    # Without the backend's own id, the same bytes sent again are the same submission.
    identity = str(submission_id) if submission_id else hashlib.sha256(raw).hexdigest()
    return LeadEvent(
        source="form",
        dedup_key=f"form:{identity}",
        form_id=form_name or "website",
        lead_source=form.lead_source,
        submitted_at=body.get("submitted_at"),
        lead=_finish(lead, form.region or region),
    )


def facebook_leadgen_changes(payload: Any) -> list[dict[str, str]]:
    """The leadgen changes of a Page webhook body, each with string ids; others dropped."""
    body = _object(payload, "The body")
    entries = body.get("entry")
    if body.get("object") != "page" or not isinstance(entries, list):
        raise MalformedPayload("The body must be a Page webhook with an entry list.")
    changes = []
    for entry in entries:
        for change in _object(entry, "Each entry").get("changes") or []:
            change = _object(change, "Each change")
            if change.get("field") != "leadgen":
                continue
            value = _object(change.get("value"), "A leadgen change's value")
            ids = {key: value.get(key) for key in ("leadgen_id", "form_id", "page_id", "ad_id")}
            if not ids["leadgen_id"] or not ids["form_id"]:
                raise MalformedPayload("A leadgen change needs leadgen_id and form_id.")
            if not all(isinstance(v, str | int) for v in ids.values() if v is not None):
                raise MalformedPayload("Leadgen ids must be strings or numbers.")
            changes.append({key: str(v) for key, v in ids.items() if v is not None})
    return changes


def facebook_event(change: dict[str, str], form: FacebookForm) -> LeadEvent:
    """A lead event for one leadgen change; the worker fetches the lead itself."""
    return LeadEvent(
        source="facebook",
        type="leadgen",
        dedup_key=f"facebook:{change['leadgen_id']}",
        form_id=change["form_id"],
        lead_source=form.lead_source,
        lead=Lead(),
        external_id=change["leadgen_id"],
        meta={k: v for k, v in change.items() if k in ("page_id", "ad_id")},
        require_email=form.require_email,
    )


def lead_from_graph(field_data: Any, form: FacebookForm, region: str) -> Lead:
    """Map a Graph lead's field_data ({name, values[]}) to a lead; lists stay lists."""
    if not isinstance(field_data, list):
        raise MalformedPayload("The Graph lead has no field_data list.")
    mapping = {**FACEBOOK_STANDARD_FIELDS, **form.fields}
    lead: dict[str, Any] = {"answers": {}, "hidden": {}}
    for item in field_data:
        item = _object(item, "Each field_data entry")
        name, values = item.get("name"), item.get("values") or []
        if not isinstance(name, str) or not isinstance(values, list):
            raise MalformedPayload("Each field_data entry needs a name and a values list.")
        value = _answer(values[0] if len(values) == 1 else values, f"The answer to {name!r}")
        if name in mapping and not isinstance(value, list):
            _assign(lead, mapping[name], value)
        elif values:
            lead["answers"][name] = value
    return _finish(lead, form.region or region)


def lead_from_browser(
    fields: dict[str, list[str]], key: str, raw: bytes, form: BrowserForm, region: str
) -> LeadEvent:
    """Map a browser form post (field -> values) to a lead; repeated fields stay lists."""
    lead: dict[str, Any] = {"answers": {}, "hidden": {}}
    for name, values in fields.items():
        if name == form.honeypot:
            continue
        value: Any = values[0] if len(values) == 1 else values
        if name in form.fields and not isinstance(value, list):
            _assign(lead, form.fields[name], value)
        elif name.startswith("utm_") and value:
            lead["hidden"][name] = str(value)
        elif value not in ("", []):
            lead["answers"][name] = value
    return LeadEvent(
        source="browser_form",
        dedup_key=f"browser_form:{key}:{hashlib.sha256(raw).hexdigest()}",
        form_id=key,
        lead_source=form.lead_source,
        lead=_finish(lead, form.region or region),
    )
