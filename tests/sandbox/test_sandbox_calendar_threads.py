"""Calendar v3 events and Gmail threads, driven by google-api-python-client over HTTP."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

import google.oauth2.credentials
import pytest
import requests
from googleapiclient.discovery import Resource, build
from googleapiclient.errors import HttpError

from sandbox.testing import SandboxError, SandboxServer

LUKA = "luka@tbilisi-digital.example"
NINO = "Nino Beridze <Nino.Beridze+Typeform@example.com>"


def service(env: dict[str, str], name: str, version: str, endpoint: str) -> Resource:
    credentials = google.oauth2.credentials.Credentials(
        token=None,
        refresh_token=env["GOOGLE_REFRESH_TOKEN"],
        client_id=env["GOOGLE_CLIENT_ID"],
        client_secret=env["GOOGLE_CLIENT_SECRET"],
        token_uri=env["GOOGLE_TOKEN_URL"],
    )
    return build(
        name, version, credentials=credentials, static_discovery=True, cache_discovery=False,
        client_options={"api_endpoint": env["GOOGLE_API_BASE_URL"] + endpoint},
    )  # fmt: skip


@pytest.fixture
def calendar(env: dict[str, str]) -> Resource:
    return service(env, "calendar", "v3", "calendar/v3/")


@pytest.fixture
def gmail(env: dict[str, str]) -> Resource:
    return service(env, "gmail", "v1", "")


def reminder(fixture_json: Callable[[str], Any], **changes: Any) -> dict[str, Any]:
    expected = fixture_json("google/calendar_event_insert_response.json")
    body = {key: expected[key] for key in ("id", "summary", "description", "start", "end")}
    body.update(extendedProperties=expected["extendedProperties"])
    body.update(reminders=expected["reminders"], **changes)
    return body


def refused(request: Any) -> tuple[int, dict[str, Any]]:
    with pytest.raises(HttpError) as caught:
        request.execute()
    return caught.value.resp.status, json.loads(caught.value.content)["error"]


def test_insert_with_client_id_answers_like_fixture(
    calendar: Resource, fixture_json: Callable[[str], Any]
) -> None:
    expected = fixture_json("google/calendar_event_insert_response.json")
    event = calendar.events().insert(calendarId=LUKA, body=reminder(fixture_json)).execute()

    assert list(event) == list(expected)
    assert event["id"] == expected["id"] and event["iCalUID"] == expected["iCalUID"]
    assert event["htmlLink"].endswith("eid=" + base64.b64encode(
        f"{expected['id']} {LUKA}".encode()).decode().rstrip("="))  # fmt: skip
    assert (event["start"], event["reminders"]) == (expected["start"], expected["reminders"])
    fetched = calendar.events().get(calendarId=LUKA, eventId=expected["id"]).execute()
    assert fetched == event


def test_reused_id_is_409_duplicate(
    calendar: Resource, fixture_json: Callable[[str], Any]
) -> None:
    calendar.events().insert(calendarId=LUKA, body=reminder(fixture_json)).execute()
    again = calendar.events().insert(calendarId=LUKA, body=reminder(fixture_json))
    status, error = refused(again)

    assert status == 409
    assert error["errors"][0]["reason"] == "duplicate"
    assert error["message"] == "The requested identifier already exists."


@pytest.mark.parametrize("event_id", ["abc", "UPPERCASE1", "has-dash-1", "wxyz12345", "a" * 1025])
def test_invalid_client_id_is_400(
    calendar: Resource, fixture_json: Callable[[str], Any], event_id: str
) -> None:
    status, error = refused(
        calendar.events().insert(calendarId=LUKA, body=reminder(fixture_json, id=event_id))
    )

    assert status == 400 and error["message"] == "Invalid resource id value."


@pytest.mark.parametrize(
    ("changes", "text"),
    [
        ({"colour": "red"}, 'Unknown name "colour"'),
        ({"summary": 5}, "resource.summary"),
        ({"end": None}, "Missing end time."),
        ({"start": {"dateTime": "2026-12-08T11:00:00"}}, "Missing time zone"),
        ({"end": {"dateTime": "2026-12-08T10:00:00+04:00"}}, "time range is empty"),
        ({"start": {"date": "2026-12-08"}}, "both be date"),
        ({"start": {"dateTime": "x", "timeZone": "Asia/Tbilisi"}}, "Invalid start time."),
    ],
)
def test_bad_event_is_400(
    calendar: Resource, fixture_json: Callable[[str], Any], changes: Any, text: str
) -> None:
    body = reminder(fixture_json, **changes)
    body = {key: value for key, value in body.items() if value is not None}
    status, error = refused(calendar.events().insert(calendarId="primary", body=body))

    assert status == 400 and text in error["message"]


def test_unknown_calendar_and_event_are_404(calendar: Resource) -> None:
    assert refused(calendar.events().get(calendarId=LUKA, eventId="nope12345"))[0] == 404
    assert refused(calendar.events().list(calendarId="stranger@example.com"))[0] == 404


def test_list_finds_by_private_extended_property(
    calendar: Resource, fixture_json: Callable[[str], Any]
) -> None:
    calendar.events().insert(calendarId=LUKA, body=reminder(fixture_json)).execute()
    other = reminder(fixture_json, id="other12345", extendedProperties={"private": {"k": "v"}})
    calendar.events().insert(calendarId=LUKA, body=other).execute()
    key = "idempotency_key=deal-5217-stage-4-reminder"

    found = calendar.events().list(calendarId=LUKA, privateExtendedProperty=key).execute()
    window = calendar.events().list(
        calendarId=LUKA, timeMin="2026-12-09T00:00:00Z", singleEvents=True, orderBy="startTime"
    ).execute()  # fmt: skip

    assert found["kind"] == "calendar#events"
    assert [event["id"] for event in found["items"]] == ["4u0bq8k6c2m1v9h7s5e3r0d8fg"]
    assert window["items"] == []


def test_calendar_needs_the_oauth_token(env: dict[str, str]) -> None:
    url = env["GOOGLE_API_BASE_URL"] + "calendar/v3/calendars/primary/events"
    response = requests.post(url, json={}, headers={"Authorization": "Bearer x"}, timeout=5)

    assert response.status_code == 401


def first_message(gmail: Resource, subject: str = "Your website proposal") -> dict[str, Any]:
    message = EmailMessage()
    message["From"] = "sales@tbilisi-digital.example"
    message["To"] = NINO
    message["Subject"] = subject
    message["Message-ID"] = "<welcome-1842@tbilisi.example>"
    message.set_content("Hello Nino")
    raw = base64.urlsafe_b64encode(message.as_bytes()).decode()
    sent: dict[str, Any] = gmail.users().messages().send(userId="me", body={"raw": raw}).execute()
    return sent


def follow_up(thread_id: str, subject: str, cites: str | None) -> dict[str, Any]:
    message = EmailMessage()
    message["From"] = "sales@tbilisi-digital.example"
    message["To"] = NINO
    message["Subject"] = subject
    if cites:
        message["In-Reply-To"] = cites
        message["References"] = cites
    message.set_content("Just checking in")
    return {"raw": base64.urlsafe_b64encode(message.as_bytes()).decode(), "threadId": thread_id}


def test_reply_control_lands_in_thread_and_inbox(sandbox: SandboxServer, gmail: Resource) -> None:
    sent = first_message(gmail)
    reply = sandbox.gmail_reply(sent["threadId"], NINO, "Yes, let's talk on Monday.")
    thread = gmail.users().threads().get(userId="me", id=sent["threadId"]).execute()
    inbox = gmail.users().messages().list(
        userId="me", q="in:inbox from:nino.beridze+typeform@example.com"
    ).execute()  # fmt: skip

    assert reply["threadId"] == sent["threadId"] and reply["labelIds"] == ["INBOX", "UNREAD"]
    assert [m["id"] for m in thread["messages"]] == [sent["id"], reply["id"]]
    headers = {h["name"]: h["value"] for h in thread["messages"][1]["payload"]["headers"]}
    assert headers["In-Reply-To"] == "<welcome-1842@tbilisi.example>"
    assert headers["References"] == "<welcome-1842@tbilisi.example>"
    assert headers["Subject"] == "Re: Your website proposal"
    assert inbox["messages"] == [{"id": reply["id"], "threadId": sent["threadId"]}]


def test_send_in_thread_needs_references_and_subject(gmail: Resource) -> None:
    sent = first_message(gmail)
    cite = "<welcome-1842@tbilisi.example>"
    messages = gmail.users().messages()

    subject = "Re: Your website proposal"

    def send(body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = messages.send(userId="me", body=body).execute()
        return result

    joined = send(follow_up(sent["threadId"], subject, cite))
    no_refs = send(follow_up(sent["threadId"], subject, None))
    new_subject = send(follow_up(sent["threadId"], "Other", cite))

    assert joined["threadId"] == sent["threadId"]
    assert no_refs["threadId"] != sent["threadId"]
    assert new_subject["threadId"] != sent["threadId"]


def test_thread_formats_and_errors(sandbox: SandboxServer, gmail: Resource) -> None:
    sent = first_message(gmail)
    threads = gmail.users().threads()

    minimal = threads.get(userId="me", id=sent["threadId"], format="minimal").execute()
    metadata = threads.get(
        userId="me", id=sent["threadId"], format="metadata", metadataHeaders=["Subject"]
    ).execute()  # fmt: skip

    assert "payload" not in minimal["messages"][0]
    assert metadata["messages"][0]["payload"]["headers"] == [
        {"name": "Subject", "value": "Your website proposal"}
    ]
    assert refused(threads.get(userId="me", id="ffffffffffffffff"))[0] == 404
    with pytest.raises(SandboxError, match="thread"):
        sandbox.gmail_reply("ffffffffffffffff", NINO, "hi")


def test_bounce_comes_from_mailer_daemon(sandbox: SandboxServer, gmail: Resource) -> None:
    sent = first_message(gmail)
    bounce = sandbox.gmail_bounce(sent["threadId"])
    thread = gmail.users().threads().get(userId="me", id=sent["threadId"]).execute()

    headers = {h["name"]: h["value"] for h in thread["messages"][-1]["payload"]["headers"]}
    assert bounce["threadId"] == sent["threadId"]
    assert "mailer-daemon@googlemail.com" in headers["From"]
    assert headers["X-Failed-Recipients"] == "Nino.Beridze+Typeform@example.com"
    assert thread["messages"][-1]["payload"]["mimeType"] == "multipart/report"
