"""Dead letters and replay: a failed run is re-run once fixed, its side effects single."""

import subprocess
import sys

from connectors import registry
from core.store import Event, FlowRun, session
from tests.conftest import ROOT, load_fixture, run_worker
from tests.test_lead_flow import event_status, messages, pipedrive, post_form


def fail_one(client, sandbox, monkeypatch) -> str:
    """A lead whose run dead-letters on a refused Pipedrive token."""
    monkeypatch.setenv("PIPEDRIVE_API_TOKEN", "wrong-token")
    registry.reset()
    accepted = post_form(client, load_fixture("form/lead.json"))
    run_worker()
    assert event_status(accepted["event_id"])[0] == "failed"
    monkeypatch.undo()
    registry.reset()
    return accepted["event_id"]


def test_replay_runs_a_failed_event_again_and_keeps_each_attempt(
    client, sandbox, monkeypatch
) -> None:
    from core.replay import replay

    event_id = fail_one(client, sandbox, monkeypatch)
    assert replay(event_id) == "queued"
    assert replay(event_id) == "skipped: the event is queued"
    run_worker()

    assert event_status(event_id) == ("succeeded", None)
    with session() as db:
        [run] = db.query(FlowRun).filter_by(event_id=event_id).all()
        assert run.attempts == 2
        attempts = {(step.name, step.attempt, step.status) for step in run.steps}
    assert ("find_person", 1, "failed") in attempts and ("find_person", 2, "succeeded") in attempts
    assert len(pipedrive(sandbox)["deals"]) == 1 and len(messages(sandbox)) == 1
    assert replay(event_id) == "skipped: the event is succeeded"
    assert replay("no-such-event") == "not found"


def test_forced_replay_of_a_done_event_does_nothing_twice(client, sandbox) -> None:
    from core.replay import replay

    accepted = post_form(client, load_fixture("form/lead.json"))
    run_worker()
    assert replay(accepted["event_id"], force=True) == "queued"
    run_worker()
    assert len(pipedrive(sandbox)["deals"]) == 1 and len(messages(sandbox)) == 1
    assert len(pipedrive(sandbox)["notes"]) == 1


def test_flask_replay_failed_from_the_command_line(client, sandbox, monkeypatch, environment):
    event_id = fail_one(client, sandbox, monkeypatch)
    command = [sys.executable, "-m", "flask", "--app", "app", "replay", "--failed"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"{event_id}: queued" in result.stdout
    run_worker()
    assert event_status(event_id)[0] == "succeeded"
    with session() as db:
        assert db.get(Event, event_id).status == "succeeded"
