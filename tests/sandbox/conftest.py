"""Fixtures: one sandbox served for the whole session, reset before every test."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

from sandbox.testing import SandboxServer

# The shared fixtures sit next to the repository: /work/shared beside /work/main.
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[SandboxServer]:
    """The sandbox on a free port for the whole test session."""
    with SandboxServer() as server:
        yield server


@pytest.fixture
def sandbox(sandbox_server: SandboxServer) -> SandboxServer:
    """The session sandbox, back at its seed."""
    sandbox_server.reset()
    return sandbox_server


@pytest.fixture
def env(sandbox: SandboxServer) -> dict[str, str]:
    """The product's environment variables for the sandbox."""
    return sandbox.env()


@pytest.fixture
def pd(env: dict[str, str]) -> requests.Session:
    """A requests session authenticated for Pipedrive v2, as the product's connector is."""
    session = requests.Session()
    session.headers["x-api-token"] = env["PIPEDRIVE_API_TOKEN"]
    return session


@pytest.fixture
def fixture_json() -> Callable[[str], Any]:
    """A reader for the shared vendor fixtures."""

    def load(name: str) -> Any:
        return json.loads((FIXTURES / name).read_text(encoding="utf-8"))

    return load


class Receiver:
    """A local HTTP endpoint that records what is POSTed to it and answers `statuses` in turn."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        self.arrived = threading.Condition()
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Where to point a subscription."""
        return f"http://127.0.0.1:{self._server.server_port}/hook"

    def _app(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        size = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(size)
        with self.arrived:
            status = self.statuses.pop(0) if self.statuses else 200
            headers = {k[5:].replace("_", "-").title(): v for k, v in environ.items()
                       if k.startswith("HTTP_")}  # fmt: skip
            headers["Content-Type"] = environ.get("CONTENT_TYPE", "")
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None  # an XML body: read "raw"
            self.requests.append(
                {"auth": environ.get("HTTP_AUTHORIZATION"), "body": parsed, "raw": body,
                 "headers": headers}
            )  # fmt: skip
            self.arrived.notify_all()
        start_response(f"{status} X", [("Content-Type", "text/plain")])
        return [b"ok"]

    def wait_for(self, count: int, timeout: float = 5) -> list[dict[str, Any]]:
        """Wait until `count` requests arrived; return them."""
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.requests) >= count, timeout)
            return list(self.requests)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver on a free port."""
    hook = Receiver()
    hook._thread.start()
    yield hook
    hook._server.shutdown()
    hook._server.server_close()
