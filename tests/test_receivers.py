"""Receivers: the contract's answers, and bad input leaving no trace in the queue."""

import pytest
from sqlalchemy import func, select

from core.store import Event, session
from tests.conftest import (
    as_bytes,
    form_headers,
    load_fixture,
    queued_job_ids,
    typeform_headers,
)


def event_count() -> int:
    with session() as db:
        return db.scalar(select(func.count()).select_from(Event))


def test_typeform_delivery_is_stored_and_queued(client) -> None:
    body = as_bytes(load_fixture("typeform/form_response.json"))
    answer = client.post("/webhooks/typeform", data=body, headers=typeform_headers(body))

    assert answer.status_code == 200
    assert answer.json["status"] == "queued"
    event_id = answer.json["event_id"]
    assert queued_job_ids() == [event_id]
    with session() as db:
        event = db.get(Event, event_id)
        assert event.status == "queued" and event.source == "typeform"
        assert event.payload.encode() == body


def test_repeat_delivery_is_a_duplicate_with_the_same_id(client) -> None:
    body = as_bytes(load_fixture("typeform/form_response.json"))
    first = client.post("/webhooks/typeform", data=body, headers=typeform_headers(body))
    for _ in range(2):
        again = client.post("/webhooks/typeform", data=body, headers=typeform_headers(body))
        assert again.status_code == 200
        assert again.json == {"event_id": first.json["event_id"], "status": "duplicate"}

    assert queued_job_ids() == [first.json["event_id"]]
    with session() as db:
        assert db.get(Event, first.json["event_id"]).deliveries == 3


def test_website_form_delivery(client) -> None:
    body = as_bytes(load_fixture("form/lead.json"))
    answer = client.post("/webhooks/form", data=body, headers=form_headers(body))
    assert answer.status_code == 200 and answer.json["status"] == "queued"


def test_missing_content_type_is_not_an_error(client) -> None:
    body = as_bytes(load_fixture("form/lead.json"))
    headers = form_headers(body)
    del headers["Content-Type"]
    answer = client.post("/webhooks/form", data=body, headers=headers, content_type=None)
    assert answer.status_code == 200
    text_plain = dict(headers, **{"Content-Type": "text/plain"})
    assert client.post("/webhooks/form", data=body, headers=text_plain).status_code == 200


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h, b: {},
        lambda h, b: {"Typeform-Signature": h["Typeform-Signature"].replace("sha256=", "")},
        lambda h, b: {"Typeform-Signature": "sha256=" + "0" * 44},
        lambda h, b: typeform_headers(b, secret="another-secret"),
    ],
    ids=["missing", "no-scheme", "wrong", "other-secret"],
)
def test_bad_typeform_signature_is_401_and_leaves_nothing(client, mutate) -> None:
    body = as_bytes(load_fixture("typeform/form_response.json"))
    answer = client.post(
        "/webhooks/typeform", data=body, headers=mutate(typeform_headers(body), body)
    )
    assert answer.status_code == 401
    assert "Typeform-Signature" in answer.json["error"]
    assert queued_job_ids() == [] and event_count() == 0


def test_body_changed_after_signing_is_401(client) -> None:
    payload = load_fixture("typeform/form_response.json")
    body = as_bytes(payload)
    headers = typeform_headers(body)
    payload["form_response"]["answers"][0]["text"] = "Mallory"
    answer = client.post("/webhooks/typeform", data=as_bytes(payload), headers=headers)
    assert answer.status_code == 401 and event_count() == 0


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"", "not valid JSON"),
        (b'{"event_type": "form_response", "form_response": {"form_id"', "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "JSON object"),
        (b'{"event_type": "form_response"}', "form_response"),
        (b"[" * 100000 + b"]" * 100000, "nests JSON too deeply"),
    ],
    ids=["empty", "truncated", "not-utf8", "array", "no-form-response", "deep"],
)
def test_malformed_typeform_body_is_400_with_a_sentence(client, body, fragment) -> None:
    answer = client.post("/webhooks/typeform", data=body, headers=typeform_headers(body))
    assert answer.status_code == 400
    assert fragment in answer.json["error"] and answer.json["error"].endswith(".")
    assert queued_job_ids() == [] and event_count() == 0


def test_malformed_form_fields_are_400(client) -> None:
    for body in (
        b'{"fields": "x"}',
        b'{"fields": {"name": {"a": 1}}}',
        b'{"fields": {}, "submitted_at": "yesterday"}',
    ):
        answer = client.post("/webhooks/form", data=body, headers=form_headers(body))
        assert answer.status_code == 400, body
        assert answer.json["error"]
    assert queued_job_ids() == [] and event_count() == 0


def test_too_large_is_413_and_leaves_nothing(client) -> None:
    body = b'{"fields": {"message": "' + b"x" * 1_100_000 + b'"}}'
    answer = client.post("/webhooks/form", data=body, headers=form_headers(body))
    assert answer.status_code == 413
    assert answer.json["error"]
    assert queued_job_ids() == [] and event_count() == 0


def test_get_on_a_post_route_is_405_json(client) -> None:
    answer = client.get("/webhooks/typeform")
    assert answer.status_code == 405 and answer.json["error"]


def test_unconfigured_form_is_stored_and_ignored(client) -> None:
    payload = load_fixture("typeform/form_response.json")
    payload["form_response"]["form_id"] = "SomeOtherForm"
    body = as_bytes(payload)
    answer = client.post("/webhooks/typeform", data=body, headers=typeform_headers(body))
    assert answer.status_code == 200 and answer.json["status"] == "ignored"
    assert queued_job_ids() == [] and event_count() == 1


def test_submission_without_email_is_ignored_with_the_reason(client) -> None:
    payload = load_fixture("typeform/form_response.json")
    payload["form_response"]["answers"] = [
        a for a in payload["form_response"]["answers"] if a["type"] != "email"
    ]
    body = as_bytes(payload)
    answer = client.post("/webhooks/typeform", data=body, headers=typeform_headers(body))
    assert answer.json["status"] == "ignored"
    with session() as db:
        event = db.get(Event, answer.json["event_id"])
        assert event.reason == "the submission has no email address"
    assert queued_job_ids() == []


def test_redis_down_still_stores_and_answers(client, monkeypatch) -> None:
    import redis

    from core import queue

    def refuse(event_id: str) -> bool:
        raise redis.ConnectionError("connection refused")

    monkeypatch.setattr(queue, "enqueue_event", refuse)
    body = as_bytes(load_fixture("form/lead.json"))
    answer = client.post("/webhooks/form", data=body, headers=form_headers(body))
    assert answer.status_code == 200 and answer.json["status"] == "queued"
    assert event_count() == 1


def test_old_and_new_secret_both_verify_during_a_rotation(client, monkeypatch) -> None:
    from core.config import settings

    monkeypatch.setenv("TYPEFORM_WEBHOOK_SECRET", "the-new-secret,typeform-test-secret")
    settings.cache_clear()
    try:
        body = as_bytes(load_fixture("typeform/form_response.json"))
        old = client.post("/webhooks/typeform", data=body, headers=typeform_headers(body))
        new = client.post(
            "/webhooks/typeform",
            data=body,
            headers=typeform_headers(body, secret="the-new-secret"),
        )
        retired = client.post(
            "/webhooks/typeform", data=body, headers=typeform_headers(body, secret="retired")
        )
        assert (old.status_code, new.status_code, retired.status_code) == (200, 200, 401)
    finally:
        settings.cache_clear()
