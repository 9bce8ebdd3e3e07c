"""Facebook Lead Ads: the handshake, signed batches, the Graph fetch and its error classes."""

import email
import json
from email import policy

import pytest
import requests

from core.store import Event, session
from sandbox import facebook as graph
from tests.conftest import queued_job_ids, run_worker
from tests.test_lead_flow import event_status, messages, pipedrive

VERIFY = {"hub.mode": "subscribe", "hub.challenge": "1158201444"}


def post(client, environment, body: bytes):
    signature = graph.sign_webhook(body, environment["FACEBOOK_APP_SECRET"])
    return client.post(
        "/webhooks/facebook",
        data=body,
        headers={"X-Hub-Signature-256": signature, "Content-Type": "application/json"},
    )


def lead_body(*leadgen_ids: str, form_id: str = graph.DEFAULT_FORM_ID) -> bytes:
    leads = [
        {"id": i, "form_id": form_id, "created_time": "2026-12-02T16:27:03+0000"}
        for i in leadgen_ids
    ]
    return graph.leadgen_webhook_body(leads)


def test_verification_echoes_the_challenge(client, environment) -> None:
    params = {**VERIFY, "hub.verify_token": environment["FACEBOOK_VERIFY_TOKEN"]}
    answer = client.get("/webhooks/facebook", query_string=params)
    assert answer.status_code == 200
    assert answer.get_data(as_text=True) == "1158201444"
    assert answer.mimetype == "text/plain"


@pytest.mark.parametrize(
    "params",
    [
        {**VERIFY, "hub.verify_token": "wrong"},
        {"hub.mode": "unsubscribe", "hub.challenge": "1", "hub.verify_token": "x"},
        {},
    ],
)
def test_verification_refuses_a_wrong_token(client, params) -> None:
    assert client.get("/webhooks/facebook", query_string=params).status_code == 403


def test_shared_fixture_golden(client, environment, sandbox) -> None:
    # The shared fixture as Meta would send it: its own bytes, signed as they are.
    body = graph.meta_json(
        json.loads(open("tests/fixtures/facebook/leadgen_webhook.json", encoding="utf-8").read())
    )
    answer = post(client, environment, body)
    assert answer.status_code == 200 and answer.json["status"] == "queued"
    run_worker()

    assert event_status(answer.json["event_id"]) == ("succeeded", None)
    [deal] = pipedrive(sandbox)["deals"]
    assert deal["title"].startswith("Ana Kovač")
    assert deal["custom_fields"]["957ae6bdc9c3862390160642fb03f3be22c7a3f6"] == 29  # Facebook
    [message] = messages(sandbox)
    assert message["headers"]["To"].endswith("<Ana.Kovac+FB@Example.com>")
    with session() as db:
        lead = db.get(Event, answer.json["event_id"]).data["lead"]
    assert lead["answers"] == {
        "When would you like to start?": "Što prije – idealno početkom siječnja"
    }


def test_batch_of_three_is_three_events(client, environment, sandbox) -> None:
    body = lead_body(*graph.BATCH_LEADGEN_IDS)
    answer = post(client, environment, body)
    assert answer.status_code == 200
    events = answer.json["events"]
    assert [e["status"] for e in events] == ["queued"] * 3
    assert answer.json["event_id"] == events[0]["event_id"]
    assert sorted(queued_job_ids()) == sorted(e["event_id"] for e in events)

    again = post(client, environment, body)
    assert [e["status"] for e in again.json["events"]] == ["duplicate"] * 3
    run_worker()
    assert len(pipedrive(sandbox)["deals"]) == 3 and len(messages(sandbox)) == 3


def test_reserialised_body_does_not_verify(client, environment) -> None:
    body = lead_body(graph.FIXTURE_LEADGEN_ID)
    signature = graph.sign_webhook(body, environment["FACEBOOK_APP_SECRET"])
    reserialised = json.dumps(json.loads(body), ensure_ascii=False).encode()
    answer = client.post(
        "/webhooks/facebook", data=reserialised, headers={"X-Hub-Signature-256": signature}
    )
    assert answer.status_code == 401 and queued_job_ids() == []


def test_georgian_question_is_kept_by_its_text(client, environment, sandbox) -> None:
    answer = post(client, environment, lead_body(graph.GEORGIAN_LEADGEN_ID))
    run_worker()
    with session() as db:
        lead = db.get(Event, answer.json["event_id"]).data["lead"]
    assert lead["answers"]["რომელი სერვისები გაინტერესებთ?"] == ["ვებგვერდის დიზაინი", "SEO"]
    assert lead["city"] == "ქუთაისი" and lead["phone"] == "+995599456789"
    parsed = email.message_from_string(
        messages(sandbox)[0]["headers"]["Subject"], policy=policy.default
    )
    assert parsed is not None


def test_lead_with_phone_but_no_email_gets_a_person_and_deal_only(
    client, environment, sandbox
) -> None:
    answer = post(client, environment, lead_body(graph.PHONE_ONLY_LEADGEN_ID))
    run_worker()
    assert event_status(answer.json["event_id"]) == ("succeeded", None)
    [person] = [p for p in pipedrive(sandbox)["persons"] if p["name"] == "Ivan Horvat"]
    # "098 765 4321" is a Croatian number: the lead's country, not the default region.
    assert [p["value"] for p in person["phones"]] == ["+385987654321"]
    assert len(pipedrive(sandbox)["deals"]) == 1 and messages(sandbox) == []


def test_expired_token_fails_at_once_with_an_operator_reason(client, environment, sandbox) -> None:
    requests.post(f"{sandbox.url}/_sandbox/graph/token/expire", timeout=5).raise_for_status()
    answer = post(client, environment, lead_body(graph.FIXTURE_LEADGEN_ID))
    run_worker()
    status, reason = event_status(answer.json["event_id"])
    assert status == "failed" and "FACEBOOK_PAGE_ACCESS_TOKEN" in reason
    assert pipedrive(sandbox)["deals"] == [] and len(pipedrive(sandbox)["persons"]) == 1


def test_unreadable_lead_fails_with_the_permission_hint(client, environment, sandbox) -> None:
    requests.post(
        f"{sandbox.url}/_sandbox/graph/leads/{graph.FIXTURE_LEADGEN_ID}/unreadable", timeout=5
    ).raise_for_status()
    answer = post(client, environment, lead_body(graph.FIXTURE_LEADGEN_ID))
    run_worker()
    status, reason = event_status(answer.json["event_id"])
    assert status == "failed" and "leads_retrieval" in reason
    assert pipedrive(sandbox)["deals"] == []


@pytest.mark.parametrize("code", [4, 17, 32, 613])
def test_throttling_codes_are_retried(client, environment, sandbox, code) -> None:
    sandbox.fault(vendor="facebook", kind="graph_throttle", code=code, count=2)
    answer = post(client, environment, lead_body(graph.FIXTURE_LEADGEN_ID))
    run_worker()
    assert event_status(answer.json["event_id"]) == ("succeeded", None)
    assert len(pipedrive(sandbox)["deals"]) == 1


def test_other_fields_are_ignored(client, environment) -> None:
    body = graph.meta_json(
        {
            "object": "page",
            "entry": [
                {"id": "1", "time": 1, "changes": [{"field": "feed", "value": {"item": "post"}}]}
            ],
        }
    )
    answer = post(client, environment, body)
    assert answer.status_code == 200 and answer.json["status"] == "ignored"
    assert queued_job_ids() == []


@pytest.mark.parametrize(
    "payload",
    [
        {"object": "user", "entry": []},
        {"object": "page", "entry": [{"changes": [{"field": "leadgen", "value": {}}]}]},
        {"object": "page", "entry": [{"changes": [{"field": "leadgen", "value": "x"}]}]},
        {"object": "page", "entry": ["x"]},
    ],
)
def test_malformed_notifications_are_400(client, environment, payload) -> None:
    answer = post(client, environment, graph.meta_json(payload))
    assert answer.status_code == 400 and answer.json["error"]
    assert queued_job_ids() == []
