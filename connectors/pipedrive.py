"""Pipedrive: API v2 over a requests session; the still-current v1 calls through its library."""

import logging
import time
from collections.abc import Callable
from typing import Any

import pipedrive.client
import pipedrive.exceptions
import requests

from connectors.errors import PermanentVendorError, TransientVendorError, VendorError
from connectors.retry import call_with_retry
from core.config import Pipedrive, Retry
from core.leads import email_key, normalise_phone

logger = logging.getLogger(__name__)

VENDOR = "pipedrive"
CACHE_TTL_S = 600.0


def _retry_after(headers: Any) -> float | None:
    # x-ratelimit-reset is seconds until the window resets; Retry-After for the daily budget.
    for name in ("x-ratelimit-reset", "retry-after"):
        value = headers.get(name) if headers is not None else None
        if value is not None:
            try:
                return max(float(value), 0.0)
            except ValueError:
                continue
    return None


def _error_for(
    status: int, body: str, headers: Any, what: str, write: bool = False
) -> VendorError:
    request_id = headers.get("x-request-id") if headers is not None else None
    kwargs = {"status": status, "body": body, "request_id": request_id}
    if status == 429:
        return TransientVendorError(
            VENDOR, f"{what} answered 429", retry_after=_retry_after(headers), **kwargs
        )
    if status >= 500:
        # Rate-limit headers ride on every answer; on a 5xx they say nothing about when.
        # A 5xx to a write may come after the write was done.
        return TransientVendorError(VENDOR, f"{what} answered {status}", ambiguous=write, **kwargs)
    return PermanentVendorError(VENDOR, f"{what} answered {status}", **kwargs)


class _V1Client(pipedrive.client.Client):
    """pipedrive-python-lib's v1 client, sending through our kept-alive session.

    The library sends each call with `requests.request`, a new connection (a new TLS
    handshake with Pipedrive) every time, and puts the token in the query string; our
    session reuses its connections and carries the token in the x-api-token header.
    """

    def __init__(self, domain: str, session: requests.Session) -> None:
        super().__init__(domain=domain)
        self._session = session

    def _request(
        self, method: str, url: str, headers: Any = None, params: Any = None, **kwargs: Any
    ) -> Any:
        response = self._session.request(method, url, headers=headers, params=params, **kwargs)
        return self._parse(response)


class PipedriveClient:
    """The calls the flows make, with timeouts, the retry policy and cached lookups."""

    def __init__(self, settings: Pipedrive, retry: Retry) -> None:
        self._base = settings.base_url.rstrip("/")
        self._timeout = settings.timeout_s
        self._retry = retry
        self._http = requests.Session()
        self._http.headers.update(
            {"x-api-token": settings.api_token, "Accept": "application/json"}
        )
        # pipedrive-python-lib still serves the v1 endpoints (users, notes); it sends no
        # timeout of its own, so every call below passes one.
        self._v1 = _V1Client(self._base, self._http)
        self._cache: dict[str, tuple[float, Any]] = {}

    # -- transport ---------------------------------------------------------------------

    def _send_v2(self, method: str, path: str, what: str, **kwargs: Any) -> dict[str, Any]:
        return self._send(method, f"{self._base}/api/v2{path}", what, **kwargs)

    def _send(self, method: str, url: str, what: str, **kwargs: Any) -> dict[str, Any]:
        write = method.upper() not in ("GET", "HEAD")
        try:
            response = self._http.request(method, url, timeout=self._timeout, **kwargs)
        except requests.RequestException as exc:
            # Only a connection never made is sure not to have reached Pipedrive.
            sent = not isinstance(exc, requests.ConnectTimeout)
            raise TransientVendorError(
                VENDOR, f"{what}: {exc.__class__.__name__}", ambiguous=write and sent
            ) from exc
        if not response.ok:
            raise _error_for(response.status_code, response.text, response.headers, what, write)
        try:
            return response.json()
        except ValueError:
            # A proxy's error page with a 200 is still not an answer.
            raise TransientVendorError(
                VENDOR,
                f"{what}: the answer was not JSON",
                status=response.status_code,
                ambiguous=write,
            ) from None

    def _v2(self, method: str, path: str, what: str, **kwargs: Any) -> dict[str, Any]:
        return call_with_retry(
            lambda: self._send_v2(method, path, what, **kwargs), self._retry, what=what
        )

    def _send_v1(
        self, call: Callable[..., Any], what: str, *args: Any, write: bool = False
    ) -> dict[str, Any]:
        try:
            result = call(*args, timeout=self._timeout)
        except pipedrive.exceptions.BaseError as exc:
            response = exc.response
            raise _error_for(
                response.status_code, response.text, response.headers, what, write
            ) from exc
        except requests.RequestException as exc:
            sent = not isinstance(exc, requests.ConnectTimeout)
            raise TransientVendorError(
                VENDOR, f"{what}: {exc.__class__.__name__}", ambiguous=write and sent
            ) from exc
        if not isinstance(result, dict):
            # The library hands back a non-JSON body (a proxy's 502 page) as the result.
            raise TransientVendorError(VENDOR, f"{what}: the answer was not JSON", ambiguous=write)
        return result

    def _v1_call(
        self, call: Callable[..., Any], what: str, *args: Any, write: bool = False
    ) -> dict[str, Any]:
        return call_with_retry(
            lambda: self._send_v1(call, what, *args, write=write), self._retry, what=what
        )

    def _cached(self, key: str, load: Callable[[], Any]) -> Any:
        hit = self._cache.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        value = load()
        self._cache[key] = (time.monotonic() + CACHE_TTL_S, value)
        return value

    def _list_v2(self, path: str, what: str, params: dict[str, Any] | None = None) -> list[Any]:
        items: list[Any] = []
        cursor = None
        while True:
            page = dict(params or {}, limit=500, **({"cursor": cursor} if cursor else {}))
            answer = self._v2("GET", path, what, params=page)
            items.extend(answer.get("data") or [])
            cursor = (answer.get("additional_data") or {}).get("next_cursor")
            if not cursor:
                return items

    # -- lookups (cached) --------------------------------------------------------------

    def active_user_ids(self) -> set[int]:
        """Ids of the account's active users (v1 users)."""

        def load() -> set[int]:
            users = self._v1_call(self._v1.users.get_all_users, "list users").get("data") or []
            return {user["id"] for user in users if user.get("active_flag")}

        return self._cached("users", load)

    def user(self, user_id: int) -> dict[str, Any]:
        """One Pipedrive user (name and email of a deal owner)."""
        return self._cached(
            f"user:{user_id}",
            lambda: self._v1_call(self._v1.users.get_user, "get user", user_id)["data"],
        )

    def stage_ids(self, pipeline_name: str, stage_name: str) -> tuple[int, int]:
        """The pipeline and stage ids for names given in config.yaml."""

        def load() -> tuple[int, int]:
            pipelines = self._list_v2("/pipelines", "list pipelines")
            pipeline = next((p for p in pipelines if p["name"] == pipeline_name), None)
            if pipeline is None:
                raise PermanentVendorError(VENDOR, f"no pipeline named {pipeline_name!r}")
            stages = self._list_v2("/stages", "list stages", {"pipeline_id": pipeline["id"]})
            stage = next((s for s in stages if s["name"] == stage_name), None)
            if stage is None:
                raise PermanentVendorError(
                    VENDOR, f"pipeline {pipeline_name!r} has no stage named {stage_name!r}"
                )
            return pipeline["id"], stage["id"]

        return self._cached(f"stage:{pipeline_name}:{stage_name}", load)

    def get_stage(self, stage_id: int) -> dict[str, Any]:
        """GET /api/v2/stages/{id} (its pipeline_id and order_nr), cached like the names."""
        return self._cached(
            f"stage-id:{stage_id}",
            lambda: self._v2("GET", f"/stages/{stage_id}", "get stage")["data"],
        )

    def pipeline_stages(self, pipeline_id: int) -> list[dict[str, Any]]:
        """The pipeline's stages in their order (order_nr)."""
        stages = self._list_v2("/stages", "list stages", {"pipeline_id": pipeline_id})
        return sorted(stages, key=lambda stage: stage.get("order_nr", 0))

    def pipeline_deals(self, pipeline_id: int) -> list[dict[str, Any]]:
        """Every open, won and lost deal of a pipeline (for the dashboard's funnel)."""
        params = {"pipeline_id": pipeline_id, "status": "open,won,lost"}
        return self._list_v2("/deals", "list deals", params)

    def pipeline_id(self, pipeline_name: str) -> int:
        """The id of the pipeline config.yaml names."""

        def load() -> int:
            pipelines = self._list_v2("/pipelines", "list pipelines")
            pipeline = next((p for p in pipelines if p["name"] == pipeline_name), None)
            if pipeline is None:
                raise PermanentVendorError(VENDOR, f"no pipeline named {pipeline_name!r}")
            return pipeline["id"]

        return self._cached(f"pipeline:{pipeline_name}", load)

    def deal_fields(self) -> dict[str, dict[str, Any]]:
        """Deal fields by their name, each with field_code, field_type and options."""
        return self._cached(
            "deal_fields",
            lambda: {f["field_name"]: f for f in self._list_v2("/dealFields", "list deal fields")},
        )

    # -- persons and organizations -----------------------------------------------------

    def _search(self, entity: str, term: str, field: str) -> list[dict[str, Any]]:
        params = {"term": term, "fields": field, "exact_match": "true", "limit": 10}
        answer = self._v2("GET", f"/{entity}/search", f"search {entity}", params=params)
        return [entry["item"] for entry in (answer.get("data") or {}).get("items") or []]

    def find_person_by_email(self, email: str) -> dict[str, Any] | None:
        """The person holding exactly this address (case-folded), never a mere substring."""
        wanted = email_key(email)
        for person in self._search("persons", email.strip(), "email"):
            # Search can match on part of an address: compare every address ourselves.
            if any(email_key(value) == wanted for value in person.get("emails") or []):
                return person
        return None

    def find_person_by_phone(self, phone: str, region: str) -> dict[str, Any] | None:
        """The person holding this E.164 number, however Pipedrive stores it."""
        for person in self._search("persons", phone, "phone"):
            if any(
                normalise_phone(value, region) == phone for value in person.get("phones") or []
            ):
                return person
        return None

    def create_person(self, fields: dict[str, Any]) -> dict[str, Any]:
        """POST /api/v2/persons."""
        return self._v2("POST", "/persons", "create person", json=fields)["data"]

    def find_organization(self, name: str) -> dict[str, Any] | None:
        """The organization with exactly this name (case-folded)."""
        wanted = name.strip().casefold()
        for org in self._search("organizations", name.strip(), "name"):
            if (org.get("name") or "").strip().casefold() == wanted:
                return org
        return None

    def create_organization(self, name: str, owner_id: int) -> dict[str, Any]:
        """POST /api/v2/organizations."""
        body = {"name": name, "owner_id": owner_id}
        return self._v2("POST", "/organizations", "create organization", json=body)["data"]

    # -- deals and notes ---------------------------------------------------------------

    def create_deal(self, fields: dict[str, Any]) -> dict[str, Any]:
        """POST /api/v2/deals."""
        return self._v2("POST", "/deals", "create deal", json=fields)["data"]

    def find_deal(self, person_id: int, title: str) -> dict[str, Any] | None:
        """An open deal of the person with this title (recovers a create that lost its answer)."""
        deals = self._list_v2("/deals", "list deals", {"person_id": person_id, "status": "open"})
        return next((deal for deal in deals if deal.get("title") == title), None)

    def add_note(self, deal_id: int, content: str) -> dict[str, Any]:
        """POST /v1/notes pinned to the deal."""
        body = {"deal_id": deal_id, "content": content, "pinned_to_deal_flag": 1}
        return self._v1_call(self._v1.notes.create_note, "add note", body, write=True)["data"]

    def find_note(self, deal_id: int, marker: str) -> dict[str, Any] | None:
        """A note on the deal whose content holds the marker."""
        answer = self._v1_call(self._v1.notes.get_all_notes, "list notes", {"deal_id": deal_id})
        return next((n for n in answer.get("data") or [] if marker in n.get("content", "")), None)

    def get_deal(self, deal_id: int) -> dict[str, Any]:
        """GET /api/v2/deals/{id}."""
        return self._v2("GET", f"/deals/{deal_id}", "get deal")["data"]

    def update_deal(self, deal_id: int, fields: dict[str, Any]) -> dict[str, Any]:
        """PATCH /api/v2/deals/{id} with only the fields to change."""
        return self._v2("PATCH", f"/deals/{deal_id}", "update deal", json=fields)["data"]

    def get_person(self, person_id: int) -> dict[str, Any]:
        """GET /api/v2/persons/{id}."""
        return self._v2("GET", f"/persons/{person_id}", "get person")["data"]

    def get_organization(self, org_id: int) -> dict[str, Any]:
        """GET /api/v2/organizations/{id}."""
        return self._v2("GET", f"/organizations/{org_id}", "get organization")["data"]

    # -- files (v1) --------------------------------------------------------------------

    def attach_file(self, deal_id: int, name: str, content: bytes, mime: str) -> dict[str, Any]:
        """POST /v1/files (multipart) attached to the deal; a lost answer is ambiguous."""
        url = f"{self._base}/v1/files"
        return call_with_retry(
            lambda: self._send(
                "POST",
                url,
                "attach file",
                data={"deal_id": str(deal_id)},
                files={"file": (name, content, mime)},
            ),
            self._retry,
            what="attach file",
        )["data"]

    def deal_files(self, deal_id: int) -> list[dict[str, Any]]:
        """GET /v1/deals/{id}/files, every page."""
        url = f"{self._base}/v1/deals/{deal_id}/files"
        files: list[dict[str, Any]] = []
        start = 0
        while True:
            answer = call_with_retry(
                lambda s=start: self._send(
                    "GET", url, "list deal files", params={"start": s, "limit": 100}
                ),
                self._retry,
                what="list deal files",
            )
            files.extend(answer.get("data") or [])
            pagination = (answer.get("additional_data") or {}).get("pagination") or {}
            if not pagination.get("more_items_in_collection"):
                return files
            start = pagination.get("next_start", start + 100)

    # -- activities --------------------------------------------------------------------

    def create_activity(self, fields: dict[str, Any]) -> dict[str, Any]:
        """POST /api/v2/activities."""
        return self._v2("POST", "/activities", "create activity", json=fields)["data"]

    def find_activity(self, deal_id: int, marker: str) -> dict[str, Any] | None:
        """An activity of the deal whose note holds the marker."""
        activities = self._list_v2("/activities", "list activities", {"deal_id": deal_id})
        return next((a for a in activities if marker in (a.get("note") or "")), None)

    # -- the token's user and webhooks (v1) --------------------------------------------

    def me(self) -> dict[str, Any]:
        """The user the API token belongs to (v1 users/me), cached."""
        return self._cached(
            "me", lambda: self._v1_call(self._v1.users.get_me, "get own user")["data"]
        )

    def list_webhooks(self) -> list[dict[str, Any]]:
        """Every webhook subscription of the company (v1 webhooks)."""
        answer = self._v1_call(self._v1.webhooks.get_hooks_subscription, "list webhooks")
        return answer.get("data") or []

    def create_webhook(self, fields: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/webhooks with a `name`, which the library's own call cannot send."""
        url = f"{self._base}/v1/webhooks"
        return call_with_retry(
            lambda: self._send("POST", url, "create webhook", json=fields),
            self._retry,
            what="create webhook",
        )["data"]
