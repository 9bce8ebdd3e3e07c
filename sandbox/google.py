"""Google emulator: OAuth token, Gmail v1, Calendar v3; Drive v3 and Docs v1 in google_docs."""

from __future__ import annotations

import base64
import binascii
import copy
import datetime as dt
import email.message
import email.policy
import email.utils
import functools
import importlib.resources
import json
import logging
import os
import random
import re
import secrets
import shlex
import time
import zoneinfo
from typing import Any

from flask import Blueprint, Response, jsonify, request

from sandbox.faults import FaultSpec
from sandbox.state import current_state
from sandbox.vendor import VendorEmulator, VendorStore

logger = logging.getLogger(__name__)

VENDOR = "google"
DEFAULT_CLIENT_ID = "sandbox-client-id.apps.googleusercontent.com"
DEFAULT_CLIENT_SECRET = "sandbox-client-secret"
DEFAULT_REFRESH_TOKEN = "sandbox-refresh-token"
DEFAULT_USER_EMAIL = "sales@tbilisi-digital.example"
# The Pipedrive seed's reps, whose calendars are shared with the sales mailbox.
DEFAULT_CALENDARS = (
    "luka@tbilisi-digital.example,mariam@tbilisi-digital.example,davit@tbilisi-digital.example"
)
TOKEN_SCOPE = (
    "https://www.googleapis.com/auth/gmail.send https://www.googleapis.com/auth/gmail.readonly "
    "https://www.googleapis.com/auth/calendar.events"
)
AUTH_MESSAGE = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)
MISSING_AUTH_MESSAGE = (
    "Request is missing required authentication credential. Expected OAuth 2 access token, "
    "login cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)
NOT_FOUND_MESSAGE = "Requested entity was not found."
RAW_REQUIRED = (
    "'raw' RFC822 payload message string or uploading message via /upload/* URL required"
)
STATE_HEADERS = (
    "From", "To", "Cc", "Bcc", "Reply-To", "Subject", "Message-ID", "In-Reply-To", "References",
)  # fmt: skip
MESSAGE_FORMATS = ("minimal", "full", "raw", "metadata")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")
_GRPC_STATUS = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
    404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL", 502: "UNAVAILABLE", 503: "UNAVAILABLE",
}  # fmt: skip

# 403 reasons (faults.GOOGLE_403_REASONS) -> message and domain: the limits are "usageLimits",
# refusals "global".
FORBIDDEN_REASONS = {
    "rateLimitExceeded": ("Rate Limit Exceeded", "usageLimits"),
    "userRateLimitExceeded": ("User Rate Limit Exceeded", "usageLimits"),
    "quotaExceeded": ("Quota exceeded for this project.", "usageLimits"),
    "forbidden": ("Forbidden", "global"),
    "insufficientPermissions": ("Insufficient Permission", "global"),
    "domainPolicy": ("The domain administrators have disabled Gmail apps.", "global"),
}

bp = Blueprint("google", __name__)
control = Blueprint("google_control", __name__, url_prefix="/_sandbox/gmail")


class GoogleError(Exception):
    """A request Google refuses, answered in its JSON error envelope."""

    def __init__(self, status: int, message: str, reason: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.extra = extra


def error_envelope(status: int, message: str, reason: str, **extra: Any) -> dict[str, Any]:
    """Build Google's JSON error envelope."""
    item = {"message": message, "domain": "global", "reason": reason, **extra}
    return {
        "error": {
            "code": status,
            "message": message,
            "errors": [item],
            "status": _GRPC_STATUS.get(status, "UNKNOWN"),
        }
    }


def _envelope_response(status: int, message: str, reason: str, **extra: Any) -> Response:
    response = jsonify(error_envelope(status, message, reason, **extra))
    response.status_code = status
    return response


def _invalid_payload(message: str) -> GoogleError:
    # JSON-to-proto failures carry a BadRequest detail and reason "invalid", unlike API checks.
    return GoogleError(400, message, "invalid", field_violation=message)


@bp.errorhandler(GoogleError)
def _refused(exc: GoogleError) -> Response:
    violation = exc.extra.pop("field_violation", None)
    body = error_envelope(exc.status, exc.message, exc.reason, **exc.extra)
    if violation:
        del body["error"]["errors"][0]["domain"]
        body["error"]["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [{"description": violation}],
            }
        ]
    response = jsonify(body)
    response.status_code = exc.status
    return response


def _oauth_error(status: int, error: str, description: str) -> Response:
    response = jsonify({"error": error, "error_description": description})
    response.status_code = status
    return response


class GoogleStore(VendorStore):
    """Issued access tokens and one Gmail mailbox."""

    def __init__(self, seed: bool) -> None:
        self.tokens: dict[str, float] = {}
        self.tokens_issued = 0
        self.messages: dict[str, dict[str, Any]] = {}
        self.threads: dict[str, list[str]] = {}
        self.history_id = 4120
        # calendar id -> event id -> event, as events.insert stored it
        self.calendars: dict[str, dict[str, dict[str, Any]]] = {}
        # Drive file id -> file; Docs files keep their paragraphs as lines (google_docs.py).
        self.files: dict[str, dict[str, Any]] = google_docs.seed_files() if seed else {}

    def snapshot(self) -> dict[str, Any]:
        """Return tokens issued and every stored message with its decoded headers and parts."""
        now = time.time()
        return {
            "tokens_issued": self.tokens_issued,
            "tokens_active": sum(1 for expiry in self.tokens.values() if expiry > now),
            "gmail": {
                "messages": copy.deepcopy(list(self.messages.values())),
                "threads": copy.deepcopy(self.threads),
            },
            "calendar": {
                "events": {
                    calendar_id: copy.deepcopy(list(events.values()))
                    for calendar_id, events in self.calendars.items()
                }
            },
            "drive": {"files": copy.deepcopy(list(self.files.values()))},
        }


class GoogleEmulator(VendorEmulator):
    """Google under /google: OAuth refresh at /token, Gmail at /gmail/v1/."""

    name = VENDOR
    prefix = "/google"

    def __init__(
        self,
        client_id: str,
        client_secret: str,
        refresh_token: str,
        user_email: str,
        calendars: tuple[str, ...] = (),
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.refresh_token = refresh_token
        self.user_email = user_email
        # The user's own calendar and the calendars shared with it (the reps' calendars).
        self.calendars = (user_email.lower(), *(c.lower() for c in calendars))

    def blueprint(self) -> Blueprint:
        """Return the Google routes."""
        return bp

    def control_blueprint(self) -> Blueprint:
        """Return /_sandbox/gmail/... routes (a lead's reply, a bounce)."""
        return control

    def new_store(self, seed: bool) -> GoogleStore:
        """Build an empty mailbox; nothing is seeded, the product sends everything."""
        return GoogleStore(seed)

    def guard(self, path: str) -> Response | None:
        """Require an issued, unexpired bearer token on every API call but the token endpoint."""
        if path == "/token":
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            return self._unauthenticated(MISSING_AUTH_MESSAGE, "required")
        state = current_state()
        with state.lock:
            expiry = state.store(VENDOR, GoogleStore).tokens.get(token.strip())
        if scheme.lower() != "bearer" or expiry is None or expiry <= time.time():
            return self._unauthenticated(AUTH_MESSAGE, "authError")
        return None

    def _unauthenticated(self, message: str, reason: str) -> Response:
        response = _envelope_response(
            401, message, reason, location="Authorization", locationType="header"
        )
        response.headers["WWW-Authenticate"] = 'Bearer realm="https://accounts.google.com/"'
        return response

    def fault_response(self, spec: FaultSpec, path: str) -> Response:
        """Answer an injected fault as Google does: OAuth-shaped on /token, else the envelope."""
        if spec.kind == "google_403":
            assert spec.reason is not None
            message, domain = FORBIDDEN_REASONS[spec.reason]
            return _envelope_response(403, message, spec.reason, domain=domain)
        status = int(spec.kind)
        if path == "/token":
            error = "rate_limit_exceeded" if status == 429 else "internal_failure"
            response = _oauth_error(status, error, "Injected by the sandbox.")
        elif status == 429:
            message = "Too many concurrent requests for user."
            response = _envelope_response(429, message, "rateLimitExceeded")
        else:
            messages = {
                500: ("Internal error encountered.", "backendError"),
                502: ("Bad Gateway", "backendError"),
                503: ("The service is currently unavailable.", "backendError"),
            }
            response = _envelope_response(status, *messages[status])
        if status == 429:
            response.headers["Retry-After"] = str(spec.reset_s)
        return response

    def error_response(self, status: int, message: str, path: str) -> Response:
        """Answer unknown routes with the front end's HTML page, as Google does."""
        html = (
            f"<!DOCTYPE html>\n<html lang=en><title>Error {status}</title>"
            f"<p><b>{status}.</b> <ins>That’s an error.</ins>"
            f"<p>The requested URL <code>{request.path}</code> was not found on this server."
            "  <ins>That’s all we know.</ins>\n"
        )
        if status >= 500:
            return _envelope_response(status, "Internal error encountered.", "backendError")
        return Response(html, status=status, content_type="text/html; charset=UTF-8")

    def product_env(self, base_url: str) -> dict[str, str]:
        """Point the product's Google connectors here."""
        return {
            "GOOGLE_API_BASE_URL": f"{base_url}{self.prefix}/",
            "GOOGLE_TOKEN_URL": f"{base_url}{self.prefix}/token",
            "GOOGLE_CLIENT_ID": self.client_id,
            "GOOGLE_CLIENT_SECRET": self.client_secret,
            "GOOGLE_REFRESH_TOKEN": self.refresh_token,
        }


def from_env() -> GoogleEmulator:
    """Build the emulator with credentials from SANDBOX_GOOGLE_* variables."""
    return GoogleEmulator(
        client_id=os.environ.get("SANDBOX_GOOGLE_CLIENT_ID", DEFAULT_CLIENT_ID),
        client_secret=os.environ.get("SANDBOX_GOOGLE_CLIENT_SECRET", DEFAULT_CLIENT_SECRET),
        refresh_token=os.environ.get("SANDBOX_GOOGLE_REFRESH_TOKEN", DEFAULT_REFRESH_TOKEN),
        user_email=os.environ.get("SANDBOX_GOOGLE_USER_EMAIL", DEFAULT_USER_EMAIL),
        calendars=tuple(
            c.strip()
            for c in os.environ.get("SANDBOX_GOOGLE_CALENDARS", DEFAULT_CALENDARS).split(",")
            if c.strip()
        ),
    )


def _emulator() -> GoogleEmulator:
    emulator = current_state().emulators[VENDOR]
    assert isinstance(emulator, GoogleEmulator)
    return emulator


def _store() -> GoogleStore:
    return current_state().store(VENDOR, GoogleStore)


# --- OAuth ----------------------------------------------------------------------------------


@bp.post("/token")
def token() -> Response:
    """Exchange a refresh token for an access token, as oauth2.googleapis.com/token does."""
    form = request.form
    emulator = _emulator()
    client_id, client_secret = form.get("client_id"), form.get("client_secret")
    if request.authorization and request.authorization.type == "basic":
        client_id = client_id or request.authorization.username
        client_secret = client_secret or request.authorization.password

    grant_type = form.get("grant_type")
    if not grant_type:
        return _oauth_error(400, "invalid_request", "Required parameter is missing: grant_type")
    if grant_type != "refresh_token":
        return _oauth_error(400, "unsupported_grant_type", f"Invalid grant_type: {grant_type}")
    if not client_id:
        return _oauth_error(400, "invalid_request", "Could not determine client ID from request.")
    if client_id != emulator.client_id:
        return _oauth_error(401, "invalid_client", "The OAuth client was not found.")
    if client_secret != emulator.client_secret:
        return _oauth_error(401, "invalid_client", "Unauthorized")
    if not form.get("refresh_token"):
        return _oauth_error(400, "invalid_request", "Missing required parameter: refresh_token")
    if form["refresh_token"] != emulator.refresh_token:
        return _oauth_error(400, "invalid_grant", "Bad Request")

    state = current_state()
    access_token = "ya29.sandbox-" + secrets.token_urlsafe(32)
    expires_in = state.setting("google_token_expires_in")
    with state.lock:
        store = _store()
        store.tokens[access_token] = time.time() + expires_in
        store.tokens_issued += 1
    logger.info("google access token issued count=%s", store.tokens_issued)
    return jsonify(
        {
            "access_token": access_token,
            "expires_in": expires_in,
            "scope": form.get("scope") or TOKEN_SCOPE,
            "token_type": "Bearer",
        }
    )


# --- Gmail: request validation against the bundled discovery document ----------------------


@functools.cache
def discovery(api: str = "gmail.v1") -> dict[str, Any]:
    """Load a discovery document that google-api-python-client ships, e.g. calendar.v3."""
    documents = importlib.resources.files("googleapiclient") / "discovery_cache" / "documents"
    return json.loads((documents / f"{api}.json").read_text(encoding="utf-8"))


def gmail_discovery() -> dict[str, Any]:
    """Load the Gmail v1 discovery document that google-api-python-client ships."""
    return discovery("gmail.v1")


def _snake(name: str) -> str:
    # Google names proto fields in error paths, which are the snake_case form of JSON names.
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def _type_label(schema: dict[str, Any], api: str = "gmail.v1") -> str:
    if "$ref" in schema:
        return f"type.googleapis.com/google.apis.{api}.{schema['$ref']}"
    kind, fmt = schema.get("type"), schema.get("format")
    if kind == "string":
        return {"byte": "TYPE_BYTES", "int64": "TYPE_INT64", "uint64": "TYPE_UINT64"}.get(
            fmt or "", "TYPE_ENUM" if "enum" in schema else "TYPE_STRING"
        )
    return {"integer": "TYPE_INT32", "boolean": "TYPE_BOOL", "number": "TYPE_DOUBLE"}.get(
        kind or "", "TYPE_MESSAGE"
    )


def _scalar_ok(value: Any, schema: dict[str, Any]) -> bool:
    kind, fmt = schema.get("type"), schema.get("format")
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "string" and fmt in ("int64", "uint64"):
        # proto3 JSON takes 64-bit integers as strings or numbers.
        return is_int or (isinstance(value, str) and re.fullmatch(r"-?\d+", value) is not None)
    if kind == "string":
        return isinstance(value, str) and ("enum" not in schema or value in schema["enum"])
    if kind == "integer":
        return is_int or (isinstance(value, str) and re.fullmatch(r"-?\d+", value) is not None)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    return True


def validate_against_schema(
    value: Any, schema: dict[str, Any], path: str, api: str = "gmail.v1"
) -> None:
    """Check a JSON value against a discovery schema; raise Google's 400 on the first fault."""
    schemas = discovery(api)["schemas"]
    if value is None:
        return  # proto3 JSON reads null as the field's default
    resolved = schemas[schema["$ref"]] if "$ref" in schema else schema
    kind = resolved.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            raise _invalid_payload(
                f"Invalid value at '{path}' ({_type_label(schema, api)}), {json.dumps(value)}"
            )
        properties = resolved.get("properties", {})
        extra = resolved.get("additionalProperties")
        for key, item in value.items():
            if key in properties:
                validate_against_schema(item, properties[key], f"{path}.{_snake(key)}", api)
            elif extra:
                validate_against_schema(item, extra, f"{path}[{key!r}]", api)
            else:
                raise _invalid_payload(
                    f"Invalid JSON payload received. Unknown name \"{key}\" at '{path}': "
                    "Cannot find field."
                )
    elif kind == "array":
        if not isinstance(value, list):
            raise _invalid_payload(
                f"Invalid value at '{path}' ({_type_label(resolved['items'], api)}), "
                f"{json.dumps(value)}"
            )
        for index, item in enumerate(value):
            validate_against_schema(item, resolved["items"], f"{path}[{index}]", api)
    elif not _scalar_ok(value, resolved):
        raise _invalid_payload(
            f"Invalid value at '{path}' ({_type_label(resolved, api)}), {json.dumps(value)}"
        )


def _decode_raw(raw: str) -> bytes:
    if not _BASE64URL.fullmatch(raw):
        raise _invalid_payload(
            f"Invalid value at 'message.raw' (TYPE_BYTES), Base64 decoding failed for "
            f'"{raw[:40]}"'
        )
    try:
        return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        raise _invalid_payload(
            "Invalid value at 'message.raw' (TYPE_BYTES), Base64 decoding failed"
        ) from None


def _parse_rfc822(data: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    if not message.keys():
        raise GoogleError(400, "Invalid RFC822 message: no headers found.", "invalidArgument")
    recipients = 0
    for name in ("To", "Cc", "Bcc"):
        for value in message.get_all(name, []):
            try:
                addresses = email.utils.getaddresses([str(value)])
            except (TypeError, ValueError, IndexError):
                addresses = [("", "?")]
            for _, address in addresses:
                if not address:
                    continue
                if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", address):
                    raise GoogleError(400, f"Invalid {name} header", "invalidArgument")
                recipients += 1
    if not recipients:
        raise GoogleError(400, "Recipient address required", "invalidArgument")
    return message


def _user_check(user_id: str) -> None:
    emulator = _emulator()
    if user_id != "me" and user_id.lower() != emulator.user_email.lower():
        raise GoogleError(403, f"Delegation denied for {emulator.user_email}", "forbidden")


# --- Gmail: messages ------------------------------------------------------------------------


def _new_message_id(store: GoogleStore) -> str:
    # Gmail ids are time-ordered 64-bit numbers in hex; this keeps that look and ordering.
    while True:
        number = (int(time.time() * 1000) << 20) | random.getrandbits(20)
        message_id = f"{number:016x}"[-16:]
        if message_id not in store.messages:
            return message_id


def _text_parts(message: email.message.EmailMessage) -> tuple[str | None, str | None]:
    text = html = None
    for part in message.walk():
        if part.is_multipart() or part.get_content_disposition() == "attachment":
            continue
        content_type = part.get_content_type()
        try:
            content = part.get_content()  # type: ignore[attr-defined]
        except (LookupError, KeyError, ValueError):
            continue
        if content_type == "text/plain" and text is None:
            text = content
        elif content_type == "text/html" and html is None:
            html = content
    return text, html


def _record(
    store: GoogleStore,
    data: bytes,
    message: email.message.EmailMessage,
    thread_id: str | None,
    labels: list[str] | None = None,
) -> dict[str, Any]:
    message_id = _new_message_id(store)
    if message["Message-ID"] is None:
        # Gmail stamps its own Message-ID on a message sent without one.
        stamp = f"<CA+sandbox-{secrets.token_hex(12)}@mail.gmail.com>"
        data = f"Message-ID: {stamp}\r\n".encode() + data
        message = _parse_rfc822(data)
    text, html = _text_parts(message)
    store.history_id += 1
    record = {
        "id": message_id,
        "threadId": thread_id or message_id,
        "labelIds": list(labels or ["SENT"]),
        "snippet": " ".join((text or "").split())[:200],
        "historyId": str(store.history_id),
        "internalDate": str(int(time.time() * 1000)),
        "sizeEstimate": len(data),
        "raw": base64.urlsafe_b64encode(data).decode(),
        "headers": {
            name: str(message[name]) if message[name] is not None else None
            for name in STATE_HEADERS
        },
        "text": text,
        "html": html,
    }
    store.messages[message_id] = record
    store.threads.setdefault(record["threadId"], []).append(message_id)
    return record


@bp.post("/gmail/v1/users/<user_id>/messages/send")
def send_message(user_id: str) -> Response:
    """Send a message given as base64url `raw` (users.messages.send)."""
    _user_check(user_id)
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise _invalid_payload("Invalid JSON payload received. Expected an object.")
    validate_against_schema(body, {"$ref": "Message"}, "message")
    if not body.get("raw"):
        raise GoogleError(400, RAW_REQUIRED, "invalidArgument")
    data = _decode_raw(body["raw"])
    message = _parse_rfc822(data)

    state = current_state()
    with state.lock:
        store = _store()
        thread_id = body.get("threadId")
        if thread_id and thread_id not in store.threads:
            raise GoogleError(404, NOT_FOUND_MESSAGE, "notFound")
        if thread_id and not _joins_thread(store, thread_id, message):
            # Gmail files the message in a new thread rather than failing the send.
            logger.info("gmail message does not join thread=%s: headers or subject", thread_id)
            thread_id = None
        record = _record(store, data, message, thread_id)
    logger.info("gmail message sent id=%s thread=%s", record["id"], record["threadId"])
    return jsonify(
        {"id": record["id"], "threadId": record["threadId"], "labelIds": record["labelIds"]}
    )


QUERY_KEYS = ("rfc822msgid", "to", "from", "subject", "in", "label", "is", "after", "before")


def _query_moment(value: str) -> int:
    """Read after:/before: as Gmail does: epoch seconds, or a YYYY/MM/DD date (UTC here)."""
    if value.isdigit():
        return int(value)
    try:
        day = dt.datetime.strptime(value.replace("-", "/"), "%Y/%m/%d").replace(tzinfo=dt.UTC)
    except ValueError:
        raise GoogleError(
            400, f"Invalid date in query: {value!r}; use epoch seconds or YYYY/MM/DD.",
            "invalidArgument",
        ) from None  # fmt: skip
    return int(day.timestamp())


def _query_terms(query: str) -> list[tuple[str, str]]:
    try:
        words = shlex.split(query)
    except ValueError:
        raise GoogleError(400, "Invalid query: unbalanced quotes.", "invalidArgument") from None
    terms = []
    for word in words:
        key, sep, value = word.partition(":")
        if not sep or key.lower() not in QUERY_KEYS:
            # Say so plainly rather than answer "nothing found", which a product could trust.
            raise GoogleError(
                400,
                f"The sandbox does not support the search term {word!r}; it knows "
                f"{', '.join(k + ':' for k in QUERY_KEYS)}.",
                "invalidArgument",
            )
        if key.lower() in ("after", "before"):
            value = str(_query_moment(value))
        terms.append((key.lower(), value))
    return terms


def _matches(record: dict[str, Any], terms: list[tuple[str, str]]) -> bool:
    headers = record["headers"]
    for key, value in terms:
        wanted = value.lower()
        if key == "rfc822msgid":
            have = (headers["Message-ID"] or "").strip().strip("<>")
            if have != value.strip().strip("<>"):
                return False
        elif key in ("to", "from", "subject"):
            fields = ["To", "Cc", "Bcc"] if key == "to" else [key.capitalize()]
            if not any(wanted in (headers[f] or "").lower() for f in fields):
                return False
        elif key in ("after", "before"):
            sent_s = int(record["internalDate"]) // 1000
            if (sent_s < int(value)) if key == "after" else (sent_s >= int(value)):
                return False
        elif key == "is" and wanted == "read":
            if "UNREAD" in record["labelIds"]:
                return False
        elif wanted.upper() not in record["labelIds"]:
            return False
    return True


@bp.get("/gmail/v1/users/<user_id>/messages")
def list_messages(user_id: str) -> Response:
    """List message ids matching `q` and `labelIds`, newest first (users.messages.list)."""
    _user_check(user_id)
    terms = _query_terms(request.args.get("q", ""))
    labels = request.args.getlist("labelIds")
    try:
        max_results = min(int(request.args.get("maxResults", 100)), 500)
        offset = int(request.args.get("pageToken") or 0)
    except ValueError:
        raise GoogleError(400, "Invalid maxResults or pageToken.", "invalidArgument") from None

    with current_state().lock:
        found = [
            {"id": record["id"], "threadId": record["threadId"]}
            for record in reversed(list(_store().messages.values()))
            if _matches(record, terms) and all(label in record["labelIds"] for label in labels)
        ]
    if not found:
        return jsonify({"resultSizeEstimate": 0})
    page = found[offset : offset + max_results]
    body: dict[str, Any] = {"messages": page}
    if offset + max_results < len(found):
        body["nextPageToken"] = str(offset + max_results)
    body["resultSizeEstimate"] = len(found)
    return jsonify(body)


def _payload(part: email.message.Message, part_id: str, with_body: bool) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "partId": part_id,
        "mimeType": part.get_content_type(),
        "filename": part.get_filename() or "",
        "headers": [{"name": name, "value": str(value)} for name, value in part.items()],
    }
    if part.is_multipart():
        payload["body"] = {"size": 0}
        if with_body:
            children = part.get_payload()
            assert isinstance(children, list)
            payload["parts"] = [
                _payload(child, f"{part_id}.{i}" if part_id else str(i), with_body)
                for i, child in enumerate(children)
            ]
        return payload
    data = part.get_payload(decode=True)
    data = data if isinstance(data, bytes) else b""
    payload["body"] = {"size": len(data)}
    if with_body and data:
        payload["body"]["data"] = base64.urlsafe_b64encode(data).decode()
    return payload


@bp.get("/gmail/v1/users/<user_id>/messages/<message_id>")
def get_message(user_id: str, message_id: str) -> Response:
    """Return one message in the requested format (users.messages.get)."""
    _user_check(user_id)
    view = request.args.get("format", "full")
    if view not in MESSAGE_FORMATS:
        raise _invalid_payload(
            f"Invalid value at 'format' (type.googleapis.com/google.apis.gmail.v1."
            f'GmailApi.GetMessageRequest.Format), "{view}"'
        )
    with current_state().lock:
        record = copy.deepcopy(_store().messages.get(message_id))
    if record is None:
        raise GoogleError(404, NOT_FOUND_MESSAGE, "notFound")
    return jsonify(_message_view(record, view, request.args.getlist("metadataHeaders")))


def _message_view(record: dict[str, Any], view: str, headers: list[str]) -> dict[str, Any]:
    body = {key: record[key] for key in ("id", "threadId", "labelIds", "snippet")}
    body.update({key: record[key] for key in ("sizeEstimate", "historyId", "internalDate")})
    if view == "raw":
        body["raw"] = record["raw"]
    elif view in ("full", "metadata"):
        message = email.message_from_bytes(
            base64.urlsafe_b64decode(record["raw"]), policy=email.policy.default
        )
        payload = _payload(message, "", with_body=view == "full")
        wanted = {name.lower() for name in headers}
        if view == "metadata" and wanted:
            payload["headers"] = [h for h in payload["headers"] if h["name"].lower() in wanted]
        body["payload"] = payload
    return body


# --- Gmail: threads -------------------------------------------------------------------------

THREAD_FORMATS = ("full", "metadata", "minimal")
_REPLY_PREFIX = re.compile(r"^\s*((re|fwd?|aw|wg|sv)\s*:\s*)+", re.IGNORECASE)


def _message_ids(value: str | None) -> set[str]:
    return set(re.findall(r"<[^<>\s]+>", value or ""))


def _base_subject(subject: str | None) -> str:
    return _REPLY_PREFIX.sub("", subject or "").strip().casefold()


def _joins_thread(store: GoogleStore, thread_id: str, message: email.message.Message) -> bool:
    """Gmail's threading rule: In-Reply-To/References name a thread message, subjects match."""
    records = [store.messages[mid] for mid in store.threads[thread_id]]
    known = {record["headers"]["Message-ID"] for record in records}
    cited = _message_ids(str(message["In-Reply-To"] or "")) | _message_ids(
        str(message["References"] or "")
    )
    same_subject = _base_subject(str(message["Subject"] or "")) == _base_subject(
        records[0]["headers"]["Subject"]
    )
    return bool(cited & known) and same_subject


@bp.get("/gmail/v1/users/<user_id>/threads/<thread_id>")
def get_thread(user_id: str, thread_id: str) -> Response:
    """Return a thread with its messages, oldest first (users.threads.get)."""
    _user_check(user_id)
    view = request.args.get("format", "full")
    if view not in THREAD_FORMATS:
        raise _invalid_payload(
            f"Invalid value at 'format' (type.googleapis.com/google.apis.gmail.v1."
            f'GmailApi.GetThreadRequest.Format), "{view}"'
        )
    with current_state().lock:
        store = _store()
        ids = store.threads.get(thread_id)
        records = copy.deepcopy([store.messages[mid] for mid in ids or []])
    if not records:
        raise GoogleError(404, NOT_FOUND_MESSAGE, "notFound")

    headers = request.args.getlist("metadataHeaders")
    messages = [_message_view(record, view, headers) for record in records]
    return jsonify(
        {
            "id": thread_id,
            "historyId": max(records, key=lambda r: int(r["historyId"]))["historyId"],
            "messages": messages,
        }
    )


# --- control: the lead replies, a message bounces -------------------------------------------


def _control_error(message: str, status: int = 400) -> Response:
    response = jsonify({"error": message})
    response.status_code = status
    return response


def _thread_tail(store: GoogleStore, thread_id: Any) -> dict[str, Any] | None:
    if not isinstance(thread_id, str) or thread_id not in store.threads:
        return None
    return store.messages[store.threads[thread_id][-1]]


def _inbound(tail: dict[str, Any], sender: str, subject: str) -> email.message.EmailMessage:
    message = email.message.EmailMessage()
    message["From"] = sender
    message["To"] = _emulator().user_email
    message["Subject"] = subject
    message["Date"] = email.utils.formatdate(localtime=False)
    message["Message-ID"] = f"<sandbox-{secrets.token_hex(10)}@mail.example.com>"
    last_id = tail["headers"]["Message-ID"]
    if last_id:
        message["In-Reply-To"] = last_id
        message["References"] = " ".join(filter(None, [tail["headers"]["References"], last_id]))
    return message


def _deliver_inbound(
    store: GoogleStore, thread_id: str, message: email.message.EmailMessage
) -> dict[str, Any]:
    data = message.as_bytes(policy=email.policy.SMTP)
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return _record(store, data, parsed, thread_id, labels=["INBOX", "UNREAD"])


@control.post("/reply")
def lead_replies() -> Response:
    """Make the lead reply in a thread: {thread_id, from, text}; the message lands in INBOX."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return _control_error("The reply must be a JSON object {thread_id, from, text}.")
    sender, text = body.get("from"), body.get("text", "")
    if not isinstance(sender, str) or "@" not in sender:
        return _control_error("from must be the lead's address, e.g. 'Nino <nino@example.com>'.")
    if not isinstance(text, str):
        return _control_error("text must be a string.")
    with current_state().lock:
        store = _store()
        tail = _thread_tail(store, body.get("thread_id"))
        if tail is None:
            return _control_error(f"No thread {body.get('thread_id')!r}.", 404)
        subject = "Re: " + _REPLY_PREFIX.sub("", tail["headers"]["Subject"] or "").strip()
        message = _inbound(tail, sender, subject)
        message.set_content(text)
        record = _deliver_inbound(store, body["thread_id"], message)
    logger.info("gmail sandbox reply id=%s thread=%s", record["id"], record["threadId"])
    return jsonify({key: record[key] for key in ("id", "threadId", "labelIds")})


@control.post("/bounce")
def message_bounces() -> Response:
    """Record a bounce in a thread: {thread_id, recipient?, reason?} from mailer-daemon."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return _control_error("The bounce must be a JSON object {thread_id, recipient?}.")
    with current_state().lock:
        store = _store()
        tail = _thread_tail(store, body.get("thread_id"))
        if tail is None:
            return _control_error(f"No thread {body.get('thread_id')!r}.", 404)
        recipient = body.get("recipient") or email.utils.parseaddr(tail["headers"]["To"] or "")[1]
        reason = body.get("reason") or "550 5.1.1 The email account that you tried to reach "
        reason += "" if body.get("reason") else "does not exist."
        sender = "Mail Delivery Subsystem <mailer-daemon@googlemail.com>"
        message = _inbound(tail, sender, "Delivery Status Notification (Failure)")
        message["X-Failed-Recipients"] = recipient
        message["Auto-Submitted"] = "auto-replied"
        message.set_content(
            f"Address not found\n\nYour message wasn't delivered to {recipient} because the "
            f"address couldn't be found, or is unable to receive mail.\n\n{reason}\n"
        )
        status = f"Final-Recipient: rfc822; {recipient}\nAction: failed\nStatus: 5.1.1\n"
        # Gmail sends multipart/report; the status part goes as text here (the email package
        # cannot serialise a message/delivery-status part built from scratch).
        message.add_attachment(status, disposition="inline", filename="delivery-status.txt")
        message.set_type("multipart/report")
        message.set_param("report-type", "delivery-status")
        record = _deliver_inbound(store, body["thread_id"], message)
    logger.info("gmail sandbox bounce id=%s thread=%s", record["id"], record["threadId"])
    return jsonify({key: record[key] for key in ("id", "threadId", "labelIds")})


# --- Calendar v3: events --------------------------------------------------------------------

CALENDAR_API = "calendar.v3"
_EVENT_ID = re.compile(r"[a-v0-9]{5,1024}")
# Fields the server owns: a client may send them, Calendar ignores them.
SERVER_EVENT_FIELDS = {
    "kind", "etag", "htmlLink", "created", "updated", "creator", "organizer", "iCalUID",
    "sequence", "hangoutLink", "privateCopy", "locked", "recurringEventId",
}  # fmt: skip
EVENT_ORDER = (
    "summary", "description", "location", "colorId", "creator", "organizer", "start", "end",
    "endTimeUnspecified", "recurrence", "transparency", "visibility", "iCalUID", "sequence",
    "attendees", "guestsCanInviteOthers", "guestsCanModify", "extendedProperties", "reminders",
    "source", "eventType",
)  # fmt: skip


def _calendar_of(calendar_id: str) -> str:
    emulator = _emulator()
    resolved = emulator.user_email if calendar_id == "primary" else calendar_id
    if resolved.lower() not in emulator.calendars:
        raise GoogleError(404, "Not Found", "notFound")
    return resolved.lower()


def _rfc3339(value: str) -> dt.datetime | None:
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if "T" in value else None


def _zone_ok(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _event_moment(body: dict[str, Any], key: str) -> tuple[str, dt.datetime]:
    """Check one of start/end as Calendar does; return its kind (date/dateTime) and instant."""
    when = body.get(key)
    if not when:
        raise GoogleError(400, f"Missing {key} time.", "required")
    has_date, has_time = when.get("date") is not None, when.get("dateTime") is not None
    if has_date == has_time:
        raise GoogleError(400, f"Invalid {key} time.", "invalid")
    zone = when.get("timeZone")
    if zone is not None and not _zone_ok(zone):
        raise GoogleError(400, f"Invalid time zone definition for {key} time.", "invalid")
    if has_date:
        try:
            day = dt.date.fromisoformat(when["date"])
        except ValueError:
            raise GoogleError(400, f"Invalid {key} time.", "invalid") from None
        return "date", dt.datetime.combine(day, dt.time(), dt.UTC)
    moment = _rfc3339(when["dateTime"])
    if moment is None:
        raise GoogleError(400, f"Invalid {key} time.", "invalid")
    if moment.tzinfo is None:
        if zone is None:
            raise GoogleError(400, f"Missing time zone definition for {key} time.", "required")
        moment = moment.replace(tzinfo=zoneinfo.ZoneInfo(zone))
    return "dateTime", moment


def _check_event(body: dict[str, Any]) -> None:
    validate_against_schema(body, {"$ref": "Event"}, "resource", CALENDAR_API)
    event_id = body.get("id")
    if event_id is not None and not _EVENT_ID.fullmatch(event_id):
        raise GoogleError(400, "Invalid resource id value.", "invalid")
    if body.get("id") and body.get("iCalUID"):
        raise GoogleError(400, "Only one of id and iCalUID can be set.", "invalid")
    start_kind, start = _event_moment(body, "start")
    end_kind, end = _event_moment(body, "end")
    if start_kind != end_kind:
        raise GoogleError(
            400, "Start and end times must either both be date or both be dateTime.", "invalid"
        )
    if end < start:
        raise GoogleError(400, "The specified time range is empty.", "timeRangeEmpty")


def _stamp(moment: dt.datetime, millis: bool = True) -> str:
    fraction = f"{moment.microsecond // 1000:03d}" if millis else "000"
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + fraction + "Z"


def _new_event(calendar: str, body: dict[str, Any]) -> dict[str, Any]:
    user = _emulator().user_email.lower()
    now = dt.datetime.now(dt.UTC)
    event_id = body.get("id") or "".join(
        random.choice("0123456789abcdefghijklmnopqrstuv") for _ in range(26)
    )
    eid = base64.b64encode(f"{event_id} {calendar}".encode()).decode().rstrip("=")
    given = {key: value for key, value in body.items() if key not in SERVER_EVENT_FIELDS}
    given.update(
        creator={"email": user, "self": True},
        organizer={"email": calendar, "self": calendar == user},
        iCalUID=body.get("iCalUID") or f"{event_id}@google.com",
        sequence=0,
    )
    given.setdefault("reminders", {"useDefault": True})
    given.setdefault("eventType", "default")
    event: dict[str, Any] = {
        "kind": "calendar#event",
        "etag": f'"{int(now.timestamp() * 1000) * 1000}"',
        "id": event_id,
        "status": given.pop("status", "confirmed"),
        "htmlLink": f"https://www.google.com/calendar/event?eid={eid}",
        "created": _stamp(now, millis=False),
        "updated": _stamp(now),
    }
    given.pop("id", None)
    event.update({key: given.pop(key) for key in EVENT_ORDER if key in given})
    event.update(given)
    return event


@bp.post("/calendar/v3/calendars/<calendar_id>/events")
def insert_event(calendar_id: str) -> Response:
    """Create an event, with the client's id if it gives one (events.insert)."""
    calendar = _calendar_of(calendar_id)
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise _invalid_payload("Invalid JSON payload received. Expected an object.")
    _check_event(body)

    with current_state().lock:
        events = _store().calendars.setdefault(calendar, {})
        if body.get("id") in events:
            raise GoogleError(409, "The requested identifier already exists.", "duplicate")
        event = _new_event(calendar, body)
        events[event["id"]] = event
    logger.info("calendar event inserted id=%s calendar=%s", event["id"], calendar)
    return jsonify(event)


@bp.get("/calendar/v3/calendars/<calendar_id>/events/<event_id>")
def get_event(calendar_id: str, event_id: str) -> Response:
    """Return one event (events.get)."""
    calendar = _calendar_of(calendar_id)
    with current_state().lock:
        event = copy.deepcopy(_store().calendars.get(calendar, {}).get(event_id))
    if event is None:
        raise GoogleError(404, "Not Found", "notFound")
    return jsonify(event)


def _list_filters() -> tuple[dt.datetime | None, dt.datetime | None, list[tuple[str, str]]]:
    bounds = []
    for name in ("timeMin", "timeMax"):
        raw = request.args.get(name)
        moment = _rfc3339(raw) if raw else None
        if raw and (moment is None or moment.tzinfo is None):
            raise GoogleError(400, "Bad Request", "badRequest")
        bounds.append(moment)
    props = []
    for raw in request.args.getlist("privateExtendedProperty"):
        key, sep, value = raw.partition("=")
        if not sep:
            raise GoogleError(400, "Invalid extended property value.", "invalid")
        props.append((key, value))
    return bounds[0], bounds[1], props


def _event_listed(
    event: dict[str, Any], low: dt.datetime | None, high: dt.datetime | None, props: Any
) -> bool:
    private = event.get("extendedProperties", {}).get("private", {})
    if any(private.get(key) != value for key, value in props):
        return False
    query = (request.args.get("q") or "").casefold()
    text = f"{event.get('summary', '')} {event.get('description', '')}".casefold()
    if query and query not in text:
        return False
    start, end = _event_moment(event, "start")[1], _event_moment(event, "end")[1]
    return (low is None or end > low) and (high is None or start < high)


@bp.get("/calendar/v3/calendars/<calendar_id>/events")
def list_events(calendar_id: str) -> Response:
    """List events, filtered by time range, text and private extended property (events.list)."""
    calendar = _calendar_of(calendar_id)
    low, high, props = _list_filters()
    if request.args.get("orderBy") == "startTime" and request.args.get("singleEvents") != "true":
        message = "The requested ordering is not available for the particular query."
        raise GoogleError(400, message, "badRequest")
    try:
        max_results = min(int(request.args.get("maxResults", 250)), 2500)
        offset = int(request.args.get("pageToken") or 0)
    except ValueError:
        raise GoogleError(400, "Invalid maxResults or pageToken.", "invalid") from None

    with current_state().lock:
        events = copy.deepcopy(list(_store().calendars.get(calendar, {}).values()))
    found = [event for event in events if _event_listed(event, low, high, props)]
    if request.args.get("orderBy") == "startTime":
        found.sort(key=lambda event: _event_moment(event, "start")[1])
    body: dict[str, Any] = {
        "kind": "calendar#events",
        "etag": f'"p{int(time.time() * 1000)}"',
        "summary": calendar,
        "description": "",
        "updated": _stamp(dt.datetime.now(dt.UTC)),
        "timeZone": "Asia/Tbilisi",
        "accessRole": "owner",
        "defaultReminders": [{"method": "popup", "minutes": 30}],
    }
    if offset + max_results < len(found):
        body["nextPageToken"] = str(offset + max_results)
    body["items"] = found[offset : offset + max_results]
    return jsonify(body)


# Drive v3 and Docs v1 live in their own module and register on `bp`; imported last because it
# imports this module's names.
from sandbox import google_docs  # noqa: E402
