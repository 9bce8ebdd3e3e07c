"""Schemathesis against the running app: no 5xx and every answer as docs/openapi.yaml says."""

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from werkzeug.serving import make_server

SPEC = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
schema = schemathesis.openapi.from_path(SPEC)


@pytest.fixture(scope="module")
def live_app(environment: dict[str, str]) -> Iterator[str]:
    """The real app on a free port, served like a web process (not a test client)."""
    from app import create_app

    server = make_server("127.0.0.1", 0, create_app(), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_the_api_keeps_its_contract(case, live_app: str) -> None:
    from core import queue

    before = queue.queue().count
    case.call_and_validate(base_url=live_app)
    # Generated input is unsigned or malformed: none of it may reach the queue.
    assert queue.queue().count == before
