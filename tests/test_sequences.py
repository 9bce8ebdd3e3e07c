"""Nurture sequences end to end on a fake clock: real Redis, database, RQ and the emulators."""

import base64
import email
import threading
import uuid
from datetime import UTC, datetime, timedelta
from email import policy
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import pytest
from rq.job import Job
from sqlalchemy import select

from connectors import registry
from core import queue
from core.runs import execute
from core.store import Enrollment, Event, SequenceStepRun, as_utc, session
from flows import sequences
from tests.conftest import run_worker

LUKA = 21458877
SEQUENCE = "proposal_nurture"
PROPOSAL_MADE, NEGOTIATIONS, NEEDS_DEFINED = 4, 5, 3
LEAD_EMAIL = "Tamar.Kiknadze+deal@example.ge"
TBILISI = ZoneInfo("Asia/Tbilisi")
ADMIN = {"Authorization": "Bearer admin-test-token"}


class FakeClock:
    """A settable clock for the sequence module; nothing sleeps."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock(clean: None, monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    # Monday 1 February 2027, 11:00 in Tbilisi (UTC+4, no DST there).
    fake = FakeClock(datetime(2027, 2, 1, 7, 0, tzinfo=UTC))
    monkeypatch.setattr(sequences, "clock", fake)
    return fake


def make_deal(phone: str = "+995 599 55 44 33") -> int:
    pipedrive = registry.pipedrive()
    person = pipedrive.create_person(
        {
            "name": "Tamar Kiknadze",
            "owner_id": LUKA,
            "emails": [{"value": LEAD_EMAIL, "primary": True, "label": "work"}],
            "phones": [{"value": phone, "primary": True, "label": "mobile"}],
        }
    )
    deal = pipedrive.create_deal(
        {
            "title": "Kiknadze — Website design",
            "person_id": person["id"],
            "owner_id": LUKA,
            "pipeline_id": 1,
            "stage_id": PROPOSAL_MADE,
        }
    )
    return deal["id"]


def trigger_event() -> str:
    with session() as db:
        event = Event(
            source="pipedrive",
            type="deal.stage",
            dedup_key=f"test:{uuid.uuid4().hex}",
            status="queued",
            data={},
            payload="{}",
        )
        db.add(event)
        db.flush()
        return event.id


def start(deal_id: int) -> tuple[str, dict[str, Any]]:
    """Start the sequence inside a flow run of a stage-change event, as the trigger does."""
    event_id = trigger_event()
    result: dict[str, Any] = {}
    status = execute(
        event_id,
        "follow_up",
        lambda ctx, _e: result.update(sequences.start(ctx, deal_id, SEQUENCE)),
    )
    assert status == "succeeded"
    return event_id, result


def fire_scheduled(now: datetime) -> int:
    """What RQ's scheduler does, at the fake time: move due scheduled jobs onto the queue."""
    flows = queue.queue()
    scheduled = flows.scheduled_job_registry
    ids = scheduled.get_jobs_to_schedule(int(now.timestamp()))
    for job_id in ids:
        job = Job.fetch(job_id, connection=queue.connection())
        scheduled.remove(job)
        flows.enqueue_job(job)
    return len(ids)


def pending_run() -> SequenceStepRun | None:
    with session() as db:
        return db.scalar(
            select(SequenceStepRun)
            .where(SequenceStepRun.status.in_(("scheduled", "parked")))
            .order_by(SequenceStepRun.due_at)
        )


def run_next(clock: FakeClock) -> datetime | None:
    """Move the clock to the next due step, let the scheduler fire it and a worker run it."""
    run = pending_run()
    if run is None:
        return None
    clock.now = max(clock.now, as_utc(run.due_at))
    fire_scheduled(clock.now)
    run_worker()
    return as_utc(run.due_at)


def enrollment(deal_id: int) -> Enrollment:
    with session() as db:
        return db.scalar(select(Enrollment).where(Enrollment.deal_id == deal_id))


def step_runs(enrollment_id: int) -> list[SequenceStepRun]:
    with session() as db:
        return list(
            db.scalars(
                select(SequenceStepRun)
                .where(SequenceStepRun.enrollment_id == enrollment_id)
                .order_by(SequenceStepRun.step_index)
            )
        )


def sent(sandbox) -> list[dict]:
    messages = sandbox.state()["google"]["gmail"]["messages"]
    return [m for m in messages if "SENT" in m["labelIds"]]


def parsed(message: dict) -> email.message.EmailMessage:
    raw = base64.urlsafe_b64decode(message["raw"] + "=" * (-len(message["raw"]) % 4))
    return email.message_from_bytes(raw, policy=policy.default)


def activities(sandbox, deal_id: int) -> list[dict]:
    return [a for a in sandbox.state()["pipedrive"]["activities"] if a["deal_id"] == deal_id]


def history(client, event_id: str) -> dict[str, dict]:
    answer = client.get(f"/api/events/{event_id}", headers=ADMIN)
    assert answer.status_code == 200
    return {run["flow"]: run for run in answer.json["runs"]}


# -- the whole sequence -------------------------------------------------------------------


def test_seven_steps_go_out_in_one_thread_inside_the_leads_window(clock, sandbox, client) -> None:
    deal_id = make_deal()
    event_id, started = start(deal_id)
    assert started["status"] == "enrolled"
    # The lead's zone comes from the +995 number: Tbilisi, not the process's or UTC.
    assert started["timezone"] == "Asia/Tbilisi"

    due_times = [run_next(clock) for _ in range(7)]
    assert run_next(clock) is None
    assert enrollment(deal_id).status == "completed"
    assert [r.status for r in step_runs(enrollment(deal_id).id)] == ["done"] * 7

    for due in due_times:
        local = due.astimezone(TBILISI)
        assert local.weekday() < 5 and 9 <= local.hour < 17, local
    # Step 2 is 2 business days after Monday 11:00 local: Wednesday 11:00 local, 07:00Z.
    assert due_times[1] == datetime(2027, 2, 3, 7, 0, tzinfo=UTC)

    emails = sent(sandbox)
    assert len(emails) == 5
    assert len({m["threadId"] for m in emails}) == 1
    tasks = activities(sandbox, deal_id)
    assert [(t["type"], t["owner_id"]) for t in tasks] == [("call", LUKA), ("task", LUKA)]
    assert tasks[0]["subject"] == "Call Tamar Kiknadze: no answer to two emails"

    runs = history(client, event_id)
    steps = [run for flow, run in runs.items() if flow.startswith("sequence:")]
    assert len(steps) == 7 and {run["status"] for run in steps} == {"succeeded"}
    assert [s["name"] for s in steps[0]["steps"]] == ["check_stop_conditions", "send_email"]
    assert LEAD_EMAIL.lower() not in str(runs).lower()


def test_replies_carry_the_threading_headers_of_the_previous_message(clock, sandbox) -> None:
    start(make_deal())
    for _ in range(4):  # email, email, task, email
        run_next(clock)

    first, second, third = (parsed(m) for m in sent(sandbox))
    ids = [first["Message-ID"], second["Message-ID"], third["Message-ID"]]
    assert first["In-Reply-To"] is None and first["References"] is None
    assert second["In-Reply-To"] == ids[0] and second["References"] == ids[0]
    assert third["In-Reply-To"] == ids[1] and third["References"].split() == ids[:2]
    assert second["Subject"] == third["Subject"] == f"Re: {first['Subject']}"
    assert first["Subject"] == "Tbilisi Digital: ideas for Kiknadze — Website design"
    assert first["To"].addresses[0].addr_spec == LEAD_EMAIL
    for message in (first, second, third):
        url = message["List-Unsubscribe"].strip("<>")
        assert url.startswith("https://salesflow.test/unsubscribe/")
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert url in message.get_body(("plain",)).get_content()


# -- stop conditions ----------------------------------------------------------------------


def test_a_reply_from_the_lead_stops_the_sequence(clock, sandbox, client) -> None:
    deal_id = make_deal()
    event_id, _ = start(deal_id)
    run_next(clock)
    run_next(clock)
    thread = enrollment(deal_id).thread_id
    sandbox.gmail_reply(thread, f"Tamar <{LEAD_EMAIL.upper()}>", "Yes, let's talk on Friday.")

    run_next(clock)
    assert run_next(clock) is None
    stopped = enrollment(deal_id)
    assert (stopped.status, stopped.stop_reason) == ("stopped", "the lead replied")
    assert len(sent(sandbox)) == 2 and activities(sandbox, deal_id) == []
    run = history(client, event_id)[f"sequence:{SEQUENCE}:{stopped.id}:step3"]
    assert run["status"] == "ignored"
    assert run["error"] == "sequence stopped: the lead replied"
    assert run["steps"][0]["output"] == {"stop": "replied", "reason": "the lead replied"}


def test_a_move_to_a_later_stage_stops_it_an_earlier_one_does_not(clock, sandbox) -> None:
    deal_id = make_deal()
    start(deal_id)
    run_next(clock)
    sandbox.pipedrive_change_deal(deal_id, stage_id=NEEDS_DEFINED)
    run_next(clock)
    assert len(sent(sandbox)) == 2

    sandbox.pipedrive_change_deal(deal_id, stage_id=NEGOTIATIONS)
    run_next(clock)
    stopped = enrollment(deal_id)
    assert (stopped.status, stopped.stop_reason) == ("stopped", "the deal moved to a later stage")
    assert activities(sandbox, deal_id) == []


@pytest.mark.parametrize("status", ["won", "lost"])
def test_a_won_or_lost_deal_stops_it(clock, sandbox, status: str) -> None:
    deal_id = make_deal()
    start(deal_id)
    run_next(clock)
    sandbox.pipedrive_change_deal(deal_id, status=status)
    run_next(clock)
    assert enrollment(deal_id).stop_reason == f"the deal was {status}"
    assert len(sent(sandbox)) == 1
    assert run_next(clock) is None


def test_a_deleted_deal_stops_it(clock, sandbox) -> None:
    from sandbox.pipedrive import PipedriveStore

    deal_id = make_deal()
    start(deal_id)
    run_next(clock)
    state = sandbox.state_object
    with state.lock:
        state.store("pipedrive", PipedriveStore).deals[deal_id]["is_deleted"] = True
    run_next(clock)
    assert enrollment(deal_id).stop_reason == "the deal was deleted"


def test_a_bounce_stops_it(clock, sandbox) -> None:
    deal_id = make_deal()
    start(deal_id)
    run_next(clock)
    sandbox.gmail_bounce(enrollment(deal_id).thread_id)
    run_next(clock)
    assert enrollment(deal_id).stop_reason == "the email bounced"
    assert len(sent(sandbox)) == 1


def test_one_click_unsubscribe_stops_it_and_get_only_asks(clock, sandbox, client) -> None:
    deal_id = make_deal()
    start(deal_id)
    run_next(clock)
    path = urlsplit(parsed(sent(sandbox)[0])["List-Unsubscribe"].strip("<>")).path

    page = client.get(path)
    assert page.status_code == 200 and b'<form method="post">' in page.data
    assert enrollment(deal_id).status == "active"  # a link scanner's GET changes nothing

    done = client.post(
        path,
        data="List-Unsubscribe=One-Click",
        content_type="application/x-www-form-urlencoded",
    )
    assert done.status_code == 200 and b"You are unsubscribed" in done.data
    stopped = enrollment(deal_id)
    assert (stopped.status, stopped.stop_reason) == ("stopped", "the lead unsubscribed")
    assert [r.status for r in step_runs(stopped.id)] == ["done", "cancelled"]
    assert client.post(path).status_code == 200  # a second click is harmless

    # The opt-out outlives this sequence: a new one for the same address stops at once.
    other = make_deal(phone="+995 599 00 11 22")
    start(other)
    run_next(clock)
    assert enrollment(other).stop_reason == "the lead unsubscribed"
    assert len(sent(sandbox)) == 1


@pytest.mark.parametrize("token", ["not-a-token", "x" * 600])
def test_a_bad_unsubscribe_token_is_a_400_with_a_sentence(client, token: str) -> None:
    for method in (client.get, client.post):
        answer = method(f"/unsubscribe/{token}")
        assert answer.status_code == 400
        assert answer.json["error"].startswith("This unsubscribe link is not valid")


def test_a_tampered_token_is_refused(clock, sandbox, client) -> None:
    start(make_deal())
    run_next(clock)
    path = urlsplit(parsed(sent(sandbox)[0])["List-Unsubscribe"].strip("<>")).path
    assert client.post(path[:-2] + ("AA" if not path.endswith("AA") else "BB")).status_code == 400


def test_stop_from_another_event_cancels_the_pending_steps(clock, sandbox) -> None:
    deal_id = make_deal()
    start(deal_id)
    run_next(clock)
    result: dict[str, Any] = {}
    execute(
        trigger_event(),
        "follow_up",
        lambda ctx, _e: result.update(sequences.stop(ctx, deal_id, "the deal was won")),
    )
    assert result == {"stopped": [enrollment(deal_id).id], "reason": "the deal was won"}
    assert run_next(clock) is None
    # The job RQ still holds for step 2 finds nothing to do.
    clock.now += timedelta(days=30)
    fire_scheduled(clock.now)
    run_worker()
    assert len(sent(sandbox)) == 1


def test_starting_twice_is_one_enrollment_and_one_job(clock, sandbox) -> None:
    deal_id = make_deal()
    _, first = start(deal_id)
    _, second = start(deal_id)
    assert second["status"] == "already_enrolled"
    assert second["enrollment_id"] == first["enrollment_id"]
    assert len(step_runs(first["enrollment_id"])) == 1
    assert queue.queue().scheduled_job_registry.count == 1


# -- reliability --------------------------------------------------------------------------


def test_a_flushed_redis_loses_no_step(clock, sandbox) -> None:
    deal_id = make_deal()
    start(deal_id)
    run_next(clock)
    queue.connection().flushdb()

    clock.now = as_utc(pending_run().due_at) + timedelta(minutes=1)
    assert fire_scheduled(clock.now) == 0 and run_worker() == 0
    assert sequences.requeue_due_steps() == 1
    assert sequences.requeue_due_steps() == 0  # its job now waits: not queued twice
    run_worker()
    assert len(sent(sandbox)) == 2
    assert enrollment(deal_id).next_step == 2
    # The sequence goes on from the database: step 3 is on RQ's schedule again.
    assert queue.queue().scheduled_job_registry.count == 1


def test_a_step_late_after_downtime_waits_for_the_window(clock, sandbox) -> None:
    deal_id = make_deal()
    start(deal_id)
    run_next(clock)
    # Step 2 was due Wednesday; the app comes back on Saturday 10:00 in Tbilisi.
    clock.now = datetime(2027, 2, 6, 6, 0, tzinfo=UTC)
    fire_scheduled(clock.now)
    run_worker()
    assert len(sent(sandbox)) == 1
    monday_nine = datetime(2027, 2, 8, 5, 0, tzinfo=UTC)
    assert as_utc(pending_run().due_at) == monday_nine

    assert run_next(clock) == monday_nine
    assert len(sent(sandbox)) == 2


def test_several_workers_firing_one_step_send_it_once(clock, sandbox) -> None:
    deal_id = make_deal()
    start(deal_id)
    run_next(clock)
    enrolled = enrollment(deal_id)
    clock.now = as_utc(pending_run().due_at)

    # Two schedulers moved the job, and two more copies came from a sweep: four claimants.
    barrier = threading.Barrier(4)
    results: list[str] = []

    def claimant() -> None:
        barrier.wait()
        results.append(sequences.run_step(enrolled.id, 1))

    threads = [threading.Thread(target=claimant) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["done", "skipped", "skipped", "skipped"]
    assert len(sent(sandbox)) == 2

    # The same step queued again under other ids (a second scheduler) does nothing either.
    for copy in range(2):
        queue.queue().enqueue(sequences.JOB_FUNCTION, enrolled.id, 1, job_id=f"copy-{copy}")
    run_worker()
    assert len(sent(sandbox)) == 2


def test_a_send_that_lost_its_answer_is_found_not_repeated(clock, sandbox) -> None:
    deal_id = make_deal()
    start(deal_id)
    run_next(clock)
    enrolled = enrollment(deal_id)
    run_next(clock)
    assert len(sent(sandbox)) == 2
    # As if the worker died after Gmail took step 2 and before anything was recorded.
    with session() as db:
        run = db.scalar(
            select(SequenceStepRun).where(
                SequenceStepRun.enrollment_id == enrolled.id, SequenceStepRun.step_index == 1
            )
        )
        run.status, run.claimed_at = "running", clock.now
        db.delete(db.scalar(select(SequenceStepRun).where(SequenceStepRun.step_index == 2)))
        from core.store import SideEffect

        effect = db.get(SideEffect, f"sequence:{enrolled.id}:1:email")
        effect.status, effect.result = "pending", None
        effect.created_at = clock.now - timedelta(hours=1)
        row = db.get(Enrollment, enrolled.id)
        row.next_step, row.message_ids, row.sent_ids = 1, row.message_ids[:1], row.sent_ids[:1]

    clock.now += sequences.LEASE + timedelta(seconds=1)
    assert sequences.requeue_due_steps() == 1
    run_worker()
    assert len(sent(sandbox)) == 2
    assert enrollment(deal_id).next_step == 2


def test_gmail_errors_are_retried_and_the_email_goes_once(clock, sandbox) -> None:
    start(make_deal())
    sandbox.fault(vendor="google", kind="503", count=1, path="messages/send")
    sandbox.fault(vendor="google", kind="429", count=1, path="messages/send", reset_s=0)
    run_next(clock)
    assert len(sent(sandbox)) == 1
    statuses = [c["status"] for c in sandbox.state()["calls"] if "messages/send" in c["path"]]
    assert statuses == [503, 429, 200]


@pytest.mark.parametrize("reason", ["rateLimitExceeded", "userRateLimitExceeded", "quotaExceeded"])
def test_a_throttling_403_is_retried_and_the_email_goes_once(clock, sandbox, reason) -> None:
    deal_id = make_deal()
    start(deal_id)
    sandbox.fault(vendor="google", kind="google_403", reason=reason, path="messages/send")
    run_next(clock)
    assert len(sent(sandbox)) == 1
    statuses = [c["status"] for c in sandbox.state()["calls"] if "messages/send" in c["path"]]
    assert statuses == [403, 200]
    assert [r.status for r in step_runs(enrollment(deal_id).id)] == ["done", "scheduled"]


def test_a_plain_403_fails_the_step_at_once(clock, sandbox, client) -> None:
    deal_id = make_deal()
    event_id, _ = start(deal_id)
    sandbox.fault(
        vendor="google", kind="google_403", reason="insufficientPermissions", path="messages/send"
    )
    run_next(clock)
    assert sent(sandbox) == []
    statuses = [c["status"] for c in sandbox.state()["calls"] if "messages/send" in c["path"]]
    assert statuses == [403]  # no retry within the job, and none scheduled for later
    failed = enrollment(deal_id)
    assert failed.status == "failed"
    assert [r.status for r in step_runs(failed.id)] == ["failed"]
    run = history(client, event_id)[f"sequence:{SEQUENCE}:{failed.id}:step1"]
    assert run["status"] == "failed" and "status 403" in run["error"]
    assert pending_run() is None


def test_flask_sweep_queues_the_due_steps_too(clock, sandbox, app) -> None:
    deal_id = make_deal()
    start(deal_id)
    run_next(clock)
    queue.connection().flushdb()
    clock.now = as_utc(pending_run().due_at)

    result = app.test_cli_runner().invoke(args=["sweep"])
    assert result.exit_code == 0, result.output
    assert "requeued 1 sequence steps" in result.output
    run_worker()
    assert len(sent(sandbox)) == 2


def test_invalid_grant_parks_the_step_and_resumes_after_reauthorisation(
    clock, sandbox, client, monkeypatch
) -> None:
    deal_id = make_deal()
    event_id, _ = start(deal_id)
    run_next(clock)
    good_token = registry.settings().google.refresh_token
    monkeypatch.setenv("GOOGLE_REFRESH_TOKEN", "revoked-by-the-user")
    registry.reset()

    run_next(clock)
    parked = pending_run()
    assert parked.status == "parked" and "google-auth" in parked.error
    assert enrollment(deal_id).status == "active"
    assert len(sent(sandbox)) == 1
    run = history(client, event_id)[f"sequence:{SEQUENCE}:{enrollment(deal_id).id}:step2"]
    assert run["status"] == "queued" and run["error"].startswith("parked: Google refused")

    # Still refused ten minutes later: parked again, nothing lost.
    clock.now += sequences.PARK_RETRY
    assert sequences.requeue_due_steps() == 1
    run_worker()
    assert pending_run().status == "parked"

    monkeypatch.setenv("GOOGLE_REFRESH_TOKEN", good_token)
    registry.reset()
    clock.now += sequences.PARK_RETRY
    assert sequences.requeue_due_steps() == 1
    run_worker()
    assert len(sent(sandbox)) == 2
    assert [r.status for r in step_runs(enrollment(deal_id).id)] == ["done", "done", "scheduled"]


def test_a_lead_without_a_phone_zone_uses_the_owners(clock, sandbox) -> None:
    # A Russian mobile number spans eleven time zones; Luka works in Tbilisi.
    deal_id = make_deal(phone="+7 916 123 45 67")
    _, started = start(deal_id)
    assert started["timezone"] == "Asia/Tbilisi"
    assert sequences.lead_zone("+1 212 555 0100", "GE") == "America/New_York"
    assert sequences.lead_zone("+49 151 23456789", "GE") == "Europe/Berlin"
    assert sequences.lead_zone("+7 916 123 45 67", "GE") is None
    assert sequences.lead_zone("not a number", "GE") is None
    assert enrollment(deal_id).status == "active"


def test_the_workers_maintenance_runs_the_sequence_sweep(clock, sandbox) -> None:
    from core.flow_worker import FlowWorker

    deal_id = make_deal()
    start(deal_id)
    run_next(clock)
    queue.connection().flushdb()
    clock.now = as_utc(pending_run().due_at)

    worker = FlowWorker([queue.queue()], connection=queue.connection())
    worker.run_maintenance_tasks()
    assert queue.queue().count == 1
    run_worker()
    assert len(sent(sandbox)) == 2
