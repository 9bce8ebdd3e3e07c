"""Pipedrive webhook bodies (v1 and v2) normalised into one typed event."""

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from core.leads import MalformedPayload

Action = Literal["created", "changed", "deleted", "merged"]

V1_ACTIONS: dict[str, Action] = {
    "added": "created",
    "updated": "changed",
    "deleted": "deleted",
    "merged": "merged",
}
V2_ACTIONS: dict[str, Action] = {"create": "created", "change": "changed", "delete": "deleted"}
# The deal fields the flows read. Titles, names and notes stay in the raw payload only, so
# the event's data carries no personal data.
DEAL_FIELDS = (
    "id", "stage_id", "pipeline_id", "status", "owner_id", "person_id", "org_id", "value",
    "currency", "add_time", "update_time", "stage_change_time", "won_time", "lost_time",
    "close_time",
)  # fmt: skip
# v1 flattens the owner into user_id; v2 and the REST API call it owner_id.
V1_RENAMES = {"user_id": "owner_id"}
# v1 derives these from others; they change whenever their source does and say nothing new.
V1_DERIVED = {
    "formatted_value", "weighted_value", "formatted_weighted_value", "weighted_value_currency",
    "stage_order_nr", "active", "owner_name", "person_name", "org_name",
}  # fmt: skip


class PipedriveEvent(BaseModel):
    """One change in Pipedrive, whichever webhook version reported it."""

    source: Literal["pipedrive"] = "pipedrive"
    version: Literal["1.0", "2.0"]
    dedup_key: str
    entity: str
    action: Action
    entity_id: int
    # The object after the change (before it, for a deletion), limited to DEAL_FIELDS.
    current: dict[str, Any] = Field(default_factory=dict)
    # Every field that changed; `previous` holds the old values of those in DEAL_FIELDS.
    changed: list[str] = Field(default_factory=list)
    previous: dict[str, Any] = Field(default_factory=dict)
    change_source: str | None = None
    user_id: int | None = None
    occurred_at: datetime | None = None
    # A merge: the object that survives (the event's object is the one merged away).
    merged_into: int | None = None

    @property
    def type(self) -> str:
        """entity.action, e.g. deal.changed."""
        return f"{self.entity}.{self.action}"

    @property
    def stage_changed(self) -> bool:
        """The deal moved to another stage (a value edit in the same stage is not a move)."""
        return self.action == "changed" and "stage_id" in self.changed

    @property
    def status_changed(self) -> bool:
        """The deal was won, lost or reopened."""
        return self.action == "changed" and "status" in self.changed


def _int(value: Any) -> int | None:
    # v2 sends ids as strings, v1 as numbers; bool is an int to Python but never an id.
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _rfc3339(value: Any) -> Any:
    """v1's 'YYYY-MM-DD HH:MM:SS' (UTC) as v2's 'YYYY-MM-DDTHH:MM:SSZ'."""
    if isinstance(value, str) and len(value) == 19 and value[10] == " ":
        return value.replace(" ", "T") + "Z"
    return value


def _kept(values: dict[str, Any]) -> dict[str, Any]:
    return {key: values[key] for key in DEAL_FIELDS if key in values}


def _v1_flat(item: Any) -> dict[str, Any]:
    if not isinstance(item, dict):
        return {}
    flat = {V1_RENAMES.get(key, key): value for key, value in item.items()}
    if isinstance(flat.get("owner_id"), dict):
        flat["owner_id"] = flat["owner_id"].get("id")  # some v1 objects nest the user
    return {
        key: _rfc3339(value) if key.endswith("_time") else value for key, value in flat.items()
    }


def _moment(value: Any) -> datetime | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return None


def _from_v2(meta: dict[str, Any], body: dict[str, Any]) -> PipedriveEvent | None:
    action = V2_ACTIONS.get(str(meta.get("action")))
    event_id, entity = meta.get("id"), meta.get("entity")
    entity_id = _int(meta.get("entity_id"))
    if action is None or not isinstance(event_id, str) or not event_id or entity_id is None:
        return None
    data = body.get("data") if isinstance(body.get("data"), dict) else {}
    previous = body.get("previous") if isinstance(body.get("previous"), dict) else {}
    merged_into = _int(meta.get("merged_to_id"))
    if action == "deleted" and merged_into is not None:
        # v2 has no merge action: the object merged away arrives as a delete that names
        # the survivor.
        action = "merged"
    current = data or (previous if action in ("deleted", "merged") else {})
    return PipedriveEvent(
        version="2.0",
        dedup_key=f"pipedrive:v2:{event_id}",
        entity=str(entity),
        action=action,
        entity_id=entity_id,
        current=_kept(current),
        changed=sorted(previous) if action == "changed" else [],
        previous=_kept(previous) if action == "changed" else {},
        change_source=meta.get("change_source")
        if isinstance(meta.get("change_source"), str)
        else None,
        user_id=_int(meta.get("user_id")),
        occurred_at=_moment(meta.get("timestamp")),
        merged_into=merged_into,
    )


def _v1_changes(current: dict[str, Any], previous: dict[str, Any]) -> list[str]:
    keys = set(current) | set(previous)
    return sorted(
        key for key in keys if key not in V1_DERIVED and current.get(key) != previous.get(key)
    )


def _from_v1(meta: dict[str, Any], body: dict[str, Any]) -> PipedriveEvent | None:
    action = V1_ACTIONS.get(str(meta.get("action")))
    entity = meta.get("object")
    entity_id = _int(meta.get("id"))
    stamp = _int(meta.get("timestamp_micro"))
    if action is None or not isinstance(entity, str) or entity_id is None or stamp is None:
        return None
    current, previous = _v1_flat(body.get("current")), _v1_flat(body.get("previous"))
    merged_into = None
    if action == "merged":
        # `current` is the surviving object, `previous` the one merged into it.
        merged_into = _int(current.get("id"))
        entity_id = _int(previous.get("id")) or entity_id
    changed = _v1_changes(current, previous) if action == "changed" else []
    return PipedriveEvent(
        version="1.0",
        # v1 has no event id; the object, action, id and microsecond stamp identify a change.
        dedup_key=f"pipedrive:v1:{entity}:{meta.get('action')}:{meta.get('id')}:{stamp}",
        entity=entity,
        action=action,
        entity_id=entity_id,
        current=_kept(current if action != "deleted" else previous),
        changed=changed,
        previous={key: previous.get(key) for key in changed if key in DEAL_FIELDS},
        change_source=meta.get("change_source")
        if isinstance(meta.get("change_source"), str)
        else None,
        user_id=_int(meta.get("user_id")),
        occurred_at=_moment(stamp / 1_000_000),
        merged_into=merged_into,
    )


def event_from_pipedrive(payload: Any) -> PipedriveEvent | None:
    """The typed event, or None for a body that is an object but not a change we understand."""
    if not isinstance(payload, dict):
        raise MalformedPayload("The body is not a JSON object.")
    meta = payload.get("meta")
    if not isinstance(meta, dict):
        return None
    if str(meta.get("version")) == "2.0" or "entity" in meta:
        return _from_v2(meta, payload)
    return _from_v1(meta, payload)
