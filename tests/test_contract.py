"""Sending contracts: a deal enters the proposal stage, one envelope goes out through DocuSign."""

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from babel.dates import format_date
from sqlalchemy import select
from werkzeug.serving import make_server

from core.store import ContractEnvelope, Event, FlowRun, session
from sandbox.docusign import SERVICE_TEMPLATE_ID
from sandbox.google_docs import PROPOSAL_TEMPLATE_ID
from tests.conftest import ROOT, run_worker
from tests.test_follow_up import (
    LUKA,
    NEEDS_DEFINED,
    NINO,
    PROPOSAL_MADE,
    api,
    delivered,
    pd,
    subscribe,
)

PAID_SOCIAL = 33  # the "Services" option the Google Docs contract is for
SERVICES = "95c960c03ed709b681ce08f04359b325c7cdde2e"
UTM_CAMPAIGN = "849720d93e1e62dfed4e8b6637cda9c9c85375c8"


def serve(app: Any) -> Iterator[str]:
    """The app served over HTTP, so the sandbox can deliver webhooks to it."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=5)


@pytest.fixture
def web(app: Any) -> Iterator[str]:
    """The base URL of the served app."""
    yield from serve(app)


def use_contracts(monkeypatch, tmp_path: Path, change: Any = None) -> dict[str, Any]:
    """config.yaml with one trigger that sends the contract, changed by `change`."""
    from connectors import registry

    config = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    config["follow_up"] = {
        "triggers": [
            {
                "name": "proposal made",
                "pipeline": "Sales",
                "stage": "Proposal made",
                "actions": [{"send_contract": True}],
            }
        ]
    }
    if change is not None:
        change(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    monkeypatch.setenv("CONFIG_PATH", str(path))
    registry.reset()
    return config


@pytest.fixture
def contracts(clean, monkeypatch, tmp_path) -> None:
    use_contracts(monkeypatch, tmp_path)


def new_deal(sandbox, **fields: Any) -> int:
    body = {"title": "Nino Beridze — Website design", "owner_id": LUKA, "person_id": NINO}
    body |= {"org_id": 733, "stage_id": NEEDS_DEFINED, "value": 4800, "currency": "EUR"}
    body = {key: value for key, value in (body | fields).items() if value is not None}
    answer = pd(sandbox).post(api(sandbox, "/api/v2/deals"), json=body, timeout=5)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]["id"]


def envelopes(sandbox) -> list[dict[str, Any]]:
    return sandbox.state()["docusign"]["envelopes"]


def notes(sandbox, deal_id: int) -> list[dict[str, Any]]:
    return [n for n in sandbox.state()["pipedrive"]["notes"] if n["deal_id"] == deal_id]


def rows() -> list[ContractEnvelope]:
    with session() as db:
        return list(db.scalars(select(ContractEnvelope).order_by(ContractEnvelope.id)))


def enter_proposal(sandbox, web: str, deal_id: int, deliveries: int = 1) -> None:
    sandbox.pipedrive_change_deal(deal_id, stage_id=PROPOSAL_MADE)
    delivered(sandbox, deliveries)
    run_worker()


def pipedrive_event() -> Event:
    with session() as db:
        return db.scalars(
            select(Event).where(Event.source == "pipedrive").order_by(Event.received_at.desc())
        ).first()


def step_outputs(event_id: str) -> dict[str, Any]:
    with session() as db:
        run = db.scalar(select(FlowRun).where(FlowRun.event_id == event_id))
        return {s.name: s.output for s in run.steps}


# -- the two document paths -------------------------------------------------------------


def test_a_template_contract_is_filled_in_the_clients_locale(contracts, web, sandbox):
    deal_id = new_deal(sandbox)
    subscribe(sandbox, web)
    enter_proposal(sandbox, web, deal_id)

    event = pipedrive_event()
    assert (event.status, event.reason) == ("succeeded", None)
    [envelope] = envelopes(sandbox)
    assert envelope["status"] == "sent"
    assert envelope["templates"][0]["templateId"] == SERVICE_TEMPLATE_ID
    assert envelope["emailSubject"] == "Please DocuSign: Service agreement — " + (
        "Nino Beridze — Website design"
    )
    signer, copy = envelope["recipients"]
    assert (signer["roleName"], signer["name"], signer["email"]) == (
        "Client",
        "Nino Beridze",
        "nino@example.com",
    )
    values = {tab["tabLabel"]: tab.get("value") for tab in signer["tabs"]["textTabs"]}
    # Nino's phone is Georgian (+995): amounts and dates are written as in ka_GE.
    today = event.received_at.date()
    assert values == {
        "client_name": "Nino Beridze",
        "client_company": "შპს „ბერიძე დიზაინი“",
        "amount": "4\xa0800,00\xa0€",
        "start_date": format_date(today, "long", locale="ka_GE"),
    }
    assert (copy["roleName"], copy["email"]) == ("Sales rep", "luka@tbilisi-digital.example")
    fields = {f["name"]: f["value"] for f in envelope["customFields"]["textCustomFields"]}
    [row] = rows()
    assert fields == {"pipedrive_deal_id": str(deal_id), "idempotency_key": row.key}
    assert (row.envelope_id, row.status, row.deal_id) == (envelope["envelopeId"], "sent", deal_id)
    [note] = notes(sandbox, deal_id)
    assert envelope["envelopeId"] in note["content"] and "sent" in note["content"]


def test_a_google_doc_contract_is_copied_filled_exported_and_anchored(contracts, web, sandbox):
    deal_id = new_deal(sandbox, custom_fields={SERVICES: [PAID_SOCIAL]}, value=1250.5)
    subscribe(sandbox, web)
    enter_proposal(sandbox, web, deal_id)

    assert pipedrive_event().status == "succeeded", pipedrive_event().reason
    [envelope] = envelopes(sandbox)
    assert envelope["templates"] == []
    [document] = envelope["documents"]
    assert document["name"] == f"Proposal {deal_id} - შპს „ბერიძე დიზაინი“.pdf"
    lines = document["text"]
    assert lines[:3] == [
        "Proposal for შპს „ბერიძე დიზაინი“",
        "Prepared for Nino Beridze",
        "Total: 1\xa0250,50\xa0€",
    ]
    assert "Client signature: /sig1/" in lines
    signer, copy = envelope["recipients"]
    assert signer["tabs"]["signHereTabs"][0]["anchorString"] == "/sig1/"
    assert (copy["kind"], copy["email"]) == ("carbonCopies", "luka@tbilisi-digital.example")
    # The filled copy was deleted once exported: only the template is left in Drive.
    files = sandbox.state()["google"]["drive"]["files"]
    assert [f["id"] for f in files] == [PROPOSAL_TEMPLATE_ID]


# -- one envelope per proposal ----------------------------------------------------------


def test_a_replayed_job_sends_no_second_envelope(contracts, web, sandbox):
    from flows.follow_up import run

    deal_id = new_deal(sandbox)
    subscribe(sandbox, web)
    enter_proposal(sandbox, web, deal_id)
    event = pipedrive_event()
    with session() as db:
        db.get(Event, event.id).status = "queued"
    assert run(event.id) == "succeeded"

    assert len(envelopes(sandbox)) == 1
    assert len(notes(sandbox, deal_id)) == 1


def test_a_create_whose_answer_times_out_is_found_not_repeated(
    clean, monkeypatch, tmp_path, web, sandbox
):
    use_contracts(
        monkeypatch,
        tmp_path,
        lambda c: c["contracts"]["docusign"].update(timeout_s=1),
    )
    deal_id = new_deal(sandbox)
    subscribe(sandbox, web)
    # The sandbox makes the envelope, then holds the answer past the client's timeout.
    sandbox.fault(
        vendor="docusign", method="POST", path=r"/envelopes$", kind="timeout", delay_ms=2500
    )
    enter_proposal(sandbox, web, deal_id)

    assert pipedrive_event().status == "succeeded", pipedrive_event().reason
    [envelope] = envelopes(sandbox)
    [row] = rows()
    assert row.envelope_id == envelope["envelopeId"]
    calls = [c for c in sandbox.state()["calls"] if c["vendor"] == "docusign"]
    assert [c["method"] for c in calls if c["path"].endswith("/envelopes")] == ["POST", "GET"]


def test_entering_the_stage_again_within_the_window_sends_nothing(contracts, web, sandbox):
    deal_id = new_deal(sandbox)
    subscribe(sandbox, web)
    enter_proposal(sandbox, web, deal_id)
    sandbox.pipedrive_change_deal(deal_id, stage_id=NEEDS_DEFINED)
    delivered(sandbox, 2)
    time.sleep(1.1)  # a new stage_change_time, so a new stage entry
    enter_proposal(sandbox, web, deal_id, deliveries=3)

    second = pipedrive_event()
    [output] = [o for name, o in step_outputs(second.id).items() if "send_contract" in name]
    assert output["skipped"] == "an envelope for this contract went out within 30 days"
    assert len(envelopes(sandbox)) == 1
    assert output["envelope_id"] == envelopes(sandbox)[0]["envelopeId"]


# -- missing data fails before anything is sent ------------------------------------------


def test_a_person_without_email_fails_with_a_sentence(contracts, web, sandbox):
    person = pd(sandbox).post(
        api(sandbox, "/api/v2/persons"), json={"name": "Giorgi Maisuradze"}, timeout=5
    )
    deal_id = new_deal(sandbox, person_id=person.json()["data"]["id"])
    subscribe(sandbox, web)
    enter_proposal(sandbox, web, deal_id)

    event = pipedrive_event()
    assert event.status == "failed"
    assert "the deal's person has no email address" in event.reason
    assert envelopes(sandbox) == [] and rows() == []


def test_a_role_mismatch_and_an_empty_tab_are_named(clean, monkeypatch, tmp_path, sandbox):
    from flows.contract import send_now

    def change(config: dict[str, Any]) -> None:
        template = config["contracts"]["documents"][1]["template"]
        template["signer_role"] = "Klient"
        template["tabs"]["amount"] = "{{ fields.Budget | money }}"

    use_contracts(monkeypatch, tmp_path, change)
    deal_id = new_deal(sandbox)
    outcome = send_now(deal_id)

    assert outcome["status"] == "failed"
    reason = outcome["reason"]
    assert f"contract 'Service agreement' for deal {deal_id} was not sent" in reason
    assert "has no signer role 'Klient' (its roles: Client, Sales rep)" in reason
    assert "tab 'amount' has no value ({{ fields.Budget | money }})" in reason
    assert envelopes(sandbox) == []


def test_a_google_doc_placeholder_without_a_value_is_named(clean, monkeypatch, tmp_path, sandbox):
    from flows.contract import send_now

    use_contracts(
        monkeypatch,
        tmp_path,
        lambda c: c["contracts"]["documents"][0]["google_doc"]["placeholders"].pop("start_date"),
    )
    deal_id = new_deal(sandbox, custom_fields={SERVICES: [PAID_SOCIAL]})
    outcome = send_now(deal_id)

    assert outcome["status"] == "failed"
    assert "placeholder {{start_date}} has no value in config.yaml" in outcome["reason"]
    assert envelopes(sandbox) == []
    assert len(sandbox.state()["google"]["drive"]["files"]) == 1


# -- the operator's command and the deal field ------------------------------------------


def test_send_contract_command_and_the_envelope_field(clean, monkeypatch, tmp_path, sandbox):
    from app import create_app

    use_contracts(
        monkeypatch, tmp_path, lambda c: c["contracts"].update(envelope_field="UTM campaign")
    )
    deal_id = new_deal(sandbox)
    runner = create_app().test_cli_runner()
    first = runner.invoke(args=["send-contract", str(deal_id)])
    second = runner.invoke(args=["send-contract", str(deal_id)])

    [envelope] = envelopes(sandbox)
    assert first.exit_code == 0, first.output
    assert f"envelope {envelope['envelopeId']} sent" in first.output
    assert "not sent: an envelope for this contract went out within 30 days" in second.output
    deal = pd(sandbox).get(api(sandbox, f"/api/v2/deals/{deal_id}"), timeout=5).json()["data"]
    assert deal["custom_fields"][UTM_CAMPAIGN] == envelope["envelopeId"]
