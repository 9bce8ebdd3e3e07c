"""The Procfile's worker process: a supervisor with one in-process RQ worker under it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.store import Event, session
from tests.conftest import ROOT, as_bytes, form_headers, load_fixture


def start_supervisor() -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "core.worker"],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def child_pids(pid: int) -> list[int]:
    """The processes `pid` started itself (Linux /proc)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in children.read_text().split()] if children.exists() else []


def wait_until(condition, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def post_lead(client, email: str) -> str:
    payload = load_fixture("form/lead.json")
    payload["submission_id"] = f"worker-{email}"
    payload["fields"].update(email=email, phone="", company="")
    body = as_bytes(payload)
    answer = client.post("/webhooks/form", data=body, headers=form_headers(body))
    assert answer.status_code == 200, answer.json
    return answer.json["event_id"]


def status(event_id: str) -> str:
    with session() as db:
        return db.get(Event, event_id).status


def stop(process: subprocess.Popen) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.stdout.read()


def test_sigterm_lets_the_current_job_finish_and_stops_within_25_s(client, sandbox) -> None:
    # The welcome email takes 6 s to be accepted: the signal arrives while it is on its way.
    sandbox.fault(vendor="google", kind="delay", path="messages/send", count=1, delay_ms=6000)
    supervisor = start_supervisor()
    try:
        event_id = post_lead(client, "graceful@example.org")
        wait_until(lambda: len(sandbox.state()["pipedrive"]["notes"]) == 1, "the deal's note")
        assert status(event_id) == "running"

        # As Heroku does on a restart: every process of the dyno gets SIGTERM.
        worker = child_pids(supervisor.pid)
        os.kill(supervisor.pid, signal.SIGTERM)
        for pid in worker:
            os.kill(pid, signal.SIGTERM)
        signalled = time.monotonic()
        supervisor.wait(timeout=30)
        took = time.monotonic() - signalled
    finally:
        output = stop(supervisor)

    assert supervisor.returncode == 0, output[-3000:]
    assert took < 25
    assert status(event_id) == "succeeded"
    assert len(sandbox.state()["google"]["gmail"]["messages"]) == 1


def test_a_killed_worker_process_is_replaced_and_the_next_lead_is_done(client, sandbox) -> None:
    supervisor = start_supervisor()
    try:
        wait_until(lambda: child_pids(supervisor.pid), "the first worker process")
        first = child_pids(supervisor.pid)[0]
        # Out of memory, say: the kernel kills the worker process, not its supervisor.
        os.kill(first, signal.SIGKILL)
        wait_until(
            lambda: [pid for pid in child_pids(supervisor.pid) if pid != first],
            "a second worker process",
        )

        event_id = post_lead(client, "replaced@example.org")
        wait_until(lambda: status(event_id) == "succeeded", "the lead's run", timeout_s=60)
        assert supervisor.poll() is None
    finally:
        output = stop(supervisor)

    assert "worker process died" in output
    assert len(sandbox.state()["google"]["gmail"]["messages"]) == 1
