"""The DocuSign emulator driven by docusign-esign over HTTP: JWT, envelopes, templates, Connect."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docusign_esign as ds
import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from docusign_esign.client.api_exception import ApiException

from sandbox.docusign import SERVICE_TEMPLATE_ID
from sandbox.pdf import build_pdf, pdf_text
from sandbox.testing import SandboxServer
from tests.sandbox.conftest import Receiver

SCHEMA = Path("/work/shared/specs/docusign-connect.schema-v2.json")
SCOPES = ["signature", "impersonation"]


class HttpApiClient(ds.ApiClient):  # type: ignore[misc]
    """docusign-esign always puts https:// before the OAuth host; the emulator speaks http."""

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if url.startswith(f"https://{self.oauth_host_name}"):
            url = "http://" + url.removeprefix("https://")
        return super().request(method, url, *args, **kwargs)


def oauth_host(env: dict[str, str]) -> str:
    return env["DOCUSIGN_OAUTH_HOST"].removeprefix("http://")


def jwt_client(env: dict[str, str], scopes: list[str] = SCOPES) -> ds.ApiClient:
    client = HttpApiClient(host=env["DOCUSIGN_BASE_PATH"], oauth_host_name=oauth_host(env))
    client.request_jwt_user_token(
        env["DOCUSIGN_INTEGRATION_KEY"],
        env["DOCUSIGN_USER_ID"],
        oauth_host(env),
        env["DOCUSIGN_PRIVATE_KEY"].encode(),
        3600,
        scopes,
    )
    return client


def token_client(env: dict[str, str]) -> ds.ApiClient:
    client = ds.ApiClient(host=env["DOCUSIGN_BASE_PATH"])
    # set_access_token leaves out "Bearer ", which DocuSign refuses; set the header whole.
    client.set_default_header("Authorization", f"Bearer {env['DOCUSIGN_ACCESS_TOKEN']}")
    return client


def from_template(**overrides: Any) -> ds.EnvelopeDefinition:
    tabs = ds.Tabs(
        text_tabs=[
            ds.Text(tab_label="client_name", value="Nino Beridze"),
            ds.Text(tab_label="client_company", value="შპს „ბერიძე დიზაინი“"),
            ds.Text(tab_label="amount", value="€4,800.00"),
        ]
    )
    fields = ds.CustomFields(
        text_custom_fields=[ds.TextCustomField(name="pipedrive_deal_id", value="5217")]
    )
    values: dict[str, Any] = {
        "template_id": SERVICE_TEMPLATE_ID,
        "status": "sent",
        "template_roles": [
            ds.TemplateRole(
                role_name="Client", name="Nino Beridze", email="nino@example.com", tabs=tabs
            ),
            ds.TemplateRole(
                role_name="Sales rep", name="Luka Kapanadze", email="luka@example.com"
            ),
        ],
        "custom_fields": fields,
    }
    values.update(overrides)
    return ds.EnvelopeDefinition(**values)


def create(env: dict[str, str], body: Any, client: ds.ApiClient | None = None) -> Any:
    api = ds.EnvelopesApi(client or token_client(env))
    return api.create_envelope(env["DOCUSIGN_ACCOUNT_ID"], envelope_definition=body)


def refused(call: Callable[[], Any]) -> tuple[int, dict[str, Any]]:
    with pytest.raises(ApiException) as caught:
        call()
    return caught.value.status, json.loads(caught.value.body)


def token_form(env: dict[str, str], **claims: Any) -> requests.Response:
    now = int(time.time())
    payload = {
        "iss": env["DOCUSIGN_INTEGRATION_KEY"],
        "sub": env["DOCUSIGN_USER_ID"],
        "aud": oauth_host(env),
        "iat": now,
        "exp": now + 3600,
        "scope": "signature impersonation",
        **claims,
    }
    assertion = jwt.encode(payload, env["DOCUSIGN_PRIVATE_KEY"], algorithm="RS256")
    form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion}
    return requests.post(env["DOCUSIGN_OAUTH_HOST"] + "/oauth/token", data=form, timeout=5)


# --- OAuth ----------------------------------------------------------------------------------


def test_jwt_grant_with_the_library_then_userinfo_and_a_call(env: dict[str, str]) -> None:
    client = jwt_client(env)
    info = client.get_user_info(client.default_headers["Authorization"].split()[1])
    templates = ds.TemplatesApi(client).list_templates(env["DOCUSIGN_ACCOUNT_ID"])

    assert info.sub == env["DOCUSIGN_USER_ID"]
    assert info.accounts[0].account_id == env["DOCUSIGN_ACCOUNT_ID"]
    assert info.accounts[0].base_uri + "/restapi" == env["DOCUSIGN_BASE_PATH"]
    assert [t.name for t in templates.envelope_templates] == ["Service agreement (KA/EN)"]


def test_token_answer_shape(env: dict[str, str]) -> None:
    body = token_form(env).json()

    assert set(body) == {"access_token", "token_type", "expires_in"}
    assert (body["token_type"], body["expires_in"]) == ("Bearer", 3600)


@pytest.mark.parametrize(
    ("claims", "description"),
    [
        ({"iss": "00000000-0000-0000-0000-000000000000"}, "issuer_not_found"),
        ({"aud": "account-d.docusign.com"}, "issuer_not_found"),
        ({"sub": "00000000-0000-0000-0000-000000000001"}, "user_not_found"),
        ({"exp": int(time.time()) - 600, "iat": int(time.time()) - 4000}, "expired"),
        ({"exp": int(time.time()) + 7200}, "invalid_request"),
    ],
)
def test_bad_claims_are_invalid_grant(
    env: dict[str, str], claims: dict[str, Any], description: str
) -> None:
    response = token_form(env, **claims)

    assert response.status_code == 400
    assert response.json() == {"error": "invalid_grant", "error_description": description}


def test_forged_signature_and_missing_scope(env: dict[str, str]) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    forged = jwt.encode(
        {
            "iss": env["DOCUSIGN_INTEGRATION_KEY"],
            "sub": env["DOCUSIGN_USER_ID"],
            "aud": oauth_host(env),
            "iat": now,
            "exp": now + 600,
            "scope": "signature impersonation",
        },
        stranger,
        algorithm="RS256",
    )
    form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": forged}
    answer = requests.post(env["DOCUSIGN_OAUTH_HOST"] + "/oauth/token", data=form, timeout=5)

    assert answer.json()["error_description"] == "no_valid_keys_or_signatures"
    assert token_form(env, scope="signature").json() == {"error": "invalid_scope"}


def test_consent_required_until_granted(sandbox: SandboxServer, env: dict[str, str]) -> None:
    sandbox.docusign_consent(False)
    with pytest.raises(ApiException) as caught:
        jwt_client(env)
    assert json.loads(caught.value.body) == {"error": "consent_required"}

    sandbox.docusign_consent(True)
    assert jwt_client(env).default_headers["Authorization"].startswith("Bearer ")


def test_token_without_bearer_prefix_is_401(env: dict[str, str]) -> None:
    client = ds.ApiClient(host=env["DOCUSIGN_BASE_PATH"])
    client.set_access_token(ds.OAuthToken(access_token=env["DOCUSIGN_ACCESS_TOKEN"]))

    status, body = refused(
        lambda: ds.TemplatesApi(client).list_templates(env["DOCUSIGN_ACCOUNT_ID"])
    )

    assert status == 401 and body["errorCode"] == "USER_AUTHENTICATION_FAILED"


# --- envelopes ------------------------------------------------------------------------------


def test_template_envelope_prefills_tabs_and_lists_by_custom_field(env: dict[str, str]) -> None:
    summary = create(env, from_template())
    api = ds.EnvelopesApi(token_client(env))
    account = env["DOCUSIGN_ACCOUNT_ID"]
    envelope = api.get_envelope(account, summary.envelope_id, include="recipients,custom_fields")
    found = api.list_status_changes(
        account, from_date="2020-01-01", custom_field="pipedrive_deal_id=5217"
    )
    other = api.list_status_changes(
        account, from_date="2020-01-01", custom_field="pipedrive_deal_id=1"
    )

    assert summary.status == "sent" and summary.uri == f"/envelopes/{summary.envelope_id}"
    signer = envelope.recipients.signers[0]
    assert (signer.role_name, signer.status) == ("Client", "sent")
    assert {t.tab_label: t.value for t in signer.tabs.text_tabs}["amount"] == "€4,800.00"
    assert envelope.recipients.carbon_copies[0].role_name == "Sales rep"
    assert envelope.custom_fields.text_custom_fields[0].value == "5217"
    assert [e.envelope_id for e in found.envelopes] == [summary.envelope_id]
    assert other.total_set_size == "0" and other.envelopes is None


def test_rate_limit_headers_on_every_answer(env: dict[str, str]) -> None:
    client = token_client(env)
    ds.TemplatesApi(client).list_templates(env["DOCUSIGN_ACCOUNT_ID"])
    first = client.last_response.getheaders()
    ds.TemplatesApi(client).list_templates(env["DOCUSIGN_ACCOUNT_ID"])
    second = client.last_response.getheaders()

    assert first["X-RateLimit-Limit"] == "3000"
    assert int(first["X-RateLimit-Remaining"]) - int(second["X-RateLimit-Remaining"]) == 1
    assert int(first["X-RateLimit-Reset"]) > time.time()


def test_hourly_limit_and_429_fault(sandbox: SandboxServer, env: dict[str, str]) -> None:
    sandbox.configure(docusign_hourly_limit=1)
    api = ds.TemplatesApi(token_client(env))
    api.list_templates(env["DOCUSIGN_ACCOUNT_ID"])
    status, body = refused(lambda: api.list_templates(env["DOCUSIGN_ACCOUNT_ID"]))
    assert status == 429 and body["errorCode"] == "HOURLY_APIINVOCATION_LIMIT_EXCEEDED"

    sandbox.configure(docusign_hourly_limit=3000)
    sandbox.fault(vendor="docusign", kind="429", reset_s=9)
    response = requests.get(
        env["DOCUSIGN_BASE_PATH"] + f"/v2.1/accounts/{env['DOCUSIGN_ACCOUNT_ID']}/templates",
        headers={"Authorization": f"Bearer {env['DOCUSIGN_ACCESS_TOKEN']}"},
        timeout=5,
    )
    assert response.status_code == 429
    assert response.headers["X-RateLimit-Remaining"] == "0"
    assert int(response.headers["X-RateLimit-Reset"]) - time.time() == pytest.approx(9, abs=2)


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"template_id": "00000000-0000-0000-0000-00000000dead"}, "TEMPLATE_ID_INVALID"),
        (
            {
                "template_roles": [
                    ds.TemplateRole(role_name="Klient", name="N", email="n@example.com")
                ]
            },
            "INVALID_REQUEST_PARAMETER",
        ),
        (
            {
                "template_roles": [
                    ds.TemplateRole(
                        role_name="Client",
                        name="N",
                        email="n@example.com",
                        tabs=ds.Tabs(text_tabs=[ds.Text(tab_label="clientname", value="x")]),
                    )
                ]
            },
            "INVALID_REQUEST_PARAMETER",
        ),
        (
            {"template_roles": [ds.TemplateRole(role_name="Client", name="N", email="nino")]},
            "INVALID_EMAIL_ADDRESS_FOR_RECIPIENT",
        ),
        ({"status": "completed"}, "INVALID_REQUEST_PARAMETER"),
    ],
)
def test_template_mistakes_are_refused(
    sandbox: SandboxServer, env: dict[str, str], overrides: dict[str, Any], code: str
) -> None:
    status, body = refused(lambda: create(env, from_template(**overrides)))

    assert status == 400 and body["errorCode"] == code and body["message"]
    assert sandbox.state()["docusign"]["envelopes"] == []


def test_unknown_member_is_invalid_request_body(env: dict[str, str]) -> None:
    url = env["DOCUSIGN_BASE_PATH"] + f"/v2.1/accounts/{env['DOCUSIGN_ACCOUNT_ID']}/envelopes"
    auth = {"Authorization": f"Bearer {env['DOCUSIGN_ACCESS_TOKEN']}"}
    body = {
        "templateId": SERVICE_TEMPLATE_ID,
        "templateRoles": [
            {"roleName": "Client", "name": "N", "email": "n@example.com", "tabLabels": []}
        ],
    }
    answer = requests.post(url, json=body, headers=auth, timeout=5)
    wrong_account = requests.post(
        url.replace(env["DOCUSIGN_ACCOUNT_ID"], "x"), json={}, headers=auth, timeout=5
    )

    assert answer.status_code == 400
    assert answer.json()["errorCode"] == "INVALID_REQUEST_BODY"
    assert "'tabLabels'" in answer.json()["message"] and "TemplateRole" in answer.json()["message"]
    assert wrong_account.json()["errorCode"] == "USER_DOES_NOT_BELONG_TO_SPECIFIED_ACCOUNT"


def document_envelope(pdf: bytes, anchor: str = "/sig1/") -> ds.EnvelopeDefinition:
    signer = ds.Signer(
        email="nino@example.com",
        name="Nino Beridze",
        recipient_id="1",
        routing_order="1",
        tabs=ds.Tabs(
            sign_here_tabs=[
                ds.SignHere(
                    anchor_string=anchor,
                    anchor_units="pixels",
                    anchor_x_offset="0",
                    anchor_y_offset="-10",
                )
            ]
        ),
    )
    document = ds.Document(
        document_base64=base64.b64encode(pdf).decode(),
        name="Proposal - Nino.pdf",
        file_extension="pdf",
        document_id="1",
    )
    return ds.EnvelopeDefinition(
        email_subject="Please DocuSign: Proposal",
        documents=[document],
        recipients=ds.Recipients(signers=[signer]),
        status="sent",
    )


def test_document_envelope_with_anchor_then_signed_combined_pdf(
    sandbox: SandboxServer, env: dict[str, str]
) -> None:
    pdf = build_pdf(["Proposal for Beridze Design", "Client signature: /sig1/"])
    summary = create(env, document_envelope(pdf))
    api = ds.EnvelopesApi(token_client(env))
    account = env["DOCUSIGN_ACCOUNT_ID"]
    before = api.get_document(account, "1", summary.envelope_id)
    sandbox.docusign_act(summary.envelope_id, "sign")
    combined = api.get_document(account, "combined", summary.envelope_id)

    assert before == pdf
    assert api.get_envelope(account, summary.envelope_id).status == "completed"
    assert combined.startswith(b"%PDF-")
    assert pdf_text(combined)[1].startswith("Client signature: /signed: Nino Beridze ")


@pytest.mark.parametrize(
    ("pdf", "anchor", "code"),
    [
        (b"not a pdf", "/sig1/", "FORMAT_CONVERSION_ERROR"),
        (build_pdf(["no anchor here"]), "/sig1/", "ANCHOR_TAB_STRING_NOT_FOUND"),
    ],
)
def test_bad_documents_are_refused(
    env: dict[str, str], pdf: bytes, anchor: str, code: str
) -> None:
    status, body = refused(lambda: create(env, document_envelope(pdf, anchor)))

    assert status == 400 and body["errorCode"] == code


def test_void_by_the_api_and_missing_envelope(env: dict[str, str]) -> None:
    api = ds.EnvelopesApi(token_client(env))
    account = env["DOCUSIGN_ACCOUNT_ID"]
    summary = create(env, from_template())
    api.update(
        account,
        summary.envelope_id,
        envelope=ds.Envelope(status="voided", voided_reason="Sent twice"),
    )
    voided = api.get_envelope(account, summary.envelope_id)
    status, body = refused(
        lambda: api.get_envelope(account, "f" * 8 + "-0000-0000-0000-" + "0" * 12)
    )

    assert (voided.status, voided.voided_reason) == ("voided", "Sent twice")
    assert status == 400 and body["errorCode"] == "ENVELOPE_DOES_NOT_EXIST"


# --- Connect --------------------------------------------------------------------------------


def signature(raw: bytes, key: str) -> str:
    return base64.b64encode(hmac.new(key.encode(), raw, hashlib.sha256).digest()).decode()


def keys_of(tree: Any, prefix: str = "") -> set[str]:
    if isinstance(tree, dict):
        out = set()
        for key, value in tree.items():
            out |= {prefix + key} | keys_of(value, prefix + key + ".")
        return out
    if isinstance(tree, list) and tree:
        return set().union(*(keys_of(item, prefix.rstrip(".") + "[].") for item in tree))
    return set()


def test_sign_sends_signed_json_messages_shaped_like_the_schema(
    sandbox: SandboxServer, env: dict[str, str], receiver: Receiver
) -> None:
    sandbox.docusign_connect(url=receiver.url, include_documents=True)
    summary = create(env, from_template())
    sandbox.docusign_act(summary.envelope_id, "sign")
    arrived = receiver.wait_for(3)

    # Create and sign deliver from separate threads, so only sign's two keep their order.
    events = [r["body"]["event"] for r in arrived]
    assert sorted(events) == ["envelope-completed", "envelope-delivered", "envelope-sent"]
    assert events.index("envelope-delivered") < events.index("envelope-completed")
    completed = arrived[events.index("envelope-completed")]
    key = env["DOCUSIGN_CONNECT_HMAC_KEYS"].split(",")[0]
    assert completed["headers"]["X-Docusign-Signature-1"] == signature(completed["raw"], key)
    message = completed["body"]
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert keys_of(message) - keys_of(schema) == set()
    data = message["data"]["envelopeSummary"]
    assert (
        data["status"] == "completed" and data["recipients"]["signers"][0]["status"] == "completed"
    )
    assert data["customFields"]["textCustomFields"][0]["value"] == "5217"
    pdf = base64.b64decode(data["envelopeDocuments"][0]["PDFBytes"])
    assert "Company: შპს „ბერიძე დიზაინი“" in pdf_text(pdf)
    deadline = time.monotonic() + 2  # the sandbox records an attempt after its answer
    while len(sandbox.docusign_deliveries()) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [d["ok"] for d in sandbox.docusign_deliveries()] == [True, True, True]


def test_decline_carries_the_reason_and_two_keys_sign(
    sandbox: SandboxServer, env: dict[str, str], receiver: Receiver
) -> None:
    sandbox.docusign_connect(
        url=receiver.url, keys=["old-key", "new-key"], events=["envelope-declined"]
    )
    summary = create(env, from_template())
    sandbox.docusign_act(summary.envelope_id, "decline", reason="Cijena je previsoka")
    (declined,) = receiver.wait_for(1)

    signer = declined["body"]["data"]["envelopeSummary"]["recipients"]["signers"][0]
    assert (signer["status"], signer["declinedReason"]) == ("declined", "Cijena je previsoka")
    assert declined["headers"]["X-Docusign-Signature-1"] == signature(declined["raw"], "old-key")
    assert declined["headers"]["X-Docusign-Signature-2"] == signature(declined["raw"], "new-key")


def test_legacy_xml_message(
    sandbox: SandboxServer, env: dict[str, str], receiver: Receiver, fixture_json: Any
) -> None:
    sandbox.docusign_connect(url=receiver.url, format="xml", events=["envelope-voided"])
    summary = create(env, from_template())
    sandbox.docusign_act(summary.envelope_id, "void", reason="Envelope has expired.")
    (voided,) = receiver.wait_for(1)

    ns = {"d": "http://www.docusign.net/API/3.0"}
    root = ET.fromstring(voided["raw"])
    assert root.tag == "{http://www.docusign.net/API/3.0}DocuSignEnvelopeInformation"
    assert root.findtext("d:EnvelopeStatus/d:EnvelopeID", namespaces=ns) == summary.envelope_id
    assert root.findtext("d:EnvelopeStatus/d:Status", namespaces=ns) == "Voided"
    assert root.findtext("d:EnvelopeStatus/d:VoidReason", namespaces=ns) == "Envelope has expired."
    field = root.find("d:EnvelopeStatus/d:CustomFields/d:CustomField", ns)
    assert field is not None and field.findtext("d:Value", namespaces=ns) == "5217"
    assert voided["headers"]["Content-Type"].startswith("text/xml")


def test_failed_delivery_is_retried(
    sandbox: SandboxServer, env: dict[str, str], receiver: Receiver
) -> None:
    sandbox.configure(docusign_connect_retry_percent=2)  # first retry after 100 ms
    sandbox.docusign_connect(url=receiver.url, events=["envelope-sent"])
    receiver.statuses = [500]
    create(env, from_template())
    first, second = receiver.wait_for(2)
    deadline = time.monotonic() + 2
    while len(sandbox.docusign_deliveries()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)

    assert (first["body"]["retryCount"], second["body"]["retryCount"]) == (0, 1)
    assert [d["status_code"] for d in sandbox.docusign_deliveries()] == [500, 200]
