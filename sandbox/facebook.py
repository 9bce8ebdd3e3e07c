"""Facebook emulator: Graph API lead reads (GET /vNN.N/{leadgen_id}) and Meta-signed webhooks."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterable
from typing import Any

from flask import Blueprint, Response, jsonify, request

from sandbox.faults import FaultSpec
from sandbox.state import current_state
from sandbox.vendor import VendorEmulator, VendorStore

logger = logging.getLogger(__name__)

VENDOR = "facebook"
DEFAULT_PAGE_TOKEN = "EAAsandbox-page-access-token"
DEFAULT_APP_SECRET = "sandbox-facebook-app-secret"
DEFAULT_VERIFY_TOKEN = "sandbox-facebook-verify-token"
PAGE_ID = "108234567890123"
DEFAULT_FORM_ID = "874512369014785"
DEFAULT_AD_ID = "23861234567890123"
DOCS_HINT = (
    "Please read the Graph API documentation at https://developers.facebook.com/docs/graph-api"
)
_VERSION = re.compile(r"v\d+\.\d+")
_GRAPH_ID = re.compile(r"\d{1,32}")
# Readable fields of a Lead node, in the order Graph writes them.
LEAD_FIELDS = (
    "created_time", "id", "ad_id", "ad_name", "adset_id", "adset_name", "campaign_id",
    "campaign_name", "form_id", "is_organic", "platform", "partner_name", "field_data",
    "custom_disclaimer_responses",
)  # fmt: skip
DEFAULT_LEAD_FIELDS = ("created_time", "id", "field_data")
THROTTLE_MESSAGES = {
    4: "(#4) Application request limit reached",
    17: "(#17) User request limit reached",
    32: "(#32) Page request limit reached",
    613: "(#613) Calls to this api have exceeded the rate limit.",
}
# The three leads of one batched webhook (one POST, two entries, three changes).
BATCH_LEADGEN_IDS = ("1298745632019879", "1298745632019880", "1298745632019881")
FIXTURE_LEADGEN_ID = "1298745632019876"
GEORGIAN_LEADGEN_ID = "1298745632019877"
PHONE_ONLY_LEADGEN_ID = "1298745632019878"

bp = Blueprint("facebook", __name__)
control = Blueprint("facebook_control", __name__, url_prefix="/_sandbox/graph")


# --- Meta's byte-level JSON -----------------------------------------------------------------


def meta_json(value: Any) -> bytes:
    """Serialise the way Meta does: compact, non-ASCII as \\u escapes and `/` as `\\/`."""
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":"))
    return text.replace("/", "\\/").encode("ascii")


def sign_webhook(body: bytes, app_secret: str) -> str:
    """Return the X-Hub-Signature-256 value Meta sends: sha256= and the hex HMAC of the bytes."""
    digest = hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def leadgen_webhook_body(
    leads: Iterable[dict[str, Any]], page_id: str = PAGE_ID, now: int | None = None
) -> bytes:
    """Build a Page `leadgen` change notification carrying `leads`, as Meta's bytes."""
    moment = int(time.time()) if now is None else now
    changes = []
    for lead in leads:
        value = {
            "ad_id": lead.get("ad_id") or DEFAULT_AD_ID,
            "form_id": lead["form_id"],
            "leadgen_id": lead["id"],
            "created_time": _epoch(lead["created_time"]),
            "page_id": page_id,
            "adgroup_id": lead.get("ad_id") or DEFAULT_AD_ID,
        }
        changes.append({"field": "leadgen", "value": value})
    # Meta batches changes into entries of up to a few changes each; two per entry here.
    entries = [
        {"id": page_id, "time": moment, "changes": changes[i : i + 2]}
        for i in range(0, len(changes), 2)
    ]
    return meta_json({"object": "page", "entry": entries})


def _epoch(graph_time: str) -> int:
    return int(dt.datetime.strptime(graph_time, "%Y-%m-%dT%H:%M:%S%z").timestamp())


def _graph_time(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S+0000")


# --- seed -----------------------------------------------------------------------------------


def _answer(name: str, *values: str) -> dict[str, Any]:
    return {"name": name, "values": list(values)}


def _seed_lead(
    lead_id: str, created: str, answers: list[dict[str, Any]], form_id: str = DEFAULT_FORM_ID
) -> dict[str, Any]:
    return {
        "created_time": created, "id": lead_id, "ad_id": DEFAULT_AD_ID, "form_id": form_id,
        "field_data": answers, "is_organic": False, "platform": "fb",
    }  # fmt: skip


def seed_leads() -> list[dict[str, Any]]:
    """The leads every fresh sandbox holds; the first is the shared graph_lead.json fixture."""
    return [
        _seed_lead(FIXTURE_LEADGEN_ID, "2026-12-02T16:27:03+0000", [
            _answer("full_name", "Ana Kovač"),
            _answer("email", "Ana.Kovac+FB@Example.com"),
            _answer("phone_number", "+385 91 234 5678"),
            _answer("company_name", "Kovač & Partneri d.o.o."),
            _answer("When would you like to start?", "Što prije – idealno početkom siječnja"),
        ]),
        _seed_lead(GEORGIAN_LEADGEN_ID, "2026-12-02T17:05:41+0000", [
            _answer("full_name", "თამარ ჯავახიშვილი"),
            _answer("email", "tamar.javakhishvili@example.ge"),
            _answer("phone_number", "599 45 67 89"),
            _answer("city", "ქუთაისი"),
            _answer("რომელი სერვისები გაინტერესებთ?", "ვებგვერდის დიზაინი", "SEO"),
            _answer("რა ბიუჯეტი გაქვთ?", "5000-10000 ₾"),
        ]),
        _seed_lead(PHONE_ONLY_LEADGEN_ID, "2026-12-02T18:12:09+0000", [
            _answer("full_name", "Ivan Horvat"),
            _answer("phone_number", "098 765 4321"),
            _answer("country", "HR"),
        ]),
        _seed_lead(BATCH_LEADGEN_IDS[0], "2026-12-03T10:00:01+0000", [
            _answer("full_name", "Marko Babić"),
            _answer("email", "marko.babic@example.com"),
        ]),
        _seed_lead(BATCH_LEADGEN_IDS[1], "2026-12-03T10:00:02+0000", [
            _answer("full_name", "Elene Kapanadze"),
            _answer("email", "elene.k@example.ge"),
            _answer("phone_number", "+995 577 11 22 33"),
        ]),
        _seed_lead(BATCH_LEADGEN_IDS[2], "2026-12-03T10:00:04+0000", [
            _answer("first_name", "Petra"),
            _answer("last_name", "Novak"),
            _answer("email", "petra.novak@example.si"),
        ]),
    ]  # fmt: skip


class FacebookStore(VendorStore):
    """Leads by id, the ids the page token may not read, and whether the token has expired."""

    def __init__(self, seed: bool) -> None:
        self.leads: dict[str, dict[str, Any]] = {}
        self.unreadable: set[str] = set()
        self.token_expired_at: str | None = None
        if seed:
            self.leads = {lead["id"]: lead for lead in seed_leads()}

    def snapshot(self) -> dict[str, Any]:
        """Return the leads, the unreadable ids and the token's state."""
        return {
            "leads": copy.deepcopy(list(self.leads.values())),
            "unreadable_lead_ids": sorted(self.unreadable),
            "token_expired": self.token_expired_at is not None,
        }


# --- errors ---------------------------------------------------------------------------------


def graph_error(
    status: int, message: str, code: int, kind: str = "OAuthException", **extra: Any
) -> Response:
    """Answer in Graph's error envelope, with Graph's escaping."""
    error: dict[str, Any] = {"message": message, "type": kind, "code": code}
    error.update(extra)
    error["fbtrace_id"] = "A" + secrets.token_urlsafe(16)[:22]
    response = _graph_response({"error": error}, status)
    if code == 190:
        response.headers["WWW-Authenticate"] = (
            f'OAuth "Facebook Platform" "invalid_token" "{message}"'
        )
    return response


def _graph_response(body: Any, status: int = 200) -> Response:
    return Response(meta_json(body), status=status, content_type="application/json; charset=UTF-8")


def _unreadable(object_id: str) -> Response:
    message = (
        f"Unsupported get request. Object with ID '{object_id}' does not exist, cannot be "
        f"loaded due to missing permissions, or does not support this operation. {DOCS_HINT}"
    )
    return graph_error(400, message, 100, "GraphMethodException", error_subcode=33)


def _throttled(code: int) -> Response:
    response = graph_error(400, THROTTLE_MESSAGES[code], code, is_transient=True)
    usage = json.dumps({"call_count": 100, "total_cputime": 12, "total_time": 31})
    header = "X-Page-Usage" if code == 32 else "X-App-Usage"
    response.headers[header] = usage
    return response


# --- emulator -------------------------------------------------------------------------------


class FacebookEmulator(VendorEmulator):
    """The Graph API under /graph: page-token auth, versioned paths, Graph-shaped errors."""

    name = VENDOR
    prefix = "/graph"

    def __init__(self, page_token: str, app_secret: str, verify_token: str) -> None:
        self.page_token = page_token
        self.app_secret = app_secret
        self.verify_token = verify_token

    def blueprint(self) -> Blueprint:
        """Return the Graph routes."""
        return bp

    def control_blueprint(self) -> Blueprint:
        """Return /_sandbox/graph/... routes."""
        return control

    def new_store(self, seed: bool) -> FacebookStore:
        """Build the page's leads."""
        return FacebookStore(seed)

    def guard(self, path: str) -> Response | None:
        """Require the page token (query, form or Authorization header) and a valid proof."""
        token = request.values.get("access_token")
        scheme, _, header_token = request.headers.get("Authorization", "").partition(" ")
        if not token and scheme.lower() in ("oauth", "bearer"):
            token = header_token.strip()
        if not token:
            return graph_error(400, "An access token is required to request this resource.", 104)
        if not hmac.compare_digest(token, self.page_token):
            return graph_error(400, "Invalid OAuth access token - Cannot parse access token", 190)
        state = current_state()
        with state.lock:
            expired_at = state.store(VENDOR, FacebookStore).token_expired_at
        if expired_at is not None:
            now = dt.datetime.now(dt.UTC).strftime("%A, %d-%b-%y %H:%M:%S UTC")
            message = (
                f"Error validating access token: Session has expired on {expired_at}. "
                f"The current time is {now}."
            )
            return graph_error(400, message, 190, error_subcode=463)
        proof = request.values.get("appsecret_proof")
        if proof is not None:
            wanted = hmac.new(self.app_secret.encode(), token.encode(), hashlib.sha256)
            if not hmac.compare_digest(proof, wanted.hexdigest()):
                message = "Invalid appsecret_proof provided in the API argument"
                return graph_error(400, message, 100, "GraphMethodException")
        return None

    def fault_response(self, spec: FaultSpec, path: str) -> Response:
        """Answer throttling faults with Graph's codes and 5xx faults with its server errors."""
        if spec.kind == "graph_throttle":
            assert spec.code is not None
            return _throttled(spec.code)
        if spec.kind == "429":
            # Graph signals throttling in the body, not with HTTP 429: the app limit it is.
            return _throttled(4)
        if spec.kind == "500":
            return graph_error(500, "An unknown error has occurred.", 1, is_transient=False)
        message = "An unexpected error has occurred. Please retry your request later."
        return graph_error(int(spec.kind), message, 2, is_transient=True)

    def error_response(self, status: int, message: str, path: str) -> Response:
        """Answer unknown paths and methods the way Graph does."""
        if status >= 500:
            return graph_error(500, "An unknown error has occurred.", 1)
        if status == 405:
            method = request.method.lower()
            return graph_error(
                400, f"Unsupported {method} request. {DOCS_HINT}", 100, "GraphMethodException"
            )
        return graph_error(400, f"Unknown path components: {path}", 2500)

    def product_env(self, base_url: str) -> dict[str, str]:
        """Point the product's Facebook connector here."""
        return {
            "FACEBOOK_GRAPH_URL": base_url + self.prefix,
            "FACEBOOK_PAGE_ACCESS_TOKEN": self.page_token,
            "FACEBOOK_APP_SECRET": self.app_secret,
            "FACEBOOK_VERIFY_TOKEN": self.verify_token,
        }


def from_env() -> FacebookEmulator:
    """Build the emulator with credentials from SANDBOX_FACEBOOK_* variables."""
    return FacebookEmulator(
        page_token=os.environ.get("SANDBOX_FACEBOOK_PAGE_ACCESS_TOKEN", DEFAULT_PAGE_TOKEN),
        app_secret=os.environ.get("SANDBOX_FACEBOOK_APP_SECRET", DEFAULT_APP_SECRET),
        verify_token=os.environ.get("SANDBOX_FACEBOOK_VERIFY_TOKEN", DEFAULT_VERIFY_TOKEN),
    )


def _emulator() -> FacebookEmulator:
    emulator = current_state().emulators[VENDOR]
    assert isinstance(emulator, FacebookEmulator)
    return emulator


def _store() -> FacebookStore:
    return current_state().store(VENDOR, FacebookStore)


# --- Graph routes ---------------------------------------------------------------------------


def _requested_fields() -> list[str] | Response:
    raw = request.args.get("fields")
    if raw is None:
        return list(DEFAULT_LEAD_FIELDS)
    wanted = [name.strip() for name in raw.split(",") if name.strip()]
    for name in wanted:
        if name not in LEAD_FIELDS:
            message = f"(#100) Tried accessing nonexisting field ({name}) on node type (Lead)"
            return graph_error(400, message, 100)
    return wanted


@bp.get("/<version>/<object_id>")
def get_object(version: str, object_id: str) -> Response:
    """Read one lead with the requested fields (GET /{leadgen_id})."""
    if not _VERSION.fullmatch(version):
        return graph_error(400, f"Unknown path components: /{object_id}", 2500)
    fields = _requested_fields()
    if isinstance(fields, Response):
        return fields
    with current_state().lock:
        store = _store()
        lead = copy.deepcopy(store.leads.get(object_id))
        readable = object_id not in store.unreadable
    if lead is None or not readable:
        return _unreadable(object_id)

    wanted = set(fields) | {"id"}  # Graph always answers a node's id
    body = {name: lead[name] for name in LEAD_FIELDS if name in wanted and name in lead}
    logger.info("graph lead read id=%s fields=%s", object_id, ",".join(sorted(wanted)))
    return _graph_response(body)


@bp.get("/<object_id>")
def get_unversioned(object_id: str) -> Response:
    """Refuse an unversioned read, so the product must pin a Graph API version."""
    # Graph itself serves unversioned calls at the app's oldest available version, whose
    # shapes can change under the product; the sandbox refuses them to catch a missing pin.
    message = (
        f"(#2635) The sandbox requires a versioned path such as /v21.0/{object_id}; an "
        "unversioned call would run at the app's oldest available API version."
    )
    return graph_error(400, message, 2635)


# --- control routes -------------------------------------------------------------------------


def _control_error(message: str, status: int = 400) -> Response:
    response = jsonify({"error": message})
    response.status_code = status
    return response


def _check_field_data(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise ValueError("field_data must be a non-empty list of {name, values} objects.")
    answers = []
    for index, item in enumerate(raw):
        ok = isinstance(item, dict) and set(item) == {"name", "values"}
        ok = ok and isinstance(item["name"], str) and bool(item["name"].strip())
        values = item.get("values") if isinstance(item, dict) else None
        if not ok or not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(
                f"field_data[{index}] must be {{'name': str, 'values': [str, ...]}}, got {item!r}."
            )
        answers.append({"name": item["name"], "values": list(values)})
    return answers


def _new_lead(body: Any, store: FacebookStore) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise TypeError("The lead must be a JSON object.")
    allowed = {"id", "form_id", "ad_id", "created_time", "field_data", "readable"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ValueError(f"Unknown lead keys {unknown}; allowed: {sorted(allowed)}.")
    lead_id = body.get("id") or str(int(time.time() * 1000) * 1000 + len(store.leads))
    for key in ("id", "form_id", "ad_id"):
        value = lead_id if key == "id" else body.get(key)
        if value is not None and not (isinstance(value, str) and _GRAPH_ID.fullmatch(value)):
            raise ValueError(f"{key} must be a string of digits, as Graph ids are, got {value!r}.")
    if body.get("form_id") is None:
        raise ValueError("form_id is required.")
    if lead_id in store.leads:
        raise ValueError(f"A lead with id {lead_id} exists already.")
    created = body.get("created_time") or _graph_time(dt.datetime.now(dt.UTC))
    try:
        _epoch(created)
    except (TypeError, ValueError):
        raise ValueError(
            f"created_time must look like 2026-12-02T16:27:03+0000, got {created!r}."
        ) from None
    lead = _seed_lead(lead_id, created, _check_field_data(body.get("field_data")), body["form_id"])
    lead["ad_id"] = body.get("ad_id") or DEFAULT_AD_ID
    return lead


@control.post("/leads")
def add_lead() -> Response:
    """Add a lead that GET /{leadgen_id} then answers; `readable: false` makes it unreadable."""
    body = request.get_json(silent=True)
    state = current_state()
    with state.lock:
        store = state.store(VENDOR, FacebookStore)
        try:
            lead = _new_lead(body, store)
        except (TypeError, ValueError) as exc:
            return _control_error(str(exc))
        store.leads[lead["id"]] = lead
        if body.get("readable") is False:
            store.unreadable.add(lead["id"])
    logger.info("graph lead added id=%s", lead["id"])
    return jsonify(lead)


@control.post("/leads/<lead_id>/unreadable")
def make_unreadable(lead_id: str) -> Response:
    """Make a lead unreadable by the page token (Graph then answers code 100, subcode 33)."""
    state = current_state()
    with state.lock:
        store = state.store(VENDOR, FacebookStore)
        if lead_id not in store.leads:
            return _control_error(f"No lead with id {lead_id}.", 404)
        store.unreadable.add(lead_id)
    return jsonify({"id": lead_id, "readable": False})


@control.post("/token/expire")
def expire_token() -> Response:
    """Expire the page token: every Graph call then answers code 190, subcode 463."""
    state = current_state()
    with state.lock:
        stamp = dt.datetime.now(dt.UTC).strftime("%A, %d-%b-%y %H:%M:%S UTC")
        state.store(VENDOR, FacebookStore).token_expired_at = stamp
    return jsonify({"token_expired": True})


@control.post("/webhook")
def build_webhook() -> Response:
    """Build and sign a leadgen webhook for stored leads: {"leadgen_ids": [...]}."""
    body = request.get_json(silent=True)
    ids = body.get("leadgen_ids") if isinstance(body, dict) else None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        return _control_error("leadgen_ids must be a non-empty list of lead id strings.")
    with current_state().lock:
        leads = _store().leads
        missing = [lead_id for lead_id in ids if lead_id not in leads]
        chosen = [copy.deepcopy(leads[lead_id]) for lead_id in ids if lead_id in leads]
    if missing:
        return _control_error(f"No leads with ids {missing}.", 404)
    raw = leadgen_webhook_body(chosen)
    headers = {
        "Content-Type": "application/json",
        "X-Hub-Signature-256": sign_webhook(raw, _emulator().app_secret),
    }
    return jsonify({"body": raw.decode("ascii"), "headers": headers})
