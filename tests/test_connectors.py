"""Connector rules that the emulators alone cannot show: comparisons, classification, waits."""

import json
from typing import Any

import httplib2
import pytest
from googleapiclient.errors import HttpError

from connectors.errors import PermanentVendorError, TransientVendorError
from connectors.gmail import _classify
from connectors.pipedrive import PipedriveClient, _error_for
from connectors.retry import call_with_retry
from core.config import Pipedrive, Retry
from tests.conftest import load_fixture

POLICY = Retry(attempts=4, base_delay_s=0.5, max_delay_s=10)


def client_answering(answer: dict[str, Any]) -> PipedriveClient:
    client = PipedriveClient(Pipedrive(api_token="t", base_url="http://127.0.0.1:9"), POLICY)
    client._send_v2 = lambda *args, **kwargs: answer  # type: ignore[method-assign]
    return client


def test_person_search_match_differing_in_case_only_is_the_person() -> None:
    client = client_answering(load_fixture("pipedrive/person_search_v2.json"))
    person = client.find_person_by_email("Nino.Beridze+typeform@Example.com")
    assert person is not None and person["id"] == 1842


@pytest.mark.parametrize(
    "typed", ["o@example.com", "nino.beridze@example.com", "Nino.Beridze+Other@example.com"]
)
def test_search_hits_that_only_contain_the_term_are_not_the_person(typed: str) -> None:
    # Search answers what it likes (fuzzy, or a +tag dropped): we compare every address.
    client = client_answering(load_fixture("pipedrive/person_search_v2.json"))
    assert client.find_person_by_email(typed) is None


def test_phone_match_compares_numbers_not_text() -> None:
    client = client_answering(load_fixture("pipedrive/person_search_v2.json"))
    assert client.find_person_by_phone("+995599123456", "GE")["id"] == 1842
    assert client.find_person_by_phone("+995599123457", "GE") is None


class Headers(dict):
    def get(self, key: str, default: Any = None) -> Any:  # case-insensitive like requests
        return super().get(key.lower(), default)


def test_429_waits_for_the_reset_header_and_5xx_ignores_it() -> None:
    limited = _error_for(429, "{}", Headers({"x-ratelimit-reset": "2"}), "create deal")
    assert isinstance(limited, TransientVendorError) and limited.retry_after == 2.0
    failing = _error_for(502, "<html>", Headers({"x-ratelimit-reset": "0"}), "create deal")
    assert isinstance(failing, TransientVendorError) and failing.retry_after is None
    refused = _error_for(400, '{"error": "title"}', Headers({"x-request-id": "r1"}), "x")
    assert isinstance(refused, PermanentVendorError) and refused.request_id == "r1"


def test_retry_policy_uses_vendor_wait_then_backoff_then_gives_up() -> None:
    waits: list[float] = []
    errors = [
        TransientVendorError("v", "429", retry_after=1.5),
        TransientVendorError("v", "502"),
        TransientVendorError("v", "502"),
        TransientVendorError("v", "502"),
    ]

    def call() -> None:
        raise errors.pop(0)

    with pytest.raises(TransientVendorError):
        call_with_retry(call, POLICY, what="x", sleep=waits.append)
    assert waits[0] == 1.5
    assert 0.5 <= waits[1] <= 1.0 and 1.0 <= waits[2] <= 2.0
    assert len(waits) == 3


def test_a_wait_longer_than_the_policy_goes_back_to_the_queue() -> None:
    waits: list[float] = []

    def call() -> None:
        raise TransientVendorError("v", "daily budget", retry_after=3600)

    with pytest.raises(TransientVendorError):
        call_with_retry(call, POLICY, what="x", sleep=waits.append)
    assert waits == []


def google_error(status: int, reason: str) -> HttpError:
    body = {"error": {"code": status, "message": "m", "errors": [{"reason": reason}]}}
    return HttpError(httplib2.Response({"status": status}), json.dumps(body).encode())


@pytest.mark.parametrize("reason", ["rateLimitExceeded", "userRateLimitExceeded", "quotaExceeded"])
def test_google_throttling_403s_are_transient(reason: str) -> None:
    assert isinstance(_classify(google_error(403, reason), "send"), TransientVendorError)


def test_other_google_403s_and_400s_are_permanent() -> None:
    assert isinstance(_classify(google_error(403, "forbidden"), "send"), PermanentVendorError)
    assert isinstance(
        _classify(google_error(400, "invalidArgument"), "send"), PermanentVendorError
    )
    assert isinstance(_classify(google_error(503, "backendError"), "send"), TransientVendorError)


def test_v1_notes_go_through_our_kept_alive_session_with_the_token_in_a_header(
    clean, sandbox
) -> None:
    from connectors import registry

    client = registry.pipedrive()
    sent: list[tuple[str, str, Any]] = []
    send = client._http.request

    def recording(method: str, url: str, **kwargs: Any) -> Any:
        sent.append((method, url, kwargs.get("params")))
        return send(method, url, **kwargs)

    client._http.request = recording  # type: ignore[method-assign]
    deal = client.create_deal({"title": "Keep-alive check"})
    note = client.add_note(deal["id"], "hello")

    assert note["deal_id"] == deal["id"]
    notes = [(method, url, params) for method, url, params in sent if url.endswith("/v1/notes")]
    assert len(notes) == 1
    assert "api_token" not in notes[0][1] and "api_token" not in (notes[0][2] or {})
    assert client._http.headers["x-api-token"]
