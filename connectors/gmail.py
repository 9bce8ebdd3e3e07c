"""Gmail: users.messages.send through google-api-python-client, MIME built by the stdlib."""

import base64
import json
import logging
from collections.abc import Sequence
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

import google_auth_httplib2
import httplib2
from google.auth.exceptions import RefreshError, TransportError
from google.oauth2.credentials import Credentials
from googleapiclient.discovery import build
from googleapiclient.errors import HttpError

from connectors.errors import PermanentVendorError, TransientVendorError, VendorError
from connectors.retry import call_with_retry
from core.config import Google, Retry

logger = logging.getLogger(__name__)

VENDOR = "gmail"
SCOPES = [
    "https://www.googleapis.com/auth/gmail.send",
    "https://www.googleapis.com/auth/gmail.readonly",
]
# Google reports some quota limits as 403; only these reasons are worth a retry.
THROTTLE_REASONS = {"rateLimitExceeded", "userRateLimitExceeded", "quotaExceeded"}


def _reasons(exc: HttpError) -> set[str]:
    try:
        error = json.loads(exc.content or b"{}").get("error", {})
    except ValueError:
        return set()
    return {item.get("reason", "") for item in error.get("errors") or [] if isinstance(item, dict)}


def classify(exc: Exception, what: str, vendor: str = VENDOR, write: bool = False) -> VendorError:
    """A Google client error as a VendorError; Calendar shares Gmail's rules."""
    if isinstance(exc, HttpError):
        status = exc.resp.status
        body = (exc.content or b"").decode("utf-8", "replace")
        request_id = exc.resp.get("x-guploader-uploadid") or exc.resp.get("x-request-id")
        retry_after = exc.resp.get("retry-after")
        kwargs = {
            "status": status,
            "body": body,
            "request_id": request_id,
            "retry_after": float(retry_after) if retry_after and retry_after.isdigit() else None,
        }
        if status >= 500:
            # The write may have been done before the server failed.
            return TransientVendorError(
                vendor, f"{what} answered {status}", ambiguous=write, **kwargs
            )
        if status == 429 or (status == 403 and _reasons(exc) & THROTTLE_REASONS):
            return TransientVendorError(vendor, f"{what} answered {status}", **kwargs)
        return PermanentVendorError(vendor, f"{what} answered {status}", **kwargs)
    if isinstance(exc, RefreshError) and getattr(exc, "retryable", False):
        return TransientVendorError(vendor, f"{what}: the token endpoint failed; will retry")
    if isinstance(exc, RefreshError):
        # invalid_grant stays until someone authorises the app again.
        return PermanentVendorError(
            vendor,
            f"{what}: the Google refresh token was refused ({exc.args[0]}); "
            "run the OAuth consent again and set GOOGLE_REFRESH_TOKEN",
        )
    # A transport error (a timeout, a reset) after a write was sent leaves it unknown.
    return TransientVendorError(vendor, f"{what}: {exc.__class__.__name__}", ambiguous=write)


# The earlier private name, which tests/test_connectors.py imports.
_classify = classify


def build_message(
    *,
    sender_name: str,
    sender_email: str,
    to_name: str | None,
    to_email: str,
    reply_to: str,
    subject: str,
    text: str,
    html: str,
    message_id: str,
) -> EmailMessage:
    """A text and HTML message; the email package encodes non-ASCII names and subjects."""
    message = EmailMessage()
    message["From"] = Address(sender_name, addr_spec=sender_email)
    # Address(addr_spec=...) keeps a +tag and the case the lead typed.
    message["To"] = Address(to_name or "", addr_spec=to_email.strip())
    message["Reply-To"] = reply_to
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = message_id
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    return message


def authorized_http(settings: Google, scopes: Sequence[str]) -> Any:
    """An HTTP client with the sending mailbox's OAuth grant and the configured timeout.

    Gmail, Calendar, Drive and Docs share the grant; each client asks for its own scopes.
    """
    credentials = Credentials(
        token=None,
        refresh_token=settings.refresh_token,
        token_uri=settings.token_url,
        client_id=settings.client_id,
        client_secret=settings.client_secret,
        scopes=list(scopes),
    )
    return google_auth_httplib2.AuthorizedHttp(
        credentials, http=httplib2.Http(timeout=settings.timeout_s)
    )


GOOGLE_ERRORS = (HttpError, RefreshError, TransportError, OSError, httplib2.HttpLib2Error)


def execute(
    request: Any, what: str, retry: Retry, vendor: str = VENDOR, write: bool = False
) -> Any:
    """Run a google-api-python-client request under the shared retry policy."""

    def attempt() -> Any:
        try:
            return request.execute(num_retries=0)
        except GOOGLE_ERRORS as exc:
            raise classify(exc, what, vendor, write=write) from exc

    return call_with_retry(attempt, retry, what=what)


class GmailClient:
    """Sends and finds messages of the authorised mailbox."""

    def __init__(self, settings: Google, retry: Retry) -> None:
        self._retry = retry
        self._user = settings.sender
        http = authorized_http(settings, SCOPES)
        options = {"api_endpoint": settings.api_base_url} if settings.api_base_url else None
        self._service = build(
            "gmail",
            "v1",
            http=http,
            static_discovery=True,
            cache_discovery=False,
            client_options=options,
        )

    def _execute(self, request: Any, what: str, write: bool = False) -> dict[str, Any]:
        return execute(request, what, self._retry, write=write)

    def send(self, message: EmailMessage, thread_id: str | None = None) -> dict[str, Any]:
        """users.messages.send with the whole message as base64url `raw`."""
        body: dict[str, Any] = {"raw": base64.urlsafe_b64encode(message.as_bytes()).decode()}
        if thread_id:
            body["threadId"] = thread_id
        request = self._service.users().messages().send(userId=self._user, body=body)
        return self._execute(request, "send message", write=True)

    def get_thread(self, thread_id: str, headers: Sequence[str] = ()) -> dict[str, Any]:
        """users.threads.get: the thread's messages with their labels and the named headers."""
        request = (
            self._service.users()
            .threads()
            .get(userId=self._user, id=thread_id, format="metadata", metadataHeaders=list(headers))
        )
        return self._execute(request, "get thread")

    def find_by_message_id(self, message_id: str) -> dict[str, Any] | None:
        """The sent message with this Message-ID header, if Gmail has it."""
        query = f"rfc822msgid:{message_id.strip('<>')}"
        request = self._service.users().messages().list(userId=self._user, q=query)
        found = self._execute(request, "find message").get("messages") or []
        return found[0] if found else None
