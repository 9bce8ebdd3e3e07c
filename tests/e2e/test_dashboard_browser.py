"""The dashboard in a real browser: Playwright driving Debian's Chromium against the real app."""

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import func, select
from werkzeug.serving import make_server

from connectors import registry
from core.store import Event, Step, session
from tests.conftest import (
    ROOT,
    SECRETS,
    as_bytes,
    form_headers,
    load_fixture,
    run_worker,
    typeform_headers,
)

CHROMIUM = Path("/usr/bin/chromium")
# This machine's closed network: no background fetches, no QUIC, no component updates.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install chromium; CI does)",
)


@pytest.fixture
def live_app(clean: None) -> Iterator[str]:
    """The real app (not in testing mode) on a free loopback port, in a thread."""
    from app import create_app

    server = make_server("127.0.0.1", 0, create_app(), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=5)


@pytest.fixture
def browser_page() -> Iterator[Any]:
    """A Chromium page; console errors (a CSP refusal, a script error) are collected."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.console_errors = []
        page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
        page.on("pageerror", lambda exc: page.console_errors.append(str(exc)))
        page.refused = []
        page.on("response", lambda r: r.status >= 400 and page.refused.append(r.url))
        yield page
        browser.close()


def post_webhook(base: str, path: str, payload: dict[str, Any], headers: Any) -> str:
    body = as_bytes(payload)
    answer = requests.post(base + path, data=body, headers=headers(body), timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()["event_id"]


def second_form_lead() -> dict[str, Any]:
    payload = load_fixture("form/lead.json")
    payload["submission_id"] = "web-2026-12-02-000318"
    payload["fields"].update(
        name="Marko Horvat", email="marko@example.hr", phone="+385 91 765 4321"
    )
    return payload


def stored_numbers() -> dict[str, Any]:
    """What the overview should say, read from the store."""
    with session() as db:
        leads = db.scalar(select(func.count()).where(Event.status != "ignored"))
        speeds = db.scalars(select(Step.output).where(Step.name == "send_welcome_email")).all()
    values = sorted(output["speed_to_lead_ms"] / 1000 for output in speeds)
    middle = len(values) // 2
    median = values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2
    return {"leads": leads, "welcomes": len(values), "median": median}


def test_an_operator_finds_a_lead_replays_a_failure_and_reads_the_overview(
    live_app: str, browser_page: Any, sandbox: Any, monkeypatch: Any
) -> None:
    from playwright.sync_api import expect

    page, base = browser_page, live_app
    ARTIFACTS.mkdir(exist_ok=True)

    # Sign in: every page sends a stranger to the login form first.
    page.goto(f"{base}/dashboard/events")
    expect(page).to_have_url(re.compile(r"/dashboard/login\?next=/dashboard/events"))
    page.fill("input[name=password]", SECRETS["ADMIN_TOKEN"])
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{base}/dashboard/events")

    # A lead that dead-letters (Pipedrive refuses the token), then two that go through.
    monkeypatch.setenv("PIPEDRIVE_API_TOKEN", "wrong-token")
    registry.reset()
    failed = post_webhook(base, "/webhooks/form", second_form_lead(), form_headers)
    run_worker()
    monkeypatch.undo()
    registry.reset()
    typeform = load_fixture("typeform/form_response.json")
    found = post_webhook(base, "/webhooks/typeform", typeform, typeform_headers)
    post_webhook(base, "/webhooks/form", load_fixture("form/lead.json"), form_headers)
    run_worker()

    # Find the Typeform lead by its address (typed with capitals and a +tag) and open it.
    page.fill("input[name=q]", "nino.beridze+typeform@example.com")
    page.click("form.filters button[type=submit]")
    rows = page.locator("#events tbody tr[data-event-id]")
    expect(rows).to_have_count(1)
    rows.first.locator("a").click()
    expect(page).to_have_url(f"{base}/dashboard/events/{found}")
    expect(page.locator("h1 .status")).to_have_text("succeeded")
    expect(page.locator("tr[data-step=send_welcome_email] .status")).to_have_text("succeeded")
    assert "N***" in page.inner_text("#event-input")
    assert "Nino" not in page.content() and "Beridze" not in page.content()
    page.screenshot(path=str(ARTIFACTS / "dashboard-event.png"), full_page=True)

    # The failed one: filter, open, replay, and watch the status change by itself.
    page.goto(f"{base}/dashboard/events")
    page.select_option("select[name=status]", "failed")
    page.click("form.filters button[type=submit]")
    expect(page.locator("#events tbody tr[data-event-id]")).to_have_count(1)
    page.click(f"tr[data-event-id='{failed}'] a")
    expect(page.locator("h1 .status")).to_have_text("failed")
    expect(page.locator("#event-reason")).to_contain_text("401")
    page.click("#replay")
    expect(page.locator("h1 .status")).to_have_text("queued")
    expect(page.locator(".flash")).to_contain_text("queued again")
    run_worker()
    # The page refreshes itself while the event waits for a worker.
    expect(page.locator("h1 .status")).to_have_text("succeeded", timeout=15_000)
    expect(page.locator("tr[data-step=create_deal][data-attempt='2']")).to_have_count(1)
    page.screenshot(path=str(ARTIFACTS / "dashboard-event-replayed.png"), full_page=True)

    # The overview says what the store says.
    page.goto(f"{base}/dashboard/overview")
    expected = stored_numbers()
    assert expected["leads"] == 3 and expected["welcomes"] == 3
    expect(page.locator("[data-metric=leads-today]")).to_have_text(str(expected["leads"]))
    expect(page.locator("[data-metric=leads-week]")).to_have_text(str(expected["leads"]))
    median = f"{expected['median']:.1f} s"
    expect(page.locator("[data-metric=speed-median-today]")).to_have_text(median)
    expect(page.locator("#leads-by-source tr[data-source=form] td").nth(1)).to_have_text("2")
    expect(page.locator("#leads-by-source tr[data-source=typeform] td").nth(1)).to_have_text("1")
    leads_per_rep = page.locator("#assignment tr[data-rep] td.num").all_inner_texts()
    assert sum(int(count) for count in leads_per_rep) == 3
    expect(page.locator("#speed-chart")).to_have_attribute("data-drawn", "true")
    page.screenshot(path=str(ARTIFACTS / "dashboard-overview.png"), full_page=True)

    # Queues, and rq-dashboard behind the same login.
    page.click("nav >> text=Queues")
    expect(page.locator("[data-metric=queued]")).to_have_text("0")
    assert page.console_errors == [] and page.refused == []
    page.goto(f"{base}/dashboard/rq/")
    expect(page).to_have_title(re.compile("RQ dashboard"))
    expect(page.locator("body")).to_contain_text("flows")
    # rq-dashboard links a favicon at the site root, which we do not serve.
    assert [url for url in page.refused if not url.endswith("/static/favicon.ico")] == []


def test_signing_out_closes_the_dashboard(live_app: str, browser_page: Any) -> None:
    from playwright.sync_api import expect

    page, base = browser_page, live_app
    page.goto(f"{base}/dashboard/login")
    page.fill("input[name=password]", "not-the-token")
    page.click("button[type=submit]")
    expect(page.locator(".error")).to_contain_text("do not match")
    page.refused.clear()  # the 401 of the wrong password
    page.console_errors.clear()
    page.fill("input[name=password]", SECRETS["ADMIN_TOKEN"])
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{base}/dashboard/overview")

    page.click(".signout button")
    expect(page).to_have_url(f"{base}/dashboard/login")
    page.goto(f"{base}/dashboard/overview")
    expect(page).to_have_url(re.compile(r"/dashboard/login"))
    assert page.console_errors == [] and page.refused == []
