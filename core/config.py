"""config.yaml, validated at start-up; secrets come from the environment via ${VAR}."""

import functools
import os
import re
from pathlib import Path
from typing import Any, Literal

import phonenumbers
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# ${VAR} or ${VAR:-default}; the default may be empty.
_ENV_REF = re.compile(r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}")

LEAD_ATTRIBUTES = ("name", "first_name", "last_name", "email", "phone", "company")


class ConfigError(Exception):
    """A config.yaml that cannot run; the message names the key and what is expected."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rep(_Strict):
    name: str
    email: str
    pipedrive_user_id: int


class WebhookSettings(_Strict):
    secret: str = Field(min_length=1)
    max_bytes: int = Field(default=1_048_576, gt=0)


class Webhooks(_Strict):
    typeform: WebhookSettings
    form: WebhookSettings


class TypeformForm(_Strict):
    # Typeform answer ref -> lead attribute (name, email, phone, company, ...).
    fields: dict[str, str]
    lead_source: str = "Typeform"
    region: str | None = None

    @field_validator("fields")
    @classmethod
    def _known_attributes(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_attributes(value)


class WebsiteForm(_Strict):
    # Key in the posted `fields` object -> lead attribute.
    fields: dict[str, str]
    lead_source: str = "Website"
    region: str | None = None

    @field_validator("fields")
    @classmethod
    def _known_attributes(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_attributes(value)


class LeadSources(_Strict):
    typeform: dict[str, TypeformForm] = Field(default_factory=dict)
    form: WebsiteForm | None = None


class WelcomeEmail(_Strict):
    template: str = "welcome"
    subject: str


class LeadCapture(_Strict):
    sources: LeadSources
    pipeline: str
    stage: str
    deal_title: str
    deal_value: str | None = None
    currency: str = "EUR"
    # Pipedrive deal field name -> a path into the lead (answers.budget, hidden.utm_campaign).
    custom_fields: dict[str, str] = Field(default_factory=dict)
    welcome_email: WelcomeEmail


class Pipedrive(_Strict):
    api_token: str = Field(min_length=1)
    base_url: str = "https://api.pipedrive.com"
    timeout_s: float = Field(default=10.0, gt=0)


class Google(_Strict):
    client_id: str = Field(min_length=1)
    client_secret: str = Field(min_length=1)
    refresh_token: str = Field(min_length=1)
    token_url: str = "https://oauth2.googleapis.com/token"
    # Empty means Google's own endpoints from the bundled discovery documents.
    api_base_url: str = ""
    sender: str = "me"
    timeout_s: float = Field(default=10.0, gt=0)


class Retry(_Strict):
    attempts: int = Field(default=5, ge=1)
    base_delay_s: float = Field(default=0.5, gt=0)
    max_delay_s: float = Field(default=30.0, gt=0)


class Settings(_Strict):
    company_name: str
    default_region: str = "US"
    retry: Retry = Retry()
    webhooks: Webhooks
    pipedrive: Pipedrive
    google: Google
    reps: list[Rep] = Field(min_length=1)
    lead_capture: LeadCapture
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("default_region")
    @classmethod
    def _known_region(cls, value: str) -> str:
        if value.upper() not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"expected an ISO 3166 region code such as GE or US, got {value!r}")
        return value.upper()


def _check_attributes(mapping: dict[str, str]) -> dict[str, str]:
    for key, attribute in mapping.items():
        if attribute not in LEAD_ATTRIBUTES:
            allowed = ", ".join(LEAD_ATTRIBUTES)
            raise ValueError(f"{key!r} maps to {attribute!r}; expected one of {allowed}")
    return mapping


def expand_env(value: Any, environ: dict[str, str], path: str = "") -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string of a parsed YAML tree."""
    if isinstance(value, dict):
        return {k: expand_env(v, environ, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, environ, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
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


def load_settings(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Settings:
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
