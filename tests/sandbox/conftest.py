"""Fixtures: one sandbox served for the whole session, reset before every test."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from sandbox.testing import SandboxServer

# The shared fixtures sit next to the repository: /work/shared beside /work/main.
FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"


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
