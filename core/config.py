"""config.yaml, validated at start-up; secrets come from the environment via ${VAR}."""

import functools
import os
import re
from datetime import date, time, timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
import yaml
from jinja2 import TemplateSyntaxError
from jinja2.sandbox import SandboxedEnvironment
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# ${VAR} or ${VAR:-default}; the default may be empty.
_ENV_REF = re.compile(r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}")

LEAD_ATTRIBUTES = (
    "name",
    "first_name",
    "last_name",
    "email",
    "phone",
    "company",
    "city",
    "country",
)
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HOURS = re.compile(r"^(\d{2}):(\d{2})-(\d{2}):(\d{2})$")


class ConfigError(Exception):
    """A config.yaml that cannot run; the message names the key and what is expected."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _weekdays(spec: str) -> list[int]:
    """'mon-fri' or 'sat' or 'mon,wed' -> weekday numbers (Monday 0)."""
    days: list[int] = []
    for part in spec.lower().split(","):
        first, _, last = part.strip().partition("-")
        if first not in WEEKDAYS or (last and last not in WEEKDAYS):
            raise ValueError(f"expected days such as mon-fri or sat, got {spec!r}")
        start, end = WEEKDAYS.index(first), WEEKDAYS.index(last or first)
        days.extend(range(start, end + 1) if start <= end else [*range(start, 7), *range(end + 1)])
    return days


def _hours(spec: str) -> tuple[time, time]:
    match = _HOURS.match(spec.strip())
    if not match:
        raise ValueError(f"expected hours such as 09:00-18:00, got {spec!r}")
    h1, m1, h2, m2 = (int(group) for group in match.groups())
    if not (h1 < 24 and h2 <= 24 and m1 < 60 and m2 < 60):
        raise ValueError(f"expected hours such as 09:00-18:00, got {spec!r}")
    end = time(23, 59, 59) if (h2, m2) == (24, 0) else time(h2, m2)
    return time(h1, m1), end


class Rep(_Strict):
    """A sales rep: who they are in Pipedrive and when they take leads."""

    name: str
    email: str
    pipedrive_user_id: int
    # How pools, rules and the fallback refer to the rep; the email when unset.
    id: str | None = None
    timezone: str = "UTC"
    # Days -> hours, e.g. {"mon-fri": "09:00-18:00"}; unset means always available.
    working_hours: dict[str, str] | None = None
    days_off: list[date] = Field(default_factory=list)
    daily_cap: int | None = Field(default=None, gt=0)

    @property
    def key(self) -> str:
        """The id pools and rules use."""
        return self.id or self.email

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        return _check_zone(value)

    @field_validator("working_hours")
    @classmethod
    def _valid_hours(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for days, hours in (value or {}).items():
            _weekdays(days)
            _hours(hours)
        return value

    def hours_on(self, weekday: int) -> tuple[time, time] | None:
        """The working window on a weekday (Monday 0), None for a day not worked."""
        if self.working_hours is None:
            return time(0, 0), time(23, 59, 59)
        for days, hours in self.working_hours.items():
            if weekday in _weekdays(days):
                return _hours(hours)
        return None


class Pool(_Strict):
    """Reps who share leads by turns."""

    strategy: Literal["round_robin", "weighted"] = "round_robin"
    # A list of rep ids (round_robin) or rep id -> weight (weighted, e.g. 2:1:1).
    reps: list[str] | dict[str, int]

    @model_validator(mode="after")
    def _weights_fit(self) -> "Pool":
        if not self.reps:
            raise ValueError("a pool needs at least one rep")
        if self.strategy == "weighted" and not isinstance(self.reps, dict):
            raise ValueError("a weighted pool lists reps as `rep id: weight`")
        if isinstance(self.reps, dict) and any(w < 1 for w in self.reps.values()):
            raise ValueError("weights are whole numbers of at least 1")
        return self

    def weights(self) -> dict[str, int]:
        """Rep id -> weight (1 each for a list)."""
        return dict(self.reps) if isinstance(self.reps, dict) else dict.fromkeys(self.reps, 1)


class Condition(_Strict):
    """One test on a lead; every condition of a rule must hold."""

    # A path into the event: source, form_id, lead_source, country, answers.X, hidden.X, ...
    field: str
    equals: str | float | bool | None = None
    any_of: list[str] | None = None
    gte: float | None = None
    lte: float | None = None
    contains: str | None = None


class Rule(_Strict):
    """Leads that match go to one rep or one pool."""

    name: str
    when: list[Condition] = Field(min_length=1)
    rep: str | None = None
    pool: str | None = None

    @model_validator(mode="after")
    def _one_target(self) -> "Rule":
        if (self.rep is None) == (self.pool is None):
            raise ValueError(f"rule {self.name!r} needs exactly one of `rep` or `pool`")
        return self


class Assignment(_Strict):
    """How new leads find their owner."""

    keep_existing_owner: bool = True
    default_pool: str = "everyone"
    pools: dict[str, Pool] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)
    # Gets the lead when no rep is available (outside hours, capped, inactive).
    fallback_owner: str | None = None


class WebhookSettings(_Strict):
    """A receiver's signing secret and body limit."""

    secret: str = Field(min_length=1)
    max_bytes: int = Field(default=1_048_576, gt=0)


class Webhooks(_Strict):
    """Settings of the signed JSON receivers."""

    typeform: WebhookSettings
    form: WebhookSettings


class _LeadForm(_Strict):
    """What every lead source's form shares: a field mapping, a source label, a region."""

    # The source's field name -> lead attribute (name, email, phone, company, ...).
    fields: dict[str, str]
    lead_source: str
    region: str | None = None

    @field_validator("fields")
    @classmethod
    def _known_attributes(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_attributes(value)


class TypeformForm(_LeadForm):
    """How one Typeform form's answers become a lead (fields keyed by answer ref)."""

    lead_source: str = "Typeform"


class WebsiteForm(_LeadForm):
    """How the website backend's signed JSON becomes a lead (keys of its `fields`)."""

    lead_source: str = "Website"


class FacebookForm(_LeadForm):
    """How one lead-ad form's fields become a lead (a standard name or the question's text)."""

    fields: dict[str, str] = Field(default_factory=dict)
    lead_source: str = "Facebook"
    # Lead ads often ask only for a phone number.
    require_email: bool = False


class BrowserForm(_LeadForm):
    """A contact form posted straight from visitors' browsers (posted field names)."""

    lead_source: str = "Website"
    allowed_origins: list[str] = Field(min_length=1)
    thank_you_url: str
    honeypot: str | None = "website"
    rate_limit: str = "5 per minute;50 per day"


class LeadSources(_Strict):
    """Every source of leads the deployment accepts."""

    typeform: dict[str, TypeformForm] = Field(default_factory=dict)
    form: WebsiteForm | None = None
    # Facebook form id -> mapping; "default" serves forms not listed.
    facebook: dict[str, FacebookForm] = Field(default_factory=dict)
    browser_forms: dict[str, BrowserForm] = Field(default_factory=dict)


def _parses(value: str | None) -> str | None:
    if value is not None:
        try:
            SandboxedEnvironment().parse(value)
        except TemplateSyntaxError as exc:
            raise ValueError(f"the Jinja template does not parse: {exc.message}") from None
    return value


class WelcomeEmail(_Strict):
    """The first email a lead gets, from the assigned rep."""

    template: str = "welcome"
    subject: str

    _subject_parses = field_validator("subject")(_parses)


class LeadCapture(_Strict):
    """What the lead flow creates in Pipedrive and sends by Gmail."""

    sources: LeadSources
    pipeline: str
    stage: str
    deal_title: str
    deal_value: str | None = None
    currency: str = "EUR"
    # Pipedrive deal field name -> a path into the lead (answers.budget, hidden.utm_campaign).
    custom_fields: dict[str, str] = Field(default_factory=dict)
    welcome_email: WelcomeEmail

    _templates_parse = field_validator("deal_title", "deal_value")(_parses)


class Pipedrive(_Strict):
    """Pipedrive credentials and endpoint."""

    api_token: str = Field(min_length=1)
    base_url: str = "https://api.pipedrive.com"
    timeout_s: float = Field(default=10.0, gt=0)
    # HTTP Basic credentials Pipedrive sends with its webhooks; unset refuses every delivery.
    webhook_user: str = ""
    webhook_password: str = ""
    webhook_max_bytes: int = Field(default=1_048_576, gt=0)


class Google(_Strict):
    """Google OAuth credentials and endpoints of the sending mailbox."""

    client_id: str = Field(min_length=1)
    client_secret: str = Field(min_length=1)
    refresh_token: str = Field(min_length=1)
    token_url: str = "https://oauth2.googleapis.com/token"
    # Empty means Google's own endpoints from the bundled discovery documents.
    api_base_url: str = ""
    sender: str = "me"
    timeout_s: float = Field(default=10.0, gt=0)


class Retry(_Strict):
    """The shared retry policy for vendor calls."""

    attempts: int = Field(default=5, ge=1)
    base_delay_s: float = Field(default=0.5, gt=0)
    max_delay_s: float = Field(default=30.0, gt=0)


class Facebook(_Strict):
    """The Meta app, its page token and the Graph endpoint."""

    app_secret: str = Field(min_length=1)
    verify_token: str = Field(min_length=1)
    page_access_token: str = Field(min_length=1)
    graph_url: str = "https://graph.facebook.com"
    api_version: str = Field(default="v23.0", pattern=r"^v\d+\.\d+$")
    timeout_s: float = Field(default=10.0, gt=0)
    max_bytes: int = Field(default=1_048_576, gt=0)


class EmailAction(_Strict):
    """An email from the deal's owner to the deal's person."""

    template: str
    subject: str

    _subject_parses = field_validator("subject")(_parses)


class ActivityAction(_Strict):
    """A Pipedrive activity on the deal for its owner."""

    type: str = "task"
    subject: str
    due_in_business_days: int = Field(default=1, ge=0)
    # HH:MM in the owner's time zone; unset makes an all-day activity.
    due_time: str | None = None
    note: str | None = None

    _templates_parse = field_validator("subject", "note")(_parses)

    @field_validator("due_time")
    @classmethod
    def _clock(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", value):
            raise ValueError(f"expected a time such as 10:00, got {value!r}")
        return value


class CalendarAction(_Strict):
    """A reminder in the deal owner's Google Calendar."""

    summary: str
    description: str | None = None
    in_business_days: int = Field(default=1, ge=0)
    at: str = "09:00"
    duration_minutes: int = Field(default=30, gt=0, le=1440)

    _templates_parse = field_validator("summary", "description")(_parses)

    @field_validator("at")
    @classmethod
    def _clock(cls, value: str) -> str:
        if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", value):
            raise ValueError(f"expected a time such as 10:00, got {value!r}")
        return value


class TriggerAction(_Strict):
    """One thing to do when a trigger fires; exactly one key is set."""

    email: EmailAction | None = None
    activity: ActivityAction | None = None
    calendar_reminder: CalendarAction | None = None
    start_sequence: str | None = Field(default=None, min_length=1)
    stop_sequences: bool | None = None
    # Send the deal's contract (see `contracts`) for e-signature.
    send_contract: bool | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "TriggerAction":
        # Counted by value, not by the keys given: a dumped and re-read config has them all.
        if sum(value is not None for value in self.__dict__.values()) != 1:
            raise ValueError(
                "each action has exactly one of email, activity, calendar_reminder, "
                "start_sequence, stop_sequences, send_contract"
            )
        if self.stop_sequences is False:
            raise ValueError("stop_sequences: write `stop_sequences: true` or leave it out")
        if self.send_contract is False:
            raise ValueError("send_contract: write `send_contract: true` or leave it out")
        return self

    @property
    def kind(self) -> str:
        """The action's key in config.yaml."""
        return next(key for key, value in self.__dict__.items() if value is not None)


class Trigger(_Strict):
    """Actions to run when a deal enters a stage, or is won or lost."""

    name: str = Field(min_length=1)
    pipeline: str | None = None
    stage: str | None = None
    status: Literal["won", "lost"] | None = None
    actions: list[TriggerAction] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_condition(self) -> "Trigger":
        if (self.stage is None) == (self.status is None):
            raise ValueError(f"trigger {self.name!r} needs exactly one of `stage` or `status`")
        if self.stage is not None and self.pipeline is None:
            raise ValueError(f"trigger {self.name!r} names a stage: give its `pipeline` too")
        return self


class FollowUp(_Strict):
    """Stage triggers: what happens when a deal moves."""

    triggers: list[Trigger] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> "FollowUp":
        names = [trigger.name for trigger in self.triggers]
        if len(set(names)) != len(names):
            raise ValueError("two triggers share a name; the name keys their side effects")
        return self


_DELAY = re.compile(
    r"^\s*(\d+)\s*(minutes?|hours?|days?|business[ _]days?|weeks?)\s*$", re.IGNORECASE
)
_DELAY_UNITS = {
    "minute": "minutes",
    "hour": "hours",
    "day": "days",
    "business day": "business_days",
    "business_day": "business_days",
    "week": "weeks",
}
SEQUENCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


def parse_delay(spec: str) -> tuple[int, str]:
    """'3 business days' -> (3, 'business_days'); minutes, hours, days and weeks too."""
    match = _DELAY.match(spec)
    if not match:
        raise ValueError(
            f"expected a delay such as 90 minutes, 4 hours, 3 business days or 2 weeks, "
            f"got {spec!r}"
        )
    unit = match.group(2).lower().rstrip("s")
    return int(match.group(1)), _DELAY_UNITS[unit]


class SendingWindow(_Strict):
    """When sequence steps may go out: a time zone, hours per weekday, holidays."""

    # "lead" (from the person's phone number, else the owner's zone), "rep", or an IANA zone.
    timezone: str = "lead"
    # Days -> hours in that zone, e.g. {"mon-fri": "09:00-17:00"}; other days are closed.
    hours: dict[str, str] = Field(default_factory=lambda: {"mon-fri": "09:00-17:00"})
    holidays: list[date] = Field(default_factory=list)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        if value in ("lead", "rep"):
            return value
        return Rep._known_zone(value)

    @field_validator("hours")
    @classmethod
    def _valid_hours(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("a sending window needs at least one day, e.g. mon-fri: 09:00-17:00")
        for days, hours in value.items():
            _weekdays(days)
            start, end = _hours(hours)
            if start >= end:
                raise ValueError(f"{days}: the window {hours!r} ends before it starts")
        return value

    def opening_hours(self) -> dict[int, tuple[time, time]]:
        """Weekday (Monday 0) -> the open hours that day."""
        return {
            day: _hours(hours) for days, hours in self.hours.items() for day in _weekdays(days)
        }


class SequenceStep(_Strict):
    """One touch of a sequence: wait, then send an email in the thread or give the rep a task."""

    delay: str = "0 minutes"
    action: Literal["email", "task"]
    # email: templates/email/sequence_<template>.txt.j2 and .html.j2
    template: str | None = None
    # email: the subject of the sequence's first email (later ones reply in its thread);
    # task: the activity's subject.
    subject: str | None = None
    # task: the Pipedrive activity type key and when it is due, in business days.
    task_type: str = "task"
    due_in_business_days: int = Field(default=0, ge=0)

    _subject_parses = field_validator("subject")(_parses)

    @field_validator("delay")
    @classmethod
    def _valid_delay(cls, value: str) -> str:
        parse_delay(value)
        return value

    @field_validator("template")
    @classmethod
    def _template_exists(cls, value: str | None) -> str | None:
        if value is None:
            return value
        folder = Path(__file__).resolve().parent.parent / "templates" / "email"
        for suffix in ("txt", "html"):
            if not (folder / f"sequence_{value}.{suffix}.j2").is_file():
                raise ValueError(f"templates/email/sequence_{value}.{suffix}.j2 does not exist")
        return value

    @model_validator(mode="after")
    def _action_fields(self) -> "SequenceStep":
        if self.action == "email" and self.template is None:
            raise ValueError("an email step needs a `template`")
        if self.action == "task" and not self.subject:
            raise ValueError("a task step needs a `subject`")
        return self


class Sequence(_Strict):
    """Timed touches for one deal's person; it stops when the lead replies or the deal moves."""

    steps: list[SequenceStep] = Field(min_length=1)
    window: SendingWindow = SendingWindow()

    @model_validator(mode="after")
    def _threaded_subjects(self) -> "Sequence":
        emails = [step for step in self.steps if step.action == "email"]
        if emails and not emails[0].subject:
            raise ValueError("the first email step needs a `subject`: it opens the thread")
        if any(step.subject for step in emails[1:]):
            # Gmail threads a reply only when its subject matches the thread's.
            raise ValueError(
                "only the first email step has a `subject`; later emails reply in its thread"
            )
        return self


class Dashboard(_Strict):
    """Who may sign in to /dashboard, and the time zone its days are counted in."""

    # User name -> a werkzeug.security password hash (generate_password_hash).
    users: dict[str, str] = Field(default_factory=dict)
    timezone: str = "UTC"

    @field_validator("users")
    @classmethod
    def _hashes(cls, value: dict[str, str]) -> dict[str, str]:
        for user, hashed in value.items():
            method, *rest = hashed.split("$")
            if len(rest) != 2 or not method.startswith(("scrypt", "pbkdf2")):
                raise ValueError(
                    f"{user!r}: expected a hash from werkzeug.security.generate_password_hash "
                    "(scrypt:... or pbkdf2:...), not a password"
                )
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return _check_zone(value)


class Unsubscribe(_Strict):
    """The signed unsubscribe link every sequence email carries."""

    secret: str = Field(min_length=16)
    # The deployment's public URL; links point to <base_url>/unsubscribe/<token>.
    base_url: str = Field(pattern=r"^https?://")


def _duration(spec: str) -> timedelta:
    """'30 days' or '6 hours' as a timedelta (business days make no sense for a window)."""
    count, unit = parse_delay(spec)
    if unit == "business_days":
        raise ValueError(f"expected minutes, hours, days or weeks, got {spec!r}")
    return timedelta(**{unit: count})


def _parses_each(value: dict[str, str]) -> dict[str, str]:
    for source in value.values():
        _parses(source)
    return value


class DocuSign(_Strict):
    """DocuSign credentials (JWT grant or a pre-issued token), endpoints and Connect keys."""

    account_id: str = ""
    integration_key: str = ""
    user_id: str = ""
    # The integration key's RSA private key, PEM text.
    private_key: str = ""
    # A pre-issued token instead of the JWT grant (sandbox and tests).
    access_token: str = ""
    base_path: str = "https://demo.docusign.net/restapi"
    # account-d.docusign.com (developer) or account.docusign.com; a URL with http:// too.
    oauth_host: str = "account-d.docusign.com"
    # Comma-separated; any one may sign a Connect message (key rotation).
    connect_hmac_keys: str = ""
    connect_max_bytes: int = Field(default=25 * 1024 * 1024, gt=0)
    timeout_s: float = Field(default=10.0, gt=0)

    def hmac_keys(self) -> list[str]:
        """The Connect HMAC secrets, blanks dropped."""
        return [key.strip() for key in self.connect_hmac_keys.split(",") if key.strip()]


class ContractTemplate(_Strict):
    """A DocuSign template: the signer's role and its text tabs by tabLabel."""

    template_id: str = Field(min_length=1)
    signer_role: str = Field(min_length=1)
    # tabLabel -> a Jinja expression over deal, person, org, owner (filters money, date).
    tabs: dict[str, str] = Field(default_factory=dict)

    _tabs_parse = field_validator("tabs")(_parses_each)


class ContractGoogleDoc(_Strict):
    """A Google Docs template: copied, {{placeholders}} replaced, exported to PDF."""

    document_id: str = Field(min_length=1)
    file_name: str = "{{ deal.title }}"
    # Placeholder name (inside {{ }} in the document) -> a Jinja expression.
    placeholders: dict[str, str] = Field(default_factory=dict)
    # Text in the document where the signer signs (DocuSign anchor tab).
    signature_anchor: str = Field(default="/sig1/", min_length=1)

    _file_name_parses = field_validator("file_name")(_parses)
    _placeholders_parse = field_validator("placeholders")(_parses_each)


class CarbonCopy(_Strict):
    """Who gets a copy: the deal's owner, or a named person (a manager)."""

    owner: bool = False
    name: str | None = None
    email: str | None = None
    # The template's carbon-copy role (DocuSign template documents only).
    role: str | None = None

    @model_validator(mode="after")
    def _one_person(self) -> "CarbonCopy":
        if self.owner == bool(self.name and self.email):
            raise ValueError("a carbon copy is `owner: true` or has a `name` and an `email`")
        return self


class ContractDocument(_Strict):
    """One contract: which deals it is for, how the document is made, who signs."""

    name: str = Field(min_length=1, max_length=64)
    pipeline: str
    # With contracts.product_field: deals whose field holds this value get this contract.
    product: str | None = None
    template: ContractTemplate | None = None
    google_doc: ContractGoogleDoc | None = None
    email_subject: str = "Please DocuSign: {{ deal.title }}"
    # A Jinja expression giving a locale such as ka_GE; unset: from the person's phone
    # number's country, else default_region.
    locale: str | None = None
    carbon_copies: list[CarbonCopy] = Field(default_factory=list)
    # "won", or the name of a stage of `pipeline` to move the deal to once signed.
    on_completed: str = "won"

    _templates_parse = field_validator("email_subject", "locale")(_parses)

    @model_validator(mode="after")
    def _one_source(self) -> "ContractDocument":
        if (self.template is None) == (self.google_doc is None):
            raise ValueError(f"contract {self.name!r} needs exactly one of template, google_doc")
        if self.template is not None and any(cc.role is None for cc in self.carbon_copies):
            raise ValueError(
                f"contract {self.name!r}: with a template every carbon copy names its `role`"
            )
        return self


class Contracts(_Strict):
    """Proposal contracts sent for e-signature through DocuSign."""

    docusign: DocuSign = DocuSign()
    documents: list[ContractDocument] = Field(min_length=1)
    # A deal field (by name) whose value picks the contract among those of a pipeline.
    product_field: str | None = None
    # A deal field (by name) that gets the envelope id; unset writes none.
    envelope_field: str | None = None
    # Re-entering the stage within this does not send a second envelope.
    resend_window: str = "30 days"
    # No Connect message for this long: ask DocuSign (at most every 15 minutes).
    poll_after: str = "6 hours"

    @field_validator("resend_window", "poll_after")
    @classmethod
    def _valid_duration(cls, value: str) -> str:
        _duration(value)
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> "Contracts":
        names = [document.name for document in self.documents]
        if len(set(names)) != len(names):
            raise ValueError("two contracts share a name; the name keys their envelopes")
        return self

    @property
    def window(self) -> timedelta:
        """resend_window as a timedelta."""
        return _duration(self.resend_window)

    @property
    def poll_delay(self) -> timedelta:
        """poll_after as a timedelta."""
        return _duration(self.poll_after)


class Settings(_Strict):
    """The whole of config.yaml."""

    company_name: str
    default_region: str = "US"
    retry: Retry = Retry()
    webhooks: Webhooks
    pipedrive: Pipedrive
    google: Google
    facebook: Facebook | None = None
    reps: list[Rep] = Field(min_length=1)
    assignment: Assignment = Assignment()
    lead_capture: LeadCapture
    follow_up: FollowUp = FollowUp()
    # Sequence name -> its steps and sending window.
    sequences: dict[str, Sequence] = Field(default_factory=dict)
    unsubscribe: Unsubscribe | None = None
    contracts: Contracts | None = None
    dashboard: Dashboard = Dashboard()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Proxies in front of the web (Heroku and Render: one) whose X-Forwarded-For we trust.
    trusted_proxies: int = Field(default=1, ge=0)

    @model_validator(mode="after")
    def _references_resolve(self) -> "Settings":
        keys = [rep.key for rep in self.reps]
        if len(set(keys)) != len(keys):
            raise ValueError("reps: two reps share an id (or an email)")
        pools = self.assignment.pools or {"everyone": Pool(reps=keys)}
        for name, pool in pools.items():
            for key in pool.weights():
                if key not in keys:
                    raise ValueError(f"assignment.pools.{name}: no rep with id {key!r}")
        if self.assignment.default_pool not in pools:
            raise ValueError(f"assignment.default_pool: no pool {self.assignment.default_pool!r}")
        for rule in self.assignment.rules:
            if rule.pool is not None and rule.pool not in pools:
                raise ValueError(f"assignment.rules: {rule.name!r} names no pool {rule.pool!r}")
            if rule.rep is not None and rule.rep not in keys:
                raise ValueError(f"assignment.rules: {rule.name!r} names no rep {rule.rep!r}")
        fallback = self.assignment.fallback_owner
        if fallback is not None and fallback not in keys:
            raise ValueError(f"assignment.fallback_owner: no rep with id {fallback!r}")
        if self.lead_capture.sources.facebook and self.facebook is None:
            raise ValueError("lead_capture.sources.facebook needs the `facebook` section")
        return self

    @model_validator(mode="after")
    def _sequences_fit(self) -> "Settings":
        for name, sequence in self.sequences.items():
            if not SEQUENCE_NAME.match(name):
                raise ValueError(
                    f"sequences: {name!r} is not a valid name; use up to 40 lowercase letters, "
                    "digits, - and _"
                )
            if self.unsubscribe is None and any(s.action == "email" for s in sequence.steps):
                raise ValueError(
                    f"sequences.{name} sends emails: set `unsubscribe.secret` and "
                    "`unsubscribe.base_url` so each one carries an unsubscribe link"
                )
        for trigger in self.follow_up.triggers:
            for action in trigger.actions:
                if action.send_contract and self.contracts is None:
                    raise ValueError(
                        f"follow_up.triggers: {trigger.name!r} sends a contract: configure "
                        "`contracts`"
                    )
                if action.start_sequence and action.start_sequence not in self.sequences:
                    raise ValueError(
                        f"follow_up.triggers: {trigger.name!r} starts a sequence "
                        f"{action.start_sequence!r} that `sequences` does not define"
                    )
        return self

    def pools(self) -> dict[str, Pool]:
        """The configured pools, or one round-robin pool of every rep."""
        return self.assignment.pools or {"everyone": Pool(reps=[rep.key for rep in self.reps])}

    def rep(self, key: str) -> Rep:
        """The rep with this id."""
        return next(rep for rep in self.reps if rep.key == key)

    @field_validator("default_region")
    @classmethod
    def _known_region(cls, value: str) -> str:
        if value.upper() not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"expected an ISO 3166 region code such as GE or US, got {value!r}")
        return value.upper()


def _check_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"expected an IANA time zone such as Europe/Berlin, got {value!r}"
        ) from None
    return value


def _check_attributes(mapping: dict[str, str]) -> dict[str, str]:
    for key, attribute in mapping.items():
        if attribute not in LEAD_ATTRIBUTES:
            allowed = ", ".join(LEAD_ATTRIBUTES)
            raise ValueError(f"{key!r} maps to {attribute!r}; expected one of {allowed}")
    return mapping


def expand_env(value: Any, environ: dict[str, str], path: str = "") -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string of a parsed YAML tree."""
    if isinstance(value, dict):
        return {
            k: expand_env(v, environ, f"{path}.{k}" if path else str(k)) for k, v in value.items()
        }
    if isinstance(value, list):
        return [expand_env(v, environ, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        # As in the shell, ${VAR:-default} takes the default for a set-but-empty VAR too:
        # the platforms' dashboards leave optional variables empty rather than unset.
        if environ.get(name) or (name in environ and default is None):
            return environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{path}: the environment variable {name} is not set")

    return _ENV_REF.sub(substitute, value)


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"{key}: {item['msg']}")
    return "; ".join(lines)


def load_settings(
    path: str | Path | None = None, environ: dict[str, str] | None = None
) -> Settings:
    """Read, expand and validate the config file; raise ConfigError with the bad key."""
    path = Path(path or os.environ.get("CONFIG_PATH", "config.yaml"))
    environ = dict(os.environ if environ is None else environ)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of settings at the top level")

    try:
        return Settings.model_validate(expand_env(raw, environ))
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from exc


@functools.cache
def settings() -> Settings:
    """The process-wide settings, loaded once from CONFIG_PATH."""
    return load_settings()
