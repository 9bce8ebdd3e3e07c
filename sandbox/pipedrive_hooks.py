"""Pipedrive webhook bodies (v1 and v2) and their delivery with Pipedrive's retry schedule."""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import threading
import time
import uuid
from typing import Any, Protocol

import requests

logger = logging.getLogger(__name__)

COMPANY_ID = 13467901
HOST = "tbilisi-digital.pipedrive.com"
# Pipedrive waits 10 s for an answer and retries a failure three times, after 3, 30, 150 s.
DELIVERY_TIMEOUT_S = 10
RETRY_DELAYS_S = (3, 30, 150)
V1_ACTIONS = {"create": "added", "change": "updated", "delete": "deleted"}
# Fields Pipedrive derives itself; a v2 `previous` leaves them out, as in its samples.
DERIVED_FIELDS = {
    "update_time", "stage_change_time", "won_time", "lost_time", "close_time",
    "first_won_time",
}  # fmt: skip
V2_DEAL_KEYS = (
    "add_time", "archive_time", "channel", "channel_id", "close_time", "creator_user_id",
    "currency", "custom_fields", "expected_close_date", "first_won_time", "id", "is_archived",
    "label_ids", "lost_reason", "lost_time", "org_id", "origin", "origin_id", "owner_id",
    "person_id", "pipeline_id", "probability", "stage_change_time", "stage_id", "status",
    "title", "update_time", "value", "visible_to", "won_time",
)  # fmt: skip


class HookStore(Protocol):
    """What the bodies and deliveries need of the Pipedrive store."""

    users: dict[int, dict[str, Any]]
    stages: dict[int, dict[str, Any]]
    persons: dict[int, dict[str, Any]]
    organizations: dict[int, dict[str, Any]]
    webhooks: dict[int, dict[str, Any]]
    deliveries: list[dict[str, Any]]
    first_won_times: dict[int, str]
    stop: threading.Event

    def custom_fields(self) -> dict[str, dict[str, Any]]:
        """Map field codes of custom deal fields to their definitions."""
        ...


# --- v2 bodies ------------------------------------------------------------------------------


def _typed_custom(field: dict[str, Any] | None, value: Any, currency: str) -> Any:
    if value is None or field is None:
        return None
    kind = field["field_type"]
    if kind == "enum":
        return {"id": value, "type": "enum"}
    if kind == "set":
        return {"type": "set", "values": [{"id": item} for item in value]}
    if kind == "monetary":
        return {"type": "monetary", "value": value, "currency": currency}
    return {"type": kind, "value": value}


def v2_data(store: HookStore, entity: str, item: dict[str, Any]) -> dict[str, Any]:
    """Turn a v2 REST object into the `data` of a v2 webhook (typed custom fields, str ids)."""
    if entity == "deal":
        data = {key: copy.deepcopy(item.get(key)) for key in V2_DEAL_KEYS}
        data["first_won_time"] = store.first_won_times.get(item["id"])
        fields = store.custom_fields()
        data["custom_fields"] = {
            code: _typed_custom(fields.get(code), value, item["currency"])
            for code, value in item["custom_fields"].items()
        }
    else:
        data = copy.deepcopy(item)
        data.pop("is_deleted", None)
    data["visible_to"] = str(item["visible_to"])
    return dict(sorted(data.items()))


def v2_previous(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Keep only the fields that changed, with their old values, as v2 `previous` does."""
    previous: dict[str, Any] = {}
    for key, old in before.items():
        if key in DERIVED_FIELDS or after.get(key) == old:
            continue
        if key == "custom_fields":
            new = after.get(key) or {}
            changed = {code: value for code, value in old.items() if new.get(code) != value}
            if changed:
                previous[key] = changed
        else:
            previous[key] = old
    return previous


def _stamp_ms(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def v2_body(
    webhook: dict[str, Any], change: dict[str, Any], moment: dt.datetime
) -> dict[str, Any]:
    """Build a webhooks v2 body for one change."""
    meta = {
        "action": change["action"],
        "company_id": str(COMPANY_ID),
        "correlation_id": str(uuid.uuid4()),
        "entity_id": str(change["id"]),
        "entity": change["entity"],
        "id": change["event_id"],
        "is_bulk_edit": False,
        "timestamp": _stamp_ms(moment),
        "type": "general",
        "user_id": str(change["user_id"]),
        "version": "2.0",
        "webhook_id": str(webhook["id"]),
        "webhook_owner_id": str(webhook["owner_id"]),
        "change_source": change["change_source"],
        "permitted_user_ids": [str(user) for user in change["permitted_user_ids"]],
        "attempt": 1,
        "host": HOST,
    }
    data = None if change["action"] == "delete" else change["data"]
    previous = change["previous"] if change["action"] != "create" else None
    return {"data": data, "previous": previous, "meta": meta}


# --- v1 bodies ------------------------------------------------------------------------------


def _v1_time(value: str | None) -> str | None:
    return value.replace("T", " ").rstrip("Z") if value else None


def _v1_custom(field: dict[str, Any], value: Any) -> Any:
    if value is None:
        return None
    if field["field_type"] == "enum":
        return str(value)
    if field["field_type"] == "set":
        return ",".join(str(item) for item in value)
    return value


def v1_object(store: HookStore, entity: str, item: dict[str, Any] | None) -> Any:
    """Flatten a v2 REST object into the v1 webhook `current`/`previous` form."""
    if item is None:
        return None
    owner = store.users.get(item["owner_id"], {})
    if entity == "person":
        return {
            "id": item["id"], "name": item["name"], "first_name": item["first_name"],
            "last_name": item["last_name"], "owner_id": item["owner_id"],
            "owner_name": owner.get("name"), "org_id": item["org_id"],
            "email": copy.deepcopy(item["emails"]), "phone": copy.deepcopy(item["phones"]),
            "add_time": _v1_time(item["add_time"]), "update_time": _v1_time(item["update_time"]),
            "visible_to": str(item["visible_to"]), "active_flag": not item["is_deleted"],
            "label": None, "picture_id": item["picture_id"],
        }  # fmt: skip
    person = store.persons.get(item["person_id"] or 0, {})
    org = store.organizations.get(item["org_id"] or 0, {})
    stage = store.stages.get(item["stage_id"], {})
    value = item["value"]
    flat = {
        "id": item["id"], "creator_user_id": item["creator_user_id"],
        "user_id": item["owner_id"], "owner_name": owner.get("name"),
        "person_id": item["person_id"], "person_name": person.get("name"),
        "org_id": item["org_id"], "org_name": org.get("name"), "stage_id": item["stage_id"],
        "stage_order_nr": stage.get("order_nr"), "pipeline_id": item["pipeline_id"],
        "title": item["title"], "value": value, "currency": item["currency"],
        "formatted_value": f"€{value:,}" if item["currency"] == "EUR" else f"{value:,}",
        "weighted_value": value, "weighted_value_currency": item["currency"],
        "status": item["status"], "active": item["status"] == "open",
        "deleted": item["is_deleted"], "probability": item["probability"],
        "lost_reason": item["lost_reason"], "visible_to": str(item["visible_to"]),
        "expected_close_date": item["expected_close_date"], "origin": item["origin"],
        "origin_id": item["origin_id"], "channel": item["channel"],
        "channel_id": item["channel_id"], "label": None,
        "add_time": _v1_time(item["add_time"]), "update_time": _v1_time(item["update_time"]),
        "stage_change_time": _v1_time(item["stage_change_time"]),
        "won_time": _v1_time(item["won_time"]), "lost_time": _v1_time(item["lost_time"]),
        "close_time": _v1_time(item["close_time"]),
        "first_won_time": _v1_time(store.first_won_times.get(item["id"])),
        "local_won_date": item["local_won_date"], "local_lost_date": item["local_lost_date"],
        "local_close_date": item["local_close_date"],
    }  # fmt: skip
    fields = store.custom_fields()
    for code, raw in item["custom_fields"].items():
        flat[code] = _v1_custom(fields[code], raw) if code in fields else raw
    return flat


def v1_body(
    webhook: dict[str, Any], change: dict[str, Any], moment: dt.datetime
) -> dict[str, Any]:
    """Build a webhooks v1 body for one change."""
    action = V1_ACTIONS[change["action"]]
    micro = int(moment.timestamp() * 1_000_000)
    meta = {
        "action": action, "change_source": change["change_source"], "company_id": COMPANY_ID,
        "host": HOST, "id": change["id"], "is_bulk_update": False,
        "matches_filters": {"current": []}, "object": change["entity"],
        "permitted_user_ids": list(change["permitted_user_ids"]),
        "pipedrive_service_name": False, "timestamp": micro // 1_000_000,
        "timestamp_micro": micro, "prepublish_timestamp": micro // 1000,
        "trans_pending": False, "user_id": change["user_id"], "v": 1,
        "webhook_id": str(webhook["id"]),
    }  # fmt: skip
    return {
        "v": 1,
        "matches_filters": {"current": []},
        "meta": meta,
        "current": change["v1_current"],
        "previous": change["v1_previous"],
        "retry": 0,
        "event": f"{action}.{change['entity']}",
    }


# --- matching and delivery ------------------------------------------------------------------


def matches(webhook: dict[str, Any], entity: str, action: str) -> bool:
    """Tell whether an active subscription wants `action` (v2 name) on `entity`."""
    wanted = action if webhook["version"] == "2.0" else V1_ACTIONS[action]
    return (
        bool(webhook["is_active"])
        and webhook["event_object"] in (entity, "*")
        and webhook["event_action"] in (wanted, "*")
    )


def deliver(
    store: HookStore,
    lock: threading.RLock,
    change: dict[str, Any],
    retry_percent: int,
) -> list[threading.Thread]:
    """Start one delivery thread per matching subscription; return the threads."""
    moment = dt.datetime.now(dt.UTC)
    threads = []
    for webhook in [copy.deepcopy(w) for w in store.webhooks.values()]:
        if not matches(webhook, change["entity"], change["action"]):
            continue
        build = v2_body if webhook["version"] == "2.0" else v1_body
        body = build(webhook, change, moment)
        delays = [delay * retry_percent / 100 for delay in RETRY_DELAYS_S]
        thread = threading.Thread(
            target=_deliver_all,
            args=(store, lock, webhook, body, delays),
            name=f"pipedrive-webhook-{webhook['id']}",
            daemon=True,
        )
        thread.start()
        threads.append(thread)
    return threads


def _deliver_all(
    store: HookStore,
    lock: threading.RLock,
    webhook: dict[str, Any],
    body: dict[str, Any],
    delays: list[float],
) -> None:
    for attempt in range(1, len(delays) + 2):
        if attempt > 1 and store.stop.wait(delays[attempt - 2]):
            return  # the sandbox was reset or stopped meanwhile
        if webhook["version"] == "2.0":
            body["meta"]["attempt"] = attempt
        else:
            body["retry"] = attempt - 1
        if _attempt(store, lock, webhook, body, attempt):
            return


def _attempt(
    store: HookStore,
    lock: threading.RLock,
    webhook: dict[str, Any],
    body: dict[str, Any],
    attempt: int,
) -> bool:
    auth = None
    if webhook["http_auth_user"]:
        auth = (webhook["http_auth_user"], webhook["http_auth_password"] or "")
    data = json.dumps(body, ensure_ascii=False).encode()
    status: int | None = None
    error = None
    started = time.monotonic()
    try:
        answer = requests.post(
            webhook["subscription_url"],
            data=data,
            headers={"Content-Type": "application/json", "User-Agent": "Pipedrive Webhooks"},
            auth=auth,
            timeout=DELIVERY_TIMEOUT_S,
        )
        status = answer.status_code
    except requests.RequestException as exc:
        error = f"{type(exc).__name__}: {exc}"
    ok = status is not None and 200 <= status < 300
    meta = body["meta"]
    record = {
        "webhook_id": webhook["id"],
        "subscription_url": webhook["subscription_url"],
        "version": webhook["version"],
        "event": body.get("event") or f"{meta['action']}.{meta['entity']}",
        "entity_id": int(meta.get("entity_id") or meta.get("id")),
        "attempt": attempt,
        "status_code": status,
        "error": error,
        "ok": ok,
        "duration_ms": int((time.monotonic() - started) * 1000),
        "sent_at": _stamp_ms(dt.datetime.now(dt.UTC)),
        "body": copy.deepcopy(body),
    }
    with lock:
        if store.stop.is_set():
            return True
        store.deliveries.append(record)
        live = store.webhooks.get(webhook["id"])
        if live is not None:
            live["last_delivery_time"] = record["sent_at"]
            live["last_http_status"] = status
    logger.info(
        "pipedrive webhook delivery webhook=%s event=%s attempt=%s status=%s",
        webhook["id"], record["event"], attempt, status if status is not None else error,
    )  # fmt: skip
    return ok
