"""Drive v3 and Docs v1 in the Google emulator, driven by google-api-python-client."""

from __future__ import annotations

import json
from typing import Any

import google.oauth2.credentials
import pytest
from googleapiclient.discovery import Resource, build
from googleapiclient.errors import HttpError

from sandbox.google_docs import PROPOSAL_TEMPLATE_ID
from sandbox.pdf import pdf_text
from sandbox.testing import SandboxServer


def service(env: dict[str, str], name: str, version: str) -> Resource:
    credentials = google.oauth2.credentials.Credentials(
        token=None,
        refresh_token=env["GOOGLE_REFRESH_TOKEN"],
        client_id=env["GOOGLE_CLIENT_ID"],
        client_secret=env["GOOGLE_CLIENT_SECRET"],
        token_uri=env["GOOGLE_TOKEN_URL"],
    )
    # Drive's base is rootUrl + servicePath "drive/v3/"; Docs' servicePath is empty.
    endpoint = env["GOOGLE_API_BASE_URL"] + ("drive/v3/" if name == "drive" else "")
    return build(
        name,
        version,
        credentials=credentials,
        static_discovery=True,
        client_options={"api_endpoint": endpoint},
        cache_discovery=False,
    )


def replace(text: str, value: str) -> dict[str, Any]:
    return {
        "replaceAllText": {"containsText": {"text": text, "matchCase": True}, "replaceText": value}
    }


def status_of(call: Any) -> tuple[int, dict[str, Any]]:
    with pytest.raises(HttpError) as caught:
        call.execute()
    return caught.value.resp.status, json.loads(caught.value.content)


def test_copy_fill_export_delete(sandbox: SandboxServer, env: dict[str, str]) -> None:
    drive, docs = service(env, "drive", "v3"), service(env, "docs", "v1")
    copied = (
        drive.files().copy(fileId=PROPOSAL_TEMPLATE_ID, body={"name": "Proposal 5217"}).execute()
    )
    result = (
        docs.documents()
        .batchUpdate(
            documentId=copied["id"],
            body={
                "requests": [
                    replace("{{company}}", "შპს „ბერიძე დიზაინი“"),
                    replace("{{client_name}}", "Nino Beridze"),
                    replace("{{none}}", "x"),
                ]
            },
        )
        .execute()
    )
    pdf = drive.files().export(fileId=copied["id"], mimeType="application/pdf").execute()
    original = docs.documents().get(documentId=PROPOSAL_TEMPLATE_ID).execute()
    drive.files().delete(fileId=copied["id"]).execute()

    assert copied["name"] == "Proposal 5217" and copied["mimeType"].endswith("document")
    assert [r["replaceAllText"].get("occurrencesChanged") for r in result["replies"]] == [
        1,
        1,
        None,
    ]
    lines = pdf_text(pdf)
    assert pdf.startswith(b"%PDF-") and lines[:2] == [
        "Proposal for შპს „ბერიძე დიზაინი“",
        "Prepared for Nino Beridze",
    ]
    assert "Client signature: /sig1/" in lines
    paragraph = original["body"]["content"][1]["paragraph"]["elements"][0]["textRun"]["content"]
    assert paragraph == "Proposal for {{company}}\n"
    assert status_of(drive.files().get(fileId=copied["id"]))[0] == 404
    files = sandbox.state()["google"]["drive"]["files"]
    assert [f["id"] for f in files] == [PROPOSAL_TEMPLATE_ID]


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ({"insertText": {"text": "x", "location": {"index": 1}}}, "does not emulate insertText"),
        ({"replaceAllText": {"containsText": {"text": ""}, "replaceText": "x"}}, "must not be"),
        ({"replaceAllText": {"containsText": {"txt": "a"}}}, 'Unknown name "txt"'),
        ({}, "exactly one kind"),
    ],
)
def test_bad_batch_requests_are_400_and_change_nothing(
    env: dict[str, str], request_body: dict[str, Any], message: str
) -> None:
    docs = service(env, "docs", "v1")
    body = {"requests": [replace("{{amount}}", "€4,800.00"), request_body]}

    status, error = status_of(
        docs.documents().batchUpdate(documentId=PROPOSAL_TEMPLATE_ID, body=body)
    )
    text = docs.documents().get(documentId=PROPOSAL_TEMPLATE_ID).execute()["body"]["content"]

    assert status == 400 and message in error["error"]["message"]
    assert any(
        "{{amount}}" in c["paragraph"]["elements"][0]["textRun"]["content"]
        for c in text
        if "paragraph" in c
    )


def test_export_and_copy_errors(env: dict[str, str]) -> None:
    drive = service(env, "drive", "v3")

    unsupported = status_of(
        drive.files().export(fileId=PROPOSAL_TEMPLATE_ID, mimeType="image/png")
    )
    missing = status_of(drive.files().copy(fileId="nope", body={}))
    unknown = status_of(drive.files().copy(fileId=PROPOSAL_TEMPLATE_ID, body={"title": "x"}))

    assert unsupported[0] == 400
    assert missing[0] == 404 and missing[1]["error"]["message"] == "File not found: nope."
    assert unknown[0] == 400 and 'Unknown name "title"' in unknown[1]["error"]["message"]
