"""Contact forms posted from a visitor's browser: origin, honeypot, rate limit, 303."""

import pytest

from tests.conftest import queued_job_ids, run_worker
from tests.test_lead_flow import messages, pipedrive
from tests.test_receivers import event_count

ORIGIN = "https://tbilisi-digital.example"
THANKS = "https://tbilisi-digital.example/thank-you"
FIELDS = {
    "name": "Nika Abashidze",
    "email": "nika@example.ge",
    "phone": "599 11 22 33",
    "services": ["SEO", "Website design"],
    "utm_campaign": "winter",
    "website": "",
}


def post(client, data=None, *, origin=ORIGIN, ip="203.0.113.7", **kwargs):
    headers = {"Origin": origin, "X-Forwarded-For": ip, **kwargs.pop("headers", {})}
    return client.post(
        "/webhooks/form/contact", data=FIELDS if data is None else data, headers=headers, **kwargs
    )


def test_accepted_post_redirects_to_the_thank_you_page(client, sandbox) -> None:
    answer = post(client)
    assert answer.status_code == 303 and answer.headers["Location"] == THANKS
    assert len(queued_job_ids()) == 1
    run_worker()
    [deal] = pipedrive(sandbox)["deals"]
    assert deal["title"] == "Nika Abashidze — SEO"
    assert deal["custom_fields"]["849720d93e1e62dfed4e8b6637cda9c9c85375c8"] == "winter"
    assert len(messages(sandbox)) == 1


def test_multipart_post_works_too(client) -> None:
    answer = post(client, content_type="multipart/form-data")
    assert answer.status_code == 303 and event_count() == 1


def test_json_client_gets_the_contract(client) -> None:
    answer = post(client, headers={"Accept": "application/json"})
    assert answer.status_code == 200 and answer.json["status"] == "queued"
    again = post(client, headers={"Accept": "application/json"})
    assert again.json == {"event_id": answer.json["event_id"], "status": "duplicate"}


def test_honeypot_is_thanked_and_forgotten(client) -> None:
    answer = post(client, data={**FIELDS, "website": "http://spam.example"})
    assert answer.status_code == 303 and answer.headers["Location"] == THANKS
    assert event_count() == 0 and queued_job_ids() == []


@pytest.mark.parametrize("origin", ["https://evil.example", "null", None])
def test_other_origins_are_refused(client, origin) -> None:
    headers = {} if origin is None else {"Origin": origin}
    answer = client.post("/webhooks/form/contact", data=FIELDS, headers=headers)
    assert answer.status_code == 403 and event_count() == 0


def test_referer_is_enough_when_the_browser_sends_no_origin(client) -> None:
    answer = client.post(
        "/webhooks/form/contact", data=FIELDS, headers={"Referer": f"{ORIGIN}/contact?x=1"}
    )
    assert answer.status_code == 303


def test_rate_limit_is_per_client_address(client) -> None:
    for index in range(5):
        assert post(client, data={**FIELDS, "email": f"n{index}@example.ge"}).status_code == 303
    limited = post(client, data={**FIELDS, "email": "n9@example.ge"})
    assert limited.status_code == 429
    other = post(client, data={**FIELDS, "email": "n10@example.ge"}, ip="198.51.100.2")
    assert other.status_code == 303
    assert event_count() == 6


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({**FIELDS, "email": "nika(at)example.ge"}, "not valid"),
        ({"name": "No Email"}, "needs an email"),
        ({}, "no fields"),
    ],
)
def test_invalid_posts_are_400(client, data, fragment) -> None:
    answer = post(client, data=data)
    assert answer.status_code == 400 and fragment in answer.json["error"]
    assert event_count() == 0


def test_unknown_form_is_404(client) -> None:
    answer = client.post("/webhooks/form/nope", data=FIELDS, headers={"Origin": ORIGIN})
    assert answer.status_code == 404 and answer.json["error"]
