"""Operator commands: `flask --app app check-config | google-auth | docusign-consent |
register-webhooks | simulate | send-contract`."""

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import click
import yaml
from flask import Flask
from flask.cli import ScriptInfo

from core.config import _ENV_REF, ConfigError, Settings, load_settings

# These must run before config.yaml can load: google-auth makes GOOGLE_REFRESH_TOKEN, and
# check-config is how you find out what is wrong.
SETUP_COMMANDS = (
    "check-config",
    "google-auth",
    "docusign-consent",
    "register-webhooks",
    "simulate",
)

GOOGLE_SCOPES = [
    "https://www.googleapis.com/auth/gmail.send",
    "https://www.googleapis.com/auth/gmail.readonly",
    "https://www.googleapis.com/auth/calendar.events",
    "https://www.googleapis.com/auth/drive.file",
    "https://www.googleapis.com/auth/documents",
]
GOOGLE_AUTH_URI = "https://accounts.google.com/o/oauth2/auth"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"

DOCUSIGN_DEMO_HOST = "account-d.docusign.com"
DOCUSIGN_PRODUCTION_HOST = "account.docusign.com"
DOCUSIGN_SCOPES = "signature impersonation"

# Source -> (route, secret variable, signature header, signer name in core.signatures).
SIMULATED_SOURCES = {
    "typeform": (
        "/webhooks/typeform",
        "TYPEFORM_WEBHOOK_SECRET",
        "Typeform-Signature",
        "sign_base64_sha256",
    ),
    "form": ("/webhooks/form", "FORM_WEBHOOK_SECRET", "X-Signature", "sign_hex_sha256"),
}


def config_optional() -> bool:
    """True while a setup command runs under the flask CLI: a broken config must not stop it."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.find_object(ScriptInfo) is None:
        return False
    commands = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
    return any(name in SETUP_COMMANDS for name in commands)


def setup_app() -> Flask:
    """A bare app carrying only the setup commands, for a config.yaml that does not load yet."""
    app = Flask("app")
    register(app)
    return app


def register(app: Flask) -> None:
    """Add the deployment commands to the app's CLI."""
    for command in (check_config, google_auth, docusign_consent, register_webhooks, simulate):
        app.cli.add_command(command)
    app.cli.add_command(send_contract)


# -- check-config ----------------------------------------------------------------------


@dataclass
class Finding:
    """One thing check-config found: the key it concerns and what is wrong."""

    key: str
    message: str
    fatal: bool = True

    def line(self) -> str:
        return f"{'error' if self.fatal else 'warning'}: {self.key}: {self.message}"


def _config_path() -> Path:
    return Path(os.environ.get("CONFIG_PATH", "config.yaml"))


def _missing_env(tree: Any, path: str = "") -> list[tuple[str, str]]:
    """(key, VAR) for every ${VAR} without a default whose variable is unset."""
    if isinstance(tree, dict):
        return [m for k, v in tree.items() for m in _missing_env(v, f"{path}.{k}" if path else k)]
    if isinstance(tree, list):
        return [m for i, v in enumerate(tree) for m in _missing_env(v, f"{path}[{i}]")]
    if not isinstance(tree, str):
        return []
    return [
        (path, match.group(1))
        for match in _ENV_REF.finditer(tree)
        if match.group(2) is None and match.group(1) not in os.environ
    ]


def _schema_findings(path: Path, placeholders: dict[str, str]) -> tuple[Settings | None, list]:
    # Unset variables get placeholders so the schema errors show in the same run.
    try:
        return load_settings(path, {**os.environ, **placeholders}), []
    except ConfigError as exc:
        text = str(exc)
        if not text.startswith(f"{path}: "):
            return None, [Finding(str(path), text)]
        parts = text.removeprefix(f"{path}: ").split("; ")
        return None, [Finding(*_split_key(part)) for part in parts]


def _split_key(part: str) -> tuple[str, str]:
    key, sep, message = part.partition(": ")
    return (key, message) if sep else ("(file)", part)


def _email_templates(current: Settings) -> list[tuple[str, str]]:
    """(config key, template name without its suffix) for every email config.yaml sends."""
    named = [("lead_capture.welcome_email.template", current.lead_capture.welcome_email.template)]
    for i, trigger in enumerate(current.follow_up.triggers):
        for j, action in enumerate(trigger.actions):
            if action.email is not None:
                key = f"follow_up.triggers[{i}].actions[{j}].email.template"
                named.append((key, action.email.template))
    for name, sequence in current.sequences.items():
        for k, step in enumerate(sequence.steps):
            if step.template is not None:
                # Sequence steps name templates/email/sequence_<template>.*.j2.
                key = f"sequences.{name}.steps[{k}].template"
                named.append((key, f"sequence_{step.template}"))
    return named


def _template_findings(current: Settings) -> list[Finding]:
    from jinja2 import TemplateError

    from core.templates import TEMPLATE_DIR, check_template

    lead = current.lead_capture
    sources = {
        "lead_capture.deal_title": lead.deal_title,
        "lead_capture.deal_value": lead.deal_value or "",
        "lead_capture.welcome_email.subject": lead.welcome_email.subject,
    }
    findings = []
    seen: set[str] = set()
    for key, template in _email_templates(current):
        for suffix in ("txt.j2", "html.j2"):
            name = f"email/{template}.{suffix}"
            if name in seen:
                continue  # three steps sharing a template: one finding names it
            seen.add(name)
            file = TEMPLATE_DIR / name
            if not file.is_file():
                findings.append(Finding(key, f"templates/{name} is missing"))
                continue
            sources[f"{key} ({name})"] = file.read_text("utf-8")

    for key, source in sources.items():
        try:
            check_template(source)
        except TemplateError as exc:
            line = getattr(exc, "lineno", None)
            where = f" (line {line})" if line else ""
            findings.append(Finding(key, f"the Jinja template does not parse{where}: {exc}"))
    return findings


def _environment_findings() -> list[Finding]:
    findings = []
    redis_url = os.environ.get("REDIS_URL", "")
    if not redis_url:
        findings.append(Finding("REDIS_URL", "not set; the web and the worker need the queue"))
    elif not redis_url.startswith(("redis://", "rediss://", "unix://")):
        findings.append(Finding("REDIS_URL", "expected a redis://, rediss:// or unix:// URL"))

    database_url = os.environ.get("DATABASE_URL", "")
    if not database_url:
        findings.append(
            Finding(
                "DATABASE_URL",
                "not set: events go to a SQLite file under instance/, which "
                "Heroku and Render wipe at every deploy",
                fatal=False,
            )
        )
    elif not database_url.startswith(("postgres://", "postgresql", "sqlite:")):
        findings.append(Finding("DATABASE_URL", "expected a postgres:// or sqlite:/// URL"))

    if not os.environ.get("ADMIN_TOKEN"):
        findings.append(Finding("ADMIN_TOKEN", "not set: the run-history API is off", fatal=False))
    return findings


def offline_findings() -> tuple[Settings | None, list[Finding]]:
    """Validate config.yaml and the environment without calling any vendor."""
    path = _config_path()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        raw = None  # load_settings below says what is wrong with the file
    missing = _missing_env(raw) if isinstance(raw, dict) else []
    findings = [Finding(key, f"the environment variable {var} is not set") for key, var in missing]

    current, schema = _schema_findings(path, {var: "placeholder" for _, var in missing})
    findings += schema
    if current is not None:
        findings += _template_findings(current)
    return (None if missing else current), findings + _environment_findings()


def online_findings(current: Settings) -> list[Finding]:
    """Ask Pipedrive and Google whether the credentials and the named things exist."""
    from connectors import registry
    from connectors.errors import VendorError

    pipedrive = registry.pipedrive()
    try:
        pipedrive.active_user_ids()
    except VendorError as exc:
        return [Finding("pipedrive.api_token", f"Pipedrive refused the token: {exc}")]

    findings = _pipeline_findings(pipedrive, current) + _rep_findings(pipedrive, current)
    findings += _field_findings(pipedrive, current)
    try:
        # A read-only call: the refresh token is exchanged and the gmail.readonly scope used.
        registry.gmail().find_by_message_id("<check-config@salesflow.invalid>")
    except VendorError as exc:
        findings.append(Finding("google.refresh_token", f"Google did not accept it: {exc}"))
    return findings


def _pipeline_findings(pipedrive: Any, current: Settings) -> list[Finding]:
    from connectors.errors import VendorError

    lead = current.lead_capture
    try:
        pipedrive.stage_ids(lead.pipeline, lead.stage)
    except VendorError as exc:
        key = "lead_capture.stage" if "no stage" in str(exc) else "lead_capture.pipeline"
        return [Finding(key, str(exc))]
    return []


def _rep_findings(pipedrive: Any, current: Settings) -> list[Finding]:
    from connectors.errors import VendorError

    findings = []
    for index, rep in enumerate(current.reps):
        key = f"reps[{index}].pipedrive_user_id"
        try:
            user = pipedrive.user(rep.pipedrive_user_id)
        except VendorError as exc:
            findings.append(Finding(key, f"no Pipedrive user {rep.pipedrive_user_id}: {exc}"))
            continue
        if not user.get("active_flag"):
            # The rotation skips inactive users, so this is not fatal; it may well be wrong.
            findings.append(
                Finding(
                    key,
                    f"{rep.name} ({rep.pipedrive_user_id}) is not active in Pipedrive and "
                    "gets no leads",
                    fatal=False,
                )
            )
    return findings


def _field_findings(pipedrive: Any, current: Settings) -> list[Finding]:
    from connectors.errors import VendorError

    try:
        fields = pipedrive.deal_fields()
    except VendorError as exc:
        return [Finding("lead_capture.custom_fields", f"cannot list the deal fields: {exc}")]
    return [
        Finding(f"lead_capture.custom_fields.{name}", f"Pipedrive has no deal field {name!r}")
        for name in current.lead_capture.custom_fields
        if name not in fields
    ]


@click.command("check-config")
@click.option("--online", is_flag=True, help="Also check the credentials with the vendors.")
def check_config(online: bool) -> None:
    """Validate config.yaml and the environment; with --online, the vendor side too."""
    current, findings = offline_findings()
    if online and current is not None and not any(f.fatal for f in findings):
        findings += online_findings(current)
    elif online:
        findings.append(
            Finding("--online", "skipped until the problems above are fixed", fatal=False)
        )

    for finding in findings:
        click.echo(finding.line())
    errors = sum(1 for f in findings if f.fatal)
    if errors:
        raise click.ClickException(f"{_config_path()}: {errors} problem(s); see the lines above")
    click.echo(f"{_config_path()} is ready{' (vendors checked)' if online else ''}")


# -- google-auth -----------------------------------------------------------------------


def google_flow(client_id: str, client_secret: str) -> Any:
    """The installed-app OAuth flow for the sending mailbox, with every scope the flows use."""
    from google_auth_oauthlib.flow import InstalledAppFlow

    config = {
        "installed": {
            "client_id": client_id,
            "client_secret": client_secret,
            "auth_uri": GOOGLE_AUTH_URI,
            "token_uri": GOOGLE_TOKEN_URI,
            "redirect_uris": ["http://localhost"],
        }
    }
    return InstalledAppFlow.from_client_config(config, scopes=GOOGLE_SCOPES)


@click.command("google-auth")
@click.option(
    "--client-id",
    envvar="GOOGLE_CLIENT_ID",
    required=True,
    help="OAuth client of type Desktop app (default: $GOOGLE_CLIENT_ID).",
)
@click.option(
    "--client-secret",
    envvar="GOOGLE_CLIENT_SECRET",
    required=True,
    help="Its secret (default: $GOOGLE_CLIENT_SECRET).",
)
@click.option("--port", default=0, show_default=True, help="Loopback port; 0 picks a free one.")
@click.option("--no-browser", is_flag=True, help="Print the URL instead of opening a browser.")
def google_auth(client_id: str, client_secret: str, port: int, no_browser: bool) -> None:
    """Authorise the sending mailbox in a browser and print GOOGLE_REFRESH_TOKEN."""
    flow = google_flow(client_id, client_secret)
    # offline + consent: Google hands out a refresh token only on a fresh consent.
    credentials = flow.run_local_server(
        host="localhost",
        port=port,
        open_browser=not no_browser,
        access_type="offline",
        prompt="consent",
    )
    if not credentials.refresh_token:
        raise click.ClickException("Google returned no refresh token; run the command again")
    click.echo("Set this on the web and the worker (it is a secret):")
    click.echo(f"GOOGLE_REFRESH_TOKEN={credentials.refresh_token}")


# -- docusign-consent ------------------------------------------------------------------


def docusign_consent_url(integration_key: str, redirect_uri: str, oauth_host: str) -> str:
    """The individual-consent URL for the JWT grant (scopes signature and impersonation)."""
    host = oauth_host.removeprefix("https://").removeprefix("http://").rstrip("/")
    query = urlencode(
        {
            "response_type": "code",
            "scope": DOCUSIGN_SCOPES,
            "client_id": integration_key,
            "redirect_uri": redirect_uri,
        },
        quote_via=quote,
    )
    return f"https://{host}/oauth/auth?{query}"


@click.command("docusign-consent")
@click.option(
    "--integration-key",
    envvar="DOCUSIGN_INTEGRATION_KEY",
    required=True,
    help="Default: $DOCUSIGN_INTEGRATION_KEY.",
)
@click.option(
    "--redirect-uri",
    default="http://localhost:8080/docusign/consent",
    show_default=True,
    help="A redirect URI registered on the integration key.",
)
@click.option(
    "--production",
    is_flag=True,
    help=f"Use {DOCUSIGN_PRODUCTION_HOST} when DOCUSIGN_OAUTH_HOST is unset.",
)
def docusign_consent(integration_key: str, redirect_uri: str, production: bool) -> None:
    """Print the URL the impersonated DocuSign user opens once to grant consent."""
    default = DOCUSIGN_PRODUCTION_HOST if production else DOCUSIGN_DEMO_HOST
    host = os.environ.get("DOCUSIGN_OAUTH_HOST") or default
    click.echo("Open this as the DocuSign user the app acts for (DOCUSIGN_USER_ID) and accept:")
    click.echo(docusign_consent_url(integration_key, redirect_uri, host))
    click.echo("The browser then lands on the redirect URI; nothing needs to answer there.")


# -- send-contract ---------------------------------------------------------------------


@click.command("send-contract")
@click.argument("deal_id", type=int)
@click.option("--force", is_flag=True, help="Send even if one went out within the window.")
def send_contract(deal_id: int, force: bool) -> None:
    """Send a deal's contract for e-signature now, as entering the proposal stage does."""
    from flows.contract import send_now

    outcome = send_now(deal_id, force=force)
    result = outcome["result"] or {}
    click.echo(f"event {outcome['event_id']}: {outcome['status']}")
    if outcome["reason"]:
        click.echo(f"  {outcome['reason']}")
    if result.get("skipped"):
        click.echo(f"  not sent: {result['skipped']} (envelope {result.get('envelope_id')})")
    elif result.get("envelope_id"):
        click.echo(f"  envelope {result['envelope_id']} {result.get('status', '')}".rstrip())
    if outcome["status"] != "succeeded":
        raise click.exceptions.Exit(1)


# -- register-webhooks -----------------------------------------------------------------


def _is_set(name: str) -> str:
    return "set" if os.environ.get(name) else "NOT SET here"


# The Pipedrive events the follow-up flow acts on: a deal created in a stage, a deal moved,
# won or lost. Webhooks v2: one change, one delivery, with an event id to deduplicate by.
PIPEDRIVE_EVENTS = (("create", "deal"), ("change", "deal"))
PIPEDRIVE_WEBHOOK_VERSION = "2.0"


def _pipedrive_client() -> Any:
    """The Pipedrive client from config.yaml, or from the environment when it does not load."""
    from connectors.pipedrive import PipedriveClient
    from core.config import Pipedrive, Retry

    try:
        current = load_settings()
        return PipedriveClient(current.pipedrive, current.retry)
    except ConfigError:
        token = os.environ.get("PIPEDRIVE_API_TOKEN")
        if not token:
            raise click.ClickException("PIPEDRIVE_API_TOKEN is not set") from None
        base = os.environ.get("PIPEDRIVE_BASE_URL") or "https://api.pipedrive.com"
        return PipedriveClient(Pipedrive(api_token=token, base_url=base), Retry())


def _covers(webhook: dict[str, Any], url: str, action: str, entity: str, user: str) -> bool:
    return (
        webhook.get("subscription_url") == url
        and str(webhook.get("version")) == PIPEDRIVE_WEBHOOK_VERSION
        and webhook.get("event_action") in (action, "*")
        and webhook.get("event_object") in (entity, "*")
        and (webhook.get("http_auth_user") or "") == user
        and bool(webhook.get("is_active", 1))
    )


def register_pipedrive_webhooks(url: str, user: str, password: str) -> list[str]:
    """Create the webhooks this deployment lacks; returns a line per event type."""
    from connectors.errors import VendorError

    pipedrive = _pipedrive_client()
    try:
        existing = pipedrive.list_webhooks()
    except VendorError as exc:
        raise click.ClickException(f"Pipedrive refused to list the webhooks: {exc}") from exc

    lines = []
    for action, entity in PIPEDRIVE_EVENTS:
        found = next((w for w in existing if _covers(w, url, action, entity, user)), None)
        if found is not None:
            lines.append(f"  {action}.{entity}: webhook {found['id']} exists already")
            continue
        fields = {
            "subscription_url": url,
            "event_action": action,
            "event_object": entity,
            "version": PIPEDRIVE_WEBHOOK_VERSION,
            "name": f"salesflow {action}.{entity}",
            "http_auth_user": user,
            "http_auth_password": password,
        }
        try:
            made = pipedrive.create_webhook(fields)
        except VendorError as exc:
            raise click.ClickException(f"Pipedrive refused {action}.{entity}: {exc}") from exc
        existing.append(made)
        lines.append(f"  {action}.{entity}: webhook {made['id']} created")
    others = [
        w
        for w in existing
        if w.get("subscription_url") == url
        and not any(_covers(w, url, a, e, user) for a, e in PIPEDRIVE_EVENTS)
    ]
    for webhook in others:
        # Older subscriptions (v1, other credentials) still deliver; dedup copes, but they
        # cost a request each and a wrong password fails Pipedrive's tries towards a ban.
        lines.append(
            f"  note: webhook {webhook['id']} ({webhook.get('event_action')}."
            f"{webhook.get('event_object')}, version {webhook.get('version')}) also points "
            "here; delete it in Pipedrive if it is stale"
        )
    return lines


@click.command("register-webhooks")
@click.option("--base-url", required=True, help="The public https:// address of the web process.")
@click.option(
    "--skip-pipedrive", is_flag=True, help="Only print; do not create Pipedrive's webhooks."
)
def register_webhooks(base_url: str, skip_pipedrive: bool) -> None:
    """Print the webhook URLs to paste into each vendor; create Pipedrive's through its API."""
    base = base_url.rstrip("/")
    if not base.startswith("https://"):
        click.echo("warning: vendors deliver only to https:// addresses", err=True)
    form_secret = _is_set("FORM_WEBHOOK_SECRET")
    lines = [
        "Typeform (form > Connect > Webhooks):",
        f"  URL     {base}/webhooks/typeform",
        f"  Secret  the value of TYPEFORM_WEBHOOK_SECRET ({_is_set('TYPEFORM_WEBHOOK_SECRET')})",
        "Meta (app > Webhooks > Page, field leadgen):",
        f"  Callback URL  {base}/webhooks/facebook",
        f"  Verify token  the value of FACEBOOK_VERIFY_TOKEN ({_is_set('FACEBOOK_VERIFY_TOKEN')})",
        "Website backend:",
        f"  POST    {base}/webhooks/form, X-Signature with FORM_WEBHOOK_SECRET ({form_secret})",
        "DocuSign Connect (JSON SIM, Include HMAC signature):",
        f"  URL     {base}/webhooks/docusign",
        f"Pipedrive (webhooks v2 to {base}/webhooks/pipedrive, HTTP Basic auth):",
    ]
    click.echo("\n".join(lines))
    if skip_pipedrive:
        click.echo("  skipped (--skip-pipedrive)")
        return

    user = os.environ.get("PIPEDRIVE_WEBHOOK_USER", "")
    password = os.environ.get("PIPEDRIVE_WEBHOOK_PASSWORD", "")
    if not user or not password:
        raise click.ClickException(
            "set PIPEDRIVE_WEBHOOK_USER and PIPEDRIVE_WEBHOOK_PASSWORD (the web process needs "
            "the same values) before registering Pipedrive's webhooks"
        )
    url = f"{base}/webhooks/pipedrive"
    click.echo("\n".join(register_pipedrive_webhooks(url, user, password)))


# -- simulate --------------------------------------------------------------------------


@click.command("simulate")
@click.argument("source", type=click.Choice(sorted(SIMULATED_SOURCES)))
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--url", required=True, help="Base URL of a running instance.")
@click.option("--secret", help="Signing secret (default: the source's variable).")
def simulate(source: str, file: Path, url: str, secret: str | None) -> None:
    """Post a fixture to a running instance, signed the way the vendor signs it."""
    import requests

    from core import signatures

    route, variable, header, signer = SIMULATED_SOURCES[source]
    secret = secret or os.environ.get(variable)
    if not secret:
        raise click.ClickException(f"{variable} is not set; pass --secret or set it")

    # The file's own bytes: re-serialising would change what the signature covers.
    body = file.read_bytes()
    headers = {
        header: getattr(signatures, signer)(secret, body),
        "Content-Type": "application/json",
    }
    try:
        answer = requests.post(url.rstrip("/") + route, data=body, headers=headers, timeout=30)
    except requests.RequestException as exc:
        raise click.ClickException(f"cannot reach {url}: {exc.__class__.__name__}") from exc

    click.echo(f"{answer.status_code} {answer.text.strip()}")
    if not answer.ok:
        raise click.ClickException(f"the instance answered {answer.status_code}")
