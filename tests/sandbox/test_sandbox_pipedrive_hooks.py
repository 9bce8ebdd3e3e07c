"""Pipedrive deals, persons, activities, files and webhooks (subscriptions and delivery)."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
from pipedrive.client import Client
from pipedrive.exceptions import BadRequestError, NotFoundError

from sandbox.testing import SandboxServer
from tests.sandbox.conftest import Receiver

LUKA = 21458877


def v2(env: dict[str, str], path: str) -> str:
    return f"{env['PIPEDRIVE_BASE_URL']}/api/v2{path}"


def v1(env: dict[str, str], path: str) -> str:
    return f"{env['PIPEDRIVE_BASE_URL']}/v1{path}"


def v1_client(env: dict[str, str]) -> Client:
    client = Client(domain=env["PIPEDRIVE_BASE_URL"])
    client.set_api_token(env["PIPEDRIVE_API_TOKEN"])
    return client


def deliveries(sandbox: SandboxServer, count: int) -> list[dict[str, Any]]:
    """Wait until the sandbox recorded `count` delivery attempts (it records after the answer)."""
    deadline = time.monotonic() + 5
    while True:
        found = sandbox.pipedrive_deliveries()
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def subscribe(pd: requests.Session, env: dict[str, str], url: str, **extra: Any) -> Any:
    body = {
        "subscription_url": url, "event_action": "*", "event_object": "deal",
        "name": "sandbox test", "version": "2.0", "http_auth_user": "pd",
        "http_auth_password": "s3cret", **extra,
    }  # fmt: skip
    response = pd.post(v1(env, "/webhooks"), json=body, timeout=5)
    assert response.status_code == 201, response.text
    return response.json()["data"]


def new_deal(pd: requests.Session, env: dict[str, str], **body: Any) -> dict[str, Any]:
    body = {"title": "Nino Beridze — Website design", "owner_id": LUKA, "person_id": 1842,
            "org_id": 733, "stage_id": 3, "value": 4500, **body}  # fmt: skip
    response = pd.post(v2(env, "/deals"), json=body, timeout=5)
    assert response.status_code == 200, response.text
    deal: dict[str, Any] = response.json()["data"]
    return deal


def test_patch_deal_status_times(pd: requests.Session, env: dict[str, str]) -> None:
    deal = new_deal(pd, env)
    won = pd.patch(v2(env, f"/deals/{deal['id']}"), json={"status": "won"}, timeout=5).json()
    lost = pd.patch(
        v2(env, f"/deals/{deal['id']}"), json={"status": "lost", "lost_reason": "Budget"}
    ).json()  # fmt: skip
    reopened = pd.patch(v2(env, f"/deals/{deal['id']}"), json={"status": "open"}).json()

    assert won["data"]["won_time"] and won["data"]["lost_time"] is None
    assert lost["data"]["lost_time"] and lost["data"]["lost_reason"] == "Budget"
    assert reopened["data"]["lost_reason"] is None and reopened["data"]["close_time"] is None
    bad = pd.patch(v2(env, f"/deals/{deal['id']}"), json={"lost_reason": "x"}, timeout=5)
    assert bad.status_code == 400
    assert pd.patch(v2(env, "/deals/1"), json={"value": 1}, timeout=5).status_code == 404


def test_patch_person(pd: requests.Session, env: dict[str, str]) -> None:
    body = {"name": "Nino B. Beridze", "emails": [{"value": "nino@beridze.ge"}]}
    changed = pd.patch(v2(env, "/persons/1842"), json=body, timeout=5).json()["data"]

    assert (changed["first_name"], changed["last_name"]) == ("Nino", "B. Beridze")
    assert changed["emails"] == [{"value": "nino@beridze.ge", "primary": True, "label": "work"}]
    assert pd.get(v2(env, "/persons/1842"), timeout=5).json()["data"] == changed
    assert pd.patch(v2(env, "/persons/1842"), json={"name": ""}).status_code == 400
    assert pd.patch(v2(env, "/persons/1842"), json={"owner_id": 1}).status_code == 400
    assert pd.patch(v2(env, "/persons/9"), json={"name": "X"}).status_code == 404


def test_activity_types_and_activities(pd: requests.Session, env: dict[str, str]) -> None:
    types = pd.get(v1(env, "/activityTypes"), timeout=5).json()["data"]
    deal = new_deal(pd, env)
    body = {"subject": "Follow-up call: proposal", "type": "call", "due_date": "2026-12-08",
            "due_time": "07:00", "duration": "00:30", "owner_id": LUKA, "deal_id": deal["id"],
            "person_id": 1842}  # fmt: skip
    created = pd.post(v2(env, "/activities"), json=body, timeout=5).json()["data"]
    listed = pd.get(v2(env, "/activities"), params={"deal_id": deal["id"]}, timeout=5).json()

    assert {t["key_string"] for t in types} >= {"call", "meeting", "task", "email"}
    assert created["id"] == 9900 and created["done"] is False
    assert created["participants"] == [{"person_id": 1842, "primary": True}]
    assert [a["id"] for a in listed["data"]] == [created["id"]]
    assert pd.get(v2(env, f"/activities/{created['id']}")).json()["data"] == created


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"subject": ""}, "subject"),
        ({"type": "coffee"}, "coffee"),
        ({"due_date": "08.12.2026"}, "due_date"),
        ({"due_date": "2026-02-30"}, "due_date"),
        ({"owner_id": 5}, "owner_id"),
        ({"deal_id": 5}, "deal_id"),
        ({"person_id": 5}, "person_id"),
        ({"due_time": "7am"}, "due_time"),
    ],
)
def test_bad_activity_is_400(
    pd: requests.Session, env: dict[str, str], change: dict[str, Any], named: str
) -> None:
    body = {"subject": "Call", "type": "call", **change}
    response = pd.post(v2(env, "/activities"), json=body, timeout=5)

    assert response.status_code == 400 and named in response.json()["error"]


def test_webhook_subscriptions_through_the_library(
    pd: requests.Session, env: dict[str, str], receiver: Receiver
) -> None:
    client = v1_client(env)
    with pytest.raises(BadRequestError) as caught:
        client.webhooks.create_hook_subscription(receiver.url, "change", "deal")
    created = subscribe(pd, env, receiver.url)
    listed = client.webhooks.get_hooks_subscription()

    assert caught.value.response.json()["errors"]["name"]
    assert caught.value.response.json()["success"] is False
    assert created["name"] == "sandbox test" and created["version"] == "2.0"
    assert [w["id"] for w in listed["data"]] == [created["id"]]
    assert client.webhooks.delete_hook_subscription(created["id"])["success"] is True
    with pytest.raises(NotFoundError):
        client.webhooks.delete_hook_subscription(created["id"])


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"version": "3.0"}, "version"),
        ({"event_action": "updated"}, "event_action"),
        ({"event_action": "change", "version": "1.0"}, "event_action"),
        ({"event_object": "dog"}, "event_object"),
        ({"subscription_url": "not a url"}, "subscription_url"),
    ],
)
def test_bad_webhook_is_400(
    pd: requests.Session, env: dict[str, str], change: dict[str, Any], field: str
) -> None:
    body = {"subscription_url": "http://127.0.0.1:1/hook", "event_action": "*",
            "event_object": "deal", "name": "n", **change}  # fmt: skip
    response = pd.post(v1(env, "/webhooks"), json=body, timeout=5)

    assert response.status_code == 400 and field in response.json()["errors"]


def test_api_stage_change_delivers_v2_like_fixture(
    sandbox: SandboxServer,
    pd: requests.Session,
    env: dict[str, str],
    receiver: Receiver,
    fixture_json: Callable[[str], Any],
) -> None:
    deal = new_deal(pd, env)
    hook = subscribe(pd, env, receiver.url, event_action="change")
    pd.patch(v2(env, f"/deals/{deal['id']}"), json={"stage_id": 4}, timeout=5)

    expected = fixture_json("pipedrive/deal_stage_change_v2.json")
    [arrived] = receiver.wait_for(1)
    body = arrived["body"]
    assert arrived["auth"] == "Basic " + base64.b64encode(b"pd:s3cret").decode()
    assert body["previous"] == {"stage_id": 3}
    assert list(body["data"]) == list(expected["data"])
    assert set(body["meta"]) == set(expected["meta"])
    assert body["meta"]["change_source"] == "api" and body["meta"]["attempt"] == 1
    assert (body["meta"]["action"], body["meta"]["entity"]) == ("change", "deal")
    assert body["meta"]["webhook_id"] == str(hook["id"])
    assert body["data"]["stage_id"] == 4 and body["data"]["visible_to"] == "3"
    assert [(d["status_code"], d["ok"]) for d in deliveries(sandbox, 1)] == [(200, True)]


def test_app_change_delivers_v1_with_change_source_app(
    sandbox: SandboxServer,
    pd: requests.Session,
    env: dict[str, str],
    receiver: Receiver,
    fixture_json: Callable[[str], Any],
) -> None:
    deal = new_deal(pd, env, custom_fields={"957ae6bdc9c3862390160642fb03f3be22c7a3f6": 27})
    subscribe(pd, env, receiver.url, event_action="updated", version="1.0")
    sandbox.pipedrive_change_deal(deal["id"], stage_id=4)

    expected = fixture_json("pipedrive/deal_stage_change_v1.json")
    body = receiver.wait_for(1)[0]["body"]
    assert body["event"] == "updated.deal" and body["retry"] == 0
    assert set(body["meta"]) == set(expected["meta"])
    assert body["meta"]["change_source"] == "app" and body["meta"]["user_id"] == LUKA
    assert (body["previous"]["stage_id"], body["current"]["stage_id"]) == (3, 4)
    assert body["current"]["957ae6bdc9c3862390160642fb03f3be22c7a3f6"] == "27"
    assert "T" not in body["current"]["add_time"] and body["current"]["add_time"].count(":") == 2


def test_value_change_and_create_and_two_subscriptions(
    pd: requests.Session, env: dict[str, str], receiver: Receiver
) -> None:
    subscribe(pd, env, receiver.url)
    subscribe(pd, env, receiver.url, name="second")
    deal = new_deal(pd, env)
    pd.patch(v2(env, f"/deals/{deal['id']}"), json={"value": 5200}, timeout=5)
    pd.patch(v2(env, f"/deals/{deal['id']}"), json={"value": 5200}, timeout=5)  # no change

    bodies = [r["body"] for r in receiver.wait_for(4)]
    creates = [b for b in bodies if b["meta"]["action"] == "create"]
    changes = [b for b in bodies if b["meta"]["action"] == "change"]
    assert len(creates) == 2 and creates[0]["previous"] is None
    assert [c["previous"] for c in changes] == [{"value": 4500}] * 2
    # Two subscriptions carry the same event identity, so a receiver can dedupe them.
    assert changes[0]["meta"]["id"] == changes[1]["meta"]["id"]
    assert changes[0]["meta"]["webhook_id"] != changes[1]["meta"]["webhook_id"]
    assert len(receiver.wait_for(5, timeout=0.3)) == 4


def test_person_webhook(pd: requests.Session, env: dict[str, str], receiver: Receiver) -> None:
    subscribe(pd, env, receiver.url, event_object="person", event_action="change")
    pd.patch(v2(env, "/persons/1842"), json={"name": "Nino Beridze-Kapanadze"}, timeout=5)

    body = receiver.wait_for(1)[0]["body"]
    assert body["meta"]["entity"] == "person"
    assert body["previous"] == {"name": "Nino Beridze", "last_name": "Beridze"}


def test_failed_delivery_is_retried_three_times(
    sandbox: SandboxServer, pd: requests.Session, env: dict[str, str], receiver: Receiver
) -> None:
    sandbox.configure(pipedrive_webhook_retry_percent=1)  # 30 ms, 300 ms, 1.5 s
    receiver.statuses = [500, 503, 500, 500]
    deal = new_deal(pd, env)
    subscribe(pd, env, receiver.url, event_action="change")
    pd.patch(v2(env, f"/deals/{deal['id']}"), json={"stage_id": 4}, timeout=5)

    arrived = receiver.wait_for(4)
    assert [r["body"]["meta"]["attempt"] for r in arrived] == [1, 2, 3, 4]
    assert len({r["body"]["meta"]["id"] for r in arrived}) == 1
    assert len(receiver.wait_for(5, timeout=0.3)) == 4
    assert [d["status_code"] for d in deliveries(sandbox, 4)] == [500, 503, 500, 500]
    hook = pd.get(v1(env, "/webhooks"), timeout=5).json()["data"][0]
    assert hook["last_http_status"] == 500


def test_retry_then_success_and_unreachable_url(
    sandbox: SandboxServer, pd: requests.Session, env: dict[str, str], receiver: Receiver
) -> None:
    sandbox.configure(pipedrive_webhook_retry_percent=1)
    receiver.statuses = [502]
    deal = new_deal(pd, env)
    subscribe(pd, env, receiver.url, event_action="change")
    subscribe(pd, env, "http://127.0.0.1:9/closed", event_action="change")
    pd.patch(v2(env, f"/deals/{deal['id']}"), json={"title": "Renamed"}, timeout=5)

    assert [r["body"]["meta"]["attempt"] for r in receiver.wait_for(2)] == [1, 2]
    deadline = time.monotonic() + 5
    closed: list[dict[str, Any]] = []
    while not closed and time.monotonic() < deadline:
        found = sandbox.pipedrive_deliveries()
        closed = [d for d in found if d["subscription_url"].endswith("/closed")]
    assert closed and closed[0]["status_code"] is None and closed[0]["error"]


def test_files_upload_and_list(pd: requests.Session, env: dict[str, str]) -> None:
    deal = new_deal(pd, env)
    other = new_deal(pd, env, title="Other")
    pdf = b"%PDF-1.4 signed agreement"
    token = {"api_token": env["PIPEDRIVE_API_TOKEN"]}
    files = {"file": ("agreement-signed.pdf", pdf, "application/pdf")}
    created = requests.post(
        v1(env, "/files"), params=token, files=files, data={"deal_id": deal["id"]}, timeout=5
    ).json()["data"]  # fmt: skip
    requests.post(v1(env, "/files"), params=token, files=files, data={"deal_id": other["id"]})

    for_deal = pd.get(v1(env, f"/deals/{deal['id']}/files"), timeout=5).json()["data"]
    everything = pd.get(v1(env, "/files"), params={"deal_id": deal["id"]}, timeout=5).json()
    download = pd.get(v1(env, f"/files/{created['id']}/download"), timeout=5)

    assert created["file_name"] == "agreement-signed.pdf" and created["file_size"] == len(pdf)
    assert created["deal_name"] == deal["title"]
    assert [f["id"] for f in for_deal] == [created["id"]]
    # Like Pipedrive's, GET /v1/files ignores deal_id and lists every file.
    assert len(everything["data"]) == 2
    assert download.content == pdf
    no_file = requests.post(v1(env, "/files"), params=token, data={"deal_id": deal["id"]})
    orphan = requests.post(v1(env, "/files"), params=token, files=files, timeout=5)
    assert no_file.status_code == 400 and orphan.status_code == 400


def test_faults_hit_new_routes(
    sandbox: SandboxServer, pd: requests.Session, env: dict[str, str]
) -> None:
    sandbox.fault(vendor="pipedrive", path=r"^/v1/webhooks$", kind="429")
    sandbox.fault(vendor="pipedrive", path=r"^/api/v2/activities$", kind="500")

    assert pd.get(v1(env, "/webhooks"), timeout=5).status_code == 429
    assert pd.get(v2(env, "/activities"), timeout=5).status_code == 500


def test_reset_cancels_pending_retries(
    sandbox: SandboxServer, pd: requests.Session, env: dict[str, str], receiver: Receiver
) -> None:
    sandbox.configure(pipedrive_webhook_retry_percent=10)  # first retry after 300 ms
    receiver.statuses = [500]
    deal = new_deal(pd, env)
    subscribe(pd, env, receiver.url, event_action="change")
    pd.patch(v2(env, f"/deals/{deal['id']}"), json={"value": 1}, timeout=5)
    receiver.wait_for(1)
    sandbox.reset()

    assert len(receiver.wait_for(2, timeout=0.6)) == 1
    assert sandbox.pipedrive_deliveries() == []
