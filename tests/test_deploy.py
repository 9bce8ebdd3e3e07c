"""Deployment: Procfile, app.json and render.yaml agree; migrations; the CLI; several workers."""

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, as_bytes, form_headers, load_fixture

BIN = Path(sys.executable).parent
PRODUCT_DIRS = ("core", "receivers", "web", "flows", "connectors", "migrations")
# Read by the platforms or by the processes' launchers, not by our code.
# Set by the platform or by the processes themselves (gunicorn.conf.py sets the metrics dir).
PLATFORM_VARS = {
    "PORT",
    "WEB_CONCURRENCY",
    "GUNICORN_THREADS",
    "GUNICORN_LOG_LEVEL",
    "PROMETHEUS_MULTIPROC_DIR",
}


# -- the three deployment files agree ---------------------------------------------------


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip())


def app_json() -> dict[str, Any]:
    return json.loads((ROOT / "app.json").read_text())


def render_yaml() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "render.yaml").read_text())


def _config_refs(tree: Any) -> set[str]:
    if isinstance(tree, dict):
        return set().union(*(_config_refs(v) for v in tree.values()), set())
    if isinstance(tree, list):
        return set().union(*(_config_refs(v) for v in tree), set())
    return set(re.findall(r"\$\{([A-Z0-9_]+)", tree)) if isinstance(tree, str) else set()


def product_env_vars() -> set[str]:
    """Every variable config.yaml references and every one the product's code reads."""
    names = _config_refs(yaml.safe_load((ROOT / "config.yaml").read_text()))
    # os.environ only: a WSGI environ (req.environ["CONTENT_LENGTH"]) is not configuration.
    reads = re.compile(
        r"""(?:os\.environ\.get\(|os\.environ\[|getenv\()\s*["']([A-Z][A-Z0-9_]+)["']"""
    )
    for folder in PRODUCT_DIRS:
        for file in (ROOT / folder).rglob("*.py"):
            names |= set(reads.findall(file.read_text(encoding="utf-8")))
    names |= set(reads.findall((ROOT / "app.py").read_text(encoding="utf-8")))
    return names - PLATFORM_VARS


def render_env(service: dict[str, Any], groups: dict[str, list[dict]]) -> set[str]:
    keys = set()
    for item in service.get("envVars", []):
        if "fromGroup" in item:
            keys |= {entry["key"] for entry in groups[item["fromGroup"]]}
        else:
            keys.add(item["key"])
    return keys


def test_procfile_app_json_and_render_yaml_run_the_same_processes() -> None:
    processes = procfile()
    assert set(processes) == {"web", "worker", "release"}
    assert processes["web"] == 'gunicorn -c gunicorn.conf.py "app:create_app()"'
    assert set(app_json()["formation"]) == {"web", "worker"}

    services = {s["type"]: s for s in render_yaml()["services"]}
    assert services["web"]["startCommand"] == processes["web"]
    assert services["worker"]["startCommand"] == processes["worker"]
    assert services["web"]["preDeployCommand"] == processes["release"] == "alembic upgrade head"
    assert services["web"]["healthCheckPath"] == "/healthz"
    assert services["keyvalue"]["maxmemoryPolicy"] == "noeviction"
    assert (ROOT / ".python-version").read_text().strip() == "3.11"


def test_every_variable_the_product_reads_is_declared_on_both_platforms() -> None:
    wanted = product_env_vars()
    assert {"REDIS_URL", "DATABASE_URL", "PIPEDRIVE_API_TOKEN", "ADMIN_TOKEN"} <= wanted

    manifest = app_json()
    from_addons = {f"{addon['as']}_URL" for addon in manifest["addons"]}
    assert from_addons == {"DATABASE_URL", "REDIS_URL"}
    heroku = set(manifest["env"]) | from_addons
    assert wanted - heroku == set(), "missing from app.json"
    for name, spec in manifest["env"].items():
        assert spec.get("description") and isinstance(spec.get("required"), bool), name

    blueprint = render_yaml()
    groups = {g["name"]: g["envVars"] for g in blueprint["envVarGroups"]}
    for service in blueprint["services"]:
        if service["type"] in ("web", "worker"):
            missing = wanted - render_env(service, groups)
            assert missing == set(), f"missing from render.yaml {service['name']}"


def test_required_variables_are_the_ones_config_yaml_cannot_do_without() -> None:
    values = yaml.safe_dump(yaml.safe_load((ROOT / "config.yaml").read_text()))
    without_default = set(re.findall(r"\$\{([A-Z0-9_]+)\}", values))
    env = app_json()["env"]
    for name in without_default:
        assert env[name]["required"] is True, name


# -- the release command on PostgreSQL ---------------------------------------------------


@pytest.fixture
def empty_postgres() -> Iterator[str]:
    """A throwaway database on the machine's PostgreSQL (127.0.0.1:5432, user postgres)."""
    psycopg = pytest.importorskip("psycopg")
    name = f"salesflow_release_{uuid.uuid4().hex[:8]}"
    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.skip(
            f"no PostgreSQL at 127.0.0.1:5432 for user postgres ({exc.__class__.__name__})"
        )
    yield f"postgres://postgres@127.0.0.1:5432/{name}"  # the form Heroku and Render hand out
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def alembic(database_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATABASE_URL": database_url}
    return subprocess.run(
        [str(BIN / "alembic"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def release(database_url: str) -> None:
    command = shlex.split(procfile()["release"])
    assert command[0] == "alembic"
    done = alembic(database_url, *command[1:])
    assert done.returncode == 0, done.stderr


def revisions() -> list[str]:
    """Revision ids from the first to head."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(Config(str(ROOT / "alembic.ini")))
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def current_revision(database_url: str) -> str:
    done = alembic(database_url, "current")
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[0] if done.stdout.strip() else ""


def test_release_migrates_an_empty_postgres(empty_postgres: str) -> None:
    release(empty_postgres)
    assert current_revision(empty_postgres) == revisions()[-1]
    release(empty_postgres)  # a second release with nothing to do
    assert current_revision(empty_postgres) == revisions()[-1]


def test_release_migrates_a_postgres_at_the_previous_revision(empty_postgres: str) -> None:
    history = revisions()
    previous = history[-2] if len(history) > 1 else "base"
    done = alembic(empty_postgres, "upgrade", history[-1])
    assert done.returncode == 0, done.stderr
    # Down to the previous revision (base when there is one revision) and up again.
    done = alembic(empty_postgres, "downgrade", previous)
    assert done.returncode == 0, done.stderr
    assert current_revision(empty_postgres) == ("" if previous == "base" else previous)

    release(empty_postgres)
    assert current_revision(empty_postgres) == history[-1]


# -- flask check-config -----------------------------------------------------------------


def flask(*args: str, env: dict[str, str], unset: tuple[str, ...] = ()) -> Any:
    environ = {k: v for k, v in {**os.environ, **env}.items() if k not in unset}
    return subprocess.run(
        [str(BIN / "flask"), "--app", "app", *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def broken_config(tmp_path: Path, change: Any) -> Path:
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    change(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


SECRETS_ONLY = {
    "TYPEFORM_WEBHOOK_SECRET": "t",
    "FORM_WEBHOOK_SECRET": "f",
    "PIPEDRIVE_API_TOKEN": "p",
    "GOOGLE_CLIENT_ID": "c",
    "GOOGLE_CLIENT_SECRET": "s",
    "GOOGLE_REFRESH_TOKEN": "r",
    "FACEBOOK_APP_SECRET": "a",
    "FACEBOOK_VERIFY_TOKEN": "v",
    "FACEBOOK_PAGE_ACCESS_TOKEN": "g",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
}


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda c: c["lead_capture"].pop("stage"), "lead_capture.stage"),
        (lambda c: c["reps"][0].update(pipedrive_user_id="luka"), "reps.0.pipedrive_user_id"),
        (
            lambda c: c["lead_capture"].update(deal_title="{{ lead.email"),
            "lead_capture.deal_title",
        ),
        (
            lambda c: c["lead_capture"]["welcome_email"].update(subject="{% if %}"),
            "lead_capture.welcome_email.subject",
        ),
    ],
    ids=["missing-key", "wrong-type", "deal-title-template", "subject-template"],
)
def test_check_config_names_the_bad_key(tmp_path: Path, change: Any, key: str) -> None:
    path = broken_config(tmp_path, change)
    done = flask("check-config", env={**SECRETS_ONLY, "CONFIG_PATH": str(path)})

    assert done.returncode != 0
    assert f"error: {key}: " in done.stdout, done.stdout + done.stderr
    assert "problem" in done.stderr


def test_check_config_lists_every_unset_variable() -> None:
    unset = ("PIPEDRIVE_API_TOKEN", "GOOGLE_REFRESH_TOKEN")
    env = {**SECRETS_ONLY, "CONFIG_PATH": str(ROOT / "config.yaml")}
    done = flask("check-config", env=env, unset=unset)

    assert done.returncode != 0
    assert "pipedrive.api_token: the environment variable PIPEDRIVE_API_TOKEN" in done.stdout
    assert "google.refresh_token: the environment variable GOOGLE_REFRESH_TOKEN" in done.stdout


def test_check_config_online_passes_against_the_sandbox(app) -> None:
    result = app.test_cli_runner().invoke(args=["check-config", "--online"])

    assert result.exit_code == 0, result.output
    assert "is ready (vendors checked)" in result.output
    # Davit is an inactive Pipedrive user in the sandbox: a warning, the rotation skips him.
    assert "warning: reps[2].pipedrive_user_id" in result.output


def test_check_config_online_names_a_missing_stage_and_field(app, tmp_path, monkeypatch) -> None:
    from connectors import registry

    def change(config: dict) -> None:
        config["lead_capture"]["stage"] = "Nowhere"
        config["lead_capture"]["custom_fields"]["Shoe size"] = "answers.shoe"

    monkeypatch.setenv("CONFIG_PATH", str(broken_config(tmp_path, change)))
    registry.reset()
    result = app.test_cli_runner().invoke(args=["check-config", "--online"])
    registry.reset()

    assert result.exit_code != 0
    assert "error: lead_capture.stage: " in result.output
    assert "error: lead_capture.custom_fields.Shoe size: " in result.output


# -- the other commands -----------------------------------------------------------------


def test_setup_commands_are_registered(app) -> None:
    listing = app.test_cli_runner().invoke(args=["--help"]).output
    for name in (
        "check-config",
        "google-auth",
        "docusign-consent",
        "register-webhooks",
        "simulate",
        "migrate",
        "sweep",
    ):
        assert name in listing


def test_google_auth_builds_an_installed_app_flow_with_every_scope() -> None:
    import cli

    flow = cli.google_flow("client-123.apps.googleusercontent.com", "shh")
    assert flow.client_type == "installed"
    assert flow.client_config["client_id"] == "client-123.apps.googleusercontent.com"
    assert flow.client_config["token_uri"] == "https://oauth2.googleapis.com/token"
    assert set(flow.oauth2session.scope) == {
        f"https://www.googleapis.com/auth/{name}"
        for name in ("gmail.send", "gmail.readonly", "calendar.events", "drive.file", "documents")
    }


def test_google_auth_runs_without_a_loadable_config(tmp_path: Path) -> None:
    done = flask("google-auth", "--help", env={"CONFIG_PATH": str(tmp_path / "absent.yaml")})
    assert done.returncode == 0, done.stderr
    assert "GOOGLE_REFRESH_TOKEN" in done.stdout


def test_docusign_consent_prints_the_demo_url(app, monkeypatch) -> None:
    monkeypatch.setenv("DOCUSIGN_INTEGRATION_KEY", "4f1c-key")
    monkeypatch.delenv("DOCUSIGN_OAUTH_HOST", raising=False)
    result = app.test_cli_runner().invoke(
        args=["docusign-consent", "--redirect-uri", "https://example.org/ds"]
    )

    assert result.exit_code == 0, result.output
    assert (
        "https://account-d.docusign.com/oauth/auth?response_type=code"
        "&scope=signature%20impersonation&client_id=4f1c-key"
        "&redirect_uri=https%3A%2F%2Fexample.org%2Fds"
    ) in result.output

    production = app.test_cli_runner().invoke(args=["docusign-consent", "--production"])
    assert "https://account.docusign.com/oauth/auth?" in production.output


def test_register_webhooks_prints_the_urls(app) -> None:
    result = app.test_cli_runner().invoke(
        args=["register-webhooks", "--base-url", "https://sales.example.org/"]
    )

    assert result.exit_code == 0
    for route in ("typeform", "facebook", "form", "docusign"):
        assert f"https://sales.example.org/webhooks/{route}" in result.output
    assert "webhooks v2 to https://sales.example.org/webhooks/pipedrive" in result.output
    assert "typeform-test-secret" not in result.output  # names secrets, never prints them


@pytest.fixture
def running_app(app) -> Iterator[str]:
    """The app served over HTTP on a free port, as a deployed instance would be."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=5)


@pytest.mark.parametrize(
    ("source", "fixture"),
    [("typeform", "typeform/form_response.json"), ("form", "form/lead.json")],
)
def test_simulate_posts_a_signed_fixture(app, running_app, source, fixture) -> None:
    from tests.conftest import FIXTURES, queued_job_ids

    result = app.test_cli_runner().invoke(
        args=["simulate", source, str(FIXTURES / fixture), "--url", running_app]
    )

    assert result.exit_code == 0, result.output
    answer = json.loads(result.output.split(" ", 1)[1])
    assert answer["status"] == "queued"
    assert queued_job_ids() == [answer["event_id"]]


def test_simulate_with_the_wrong_secret_is_refused(app, running_app) -> None:
    from tests.conftest import FIXTURES

    result = app.test_cli_runner().invoke(
        args=[
            "simulate",
            "form",
            str(FIXTURES / "form/lead.json"),
            "--url",
            running_app,
            "--secret",
            "not-the-secret",
        ]
    )
    assert result.exit_code != 0
    assert result.output.startswith("401 ")


# -- several workers at once ------------------------------------------------------------


def start_workers(count: int, *flags: str) -> list[subprocess.Popen]:
    command = [
        str(BIN / "rq"),
        "worker",
        "--burst",
        *flags,
        "--worker-class",
        "core.flow_worker.FlowWorker",
        "--url",
        os.environ["REDIS_URL"],
        "flows",
    ]
    return [
        subprocess.Popen(
            command,
            cwd=ROOT,
            env=dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(count)
    ]


def wait_for(workers: list[subprocess.Popen], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    for worker in workers:
        try:
            worker.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for other in workers:
                other.kill()
            pytest.fail("the workers did not drain the queue in time")
        assert worker.returncode == 0, worker.stdout.read()[-3000:]


def lead(index: int, email: str) -> dict[str, Any]:
    payload = load_fixture("form/lead.json")
    payload["submission_id"] = f"scale-{index}"
    payload["fields"].update(email=email, phone="", company="", name=f"Lead {index}")
    return payload


def assert_each_run_once(event_ids: list[str]) -> None:
    from sqlalchemy import select

    from core.store import Event, FlowRun, session

    with session() as db:
        statuses = Counter(db.scalars(select(Event.status).where(Event.id.in_(event_ids))))
        attempts = Counter(db.scalars(select(FlowRun.attempts)))
    assert statuses == {"succeeded": len(event_ids)}
    # One job per event: no worker picked up an event another one already ran.
    assert attempts == {1: len(event_ids)}


def test_three_workers_drain_a_burst_without_duplicating_anything(client, sandbox) -> None:
    persons_before = len(sandbox.state()["pipedrive"]["persons"])
    # 50 new addresses; 10 more submissions reuse an address (same person, its own deal).
    emails = [f"burst{i}@example.org" for i in range(50)] + [
        f"burst{i}@example.org" for i in range(10)
    ]
    event_ids = []
    for index, address in enumerate(emails):
        body = as_bytes(lead(index, address))
        answer = client.post("/webhooks/form", data=body, headers=form_headers(body))
        assert answer.json["status"] == "queued"
        event_ids.append(answer.json["event_id"])

    wait_for(start_workers(3))

    state = sandbox.state()
    pipedrive, sent = state["pipedrive"], state["google"]["gmail"]["messages"]
    new_persons = pipedrive["persons"][persons_before:]
    addresses = Counter(e["value"].lower() for person in new_persons for e in person["emails"])
    assert len(new_persons) == 50 and max(addresses.values()) == 1
    assert len(pipedrive["deals"]) == 60
    assert Counter(n["deal_id"] for n in pipedrive["notes"]) == Counter(
        {d["id"]: 1 for d in pipedrive["deals"]}
    )
    assert len(sent) == 60
    assert_each_run_once(event_ids)


def test_three_scheduler_workers_move_each_scheduled_job_once(client) -> None:
    from core import queue, store

    event_ids = []
    for index in range(15):
        body = as_bytes(lead(100 + index, f"later{index}@example.org"))
        event_ids.append(
            client.post("/webhooks/form", data=body, headers=form_headers(body)).json["event_id"]
        )
    # Move every job to the scheduled registry, due already: the retry path does the same.
    rq_queue = queue.queue()
    rq_queue.empty()
    for event_id in event_ids:
        rq_queue.enqueue_at(
            store.utcnow() - timedelta(seconds=1),
            queue.JOB_FUNCTION,
            event_id,
            job_id=event_id,
            result_ttl=0,
        )

    wait_for(start_workers(3, "--with-scheduler"))

    assert rq_queue.count == 0
    assert_each_run_once(event_ids)
