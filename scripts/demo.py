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
    print(f"Report written to {REPORT.relative_to(ROOT)}")


def main() -> int:
    """Run the demo; exit 0 when each lead has one person, one deal and one email."""
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
            [
                str(BIN / "rq"),
                "worker",
                "--with-scheduler",
                "--worker-class",
                "core.worker.FlowWorker",
                "--url",
                env["REDIS_URL"],
                "flows",
            ],
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

    REPORT.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    show(report)
    after, before = report["emulator_counts_after"], report["emulator_counts_before"]
    grown = {key: after[key] - before[key] for key in after}
    created = sum(1 for lead in leads if lead.get("person", {}).get("created"))
    ok = (
        all(lead["status"] == "succeeded" for lead in leads)
        and grown["deals"] == grown["notes"] == grown["emails"] == len(leads)
        and grown["persons"] == created
        and repeat["status"] == "duplicate"
    )
    print("demo: OK" if ok else "demo: FAILED (see instance/*.log)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
