"""The Google emulator driven by google-api-python-client and google-auth over HTTP."""

from __future__ import annotations

import base64
import json
import time
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Any

import google.oauth2.credentials
import pytest
import requests
from google.auth.exceptions import RefreshError
from googleapiclient.discovery import Resource, build
from googleapiclient.errors import HttpError

from sandbox.testing import SandboxServer

SUBJECT = "მოგესალმებით, ნინო"


def gmail(env: dict[str, str], **overrides: str) -> Resource:
    settings = {**env, **overrides}
    credentials = google.oauth2.credentials.Credentials(
        token=None,
        refresh_token=settings["GOOGLE_REFRESH_TOKEN"],
        client_id=settings["GOOGLE_CLIENT_ID"],
        client_secret=settings["GOOGLE_CLIENT_SECRET"],
        token_uri=settings["GOOGLE_TOKEN_URL"],
    )
    return build(
        "gmail",
        "v1",
        credentials=credentials,
        static_discovery=True,
        client_options={"api_endpoint": settings["GOOGLE_API_BASE_URL"]},
        cache_discovery=False,
    )


def welcome(**headers: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = Address("Ana Kovač", "sales", "tbilisi-digital.example")
    message["To"] = Address("Nino Beridze", "Nino.Beridze+Typeform", "example.com")
    message["Subject"] = SUBJECT
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    message.set_content("გამარჯობა, ნინო! Thanks for your message.")
    message.add_alternative("<p>გამარჯობა, ნინო!</p>", subtype="html")
    return message


def raw(message: EmailMessage | bytes) -> str:
    data = message if isinstance(message, bytes) else message.as_bytes()
    return base64.urlsafe_b64encode(data).decode()


def send(service: Resource, body: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = service.users().messages().send(userId="me", body=body).execute()
    return result


def http_error(service: Resource, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    with pytest.raises(HttpError) as caught:
        send(service, body)
    return caught.value.resp.status, json.loads(caught.value.content)


def token(env: dict[str, str], **form: str) -> requests.Response:
    data = {
        "grant_type": "refresh_token",
        "client_id": env["GOOGLE_CLIENT_ID"],
        "client_secret": env["GOOGLE_CLIENT_SECRET"],
        "refresh_token": env["GOOGLE_REFRESH_TOKEN"],
        **form,
    }
    return requests.post(env["GOOGLE_TOKEN_URL"], data=data, timeout=5)


def test_send_with_the_real_client_stores_decoded_message(
    sandbox: SandboxServer, env: dict[str, str]
) -> None:
    sent = send(gmail(env), {"raw": raw(welcome(Message_ID="<lead-1842@tbilisi.example>"))})

    assert set(sent) == {"id", "threadId", "labelIds"}
    assert len(sent["id"]) == 16 and sent["threadId"] == sent["id"]
    assert sent["labelIds"] == ["SENT"]
    state = sandbox.state()["google"]
    stored = state["gmail"]["messages"][0]
    assert stored["headers"]["Subject"] == SUBJECT
    assert stored["headers"]["From"] == "Ana Kovač <sales@tbilisi-digital.example>"
    assert stored["headers"]["To"] == "Nino Beridze <Nino.Beridze+Typeform@example.com>"
    assert stored["text"].startswith("გამარჯობა, ნინო!")
    assert "<p>" in stored["html"]
    assert state["tokens_issued"] == 1


def test_find_by_rfc822msgid_and_get_formats(env: dict[str, str]) -> None:
    service = gmail(env)
    sent = send(service, {"raw": raw(welcome(Message_ID="<lead-1842@tbilisi.example>"))})
    messages = service.users().messages()

    found = messages.list(userId="me", q="rfc822msgid:<lead-1842@tbilisi.example>").execute()
    missing = messages.list(userId="me", q="rfc822msgid:<nope@tbilisi.example>").execute()
    minimal = messages.get(userId="me", id=sent["id"], format="minimal").execute()
    as_raw = messages.get(userId="me", id=sent["id"], format="raw").execute()

    assert found == {"messages": [{"id": sent["id"], "threadId": sent["id"]}],
                     "resultSizeEstimate": 1}  # fmt: skip
    assert missing == {"resultSizeEstimate": 0}
    assert "payload" not in minimal and "raw" not in minimal
    assert base64.urlsafe_b64decode(as_raw["raw"]).startswith(b"From:")
    with pytest.raises(HttpError) as caught:
        messages.get(userId="me", id="ffffffffffffffff").execute()
    assert caught.value.resp.status == 404


def test_reply_in_thread_and_unknown_thread(env: dict[str, str]) -> None:
    service = gmail(env)
    first = send(service, {"raw": raw(welcome(Message_ID="<a@tbilisi.example>"))})
    reply = welcome(In_Reply_To="<a@tbilisi.example>", References="<a@tbilisi.example>")
    second = send(service, {"raw": raw(reply), "threadId": first["threadId"]})
    status, body = http_error(service, {"raw": raw(welcome()), "threadId": "0123456789abcdef"})

    assert second["threadId"] == first["threadId"] and second["id"] != first["id"]
    assert status == 404 and body["error"]["status"] == "NOT_FOUND"


def test_gmail_stamps_a_message_id_when_missing(
    sandbox: SandboxServer, env: dict[str, str]
) -> None:
    send(gmail(env), {"raw": raw(welcome())})

    stored = sandbox.state()["google"]["gmail"]["messages"][0]
    assert stored["headers"]["Message-ID"].endswith("@mail.gmail.com>")


def test_unknown_field_is_400(env: dict[str, str]) -> None:
    status, body = http_error(gmail(env), {"raw": raw(welcome()), "recipients": ["x"]})

    assert status == 400
    assert body["error"]["message"].startswith('Invalid JSON payload received. Unknown name "re')
    assert body["error"]["status"] == "INVALID_ARGUMENT"


def test_wrong_type_is_400(env: dict[str, str]) -> None:
    status, body = http_error(gmail(env), {"raw": raw(welcome()), "threadId": 5})

    assert status == 400
    assert "message.thread_id" in body["error"]["message"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"From: sales@tbilisi-digital.example\r\nSubject: Hi\r\n\r\nNo one", "Recipient"),
        (b"To: nino-at-example.com\r\nSubject: Hi\r\n\r\nBad", "Invalid To header"),
    ],
)
def test_raw_without_valid_recipient_is_400(
    env: dict[str, str], data: bytes, message: str
) -> None:
    status, body = http_error(gmail(env), {"raw": raw(data)})

    assert status == 400
    assert message in body["error"]["message"]


@pytest.mark.parametrize("value", ["", "not base64!", None])
def test_missing_or_bad_raw_is_400(env: dict[str, str], value: str | None) -> None:
    status, _ = http_error(gmail(env), {} if value is None else {"raw": value})

    assert status == 400


def test_wrong_bearer_is_401(env: dict[str, str]) -> None:
    url = env["GOOGLE_API_BASE_URL"] + "gmail/v1/users/me/messages"
    response = requests.get(url, headers={"Authorization": "Bearer ya29.forged"}, timeout=5)

    assert response.status_code == 401
    assert response.json()["error"]["status"] == "UNAUTHENTICATED"
    assert response.json()["error"]["errors"][0]["reason"] == "authError"


def test_expired_token_is_401(sandbox: SandboxServer, env: dict[str, str]) -> None:
    sandbox.configure(google_token_expires_in=1)
    access = token(env).json()["access_token"]
    time.sleep(1.1)
    url = env["GOOGLE_API_BASE_URL"] + "gmail/v1/users/me/messages"
    response = requests.get(url, headers={"Authorization": f"Bearer {access}"}, timeout=5)

    assert response.status_code == 401


def test_other_user_is_refused(env: dict[str, str]) -> None:
    service = gmail(env)
    with pytest.raises(HttpError) as caught:
        service.users().messages().list(userId="someone@else.example").execute()

    assert caught.value.resp.status == 403


def test_invalid_grant_and_invalid_client(env: dict[str, str]) -> None:
    with pytest.raises(RefreshError, match="invalid_grant"):
        send(gmail(env, GOOGLE_REFRESH_TOKEN="revoked"), {"raw": raw(welcome())})
    with pytest.raises(RefreshError, match="invalid_client"):
        send(gmail(env, GOOGLE_CLIENT_SECRET="wrong"), {"raw": raw(welcome())})

    assert token(env, refresh_token="revoked").json() == {
        "error": "invalid_grant",
        "error_description": "Bad Request",
    }
    assert token(env, client_id="nobody").status_code == 401


def test_token_answer_shape(env: dict[str, str]) -> None:
    body = token(env).json()

    assert set(body) == {"access_token", "expires_in", "scope", "token_type"}
    assert (body["expires_in"], body["token_type"]) == (3599, "Bearer")
