"""The lead flow end to end: webhook, store, queue, worker, emulated Pipedrive and Gmail."""

import email
from email import policy

import pytest
from sqlalchemy import select

from core.store import Event, session
from tests.conftest import (
    as_bytes,
    form_headers,
    load_fixture,
    run_worker,
    typeform_headers,
)

NINO_EXISTING_PERSON = 1842
LUKA, MARIAM, DAVIT_INACTIVE = 21458877, 21458878, 21458879


def post_typeform(client, payload) -> dict:
    body = as_bytes(payload)
    answer = client.post("/webhooks/typeform", data=body, headers=typeform_headers(body))
    assert answer.status_code == 200, answer.json
    return answer.json


def post_form(client, payload) -> dict:
    body = as_bytes(payload)
    answer = client.post("/webhooks/form", data=body, headers=form_headers(body))
    assert answer.status_code == 200, answer.json
    return answer.json


def pipedrive(sandbox) -> dict:
    return sandbox.state()["pipedrive"]


def messages(sandbox) -> list[dict]:
    return sandbox.state()["google"]["gmail"]["messages"]


def event_status(event_id: str) -> tuple[str, str | None]:
    with session() as db:
        event = db.get(Event, event_id)
        return event.status, event.reason


def test_existing_person_gets_a_deal_a_note_and_a_welcome(client, sandbox) -> None:
    persons_before = len(pipedrive(sandbox)["persons"])
    accepted = post_typeform(client, load_fixture("typeform/form_response.json"))
    assert run_worker() == 1

    assert event_status(accepted["event_id"]) == ("succeeded", None)
    state = pipedrive(sandbox)
    # Nino exists (the fixture's person 1842, her address in another case): reused, owner kept.
    assert len(state["persons"]) == persons_before
    [deal] = state["deals"]
    assert deal["person_id"] == NINO_EXISTING_PERSON and deal["owner_id"] == LUKA
    assert deal["org_id"] == 733
    assert deal["title"] == "Nino Beridze — Website design"
    assert deal["value"] == 4500 and deal["currency"] == "EUR"
    assert deal["stage_id"] == 1 and deal["pipeline_id"] == 1
    custom = deal["custom_fields"]
    assert custom["957ae6bdc9c3862390160642fb03f3be22c7a3f6"] == 27  # Lead source: Typeform
    assert custom["95c960c03ed709b681ce08f04359b325c7cdde2e"] == [31, 32]  # Services
    assert custom["849720d93e1e62dfed4e8b6637cda9c9c85375c8"] == "dec_2026_web_redesign"
    [note] = state["notes"]
    assert note["deal_id"] == deal["id"] and "budget: 4500" in note["content"]

    [message] = messages(sandbox)
    parsed = email.message_from_bytes(_raw(message), policy=policy.default)
    assert parsed["To"].addresses[0].addr_spec == "Nino.Beridze+typeform@Example.com"
    assert parsed["Reply-To"] == "luka@tbilisi-digital.example"
    assert parsed["From"].addresses[0].display_name == "Luka Kapanadze"
    assert parsed["Subject"] == "Tbilisi Digital: thank you, Nino Beridze"


def _raw(message: dict) -> bytes:
    import base64

    return base64.urlsafe_b64decode(message["raw"] + "=" * (-len(message["raw"]) % 4))


def test_georgian_name_and_subject_arrive_intact(client, sandbox) -> None:
    post_typeform(client, load_fixture("typeform/form_response_minimal.json"))
    run_worker()

    [person] = [p for p in pipedrive(sandbox)["persons"] if p["name"] == "გიორგი წერეთელი"]
    [message] = messages(sandbox)
    parsed = email.message_from_bytes(_raw(message), policy=policy.default)
    # RFC 2047 on the wire, the original text once decoded.
    assert b"=?utf-8?" in _raw(message)
    assert parsed["Subject"] == "Tbilisi Digital: thank you, გიორგი წერეთელი"
    assert parsed["To"].addresses[0].display_name == "გიორგი წერეთელი"
    text = parsed.get_body(("plain",)).get_content()
    assert "Hello გიორგი წერეთელი," in text
    assert person["owner_id"] in (LUKA, MARIAM)


def test_three_deliveries_make_one_person_one_deal_one_note_one_email(client, sandbox) -> None:
    payload = load_fixture("form/lead.json")
    persons_before = len(pipedrive(sandbox)["persons"])
    results = [post_form(client, payload) for _ in range(3)]
    assert [r["status"] for r in results] == ["queued", "duplicate", "duplicate"]
    run_worker()

    state = pipedrive(sandbox)
    assert len(state["persons"]) == persons_before + 1
    assert len(state["deals"]) == 1 and len(state["notes"]) == 1
    assert len(messages(sandbox)) == 1


def test_replayed_job_does_each_side_effect_once(client, sandbox) -> None:
    from flows.lead_capture import run

    accepted = post_form(client, load_fixture("form/lead.json"))
    run_worker()
    with session() as db:
        db.get(Event, accepted["event_id"]).status = "queued"
    assert run(accepted["event_id"]) == "succeeded"

    state = pipedrive(sandbox)
    assert len(state["deals"]) == 1 and len(state["notes"]) == 1
    assert len(messages(sandbox)) == 1


def test_same_email_different_case_from_two_sources_is_one_person(client, sandbox) -> None:
    typeform = load_fixture("typeform/form_response_minimal.json")
    form = load_fixture("form/lead.json")
    typeform_email = next(a for a in typeform["form_response"]["answers"] if a["type"] == "email")
    form["fields"]["email"] = typeform_email["email"].upper()
    persons_before = len(pipedrive(sandbox)["persons"])

    post_typeform(client, typeform)
    post_form(client, form)
    run_worker()

    state = pipedrive(sandbox)
    assert len(state["persons"]) == persons_before + 1
    assert len(state["deals"]) == 2
    assert len({deal["person_id"] for deal in state["deals"]}) == 1


def test_same_phone_written_four_ways_is_one_person(client, sandbox) -> None:
    persons_before = len(pipedrive(sandbox)["persons"])
    for index, phone in enumerate(
        ["+995 577 11 22 33", "577112233", "(577) 11-22-33", "00995577112233"]
    ):
        form = load_fixture("form/lead.json")
        form["submission_id"] = f"phone-{index}"
        form["fields"]["email"] = f"lead{index}@example.ge"
        form["fields"]["phone"] = phone
        post_form(client, form)
        run_worker()

    state = pipedrive(sandbox)
    assert len(state["persons"]) == persons_before + 1
    assert len({deal["person_id"] for deal in state["deals"]}) == 1


def test_plus_tag_is_a_different_address(client, sandbox) -> None:
    form = load_fixture("form/lead.json")
    form["fields"]["email"] = "nino.beridze+other@example.com"
    form["fields"]["phone"] = ""
    persons_before = len(pipedrive(sandbox)["persons"])
    post_form(client, form)
    run_worker()
    assert len(pipedrive(sandbox)["persons"]) == persons_before + 1


def test_round_robin_skips_the_inactive_rep_and_keeps_turns(client, sandbox) -> None:
    owners = []
    for index in range(4):
        form = load_fixture("form/lead.json")
        form["submission_id"] = f"rr-{index}"
        form["fields"].update(email=f"rr{index}@example.org", phone="", company="")
        post_form(client, form)
        run_worker()
    for deal in pipedrive(sandbox)["deals"]:
        owners.append(deal["owner_id"])
    assert owners == [LUKA, MARIAM, LUKA, MARIAM]
    assert DAVIT_INACTIVE not in owners


def test_new_company_becomes_an_organization_once(client, sandbox) -> None:
    orgs_before = len(pipedrive(sandbox)["organizations"])
    for index in range(2):
        form = load_fixture("form/lead.json")
        form["submission_id"] = f"org-{index}"
        form["fields"].update(email=f"team{index}@kovac.example", phone="")
        post_form(client, form)
        run_worker()
    state = pipedrive(sandbox)
    assert len(state["organizations"]) == orgs_before + 1
    org_id = state["organizations"][-1]["id"]
    assert {deal["org_id"] for deal in state["deals"]} == {org_id}


def test_transient_pipedrive_errors_are_retried_from_the_reset_header(client, sandbox) -> None:
    sandbox.fault(vendor="pipedrive", kind="429", count=2, reset_s=0)
    sandbox.fault(vendor="pipedrive", kind="502", count=1, path="/api/v2/deals")
    accepted = post_form(client, load_fixture("form/lead.json"))
    run_worker()

    assert event_status(accepted["event_id"]) == ("succeeded", None)
    assert len(pipedrive(sandbox)["deals"]) == 1
    calls = sandbox.state()["calls"]
    assert sum(1 for c in calls if c["status"] == 429) == 2
    assert sum(1 for c in calls if c["status"] == 502) == 1


def test_bad_token_fails_the_run_with_the_vendor_reason(client, sandbox, monkeypatch) -> None:
    from connectors import registry

    monkeypatch.setenv("PIPEDRIVE_API_TOKEN", "wrong-token")
    registry.reset()
    accepted = post_form(client, load_fixture("form/lead.json"))
    run_worker()

    status, reason = event_status(accepted["event_id"])
    assert status == "failed"
    assert "401" in reason
    assert pipedrive(sandbox)["deals"] == [] and messages(sandbox) == []


def test_run_history_shows_steps_and_masks_personal_data(client, sandbox) -> None:
    accepted = post_form(client, load_fixture("form/lead.json"))
    run_worker()
    headers = {"Authorization": "Bearer admin-test-token"}
    answer = client.get(f"/api/events/{accepted['event_id']}", headers=headers)

    assert answer.status_code == 200
    body = answer.json
    assert body["status"] == "succeeded" and body["source"] == "form"
    [run] = body["runs"]
    assert run["flow"] == "lead_capture" and run["attempts"] == 1
    assert [s["name"] for s in run["steps"]] == [
        "find_person",
        "assign_owner",
        "create_person",
        "create_deal",
        "add_note",
        "send_welcome_email",
    ]
    assign = run["steps"][1]["output"]
    assert assign["strategy"] == "round_robin" and assign["pool"] == "everyone"
    assert run["steps"][-1]["output"]["speed_to_lead_ms"] >= 0
    assert all(s["status"] == "succeeded" and s["finished_at"] for s in run["steps"])
    text = answer.get_data(as_text=True)
    assert "ana.kovac@example.hr" not in text and "Ana Kovač" not in text
    assert body["data"]["lead"]["email"] == "a***@example.hr"

    assert client.get(f"/api/events/{accepted['event_id']}").status_code == 401
    listing = client.get("/api/events?source=form", headers=headers).json["events"]
    assert [e["id"] for e in listing] == [accepted["event_id"]]


def test_stranded_event_is_requeued_by_the_sweep(client, sandbox, monkeypatch) -> None:
    from datetime import timedelta

    from core import queue, recovery

    accepted = post_form(client, load_fixture("form/lead.json"))
    queue.connection().flushdb()  # Redis lost the job
    monkeypatch.setattr(recovery, "ENQUEUE_GRACE", timedelta(seconds=-1))
    assert recovery.requeue_stranded() == 1
    assert recovery.requeue_stranded() == 0  # the job is queued now: not twice
    run_worker()
    assert event_status(accepted["event_id"])[0] == "succeeded"
    assert len(messages(sandbox)) == 1
    with session() as db:
        assert db.scalars(select(Event.status)).all() == ["succeeded"]


def test_run_whose_worker_died_is_run_again_once(client, sandbox, monkeypatch) -> None:
    from datetime import timedelta

    from rq.job import Job

    from core import queue, recovery
    from core.store import utcnow

    accepted = post_form(client, load_fixture("form/lead.json"))
    event_id = accepted["event_id"]
    # A work-horse killed mid-run: the event stays running, RQ files the job as failed.
    job = Job.fetch(event_id, connection=queue.connection())
    queue.queue().remove(job)
    job.set_status("failed")
    with session() as db:
        event = db.get(Event, event_id)
        event.status = "running"
    assert recovery.requeue_stranded() == 0  # still young: its worker may be alive

    monkeypatch.setattr(recovery, "RUNNING_GRACE", timedelta(seconds=-1))
    with session() as db:
        db.get(Event, event_id).updated_at = utcnow() - timedelta(hours=1)
    assert recovery.requeue_stranded() == 1
    run_worker()
    assert event_status(event_id)[0] == "succeeded"
    assert len(pipedrive(sandbox)["deals"]) == 1 and len(messages(sandbox)) == 1


@pytest.mark.parametrize(
    "path",
    ["/api/v2/persons$", "/api/v2/organizations$", "/api/v2/deals$", "/v1/notes$"],
)
def test_a_write_whose_answer_is_lost_is_done_once(client, sandbox, monkeypatch, path) -> None:
    from connectors import registry

    # The emulator does the write, then holds the answer past the client's timeout.
    monkeypatch.setenv("PIPEDRIVE_TIMEOUT_S", "0.5")
    registry.reset()
    sandbox.fault(vendor="pipedrive", kind="timeout", path=path, count=1, delay_ms=1500)
    form = load_fixture("form/lead.json")
    accepted = post_form(client, form)
    run_worker()

    assert event_status(accepted["event_id"]) == ("succeeded", None)
    state = pipedrive(sandbox)
    emails = [e["value"] for p in state["persons"] for e in p.get("emails") or []]
    assert emails.count(form["fields"]["email"]) == 1
    assert [o["name"] for o in state["organizations"]].count(form["fields"]["company"]) == 1
    assert len(state["deals"]) == 1 and len(state["notes"]) == 1


def test_a_sent_email_whose_answer_is_lost_is_sent_once(client, sandbox, monkeypatch) -> None:
    from connectors import registry

    monkeypatch.setenv("GOOGLE_TIMEOUT_S", "0.5")
    registry.reset()
    sandbox.fault(vendor="google", kind="timeout", path="messages/send", count=1, delay_ms=1500)
    accepted = post_form(client, load_fixture("form/lead.json"))
    run_worker()
    assert event_status(accepted["event_id"]) == ("succeeded", None)
    assert len(messages(sandbox)) == 1


def test_a_worker_dying_before_its_deal_is_marked_done_writes_nothing_twice(
    client, sandbox, monkeypatch
) -> None:
    from datetime import timedelta

    from core import runs
    from core.store import SideEffect, utcnow
    from flows import lead_capture

    accepted = post_form(client, load_fixture("form/lead.json"))
    event_id = accepted["event_id"]
    note_step = runs.RunContext._note_step

    def die_after_the_deal(self, name, *args, **kwargs):
        # The deal exists at the vendor; the process dies before anything more is saved.
        if name == "create_deal":
            raise SystemExit("killed")
        return note_step(self, name, *args, **kwargs)

    monkeypatch.setattr(runs.RunContext, "_note_step", die_after_the_deal)
    with pytest.raises(SystemExit):
        lead_capture.run(event_id)
    monkeypatch.setattr(runs.RunContext, "_note_step", note_step)
    with session() as db:
        pending = [e for e in db.query(SideEffect) if e.key.startswith("deal:")]
        assert [e.status for e in pending] == ["pending"]
        pending[0].created_at = utcnow() - timedelta(hours=1)
    assert len(pipedrive(sandbox)["deals"]) == 1

    assert lead_capture.run(event_id) == "succeeded"
    state = pipedrive(sandbox)
    assert len(state["deals"]) == 1 and len(state["notes"]) == 1
    assert len(messages(sandbox)) == 1
