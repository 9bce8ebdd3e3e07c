"""DocuSign: the JWT grant, Connect messages (JSON and XML) closing the loop, and polling."""

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from core.store import ContractEnvelope, Event, FlowRun, session, utcnow
from sandbox.pdf import build_pdf, pdf_text
from tests.conftest import FIXTURES, queued_job_ids, run_worker
from tests.sandbox.conftest import Receiver
from tests.test_contract import new_deal, notes, serve, use_contracts
from tests.test_follow_up import LUKA, emails

KEY = "sandbox-connect-key-1"


@pytest.fixture
def web(app: Any) -> Iterator[str]:
    """The base URL of the served app, where the sandbox delivers Connect messages."""
    yield from serve(app)


@pytest.fixture
def contracts(clean, monkeypatch, tmp_path) -> None:
    use_contracts(monkeypatch, tmp_path)


def sent_envelope(sandbox) -> tuple[int, str]:
    """A deal whose Service agreement went out; returns the deal and envelope ids."""
    from flows.contract import send_now

    deal_id = new_deal(sandbox)
    outcome = send_now(deal_id)
    assert outcome["status"] == "succeeded", outcome["reason"]
    return deal_id, outcome["result"]["envelope_id"]


def deliveries(sandbox, count: int) -> list[dict[str, Any]]:
    """Wait for `count` Connect deliveries; every one must have been answered 2xx."""
    deadline = time.monotonic() + 10
    while len(found := sandbox.docusign_deliveries()) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [d["ok"] for d in found] == [True] * count, found
    return found


def signed_headers(body: bytes, *keys: str, xml: bool = False) -> dict[str, str]:
    headers = {"Content-Type": "text/xml" if xml else "application/json"}
    for index, key in enumerate(keys, start=1):
        digest = hmac.new(key.encode(), body, hashlib.sha256).digest()
        headers[f"X-DocuSign-Signature-{index}"] = base64.b64encode(digest).decode()
    return headers


def deal_of(sandbox, deal_id: int) -> dict[str, Any]:
    return next(d for d in sandbox.state()["pipedrive"]["deals"] if d["id"] == deal_id)


def files_of(sandbox, deal_id: int) -> list[dict[str, Any]]:
    return [f for f in sandbox.state()["pipedrive"]["files"] if f["deal_id"] == deal_id]


def activities_of(sandbox, deal_id: int) -> list[dict[str, Any]]:
    return [a for a in sandbox.state()["pipedrive"]["activities"] if a["deal_id"] == deal_id]


def docusign_events() -> list[Event]:
    with session() as db:
        query = select(Event).where(Event.source == "docusign").order_by(Event.received_at)
        return list(db.scalars(query))


def row(envelope_id: str) -> ContractEnvelope:
    with session() as db:
        return db.scalar(
            select(ContractEnvelope).where(ContractEnvelope.envelope_id == envelope_id)
        )


# -- the JWT grant ----------------------------------------------------------------------


def grant_client(sandbox, clock: list[float]) -> Any:
    from connectors.docusign import DocuSignClient
    from core.config import DocuSign, Retry

    env = sandbox.env()
    settings = DocuSign(
        account_id=env["DOCUSIGN_ACCOUNT_ID"],
        integration_key=env["DOCUSIGN_INTEGRATION_KEY"],
        user_id=env["DOCUSIGN_USER_ID"],
        private_key=env["DOCUSIGN_PRIVATE_KEY"],
        base_path=env["DOCUSIGN_BASE_PATH"],
        oauth_host=env["DOCUSIGN_OAUTH_HOST"],
    )
    return DocuSignClient(settings, Retry(attempts=2, base_delay_s=0.01), clock=lambda: clock[0])


def test_the_jwt_token_is_kept_until_shortly_before_it_expires(clean, sandbox):
    from sandbox.docusign import SERVICE_TEMPLATE_ID

    clock = [1000.0]
    client = grant_client(sandbox, clock)
    roles = client.template_roles(SERVICE_TEMPLATE_ID)
    first = client.access_token()
    clock[0] += 3600 - 301  # the sandbox's tokens live 3600 s; renewed 300 s before
    assert client.access_token() == first
    clock[0] += 2
    second = client.access_token()

    assert roles["Client"]["kind"] == "signers" and "amount" in roles["Client"]["tabs"]["textTabs"]
    assert second != first
    assert sandbox.state()["docusign"]["tokens_issued"] == 2


def test_consent_required_names_the_url_to_open(clean, sandbox):
    from connectors.errors import PermanentVendorError

    sandbox.docusign_consent(False)
    with pytest.raises(PermanentVendorError) as caught:
        grant_client(sandbox, [0.0]).access_token()

    message = str(caught.value)
    assert "consent_required" in message
    assert "/oauth/auth?response_type=code&scope=signature%20impersonation&client_id=" in message
    assert sandbox.env()["DOCUSIGN_INTEGRATION_KEY"] in message


# -- each envelope event, JSON and XML --------------------------------------------------


@pytest.mark.parametrize(("fmt", "documents"), [("json", True), ("xml", False)])
def test_signed_wins_the_deal_attaches_the_pdf_and_emails_the_owner(
    contracts, web, sandbox, fmt, documents
):
    deal_id, envelope_id = sent_envelope(sandbox)
    url = f"{web}/webhooks/docusign"
    sandbox.docusign_connect(url=url, format=fmt, include_documents=documents)
    sandbox.docusign_act(envelope_id, "sign")
    deliveries(sandbox, 2)
    run_worker()

    # Both messages carry the envelope as it is when they are sent, completed: one change.
    [event] = docusign_events()
    assert (event.type, event.status, event.deliveries) == ("envelope.completed", "succeeded", 2)
    assert deal_of(sandbox, deal_id)["status"] == "won"
    [attached] = files_of(sandbox, deal_id)
    assert attached["name"] == f"Service agreement - signed - {envelope_id}.pdf"
    [message] = [m for m in emails(sandbox) if m["Subject"].startswith("Signed:")]
    assert message["To"].addresses[0].addr_spec == "luka@tbilisi-digital.example"
    assert "Nino Beridze — Website design" in message.get_body(("plain",)).get_content()
    assert row(envelope_id).status == "completed"
    with session() as db:
        [completed] = [e for e in docusign_events() if e.type == "envelope.completed"]
        run = db.scalar(select(FlowRun).where(FlowRun.event_id == completed.id))
        attach = next(s.output for s in run.steps if s.name == "attach_signed_pdf")
    # With documents in the message the PDF comes from it, else from documents/combined.
    assert attach["from"] == ("message" if documents else "combined")
    assert attach["size"] == attached["file_size"]


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_declined_is_an_activity_with_the_reason(contracts, web, sandbox, fmt):
    deal_id, envelope_id = sent_envelope(sandbox)
    sandbox.docusign_connect(url=f"{web}/webhooks/docusign", format=fmt)
    sandbox.docusign_act(envelope_id, "decline", reason="Cijena je previsoka – nova ponuda?")
    deliveries(sandbox, 2)
    run_worker()

    [activity] = activities_of(sandbox, deal_id)
    assert activity["subject"] == "Contract declined: Nino Beridze — Website design"
    assert activity["owner_id"] == LUKA
    assert "Reason: Cijena je previsoka – nova ponuda?" in activity["note"]
    assert deal_of(sandbox, deal_id)["status"] == "open"
    assert row(envelope_id).status == "declined"


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_an_expired_envelope_is_a_note_and_an_activity(contracts, web, sandbox, fmt):
    deal_id, envelope_id = sent_envelope(sandbox)
    sandbox.docusign_connect(url=f"{web}/webhooks/docusign", format=fmt)
    sandbox.docusign_act(envelope_id, "void", reason="Envelope has expired.")
    deliveries(sandbox, 1)
    run_worker()

    [activity] = activities_of(sandbox, deal_id)
    assert activity["subject"].startswith("Contract expired: Nino Beridze")
    sent_note, void_note = notes(sandbox, deal_id)
    assert "was expired: Envelope has expired." in void_note["content"]
    assert row(envelope_id).status == "voided"


# -- aggregate, out of order, twice -----------------------------------------------------


def test_an_aggregate_snapshot_is_compared_with_the_stored_state(contracts, web, sandbox):
    deal_id, envelope_id = sent_envelope(sandbox)
    # Only the last event goes out: the message's snapshot skips "delivered" altogether.
    url = f"{web}/webhooks/docusign"
    sandbox.docusign_connect(url=url, events=["envelope-completed"])
    sandbox.docusign_act(envelope_id, "sign")
    deliveries(sandbox, 1)
    run_worker()

    [event] = docusign_events()
    with session() as db:
        run = db.scalar(select(FlowRun).where(FlowRun.event_id == event.id))
        recorded = run.steps[0].output
    assert (recorded["before"], recorded["status"], recorded["advanced"]) == (
        "sent",
        "completed",
        True,
    )
    assert deal_of(sandbox, deal_id)["status"] == "won"
    assert len(files_of(sandbox, deal_id)) == 1


def test_out_of_order_and_repeated_messages_act_once(contracts, client, sandbox):
    deal_id, envelope_id = sent_envelope(sandbox)
    receiver = Receiver()
    receiver._thread.start()
    try:
        sandbox.docusign_connect(url=receiver.url)
        sandbox.docusign_act(envelope_id, "sign")
        completed_msg = receiver.wait_for(2)[-1]["raw"]
    finally:
        receiver._server.shutdown()
    delivered_msg = _earlier_state(completed_msg)
    xml = _xml_of(completed_msg)

    answers = []
    for body in (completed_msg, delivered_msg, completed_msg):
        answers.append(
            client.post("/webhooks/docusign", data=body, headers=signed_headers(body, KEY))
        )
    retried = json.loads(completed_msg)
    retried["retryCount"] = 1  # Connect's retry of the same message: other bytes, same change
    retried_body = json.dumps(retried, ensure_ascii=False).encode()
    answers.append(
        client.post(
            "/webhooks/docusign", data=retried_body, headers=signed_headers(retried_body, KEY)
        )
    )
    answers.append(
        client.post("/webhooks/docusign", data=xml, headers=signed_headers(xml, KEY, xml=True))
    )
    run_worker()

    assert [a.json["status"] for a in answers] == [
        "queued", "queued", "duplicate", "duplicate", "duplicate",
    ]  # fmt: skip
    late = next(e for e in docusign_events() if e.type == "envelope.delivered")
    assert late.status == "ignored"
    assert "the envelope is completed: nothing to do" in late.reason
    assert row(envelope_id).status == "completed"
    assert len(files_of(sandbox, deal_id)) == 1
    assert len([m for m in emails(sandbox) if m["Subject"].startswith("Signed:")]) == 1

    from flows.contract import run

    [done] = [e for e in docusign_events() if e.type == "envelope.completed"]
    with session() as db:
        db.get(Event, done.id).status = "queued"
    assert run(done.id) == "succeeded"  # a replay: every action is found done
    assert len(files_of(sandbox, deal_id)) == 1


def _earlier_state(json_body: bytes) -> bytes:
    """The envelope-delivered message as Connect sent it when the client opened the envelope."""
    message = json.loads(json_body)
    summary = message["data"]["envelopeSummary"]
    message["event"] = "envelope-delivered"
    summary["status"] = "delivered"
    summary["statusChangedDateTime"] = summary["deliveredDateTime"]
    for key in ("completedDateTime",):
        summary.pop(key)
    return json.dumps(message, ensure_ascii=False).encode()


def _xml_of(json_body: bytes) -> bytes:
    """The legacy XML of the same envelope state, as the sandbox writes it."""
    import datetime as dt

    from sandbox.docusign_connect import xml_message

    summary = json.loads(json_body)["data"]["envelopeSummary"]
    return xml_message(summary, [], dt.datetime.now(dt.UTC))


# -- signatures, hostile XML, size -------------------------------------------------------


def test_rotated_keys_either_one_signs(clean, client, monkeypatch):
    from connectors import registry

    monkeypatch.setenv("DOCUSIGN_CONNECT_HMAC_KEYS", "old-key, new-key")
    registry.reset()
    body = (FIXTURES / "docusign" / "envelope_declined.json").read_bytes()

    by_new = client.post("/webhooks/docusign", data=body, headers=signed_headers(body, "new-key"))
    # A second header signed by the old key, the first by a key long gone.
    both = signed_headers(body, "retired-key", "old-key")
    by_old = client.post("/webhooks/docusign", data=body, headers=both)
    stranger = client.post("/webhooks/docusign", data=body, headers=signed_headers(body, "x"))
    unsigned = client.post("/webhooks/docusign", data=body)

    assert (by_new.status_code, by_new.json["status"]) == (200, "queued")
    assert (by_old.status_code, by_old.json["status"]) == (200, "duplicate")
    assert stranger.status_code == unsigned.status_code == 401
    assert "X-DocuSign-Signature" in stranger.json["error"]


XXE = b"""<?xml version="1.0" encoding="utf-8"?>
<!DOCTYPE DocuSignEnvelopeInformation [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<DocuSignEnvelopeInformation xmlns="http://www.docusign.net/API/3.0"><EnvelopeStatus>
<EnvelopeID>&secret;</EnvelopeID><Status>Completed</Status></EnvelopeStatus>
</DocuSignEnvelopeInformation>"""
LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<DocuSignEnvelopeInformation>&lol3;</DocuSignEnvelopeInformation>"""


@pytest.mark.parametrize("body", [XXE, LAUGHS], ids=["external-entity", "billion-laughs"])
def test_xml_with_entities_is_refused(clean, client, body):
    answer = client.post(
        "/webhooks/docusign", data=body, headers=signed_headers(body, KEY, xml=True)
    )

    assert answer.status_code == 400
    assert answer.json["error"] == (
        "The XML body declares a DTD or entities, which DocuSign never sends; it was refused."
    )
    assert docusign_events() == [] and queued_job_ids() == []


def test_a_body_over_the_limit_is_413(clean, client, monkeypatch, tmp_path):
    use_contracts(
        monkeypatch, tmp_path, lambda c: c["contracts"]["docusign"].update(connect_max_bytes=100)
    )
    body = (FIXTURES / "docusign" / "envelope_declined.json").read_bytes()
    answer = client.post("/webhooks/docusign", data=body, headers=signed_headers(body, KEY))

    assert answer.status_code == 413


def test_a_9_mb_message_is_accepted_and_kept_out_of_the_history(contracts, client, sandbox):
    deal_id, envelope_id = sent_envelope(sandbox)
    sandbox.docusign_act(envelope_id, "sign")
    message = json.loads((FIXTURES / "docusign" / "envelope_completed.json").read_text())
    summary = message["data"]["envelopeSummary"]
    real = sandbox.state()["docusign"]["envelopes"][0]
    summary["envelopeId"] = message["data"]["envelopeId"] = envelope_id
    summary["customFields"] = real["customFields"]
    summary["statusChangedDateTime"] = real["statusChangedDateTime"]
    pdf = build_pdf([f"Signed page line {n:07d} " + "x" * 60 for n in range(105_000)])
    summary["envelopeDocuments"][0]["PDFBytes"] = base64.b64encode(pdf).decode()
    body = json.dumps(message, ensure_ascii=False).encode()
    assert 9_000_000 < len(body) < 25 * 1024 * 1024

    answer = client.post("/webhooks/docusign", data=body, headers=signed_headers(body, KEY))
    job_ids = queued_job_ids()
    run_worker()
    history = client.get(
        f"/api/events/{answer.json['event_id']}",
        headers={"Authorization": "Bearer admin-test-token"},
    )

    assert answer.status_code == 200 and answer.json["status"] == "queued"
    assert job_ids == [answer.json["event_id"]]  # the job carries the id, not the body
    assert history.json["status"] == "succeeded"
    assert len(history.data) < 20_000 and b"JVBERi0" not in history.data
    [attached] = files_of(sandbox, deal_id)
    assert attached["file_size"] == len(pdf)
    assert pdf_text(pdf)[0].startswith("Signed page line")


# -- polling ----------------------------------------------------------------------------


def docusign_gets(sandbox, envelope_id: str) -> int:
    return sum(
        1
        for call in sandbox.state()["calls"]
        if call["method"] == "GET" and call["path"].endswith(f"/envelopes/{envelope_id}")
    )


def test_polling_waits_for_silence_and_asks_at_most_every_15_minutes(contracts, sandbox):
    from flows.contract import poll_envelopes

    deal_id, envelope_id = sent_envelope(sandbox)
    sent_at = row(envelope_id).sent_at
    start = sent_at + timedelta(hours=6, minutes=1)  # poll_after is 6 hours

    assert poll_envelopes(now=sent_at + timedelta(hours=5)) == 0
    assert poll_envelopes(now=start) == 1
    assert poll_envelopes(now=start + timedelta(minutes=14)) == 0
    assert docusign_gets(sandbox, envelope_id) == 1
    assert poll_envelopes(now=start + timedelta(minutes=16)) == 1
    assert docusign_gets(sandbox, envelope_id) == 2
    assert docusign_events() == []  # still only sent: nothing to act on

    sandbox.docusign_act(envelope_id, "sign")  # Connect is not configured: no message comes
    assert poll_envelopes(now=start + timedelta(minutes=32)) == 1
    run_worker()

    [event] = docusign_events()
    assert (event.type, event.status) == ("envelope.completed", "succeeded")
    assert deal_of(sandbox, deal_id)["status"] == "won"
    assert files_of(sandbox, deal_id)[0]["name"].endswith(f"{envelope_id}.pdf")
    assert poll_envelopes(now=utcnow() + timedelta(days=1)) == 0  # completed: never again
