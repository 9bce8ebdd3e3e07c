"""Fault injection, settings and the control API; the sandbox as a separate process."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import requests
import urllib3
from pipedrive.client import Client

from sandbox.testing import SandboxError, SandboxServer

REPO = Path(__file__).resolve().parents[2]


def pipelines_url(env: dict[str, str]) -> str:
    return env["PIPEDRIVE_BASE_URL"] + "/api/v2/pipelines"


def test_429_fault_hits_exactly_count_calls_under_concurrency(
    sandbox: SandboxServer, pd: requests.Session, env: dict[str, str]
) -> None:
    sandbox.fault(vendor="pipedrive", kind="429", count=3, reset_s=7)
    token = {"x-api-token": env["PIPEDRIVE_API_TOKEN"]}

    def call(_: int) -> requests.Response:
        return requests.get(pipelines_url(env), headers=token, timeout=5)

    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        responses = list(pool.map(call, range(12)))

    limited = [r for r in responses if r.status_code == 429]
    assert len(limited) == 3
    assert sum(r.status_code == 200 for r in responses) == 9
    assert limited[0].headers["x-ratelimit-remaining"] == "0"
    assert limited[0].headers["x-ratelimit-reset"] == "7"
    assert "x-ratelimit-limit" in limited[0].headers
    assert limited[0].json()["errorCode"] == 429
    assert sandbox.state()["faults"] == []


def test_fault_matches_method_and_path(
    sandbox: SandboxServer, pd: requests.Session, env: dict[str, str]
) -> None:
    sandbox.fault(vendor="pipedrive", method="POST", path=r"^/api/v2/deals$", kind="500")
    deals_url = env["PIPEDRIVE_BASE_URL"] + "/api/v2/deals"

    assert pd.get(deals_url, timeout=5).status_code == 200
    assert pd.post(deals_url, json={"title": "T"}, timeout=5).status_code == 500
    assert pd.post(deals_url, json={"title": "T"}, timeout=5).status_code == 200


def test_502_is_an_html_page_the_library_returns_as_text(
    sandbox: SandboxServer, env: dict[str, str]
) -> None:
    sandbox.fault(vendor="pipedrive", path="/v1/users", kind="502")
    client = Client(domain=env["PIPEDRIVE_BASE_URL"])
    client.set_api_token(env["PIPEDRIVE_API_TOKEN"])

    result = client.users.get_all_users()

    assert isinstance(result, str) and "502 Bad Gateway" in result


def test_delay_fault_slows_one_call(
    sandbox: SandboxServer, pd: requests.Session, env: dict[str, str]
) -> None:
    sandbox.fault(vendor="pipedrive", kind="delay", delay_ms=400)

    started = time.monotonic()
    slow = pd.get(pipelines_url(env), timeout=5)
    slow_s = time.monotonic() - started
    started = time.monotonic()
    pd.get(pipelines_url(env), timeout=5)
    fast_s = time.monotonic() - started

    assert slow.status_code == 200
    assert slow_s >= 0.4 > fast_s


def test_timeout_fault_applies_the_call_but_answers_late(
    sandbox: SandboxServer, pd: requests.Session, env: dict[str, str]
) -> None:
    sandbox.fault(vendor="pipedrive", method="POST", kind="timeout", delay_ms=5000)

    with pytest.raises(requests.exceptions.ReadTimeout):
        pd.post(env["PIPEDRIVE_BASE_URL"] + "/api/v2/deals", json={"title": "Twice?"}, timeout=0.3)
    sandbox.clear_faults()

    assert [d["title"] for d in sandbox.state()["pipedrive"]["deals"]] == ["Twice?"]


def test_probability_fault_stays_until_cleared(
    sandbox: SandboxServer, pd: requests.Session, env: dict[str, str]
) -> None:
    sandbox.fault(vendor="*", kind="503", probability=1)

    assert [pd.get(pipelines_url(env), timeout=5).status_code for _ in range(3)] == [503] * 3
    sandbox.clear_faults()
    assert pd.get(pipelines_url(env), timeout=5).status_code == 200


def test_google_429_and_500_are_google_shaped(sandbox: SandboxServer, env: dict[str, str]) -> None:
    access = requests.post(
        env["GOOGLE_TOKEN_URL"],
        data={
            "grant_type": "refresh_token",
            "client_id": env["GOOGLE_CLIENT_ID"],
            "client_secret": env["GOOGLE_CLIENT_SECRET"],
            "refresh_token": env["GOOGLE_REFRESH_TOKEN"],
        },
        timeout=5,
    ).json()["access_token"]
    sandbox.fault(vendor="google", path="/gmail/", kind="429", reset_s=3)
    sandbox.fault(vendor="google", path="/gmail/", kind="500")
    url = env["GOOGLE_API_BASE_URL"] + "gmail/v1/users/me/messages"
    headers = {"Authorization": f"Bearer {access}"}

    limited = requests.get(url, headers=headers, timeout=5)
    failed = requests.get(url, headers=headers, timeout=5)

    assert limited.status_code == 429 and limited.headers["Retry-After"] == "3"
    assert limited.json()["error"]["errors"][0]["reason"] == "rateLimitExceeded"
    assert limited.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert failed.status_code == 500 and failed.json()["error"]["code"] == 500
    assert requests.get(url, headers=headers, timeout=5).status_code == 200


def test_latency_setting_slows_vendor_calls_only(
    sandbox: SandboxServer, pd: requests.Session, env: dict[str, str]
) -> None:
    sandbox.configure(latency_ms=200)

    started = time.monotonic()
    pd.get(pipelines_url(env), timeout=5)
    assert time.monotonic() - started >= 0.2
    started = time.monotonic()
    sandbox.state()
    assert time.monotonic() - started < 0.2


def test_bad_control_requests_are_400(sandbox: SandboxServer) -> None:
    with pytest.raises(SandboxError, match="kind"):
        sandbox.fault(vendor="pipedrive", kind="418")
    with pytest.raises(SandboxError, match="Unknown fault spec keys"):
        sandbox.fault(vendor="pipedrive", kind="500", times=2)
    with pytest.raises(SandboxError, match="Unknown settings"):
        sandbox.configure(speed=11)
    with pytest.raises(SandboxError, match="integer"):
        sandbox.configure(latency_ms=-1)


def test_reset_returns_to_seed(
    sandbox: SandboxServer, pd: requests.Session, env: dict[str, str]
) -> None:
    pd.post(env["PIPEDRIVE_BASE_URL"] + "/api/v2/persons", json={"name": "Temp"}, timeout=5)
    sandbox.configure(pipedrive_rate_limit=5)
    sandbox.reset()

    state = sandbox.state()
    assert [p["id"] for p in state["pipedrive"]["persons"]] == [1842]
    assert state["config"]["pipedrive_rate_limit"] == 0
    assert state["calls"] == []


def test_module_serves_in_its_own_process() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "sandbox", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line == f"sandbox listening on http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_sandbox/health", timeout=5) as r:
            assert json.loads(r.read()) == {"status": "ok"}
        # Like the vendors, it keeps a connection open for the next call.
        pool = urllib3.HTTPConnectionPool("127.0.0.1", port, maxsize=1)
        for _ in range(3):
            assert pool.request("GET", "/_sandbox/health").status == 200
        assert pool.num_connections == 1
    finally:
        process.terminate()
        process.wait(timeout=5)
