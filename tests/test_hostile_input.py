"""Hostile and odd input: always a 4xx with a sentence, never a 5xx, never a trace left."""

import io
import json
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import as_bytes, form_headers, load_fixture, queued_job_ids, typeform_headers
from tests.test_receivers import event_count

# What gunicorn sets for a chunked request: the stream ends where the body ends.
CHUNKED = {"wsgi.input_terminated": True}


def typeform_with(mutate) -> bytes:
    payload = load_fixture("typeform/form_response.json")
    mutate(payload["form_response"])
    return as_bytes(payload)


def set_answer(index: int, value) -> callable:
    def mutate(response: dict) -> None:
        response["answers"][index] = value

    return mutate


@pytest.mark.parametrize(
    "body",
    [
        typeform_with(set_answer(0, {"type": "text", "text": "x", "field": "full_name"})),
        typeform_with(set_answer(0, {"type": "text", "text": "x", "field": None})),
        typeform_with(set_answer(0, {"type": "text", "text": "x", "field": [1]})),
        typeform_with(
            set_answer(
                5, {"type": "choices", "choices": {"labels": 5}, "field": {"ref": "services"}}
            )
        ),
        typeform_with(
            set_answer(6, {"type": "choice", "choice": "asap", "field": {"ref": "timeline"}})
        ),
        typeform_with(set_answer(1, {"type": "email", "email": 42, "field": {"ref": "email"}})),
        typeform_with(
            set_answer(1, {"type": "email", "email": "not-an-email", "field": {"ref": "email"}})
        ),
        typeform_with(
            set_answer(0, {"type": "text", "text": [{"a": 1}], "field": {"ref": "full_name"}})
        ),
        typeform_with(lambda r: r.update(hidden=["utm"])),
        typeform_with(lambda r: r.update(hidden={"utm_source": {"deep": 1}})),
        typeform_with(lambda r: r.update(answers={})),
        typeform_with(lambda r: r.update(submitted_at="yesterday")),
        b'{"event_type": "form_response", "form_response": {"form_id": "Xq7RkP2d", '
        b'"token": "t", "answers": [], "x": NaN}}',
        b'{"event_type": "form_response", "form_response": {"form_id": "\\ud800", "token": "t"}}',
    ],
    ids=[
        "field-str",
        "field-null",
        "field-list",
        "labels-int",
        "choice-str",
        "email-int",
        "email-invalid",
        "name-objects",
        "hidden-list",
        "hidden-object",
        "answers-object",
        "bad-date",
        "nan",
        "lone-surrogate",
    ],
)
def test_typeform_oddities_are_400(client, body) -> None:
    answer = client.post("/webhooks/typeform", data=body, headers=typeform_headers(body))
    assert answer.status_code == 400, answer.json
    assert answer.json["error"].endswith(".")
    assert queued_job_ids() == [] and event_count() == 0


@pytest.mark.parametrize(
    "fields",
    [
        {"email": 42},
        {"email": ["a@example.com"]},
        {"email": "a@example.com", "name": [{"x": 1}]},
        {"email": "a@example.com", "phone": ["1", "2"]},
        {"email": "a@example.com", "\ud800": {}},
        {"email": "a@example.com", "message": "x" * 5000},
    ],
    ids=["email-int", "email-list", "name-objects", "phone-list", "surrogate-key", "huge-text"],
)
def test_form_field_oddities_are_400(client, fields) -> None:
    body = json.dumps({"fields": fields}).encode()
    answer = client.post("/webhooks/form", data=body, headers=form_headers(body))
    assert answer.status_code == 400, answer.json
    assert queued_job_ids() == [] and event_count() == 0


@pytest.mark.parametrize(
    "extra", [{"submission_id": True}, {"form": {"a": 1}}, {"utm": ["x"]}, {"submission_id": [1]}]
)
def test_form_envelope_oddities_are_400(client, extra) -> None:
    body = json.dumps({"fields": {"email": "a@example.com"}, **extra}).encode()
    answer = client.post("/webhooks/form", data=body, headers=form_headers(body))
    assert answer.status_code == 400 and event_count() == 0


def test_very_long_sender_ids_are_stored(client) -> None:
    body = typeform_with(lambda r: r.update(token="t" * 5000))
    answer = client.post("/webhooks/typeform", data=body, headers=typeform_headers(body))
    assert answer.status_code == 200
    again = client.post("/webhooks/typeform", data=body, headers=typeform_headers(body))
    assert again.json["status"] == "duplicate"
    payload = load_fixture("typeform/form_response.json")
    payload["event_type"] = "x" * 300
    body = as_bytes(payload)
    answer = client.post("/webhooks/typeform", data=body, headers=typeform_headers(body))
    assert answer.status_code == 200 and answer.json["status"] == "ignored"


def test_chunked_body_over_the_limit_is_413(client) -> None:
    big = b'{"fields": {"message": "' + b"x" * 2_000_000 + b'"}}'
    signed_prefix = form_headers(big[:1_048_576])
    answer = client.post(
        "/webhooks/form",
        input_stream=io.BytesIO(big),
        headers={**signed_prefix, "Transfer-Encoding": "chunked"},
        environ_overrides=CHUNKED,
    )
    assert answer.status_code == 413
    assert event_count() == 0


def test_chunked_body_within_the_limit_is_read_whole(client) -> None:
    body = as_bytes(load_fixture("form/lead.json"))
    answer = client.post(
        "/webhooks/form",
        input_stream=io.BytesIO(body),
        headers={**form_headers(body), "Transfer-Encoding": "chunked"},
        environ_overrides=CHUNKED,
    )
    assert answer.status_code == 200 and answer.json["status"] == "queued"


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    body=st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats(allow_nan=False)
            | st.text(max_size=20),
            lambda children: (
                st.lists(children, max_size=4)
                | st.dictionaries(st.text(max_size=10), children, max_size=4)
            ),
            max_leaves=20,
        ).map(lambda tree: json.dumps(tree).encode()),
    ),
    route=st.sampled_from(["typeform", "form", "facebook", "pipedrive", "form/contact"]),
    content_type=st.sampled_from(
        [
            None,
            "application/json",
            "text/plain",
            "x/y; charset=zz",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
        ]
    ),
)
def test_authenticated_random_bodies_never_get_a_5xx(
    client, environment, body, route, content_type
) -> None:
    from core import queue

    headers = authenticated_headers(route, body, environment)
    waiting = queue.queue().count
    if content_type is None:
        headers.pop("Content-Type")
    else:
        headers["Content-Type"] = content_type
    answer = client.post(f"/webhooks/{route}", data=body, headers=headers)
    assert answer.status_code < 500
    if answer.status_code >= 400:
        assert answer.json["error"]
        assert queue.queue().count == waiting


def authenticated_headers(route: str, body: bytes, environment: dict[str, str]) -> dict:
    """What a genuine sender adds, so the fuzzing reaches the parsers behind the checks."""
    import base64

    from core.signatures import sign_hex_sha256

    if route == "typeform":
        return typeform_headers(body)
    if route == "form":
        return form_headers(body)
    if route == "facebook":
        signature = sign_hex_sha256(environment["FACEBOOK_APP_SECRET"], body)
        return {"X-Hub-Signature-256": signature, "Content-Type": "application/json"}
    if route == "pipedrive":
        user = environment["PIPEDRIVE_WEBHOOK_USER"]
        password = environment["PIPEDRIVE_WEBHOOK_PASSWORD"]
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}", "Content-Type": "application/json"}
    return {
        "Origin": "https://tbilisi-digital.example",
        "X-Forwarded-For": "192.0.2.9",
        "Content-Type": "application/x-www-form-urlencoded",
    }


def test_no_personal_data_or_secret_in_any_log_line(client, sandbox, environment, caplog) -> None:
    from tests.conftest import run_worker

    caplog.set_level(logging.DEBUG)
    form = load_fixture("form/lead.json")
    bad = {"fields": {"email": "ana.kovac@example.hr", "phone": ["+385 91 234 5678"]}}
    for payload in (form, bad):
        body = as_bytes(payload)
        client.post("/webhooks/form", data=body, headers=form_headers(body))
    typeform = as_bytes(load_fixture("typeform/form_response.json"))
    client.post("/webhooks/typeform", data=typeform, headers=typeform_headers(typeform))
    run_worker()

    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "event queued" in text and "run succeeded" in text
    secrets = [
        environment[k]
        for k in (
            "TYPEFORM_WEBHOOK_SECRET",
            "FORM_WEBHOOK_SECRET",
            "PIPEDRIVE_API_TOKEN",
            "GOOGLE_CLIENT_SECRET",
            "GOOGLE_REFRESH_TOKEN",
        )
    ]
    personal = [
        "ana.kovac@example.hr",
        "Ana Kovač",
        "+385912345678",
        "385 91 234 5678",
        "Nino.Beridze",
        "Nino Beridze",
        "599123456",
    ]
    for needle in secrets + personal:
        assert needle not in text, needle
    # Any address at all, unless masked (a***@example.hr).
    import re

    addresses = re.findall(r"[\w.+-]+@[\w-]+\.[\w.]+", text)
    assert [a for a in addresses if "***" not in a] == []
