"""POST /webhooks/pipedrive: Basic auth, v1 and v2 bodies, dedup, odd bodies; register-webhooks."""

import base64
import copy

import pytest
from sqlalchemy import select

from core.store import Event, session
from tests.conftest import SECRETS, as_bytes, load_fixture, queued_job_ids

USER, PASSWORD = SECRETS["PIPEDRIVE_WEBHOOK_USER"], SECRETS["PIPEDRIVE_WEBHOOK_PASSWORD"]


def basic(user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}", "Content-Type": "application/json"}


def post(client, payload, headers: dict | None = None):
    body = payload if isinstance(payload, bytes) else as_bytes(payload)
    return client.post("/webhooks/pipedrive", data=body, headers=headers or basic())


def stored(event_id: str) -> Event:
    with session() as db:
        return db.get(Event, event_id)


def v2_stage() -> dict:
    return load_fixture("pipedrive/deal_stage_change_v2.json")


def v1_stage() -> dict:
    return load_fixture("pipedrive/deal_stage_change_v1.json")


# -- golden bodies ---------------------------------------------------------------------


def test_v2_stage_change_is_queued_as_a_typed_event(client) -> None:
    answer = post(client, v2_stage())

    assert answer.status_code == 200 and answer.json["status"] == "queued"
    event = stored(answer.json["event_id"])
    assert (event.source, event.type, event.status) == ("pipedrive", "deal.changed", "queued")
    assert event.dedup_key == "pipedrive:v2:3f9c2a71-5d84-4b6e-9a0c-e1f27b48d655"
    data = event.data
    assert data["version"] == "2.0" and data["entity_id"] == 5217
    assert data["changed"] == ["stage_id"] and data["previous"] == {"stage_id": 3}
    assert data["current"]["stage_id"] == 4 and data["current"]["owner_id"] == 21458877
    assert data["current"]["stage_change_time"] == "2026-12-03T14:05:33Z"
    assert data["change_source"] == "app" and data["user_id"] == 21458877
    assert data["occurred_at"].startswith("2026-12-03T14:05:33.418")
    # Titles, names and free text stay out of the event's data.
    assert "title" not in data["current"] and "custom_fields" not in data["current"]
    assert queued_job_ids() == [event.id]


def test_v2_value_only_change_is_not_a_stage_entry(client) -> None:
    answer = post(client, load_fixture("pipedrive/deal_value_change_v2.json"))

    assert answer.status_code == 200 and answer.json["status"] == "ignored"
    event = stored(answer.json["event_id"])
    assert event.data["changed"] == ["value"] and event.data["previous"] == {"value": 4500}
    assert event.reason == "the deal changed neither stage nor status"
    assert queued_job_ids() == []


def test_v1_stage_change_normalises_to_the_same_event(client) -> None:
    answer = post(client, v1_stage())

    assert answer.json["status"] == "queued"
    event = stored(answer.json["event_id"])
    assert event.dedup_key == "pipedrive:v1:deal:updated:5217:1796306733418517"
    data = event.data
    assert (data["version"], data["entity"], data["action"]) == ("1.0", "deal", "changed")
    # v1 sends whole objects: the changed fields are found by comparing them.
    assert set(data["changed"]) == {"stage_id", "stage_change_time", "update_time"}
    assert data["previous"]["stage_id"] == 3
    assert data["previous"]["stage_change_time"] == "2026-12-02T10:12:40Z"
    # v1's user_id (the owner) and its 'YYYY-MM-DD HH:MM:SS' times read as v2's.
    assert data["current"]["owner_id"] == 21458877
    assert data["current"]["stage_change_time"] == "2026-12-03T14:05:33Z"


def test_v1_value_only_change_is_ignored(client) -> None:
    payload = v1_stage()
    payload["previous"]["stage_id"] = payload["current"]["stage_id"]
    payload["previous"]["stage_change_time"] = payload["current"]["stage_change_time"]
    payload["previous"]["value"] = 4000
    payload["previous"]["formatted_value"] = "€4,000"

    answer = post(client, payload)

    assert answer.json["status"] == "ignored"
    assert set(stored(answer.json["event_id"]).data["changed"]) == {"value", "update_time"}


def test_v2_won_is_a_status_change(client) -> None:
    payload = v2_stage()
    payload["meta"]["id"] = "0b6f1e9c-2d47-4c1a-9e53-7a8d6c2b1f04"
    payload["data"].update(status="won", won_time="2026-12-04T10:00:00Z")
    payload["previous"] = {"status": "open"}

    answer = post(client, payload)

    assert answer.json["status"] == "queued"
    data = stored(answer.json["event_id"]).data
    assert data["changed"] == ["status"] and data["current"]["status"] == "won"


def test_v1_lost_is_a_status_change(client) -> None:
    payload = v1_stage()
    payload["meta"]["timestamp_micro"] += 1
    payload["previous"]["stage_id"] = payload["current"]["stage_id"]
    payload["current"].update(status="lost", lost_time="2026-12-04 10:00:00", active=False)

    answer = post(client, payload)

    assert answer.json["status"] == "queued"
    data = stored(answer.json["event_id"]).data
    assert "status" in data["changed"] and data["previous"]["status"] == "open"
    assert data["current"]["lost_time"] == "2026-12-04T10:00:00Z"


def test_v1_merge_names_the_survivor(client) -> None:
    payload = v1_stage()
    payload["meta"]["action"] = "merged"
    payload["event"] = "merged.deal"
    payload["previous"]["id"] = 5301

    answer = post(client, payload)

    assert answer.status_code == 200 and answer.json["status"] == "ignored"
    event = stored(answer.json["event_id"])
    assert event.type == "deal.merged"
    assert (event.data["entity_id"], event.data["merged_into"]) == (5301, 5217)


def test_v2_delete_with_merged_to_id_is_a_merge(client) -> None:
    payload = v2_stage()
    payload["meta"].update(action="delete", entity_id="5301", merged_to_id="5217")
    payload["previous"], payload["data"] = {**payload["data"], "id": 5301}, None

    answer = post(client, payload)

    assert answer.json["status"] == "ignored"
    event = stored(answer.json["event_id"])
    assert event.type == "deal.merged" and event.data["merged_into"] == 5217
    assert event.data["current"]["id"] == 5301


@pytest.mark.parametrize(
    "change",
    [
        {"entity": "product"},
        {"entity": "person"},
        {"action": "archive"},
    ],
)
def test_unknown_entity_or_action_answers_200_ignored(client, change) -> None:
    payload = v2_stage()
    payload["meta"].update(change)

    answer = post(client, payload)

    assert answer.status_code == 200 and answer.json["status"] == "ignored"
    assert stored(answer.json["event_id"]).status == "ignored"
    assert queued_job_ids() == []


def test_an_object_without_meta_is_stored_and_ignored_not_refused(client) -> None:
    first = post(client, {"hello": "pipedrive"})
    again = post(client, {"hello": "pipedrive"})

    assert first.status_code == 200 and first.json["status"] == "ignored"
    # A retry of the same odd body is the same event.
    assert again.json == {"event_id": first.json["event_id"], "status": "duplicate"}


@pytest.mark.parametrize(
    ("body", "sentence"),
    [
        (b"{not json", "The body is not valid JSON."),
        (b"[1, 2]", "The body is not a JSON object."),
        (b'"text"', "The body is not a JSON object."),
    ],
)
def test_a_body_that_is_not_a_json_object_is_400(client, body, sentence) -> None:
    answer = post(client, body)

    assert answer.status_code == 400 and answer.json == {"error": sentence}
    with session() as db:
        assert db.scalars(select(Event)).all() == []


# -- authentication ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "application/json"},
        basic(password="wrong"),
        basic(user="someone"),
        basic(password=PASSWORD + "x"),
        {"Authorization": f"Bearer {PASSWORD}", "Content-Type": "application/json"},
    ],
)
def test_missing_or_wrong_basic_credentials_are_401(client, headers) -> None:
    answer = post(client, v2_stage(), headers)

    assert answer.status_code == 401
    assert answer.json == {"error": "The HTTP Basic credentials are missing or do not match."}
    assert answer.headers["WWW-Authenticate"].startswith("Basic")
    with session() as db:
        assert db.scalars(select(Event)).all() == []


def test_no_configured_credentials_refuses_everyone(client, monkeypatch) -> None:
    from connectors import registry

    monkeypatch.setenv("PIPEDRIVE_WEBHOOK_PASSWORD", "")
    registry.reset()
    # Empty credentials must not match an empty Authorization either.
    assert post(client, v2_stage(), basic(password="")).status_code == 401
    assert post(client, v2_stage()).status_code == 401


# -- dedup -------------------------------------------------------------------------------


def test_the_same_event_from_two_subscriptions_is_stored_once(client) -> None:
    first = v2_stage()
    second = copy.deepcopy(first)
    second["meta"]["webhook_id"] = "1927399"
    second["meta"]["attempt"] = 2

    answers = [post(client, first).json, post(client, second).json]

    assert [a["status"] for a in answers] == ["queued", "duplicate"]
    assert answers[0]["event_id"] == answers[1]["event_id"]
    assert stored(answers[0]["event_id"]).deliveries == 2
    assert len(queued_job_ids()) == 1


# -- register-webhooks -------------------------------------------------------------------


def sandbox_webhooks(sandbox) -> list[dict]:
    return sandbox.state()["pipedrive"]["webhooks"]


def test_register_webhooks_creates_the_missing_ones_once(app, sandbox) -> None:
    runner = app.test_cli_runner()
    args = ["register-webhooks", "--base-url", "https://sales.example.org/"]

    first = runner.invoke(args=args)
    second = runner.invoke(args=args)

    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    hooks = sandbox_webhooks(sandbox)
    assert sorted((h["event_action"], h["event_object"]) for h in hooks) == [
        ("change", "deal"),
        ("create", "deal"),
    ]
    for hook in hooks:
        assert hook["subscription_url"] == "https://sales.example.org/webhooks/pipedrive"
        assert hook["version"] == "2.0" and hook["name"].startswith("salesflow ")
        assert (hook["http_auth_user"], hook["http_auth_password"]) == (USER, PASSWORD)
    assert first.output.count("created") == 2
    assert second.output.count("exists already") == 2
    assert PASSWORD not in first.output + second.output


def test_register_webhooks_leaves_other_deployments_alone(app, sandbox) -> None:
    runner = app.test_cli_runner()
    runner.invoke(args=["register-webhooks", "--base-url", "https://staging.example.org"])
    result = runner.invoke(args=["register-webhooks", "--base-url", "https://sales.example.org"])

    assert result.exit_code == 0, result.output
    urls = sorted(h["subscription_url"] for h in sandbox_webhooks(sandbox))
    assert (
        urls
        == ["https://sales.example.org/webhooks/pipedrive"] * 2
        + ["https://staging.example.org/webhooks/pipedrive"] * 2
    )


def test_register_webhooks_needs_the_basic_credentials(app, sandbox, monkeypatch) -> None:
    monkeypatch.delenv("PIPEDRIVE_WEBHOOK_PASSWORD")
    result = app.test_cli_runner().invoke(
        args=["register-webhooks", "--base-url", "https://sales.example.org"]
    )

    assert result.exit_code != 0
    assert "PIPEDRIVE_WEBHOOK_PASSWORD" in result.output
    assert sandbox_webhooks(sandbox) == []
