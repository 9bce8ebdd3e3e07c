"""Processes, environment and payloads the benchmarks share: all on loopback, all bounded."""

import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psutil
import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FIXTURE = ROOT / "tests" / "fixtures" / "typeform" / "form_response.json"
# Its own database index: the test suite flushes 15, the demo uses an embedded server.
REDIS_URL = "redis://127.0.0.1:6379/12"
POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
POSTGRES_DB = "salesflow_bench"
SECRETS = {
    "TYPEFORM_WEBHOOK_SECRET": "bench-typeform-secret",
    "FORM_WEBHOOK_SECRET": "bench-form-secret",
    "ADMIN_TOKEN": "bench-admin-token",
    "PUBLIC_BASE_URL": "http://127.0.0.1:8000",
}


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(check: Callable[[], Any], what: str, timeout_s: float = 30.0) -> Any:
    """Poll check() until it returns something truthy, or fail naming what did not happen."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (requests.RequestException, OSError):
            pass
        time.sleep(0.05)
    raise SystemExit(f"bench: {what} did not happen within {timeout_s:.0f} s")


class Bench:
    """One run's services: Redis db, a store, the emulators, and the processes it starts."""

    def __init__(self, stack: ExitStack, postgres: bool) -> None:
        self.stack = stack
        self.workdir = Path(tempfile.mkdtemp(prefix="salesflow-bench-"))
        if not os.environ.get("BENCH_KEEP"):
            stack.callback(shutil.rmtree, self.workdir, ignore_errors=True)
        self.env = {**os.environ, **SECRETS, "CONFIG_PATH": str(ROOT / "config.yaml")}
        # Secrets config.yaml requires that the bench does not know by name: any value works.
        for name in _required_variables(ROOT / "config.yaml"):
            self.env.setdefault(name, f"bench-{name.lower()}")
        self.env["REDIS_URL"] = self._redis()
        self.env["DATABASE_URL"] = self._database(postgres)
        self.env["GUNICORN_LOG_LEVEL"] = "warning"
        self.sandbox_url = self._sandbox()
        os.environ.update(self.env)

    # -- services ----------------------------------------------------------------------

    def _redis(self) -> str:
        try:
            redis.Redis.from_url(REDIS_URL).ping()
            url = REDIS_URL
        except redis.RedisError:
            from core.queue import start_embedded_redis

            server, url = start_embedded_redis(self.workdir / "redis")
            self.stack.callback(lambda: server.shutdown(nosave=True))
        client = redis.Redis.from_url(url)
        client.flushdb()
        self.stack.callback(client.flushdb)
        return url

    def _database(self, postgres: bool) -> str:
        if not postgres:
            return f"sqlite:///{self.workdir / 'bench.db'}"
        import psycopg

        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {POSTGRES_DB} WITH (FORCE)")
            admin.execute(f"CREATE DATABASE {POSTGRES_DB}")

        def drop() -> None:
            with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
                admin.execute(f"DROP DATABASE IF EXISTS {POSTGRES_DB} WITH (FORCE)")

        self.stack.callback(drop)
        return f"postgresql://postgres@127.0.0.1:5432/{POSTGRES_DB}"

    def _sandbox(self) -> str:
        port = free_port()
        self.start("sandbox", [sys.executable, "-m", "sandbox", "--port", str(port)])
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: requests.get(f"{url}/_sandbox/health", timeout=1).ok, "sandbox start")
        self.env.update(requests.get(f"{url}/_sandbox/env", timeout=5).json())
        return url

    def reset_store(self) -> None:
        """Fresh tables, an empty queue and fresh emulators between benchmarks."""
        from core import queue
        from core.migrate import upgrade_database
        from core.store import Base, engine, reset_engine

        reset_engine()
        Base.metadata.drop_all(engine())
        with engine().begin() as connection:
            connection.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
        upgrade_database()
        reset_engine()
        queue.connection.cache_clear()
        queue.connection().flushdb()
        requests.post(f"{self.sandbox_url}/_sandbox/reset", timeout=10).raise_for_status()

    def set_latency(self, latency_ms: int) -> None:
        """Added latency on every emulator call."""
        requests.post(
            f"{self.sandbox_url}/_sandbox/config", json={"latency_ms": latency_ms}, timeout=10
        ).raise_for_status()

    def sandbox_state(self) -> dict[str, Any]:
        """Everything the emulators hold."""
        return requests.get(f"{self.sandbox_url}/_sandbox/state", timeout=60).json()

    # -- processes ---------------------------------------------------------------------

    def start(
        self, name: str, command: list[str], extra: dict[str, str] | None = None
    ) -> subprocess.Popen:
        """A child process logging to the work dir; stopped (SIGTERM, then kill) at the end."""
        log = (self.workdir / f"{name}.log").open("a")
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**self.env, **(extra or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.stack.callback(stop, process)
        self.stack.callback(log.close)
        return process

    def gunicorn(self, app: str) -> tuple[subprocess.Popen, str]:
        """The production web command (gunicorn.conf.py) serving `app`; returns it and its URL."""
        port = free_port()
        command = [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", app]
        process = self.start(f"web-{port}", command, {"PORT": str(port)})
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _listening(port), f"gunicorn {app} start")
        if app.startswith("app:"):
            wait_until(
                lambda: requests.get(f"{url}/healthz", timeout=2).ok, "the web's /healthz 200"
            )
        return process, url

    def worker(self, index: int) -> subprocess.Popen:
        """The Procfile's queue worker command, or `rq worker` with BENCH_WORKER_CLASS."""
        command = [sys.executable, "-m", "core.worker"]
        worker_class = os.environ.get("BENCH_WORKER_CLASS")
        if worker_class:
            command = [
                str(BIN / "rq"),
                "worker",
                "--with-scheduler",
                "--worker-class",
                worker_class,
                "--url",
                self.env["REDIS_URL"],
                "--logging_level",
                "WARNING",
                "flows",
            ]
        return self.start(f"worker-{index}", command)


def _required_variables(path: Path) -> set[str]:
    """The ${VAR} references of a config file that have no default."""
    return set(re.findall(r"\$\{([A-Z0-9_]+)\}", path.read_text(encoding="utf-8")))


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, wait, then kill: only this process, which the bench started."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


# -- payloads ------------------------------------------------------------------------------


def typeform_deliveries(count: int, tag: str) -> Iterator[tuple[str, bytes]]:
    """Signed Typeform bodies, each with its own token and email: (signature, body)."""
    from core.signatures import sign_base64_sha256

    secret = SECRETS["TYPEFORM_WEBHOOK_SECRET"]
    template = json.loads(FIXTURE.read_text(encoding="utf-8"))
    for index in range(count):
        payload = copy.deepcopy(template)
        response = payload["form_response"]
        response["token"] = f"bench{tag}{index:08d}"
        payload["event_id"] = f"01BENCH{tag}{index:08d}"
        for answer in response["answers"]:
            # Each lead a new person: unique address and phone (search matches either).
            if answer["type"] == "email":
                answer["email"] = f"lead.{tag}.{index}@bench.example"
            if answer["type"] == "phone_number":
                answer["phone_number"] = f"+995599{index % 1_000_000:06d}"
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        yield sign_base64_sha256(secret, body), body


# -- memory --------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """Resident memory of one process, in MB, from /proc."""
    return psutil.Process(pid).memory_info().rss / 1024 / 1024


def children(process: subprocess.Popen) -> list[psutil.Process]:
    """The live child processes of a process the bench started."""
    try:
        return psutil.Process(process.pid).children()
    except psutil.NoSuchProcess:
        return []
