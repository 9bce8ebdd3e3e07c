"""The demo: start everything on embedded defaults, post real-shaped leads, show the result."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
INSTANCE = ROOT / "instance"
FIXTURES = ROOT / "tests" / "fixtures"
REPORT = INSTANCE / "demo-report.json"
BIN = Path(sys.executable).parent
SAMPLES = [
    ("typeform", "typeform/form_response.json"),
    ("typeform", "typeform/form_response_minimal.json"),
    ("form", "form/lead.json"),
    ("facebook", "facebook/leadgen_webhook.json"),
    ("browser_form", "browser/contact.txt"),
]
# The browser form's key in config.yaml and the origin the demo posts from.
BROWSER_FORM = "contact"
BROWSER_ORIGIN = "https://tbilisi-digital.example"
DEMO_SECRETS = {
    "TYPEFORM_WEBHOOK_SECRET": "demo-typeform-secret",
    "FORM_WEBHOOK_SECRET": "demo-form-secret",
    "ADMIN_TOKEN": "demo-admin-token",
    "UNSUBSCRIBE_SECRET": "demo-unsubscribe-secret",
    "PIPEDRIVE_WEBHOOK_USER": "salesflow-demo",
    "PIPEDRIVE_WEBHOOK_PASSWORD": "demo-pipedrive-webhook-password",
}


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(check: Any, what: str, timeout_s: float = 30.0) -> Any:
    """Poll check() until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise SystemExit(f"demo: {what} did not happen within {timeout_s:.0f} s")


def start(stack: ExitStack, name: str, command: list[str], env: dict[str, str]) -> None:
    """Start a child process whose output goes to instance/<name>.log; stop it on exit."""
    log = (INSTANCE / f"{name}.log").open("w")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def stop() -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()

    stack.callback(stop)


def prepare_environment(stack: ExitStack) -> dict[str, str]:
    """Secrets, a fresh SQLite file and an embedded Redis unless the caller set their own."""
    env = dict(os.environ)
    for key, value in DEMO_SECRETS.items():
        env.setdefault(key, value)
    if not env.get("DATABASE_URL"):
        database = INSTANCE / "demo.db"
        for leftover in INSTANCE.glob("demo.db*"):
            leftover.unlink()
        env["DATABASE_URL"] = f"sqlite:///{database}"
    if not env.get("REDIS_URL"):
        from core.queue import start_embedded_redis

        redis_dir = INSTANCE / "redis"
        shutil.rmtree(redis_dir, ignore_errors=True)
        server, env["REDIS_URL"] = start_embedded_redis(redis_dir)
        stack.callback(lambda: server.shutdown(nosave=True))
    return env


def start_sandbox(stack: ExitStack, env: dict[str, str]) -> str:
    """The vendor emulators; returns their base URL and points the product at them."""
    port = free_port()
    start(stack, "sandbox", [sys.executable, "-m", "sandbox", "--port", str(port)], env)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: requests.get(f"{url}/_sandbox/health", timeout=1).ok, "the sandbox start")
    # The emulators' own accepted credentials and URLs, as the tests get them.
    env.update(requests.get(f"{url}/_sandbox/env", timeout=5).json())
    return url


def signed_request(source: str, fixture: str, env: dict[str, str]) -> tuple[str, bytes, dict]:
    """The path, bytes and headers a vendor (or a browser) would send for a sample."""
    from core.signatures import sign_base64_sha256, sign_hex_sha256
    from sandbox.facebook import meta_json

    body = (FIXTURES / fixture).read_bytes()
    json_type = {"Content-Type": "application/json"}
    if source == "typeform":
        signature = sign_base64_sha256(env["TYPEFORM_WEBHOOK_SECRET"], body)
        return "typeform", body, {**json_type, "Typeform-Signature": signature}
    if source == "facebook":
        # Meta's own bytes: compact, with / and non-ASCII escaped, signed as sent.
        body = meta_json(json.loads(body))
        signature = sign_hex_sha256(env["FACEBOOK_APP_SECRET"], body)
        return "facebook", body, {**json_type, "X-Hub-Signature-256": signature}
    if source == "browser_form":
        # A visitor's browser: no secret, an Origin, a urlencoded body, a 303 back.
        form_type = {"Content-Type": "application/x-www-form-urlencoded"}
        return f"form/{BROWSER_FORM}", body.strip(), {**form_type, "Origin": BROWSER_ORIGIN}
    signature = sign_hex_sha256(env["FORM_WEBHOOK_SECRET"], body)
    return "form", body, {**json_type, "X-Signature": signature}


def post(web: str, source: str, fixture: str, env: dict[str, str]) -> dict[str, Any]:
    """Post a sample as its sender does; returns the answer and the timing."""
    path, body, headers = signed_request(source, fixture, env)
    started = time.perf_counter()
    answer = requests.post(
        f"{web}/webhooks/{path}", data=body, headers=headers, timeout=10, allow_redirects=False
    )
    ack_ms = round((time.perf_counter() - started) * 1000, 1)
    if answer.status_code == 303:
        # The browser only sees the thank-you page: find the event in the run history.
        events = requests.get(
            f"{web}/api/events?source={source}",
            timeout=5,
            headers={"Authorization": f"Bearer {env['ADMIN_TOKEN']}"},
        ).json()["events"]
        return {
            "http_status": 303,
            "location": answer.headers["Location"],
            "event_id": events[0]["id"],
            "status": "queued",
            "ack_ms": ack_ms,
        }
    return {"http_status": answer.status_code, **answer.json(), "ack_ms": ack_ms}


def outcome(web: str, sandbox: str, accepted: dict[str, Any], token: str) -> dict[str, Any]:
    """What the flow did for one lead, read from the run history and the emulators."""
    headers = {"Authorization": f"Bearer {token}"}

    def finished() -> dict[str, Any] | None:
        event = requests.get(
            f"{web}/api/events/{accepted['event_id']}", headers=headers, timeout=5
        ).json()
        return event if event["status"] in ("succeeded", "failed", "ignored") else None

    event = wait_until(finished, f"event {accepted['event_id']} finishing")
    steps = {
        step["name"]: step
        for run in event["runs"]
        for step in run["steps"]
        if step["status"] == "succeeded"
    }
    state = requests.get(f"{sandbox}/_sandbox/state", timeout=5).json()
    result: dict[str, Any] = {
        "event_id": event["id"],
        "source": event["source"],
        "status": event["status"],
        "reason": event["reason"],
    }
    if event["status"] != "succeeded":
        return result

    deal_id = steps["create_deal"]["output"]["deal_id"]
    deal = next(d for d in state["pipedrive"]["deals"] if d["id"] == deal_id)
    person = next(p for p in state["pipedrive"]["persons"] if p["id"] == deal["person_id"])
    owner = next(u for u in state["pipedrive"]["users"] if u["id"] == deal["owner_id"])
    message_id = steps["send_welcome_email"]["output"]["message_id"]
    message = next(m for m in state["google"]["gmail"]["messages"] if m["id"] == message_id)
    result.update(
        person={"id": person["id"], "name": person["name"], "created": "create_person" in steps},
        deal={"id": deal["id"], "title": deal["title"], "value": deal.get("value")},
        owner=owner["name"],
        email_subject=message["headers"]["Subject"],
        webhook_to_email_ms=steps["send_welcome_email"]["output"]["speed_to_lead_ms"],
    )
    return result


def counts(sandbox: str) -> dict[str, int]:
    """How many persons, deals, notes and emails the emulators hold."""
    state = requests.get(f"{sandbox}/_sandbox/state", timeout=5).json()
    pipedrive = state["pipedrive"]
    return {
        "persons": len(pipedrive["persons"]),
        "deals": len(pipedrive["deals"]),
        "notes": len(pipedrive["notes"]),
        "emails": len(state["google"]["gmail"]["messages"]),
    }


def show(report: dict[str, Any]) -> None:
    """Print the report for a person to read."""
    print("\nLeads")
    for lead in report["leads"]:
        print(f"- {lead['source']:<9} event {lead['event_id']}  {lead['status']}")
        if lead["status"] != "succeeded":
            print(f"    reason: {lead['reason']}")
            continue
        made = "created" if lead["person"]["created"] else "existing"
        print(f"    person  #{lead['person']['id']} {lead['person']['name']} ({made})")
        print(f"    deal    #{lead['deal']['id']} {lead['deal']['title']}")
        print(f"    owner   {lead['owner']}")
        print(f"    email   {lead['email_subject']}")
        print(f"    webhook to email sent: {lead['webhook_to_email_ms']} ms")
    print(f"\nRepeat delivery answered: {report['repeat_delivery']['status']}")
    before, after = report["emulator_counts_before"], report["emulator_counts_after"]
    print(
        "Emulator totals (before -> after): "
        + ", ".join(f"{key} {before[key]} -> {after[key]}" for key in after)
    )


# -- follow-up: a stage change starts a sequence, a reply stops it -----------------------


def api_get(web: str, path: str, env: dict[str, str]) -> Any:
    """GET on the run-history API."""
    headers = {"Authorization": f"Bearer {env['ADMIN_TOKEN']}"}
    answer = requests.get(f"{web}/api{path}", headers=headers, timeout=5)
    answer.raise_for_status()
    return answer.json()


def finished_event(web: str, env: dict[str, str], source: str) -> dict[str, Any]:
    """The newest event of a source, once its run has finished."""

    def done() -> dict[str, Any] | None:
        events = api_get(web, f"/events?source={source}", env)["events"]
        if not events or events[0]["status"] not in ("succeeded", "failed", "ignored"):
            return None
        return api_get(web, f"/events/{events[0]['id']}", env)

    return wait_until(done, f"the {source} event finishing")


def sequence_step(enrollment_id: int, index: int) -> Any:
    """One step's row of an enrollment (its status and due time)."""
    from sqlalchemy import select

    from core.store import SequenceStepRun, session

    with session() as db:
        return db.scalar(
            select(SequenceStepRun).where(
                SequenceStepRun.enrollment_id == enrollment_id,
                SequenceStepRun.step_index == index,
            )
        )


def drive_step(enrollment_id: int, index: int) -> dict[str, Any]:
    """Run a sequence step at its due time, moving the sequences' clock there as the tests do."""
    from core.store import as_utc, utcnow
    from flows import sequences

    due = as_utc(sequence_step(enrollment_id, index).due_at)
    # A step due days ahead (or at the lead's next working hour) runs now, with the clock at
    # its due time; the worker's own job for it then finds it done.
    sequences.clock = lambda: max(due, utcnow())
    outcome = sequences.run_step(enrollment_id, index)
    if outcome == "skipped":
        # Due already: the worker's scheduler took it first. Wait for its result.
        wait_until(
            lambda: sequence_step(enrollment_id, index).status not in ("scheduled", "running"),
            f"step {index + 1} finishing",
        )
        outcome = sequence_step(enrollment_id, index).status
    return {"due_at": due.isoformat(), "outcome": outcome}


def move_to_stage(web: str, sandbox: str, env: dict[str, str], deal_id: int) -> dict[str, Any]:
    """Subscribe to Pipedrive's webhooks, then move the deal as a rep would; the run history."""
    import cli
    from connectors import registry
    from core.config import settings

    trigger = next(
        t for t in settings().follow_up.triggers if any(a.start_sequence for a in t.actions)
    )
    url = f"{web}/webhooks/pipedrive"
    # The product's own `flask register-webhooks` logic, aimed at the demo's web process.
    lines = cli.register_pipedrive_webhooks(
        url, env["PIPEDRIVE_WEBHOOK_USER"], env["PIPEDRIVE_WEBHOOK_PASSWORD"]
    )
    _, stage_id = registry.pipedrive().stage_ids(trigger.pipeline or "", trigger.stage or "")
    moved = requests.post(
        f"{sandbox}/_sandbox/pipedrive/deals/{deal_id}", json={"stage_id": stage_id}, timeout=5
    )
    moved.raise_for_status()
    event = finished_event(web, env, "pipedrive")
    return {
        "webhooks": [line.strip() for line in lines],
        "trigger": trigger.name,
        "stage": trigger.stage,
        "event": event,
    }


def enrollment_row(enrollment_id: int) -> Any:
    """The enrollment as the database holds it now."""
    from core.store import Enrollment, session

    with session() as db:
        return db.get(Enrollment, enrollment_id)


def thread_messages(sandbox: str, thread_id: str | None) -> list[dict[str, Any]]:
    """The messages of one Gmail thread in the emulator, oldest first."""
    state = requests.get(f"{sandbox}/_sandbox/state", timeout=5).json()
    return [m for m in state["google"]["gmail"]["messages"] if m["threadId"] == thread_id]


def until_reply(
    web: str, sandbox: str, env: dict[str, str], event_id: str, enrollment_id: int
) -> dict[str, Any]:
    """Step 1 goes out, the lead replies in its thread, step 2's check stops the sequence."""
    first = drive_step(enrollment_id, 0)
    enrollment = enrollment_row(enrollment_id)
    thread = thread_messages(sandbox, enrollment.thread_id)
    first["subject"] = thread[0]["headers"]["Subject"] if thread else None

    reply = requests.post(
        f"{sandbox}/_sandbox/gmail/reply",
        json={
            "thread_id": enrollment.thread_id,
            "from": f"{enrollment.name} <{enrollment.email}>",
            "text": "Thanks, the proposal looks good. Can we talk on Friday?",
        },
        timeout=5,
    )
    reply.raise_for_status()

    second = drive_step(enrollment_id, 1)
    runs = api_get(web, f"/events/{event_id}", env)["runs"]
    run = next((r for r in runs if r["flow"].endswith(f":{enrollment_id}:step2")), {})
    second.update(run_status=run.get("status"), run_error=run.get("error"))
    enrollment = enrollment_row(enrollment_id)
    return {
        "first_step": first,
        "reply_message_id": reply.json()["id"],
        "next_step": second,
        "status": enrollment.status,
        "stop_reason": enrollment.stop_reason,
        "emails_sent": sum(
            1 for m in thread_messages(sandbox, enrollment.thread_id) if "SENT" in m["labelIds"]
        ),
    }


def follow_up(web: str, sandbox: str, env: dict[str, str], deal_id: int) -> dict[str, Any]:
    """A deal enters the proposal stage: its trigger runs and starts the nurture sequence; the
    first step is sent, the lead replies in the thread and the next step's check stops it."""
    # The steps below run product code in this process: it reads the same environment.
    os.environ.update(env)
    moved = move_to_stage(web, sandbox, env, deal_id)
    event = moved.pop("event")
    result: dict[str, Any] = {
        **moved,
        "event_id": event["id"],
        "status": event["status"],
        "reason": event["reason"],
        "deal_id": deal_id,
    }
    steps = {step["name"]: step for run in event["runs"] for step in run["steps"]}
    result["actions"] = {
        name: step["status"]
        for name, step in steps.items()
        if name not in ("check_origin", "match_triggers", "load_deal")
    }
    started = next((s for n, s in steps.items() if n.startswith("start_sequence")), None)
    if event["status"] != "succeeded" or started is None:
        return result

    output = started["output"]
    result["sequence"] = {
        "enrollment_id": output["enrollment_id"],
        "name": output["sequence"],
        "timezone": output["timezone"],
        **until_reply(web, sandbox, env, event["id"], output["enrollment_id"]),
    }
    return result


def follow_up_held(result: dict[str, Any]) -> bool:
    """The trigger ran, the first step went out, and the reply stopped the sequence."""
    sequence = result.get("sequence") or {}
    return (
        result["status"] == "succeeded"
        and set(result["actions"].values()) == {"succeeded"}
        and sequence.get("first_step", {}).get("outcome") == "done"
        and sequence.get("next_step", {}).get("outcome") == "stopped"
        and sequence.get("next_step", {}).get("run_status") == "ignored"
        and sequence.get("stop_reason") == "the lead replied"
        and sequence.get("emails_sent") == 1
    )


def local_time(moment: str, zone: str) -> str:
    """An ISO UTC time as the lead reads it: 'Fri 2026-12-04 09:00 Asia/Tbilisi'."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    return (
        datetime.fromisoformat(moment)
        .astimezone(ZoneInfo(zone))
        .strftime(f"%a %Y-%m-%d %H:%M {zone}")
    )


def show_follow_up(result: dict[str, Any]) -> None:
    """Print the follow-up section for a person to read."""
    print("\nFollow-up")
    print(f"- pipedrive event {result['event_id']}  {result['status']}")
    for line in result["webhooks"]:
        print(f"    register {line}")
    print(f"    deal    #{result['deal_id']} moved to {result['stage']!r} in Pipedrive")
    if result["status"] != "succeeded":
        print(f"    reason: {result['reason']}")
        return
    for name, status in result["actions"].items():
        print(f"    action  {name}: {status}")
    sequence = result.get("sequence")
    if not sequence:
        return
    zone = sequence["timezone"]
    first, second = sequence["first_step"], sequence["next_step"]
    print(
        f"    sequence #{sequence['enrollment_id']} {sequence['name']}, in the lead's zone {zone}"
    )
    print(f"    step 1  due {local_time(first['due_at'], zone)}: {first['outcome']}")
    print(f"            email {first['subject']!r}")
    print("    reply   the lead answered in the same Gmail thread")
    print(f"    step 2  due {local_time(second['due_at'], zone)}: run {second['run_status']}")
    print(f"            {second['run_error']}")
    print(
        f"    sequence {sequence['status']} ({sequence['stop_reason']}); "
        f"{sequence['emails_sent']} sequence email sent"
    )
    print("    (steps ran at their due times: the demo moves the sequences' clock, as tests do)")


def connect_to(web: str, sandbox: str) -> None:
    """Point the emulated DocuSign Connect at the demo's web process, documents included."""
    connect = {"url": f"{web}/webhooks/docusign", "include_documents": True}
    requests.post(f"{sandbox}/_sandbox/docusign/connect", json=connect, timeout=5)


def _deal_field(envelope: dict[str, Any], name: str) -> str | None:
    fields = (envelope.get("customFields") or {}).get("textCustomFields") or []
    return next((f.get("value") for f in fields if f.get("name") == name), None)


def contract(sandbox: str, deal_id: int) -> dict[str, Any]:
    """The envelope the proposal stage sent for the deal, signed by the client: deal won."""

    def state() -> dict[str, Any]:
        return requests.get(f"{sandbox}/_sandbox/state", timeout=5).json()

    def envelopes() -> list[dict[str, Any]]:
        found = state()["docusign"]["envelopes"]
        return [e for e in found if _deal_field(e, "pipedrive_deal_id") == str(deal_id)]

    [envelope] = wait_until(envelopes, "the envelope of the proposal")
    started = time.perf_counter()
    signing = f"{sandbox}/_sandbox/docusign/envelopes/{envelope['envelopeId']}/sign"
    requests.post(signing, json={}, timeout=5).raise_for_status()

    def signed() -> dict[str, Any] | None:
        now = state()["pipedrive"]
        done = next(d for d in now["deals"] if d["id"] == deal_id)
        files = [f for f in now["files"] if f["deal_id"] == deal_id]
        return {"deal": done, "files": files} if done["status"] == "won" and files else None

    final = wait_until(signed, "the signed contract closing the deal")
    return {
        "deal_id": deal_id,
        "envelope_id": envelope["envelopeId"],
        "envelopes": len(envelopes()),
        "deal_status": final["deal"]["status"],
        "signed_pdf": [f["name"] for f in final["files"]],
        "signed_to_won_ms": round((time.perf_counter() - started) * 1000),
        "signed": len(final["files"]) == 1,
    }


def show_contract(result: dict[str, Any]) -> None:
    """Print the contract section."""
    print("\nContract")
    print(f"- deal #{result['deal_id']}: the proposal stage sent envelope {result['envelope_id']}")
    print(
        f"    signed by the client: deal {result['deal_status']} "
        f"{result['signed_to_won_ms']} ms later, attached {', '.join(result['signed_pdf'])}"
    )


def main() -> int:
    """Run the demo; exit 0 when each lead has one person, one deal and one email, and the
    stage change started a sequence whose first step went out and a reply stopped it."""
    INSTANCE.mkdir(exist_ok=True)
    with ExitStack() as stack:
        env = prepare_environment(stack)
        sandbox = start_sandbox(stack, env)
        subprocess.run(
            [str(BIN / "alembic"), "upgrade", "head"],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
        )
        web = f"http://127.0.0.1:{free_port()}"
        # Unsubscribe links in sequence emails point at the web process.
        env.setdefault("PUBLIC_BASE_URL", web)
        start(
            stack,
            "web",
            [
                str(BIN / "gunicorn"),
                "--bind",
                web.removeprefix("http://"),
                "--workers",
                "2",
                "app:create_app()",
            ],
            env,
        )
        start(
            stack,
            "worker",
            # The Procfile's worker command.
            [sys.executable, "-m", "core.worker"],
            env,
        )
        wait_until(lambda: requests.get(f"{web}/healthz", timeout=1).ok, "the web start")
        print(f"web {web}, emulators {sandbox}, logs in instance/*.log")

        before = counts(sandbox)
        accepted = [post(web, source, fixture, env) for source, fixture in SAMPLES]
        leads = [outcome(web, sandbox, item, env["ADMIN_TOKEN"]) for item in accepted]
        repeat = post(web, *SAMPLES[0], env)
        time.sleep(1.0)  # give a wrongly queued repeat the time to show up in the counts
        report = {
            "leads": leads,
            "acks": accepted,
            "repeat_delivery": repeat,
            "emulator_counts_before": before,
            "emulator_counts_after": counts(sandbox),
        }
        moved = next((lead for lead in leads if lead["status"] == "succeeded"), None)
        connect_to(web, sandbox)
        report["follow_up"] = follow_up(web, sandbox, env, moved["deal"]["id"]) if moved else None
        report["contract"] = contract(sandbox, moved["deal"]["id"]) if moved else None

    REPORT.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    show(report)
    if report["follow_up"]:
        show_follow_up(report["follow_up"])
    if report["contract"]:
        show_contract(report["contract"])
    print(f"\nReport written to {REPORT.relative_to(ROOT)}")
    after, before = report["emulator_counts_after"], report["emulator_counts_before"]
    grown = {key: after[key] - before[key] for key in after}
    created = sum(1 for lead in leads if lead.get("person", {}).get("created"))
    ok = (
        all(lead["status"] == "succeeded" for lead in leads)
        and grown["deals"] == grown["notes"] == grown["emails"] == len(leads)
        and grown["persons"] == created
        and repeat["status"] == "duplicate"
        and report["follow_up"] is not None
        and follow_up_held(report["follow_up"])
        and report["contract"] is not None
        and report["contract"]["signed"]
        and report["contract"]["envelopes"] == 1
    )
    print("demo: OK" if ok else "demo: FAILED (see instance/*.log)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
