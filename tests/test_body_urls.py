"""No URL inside a webhook body is fetched: every URL in each source's fixture points at a trap.

Issue 6 asks that the product fetch no URL taken from a webhook body unless its host is a
vendor's. No receiver or flow reads one today (vendor calls go to config.yaml's base URLs with
ids from the body), so this proves the property: each fixture's URLs are rewritten to a local
trap server, the payload is posted signed, the worker runs the flow against the emulators, the
flow does its usual work, and the trap must have seen no connection at all.
"""

import copy
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import select

from core.store import ContractEnvelope, Event, FlowRun, session
from sandbox import facebook as graph
from tests.conftest import FIXTURES, load_fixture, run_worker
from tests.test_contract import use_contracts
from tests.test_docusign_webhook import KEY, deal_of, files_of, sent_envelope, signed_headers
from tests.test_facebook import post as post_facebook
from tests.test_follow_up import LUKA, NINO, PROPOSAL_MADE, activities, calendar, emails
from tests.test_lead_flow import event_status, messages, pipedrive, post_form, post_typeform
from tests.test_pipedrive_webhooks import post as post_pipedrive

URL = re.compile(r"^https?://", re.IGNORECASE)
# The fixtures' own envelope and account; the test swaps in the emulator's.
FIXTURE_ENVELOPE = "a170b338-3926-4059-b28c-105d1fb17c23"
FIXTURE_ACCOUNT = "8d116ece-1738-47d9-bd9c-172411e20b8f"
DOCUSIGN_HOST = "https://demo.docusign.net"


# -- the trap -----------------------------------------------------------------------------


class _TrapServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, trap: "Trap") -> None:
        super().__init__(("127.0.0.1", 0), _TrapHandler)
        self.trap = trap

    def verify_request(self, request: Any, client_address: Any) -> bool:
        # Every accepted connection counts, so an https:// attempt (a TLS hello this plain
        # server cannot parse) is caught as surely as a GET.
        with self.trap.lock:
            self.trap.connections += 1
        return True


class _TrapHandler(BaseHTTPRequestHandler):
    server: _TrapServer

    def _record(self) -> None:
        with self.server.trap.lock:
            self.server.trap.requests.append(
                (self.command, self.path, self.headers.get("Host", ""))
            )
        body = b"trap"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _record

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Trap:
    """An HTTP server on 127.0.0.1 that records every connection and request it gets."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connections = 0
        self.requests: list[tuple[str, str, str]] = []
        self._server = _TrapServer(self)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT."""
        return f"http://127.0.0.1:{self._server.server_port}"

    @property
    def host(self) -> str:
        """127.0.0.1:PORT, as a Host header or a bare host field names it."""
        return f"127.0.0.1:{self._server.server_port}"

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def assert_untouched(self) -> None:
        """Nothing connected: no flow or receiver followed a URL from the body."""
        with self.lock:
            seen = (self.connections, list(self.requests))
        assert seen == (0, []), f"the trap was contacted: {seen[0]} connections, {seen[1]}"


@pytest.fixture
def trap() -> Iterator[Trap]:
    """A fresh trap server for one test."""
    server = Trap()
    server.start()
    yield server
    server.stop()


# -- pointing a body's URLs at the trap ---------------------------------------------------


@dataclass
class Rewriter:
    """Points every http(s) URL of one source's body at the trap and remembers the originals."""

    trap: Trap
    source: str
    originals: list[str] = field(default_factory=list)

    def url(self, original: str) -> str:
        """http://127.0.0.1:PORT/<source>/<original path and query>."""
        self.originals.append(original)
        parts = urlsplit(original)
        query = f"?{parts.query}" if parts.query else ""
        return f"{self.trap.url}/{self.source}{parts.path or '/'}{query}"

    def json(self, value: Any) -> Any:
        """The JSON value with every string that is a URL rewritten, at any depth."""
        if isinstance(value, dict):
            return {key: self.json(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.json(item) for item in value]
        if isinstance(value, str) and URL.match(value):
            return self.url(value)
        return value

    def xml(self, body: bytes) -> bytes:
        """The XML with every URL in element text or attribute values rewritten."""
        text = body.decode("utf-8")
        # Namespace declarations stay: they name the vocabulary, no parser fetches them, and
        # changing one would rename every element the receiver looks for.
        text = re.sub(
            r"(\s(?!xmlns[:=])[\w:.-]+=\")(https?://[^\"]+)(\")",
            lambda m: m[1] + self.url(m[2]) + m[3],
            text,
        )
        text = re.sub(r">\s*(https?://[^<\s]+)\s*<", lambda m: f">{self.url(m[1])}<", text)
        return text.encode("utf-8")


def _note_of(sandbox, deal_id: int) -> str:
    [note] = [n for n in pipedrive(sandbox)["notes"] if n["deal_id"] == deal_id]
    return note["content"]


# -- Typeform -----------------------------------------------------------------------------


def typeform_with_urls(payload: dict[str, Any]) -> dict[str, Any]:
    """The fixture plus the URLs Typeform sends: a website answer, a file upload, an image."""
    response = copy.deepcopy(payload)["form_response"]
    definition = response["definition"]
    token = response["token"]
    # A question's picture is an attachment on images.typeform.com.
    definition["fields"][0]["attachment"] = {
        "type": "image",
        "href": "https://images.typeform.com/images/Wv9sP3kTq2Xa",
    }
    definition["fields"] += [
        {"id": "Wb4rN7xK2pQs", "ref": "website", "type": "website", "title": "Your website?"},
        {"id": "Fu8mC3vL6tRe", "ref": "brief", "type": "file_upload", "title": "Your brief"},
    ]
    response["answers"] += [
        {
            "type": "url",
            "url": "https://beridze-design.example/portfolio",
            "field": {"id": "Wb4rN7xK2pQs", "type": "website", "ref": "website"},
        },
        {
            # Uploaded files are served by the Responses API, behind the account's token.
            "type": "file_url",
            "file_url": (
                f"https://api.typeform.com/forms/Xq7RkP2d/responses/{token}"
                "/fields/Fu8mC3vL6tRe/files/5f1a0c9e2b7d-brief.pdf"
            ),
            "field": {"id": "Fu8mC3vL6tRe", "type": "file_upload", "ref": "brief"},
        },
    ]
    response["hidden"]["landing_page"] = "https://tbilisi-digital.example/ka/services"
    return {**payload, "form_response": response}


def test_typeform_urls_are_not_fetched(client, sandbox, trap) -> None:
    rewrite = Rewriter(trap, "typeform")
    payload = rewrite.json(typeform_with_urls(load_fixture("typeform/form_response.json")))
    # response_url, the image, the website answer, the file and the landing page.
    assert len(rewrite.originals) == 5, rewrite.originals

    accepted = post_typeform(client, payload)
    assert run_worker() == 1

    assert event_status(accepted["event_id"]) == ("succeeded", None)
    [deal] = pipedrive(sandbox)["deals"]
    assert deal["person_id"] == NINO and deal["owner_id"] == LUKA
    note = _note_of(sandbox, deal["id"])
    # The URLs reached the flow as text: kept in the note, never followed.
    assert f"website: {trap.url}/typeform/portfolio" in note
    assert f"{trap.url}/typeform/forms/Xq7RkP2d/responses/" in note
    assert len(messages(sandbox)) == 1
    trap.assert_untouched()


# -- the website backend ------------------------------------------------------------------


def test_website_form_urls_are_not_fetched(client, sandbox, trap) -> None:
    lead = load_fixture("form/lead.json")
    # The contract keeps unmapped fields as answers: a lead typing its own site is common.
    lead["fields"]["website"] = "https://kovac-studio.example/en/"
    rewrite = Rewriter(trap, "form")
    payload = rewrite.json(lead)
    assert rewrite.originals == ["https://kovac-studio.example/en/"]

    accepted = post_form(client, payload)
    assert run_worker() == 1

    assert event_status(accepted["event_id"]) == ("succeeded", None)
    [deal] = pipedrive(sandbox)["deals"]
    assert deal["title"].startswith("Ana Kovač")
    assert f"website: {trap.url}/form/en/" in _note_of(sandbox, deal["id"])
    assert len(messages(sandbox)) == 1
    trap.assert_untouched()


# -- Facebook Lead Ads --------------------------------------------------------------------


def test_facebook_lead_is_read_from_the_graph_only(client, environment, sandbox, trap) -> None:
    # Meta's leadgen change carries ids only (ad, form, lead, page, adgroup) and a time:
    # there is no URL to rewrite, and the lead itself comes from the Graph by its id.
    rewrite = Rewriter(trap, "facebook")
    body = graph.meta_json(rewrite.json(load_fixture("facebook/leadgen_webhook.json")))
    assert rewrite.originals == []

    answer = post_facebook(client, environment, body)
    assert answer.status_code == 200 and answer.json["status"] == "queued"
    assert run_worker() == 1

    assert event_status(answer.json["event_id"]) == ("succeeded", None)
    [deal] = pipedrive(sandbox)["deals"]
    assert deal["title"].startswith("Ana Kovač")
    reads = [c for c in sandbox.state()["calls"] if graph.FIXTURE_LEADGEN_ID in c["path"]]
    assert reads and all(c["method"] == "GET" for c in reads)
    assert len(messages(sandbox)) == 1
    trap.assert_untouched()


# -- Pipedrive webhooks -------------------------------------------------------------------


def pipedrive_change(version: str, deal_id: int, trap: Trap) -> dict[str, Any]:
    """The stage-change fixture of that version, about `deal_id`, its host on the trap."""
    if version == "v2":
        payload = load_fixture("pipedrive/deal_stage_change_v2.json")
        payload["data"]["id"] = deal_id
        payload["meta"]["entity_id"] = str(deal_id)
    else:
        payload = load_fixture("pipedrive/deal_stage_change_v1.json")
        payload["current"]["id"] = payload["previous"]["id"] = payload["meta"]["id"] = deal_id
    # Neither version carries a URL; meta.host is the account's host, the one field a flow
    # could build a URL from, so it names the trap too.
    payload["meta"]["host"] = trap.host
    return payload


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pipedrive_stage_change_fetches_nothing_from_the_body(
    client, sandbox, trap, version
) -> None:
    from tests.test_follow_up import new_deal

    deal_id = new_deal(sandbox, stage_id=PROPOSAL_MADE)
    rewrite = Rewriter(trap, "pipedrive")
    payload = rewrite.json(pipedrive_change(version, deal_id, trap))
    assert rewrite.originals == []

    answer = post_pipedrive(client, payload)
    assert answer.status_code == 200 and answer.json["status"] == "queued"
    assert run_worker() == 1

    # The shipped "proposal made" trigger: an email, an activity, a reminder, a sequence.
    assert event_status(answer.json["event_id"]) == ("succeeded", None)
    [message] = emails(sandbox)
    assert message["Subject"] == "Tbilisi Digital: your proposal"
    assert len(activities(sandbox, deal_id)) == 1 and len(calendar(sandbox)) == 1
    trap.assert_untouched()


# -- DocuSign Connect ---------------------------------------------------------------------


@pytest.fixture
def contracts(clean, monkeypatch, tmp_path) -> None:
    """config.yaml with the contract trigger, as the DocuSign tests run it."""
    use_contracts(monkeypatch, tmp_path)


def _absolute(uri: str, account_id: str) -> str:
    # Connect writes these relative to the account's REST base; absolute, they are what a
    # flow that followed them would fetch.
    if uri.startswith("/restapi/"):
        return DOCUSIGN_HOST + uri
    return f"{DOCUSIGN_HOST}/restapi/v2.1/accounts/{account_id}{uri}"


def _absolute_uris(value: Any, account_id: str) -> Any:
    if isinstance(value, dict):
        return {
            key: _absolute(item, account_id)
            if (key == "uri" or key.endswith("Uri")) and isinstance(item, str)
            else _absolute_uris(item, account_id)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_absolute_uris(item, account_id) for item in value]
    return value


def docusign_json(sandbox, envelope_id: str) -> dict[str, Any]:
    """envelope_completed.json about the emulator's envelope, every uri absolute."""
    account_id = sandbox.env()["DOCUSIGN_ACCOUNT_ID"]
    text = (FIXTURES / "docusign" / "envelope_completed.json").read_text(encoding="utf-8")
    text = text.replace(FIXTURE_ENVELOPE, envelope_id).replace(FIXTURE_ACCOUNT, account_id)
    message = json.loads(text)
    summary = message["data"]["envelopeSummary"]
    real = sandbox.state()["docusign"]["envelopes"][0]
    summary["customFields"] = real["customFields"]
    summary["statusChangedDateTime"] = real["statusChangedDateTime"]
    for document in summary["envelopeDocuments"]:
        document["uri"] = f"/envelopes/{envelope_id}/documents/{document['documentId']}"
    return _absolute_uris(message, account_id)


def docusign_xml(envelope_id: str, deal_id: int) -> bytes:
    """envelope_completed_legacy.xml about the emulator's envelope and deal."""
    with session() as db:
        key = db.scalar(
            select(ContractEnvelope.key).where(ContractEnvelope.envelope_id == envelope_id)
        )
    text = (FIXTURES / "docusign" / "envelope_completed_legacy.xml").read_text(encoding="utf-8")
    text = text.replace(FIXTURE_ENVELOPE, envelope_id)
    text = text.replace("<Value>5217</Value>", f"<Value>{deal_id}</Value>")
    text = text.replace("<Value>deal-5217-stage-4-envelope</Value>", f"<Value>{key}</Value>")
    return text.encode("utf-8")


def _attached_from(event_id: str) -> str:
    with session() as db:
        run = db.scalar(select(FlowRun).where(FlowRun.event_id == event_id))
        return next(s.output for s in run.steps if s.name == "attach_signed_pdf")["from"]


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_docusign_completed_fetches_no_uri_from_the_message(
    contracts, client, sandbox, trap, fmt
) -> None:
    deal_id, envelope_id = sent_envelope(sandbox)
    sandbox.docusign_act(envelope_id, "sign")
    rewrite = Rewriter(trap, "docusign")
    if fmt == "json":
        message = rewrite.json(docusign_json(sandbox, envelope_id))
        body = json.dumps(message, ensure_ascii=False).encode("utf-8")
        # The message's uri, nine *Uri of the summary, the template's and the document's.
        assert len(rewrite.originals) == 12, rewrite.originals
    else:
        # Legacy XML carries no URL beyond its namespace declarations.
        body = rewrite.xml(docusign_xml(envelope_id, deal_id))
        assert rewrite.originals == []

    answer = client.post(
        "/webhooks/docusign", data=body, headers=signed_headers(body, KEY, xml=fmt == "xml")
    )
    assert answer.status_code == 200 and answer.json["status"] == "queued", answer.json
    assert run_worker() == 1

    event_id = answer.json["event_id"]
    assert event_status(event_id) == ("succeeded", None)
    assert deal_of(sandbox, deal_id)["status"] == "won"
    assert len(files_of(sandbox, deal_id)) == 1
    # The PDF came from the message's bytes, not from its documentsCombinedUri.
    assert _attached_from(event_id) == "message"
    assert len([m for m in emails(sandbox) if m["Subject"].startswith("Signed:")]) == 1
    trap.assert_untouched()


def test_docusign_xml_naming_an_external_dtd_is_refused_unfetched(contracts, client, trap) -> None:
    # The one way an XML body can ask its parser to fetch a URL: a DOCTYPE's system id.
    xml = (FIXTURES / "docusign" / "envelope_completed_legacy.xml").read_bytes()
    doctype = f'<!DOCTYPE DocuSignEnvelopeInformation SYSTEM "{trap.url}/docusign/envelope.dtd">'
    body = xml.replace(b"?>", b"?>\n" + doctype.encode(), 1)

    answer = client.post(
        "/webhooks/docusign", data=body, headers=signed_headers(body, KEY, xml=True)
    )

    assert answer.status_code == 400 and "declares a DTD" in answer.json["error"]
    with session() as db:
        assert db.scalars(select(Event)).all() == []
    trap.assert_untouched()
