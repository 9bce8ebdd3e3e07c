"""DocuSign eSignature through docusign-esign: JWT grant, envelopes, templates, documents."""

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import certifi
import docusign_esign as ds
import urllib3
from docusign_esign.client.api_exception import ApiException

from connectors.errors import PermanentVendorError, TransientVendorError, VendorError
from connectors.retry import call_with_retry
from core.config import DocuSign, Retry

logger = logging.getLogger(__name__)

VENDOR = "docusign"
SCOPES = ["signature", "impersonation"]
# DocuSign's access tokens live an hour; ask for a new one this long before it runs out.
TOKEN_MARGIN_S = 300
JWT_LIFETIME_S = 3600
# DocuSign reports its hourly API budget as a 400 with this code as well as a 429.
THROTTLE_CODES = {"HOURLY_APIINVOCATION_LIMIT_EXCEEDED", "BURST_APIINVOCATION_LIMIT_EXCEEDED"}
T = TypeVar("T")


class _ApiClient(ds.ApiClient):  # type: ignore[misc]
    """docusign-esign with a timeout on every call and the OAuth host's own scheme.

    The library always writes https:// before its OAuth host; an http:// host (the
    sandbox) is put back, and every request gets the configured timeout, including the
    token request, which the library sends without one.
    """

    def __init__(self, host: str, oauth_host: str, timeout_s: float) -> None:
        self._oauth_scheme = "http" if oauth_host.startswith("http://") else "https"
        bare = oauth_host.removeprefix("https://").removeprefix("http://").rstrip("/")
        super().__init__(host=host, oauth_host_name=bare)
        self._timeout = (timeout_s, timeout_s)
        # One try per call: the shared retry policy decides on the next, not urllib3.
        self.rest_client.pool_manager = urllib3.PoolManager(
            num_pools=4, maxsize=4, retries=False, ca_certs=certifi.where()
        )

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        """Send one request with the timeout, on the OAuth host's real scheme."""
        if self._oauth_scheme == "http" and url.startswith(f"https://{self.oauth_host_name}"):
            url = "http://" + url.removeprefix("https://")
        if kwargs.get("_request_timeout") is None:
            kwargs["_request_timeout"] = self._timeout
        return super().request(method, url, *args, **kwargs)


def _body(exc: ApiException) -> dict[str, Any]:
    try:
        parsed = json.loads(exc.body or b"{}")
    except (ValueError, TypeError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _reset_wait(headers: Any) -> float | None:
    # X-RateLimit-Reset is the epoch second the hourly window resets.
    value = (headers or {}).get("X-RateLimit-Reset")
    try:
        return max(float(value) - time.time(), 0.0) if value is not None else None
    except ValueError:
        return None


def classify(exc: Exception, what: str, write: bool = False) -> VendorError:
    """A docusign-esign or urllib3 error as a VendorError: 429, 5xx and throttling retried."""
    if isinstance(exc, ApiException) and exc.status:
        body = _body(exc)
        code = str(body.get("errorCode") or body.get("error") or "")
        raw = exc.body.decode("utf-8", "replace") if isinstance(exc.body, bytes) else exc.body
        kwargs: dict[str, Any] = {
            "status": exc.status,
            "body": raw,
            "request_id": getattr(exc, "trace_token", None),
        }
        message = f"{what} answered {exc.status} {code}".rstrip()
        if exc.status == 429 or code in THROTTLE_CODES:
            return TransientVendorError(
                VENDOR, message, retry_after=_reset_wait(exc.headers), **kwargs
            )
        if exc.status >= 500:
            return TransientVendorError(VENDOR, message, ambiguous=write, **kwargs)
        return PermanentVendorError(VENDOR, message, **kwargs)
    # Only a connection never made is sure not to have reached DocuSign.
    sent = not isinstance(exc, urllib3.exceptions.ConnectTimeoutError | ConnectionRefusedError)
    return TransientVendorError(
        VENDOR, f"{what}: {exc.__class__.__name__}", ambiguous=write and sent
    )


class DocuSignClient:
    """The envelope calls the contract flow makes, with a cached token and the retry policy."""

    def __init__(
        self, settings: DocuSign, retry: Retry, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._settings = settings
        self._retry = retry
        self._clock = clock
        self._api = _ApiClient(settings.base_path, settings.oauth_host, settings.timeout_s)
        self._token: str | None = None
        self._token_until = 0.0
        self._lock = threading.Lock()
        self._templates: dict[str, dict[str, Any]] = {}

    @property
    def account_id(self) -> str:
        """The DocuSign account envelopes are sent from."""
        if not self._settings.account_id:
            raise PermanentVendorError(VENDOR, "DOCUSIGN_ACCOUNT_ID is not set")
        return self._settings.account_id

    # -- auth ------------------------------------------------------------------------------

    def _grant(self) -> tuple[str, float]:
        settings = self._settings
        missing = [
            name
            for name, value in (
                ("DOCUSIGN_INTEGRATION_KEY", settings.integration_key),
                ("DOCUSIGN_USER_ID", settings.user_id),
                ("DOCUSIGN_PRIVATE_KEY", settings.private_key),
            )
            if not value
        ]
        if missing:
            raise PermanentVendorError(VENDOR, f"the JWT grant needs {', '.join(missing)}")
        try:
            token = self._api.request_jwt_user_token(
                settings.integration_key,
                settings.user_id,
                self._api.oauth_host_name,
                settings.private_key.encode(),
                JWT_LIFETIME_S,
                SCOPES,
            )
        except ApiException as exc:
            if _body(exc).get("error") == "consent_required":
                raise PermanentVendorError(VENDOR, self._consent_message(), status=400) from exc
            raise classify(exc, "JWT grant") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise classify(exc, "JWT grant") from exc
        logger.info("docusign access token granted expires_in=%s", token.expires_in)
        return token.access_token, float(token.expires_in or JWT_LIFETIME_S)

    def _consent_message(self) -> str:
        from cli import docusign_consent_url

        url = docusign_consent_url(
            self._settings.integration_key,
            "http://localhost:8080/docusign/consent",
            self._settings.oauth_host,
        )
        return (
            "consent_required: the DocuSign user has not consented to the JWT grant; open "
            f"{url} as that user once and accept (flask --app app docusign-consent prints it)"
        )

    def access_token(self) -> str:
        """DOCUSIGN_ACCESS_TOKEN, or a JWT-grant token kept until shortly before it expires."""
        if self._settings.access_token:
            return self._settings.access_token
        with self._lock:
            if self._token is None or self._clock() >= self._token_until:
                token, lifetime = call_with_retry(self._grant, self._retry, what="JWT grant")
                self._token = token
                self._token_until = self._clock() + max(lifetime - TOKEN_MARGIN_S, 0)
            return self._token

    def _forget_token(self) -> None:
        with self._lock:
            self._token = None

    # -- transport -------------------------------------------------------------------------

    def _call(self, what: str, call: Callable[[], T], write: bool = False) -> T:
        def attempt() -> T:
            self._api.set_default_header("Authorization", f"Bearer {self.access_token()}")
            try:
                return call()
            except ApiException as exc:
                if exc.status == 401 and not self._settings.access_token:
                    # A token revoked or expired early: the next try asks for a new one.
                    self._forget_token()
                    raise TransientVendorError(VENDOR, f"{what} answered 401") from exc
                raise classify(exc, what, write) from exc
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise classify(exc, what, write) from exc

        return call_with_retry(attempt, self._retry, what=what)

    def _envelopes(self) -> ds.EnvelopesApi:
        return ds.EnvelopesApi(self._api)

    # -- calls -----------------------------------------------------------------------------

    def template_roles(self, template_id: str) -> dict[str, dict[str, Any]]:
        """A template's roles: roleName -> {kind: signers|carbonCopies, tabs: {kind: [labels]}}."""
        if template_id not in self._templates:
            template = self._call(
                "get template",
                lambda: ds.TemplatesApi(self._api).get(
                    self.account_id, template_id, include="recipients"
                ),
            )
            self._templates[template_id] = _roles(template.recipients)
        return self._templates[template_id]

    def create_envelope(self, definition: ds.EnvelopeDefinition) -> dict[str, Any]:
        """POST .../envelopes; a timeout or 5xx is ambiguous: look it up before trying again."""
        summary = self._call(
            "create envelope",
            lambda: self._envelopes().create_envelope(
                self.account_id, envelope_definition=definition
            ),
            write=True,
        )
        return {"envelope_id": summary.envelope_id, "status": summary.status}

    def find_envelope(self, field: str, value: str, since: datetime) -> dict[str, Any] | None:
        """The envelope whose text custom field holds the value, changed since `since`."""
        found = self._call(
            "find envelope",
            lambda: self._envelopes().list_status_changes(
                self.account_id,
                from_date=since.strftime("%Y-%m-%dT%H:%M:%SZ"),
                custom_field=f"{field}={value}",
            ),
        )
        envelopes = found.envelopes or []
        if not envelopes:
            return None
        return {"envelope_id": envelopes[0].envelope_id, "status": envelopes[0].status}

    def get_envelope(self, envelope_id: str) -> dict[str, Any]:
        """GET .../envelopes/{id} with recipients and custom fields, as DocuSign's JSON."""
        envelope = self._call(
            "get envelope",
            lambda: self._envelopes().get_envelope(
                self.account_id, envelope_id, include="recipients,custom_fields"
            ),
        )
        return self._api.sanitize_for_serialization(envelope)

    def combined_pdf(self, envelope_id: str) -> bytes:
        """The envelope's documents as one PDF (documents/combined)."""
        data = self._call(
            "get combined document",
            lambda: self._envelopes().get_document(self.account_id, "combined", envelope_id),
        )
        return data if isinstance(data, bytes) else bytes(data or b"")


def _roles(recipients: Any) -> dict[str, dict[str, Any]]:
    roles: dict[str, dict[str, Any]] = {}
    for kind, items in (
        ("signers", recipients.signers if recipients else None),
        ("carbonCopies", recipients.carbon_copies if recipients else None),
    ):
        for item in items or []:
            tabs: dict[str, list[str]] = {}
            for attr, name in (("text_tabs", "textTabs"), ("sign_here_tabs", "signHereTabs")):
                found = getattr(item.tabs, attr, None) if getattr(item, "tabs", None) else None
                tabs[name] = [tab.tab_label for tab in found or [] if tab.tab_label]
            roles[item.role_name] = {"kind": kind, "tabs": tabs}
    return roles
