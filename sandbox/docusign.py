"""DocuSign emulator: OAuth JWT grant, eSignature REST v2.1 envelopes and templates, Connect."""

from __future__ import annotations

import base64
import binascii
import copy
import datetime as dt
import logging
import os
import re
import secrets
import threading
import time
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from docusign_esign import models
from flask import Blueprint, Response, jsonify, request

from sandbox import docusign_connect as connect
from sandbox.faults import FaultSpec
from sandbox.pdf import build_pdf, is_pdf, pdf_text
from sandbox.state import current_state
from sandbox.vendor import VendorEmulator, VendorStore

logger = logging.getLogger(__name__)

VENDOR = "docusign"
# Ids of the shared fixtures (tests/fixtures/docusign), so messages and fixtures agree.
DEFAULT_ACCOUNT_ID = "8d116ece-1738-47d9-bd9c-172411e20b8f"
DEFAULT_USER_ID = "90c192cf-d3ac-44af-8f21-ddb66cad4a26"
DEFAULT_INTEGRATION_KEY = "3f1c9a52-6d0e-4b8a-9f27-5c4e81d0b6a3"
DEFAULT_ACCESS_TOKEN = "eyJ0eXAiOiJNVCIsImFsZyI6IlJTMjU2In0.sandbox-docusign-access-token"
DEFAULT_HMAC_KEYS = "sandbox-connect-key-1"
SERVICE_TEMPLATE_ID = "36f675cc-81e7-4ef5-a8e2-5d940ed90475"
SENDER = {
    "userName": "Tamar Lomidze",
    "email": "sales-ops@example.com",
}
ACCOUNT_NAME = "Tbilisi Digital"
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
REQUIRED_SCOPES = {"signature", "impersonation"}
KNOWN_SCOPES = REQUIRED_SCOPES | {"extended", "cors", "click.manage", "click.send", "openid"}
MAX_ASSERTION_S = 3600
CLOCK_SKEW_S = 60
HOURLY_WINDOW_S = 3600
BAD_BODY = "The request body is missing or improperly formatted."
BAD_PARAMETER = "The request contained at least one invalid parameter."
INCOMPLETE = (
    "The Envelope is not Complete. A Complete Envelope Requires Documents, Recipients, Tabs, "
    "and a Subject Line."
)
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
FINAL_STATUSES = ("completed", "declined", "voided")
TAB_KINDS = ("signHereTabs", "dateSignedTabs", "textTabs")
RECIPIENT_KINDS = ("signers", "carbonCopies")

bp = Blueprint("docusign", __name__)
control = Blueprint("docusign_control", __name__, url_prefix="/_sandbox/docusign")


class DocuSignError(Exception):
    """A request DocuSign refuses, answered with its {errorCode, message} envelope."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str) -> Response:
    response = jsonify({"errorCode": code, "message": message})
    response.status_code = status
    return response


@bp.errorhandler(DocuSignError)
def _refused(exc: DocuSignError) -> Response:
    return _error(exc.status, exc.code, exc.message)


def _oauth_error(error: str, description: str | None = None, status: int = 400) -> Response:
    body = {"error": error}
    if description:
        body["error_description"] = description
    response = jsonify(body)
    response.status_code = status
    return response


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- store ----------------------------------------------------------------------------------


def _role(
    name: str, kind: str, order: str, tabs: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    return {"roleName": name, "kind": kind, "routingOrder": order, "tabs": tabs or {}}


def _seed_templates() -> dict[str, dict[str, Any]]:
    lines = [
        "Service agreement / მომსახურების ხელშეკრულება",
        "Client: [client_name]",
        "Company: [client_company]",
        "Amount: [amount]",
        "Start date: [start_date]",
        "The provider delivers the services described in the proposal.",
        "Client signature: [client_signature]   Date: [signed_on]",
    ]
    roles = [
        _role(
            "Client",
            "signers",
            "1",
            {
                "signHereTabs": ["client_signature"],
                "dateSignedTabs": ["signed_on"],
                "textTabs": ["client_name", "client_company", "amount", "start_date"],
            },
        ),
        _role("Sales rep", "carbonCopies", "2"),
    ]
    return {
        SERVICE_TEMPLATE_ID: _template(
            SERVICE_TEMPLATE_ID,
            "Service agreement (KA/EN)",
            "Please DocuSign: Service agreement",
            roles,
            lines,
        )
    }


def _template(
    template_id: str, name: str, subject: str, roles: list[dict[str, Any]], lines: list[str]
) -> dict[str, Any]:
    return {
        "templateId": template_id,
        "name": name,
        "emailSubject": subject,
        "emailBlurb": "Please review and sign the attached agreement.",
        "created": connect.ds_time(_now()),
        "roles": roles,
        "documentName": f"{name}.pdf",
        "lines": lines,
    }


class DocuSignStore(VendorStore):
    """Tokens, consent, templates, envelopes, the Connect listener and its deliveries."""

    def __init__(self, seed: bool) -> None:
        self.tokens: dict[str, float] = {}
        self.tokens_issued = 0
        self.consent = True
        self.templates: dict[str, dict[str, Any]] = _seed_templates() if seed else {}
        self.envelopes: dict[str, dict[str, Any]] = {}
        self.connect: dict[str, Any] = {
            "url": None,
            "format": "json",
            "include_documents": False,
            "keys": None,
            "events": list(connect.ENVELOPE_EVENTS),
        }
        self.deliveries: list[dict[str, Any]] = []
        self.window_start = 0.0
        self.window_calls = 0
        self.field_ids = 11945320
        self.stop = threading.Event()

    def snapshot(self) -> dict[str, Any]:
        """Return templates, envelopes (documents as sizes and text), Connect and deliveries."""
        envelopes = []
        for record in self.envelopes.values():
            view = copy.deepcopy({k: v for k, v in record.items() if k != "documents"})
            view["documents"] = [
                {
                    "documentId": d["documentId"],
                    "name": d["name"],
                    "size": len(d["pdf"]),
                    "text": d["lines"],
                }
                for d in record["documents"]
            ]
            envelopes.append(view)
        return {
            "tokens_issued": self.tokens_issued,
            "consent": self.consent,
            "templates": copy.deepcopy(list(self.templates.values())),
            "envelopes": envelopes,
            "connect": copy.deepcopy(self.connect),
            "deliveries": copy.deepcopy(self.deliveries),
            "api_calls_this_hour": self.window_calls,
        }

    def close(self) -> None:
        """Stop pending Connect deliveries and retries."""
        self.stop.set()


# --- emulator -------------------------------------------------------------------------------


class DocuSignEmulator(VendorEmulator):
    """DocuSign under /docusign: account server at /oauth, eSignature at /restapi/v2.1."""

    name = VENDOR
    prefix = "/docusign"

    def __init__(
        self,
        account_id: str,
        user_id: str,
        integration_key: str,
        access_token: str,
        hmac_keys: list[str],
        private_key_pem: str | None = None,
    ) -> None:
        self.account_id, self.user_id = account_id, user_id
        self.integration_key, self.access_token = integration_key, access_token
        self.hmac_keys = hmac_keys
        if private_key_pem:
            key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
            assert isinstance(key, rsa.RSAPrivateKey)
        else:
            # A fresh key pair per sandbox: the product signs with the private half (product
            # env), DocuSign holds the public half as the integration key's RSA key.
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ).decode()
        self.public_key = key.public_key()

    def blueprint(self) -> Blueprint:
        """Return the DocuSign routes."""
        return bp

    def control_blueprint(self) -> Blueprint:
        """Return /_sandbox/docusign/... routes (consent, Connect, templates, sign, decline)."""
        return control

    def new_store(self, seed: bool) -> DocuSignStore:
        """Build a store with the seeded service-agreement template."""
        return DocuSignStore(seed)

    def guard(self, path: str) -> Response | None:
        """Require a bearer token on the REST API and count calls against the hourly limit."""
        if path.startswith("/oauth/token"):
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        state = current_state()
        with state.lock:
            store = state.store(VENDOR, DocuSignStore)
            expiry = store.tokens.get(token.strip())
        valid = token.strip() == self.access_token or (expiry is not None and expiry > time.time())
        if scheme.lower() != "bearer" or not valid:
            if path.startswith("/oauth/"):
                return _oauth_error("invalid_token", status=401)
            return _error(
                401,
                "USER_AUTHENTICATION_FAILED",
                "One or both of Username and Password are invalid. Invalid access token",
            )
        if path.startswith("/restapi/"):
            return self._count_call(store)
        return None

    def _count_call(self, store: DocuSignStore) -> Response | None:
        state = current_state()
        limit = state.setting("docusign_hourly_limit")
        with state.lock:
            now = time.time()
            if now - store.window_start >= HOURLY_WINDOW_S:
                store.window_start, store.window_calls = now, 0
            if store.window_calls >= limit:
                return self._rate_limited(limit, int(store.window_start + HOURLY_WINDOW_S))
            store.window_calls += 1
        return None

    def _rate_limited(self, limit: int, reset_epoch: int) -> Response:
        response = _error(
            429,
            "HOURLY_APIINVOCATION_LIMIT_EXCEEDED",
            f"The maximum number of hourly API invocations has been exceeded. The hourly limit "
            f"is {limit}.",
        )
        response.headers["X-RateLimit-Limit"] = str(limit)
        response.headers["X-RateLimit-Remaining"] = "0"
        response.headers["X-RateLimit-Reset"] = str(reset_epoch)
        return response

    def fault_response(self, spec: FaultSpec, path: str) -> Response:
        """Answer injected faults: the hourly-limit 429 with reset headers, or a 5xx."""
        status = int(spec.kind)
        if path.startswith("/oauth/"):
            return _oauth_error("temporarily_unavailable", "Injected by the sandbox.", status)
        if status == 429:
            limit = current_state().setting("docusign_hourly_limit")
            return self._rate_limited(limit, int(time.time()) + spec.reset_s)
        if status == 500:
            return _error(500, "UNSPECIFIED_ERROR", "An unexpected error occurred.")
        return Response(
            f"<html><body><h1>{status} Service Unavailable</h1></body></html>",
            status=status,
            content_type="text/html",
        )

    def error_response(self, status: int, message: str, path: str) -> Response:
        """Answer unknown routes as DocuSign's front end does (a bare HTML page)."""
        if status >= 500:
            return _error(500, "UNSPECIFIED_ERROR", "An unexpected error occurred.")
        html = f"<html><head><title>{status}</title></head><body>{message}</body></html>"
        return Response(html, status=status, content_type="text/html; charset=utf-8")

    def decorate(self, response: Response, path: str) -> Response:
        """Put DocuSign's hourly rate-limit headers on every eSignature answer."""
        if not path.startswith("/restapi/") or "X-RateLimit-Limit" in response.headers:
            return response
        state = current_state()
        limit = state.setting("docusign_hourly_limit")
        with state.lock:
            store = state.store(VENDOR, DocuSignStore)
            remaining = max(limit - store.window_calls, 0)
            reset = int((store.window_start or time.time()) + HOURLY_WINDOW_S)
        response.headers["X-RateLimit-Limit"] = str(limit)
        response.headers["X-RateLimit-Remaining"] = str(remaining)
        response.headers["X-RateLimit-Reset"] = str(reset)
        return response

    def product_env(self, base_url: str) -> dict[str, str]:
        """Point the product's DocuSign connector here."""
        return {
            "DOCUSIGN_BASE_PATH": f"{base_url}{self.prefix}/restapi",
            # A URL, scheme included: the JWT's aud is this without the scheme (see README).
            "DOCUSIGN_OAUTH_HOST": f"{base_url}{self.prefix}",
            "DOCUSIGN_ACCOUNT_ID": self.account_id,
            "DOCUSIGN_INTEGRATION_KEY": self.integration_key,
            "DOCUSIGN_USER_ID": self.user_id,
            "DOCUSIGN_PRIVATE_KEY": self.private_key_pem,
            "DOCUSIGN_ACCESS_TOKEN": self.access_token,
            "DOCUSIGN_CONNECT_HMAC_KEYS": ",".join(self.hmac_keys),
        }


def from_env() -> DocuSignEmulator:
    """Build the emulator with ids and secrets from SANDBOX_DOCUSIGN_* variables."""
    keys = os.environ.get("SANDBOX_DOCUSIGN_CONNECT_HMAC_KEYS", DEFAULT_HMAC_KEYS)
    return DocuSignEmulator(
        account_id=os.environ.get("SANDBOX_DOCUSIGN_ACCOUNT_ID", DEFAULT_ACCOUNT_ID),
        user_id=os.environ.get("SANDBOX_DOCUSIGN_USER_ID", DEFAULT_USER_ID),
        integration_key=os.environ.get(
            "SANDBOX_DOCUSIGN_INTEGRATION_KEY", DEFAULT_INTEGRATION_KEY
        ),
        access_token=os.environ.get("SANDBOX_DOCUSIGN_ACCESS_TOKEN", DEFAULT_ACCESS_TOKEN),
        hmac_keys=[key.strip() for key in keys.split(",") if key.strip()],
        private_key_pem=os.environ.get("SANDBOX_DOCUSIGN_PRIVATE_KEY") or None,
    )


def _emulator() -> DocuSignEmulator:
    emulator = current_state().emulators[VENDOR]
    assert isinstance(emulator, DocuSignEmulator)
    return emulator


def _store() -> DocuSignStore:
    return current_state().store(VENDOR, DocuSignStore)


# --- account server: JWT grant and userinfo -------------------------------------------------


def _oauth_host() -> str:
    # The library puts its oauth_host_name (no scheme) in aud; here that is host:port/docusign.
    return f"{request.host}{_emulator().prefix}"


def _check_claims(claims: dict[str, Any]) -> Response | None:
    emulator = _emulator()
    if claims.get("iss") != emulator.integration_key or claims.get("aud") != _oauth_host():
        # DocuSign answers a wrong audience (another environment) as an unknown issuer too.
        return _oauth_error("invalid_grant", "issuer_not_found")
    if claims.get("sub") != emulator.user_id:
        return _oauth_error("invalid_grant", "user_not_found")
    now = time.time()
    exp, iat = claims.get("exp"), claims.get("iat")
    if not isinstance(exp, (int, float)) or not isinstance(iat, (int, float)):
        return _oauth_error("invalid_grant", "invalid_request")
    if exp <= now - CLOCK_SKEW_S:
        return _oauth_error("invalid_grant", "expired")
    if iat > now + CLOCK_SKEW_S or exp > now + MAX_ASSERTION_S + CLOCK_SKEW_S:
        return _oauth_error("invalid_grant", "invalid_request")
    scopes = set(str(claims.get("scope", "")).split())
    if scopes - KNOWN_SCOPES or not REQUIRED_SCOPES <= scopes:
        return _oauth_error("invalid_scope")
    return None


@bp.post("/oauth/token")
def token() -> Response:
    """Exchange a JWT assertion for an access token, as account-d.docusign.com does."""
    grant_type = request.form.get("grant_type")
    if grant_type != JWT_GRANT:
        return _oauth_error("unsupported_grant_type")
    assertion = request.form.get("assertion")
    if not assertion:
        return _oauth_error("invalid_request")
    try:
        header = jwt.get_unverified_header(assertion)
        if header.get("alg") != "RS256":
            raise jwt.InvalidAlgorithmError(str(header.get("alg")))
        claims = jwt.decode(
            assertion,
            _emulator().public_key,
            algorithms=["RS256"],
            # Each claim is checked below so the answer names the one DocuSign would.
            options={"verify_aud": False, "verify_exp": False, "verify_iat": False},
        )
    except jwt.PyJWTError:
        return _oauth_error("invalid_grant", "no_valid_keys_or_signatures")
    refused = _check_claims(claims)
    if refused is not None:
        return refused

    state = current_state()
    with state.lock:
        store = _store()
        if not store.consent:
            return _oauth_error("consent_required")
        access_token = "eyJ0eXAiOiJNVCIsImFsZyI6IlJTMjU2In0.sandbox-" + secrets.token_urlsafe(32)
        expires_in = state.setting("docusign_token_expires_in")
        store.tokens[access_token] = time.time() + expires_in
        store.tokens_issued += 1
    logger.info("docusign access token issued count=%s", store.tokens_issued)
    return jsonify(
        {"access_token": access_token, "token_type": "Bearer", "expires_in": expires_in}
    )


@bp.get("/oauth/userinfo")
def userinfo() -> Response:
    """Return the impersonated user and the account with its base_uri."""
    emulator = _emulator()
    base_uri = f"{request.host_url.rstrip('/')}{emulator.prefix}"
    return jsonify(
        {
            "sub": emulator.user_id,
            "name": SENDER["userName"],
            "given_name": SENDER["userName"].split()[0],
            "family_name": SENDER["userName"].split()[-1],
            "created": "2026-01-12T09:30:00.17",
            "email": SENDER["email"],
            "accounts": [
                {
                    "account_id": emulator.account_id,
                    "is_default": True,
                    "account_name": ACCOUNT_NAME,
                    "base_uri": base_uri,
                }
            ],
        }
    )


# --- request bodies against the docusign-esign models ---------------------------------------


def _model(name: str) -> Any:
    return getattr(models, name)


def check_model(value: Any, kind: str, path: str) -> None:
    """Check a JSON value against a docusign-esign swagger type; raise INVALID_REQUEST_BODY."""
    if value is None:
        return
    if kind.startswith("list["):
        if not isinstance(value, list):
            raise _bad_body(f"Expected an array for '{path}'.")
        for index, item in enumerate(value):
            check_model(item, kind[5:-1], f"{path}[{index}]")
    elif kind.startswith("dict("):
        if not isinstance(value, dict):
            raise _bad_body(f"Expected an object for '{path}'.")
    elif kind in ("str", "int", "float", "bool", "date", "datetime"):
        if isinstance(value, (dict, list)):
            raise _bad_body(f"Unexpected {type(value).__name__} for a value at '{path}'.")
    elif kind != "object":
        if not isinstance(value, dict):
            raise _bad_body(f"Expected an object of type '{kind}' at '{path}'.")
        model = _model(kind)
        by_json = {json_name: attr for attr, json_name in model.attribute_map.items()}
        for key, item in value.items():
            attr = by_json.get(key)
            if attr is None:
                raise _bad_body(
                    f"Could not find member '{key}' on object of type '{kind}'. "
                    f"Path '{path + '.' if path else ''}{key}'."
                )
            check_model(item, model.swagger_types[attr], f"{path + '.' if path else ''}{key}")


def _bad_body(detail: str) -> DocuSignError:
    return DocuSignError(400, "INVALID_REQUEST_BODY", f"{BAD_BODY} {detail}")


def _bad_parameter(detail: str) -> DocuSignError:
    return DocuSignError(400, "INVALID_REQUEST_PARAMETER", f"{BAD_PARAMETER} {detail}")


def _json_body(kind: str) -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise _bad_body("Expected a JSON object.")
    check_model(body, kind, "")
    return body


def _account(account_id: str) -> None:
    if account_id != _emulator().account_id:
        raise DocuSignError(
            400,
            "USER_DOES_NOT_BELONG_TO_SPECIFIED_ACCOUNT",
            "The specified User is not a member of the specified Account.",
        )


# --- envelopes: building the record ---------------------------------------------------------


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _recipient(raw: dict[str, Any], kind: str, recipient_id: str, order: str) -> dict[str, Any]:
    email, name = _text(raw.get("email")).strip(), _text(raw.get("name")).strip()
    if not _EMAIL.fullmatch(email):
        raise DocuSignError(
            400,
            "INVALID_EMAIL_ADDRESS_FOR_RECIPIENT",
            f"The email address for the recipient is invalid. The recipient Id follows. "
            f"{recipient_id}",
        )
    if not name:
        raise DocuSignError(
            400,
            "INVALID_USERNAME_FOR_RECIPIENT",
            f"The user name for the recipient is invalid. {recipient_id}",
        )
    record: dict[str, Any] = {
        "name": name,
        "email": email,
        "recipientId": recipient_id,
        "recipientIdGuid": str(uuid.uuid4()),
        "routingOrder": _text(raw.get("routingOrder")) or order,
        "roleName": _text(raw.get("roleName")),
        "status": "created",
        "deliveryMethod": "email",
        "kind": kind,
    }
    if kind == "signers":
        record["tabs"] = {}
    return record


def _tab(raw: dict[str, Any], kind: str, recipient_id: str) -> dict[str, Any]:
    names = {"signHereTabs": "SignHere", "dateSignedTabs": "DateSigned", "textTabs": "Text"}
    tab = {key: _text(value) for key, value in raw.items() if not isinstance(value, (dict, list))}
    tab.setdefault("name", names.get(kind, kind))
    tab.setdefault("documentId", "1")
    tab.setdefault("pageNumber", "1")
    tab["recipientId"] = recipient_id
    tab["tabId"] = str(uuid.uuid4())
    if kind == "textTabs" and "value" in tab:
        tab.setdefault("originalValue", tab["value"])
    return tab


def _from_template(
    body: dict[str, Any],
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    template = _store().templates.get(_text(body["templateId"]))
    if template is None:
        raise DocuSignError(400, "TEMPLATE_ID_INVALID", "Invalid template ID.")
    roles = {role["roleName"]: role for role in template["roles"]}
    recipients: list[dict[str, Any]] = []
    for index, raw in enumerate(body.get("templateRoles") or []):
        role = roles.get(_text(raw.get("roleName")))
        if role is None:
            # DocuSign drops a role it cannot match; the sandbox refuses it so the mistake shows.
            raise _bad_parameter(
                f"templateRoles[{index}].roleName {raw.get('roleName')!r} matches no role of "
                f"template {template['templateId']}; its roles are "
                f"{', '.join(sorted(roles))}."
            )
        recipient = _recipient(raw, role["kind"], str(index + 1), role["routingOrder"])
        if role["kind"] == "signers":
            recipient["tabs"] = _role_tabs(role, raw.get("tabs") or {}, recipient, index)
        recipients.append(recipient)
    lines = list(template["lines"])
    document = {
        "documentId": "1",
        "name": template["documentName"],
        "lines": lines,
        "pdf": build_pdf(lines, template["name"]),
        "template": True,
    }
    return template, [document], recipients


def _role_tabs(
    role: dict[str, Any], given: dict[str, Any], recipient: dict[str, Any], index: int
) -> dict[str, list[dict[str, Any]]]:
    values: dict[str, dict[str, Any]] = {}
    for kind, tabs in given.items():
        for raw in tabs or []:
            label = _text(raw.get("tabLabel"))
            if label not in role["tabs"].get(kind, []):
                # DocuSign ignores a tab it cannot match by label; the sandbox refuses it.
                known = ", ".join(role["tabs"].get(kind, [])) or "none"
                raise _bad_parameter(
                    f"templateRoles[{index}].tabs.{kind}: no tab with tabLabel {label!r} on "
                    f"role {role['roleName']!r} (its {kind}: {known})."
                )
            values[f"{kind}:{label}"] = raw
    tabs: dict[str, list[dict[str, Any]]] = {}
    for kind, labels in role["tabs"].items():
        for label in labels:
            raw = {"tabLabel": label, **values.get(f"{kind}:{label}", {})}
            tabs.setdefault(kind, []).append(_tab(raw, kind, recipient["recipientId"]))
    return tabs


def _documents(body: dict[str, Any]) -> list[dict[str, Any]]:
    documents = []
    for index, raw in enumerate(body.get("documents") or []):
        document_id = _text(raw.get("documentId"))
        if not document_id.isdigit():
            raise DocuSignError(
                400, "INVALID_DOCUMENT_ID", f"The document ID is invalid. documents[{index}]"
            )
        try:
            data = base64.b64decode(_text(raw.get("documentBase64")), validate=True)
        except (binascii.Error, ValueError):
            data = b""
        if not is_pdf(data):
            raise DocuSignError(
                400,
                "FORMAT_CONVERSION_ERROR",
                f"The data could not be converted. Document {document_id}.",
            )
        extension = _text(raw.get("fileExtension") or "pdf").lower()
        if extension != "pdf":
            raise DocuSignError(
                400,
                "FORMAT_CONVERSION_ERROR",
                f"The sandbox converts only PDF documents, got {extension!r}.",
            )
        name = _text(raw.get("name")) or f"Document {document_id}"
        lines = pdf_text(data)
        documents.append({"documentId": document_id, "name": name, "lines": lines, "pdf": data})
    return documents


def _from_documents(body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    documents = _documents(body)
    given = body.get("recipients") or {}
    text = "\n".join(line for document in documents for line in document["lines"])
    recipients = []
    for kind in RECIPIENT_KINDS:
        for index, raw in enumerate(given.get(kind) or []):
            recipient_id = _text(raw.get("recipientId"))
            if not recipient_id:
                raise DocuSignError(
                    400, "INVALID_RECIPIENT_ID", f"A recipient ID is missing. {kind}[{index}]"
                )
            recipient = _recipient(raw, kind, recipient_id, str(index + 1))
            if kind == "signers":
                recipient["tabs"] = _placed_tabs(raw.get("tabs") or {}, recipient_id, text)
            recipients.append(recipient)
    unknown = sorted(
        k
        for k, v in given.items()
        if v and k not in RECIPIENT_KINDS and k not in ("recipientCount", "currentRoutingOrder")
    )
    if unknown:
        raise _bad_parameter(f"The sandbox supports signers and carbonCopies, got {unknown}.")
    return documents, recipients


def _placed_tabs(given: dict[str, Any], recipient_id: str, text: str) -> dict[str, Any]:
    tabs: dict[str, list[dict[str, Any]]] = {}
    for kind, items in given.items():
        for raw in items or []:
            anchor = _text(raw.get("anchorString"))
            if anchor and anchor not in text:
                raise DocuSignError(
                    400,
                    "ANCHOR_TAB_STRING_NOT_FOUND",
                    f"The specified Anchor Tab string was not found in the document. Anchor Tab "
                    f"String [{anchor}] not found.",
                )
            if not anchor and not (raw.get("xPosition") and raw.get("yPosition")):
                raise _bad_parameter(
                    f"A {kind} tab needs an anchorString or xPosition and yPosition."
                )
            tabs.setdefault(kind, []).append(_tab(raw, kind, recipient_id))
    return tabs


def _custom_fields(store: DocuSignStore, body: dict[str, Any]) -> dict[str, Any]:
    fields = body.get("customFields") or {}
    text_fields = []
    for raw in fields.get("textCustomFields") or []:
        if not _text(raw.get("name")):
            raise _bad_parameter("A text custom field has no name.")
        store.field_ids += 1
        text_fields.append(
            {
                "fieldId": str(store.field_ids),
                "name": _text(raw["name"]),
                "show": _text(raw.get("show") or "false"),
                "required": _text(raw.get("required") or "false"),
                "value": _text(raw.get("value")),
            }
        )
    return {"textCustomFields": text_fields, "listCustomFields": []}


def _new_envelope(store: DocuSignStore, body: dict[str, Any]) -> dict[str, Any]:
    status = _text(body.get("status") or "created")
    if status not in ("created", "sent"):
        raise _bad_parameter(
            f"An envelope is created with status 'created' or 'sent', got {status!r}."
        )
    template = None
    if body.get("templateId"):
        if body.get("documents"):
            raise _bad_parameter(
                "Give templateId or documents, not both (or use "
                "compositeTemplates, which the sandbox does not emulate)."
            )
        template, documents, recipients = _from_template(body)
    else:
        documents, recipients = _from_documents(body)
    subject = _text(body.get("emailSubject")) or (template or {}).get("emailSubject", "")
    if status == "sent" and (not documents or not recipients or not subject):
        missing = [
            n
            for n, ok in (
                ("documents", documents),
                ("recipients", recipients),
                ("emailSubject", subject),
            )
            if not ok
        ]
        raise DocuSignError(400, "ENVELOPE_IS_INCOMPLETE", f"{INCOMPLETE} Missing: {missing}.")
    now = connect.ds_time(_now())
    envelope_id = str(uuid.uuid4())
    record: dict[str, Any] = {
        "envelopeId": envelope_id,
        "status": "created",
        "emailSubject": subject,
        "emailBlurb": _text(body.get("emailBlurb")) or (template or {}).get("emailBlurb", ""),
        "createdDateTime": now,
        "lastModifiedDateTime": now,
        "statusChangedDateTime": now,
        "customFields": _custom_fields(store, body),
        "recipients": recipients,
        "documents": documents,
        "templates": [
            {
                "templateId": template["templateId"],
                "name": template["name"],
                "documentId": "1",
                "applied": "true",
                "uri": f"/templates/{template['templateId']}",
            }
        ]
        if template
        else [],
    }
    if status == "sent":
        _mark_sent(record, now)
    return record


def _mark_sent(record: dict[str, Any], now: str) -> None:
    record.update(
        status="sent",
        sentDateTime=now,
        initialSentDateTime=now,
        statusChangedDateTime=now,
        lastModifiedDateTime=now,
    )
    first = min((int(r["routingOrder"]) for r in record["recipients"]), default=1)
    for recipient in record["recipients"]:
        if int(recipient["routingOrder"]) == first:
            recipient.update(status="sent", sentDateTime=now)


# --- envelopes: views -----------------------------------------------------------------------


def _uris(envelope_id: str) -> dict[str, str]:
    base = f"/envelopes/{envelope_id}"
    return {
        "documentsUri": f"{base}/documents",
        "recipientsUri": f"{base}/recipients",
        "attachmentsUri": f"{base}/attachments",
        "envelopeUri": base,
        "customFieldsUri": f"{base}/custom_fields",
        "notificationUri": f"{base}/notification",
        "documentsCombinedUri": f"{base}/documents/combined",
        "certificateUri": f"{base}/documents/certificate",
        "templatesUri": f"{base}/templates",
    }


def _recipient_view(recipient: dict[str, Any]) -> dict[str, Any]:
    view = {key: value for key, value in recipient.items() if key not in ("kind", "tabs")}
    view.update(requireIdLookup="false", templateLocked="false", templateRequired="false")
    if recipient["kind"] == "signers":
        view["creationReason"] = "sender"
        view["isBulkRecipient"] = "false"
        tabs = recipient.get("tabs") or {}
        view["totalTabCount"] = str(sum(len(items) for items in tabs.values()))
        if tabs:
            view["tabs"] = copy.deepcopy(tabs)
    return view


def recipients_view(record: dict[str, Any]) -> dict[str, Any]:
    """Return an envelope's recipients as GET .../recipients and Connect write them."""
    grouped: dict[str, Any] = {kind: [] for kind in RECIPIENT_KINDS}
    for recipient in record["recipients"]:
        grouped[recipient["kind"]].append(_recipient_view(recipient))
    pending = [int(r["routingOrder"]) for r in record["recipients"] if r["status"] != "completed"]
    grouped["recipientCount"] = str(len(record["recipients"]))
    orders = [int(r["routingOrder"]) for r in record["recipients"]] or [1]
    grouped["currentRoutingOrder"] = str(min(pending) if pending else max(orders))
    return grouped


def _document_views(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "documentId": d["documentId"],
            "documentIdGuid": str(
                uuid.uuid5(uuid.NAMESPACE_URL, record["envelopeId"] + d["documentId"])
            ),
            "name": d["name"],
            "type": "content",
            "order": str(order),
            "display": "inline",
            "includeInDownload": "true",
            "signerMustAcknowledge": "no_interaction",
            "templateRequired": "false",
            "authoritative": "false",
        }
        for order, d in enumerate(record["documents"], start=1)
    ]


def envelope_view(record: dict[str, Any], include: set[str]) -> dict[str, Any]:
    """Return an envelope as GET .../envelopes/{id} does, with the asked-for includes."""
    emulator = _emulator()
    keys = ("status", "emailSubject", "emailBlurb", "envelopeId")
    view: dict[str, Any] = {key: record[key] for key in keys}
    view.update(_uris(record["envelopeId"]))
    view.update(
        signingLocation="online", enableWetSign="false", allowMarkup="false", allowReassign="true"
    )
    for key in (
        "createdDateTime",
        "lastModifiedDateTime",
        "deliveredDateTime",
        "initialSentDateTime",
        "sentDateTime",
        "completedDateTime",
        "declinedDateTime",
        "voidedDateTime",
        "voidedReason",
        "statusChangedDateTime",
    ):
        if record.get(key):
            view[key] = record[key]
    view["sender"] = {**SENDER, "userId": emulator.user_id, "accountId": emulator.account_id}
    view.update(
        purgeState="unpurged",
        envelopeIdStamping="true",
        autoNavigation="true",
        is21CFRPart11="false",
        isSignatureProviderEnvelope="false",
        allowViewHistory="true",
        envelopeLocation="current",
    )
    if "custom_fields" in include:
        view["customFields"] = copy.deepcopy(record["customFields"])
    if "recipients" in include:
        view["recipients"] = recipients_view(record)
    if "documents" in include:
        view["envelopeDocuments"] = _document_views(record)
    return view


def connect_summary(record: dict[str, Any], include_documents: bool) -> dict[str, Any]:
    """Return the envelopeSummary of a Connect message for an envelope."""
    summary = envelope_view(record, {"custom_fields", "recipients"})
    if record["templates"]:
        summary["templates"] = copy.deepcopy(record["templates"])
    documents = _document_views(record)
    if include_documents:
        for view, document in zip(documents, record["documents"], strict=True):
            view["PDFBytes"] = base64.b64encode(_document_pdf(record, document)).decode()
    summary["envelopeDocuments"] = documents
    return summary


def _envelope(account_id: str, envelope_id: str) -> dict[str, Any]:
    _account(account_id)
    record = _store().envelopes.get(envelope_id)
    if record is None:
        raise DocuSignError(
            400,
            "ENVELOPE_DOES_NOT_EXIST",
            "The envelope specified either does not exist or you have no rights to it.",
        )
    return record


def _include() -> set[str]:
    return {part.strip() for part in request.args.get("include", "").split(",") if part.strip()}


ENVELOPES = "/restapi/v2.1/accounts/<account_id>/envelopes"


@bp.post(ENVELOPES)
def create_envelope(account_id: str) -> tuple[Response, int]:
    """Create an envelope from a template or documents, as a draft or sent (createEnvelope)."""
    _account(account_id)
    body = _json_body("EnvelopeDefinition")

    state = current_state()
    with state.lock:
        store = _store()
        record = _new_envelope(store, body)
        store.envelopes[record["envelopeId"]] = record
        if record["status"] == "sent":
            _notify(store, record, ["envelope-sent"])
    logger.info(
        "docusign envelope created id=%s status=%s", record["envelopeId"], record["status"]
    )
    summary = {
        "envelopeId": record["envelopeId"],
        "uri": f"/envelopes/{record['envelopeId']}",
        "statusDateTime": record["statusChangedDateTime"],
        "status": record["status"],
    }
    return jsonify(summary), 201


@bp.get(f"{ENVELOPES}/<envelope_id>")
def get_envelope(account_id: str, envelope_id: str) -> Response:
    """Return one envelope (getEnvelope), include=recipients,custom_fields,documents."""
    with current_state().lock:
        view = envelope_view(_envelope(account_id, envelope_id), _include())
    return jsonify(view)


@bp.put(f"{ENVELOPES}/<envelope_id>")
def update_envelope(account_id: str, envelope_id: str) -> Response:
    """Send a draft (status sent) or void an envelope (status voided, voidedReason)."""
    body = _json_body("Envelope")
    with current_state().lock:
        store = _store()
        record = _envelope(account_id, envelope_id)
        wanted = _text(body.get("status"))
        if wanted == "sent" and record["status"] == "created":
            _mark_sent(record, connect.ds_time(_now()))
            _notify(store, record, ["envelope-sent"])
        elif wanted == "voided":
            if not _text(body.get("voidedReason")):
                raise DocuSignError(
                    400,
                    "ENVELOPE_VOID_REASON_REQUIRED",
                    "A reason is required to void an envelope.",
                )
            _void(store, record, _text(body["voidedReason"]))
        elif wanted:
            raise _bad_parameter(
                f"The sandbox changes an envelope's status to sent or voided, "
                f"got {wanted!r} from {record['status']!r}."
            )
    return jsonify({"envelopeId": envelope_id})


@bp.get(f"{ENVELOPES}/<envelope_id>/recipients")
def get_recipients(account_id: str, envelope_id: str) -> Response:
    """Return an envelope's recipients with tabs (listRecipients, include_tabs)."""
    with current_state().lock:
        view = recipients_view(_envelope(account_id, envelope_id))
    if request.args.get("include_tabs") != "true":
        for kind in RECIPIENT_KINDS:
            for recipient in view[kind]:
                recipient.pop("tabs", None)
    return jsonify(view)


@bp.get(f"{ENVELOPES}/<envelope_id>/custom_fields")
def get_custom_fields(account_id: str, envelope_id: str) -> Response:
    """Return an envelope's custom fields (listCustomFields)."""
    with current_state().lock:
        fields = copy.deepcopy(_envelope(account_id, envelope_id)["customFields"])
    return jsonify(fields)


def _filled(record: dict[str, Any], lines: list[str]) -> list[str]:
    """Fill template placeholders with tab values and mark signatures once signed."""
    values: dict[str, str] = {}
    anchors: dict[str, str] = {}
    for recipient in record["recipients"]:
        for kind, tabs in (recipient.get("tabs") or {}).items():
            for tab in tabs:
                if kind == "signHereTabs":
                    mark = (
                        f"/signed: {recipient['name']} {recipient['signedDateTime'][:10]}/"
                        if recipient.get("signedDateTime")
                        else "________________"
                    )
                    values[tab.get("tabLabel", "")] = mark
                    if tab.get("anchorString"):
                        anchors[tab["anchorString"]] = mark
                else:
                    values[tab.get("tabLabel", "")] = tab.get("value", "")
    out = []
    for line in lines:
        line = re.sub(r"\[([A-Za-z0-9_]+)\]", lambda m: values.get(m.group(1), m.group(0)), line)
        for anchor, mark in anchors.items():
            line = line.replace(anchor, mark)
        out.append(line)
    return out


def _document_pdf(record: dict[str, Any], document: dict[str, Any]) -> bytes:
    if not document.get("template") and record["status"] != "completed":
        return bytes(document["pdf"])
    if not document["lines"]:
        return bytes(document["pdf"])  # no text the sandbox can read and stamp
    return build_pdf(_filled(record, document["lines"]), document["name"])


def _certificate_lines(record: dict[str, Any]) -> list[str]:
    lines = [
        "Certificate Of Completion",
        f"Envelope Id: {record['envelopeId']}",
        f"Subject: {record['emailSubject']}",
        f"Status: {record['status'].title()}",
    ]
    for recipient in record["recipients"]:
        when = recipient.get("signedDateTime") or recipient.get("declinedDateTime") or ""
        lines.append(
            f"{recipient['name']} ({recipient['roleName'] or recipient['kind']}): "
            f"{recipient['status']} {when}"
        )
    return lines


@bp.get(f"{ENVELOPES}/<envelope_id>/documents/<document_id>")
def get_document(account_id: str, envelope_id: str, document_id: str) -> Response:
    """Return a document, the combined PDF, or the certificate (getDocument)."""
    with current_state().lock:
        record = copy.deepcopy(_envelope(account_id, envelope_id))
    if document_id == "certificate":
        data = build_pdf(_certificate_lines(record), "Certificate Of Completion")
    elif document_id in ("combined", "archive"):
        if document_id == "archive":
            raise _bad_parameter("The sandbox does not build the ZIP archive; ask for combined.")
        lines: list[str] = []
        for document in record["documents"]:
            lines += _filled(record, document["lines"]) or [f"[{document['name']}]"]
        if request.args.get("certificate") == "true":
            lines += _certificate_lines(record)
        data = build_pdf(lines, record["emailSubject"])
    else:
        document = next((d for d in record["documents"] if d["documentId"] == document_id), None)
        if document is None:
            raise DocuSignError(
                400, "DOCUMENT_DOES_NOT_EXIST", "The document specified was not found."
            )
        data = _document_pdf(record, document)
    response = Response(data, content_type="application/pdf")
    response.headers["Content-Disposition"] = f'file; filename="{document_id}.pdf"'
    return response


def _parse_date(name: str) -> dt.datetime | None:
    raw = request.args.get(name)
    if not raw:
        return None
    try:
        moment = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise _bad_parameter(f"The value {raw!r} of parameter '{name}' is not a date.") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _listed(record: dict[str, Any], low: dt.datetime | None, statuses: set[str]) -> bool:
    changed = dt.datetime.fromisoformat(record["statusChangedDateTime"][:26] + "+00:00")
    if low is not None and changed < low:
        return False
    if statuses and "any" not in statuses and record["status"] not in statuses:
        return False
    wanted = request.args.get("custom_field")
    if wanted:
        name, _, value = wanted.partition("=")
        fields = record["customFields"]["textCustomFields"]
        if not any(f["name"] == name and f["value"] == value for f in fields):
            return False
    ids = {i for i in request.args.get("envelope_ids", "").split(",") if i}
    return not ids or record["envelopeId"] in ids


@bp.get(ENVELOPES)
def list_envelopes(account_id: str) -> Response:
    """List envelopes changed since from_date, by status, custom_field, ids (listStatusChanges)."""
    _account(account_id)
    low = _parse_date("from_date")
    if low is None and not request.args.get("envelope_ids"):
        raise _bad_parameter("A value was not found for parameter 'from_date'.")
    statuses = {s.strip() for s in request.args.get("status", "").split(",") if s.strip()}
    try:
        start = int(request.args.get("start_position", 0))
        count = int(request.args.get("count", 100))
    except ValueError:
        raise _bad_parameter("start_position and count must be integers.") from None

    include = _include()
    with current_state().lock:
        found = [r for r in _store().envelopes.values() if _listed(r, low, statuses)]
        found.sort(key=lambda r: r["statusChangedDateTime"])
        page = [envelope_view(r, include) for r in found[start : start + count]]
    body: dict[str, Any] = {
        "resultSetSize": str(len(page)),
        "totalSetSize": str(len(found)),
        "startPosition": str(start),
        "endPosition": str(start + len(page) - 1 if page else start),
    }
    if page:
        body["envelopes"] = page
    return jsonify(body)


# --- templates ------------------------------------------------------------------------------


def template_view(template: dict[str, Any], include: set[str]) -> dict[str, Any]:
    """Return a template as GET .../templates/{id} writes it."""
    view: dict[str, Any] = {
        "templateId": template["templateId"],
        "uri": f"/templates/{template['templateId']}",
        "name": template["name"],
        "shared": "false",
        "description": "",
        "created": template["created"],
        "lastModified": template["created"],
        "pageCount": "1",
        "emailSubject": template["emailSubject"],
        "emailBlurb": template["emailBlurb"],
    }
    if "recipients" in include:
        grouped: dict[str, Any] = {kind: [] for kind in RECIPIENT_KINDS}
        for number, role in enumerate(template["roles"], start=1):
            item: dict[str, Any] = {
                "roleName": role["roleName"],
                "recipientId": str(number),
                "routingOrder": role["routingOrder"],
                "name": "",
                "email": "",
            }
            if role["kind"] == "signers":
                item["tabs"] = {
                    kind: [
                        {"tabLabel": label, "documentId": "1", "pageNumber": "1"}
                        for label in labels
                    ]
                    for kind, labels in role["tabs"].items()
                }
            grouped[role["kind"]].append(item)
        grouped["recipientCount"] = str(len(template["roles"]))
        view["recipients"] = grouped
    if "documents" in include:
        view["documents"] = [{"documentId": "1", "name": template["documentName"], "order": "1"}]
    return view


@bp.get("/restapi/v2.1/accounts/<account_id>/templates")
def list_templates(account_id: str) -> Response:
    """List templates, filtered by search_text (listTemplates)."""
    _account(account_id)
    search = request.args.get("search_text", "").casefold()
    include = _include()
    with current_state().lock:
        found = [
            template_view(t, include)
            for t in _store().templates.values()
            if search in t["name"].casefold()
        ]
    body: dict[str, Any] = {
        "resultSetSize": str(len(found)),
        "startPosition": "0",
        "endPosition": str(max(len(found) - 1, 0)),
        "totalSetSize": str(len(found)),
    }
    if found:
        body["envelopeTemplates"] = found
    return jsonify(body)


@bp.get("/restapi/v2.1/accounts/<account_id>/templates/<template_id>")
def get_template(account_id: str, template_id: str) -> Response:
    """Return one template with its roles and tab labels (templates get)."""
    _account(account_id)
    with current_state().lock:
        template = copy.deepcopy(_store().templates.get(template_id))
    if template is None:
        raise DocuSignError(400, "TEMPLATE_ID_INVALID", "Invalid template ID.")
    include = _include() or {"recipients", "documents"}
    return jsonify(template_view(template, include))


# --- state changes and Connect --------------------------------------------------------------


def _notify(store: DocuSignStore, record: dict[str, Any], events: list[str]) -> None:
    """Send Connect messages for `events` (in order) if a listener is configured."""
    settings = store.connect
    wanted = [event for event in events if event in settings["events"]]
    if not settings["url"] or not wanted:
        return
    emulator = _emulator()
    keys = settings["keys"] if settings["keys"] is not None else emulator.hmac_keys
    snapshot = copy.deepcopy(record)
    include_documents = bool(settings["include_documents"])
    moment = _now()

    def render(event: str) -> Any:
        summary = connect_summary(snapshot, include_documents)

        def build(retry_count: int) -> bytes:
            if settings_format == "xml":
                pdfs = []
                if include_documents:
                    pdfs = [
                        (view, _document_pdf(snapshot, document))
                        for view, document in zip(
                            summary["envelopeDocuments"], snapshot["documents"], strict=True
                        )
                    ]
                return connect.xml_message(summary, pdfs, moment)
            message = connect.json_message(
                event, summary, emulator.account_id, emulator.user_id, moment, retry_count
            )
            return connect.json_bytes(message)

        return build

    settings_format = settings["format"]
    target = {
        "url": settings["url"],
        "format": settings_format,
        "keys": list(keys),
        "envelope_id": record["envelopeId"],
    }
    percent = current_state().setting("docusign_connect_retry_percent")
    delays = [delay * percent / 100 for delay in connect.RETRY_DELAYS_S]
    connect.deliver(store, current_state().lock, [(e, render(e)) for e in wanted], target, delays)


def _void(store: DocuSignStore, record: dict[str, Any], reason: str) -> None:
    if record["status"] in FINAL_STATUSES:
        raise DocuSignError(
            400,
            "ENVELOPE_CANNOT_VOID_INVALID_STATE",
            f"Only envelopes in the 'Sent' or 'Delivered' states may be voided. "
            f"It is {record['status']!r}.",
        )
    now = connect.ds_time(_now())
    record.update(
        status="voided",
        voidedDateTime=now,
        voidedReason=reason,
        statusChangedDateTime=now,
        lastModifiedDateTime=now,
    )
    _notify(store, record, ["envelope-voided"])


def _control_error(message: str, status: int = 400) -> Response:
    response = jsonify({"error": message})
    response.status_code = status
    return response


@control.errorhandler(DocuSignError)
def _control_refused(exc: DocuSignError) -> Response:
    return _control_error(exc.message)


def _control_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if body is None and not request.data:
        return {}
    if not isinstance(body, dict):
        raise DocuSignError(400, "BAD", "The body must be a JSON object.")
    return body


def _signers(record: dict[str, Any], recipient_id: Any) -> list[dict[str, Any]]:
    signers = [r for r in record["recipients"] if r["kind"] == "signers"]
    if recipient_id is not None:
        signers = [r for r in signers if r["recipientId"] == str(recipient_id)]
        if not signers:
            raise DocuSignError(400, "BAD", f"No signer with recipientId {recipient_id!r}.")
    return signers


def _live(envelope_id: str) -> tuple[DocuSignStore, dict[str, Any]]:
    store = _store()
    record = store.envelopes.get(envelope_id)
    if record is None:
        raise DocuSignError(404, "BAD", f"No envelope {envelope_id!r}.")
    if record["status"] not in ("sent", "delivered"):
        raise DocuSignError(
            400,
            "BAD",
            f"Envelope {envelope_id} is {record['status']}; only a "
            "sent or delivered envelope can be acted on.",
        )
    return store, record


def _mark_delivered(record: dict[str, Any], now: str, signers: list[dict[str, Any]]) -> bool:
    fresh = record["status"] == "sent"
    for signer in signers:
        if not signer.get("deliveredDateTime"):
            signer.update(status="delivered", deliveredDateTime=now)
    if fresh:
        record.update(status="delivered", deliveredDateTime=now, statusChangedDateTime=now)
    return fresh


@control.post("/envelopes/<envelope_id>/deliver")
def deliver_envelope(envelope_id: str) -> Response:
    """The signer opens the envelope: delivered, and envelope-delivered goes to Connect."""
    with current_state().lock:
        store, record = _live(envelope_id)
        if _mark_delivered(record, connect.ds_time(_now()), _signers(record, None)):
            _notify(store, record, ["envelope-delivered"])
        status = record["status"]
    return jsonify({"envelopeId": envelope_id, "status": status})


@control.post("/envelopes/<envelope_id>/sign")
def sign_envelope(envelope_id: str) -> Response:
    """Every signer (or recipient_id) signs; when all have, the envelope completes."""
    body = _control_body()
    with current_state().lock:
        store, record = _live(envelope_id)
        now = connect.ds_time(_now())
        signers = _signers(record, body.get("recipient_id"))
        events = ["envelope-delivered"] if _mark_delivered(record, now, signers) else []
        for signer in signers:
            signer.update(status="completed", signedDateTime=now)
            for tab in signer["tabs"].get("signHereTabs", []):
                tab["status"] = "signed"
            for tab in signer["tabs"].get("dateSignedTabs", []):
                tab["value"] = f"{_now().month}/{_now().day}/{_now().year}"
        if all(r["status"] == "completed" for r in record["recipients"] if r["kind"] == "signers"):
            for copy_to in record["recipients"]:
                if copy_to["kind"] == "carbonCopies":
                    copy_to.update(status="completed", sentDateTime=now, deliveredDateTime=now)
            record.update(
                status="completed",
                completedDateTime=now,
                statusChangedDateTime=now,
                lastModifiedDateTime=now,
            )
            events.append("envelope-completed")
        _notify(store, record, events)
        status = record["status"]
    logger.info("docusign sandbox signed envelope=%s status=%s", envelope_id, status)
    return jsonify({"envelopeId": envelope_id, "status": status})


@control.post("/envelopes/<envelope_id>/decline")
def decline_envelope(envelope_id: str) -> Response:
    """A signer declines with {reason, recipient_id?}; the envelope is declined."""
    body = _control_body()
    reason = body.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        return _control_error("reason must be the signer's sentence, e.g. 'Price too high'.")
    with current_state().lock:
        store, record = _live(envelope_id)
        now = connect.ds_time(_now())
        signer = _signers(record, body.get("recipient_id"))[0]
        events = ["envelope-delivered"] if _mark_delivered(record, now, [signer]) else []
        signer.update(status="declined", declinedDateTime=now, declinedReason=reason)
        record.update(
            status="declined",
            declinedDateTime=now,
            statusChangedDateTime=now,
            lastModifiedDateTime=now,
        )
        _notify(store, record, [*events, "envelope-declined"])
    return jsonify({"envelopeId": envelope_id, "status": "declined"})


@control.post("/envelopes/<envelope_id>/void")
def void_envelope(envelope_id: str) -> Response:
    """The sender voids with {reason} (an expired envelope reads 'Envelope has expired.')."""
    reason = _control_body().get("reason") or "Envelope has expired."
    with current_state().lock:
        store = _store()
        record = store.envelopes.get(envelope_id)
        if record is None:
            return _control_error(f"No envelope {envelope_id!r}.", 404)
        _void(store, record, str(reason))
    return jsonify({"envelopeId": envelope_id, "status": "voided"})


@control.post("/consent")
def set_consent() -> Response:
    """Grant or withdraw the impersonated user's consent: {granted: bool}."""
    granted = _control_body().get("granted")
    if not isinstance(granted, bool):
        return _control_error("granted must be true or false.")
    with current_state().lock:
        _store().consent = granted
    return jsonify({"consent": granted})


_CONNECT_KEYS = {"url", "format", "include_documents", "keys", "events"}


@control.get("/connect")
def get_connect() -> Response:
    """Show the Connect listener settings."""
    with current_state().lock:
        return jsonify(copy.deepcopy(_store().connect))


@control.post("/connect")
def set_connect() -> Response:
    """Set the listener: {url, format json|xml, include_documents, keys, events}."""
    body = _control_body()
    unknown = sorted(set(body) - _CONNECT_KEYS)
    if unknown:
        return _control_error(
            f"Unknown Connect settings {unknown}; allowed: {sorted(_CONNECT_KEYS)}."
        )
    if "url" in body and body["url"] is not None and not str(body["url"]).startswith("http"):
        return _control_error("url must be an http(s) URL or null.")
    if body.get("format", "json") not in ("json", "xml"):
        return _control_error("format must be 'json' (SIM) or 'xml' (legacy).")
    keys = body.get("keys")
    if keys is not None and not (
        isinstance(keys, list) and all(isinstance(k, str) and k for k in keys)
    ):
        return _control_error("keys must be a list of HMAC secrets (or null for the defaults).")
    events = body.get("events", list(connect.ENVELOPE_EVENTS))
    if not isinstance(events, list) or set(events) - set(connect.ENVELOPE_EVENTS):
        return _control_error(f"events must be a subset of {list(connect.ENVELOPE_EVENTS)}.")
    with current_state().lock:
        settings = _store().connect
        settings.update(body)
        settings["events"] = events
        return jsonify(copy.deepcopy(settings))


@control.get("/deliveries")
def get_deliveries() -> Response:
    """Return every Connect delivery attempt, bodies included."""
    with current_state().lock:
        return jsonify(copy.deepcopy(_store().deliveries))


@control.post("/templates")
def add_template() -> Response:
    """Add a template: {name, email_subject?, lines?, roles: [{roleName, kind, tabs}]}."""
    body = _control_body()
    name, roles = body.get("name"), body.get("roles")
    if not isinstance(name, str) or not name or not isinstance(roles, list) or not roles:
        return _control_error("A template needs a name and a non-empty list of roles.")
    parsed = []
    for number, raw in enumerate(roles, start=1):
        if not isinstance(raw, dict) or not isinstance(raw.get("roleName"), str):
            return _control_error(f"roles[{number - 1}] needs a roleName.")
        kind = raw.get("kind", "signers")
        tabs = raw.get("tabs", {})
        if kind not in RECIPIENT_KINDS or not isinstance(tabs, dict) or set(tabs) - set(TAB_KINDS):
            return _control_error(
                f"roles[{number - 1}]: kind is signers or carbonCopies; tabs "
                f"maps {list(TAB_KINDS)} to tab labels."
            )
        parsed.append(_role(raw["roleName"], kind, str(raw.get("routingOrder", number)), tabs))
    lines = body.get("lines") or [name] + [
        f"{label}: [{label}]"
        for role in parsed
        for labels in role["tabs"].values()
        for label in labels
    ]
    template_id = str(uuid.uuid4())
    template = _template(
        template_id,
        name,
        body.get("email_subject") or f"Please DocuSign: {name}",
        parsed,
        [str(line) for line in lines],
    )
    with current_state().lock:
        _store().templates[template_id] = template
    return jsonify({"templateId": template_id, "name": name})
