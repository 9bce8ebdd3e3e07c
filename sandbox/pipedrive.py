"""Pipedrive emulator: API v2 persons, organizations, deals, activities, pipelines, fields;
v1 users, notes, activity types, webhooks (with delivery) and files."""

from __future__ import annotations

import base64
import binascii
import collections
import copy
import datetime as dt
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flask import Blueprint, Response, g, jsonify, request

from sandbox import pipedrive_hooks as hooks
from sandbox.faults import FaultSpec
from sandbox.state import current_state
from sandbox.vendor import VendorEmulator, VendorStore

logger = logging.getLogger(__name__)

VENDOR = "pipedrive"
DEFAULT_TOKEN = "sandbox-pipedrive-token"
ERROR_INFO = "Please check developers.pipedrive.com"
RATE_WINDOW_S = 2.0
# Reported when no limit is configured: a mid-plan burst limit, so headers look real.
NOMINAL_RATE_LIMIT = 80
NOMINAL_SEARCH_LIMIT = 10
ADMIN_USER_ID = 21458870
DEFAULT_LIMIT = 100
MAX_LIMIT = 500
VISIBILITY = (1, 3, 5, 7)
_SEARCH_PATH = re.compile(r"/search$|/itemSearch$")

bp = Blueprint("pipedrive", __name__)
control = Blueprint("pipedrive_control", __name__, url_prefix="/_sandbox/pipedrive")


class PipedriveError(Exception):
    """A request Pipedrive refuses, with the status and message it answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_body(status: int, message: str) -> dict[str, Any]:
    """Build Pipedrive's error envelope."""
    return {
        "success": False,
        "error": message,
        "errorCode": status,
        "error_info": ERROR_INFO,
        "data": None,
        "additional_data": None,
    }


def _error(status: int, message: str) -> Response:
    response = jsonify(error_body(status, message))
    response.status_code = status
    return response


def _ok(data: Any, additional_data: dict[str, Any] | None = None) -> Response:
    body: dict[str, Any] = {"success": True, "data": data}
    if additional_data is not None:
        body["additional_data"] = additional_data
    return jsonify(body)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _rfc3339(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _v1_time(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


# --- seed -----------------------------------------------------------------------------------

SEED_TIME = "2026-11-02T08:00:00Z"
SEED_USERS = [
    (21458870, "Sandbox Admin", "admin@tbilisi-digital.example", True, True),
    (21458877, "Luka Kapanadze", "luka@tbilisi-digital.example", True, False),
    (21458878, "Mariam Lomidze", "mariam@tbilisi-digital.example", True, False),
    (21458879, "Davit Gelashvili", "davit@tbilisi-digital.example", False, False),
]
SEED_STAGES = [
    "Qualified",
    "Contact made",
    "Needs defined",
    "Proposal made",
    "Negotiations started",
]
SEED_CUSTOM_FIELDS = [
    ("Lead source", "957ae6bdc9c3862390160642fb03f3be22c7a3f6", "enum",
     [(27, "Typeform"), (28, "Website"), (29, "Facebook")]),
    ("Services", "95c960c03ed709b681ce08f04359b325c7cdde2e", "set",
     [(31, "Website design"), (32, "SEO"), (33, "Paid social ads"), (34, "Email marketing")]),
    ("Message", "8223a9895ede67f9f21d42a97ab69dd6c6de5027", "text", None),
    ("Budget", "b74db61e1652627caee25380ec67c0f70ba34ccb", "double", None),
    ("UTM campaign", "849720d93e1e62dfed4e8b6637cda9c9c85375c8", "varchar", None),
]  # fmt: skip
# The v2 fields API lists system fields too; a client must pick custom ones by is_custom_field.
SYSTEM_DEAL_FIELDS = [
    ("Title", "title", "varchar"),
    ("Value", "value", "monetary"),
    ("Person", "person_id", "people"),
    ("Organization", "org_id", "org"),
    ("Pipeline", "pipeline_id", "double"),
    ("Stage", "stage_id", "stage"),
    ("Owner", "owner_id", "user"),
    ("Status", "status", "status"),
    ("Expected close date", "expected_close_date", "date"),
]


SEED_ACTIVITY_TYPES = [
    ("Call", "call"), ("Meeting", "meeting"), ("Task", "task"), ("Deadline", "deadline"),
    ("Email", "email"), ("Lunch", "lunch"),
]  # fmt: skip


def _seed_activity_type(type_id: int, name: str, key: str) -> dict[str, Any]:
    return {
        "id": type_id, "order_nr": type_id, "name": name, "key_string": key, "icon_key": key,
        "active_flag": True, "color": None, "is_custom_flag": False,
        "add_time": "2026-11-02 08:00:00", "update_time": "2026-11-02 08:00:00",
    }  # fmt: skip


def _seed_user(user_id: int, name: str, email: str, active: bool, admin: bool) -> dict[str, Any]:
    return {
        "id": user_id,
        "name": name,
        "default_currency": "EUR",
        "locale": "en_US",
        "lang": 1,
        "email": email,
        "phone": None,
        "activated": active,
        "last_login": "2026-12-01 08:30:00",
        "created": "2026-11-02 08:00:00",
        "modified": "2026-11-02 08:00:00",
        "has_created_company": admin,
        "access": [{"app": "sales", "admin": admin, "permission_set_id": "sandbox"}],
        "active_flag": active,
        "timezone_name": "Asia/Tbilisi",
        "timezone_offset": "+04:00",
        "role_id": 1,
        "icon_url": None,
        "is_you": user_id == ADMIN_USER_ID,
        "is_admin": 1 if admin else 0,
    }


def _seed_field(name: str, code: str, kind: str, options: Any, custom: bool) -> dict[str, Any]:
    return {
        "field_name": name,
        "field_code": code,
        "field_type": kind,
        "options": [{"id": oid, "label": label} for oid, label in options] if options else None,
        "subfields": None,
        "is_custom_field": custom,
        "is_optional_response_field": False,
    }


class PipedriveStore(VendorStore):
    """One Pipedrive company: users, pipeline, fields, contacts, deals and notes."""

    def __init__(self, seed: bool) -> None:
        self.users: dict[int, dict[str, Any]] = {}
        self.pipelines: dict[int, dict[str, Any]] = {}
        self.stages: dict[int, dict[str, Any]] = {}
        self.deal_fields: list[dict[str, Any]] = []
        self.organizations: dict[int, dict[str, Any]] = {}
        self.persons: dict[int, dict[str, Any]] = {}
        self.deals: dict[int, dict[str, Any]] = {}
        self.notes: dict[int, dict[str, Any]] = {}
        self.activities: dict[int, dict[str, Any]] = {}
        self.activity_types: dict[int, dict[str, Any]] = {}
        self.webhooks: dict[int, dict[str, Any]] = {}
        self.deliveries: list[dict[str, Any]] = []
        self.files: dict[int, dict[str, Any]] = {}
        self.file_contents: dict[int, bytes] = {}
        self.first_won_times: dict[int, str] = {}
        # Set when the store is replaced: pending webhook retries then give up.
        self.stop = threading.Event()
        self.next_ids = {
            "person": 1900, "organization": 800, "deal": 5300, "note": 9000,
            "activity": 9900, "webhook": 1927400, "file": 700,
        }  # fmt: skip
        self.windows: dict[tuple[str, str], collections.deque[float]] = {}
        self.window_lock = threading.Lock()
        if seed:
            self._seed()

    def _seed(self) -> None:
        for user in SEED_USERS:
            self.users[user[0]] = _seed_user(*user)
        self.pipelines[1] = {
            "id": 1, "name": "Sales", "order_nr": 0, "is_deleted": False,
            "is_deal_probability_enabled": False, "add_time": SEED_TIME,
            "update_time": SEED_TIME, "is_selected": True,
        }  # fmt: skip
        for order, name in enumerate(SEED_STAGES, start=1):
            self.stages[order] = {
                "id": order, "order_nr": order, "name": name, "is_deleted": False,
                "deal_probability": 100, "pipeline_id": 1, "is_deal_rot_enabled": False,
                "days_to_rotten": None, "add_time": SEED_TIME, "update_time": SEED_TIME,
            }  # fmt: skip
        for type_id, (name, key) in enumerate(SEED_ACTIVITY_TYPES, start=1):
            self.activity_types[type_id] = _seed_activity_type(type_id, name, key)
        self.deal_fields = [_seed_field(n, c, k, None, False) for n, c, k in SYSTEM_DEAL_FIELDS]
        self.deal_fields += [_seed_field(n, c, k, o, True) for n, c, k, o in SEED_CUSTOM_FIELDS]
        self.organizations[733] = _new_org(733, "შპს „ბერიძე დიზაინი“", 21458877, SEED_TIME)
        self.persons[1842] = _new_person(
            1842, "Nino Beridze", 21458877, 733, SEED_TIME,
            [_contact("nino@example.com", True), _contact("Nino.Beridze+Typeform@example.com")],
            [_contact("+995 599 12 34 56", True, "mobile"), _contact("(032) 2 45 67 89")],
        )  # fmt: skip

    def take_id(self, kind: str) -> int:
        """Hand out the next id of `kind`; ids only grow, as Pipedrive's do."""
        new_id = self.next_ids[kind]
        self.next_ids[kind] += 1
        return new_id

    def custom_fields(self) -> dict[str, dict[str, Any]]:
        """Map field codes of custom deal fields to their definitions."""
        return {f["field_code"]: f for f in self.deal_fields if f["is_custom_field"]}

    def snapshot(self) -> dict[str, Any]:
        """Return a JSON-ready copy of the company's data."""
        return copy.deepcopy(
            {
                "users": list(self.users.values()),
                "pipelines": list(self.pipelines.values()),
                "stages": list(self.stages.values()),
                "dealFields": self.deal_fields,
                "organizations": list(self.organizations.values()),
                "persons": list(self.persons.values()),
                "deals": list(self.deals.values()),
                "notes": list(self.notes.values()),
                "activities": list(self.activities.values()),
                "activityTypes": list(self.activity_types.values()),
                "webhooks": list(self.webhooks.values()),
                "webhook_deliveries": self.deliveries,
                "files": list(self.files.values()),
            }
        )

    def close(self) -> None:
        """Stop pending webhook retries."""
        self.stop.set()


def _contact(value: str, primary: bool = False, label: str = "work") -> dict[str, Any]:
    return {"value": value, "primary": primary, "label": label}


def _new_org(org_id: int, name: str, owner_id: int, now: str) -> dict[str, Any]:
    return {
        "id": org_id, "name": name, "owner_id": owner_id, "add_time": now, "update_time": now,
        "is_deleted": False, "visible_to": 3, "address": None, "label_ids": [],
        "custom_fields": {},
    }  # fmt: skip


def _new_person(
    person_id: int,
    name: str,
    owner_id: int,
    org_id: int | None,
    now: str,
    emails: list[dict[str, Any]],
    phones: list[dict[str, Any]],
) -> dict[str, Any]:
    first, _, last = name.partition(" ")
    return {
        "id": person_id, "name": name, "first_name": first, "last_name": last or None,
        "owner_id": owner_id, "org_id": org_id, "add_time": now, "update_time": now,
        "emails": emails, "phones": phones, "is_deleted": False, "visible_to": 3,
        "label_ids": [], "picture_id": None, "custom_fields": {},
    }  # fmt: skip


# --- emulator -------------------------------------------------------------------------------


class PipedriveEmulator(VendorEmulator):
    """Pipedrive under /pipedrive: token auth, burst rate limits, vendor-shaped errors."""

    name = VENDOR
    prefix = "/pipedrive"

    def __init__(self, token: str) -> None:
        self.token = token

    def blueprint(self) -> Blueprint:
        """Return the Pipedrive routes."""
        return bp

    def new_store(self, seed: bool) -> PipedriveStore:
        """Build a fresh company."""
        return PipedriveStore(seed)

    def guard(self, path: str) -> Response | None:
        """Check the API token, then the rolling 2-second burst limits."""
        token = request.headers.get("x-api-token") or request.args.get("api_token")
        if token != self.token:
            return _error(401, "unauthorized access")
        state = current_state()
        store = state.store(VENDOR, PipedriveStore)
        now = time.monotonic()
        checks = [("all", state.setting("pipedrive_rate_limit"), NOMINAL_RATE_LIMIT)]
        if _SEARCH_PATH.search(path):
            limit = state.setting("pipedrive_search_rate_limit")
            checks.append(("search", limit, NOMINAL_SEARCH_LIMIT))
        with store.window_lock:
            windows = [
                store.windows.setdefault((token, k), collections.deque()) for k, *_ in checks
            ]
            for window in windows:
                while window and now - window[0] >= RATE_WINDOW_S:
                    window.popleft()
            for window, (_, limit, _) in zip(windows, checks, strict=True):
                if limit and len(window) >= limit:
                    reset = max(1, math.ceil(RATE_WINDOW_S - (now - window[0])))
                    return _rate_limited(limit, reset)
            for window in windows:
                window.append(now)
            # Report the tightest window this call counted against.
            reports = [
                (limit or nominal, (limit or nominal) - len(window), window[0])
                for window, (_, limit, nominal) in zip(windows, checks, strict=True)
            ]
        limit, remaining, oldest = min(reports, key=lambda report: report[1])
        reset = max(1, math.ceil(RATE_WINDOW_S - (now - oldest)))
        g.pipedrive_ratelimit = (limit, max(0, remaining), reset)
        return None

    def fault_response(self, spec: FaultSpec, path: str) -> Response:
        """Answer an injected fault as Pipedrive (or the proxy in front of it) does."""
        if spec.kind == "429":
            return _rate_limited(NOMINAL_RATE_LIMIT, spec.reset_s)
        if spec.kind == "502":
            # The edge proxy answers HTML, which pipedrive-python-lib hands back as a result.
            return Response(BAD_GATEWAY_HTML, status=502, content_type="text/html")
        messages = {"500": "Internal server error", "503": "Service temporarily unavailable"}
        return _error(int(spec.kind), messages[spec.kind])

    def error_response(self, status: int, message: str, path: str) -> Response:
        """Answer routing errors in Pipedrive's envelope."""
        messages = {404: "Unknown method .", 405: "Method not allowed"}
        return _error(status, messages.get(status, message))

    def decorate(self, response: Response, path: str) -> Response:
        """Put x-ratelimit-* headers on every answer, as Pipedrive does."""
        # Refused before counting (401, injected faults): report a full window.
        default = (NOMINAL_RATE_LIMIT, NOMINAL_RATE_LIMIT, 2)
        limit, remaining, reset = g.get("pipedrive_ratelimit", default)
        response.headers.setdefault("x-ratelimit-limit", str(limit))
        response.headers.setdefault("x-ratelimit-remaining", str(remaining))
        response.headers.setdefault("x-ratelimit-reset", str(reset))
        return response

    def product_env(self, base_url: str) -> dict[str, str]:
        """Point the product's Pipedrive connector here."""
        return {"PIPEDRIVE_BASE_URL": base_url + self.prefix, "PIPEDRIVE_API_TOKEN": self.token}

    def control_blueprint(self) -> Blueprint:
        """Return /_sandbox/pipedrive/... routes (changes made in Pipedrive's UI, deliveries)."""
        return control


def from_env() -> PipedriveEmulator:
    """Build the emulator with the token from SANDBOX_PIPEDRIVE_TOKEN."""
    return PipedriveEmulator(os.environ.get("SANDBOX_PIPEDRIVE_TOKEN", DEFAULT_TOKEN))


BAD_GATEWAY_HTML = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>\r\n"
)


def _rate_limited(limit: int, reset_s: int) -> Response:
    body = error_body(429, "Request over limit")
    body["error_info"] = f"Rate limit of {limit} requests per 2 seconds exceeded; retry later."
    response = jsonify(body)
    response.status_code = 429
    response.headers["x-ratelimit-limit"] = str(limit)
    response.headers["x-ratelimit-remaining"] = "0"
    response.headers["x-ratelimit-reset"] = str(reset_s)
    return response


@bp.errorhandler(PipedriveError)
def _refused(exc: PipedriveError) -> Response:
    return _error(exc.status, exc.message)


def _store() -> PipedriveStore:
    return current_state().store(VENDOR, PipedriveStore)


# --- request parsing ------------------------------------------------------------------------


def _json_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise PipedriveError(400, "Request body must be a JSON object.")
    return body


def _query_int(name: str, default: int | None = None) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise PipedriveError(400, f"Parameter '{name}' must be an integer, got {raw!r}.") from None


def _query_bool(name: str) -> bool:
    raw = request.args.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise PipedriveError(400, f"Parameter '{name}' must be a boolean, got {raw!r}.")
    return raw in ("true", "1")


def _limit() -> int:
    limit = _query_int("limit", DEFAULT_LIMIT)
    assert limit is not None
    if not 1 <= limit <= MAX_LIMIT:
        raise PipedriveError(400, f"Parameter 'limit' must be between 1 and {MAX_LIMIT}.")
    return limit


def _page(items: list[Any]) -> tuple[list[Any], dict[str, Any]]:
    """Cut one cursor page out of `items`; the cursor is opaque to clients, as Pipedrive's."""
    offset = 0
    cursor = request.args.get("cursor")
    if cursor:
        try:
            offset = int(json.loads(base64.urlsafe_b64decode(cursor + "==="))["offset"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise PipedriveError(400, "Parameter 'cursor' is not a valid cursor.") from None
    limit = _limit()
    page = items[offset : offset + limit]
    next_cursor = None
    if offset + limit < len(items):
        raw = json.dumps({"offset": offset + limit}).encode()
        next_cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    return page, {"next_cursor": next_cursor}


Check = Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(item) for item in value)


def _is_date(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value) is not None


def _is_dict(value: Any) -> bool:
    return isinstance(value, dict)


_TYPE_NAMES = {
    _is_int: "an integer", _is_number: "a number", _is_str: "a string", _is_bool: "a boolean",
    _is_int_list: "an array of integers", _is_date: "a date (YYYY-MM-DD)", _is_dict: "an object",
}  # fmt: skip

# name -> (check, nullable)
DEAL_SCHEMA: dict[str, tuple[Check, bool]] = {
    "title": (_is_str, False), "owner_id": (_is_int, False), "person_id": (_is_int, True),
    "org_id": (_is_int, True), "pipeline_id": (_is_int, False), "stage_id": (_is_int, False),
    "value": (_is_number, False), "currency": (_is_str, False), "is_deleted": (_is_bool, False),
    "is_archived": (_is_bool, False), "archive_time": (_is_str, True),
    "status": (_is_str, False), "probability": (_is_number, True),
    "lost_reason": (_is_str, True), "visible_to": (_is_int, False),
    "close_time": (_is_str, True), "won_time": (_is_str, True), "lost_time": (_is_str, True),
    "expected_close_date": (_is_date, True), "label_ids": (_is_int_list, False),
    "custom_fields": (_is_dict, False), "add_time": (_is_str, False),
    "origin_id": (_is_str, True), "channel": (_is_int, True), "channel_id": (_is_str, True),
}  # fmt: skip
PERSON_SCHEMA: dict[str, tuple[Check, bool]] = {
    "name": (_is_str, False), "owner_id": (_is_int, False), "org_id": (_is_int, True),
    "add_time": (_is_str, False), "update_time": (_is_str, False),
    "emails": (lambda v: isinstance(v, list), False),
    "phones": (lambda v: isinstance(v, list), False),
    "visible_to": (_is_int, False), "label_ids": (_is_int_list, False),
    "marketing_status": (_is_str, False), "custom_fields": (_is_dict, False),
}  # fmt: skip
ORG_SCHEMA: dict[str, tuple[Check, bool]] = {
    "name": (_is_str, False), "owner_id": (_is_int, False), "add_time": (_is_str, False),
    "update_time": (_is_str, False), "visible_to": (_is_int, False),
    "label_ids": (_is_int_list, False), "address": (_is_dict, True),
    "custom_fields": (_is_dict, False),
}  # fmt: skip


def _check_schema(body: dict[str, Any], schema: dict[str, tuple[Check, bool]]) -> None:
    unknown = sorted(set(body) - set(schema))
    if unknown:
        raise PipedriveError(400, f"Unexpected property '{unknown[0]}' in request body.")
    for key, value in body.items():
        check, nullable = schema[key]
        if value is None and nullable:
            continue
        if not check(value):
            expected = _TYPE_NAMES.get(check, "a list")
            raise PipedriveError(400, f"Property '{key}' must be {expected}, got {value!r}.")


def _check_name(body: dict[str, Any], key: str, required: bool) -> None:
    if key not in body and not required:
        return
    if not isinstance(body.get(key), str) or not body[key].strip():
        raise PipedriveError(400, f"Property '{key}' is required and must not be empty.")


def _check_refs(store: PipedriveStore, body: dict[str, Any]) -> None:
    refs: list[tuple[str, dict[int, Any], str]] = [
        ("owner_id", store.users, "User"),
        ("person_id", store.persons, "Person"),
        ("org_id", store.organizations, "Organization"),
    ]
    for key, table, label in refs:
        value = body.get(key)
        if value is not None and value not in table:
            raise PipedriveError(400, f"{label} with id {value} referenced by '{key}' not found.")
    if "visible_to" in body and body["visible_to"] not in VISIBILITY:
        raise PipedriveError(400, f"Property 'visible_to' must be one of {list(VISIBILITY)}.")


def _contacts(body: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = body.get(key) or []
    contacts = []
    for index, item in enumerate(items):
        where = f"{key}[{index}]"
        if not isinstance(item, dict):
            raise PipedriveError(400, f"Property '{where}' must be an object with 'value'.")
        unknown = sorted(set(item) - {"value", "primary", "label"})
        if unknown:
            raise PipedriveError(400, f"Unexpected property '{where}.{unknown[0]}'.")
        if not isinstance(item.get("value"), str) or not item["value"].strip():
            raise PipedriveError(400, f"Property '{where}.value' must be a non-empty string.")
        if not isinstance(item.get("primary", False), bool):
            raise PipedriveError(400, f"Property '{where}.primary' must be a boolean.")
        if not isinstance(item.get("label", "work"), str):
            raise PipedriveError(400, f"Property '{where}.label' must be a string.")
        primary, label = item.get("primary", False), item.get("label", "work")
        contacts.append(_contact(item["value"], primary, label))
    if contacts and not any(c["primary"] for c in contacts):
        # Pipedrive promotes the first entry when none is marked primary.
        contacts[0]["primary"] = True
    return contacts


# --- persons and organizations --------------------------------------------------------------


@bp.post("/api/v2/persons")
def add_person() -> Response:
    """Create a person (addPerson)."""
    body = _json_body()
    _check_schema(body, PERSON_SCHEMA)
    _check_name(body, "name", required=True)
    if body.get("custom_fields"):
        raise PipedriveError(400, "Person custom field not found: no person fields exist.")
    emails, phones = _contacts(body, "emails"), _contacts(body, "phones")

    store = _store()
    with current_state().lock:
        _check_refs(store, body)
        now = _rfc3339(_now())
        person = _new_person(
            store.take_id("person"), body["name"].strip(), body.get("owner_id", ADMIN_USER_ID),
            body.get("org_id"), body.get("add_time", now), emails, phones,
        )  # fmt: skip
        person["visible_to"] = body.get("visible_to", 3)
        person["label_ids"] = body.get("label_ids", [])
        store.persons[person["id"]] = person
        logger.info("pipedrive person created id=%s", person["id"])
        emit(store, "person", "create", None, person, "api")
        return _ok(copy.deepcopy(person))


def change_person(
    store: PipedriveStore, person_id: int, body: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Apply a v2 PATCH body to a person; return the person before and after. Hold the lock."""
    person = store.persons.get(person_id)
    if person is None or person["is_deleted"]:
        raise PipedriveError(404, "Person not found")
    _check_schema(body, PERSON_SCHEMA)
    _check_name(body, "name", required=False)
    if body.get("custom_fields"):
        raise PipedriveError(400, "Person custom field not found: no person fields exist.")
    _check_refs(store, body)
    updated = copy.deepcopy(person)
    for key in ("emails", "phones"):
        if key in body:
            updated[key] = _contacts(body, key)
    plain = set(body) - {"emails", "phones", "custom_fields", "name"}
    updated.update({key: body[key] for key in plain})
    if "name" in body:
        first, _, last = body["name"].strip().partition(" ")
        updated.update(name=body["name"].strip(), first_name=first, last_name=last or None)
    updated["update_time"] = body.get("update_time", _rfc3339(_now()))
    store.persons[person_id] = updated
    logger.info("pipedrive person updated id=%s keys=%s", person_id, sorted(body))
    return person, updated


@bp.patch("/api/v2/persons/<int:person_id>")
def update_person(person_id: int) -> Response:
    """Change some fields of a person (updatePerson)."""
    body = _json_body()
    store = _store()
    with current_state().lock:
        before, updated = change_person(store, person_id, body)
        emit(store, "person", "change", before, updated, "api")
        return _ok(copy.deepcopy(updated))


@bp.get("/api/v2/persons/<int:person_id>")
def get_person(person_id: int) -> Response:
    """Return one person (getPerson)."""
    with current_state().lock:
        person = _store().persons.get(person_id)
        if person is None or person["is_deleted"]:
            raise PipedriveError(404, "Person not found")
        return _ok(copy.deepcopy(person))


def _search_fields(allowed: Iterable[str]) -> set[str]:
    allowed = set(allowed)
    raw = request.args.get("fields")
    fields = set(raw.split(",")) if raw else set(allowed)
    if not fields <= allowed:
        bad = min(fields - allowed)
        raise PipedriveError(400, f"Parameter 'fields' has invalid value '{bad}'.")
    return fields


def _search_term(exact: bool) -> str:
    term = request.args.get("term", "").strip()
    # Pipedrive's documented minimum: 2 characters, or 1 with exact_match.
    minimum = 1 if exact else 2
    if len(term) < minimum:
        raise PipedriveError(400, f"Parameter 'term' must be at least {minimum} characters.")
    return term


def _text_hit(term: str, value: str | None, exact: bool) -> float:
    if not value:
        return 0.0
    if exact:
        return 1.0 if value.casefold() == term.casefold() else 0.0
    return 0.5 if term.casefold() in value.casefold() else 0.0


def _phone_hit(term: str, value: str, exact: bool) -> float:
    wanted, have = re.sub(r"\D", "", term), re.sub(r"\D", "", value)
    if not wanted or not have:
        return 0.0
    if exact:
        return 1.0 if wanted == have else 0.0
    return 0.5 if wanted in have else 0.0


def _person_score(person: dict[str, Any], term: str, fields: set[str], exact: bool) -> float:
    scores = [0.0]
    if "name" in fields:
        scores.append(_text_hit(term, person["name"], exact))
    if "email" in fields:
        scores += [_text_hit(term, e["value"], exact) for e in person["emails"]]
    if "phone" in fields:
        scores += [_phone_hit(term, p["value"], exact) for p in person["phones"]]
    return max(scores)


def _person_item(store: PipedriveStore, person: dict[str, Any]) -> dict[str, Any]:
    org = store.organizations.get(person["org_id"]) if person["org_id"] else None
    return {
        "id": person["id"],
        "type": "person",
        "name": person["name"],
        "phones": [p["value"] for p in person["phones"]],
        "emails": [e["value"] for e in person["emails"]],
        "visible_to": person["visible_to"],
        "owner": {"id": person["owner_id"]},
        "organization": {"id": org["id"], "name": org["name"], "address": None} if org else None,
        "custom_fields": [],
        "notes": [],
    }


@bp.get("/api/v2/persons/search")
def search_persons() -> Response:
    """Search persons by name, email or phone (searchPersons)."""
    exact = _query_bool("exact_match")
    term = _search_term(exact)
    fields = _search_fields(["name", "email", "phone", "notes", "custom_fields"])
    org_id = _query_int("organization_id")

    store = _store()
    with current_state().lock:
        hits = []
        for person in store.persons.values():
            if person["is_deleted"] or (org_id is not None and person["org_id"] != org_id):
                continue
            score = _person_score(person, term, fields, exact)
            if score:
                hits.append({"result_score": score, "item": _person_item(store, person)})
    hits.sort(key=lambda hit: (-hit["result_score"], hit["item"]["id"]))
    page, additional = _page(hits)
    return _ok({"items": page}, additional)


@bp.post("/api/v2/organizations")
def add_organization() -> Response:
    """Create an organization (addOrganization)."""
    body = _json_body()
    _check_schema(body, ORG_SCHEMA)
    _check_name(body, "name", required=True)
    if body.get("custom_fields"):
        raise PipedriveError(400, "Organization custom field not found: no such fields exist.")

    store = _store()
    with current_state().lock:
        _check_refs(store, body)
        now = _rfc3339(_now())
        org_id = store.take_id("organization")
        org = _new_org(org_id, body["name"].strip(), body.get("owner_id", ADMIN_USER_ID), now)
        org["visible_to"] = body.get("visible_to", 3)
        org["label_ids"] = body.get("label_ids", [])
        org["address"] = body.get("address")
        store.organizations[org_id] = org
        logger.info("pipedrive organization created id=%s", org_id)
        return _ok(copy.deepcopy(org))


@bp.get("/api/v2/organizations/<int:org_id>")
def get_organization(org_id: int) -> Response:
    """Return one organization (getOrganization)."""
    with current_state().lock:
        org = _store().organizations.get(org_id)
        if org is None or org["is_deleted"]:
            raise PipedriveError(404, "Organization not found")
        return _ok(copy.deepcopy(org))


@bp.get("/api/v2/organizations/search")
def search_organizations() -> Response:
    """Search organizations by name (searchOrganization)."""
    exact = _query_bool("exact_match")
    term = _search_term(exact)
    fields = _search_fields(["name", "address", "notes", "custom_fields"])

    with current_state().lock:
        hits = []
        for org in _store().organizations.values():
            score = _text_hit(term, org["name"], exact) if "name" in fields else 0.0
            if score and not org["is_deleted"]:
                item = {
                    "id": org["id"], "type": "organization", "name": org["name"],
                    "address": None, "visible_to": org["visible_to"],
                    "owner": {"id": org["owner_id"]}, "custom_fields": [], "notes": [],
                }  # fmt: skip
                hits.append({"result_score": score, "item": item})
    hits.sort(key=lambda hit: (-hit["result_score"], hit["item"]["id"]))
    page, additional = _page(hits)
    return _ok({"items": page}, additional)


# --- pipelines, stages, fields --------------------------------------------------------------


@bp.get("/api/v2/pipelines")
def get_pipelines() -> Response:
    """List pipelines (getPipelines)."""
    with current_state().lock:
        pipelines = copy.deepcopy(list(_store().pipelines.values()))
    page, additional = _page(pipelines)
    return _ok(page, additional)


@bp.get("/api/v2/pipelines/<int:pipeline_id>")
def get_pipeline(pipeline_id: int) -> Response:
    """Return one pipeline (getPipeline)."""
    with current_state().lock:
        pipeline = _store().pipelines.get(pipeline_id)
        if pipeline is None:
            raise PipedriveError(404, "Pipeline not found")
        return _ok(copy.deepcopy(pipeline))


@bp.get("/api/v2/stages")
def get_stages() -> Response:
    """List stages, optionally of one pipeline (getStages)."""
    pipeline_id = _query_int("pipeline_id")
    with current_state().lock:
        stages = [
            copy.deepcopy(stage)
            for stage in _store().stages.values()
            if pipeline_id is None or stage["pipeline_id"] == pipeline_id
        ]
    page, additional = _page(stages)
    return _ok(page, additional)


@bp.get("/api/v2/stages/<int:stage_id>")
def get_stage(stage_id: int) -> Response:
    """Return one stage (getStage)."""
    with current_state().lock:
        stage = _store().stages.get(stage_id)
        if stage is None:
            raise PipedriveError(404, "Stage not found")
        return _ok(copy.deepcopy(stage))


@bp.get("/api/v2/dealFields")
def get_deal_fields() -> Response:
    """List deal fields, system and custom (getDealFields)."""
    with current_state().lock:
        fields = copy.deepcopy(_store().deal_fields)
    page, additional = _page(fields)
    return _ok(page, additional)


# --- deals ----------------------------------------------------------------------------------


def _custom_value(field: dict[str, Any], value: Any) -> Any:
    """Check one custom field value in the v2 format; raise naming the field if it is wrong."""
    if value is None:
        return None
    kind, code = field["field_type"], field["field_code"]
    option_ids = [option["id"] for option in field["options"] or []]
    named = f"Custom field '{field['field_name']}' ({code}, {kind})"
    if kind == "enum" and not (_is_int(value) and value in option_ids):
        raise PipedriveError(400, f"{named} must be one option id of {option_ids}, got {value!r}.")
    if kind == "set" and not (_is_int_list(value) and set(value) <= set(option_ids)):
        raise PipedriveError(400, f"{named} must be a list of option ids of {option_ids}.")
    if kind in ("double", "monetary") and not _is_number(value):
        raise PipedriveError(400, f"{named} must be a number, got {value!r}.")
    if kind in ("text", "varchar") and not _is_str(value):
        raise PipedriveError(400, f"{named} must be a string, got {value!r}.")
    if kind == "varchar" and len(value) > 255:
        raise PipedriveError(400, f"{named} is longer than 255 characters.")
    return value


def _custom_values(store: PipedriveStore, raw: dict[str, Any]) -> dict[str, Any]:
    known = store.custom_fields()
    values = {}
    for code, value in raw.items():
        if code not in known:
            raise PipedriveError(400, f"Custom field '{code}' does not exist for deals.")
        values[code] = _custom_value(known[code], value)
    return values


def _place_deal(store: PipedriveStore, deal: dict[str, Any], body: dict[str, Any]) -> None:
    """Resolve pipeline and stage the way Pipedrive does; refuse a stage of another pipeline."""
    pipeline_id, stage_id = body.get("pipeline_id"), body.get("stage_id")
    if pipeline_id is not None and pipeline_id not in store.pipelines:
        raise PipedriveError(400, f"Pipeline with id {pipeline_id} not found.")
    if stage_id is not None and stage_id not in store.stages:
        raise PipedriveError(400, f"Stage with id {stage_id} not found.")
    if stage_id is not None:
        stage_pipeline = store.stages[stage_id]["pipeline_id"]
        if pipeline_id is not None and pipeline_id != stage_pipeline:
            raise PipedriveError(
                400, f"Stage {stage_id} does not belong to pipeline {pipeline_id}."
            )
        deal["pipeline_id"], deal["stage_id"] = stage_pipeline, stage_id
    elif pipeline_id is not None and pipeline_id != deal.get("pipeline_id"):
        stages = sorted(
            (s for s in store.stages.values() if s["pipeline_id"] == pipeline_id),
            key=lambda s: s["order_nr"],
        )
        if not stages:
            raise PipedriveError(400, f"Pipeline {pipeline_id} has no stages.")
        deal["pipeline_id"], deal["stage_id"] = pipeline_id, stages[0]["id"]


def _check_deal_body(store: PipedriveStore, body: dict[str, Any], creating: bool) -> None:
    _check_schema(body, DEAL_SCHEMA)
    _check_name(body, "title", required=creating)
    _check_refs(store, body)
    if "status" in body and body["status"] not in ("open", "won", "lost"):
        raise PipedriveError(400, "Property 'status' must be one of open, won, lost.")
    if "currency" in body and not re.fullmatch(r"[A-Z]{3}", body["currency"]):
        raise PipedriveError(400, "Property 'currency' must be a 3-letter ISO 4217 code.")


def _apply_status(deal: dict[str, Any], status: str, now: str) -> None:
    if status == deal["status"]:
        return
    deal["status"] = status
    deal["won_time"] = now if status == "won" else None
    deal["lost_time"] = now if status == "lost" else None
    deal["close_time"] = now if status in ("won", "lost") else None
    deal["local_won_date"] = now[:10] if status == "won" else None
    deal["local_lost_date"] = now[:10] if status == "lost" else None
    deal["local_close_date"] = now[:10] if status in ("won", "lost") else None


def _new_deal(store: PipedriveStore, body: dict[str, Any], now: str) -> dict[str, Any]:
    stage_one = min(store.stages) if store.stages else None
    deal: dict[str, Any] = {
        "id": store.take_id("deal"), "title": body["title"].strip(),
        "creator_user_id": ADMIN_USER_ID, "owner_id": body.get("owner_id", ADMIN_USER_ID),
        "value": body.get("value", 0), "person_id": body.get("person_id"),
        "org_id": body.get("org_id"),
        "stage_id": stage_one,
        "pipeline_id": store.stages[stage_one]["pipeline_id"] if stage_one else None,
        "currency": body.get("currency", "EUR"), "archive_time": None,
        "add_time": body.get("add_time", now), "update_time": now, "stage_change_time": None,
        "status": "open", "is_archived": False, "is_deleted": False,
        "probability": body.get("probability"), "lost_reason": None,
        "visible_to": body.get("visible_to", 3), "close_time": None, "won_time": None,
        "lost_time": None, "local_won_date": None, "local_lost_date": None,
        "local_close_date": None, "expected_close_date": body.get("expected_close_date"),
        "label_ids": body.get("label_ids", []), "origin": "API",
        "origin_id": body.get("origin_id"), "channel": body.get("channel"),
        "channel_id": body.get("channel_id"), "acv": None, "arr": None, "mrr": None,
        "custom_fields": {code: None for code in store.custom_fields()},
    }  # fmt: skip
    return deal


def _note_first_win(store: PipedriveStore, deal: dict[str, Any]) -> None:
    if deal["status"] == "won" and deal["id"] not in store.first_won_times:
        store.first_won_times[deal["id"]] = deal["won_time"]


def emit(
    store: PipedriveStore,
    entity: str,
    action: str,
    before: dict[str, Any] | None,
    after: dict[str, Any],
    source: str,
    user_id: int = ADMIN_USER_ID,
) -> None:
    """Send webhooks for one change to every matching subscription (in the background)."""
    data = hooks.v2_data(store, entity, after)
    previous = hooks.v2_previous(hooks.v2_data(store, entity, before), data) if before else None
    if action == "change" and not previous:
        return  # nothing a subscriber could see changed
    change = {
        "entity": entity, "action": action, "id": after["id"], "event_id": str(uuid.uuid4()),
        "user_id": user_id, "change_source": source,
        "permitted_user_ids": sorted({ADMIN_USER_ID, after["owner_id"]}),
        "data": data, "previous": previous,
        "v1_current": hooks.v1_object(store, entity, after),
        "v1_previous": hooks.v1_object(store, entity, before),
    }  # fmt: skip
    state = current_state()
    hooks.deliver(store, state.lock, change, state.setting("pipedrive_webhook_retry_percent"))


@bp.post("/api/v2/deals")
def add_deal() -> Response:
    """Create a deal (addDeal)."""
    body = _json_body()
    store = _store()
    with current_state().lock:
        _check_deal_body(store, body, creating=True)
        custom = _custom_values(store, body.get("custom_fields", {}))
        now = _rfc3339(_now())
        deal = _new_deal(store, body, now)
        _place_deal(store, deal, body)
        if deal["stage_id"] is None:
            raise PipedriveError(400, "No pipeline stage exists to place the deal in.")
        if body.get("lost_reason") is not None and body.get("status") != "lost":
            raise PipedriveError(400, "Property 'lost_reason' can only be set on a lost deal.")
        _apply_status(deal, body.get("status", "open"), now)
        deal["lost_reason"] = body.get("lost_reason")
        deal["custom_fields"].update(custom)
        store.deals[deal["id"]] = deal
        _note_first_win(store, deal)
        logger.info("pipedrive deal created id=%s stage=%s", deal["id"], deal["stage_id"])
        emit(store, "deal", "create", None, deal, "api")
        return _ok(copy.deepcopy(deal))


@bp.get("/api/v2/deals/<int:deal_id>")
def get_deal(deal_id: int) -> Response:
    """Return one deal (getDeal)."""
    with current_state().lock:
        deal = _store().deals.get(deal_id)
        if deal is None or deal["is_deleted"]:
            raise PipedriveError(404, "Deal not found")
        return _ok(copy.deepcopy(deal))


def change_deal(
    store: PipedriveStore, deal_id: int, body: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Apply a v2 PATCH body to a deal; return the deal before and after. Hold the lock."""
    deal = store.deals.get(deal_id)
    if deal is None or deal["is_deleted"]:
        raise PipedriveError(404, "Deal not found")
    _check_deal_body(store, body, creating=False)
    custom = _custom_values(store, body.get("custom_fields", {}))
    status = body.get("status", deal["status"])
    if body.get("lost_reason") is not None and status != "lost":
        raise PipedriveError(400, "Property 'lost_reason' can only be set on a lost deal.")
    now = _rfc3339(_now())
    updated = copy.deepcopy(deal)
    _place_deal(store, updated, body)
    plain = set(body) - {"pipeline_id", "stage_id", "status", "custom_fields"}
    updated.update({key: body[key] for key in plain})
    if "title" in body:
        updated["title"] = body["title"].strip()
    if status != deal["status"] and status != "lost":
        updated["lost_reason"] = None  # reopening or winning drops the old reason
    _apply_status(updated, status, now)
    updated["custom_fields"].update(custom)
    if updated["stage_id"] != deal["stage_id"]:
        updated["stage_change_time"] = now
    updated["update_time"] = now
    store.deals[deal_id] = updated
    _note_first_win(store, updated)
    logger.info("pipedrive deal updated id=%s keys=%s", deal_id, sorted(body))
    return deal, updated


@bp.patch("/api/v2/deals/<int:deal_id>")
def update_deal(deal_id: int) -> Response:
    """Change some fields of a deal (updateDeal)."""
    body = _json_body()
    store = _store()
    with current_state().lock:
        before, updated = change_deal(store, deal_id, body)
        emit(store, "deal", "change", before, updated, "api")
        return _ok(copy.deepcopy(updated))


@bp.get("/api/v2/deals")
def get_deals() -> Response:
    """List deals with the usual filters and cursor pagination (getDeals)."""
    filters = {
        key: _query_int(key)
        for key in ("person_id", "org_id", "owner_id", "pipeline_id", "stage_id")
    }
    statuses = set((request.args.get("status") or "open,won,lost").split(","))
    if not statuses <= {"open", "won", "lost", "deleted"}:
        raise PipedriveError(400, "Parameter 'status' must be open, won, lost or deleted.")
    ids = request.args.get("ids")
    wanted = {int(i) for i in ids.split(",") if i.strip().isdigit()} if ids else None
    sort_by = request.args.get("sort_by", "id")
    direction = request.args.get("sort_direction", "asc")
    if sort_by not in ("id", "update_time", "add_time") or direction not in ("asc", "desc"):
        raise PipedriveError(400, "Parameter 'sort_by' or 'sort_direction' is invalid.")

    with current_state().lock:
        deals = [
            copy.deepcopy(deal)
            for deal in _store().deals.values()
            if ("deleted" if deal["is_deleted"] else deal["status"]) in statuses
            and all(value is None or deal[key] == value for key, value in filters.items())
            and (wanted is None or deal["id"] in wanted)
        ]
    deals.sort(key=lambda deal: (deal[sort_by], deal["id"]), reverse=direction == "desc")
    page, additional = _page(deals)
    return _ok(page, additional)


# --- v1: users and notes --------------------------------------------------------------------


@bp.get("/v1/users")
def get_users() -> Response:
    """List all users (v1)."""
    with current_state().lock:
        return _ok(copy.deepcopy(list(_store().users.values())))


@bp.get("/v1/users/me")
def get_me() -> Response:
    """Return the token's user (v1)."""
    with current_state().lock:
        user = _store().users.get(ADMIN_USER_ID)
        if user is None:
            raise PipedriveError(404, "User not found")
        return _ok(copy.deepcopy(user))


@bp.get("/v1/users/<int:user_id>")
def get_user(user_id: int) -> Response:
    """Return one user (v1)."""
    with current_state().lock:
        user = _store().users.get(user_id)
        if user is None:
            raise PipedriveError(404, "User not found")
        return _ok(copy.deepcopy(user))


def _v1_body() -> dict[str, Any]:
    # v1 takes JSON or a form post; pipedrive-python-lib sends JSON.
    body = request.get_json(silent=True)
    if body is None and request.form:
        body = request.form.to_dict()
    if not isinstance(body, dict):
        raise PipedriveError(400, "Request body must be a JSON object or a form.")
    return body


def _v1_id(body: Mapping[str, Any], key: str) -> int | None:
    raw = body.get(key)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise PipedriveError(400, f"Parameter '{key}' must be an integer.") from None


def _note_view(store: PipedriveStore, note: dict[str, Any]) -> dict[str, Any]:
    view = copy.deepcopy(note)
    deal = store.deals.get(note["deal_id"]) if note["deal_id"] else None
    person = store.persons.get(note["person_id"]) if note["person_id"] else None
    org = store.organizations.get(note["org_id"]) if note["org_id"] else None
    user = store.users.get(note["user_id"])
    view["deal"] = {"title": deal["title"]} if deal else None
    view["person"] = {"name": person["name"]} if person else None
    view["organization"] = {"name": org["name"]} if org else None
    view["user"] = (
        {"email": user["email"], "name": user["name"], "icon_url": None, "is_you": True}
        if user
        else None
    )
    return view


@bp.post("/v1/notes")
def add_note() -> Response:
    """Attach a note to a deal, person or organization (v1 addNote)."""
    body = _v1_body()
    content = body.get("content")
    if not isinstance(content, str) or not content.strip():
        raise PipedriveError(400, "Note content is required.")
    refs = {key: _v1_id(body, key) for key in ("deal_id", "person_id", "org_id")}

    store = _store()
    with current_state().lock:
        tables = {
            "deal_id": store.deals,
            "person_id": store.persons,
            "org_id": store.organizations,
        }
        for key, value in refs.items():
            if value is not None and value not in tables[key]:
                raise PipedriveError(400, f"Item referenced by '{key}' ({value}) not found.")
        if all(value is None for value in refs.values()):
            raise PipedriveError(400, "A note must be attached to a deal, person or organization.")
        now = _v1_time(_now())
        note = {
            "id": store.take_id("note"), "user_id": _v1_id(body, "user_id") or ADMIN_USER_ID,
            **refs, "lead_id": None, "content": content, "add_time": now, "update_time": now,
            "active_flag": True, "pinned_to_deal_flag": False, "pinned_to_person_flag": False,
            "pinned_to_organization_flag": False, "pinned_to_lead_flag": False,
            "last_update_user_id": None,
        }  # fmt: skip
        store.notes[note["id"]] = note
        logger.info("pipedrive note created id=%s", note["id"])
        return _ok(_note_view(store, note))


@bp.get("/v1/notes/<int:note_id>")
def get_note(note_id: int) -> Response:
    """Return one note (v1)."""
    store = _store()
    with current_state().lock:
        note = store.notes.get(note_id)
        if note is None:
            raise PipedriveError(404, "Note not found")
        return _ok(_note_view(store, note))


@bp.get("/v1/notes")
def get_notes() -> Response:
    """List notes filtered by deal, person, organization or user (v1)."""
    filters = {
        key: _v1_id(request.args, key) for key in ("deal_id", "person_id", "org_id", "user_id")
    }
    start = _v1_id(request.args, "start") or 0
    limit = _v1_id(request.args, "limit") or DEFAULT_LIMIT
    store = _store()
    with current_state().lock:
        notes = [
            _note_view(store, note)
            for note in store.notes.values()
            if all(value is None or note[key] == value for key, value in filters.items())
        ]
    page = notes[start : start + limit]
    more = start + limit < len(notes)
    pagination = {"start": start, "limit": limit, "more_items_in_collection": more}
    if more:
        pagination["next_start"] = start + limit
    return _ok(page, {"pagination": pagination})


# --- activities (v2) and activity types (v1) ------------------------------------------------


def _is_hhmm(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", value) is not None


ACTIVITY_SCHEMA: dict[str, tuple[Check, bool]] = {
    "subject": (_is_str, False), "type": (_is_str, False), "owner_id": (_is_int, False),
    "deal_id": (_is_int, True), "lead_id": (_is_str, True), "person_id": (_is_int, True),
    "org_id": (_is_int, True), "project_id": (_is_int, True), "due_date": (_is_date, True),
    "due_time": (_is_hhmm, True), "duration": (_is_hhmm, True), "busy": (_is_bool, False),
    "done": (_is_bool, False), "location": (_is_dict, True),
    "participants": (lambda v: isinstance(v, list), False),
    "attendees": (lambda v: isinstance(v, list), False),
    "public_description": (_is_str, True), "priority": (_is_int, True), "note": (_is_str, True),
}  # fmt: skip
_TYPE_NAMES[_is_hhmm] = "a time (HH:MM)"


def _check_activity(store: PipedriveStore, body: dict[str, Any], creating: bool) -> None:
    _check_schema(body, ACTIVITY_SCHEMA)
    _check_name(body, "subject", required=creating)
    if body.get("due_date") is not None:
        try:
            dt.date.fromisoformat(body["due_date"])
        except ValueError:
            raise PipedriveError(400, "Property 'due_date' is not a valid date.") from None
    keys = {t["key_string"] for t in store.activity_types.values() if t["active_flag"]}
    if "type" in body and body["type"] not in keys:
        raise PipedriveError(
            400, f"Activity type '{body['type']}' does not exist; known: {sorted(keys)}."
        )
    _check_refs(store, body)
    deal_id = body.get("deal_id")
    if deal_id is not None and (deal_id not in store.deals or store.deals[deal_id]["is_deleted"]):
        raise PipedriveError(400, f"Deal with id {deal_id} referenced by 'deal_id' not found.")
    for index, item in enumerate(body.get("participants") or []):
        if not isinstance(item, dict) or item.get("person_id") not in store.persons:
            raise PipedriveError(400, f"Property 'participants[{index}].person_id' not found.")


def _new_activity(store: PipedriveStore, body: dict[str, Any], now: str) -> dict[str, Any]:
    participants = [
        {"person_id": p["person_id"], "primary": bool(p.get("primary", False))}
        for p in body.get("participants") or []
    ]
    if body.get("person_id") and not participants:
        participants = [{"person_id": body["person_id"], "primary": True}]
    return {
        "id": store.take_id("activity"), "subject": body["subject"].strip(),
        "type": body.get("type", "call"), "owner_id": body.get("owner_id", ADMIN_USER_ID),
        "creator_user_id": ADMIN_USER_ID, "is_deleted": False, "add_time": now,
        "update_time": now, "deal_id": body.get("deal_id"), "lead_id": body.get("lead_id"),
        "person_id": body.get("person_id"), "org_id": body.get("org_id"),
        "project_id": body.get("project_id"), "due_date": body.get("due_date"),
        "due_time": body.get("due_time"), "duration": body.get("duration"),
        "busy": body.get("busy", False), "done": body.get("done", False),
        "marked_as_done_time": now if body.get("done") else None,
        "location": body.get("location"), "participants": participants,
        "attendees": body.get("attendees", []), "conference_meeting_client": None,
        "conference_meeting_url": None, "conference_meeting_id": None,
        "public_description": body.get("public_description"),
        "priority": body.get("priority"), "note": body.get("note"),
    }  # fmt: skip


@bp.post("/api/v2/activities")
def add_activity() -> Response:
    """Create an activity (addActivity)."""
    body = _json_body()
    store = _store()
    with current_state().lock:
        _check_activity(store, body, creating=True)
        activity = _new_activity(store, body, _rfc3339(_now()))
        store.activities[activity["id"]] = activity
        logger.info("pipedrive activity created id=%s type=%s", activity["id"], activity["type"])
        return _ok(copy.deepcopy(activity))


@bp.get("/api/v2/activities/<int:activity_id>")
def get_activity(activity_id: int) -> Response:
    """Return one activity (getActivity)."""
    with current_state().lock:
        activity = _store().activities.get(activity_id)
        if activity is None or activity["is_deleted"]:
            raise PipedriveError(404, "Activity not found")
        return _ok(copy.deepcopy(activity))


@bp.get("/api/v2/activities")
def get_activities() -> Response:
    """List activities filtered by owner, deal, person, organization or done (getActivities)."""
    filters = {key: _query_int(key) for key in ("owner_id", "deal_id", "person_id", "org_id")}
    done = request.args.get("done")
    if done not in (None, "true", "false"):
        raise PipedriveError(400, "Parameter 'done' must be true or false.")
    with current_state().lock:
        activities = [
            copy.deepcopy(activity)
            for activity in _store().activities.values()
            if not activity["is_deleted"]
            and all(value is None or activity[key] == value for key, value in filters.items())
            and (done is None or activity["done"] == (done == "true"))
        ]
    page, additional = _page(activities)
    return _ok(page, additional)


@bp.get("/v1/activityTypes")
def get_activity_types() -> Response:
    """List activity types (v1 getActivityTypes)."""
    with current_state().lock:
        return _ok(copy.deepcopy(list(_store().activity_types.values())))


# --- v1 webhooks ----------------------------------------------------------------------------

WEBHOOK_ACTIONS = {
    "1.0": ("added", "updated", "merged", "deleted", "*"),
    "2.0": ("create", "change", "delete", "*"),
}
WEBHOOK_OBJECTS = (
    "activity", "deal", "lead", "note", "organization", "person", "pipeline", "product",
    "stage", "user", "*",
)  # fmt: skip


def _webhook_refusal(errors: dict[str, list[str]]) -> Response:
    # Webhook endpoints answer validation failures in their own shape, not the usual envelope.
    response = jsonify({"status": "error", "success": False, "errors": errors})
    response.status_code = 400
    return response


def _webhook_errors(store: PipedriveStore, body: Mapping[str, Any]) -> dict[str, list[str]]:
    errors: dict[str, list[str]] = {}
    for key in ("subscription_url", "event_action", "event_object", "name"):
        if not isinstance(body.get(key), str) or not body[key].strip():
            errors[key] = [f"The field {key} is required."]
    url = body.get("subscription_url")
    if "subscription_url" not in errors and not re.fullmatch(r"https?://[^\s/]+\S*", url):
        errors["subscription_url"] = ["The field subscription_url must be a valid URL."]
    version = body.get("version", "2.0")
    if version not in WEBHOOK_ACTIONS:
        errors["version"] = ["The field version must be one of 1.0, 2.0."]
    elif "event_action" not in errors and body["event_action"] not in WEBHOOK_ACTIONS[version]:
        allowed = ", ".join(WEBHOOK_ACTIONS[version])
        errors["event_action"] = [f"The field event_action must be one of {allowed}."]
    if "event_object" not in errors and body["event_object"] not in WEBHOOK_OBJECTS:
        errors["event_object"] = ["The field event_object is not a supported object."]
    user_id = body.get("user_id")
    if user_id is not None and (not _is_int(user_id) or user_id not in store.users):
        errors["user_id"] = [f"User {user_id!r} not found."]
    return errors


@bp.get("/v1/webhooks")
def get_webhooks() -> Response:
    """List the company's webhooks (v1 getWebhooks)."""
    with current_state().lock:
        webhooks = copy.deepcopy(list(_store().webhooks.values()))
    return jsonify({"status": "ok", "success": True, "data": webhooks})


@bp.post("/v1/webhooks")
def add_webhook() -> Response:
    """Subscribe a URL to events (v1 addWebhook); `name` is required by the current API."""
    body = _v1_body()
    store = _store()
    with current_state().lock:
        errors = _webhook_errors(store, body)
        if errors:
            return _webhook_refusal(errors)
        webhook = {
            "id": store.take_id("webhook"), "company_id": hooks.COMPANY_ID,
            "owner_id": ADMIN_USER_ID, "user_id": body.get("user_id", ADMIN_USER_ID),
            "event_action": body["event_action"], "event_object": body["event_object"],
            "subscription_url": body["subscription_url"],
            "version": body.get("version", "2.0"), "is_active": 1,
            "add_time": hooks._stamp_ms(dt.datetime.now(dt.UTC)), "remove_time": None,
            "type": "general", "http_auth_user": body.get("http_auth_user"),
            "http_auth_password": body.get("http_auth_password"), "remove_reason": None,
            "last_delivery_time": None, "last_http_status": None, "admin_id": ADMIN_USER_ID,
            "name": body["name"].strip(),
        }  # fmt: skip
        store.webhooks[webhook["id"]] = webhook
    logger.info(
        "pipedrive webhook created id=%s event=%s.%s version=%s",
        webhook["id"], webhook["event_action"], webhook["event_object"], webhook["version"],
    )  # fmt: skip
    response = jsonify({"status": "ok", "success": True, "data": copy.deepcopy(webhook)})
    response.status_code = 201
    return response


@bp.delete("/v1/webhooks/<int:webhook_id>")
def delete_webhook(webhook_id: int) -> Response:
    """Remove a webhook (v1 deleteWebhook)."""
    with current_state().lock:
        if _store().webhooks.pop(webhook_id, None) is None:
            raise PipedriveError(404, "Webhook not found")
    logger.info("pipedrive webhook deleted id=%s", webhook_id)
    return jsonify({"status": "ok", "success": True})


# --- v1 files -------------------------------------------------------------------------------

FILE_REFS = ("deal_id", "person_id", "org_id", "product_id", "activity_id")
MAX_FILE_LIMIT = 100


def _file_view(store: PipedriveStore, record: dict[str, Any]) -> dict[str, Any]:
    view = copy.deepcopy(record)
    deal = store.deals.get(record["deal_id"] or 0)
    person = store.persons.get(record["person_id"] or 0)
    org = store.organizations.get(record["org_id"] or 0)
    view["deal_name"] = deal["title"] if deal else None
    view["person_name"] = person["name"] if person else None
    view["org_name"] = org["name"] if org else None
    return view


@bp.post("/v1/files")
def add_file() -> Response:
    """Upload a file and attach it to a deal, person, organization or activity (v1 addFile)."""
    upload = request.files.get("file")
    if upload is None or not upload.filename:
        raise PipedriveError(400, "No file was uploaded: send it as multipart field 'file'.")
    refs = {key: _v1_id(request.form, key) for key in FILE_REFS}
    content = upload.read()
    store = _store()
    with current_state().lock:
        tables = {
            "deal_id": store.deals, "person_id": store.persons, "org_id": store.organizations,
            "activity_id": store.activities, "product_id": {},
        }  # fmt: skip
        for key, value in refs.items():
            if value is not None and value not in tables[key]:
                raise PipedriveError(400, f"Item referenced by '{key}' ({value}) not found.")
        if all(value is None for value in refs.values()):
            raise PipedriveError(400, "Attach the file to a deal, person, org or activity.")
        now = _v1_time(_now())
        file_id = store.take_id("file")
        name = upload.filename
        record = {
            "id": file_id, "user_id": ADMIN_USER_ID, **refs, "lead_id": None,
            "log_id": None, "add_time": now, "update_time": now, "file_name": name,
            "file_type": name.rsplit(".", 1)[-1].lower() if "." in name else "",
            "file_size": len(content), "active_flag": True, "inline_flag": False,
            "remote_location": "s3", "remote_id": None, "cid": None, "s3_bucket": None,
            "mail_message_id": None, "mail_template_id": None, "product_name": None,
            "lead_name": None, "url": f"https://{hooks.HOST}/v1/files/{file_id}/download",
            "name": name, "description": None,
            "sha256": hashlib.sha256(content).hexdigest(),
        }  # fmt: skip
        store.files[file_id] = record
        store.file_contents[file_id] = content
        logger.info("pipedrive file added id=%s size=%s", file_id, len(content))
        return _ok(_file_view(store, record))


def _file_page(files: list[dict[str, Any]]) -> Response:
    start = _v1_id(request.args, "start") or 0
    limit = _v1_id(request.args, "limit") or MAX_FILE_LIMIT
    if not 1 <= limit <= MAX_FILE_LIMIT:
        raise PipedriveError(400, f"Parameter 'limit' must be between 1 and {MAX_FILE_LIMIT}.")
    page = files[start : start + limit]
    more = start + limit < len(files)
    pagination: dict[str, Any] = {"start": start, "limit": limit, "more_items_in_collection": more}
    if more:
        pagination["next_start"] = start + limit
    return _ok(page, {"pagination": pagination})


@bp.get("/v1/files")
def get_files() -> Response:
    """List all files (v1 getFiles); like Pipedrive's it has no deal filter."""
    store = _store()
    with current_state().lock:
        files = [_file_view(store, f) for f in store.files.values() if f["active_flag"]]
    return _file_page(files)


@bp.get("/v1/deals/<int:deal_id>/files")
def get_deal_files(deal_id: int) -> Response:
    """List the files attached to a deal (v1 getDealFiles)."""
    store = _store()
    with current_state().lock:
        if deal_id not in store.deals:
            raise PipedriveError(404, "Deal not found")
        files = [
            _file_view(store, f)
            for f in store.files.values()
            if f["active_flag"] and f["deal_id"] == deal_id
        ]
    return _file_page(files)


@bp.get("/v1/files/<int:file_id>")
def get_file(file_id: int) -> Response:
    """Return one file's details (v1 getFile)."""
    store = _store()
    with current_state().lock:
        record = store.files.get(file_id)
        if record is None:
            raise PipedriveError(404, "File not found")
        return _ok(_file_view(store, record))


@bp.get("/v1/files/<int:file_id>/download")
def download_file(file_id: int) -> Response:
    """Return a file's bytes (v1 downloadFile)."""
    store = _store()
    with current_state().lock:
        record, content = store.files.get(file_id), store.file_contents.get(file_id)
    if record is None or content is None:
        raise PipedriveError(404, "File not found")
    response = Response(content, content_type="application/octet-stream")
    response.headers["Content-Disposition"] = f'attachment; filename="{record["file_name"]}"'
    return response


# --- control: changes made by a user in Pipedrive's UI --------------------------------------


@control.errorhandler(PipedriveError)
def _control_refused(exc: PipedriveError) -> Response:
    response = jsonify({"error": exc.message})
    response.status_code = exc.status
    return response


def _acting_user(body: dict[str, Any], owner_id: int) -> tuple[dict[str, Any], int]:
    fields = dict(body)
    user_id = fields.pop("user_id", owner_id)
    if user_id not in _store().users:
        raise PipedriveError(400, f"User {user_id!r} not found.")
    return fields, user_id


@control.post("/deals/<int:deal_id>")
def change_deal_in_app(deal_id: int) -> Response:
    """Change a deal as a Pipedrive user would (webhooks say change_source "app")."""
    body = _json_body()
    store = _store()
    with current_state().lock:
        deal = store.deals.get(deal_id)
        fields, user_id = _acting_user(body, deal["owner_id"] if deal else ADMIN_USER_ID)
        before, updated = change_deal(store, deal_id, fields)
        emit(store, "deal", "change", before, updated, "app", user_id)
        return jsonify(copy.deepcopy(updated))


@control.post("/persons/<int:person_id>")
def change_person_in_app(person_id: int) -> Response:
    """Change a person as a Pipedrive user would (webhooks say change_source "app")."""
    body = _json_body()
    store = _store()
    with current_state().lock:
        person = store.persons.get(person_id)
        fields, user_id = _acting_user(body, person["owner_id"] if person else ADMIN_USER_ID)
        before, updated = change_person(store, person_id, fields)
        emit(store, "person", "change", before, updated, "app", user_id)
        return jsonify(copy.deepcopy(updated))


@control.get("/deliveries")
def list_deliveries() -> Response:
    """List every webhook delivery attempt, oldest first."""
    with current_state().lock:
        return jsonify(copy.deepcopy(_store().deliveries))
