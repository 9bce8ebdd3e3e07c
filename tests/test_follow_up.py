"""Stage triggers end to end: the sandbox's webhooks reach a served app, the worker acts."""

import base64
import email
import sys
import threading
import time
from collections.abc import Iterator
from datetime import date
from email import policy
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import requests
import yaml
from sqlalchemy import select

from core.store import Event, FlowRun, SideEffect, session
from tests.conftest import ROOT, SECRETS, run_worker

LUKA, ADMIN, NINO = 21458877, 21458870, 1842
CONTACT_MADE, NEEDS_DEFINED, PROPOSAL_MADE = 2, 3, 4
LUKA_CALENDAR = "luka@tbilisi-digital.example"


@pytest.fixture
def live_app(app) -> Iterator[str]:
    """The app served over HTTP, so the sandbox can deliver webhooks to it."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=5)


def pd(sandbox) -> requests.Session:
    http = requests.Session()
    http.headers["x-api-token"] = sandbox.env()["PIPEDRIVE_API_TOKEN"]
    return http


def api(sandbox, path: str) -> str:
    return sandbox.env()["PIPEDRIVE_BASE_URL"] + path


def subscribe(sandbox, url: str, action: str = "change", version: str = "2.0") -> None:
    body = {
        "subscription_url": f"{url}/webhooks/pipedrive",
        "event_action": action,
        "event_object": "deal",
        "version": version,
        "name": f"test {action} {version}",
        "http_auth_user": SECRETS["PIPEDRIVE_WEBHOOK_USER"],
        "http_auth_password": SECRETS["PIPEDRIVE_WEBHOOK_PASSWORD"],
    }
    answer = pd(sandbox).post(api(sandbox, "/v1/webhooks"), json=body, timeout=5)
    assert answer.status_code == 201, answer.text


def new_deal(sandbox, stage_id: int = NEEDS_DEFINED) -> int:
    body = {"title": "Nino Beridze — Website design", "owner_id": LUKA, "person_id": NINO}
    body |= {"org_id": 733, "stage_id": stage_id, "value": 4500}
    answer = pd(sandbox).post(api(sandbox, "/api/v2/deals"), json=body, timeout=5)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]["id"]


def delivered(sandbox, count: int) -> list[dict[str, Any]]:
    """Wait until `count` deliveries were answered; every one must have been a 200."""
    deadline = time.monotonic() + 10
    while True:
        found = sandbox.pipedrive_deliveries()
        if len(found) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(found) == count, found
    assert [d["status_code"] for d in found] == [200] * count
    return found


def state(sandbox) -> dict[str, Any]:
    return sandbox.state()


def activities(sandbox, deal_id: int) -> list[dict[str, Any]]:
    return [a for a in state(sandbox)["pipedrive"]["activities"] if a["deal_id"] == deal_id]


def emails(sandbox) -> list[email.message.EmailMessage]:
    messages = state(sandbox)["google"]["gmail"]["messages"]
    return [
        email.message_from_bytes(
            base64.urlsafe_b64decode(m["raw"] + "=" * (-len(m["raw"]) % 4)),
            policy=policy.default,
        )
        for m in messages
    ]


def calendar(sandbox, owner: str = LUKA_CALENDAR) -> list[dict[str, Any]]:
    return state(sandbox)["google"]["calendar"]["events"].get(owner, [])


def pipedrive_events() -> list[Event]:
    with session() as db:
        return list(db.scalars(select(Event).where(Event.source == "pipedrive")))


def steps(event_id: str) -> dict[str, dict[str, Any]]:
    with session() as db:
        run = db.scalar(select(FlowRun).where(FlowRun.event_id == event_id))
        return {s.name: {"status": s.status, "output": s.output} for s in run.steps}


def use_follow_up(monkeypatch, tmp_path: Path, triggers: list[dict[str, Any]]) -> None:
    """Run with config.yaml, its follow_up triggers replaced."""
    from connectors import registry

    config = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))
    config["follow_up"] = {"triggers": triggers}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    monkeypatch.setenv("CONFIG_PATH", str(path))
    registry.reset()


def replay(event_id: str) -> str:
    from flows.follow_up import run

    with session() as db:
        db.get(Event, event_id).status = "queued"
    return run(event_id)


# -- the shipped config: a deal enters "Proposal made" -----------------------------------


def test_entering_a_stage_sends_the_email_the_activity_and_the_reminder(live_app, sandbox):
    from flows.follow_up import add_business_days, calendar_event_id

    deal_id = new_deal(sandbox)
    subscribe(sandbox, live_app)
    sandbox.pipedrive_change_deal(deal_id, stage_id=PROPOSAL_MADE)
    delivered(sandbox, 1)
    assert run_worker() == 1

    [event] = pipedrive_events()
    assert (event.status, event.reason) == ("succeeded", None)
    [message] = emails(sandbox)
    assert message["To"].addresses[0].addr_spec == "nino@example.com"  # the primary address
    assert message["From"].addresses[0].display_name == "Luka Kapanadze"
    assert message["Reply-To"] == "luka@tbilisi-digital.example"
    assert message["Subject"] == "Tbilisi Digital: your proposal"
    assert message["Message-ID"].strip().startswith("<follow-up.")
    assert "Hello Nino," in message.get_body(("plain",)).get_content()

    tbilisi = ZoneInfo("Asia/Tbilisi")
    arrived = event.received_at.replace(tzinfo=ZoneInfo("UTC")).astimezone(tbilisi).date()
    [activity] = activities(sandbox, deal_id)
    assert (activity["type"], activity["owner_id"]) == ("call", LUKA)
    assert activity["subject"] == "Call Nino about the proposal"
    # 10:00 in Tbilisi (UTC+4) is 06:00 UTC, which is how Pipedrive keeps due_time.
    assert activity["due_date"] == add_business_days(arrived, 2).isoformat()
    assert activity["due_time"] == "06:00"
    assert activity["participants"] == [{"person_id": NINO, "primary": True}]

    [reminder] = calendar(sandbox)
    key = next(k for k in side_effect_keys() if k.endswith(reminder_key_suffix(event)))
    assert reminder["id"] == calendar_event_id(key)
    assert set(reminder["id"]) <= set("0123456789abcdefghijklmnopqrstuv")
    day = add_business_days(arrived, 3).isoformat()
    assert reminder["start"] == {"dateTime": f"{day}T10:00:00+04:00", "timeZone": "Asia/Tbilisi"}
    assert reminder["summary"] == "Proposal follow-up: Nino Beridze — Website design"

    # The fourth action enrols the deal's person in the nurture sequence; its first step
    # waits on RQ's schedule (a burst worker runs no scheduler), so no second email yet.
    started = steps(event.id)["start_sequence 4: proposal made"]
    assert started["status"] == "succeeded"
    assert started["output"]["status"] == "enrolled"
    assert started["output"]["sequence"] == "proposal_nurture"


def side_effect_keys() -> list[str]:
    with session() as db:
        return list(db.scalars(select(SideEffect.key)))


def reminder_key_suffix(event: Event) -> str:
    # The third action of the first trigger, keyed by the moment the deal entered the stage.
    from datetime import datetime

    moment = datetime.fromisoformat(
        event.data["current"]["stage_change_time"].replace("Z", "+00:00")
    )
    return f":2:{int(moment.timestamp())}"


def test_a_replay_and_a_lost_answer_do_nothing_twice(live_app, sandbox):
    deal_id = new_deal(sandbox)
    subscribe(sandbox, live_app)
    sandbox.pipedrive_change_deal(deal_id, stage_id=PROPOSAL_MADE)
    delivered(sandbox, 1)
    run_worker()
    [event] = pipedrive_events()

    assert replay(event.id) == "succeeded"
    # As if each call reached the vendor and the worker died before recording it: the
    # recover lookups (Message-ID, the activity's marker, the event id) must find them.
    with session() as db:
        for effect in db.scalars(select(SideEffect)):
            effect.status, effect.created_at = "pending", effect.created_at.replace(year=2020)
    assert replay(event.id) == "succeeded"

    assert len(emails(sandbox)) == 1
    assert len(activities(sandbox, deal_id)) == 1
    assert len(calendar(sandbox)) == 1


def test_a_calendar_insert_that_gets_409_is_done(environment, clean, sandbox):
    from connectors import registry
    from flows.follow_up import calendar_event_id

    body = {
        "id": calendar_event_id("follow_up:test"),
        "summary": "Call back",
        "start": {"dateTime": "2026-12-07T10:00:00+04:00", "timeZone": "Asia/Tbilisi"},
        "end": {"dateTime": "2026-12-07T10:30:00+04:00", "timeZone": "Asia/Tbilisi"},
    }
    first = registry.calendar().insert_event(LUKA_CALENDAR, body)
    again = registry.calendar().insert_event(LUKA_CALENDAR, body)

    assert first["id"] == again["id"] == body["id"]
    assert len(calendar(sandbox)) == 1


def proposal_then(sandbox, live_app, **change: Any) -> tuple[int, Event, Event]:
    """A deal enters "Proposal made" (the sequence starts), then changes again."""
    deal_id = new_deal(sandbox)
    subscribe(sandbox, live_app)
    sandbox.pipedrive_change_deal(deal_id, stage_id=PROPOSAL_MADE)
    delivered(sandbox, 1)
    run_worker()
    sandbox.pipedrive_change_deal(deal_id, **change)
    delivered(sandbox, 2)
    run_worker()
    entered, changed = sorted(pipedrive_events(), key=lambda e: e.received_at)
    return deal_id, entered, changed


def test_won_runs_the_won_trigger_and_stops_the_sequence(live_app, sandbox):
    deal_id, entered, won = proposal_then(sandbox, live_app, status="won")

    assert won.status == "succeeded"
    assert steps(won.id)["match_triggers"]["output"] == {"triggers": ["deal won"]}
    welcome = [a for a in activities(sandbox, deal_id) if a["type"] == "task"]
    assert [a["subject"] for a in welcome] == [
        "Send the welcome pack for Nino Beridze — Website design"
    ]
    enrolled = steps(entered.id)["start_sequence 4: proposal made"]["output"]
    stopped = steps(won.id)["stop_sequences 2: deal won"]["output"]
    assert stopped == {"stopped": [enrolled["enrollment_id"]], "reason": "the deal was won"}
    assert enrollment_state(deal_id) == ("stopped", "the deal was won")
    assert len(emails(sandbox)) == 1 and len(calendar(sandbox)) == 1  # the proposal's own


def test_lost_stops_the_sequence_and_does_nothing_else(live_app, sandbox):
    deal_id, _, lost = proposal_then(sandbox, live_app, status="lost", lost_reason="Budget")

    assert lost.status == "succeeded"
    assert steps(lost.id)["match_triggers"]["output"] == {"triggers": ["deal lost"]}
    assert set(steps(lost.id)) == {
        "check_origin", "match_triggers", "load_deal", "stop_sequences 1: deal lost"
    }  # fmt: skip
    assert enrollment_state(deal_id) == ("stopped", "the deal was lost")
    assert [a["type"] for a in activities(sandbox, deal_id)] == ["call"]  # the proposal's own


def enrollment_state(deal_id: int) -> tuple[str, str | None]:
    from core.store import Enrollment

    with session() as db:
        row = db.scalar(select(Enrollment).where(Enrollment.deal_id == deal_id))
        return row.status, row.stop_reason


def test_a_value_edit_in_the_stage_is_ignored(live_app, sandbox):
    deal_id = new_deal(sandbox, stage_id=PROPOSAL_MADE)
    subscribe(sandbox, live_app)
    sandbox.pipedrive_change_deal(deal_id, value=5200)
    delivered(sandbox, 1)

    assert run_worker() == 0
    [event] = pipedrive_events()
    assert event.status == "ignored"


def test_entering_another_stage_fires_nothing(live_app, sandbox):
    deal_id = new_deal(sandbox)
    subscribe(sandbox, live_app)
    sandbox.pipedrive_change_deal(deal_id, stage_id=CONTACT_MADE)
    delivered(sandbox, 1)
    run_worker()

    [event] = pipedrive_events()
    assert steps(event.id)["match_triggers"]["output"] == {"triggers": []}
    assert (event.status, event.reason) == (
        "ignored",
        "no trigger in config.yaml acts on this change",
    )
    assert emails(sandbox) == [] and calendar(sandbox) == []


# -- dedup and loops -------------------------------------------------------------------


def test_two_subscriptions_to_the_same_change_do_the_work_once(live_app, sandbox):
    deal_id = new_deal(sandbox)
    subscribe(sandbox, live_app, "change")
    subscribe(sandbox, live_app, "*")
    sandbox.pipedrive_change_deal(deal_id, stage_id=PROPOSAL_MADE)
    [first, second] = delivered(sandbox, 2)
    assert first["body"]["meta"]["id"] == second["body"]["meta"]["id"]

    assert run_worker() == 1
    [event] = pipedrive_events()
    assert event.deliveries == 2
    assert len(emails(sandbox)) == 1 and len(activities(sandbox, deal_id)) == 1


def test_a_v1_and_a_v2_subscription_share_the_side_effects(live_app, sandbox):
    deal_id = new_deal(sandbox)
    subscribe(sandbox, live_app, "change", "2.0")
    subscribe(sandbox, live_app, "updated", "1.0")
    sandbox.pipedrive_change_deal(deal_id, stage_id=PROPOSAL_MADE)
    delivered(sandbox, 2)

    # Two identities (v1 has no event id), one move: the keys follow the move.
    assert run_worker() == 2
    assert {e.status for e in pipedrive_events()} == {"succeeded"}
    assert len(emails(sandbox)) == 1
    assert len(activities(sandbox, deal_id)) == 1
    assert len(calendar(sandbox)) == 1


def test_our_own_api_change_comes_back_and_triggers_nothing(live_app, sandbox):
    from connectors import registry

    subscribe(sandbox, live_app, "*")
    deal_id = registry.pipedrive().create_deal(
        {"title": "Ours", "owner_id": LUKA, "person_id": NINO, "stage_id": NEEDS_DEFINED}
    )["id"]
    registry.pipedrive().update_deal(deal_id, {"stage_id": PROPOSAL_MADE})
    bodies = [d["body"] for d in delivered(sandbox, 2)]
    assert {b["meta"]["change_source"] for b in bodies} == {"api"}

    assert run_worker() == 2
    for event in pipedrive_events():
        assert (event.status, event.reason) == (
            "ignored",
            "this product made the change through the API: no trigger runs",
        )
        assert steps(event.id)["check_origin"]["output"]["own_change"] is True
        assert "match_triggers" not in steps(event.id)
    assert emails(sandbox) == [] and activities(sandbox, deal_id) == []
    assert calendar(sandbox) == []


def test_the_same_user_in_the_app_still_triggers(live_app, sandbox):
    # The API token's user moving a deal by hand is a person at work, not a loop.
    deal_id = new_deal(sandbox)
    subscribe(sandbox, live_app)
    sandbox.pipedrive_change_deal(deal_id, stage_id=PROPOSAL_MADE, user_id=ADMIN)
    delivered(sandbox, 1)
    run_worker()

    assert len(emails(sandbox)) == 1


# -- configuration and sequences -------------------------------------------------------


def test_a_person_without_email_skips_the_email_only(live_app, sandbox, monkeypatch, tmp_path):
    use_follow_up(
        monkeypatch,
        tmp_path,
        [
            {
                "name": "proposal made",
                "pipeline": "Sales",
                "stage": "Proposal made",
                "actions": [
                    {"email": {"template": "proposal_follow_up", "subject": "Proposal"}},
                    {"activity": {"subject": "Call", "due_in_business_days": 0}},
                ],
            }
        ],
    )
    body = {"name": "Nameless Lead", "owner_id": LUKA}
    person = pd(sandbox).post(api(sandbox, "/api/v2/persons"), json=body, timeout=5).json()
    deal = {"title": "No email", "owner_id": LUKA, "person_id": person["data"]["id"]}
    deal_id = pd(sandbox).post(api(sandbox, "/api/v2/deals"), json=deal, timeout=5).json()
    subscribe(sandbox, live_app)
    sandbox.pipedrive_change_deal(deal_id["data"]["id"], stage_id=PROPOSAL_MADE)
    delivered(sandbox, 1)
    run_worker()

    [event] = pipedrive_events()
    assert event.status == "succeeded"
    assert steps(event.id)["email 1: proposal made"]["output"] == {
        "skipped": "the deal's person has no email address"
    }
    assert emails(sandbox) == [] and len(activities(sandbox, deal_id["data"]["id"])) == 1


def test_a_stage_name_pipedrive_does_not_have_fails_the_run_with_it(
    live_app, sandbox, monkeypatch, tmp_path
):
    use_follow_up(
        monkeypatch,
        tmp_path,
        [
            {
                "name": "typo",
                "pipeline": "Sales",
                "stage": "Proposal sent",
                "actions": [{"activity": {"subject": "Call"}}],
            }
        ],
    )
    deal_id = new_deal(sandbox)
    subscribe(sandbox, live_app)
    sandbox.pipedrive_change_deal(deal_id, stage_id=PROPOSAL_MADE)
    delivered(sandbox, 1)
    run_worker()

    [event] = pipedrive_events()
    assert event.status == "failed"
    assert "pipeline 'Sales' has no stage named 'Proposal sent'" in event.reason


def test_without_the_sequences_module_a_sequence_action_fails_clearly(environment, monkeypatch):
    from connectors.errors import FlowAbort
    from flows import follow_up

    # None in sys.modules makes the import fail as a missing module would.
    monkeypatch.setitem(sys.modules, "flows.sequences", None)
    with pytest.raises(FlowAbort, match="flows.sequences is not installed"):
        follow_up._sequences()


def sequence_name() -> str:
    pytest.importorskip(
        "flows.sequences", reason="flows/sequences.py (the other half of issue 4) has not landed"
    )
    from core.config import settings

    names = list(getattr(settings(), "sequences", {}) or {})
    if not names:
        pytest.skip("config.yaml defines no sequence under `sequences:` to start")
    return names[0]


def test_start_and_stop_sequence_actions(live_app, sandbox, monkeypatch, tmp_path):
    name = sequence_name()
    use_follow_up(
        monkeypatch,
        tmp_path,
        [
            {
                "name": "proposal made",
                "pipeline": "Sales",
                "stage": "Proposal made",
                "actions": [{"start_sequence": name}],
            },
            {"name": "won", "status": "won", "actions": [{"stop_sequences": True}]},
        ],
    )
    deal_id = new_deal(sandbox)
    subscribe(sandbox, live_app)
    sandbox.pipedrive_change_deal(deal_id, stage_id=PROPOSAL_MADE)
    delivered(sandbox, 1)
    run_worker()
    sandbox.pipedrive_change_deal(deal_id, status="won")
    delivered(sandbox, 2)
    run_worker()

    started, won = sorted(pipedrive_events(), key=lambda e: e.received_at)
    assert started.status == "succeeded", started.reason
    assert won.status == "succeeded", won.reason
    begun = steps(started.id)["start_sequence 1: proposal made"]
    assert begun["status"] == "succeeded" and begun["output"]["status"] == "enrolled"
    ended = steps(won.id)["stop_sequences 1: won"]
    assert ended["status"] == "succeeded"
    assert ended["output"]["stopped"] == [begun["output"]["enrollment_id"]]

    # A replay of the stage entry finds the enrollment instead of making a second one.
    assert replay(started.id) == "succeeded"
    again = steps(started.id)["start_sequence 1: proposal made"]["output"]
    assert again["status"] == "already_enrolled"
    assert again["enrollment_id"] == begun["output"]["enrollment_id"]


# -- business days -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "days", "due"),
    [
        (date(2026, 12, 2), 2, date(2026, 12, 4)),  # Wednesday + 2 = Friday
        (date(2026, 12, 4), 1, date(2026, 12, 7)),  # Friday + 1 = Monday
        (date(2026, 12, 5), 0, date(2026, 12, 7)),  # a Saturday moves to Monday
        (date(2026, 12, 6), 1, date(2026, 12, 8)),  # Sunday + 1 = Tuesday
        (date(2026, 12, 3), 5, date(2026, 12, 10)),  # a week later
    ],
)
def test_business_days_skip_weekends(start, days, due) -> None:
    from flows.follow_up import add_business_days

    assert add_business_days(start, days) == due


# -- flask check-config ------------------------------------------------------------------


def test_check_config_names_missing_and_broken_follow_up_and_sequence_templates(
    app, tmp_path, monkeypatch
):
    import shutil

    from core import templates

    folder = tmp_path / "templates"
    shutil.copytree(templates.TEMPLATE_DIR, folder)
    (folder / "email" / "proposal_follow_up.html.j2").unlink()
    (folder / "email" / "sequence_followup.txt.j2").write_text("Hi {{ lead.name", "utf-8")
    monkeypatch.setattr(templates, "TEMPLATE_DIR", folder)

    result = app.test_cli_runner().invoke(args=["check-config"])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert lines == [
        "error: follow_up.triggers[0].actions[0].email.template: "
        "templates/email/proposal_follow_up.html.j2 is missing",
        "error: sequences.proposal_nurture.steps[1].template (email/sequence_followup.txt.j2): "
        "the Jinja template does not parse (line 1): unexpected end of template, expected "
        "'end of print statement'.",
    ]


def test_check_config_passes_the_shipped_templates(app):
    result = app.test_cli_runner().invoke(args=["check-config"])
    assert result.exit_code == 0, result.output
