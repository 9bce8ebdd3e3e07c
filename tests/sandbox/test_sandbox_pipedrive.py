"""The Pipedrive emulator driven by requests (v2) and pipedrive-python-lib (v1) over HTTP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import requests
from pipedrive.client import Client
from pipedrive.exceptions import BadRequestError, NotFoundError, UnauthorizedError

from sandbox.testing import SandboxServer

LEAD_SOURCE = "957ae6bdc9c3862390160642fb03f3be22c7a3f6"
SERVICES = "95c960c03ed709b681ce08f04359b325c7cdde2e"
MESSAGE = "8223a9895ede67f9f21d42a97ab69dd6c6de5027"
BUDGET = "b74db61e1652627caee25380ec67c0f70ba34ccb"


def v2(env: dict[str, str], path: str) -> str:
    return f"{env['PIPEDRIVE_BASE_URL']}/api/v2{path}"


def v1_client(env: dict[str, str], token: str | None = None) -> Client:
    client = Client(domain=env["PIPEDRIVE_BASE_URL"])
    client.set_api_token(token or env["PIPEDRIVE_API_TOKEN"])
    return client


def search(pd: requests.Session, env: dict[str, str], **params: Any) -> requests.Response:
    return pd.get(v2(env, "/persons/search"), params=params, timeout=5)


def test_wrong_token_is_401_on_v2(env: dict[str, str]) -> None:
    for headers in ({"x-api-token": "wrong"}, {}):
        response = requests.get(v2(env, "/pipelines"), headers=headers, timeout=5)

        assert response.status_code == 401
        assert response.json()["error"] == "unauthorized access"
        assert response.json()["errorCode"] == 401


def test_wrong_token_is_401_on_v1(env: dict[str, str]) -> None:
    with pytest.raises(UnauthorizedError):
        v1_client(env, token="wrong").users.get_all_users()


def test_token_in_query_is_accepted_on_v2(env: dict[str, str]) -> None:
    params = {"api_token": env["PIPEDRIVE_API_TOKEN"]}
    response = requests.get(v2(env, "/pipelines"), params=params, timeout=5)

    assert response.status_code == 200
    assert response.json()["data"][0]["name"] == "Sales"


def test_exact_email_search_matches_fixture(
    pd: requests.Session, env: dict[str, str], fixture_json: Callable[[str], Any]
) -> None:
    term = "Nino.Beridze+typeform@Example.com"
    response = search(pd, env, term=term, fields="email", exact_match="true")

    expected = fixture_json("pipedrive/person_search_v2.json")
    body = response.json()
    for hit in body["data"]["items"] + expected["data"]["items"]:
        hit.pop("result_score")
    assert body == expected
    assert {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"} <= set(
        response.headers
    )


def test_substring_search_matches_where_exact_does_not(
    pd: requests.Session, env: dict[str, str]
) -> None:
    loose = search(pd, env, term="o@example.com", fields="email").json()
    exact = search(pd, env, term="o@example.com", fields="email", exact_match="true").json()

    assert [hit["item"]["id"] for hit in loose["data"]["items"]] == [1842]
    assert exact["data"]["items"] == []


def test_phone_search_compares_digits(pd: requests.Session, env: dict[str, str]) -> None:
    found = search(pd, env, term="+995599123456", fields="phone", exact_match="true").json()
    missed = search(pd, env, term="+995599123457", fields="phone", exact_match="true").json()

    assert [hit["item"]["id"] for hit in found["data"]["items"]] == [1842]
    assert missed["data"]["items"] == []


def test_short_search_term_is_400(pd: requests.Session, env: dict[str, str]) -> None:
    assert search(pd, env, term="n", fields="name").status_code == 400


def test_add_person_then_get_it(pd: requests.Session, env: dict[str, str]) -> None:
    body = {
        "name": "Ana Kovač",
        "owner_id": 21458878,
        "emails": [{"value": "ana.kovac@example.com", "primary": True, "label": "work"}],
        "phones": [{"value": "+385 91 234 5678", "primary": True, "label": "mobile"}],
    }
    created = pd.post(v2(env, "/persons"), json=body, timeout=5).json()["data"]
    fetched = pd.get(v2(env, f"/persons/{created['id']}"), timeout=5).json()["data"]

    assert created["id"] == 1900
    assert fetched == created
    assert fetched["emails"][0]["value"] == "ana.kovac@example.com"


@pytest.mark.parametrize(
    "body",
    [
        {"name": ""},
        {"emails": [{"value": "x@example.com"}]},
        {"name": "X", "email": "x@example.com"},
        {"name": "X", "owner_id": 1},
        {"name": "X", "org_id": 99999},
        {"name": "X", "emails": ["x@example.com"]},
    ],
)
def test_bad_person_is_400(pd: requests.Session, env: dict[str, str], body: Any) -> None:
    response = pd.post(v2(env, "/persons"), json=body, timeout=5)

    assert response.status_code == 400
    assert response.json()["success"] is False


def test_unknown_person_is_404(pd: requests.Session, env: dict[str, str]) -> None:
    response = pd.get(v2(env, "/persons/424242"), timeout=5)

    assert response.status_code == 404
    assert response.json()["errorCode"] == 404


def test_organization_search_and_create(pd: requests.Session, env: dict[str, str]) -> None:
    params = {"term": "შპს „ბერიძე დიზაინი“", "fields": "name", "exact_match": "true"}
    found = pd.get(v2(env, "/organizations/search"), params=params, timeout=5).json()
    created = pd.post(v2(env, "/organizations"), json={"name": "Kovač d.o.o."}, timeout=5)

    assert [hit["item"]["id"] for hit in found["data"]["items"]] == [733]
    assert created.json()["data"]["id"] == 800
    assert pd.post(v2(env, "/organizations"), json={}, timeout=5).status_code == 400


def test_add_deal_answers_like_fixture(
    pd: requests.Session, env: dict[str, str], fixture_json: Callable[[str], Any]
) -> None:
    expected = fixture_json("pipedrive/deal_create_v2_response.json")["data"]
    body = {
        key: expected[key]
        for key in ("title", "owner_id", "value", "person_id", "org_id", "stage_id")
    }
    body.update(
        currency="EUR",
        pipeline_id=1,
        expected_close_date="2026-12-31",
        custom_fields={k: v for k, v in expected["custom_fields"].items() if v is not None},
    )
    response = pd.post(v2(env, "/deals"), json=body, timeout=5)

    deal = response.json()["data"]
    assert response.status_code == 200
    assert set(deal) == set(expected)
    assert deal["id"] == 5300
    assert deal["custom_fields"] == expected["custom_fields"]
    assert (deal["origin"], deal["visible_to"], deal["creator_user_id"]) == ("API", 3, 21458870)
    assert deal["add_time"].endswith("Z") and "T" in deal["add_time"]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"person_id": 1842}, "title"),
        ({"title": "  "}, "title"),
        ({"title": "T", "custom_fields": {"0" * 40: "x"}}, "0" * 40),
        ({"title": "T", "custom_fields": {LEAD_SOURCE: 99}}, "Lead source"),
        ({"title": "T", "custom_fields": {LEAD_SOURCE: "27"}}, "Lead source"),
        ({"title": "T", "custom_fields": {SERVICES: [31, 77]}}, "Services"),
        ({"title": "T", "custom_fields": {BUDGET: "72"}}, "Budget"),
        ({"title": "T", "custom_fields": {MESSAGE: 5}}, "Message"),
        ({"title": "T", "stage_id": 99}, "Stage"),
        ({"title": "T", "pipeline_id": 7}, "Pipeline"),
        ({"title": "T", "owner_id": 5}, "owner_id"),
        ({"title": "T", "person_id": 5}, "person_id"),
        ({"title": "T", "value": "4500"}, "value"),
        ({"title": "T", "colour": "red"}, "colour"),
    ],
)
def test_bad_deal_is_400_naming_the_field(
    pd: requests.Session, env: dict[str, str], body: Any, named: str
) -> None:
    response = pd.post(v2(env, "/deals"), json=body, timeout=5)

    assert response.status_code == 400
    assert named in response.json()["error"]


def test_patch_deal_moves_stage_and_put_is_405(pd: requests.Session, env: dict[str, str]) -> None:
    deal = pd.post(v2(env, "/deals"), json={"title": "Move me"}, timeout=5).json()["data"]
    moved = pd.patch(v2(env, f"/deals/{deal['id']}"), json={"stage_id": 4}, timeout=5)
    put = pd.put(v2(env, f"/deals/{deal['id']}"), json={"stage_id": 3}, timeout=5)

    assert moved.json()["data"]["stage_id"] == 4
    assert moved.json()["data"]["stage_change_time"] is not None
    assert put.status_code == 405
    assert pd.get(v2(env, f"/deals/{deal['id']}"), timeout=5).json()["data"]["stage_id"] == 4


def test_list_deals_filters_and_paginates(pd: requests.Session, env: dict[str, str]) -> None:
    for index in range(3):
        pd.post(v2(env, "/deals"), json={"title": f"D{index}", "person_id": 1842}, timeout=5)
    pd.post(v2(env, "/deals"), json={"title": "Other"}, timeout=5)

    first = pd.get(v2(env, "/deals"), params={"person_id": 1842, "limit": 2}, timeout=5).json()
    cursor = first["additional_data"]["next_cursor"]
    params = {"person_id": 1842, "limit": 2, "cursor": cursor}
    second = pd.get(v2(env, "/deals"), params=params, timeout=5).json()

    assert [d["title"] for d in first["data"] + second["data"]] == ["D0", "D1", "D2"]
    assert second["additional_data"]["next_cursor"] is None


def test_deal_fields_paginate_by_cursor(pd: requests.Session, env: dict[str, str]) -> None:
    fields: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": 4, **({"cursor": cursor} if cursor else {})}
        page = pd.get(v2(env, "/dealFields"), params=params, timeout=5).json()
        fields += page["data"]
        cursor = page["additional_data"]["next_cursor"]
        if cursor is None:
            break

    custom = {f["field_name"]: f for f in fields if f["is_custom_field"]}
    assert custom["Lead source"]["field_code"] == LEAD_SOURCE
    assert custom["Lead source"]["options"] == [
        {"id": 27, "label": "Typeform"},
        {"id": 28, "label": "Website"},
        {"id": 29, "label": "Facebook"},
    ]
    assert custom["Services"]["field_type"] == "set"


def test_stages_of_pipeline(pd: requests.Session, env: dict[str, str]) -> None:
    stages = pd.get(v2(env, "/stages"), params={"pipeline_id": 1}, timeout=5).json()["data"]

    assert [(s["id"], s["name"]) for s in stages][3] == (4, "Proposal made")


def test_v1_users_through_the_library(env: dict[str, str]) -> None:
    client = v1_client(env)
    users = client.users.get_all_users()["data"]
    davit = client.users.get_user(21458879)["data"]

    assert {u["id"] for u in users} == {21458870, 21458877, 21458878, 21458879}
    assert davit["active_flag"] is False
    with pytest.raises(NotFoundError):
        client.users.get_user(1)


def test_v1_notes_through_the_library(pd: requests.Session, env: dict[str, str]) -> None:
    client = v1_client(env)
    deal = pd.post(v2(env, "/deals"), json={"title": "Noted"}, timeout=5).json()["data"]
    note = client.notes.create_note({"content": "Signed PDF attached", "deal_id": deal["id"]})
    listed = client.notes.get_all_notes(params={"deal_id": deal["id"]})

    assert note["data"]["id"] == 9000
    assert [n["content"] for n in listed["data"]] == ["Signed PDF attached"]
    with pytest.raises(BadRequestError):
        client.notes.create_note({"content": "Orphan"})
    with pytest.raises(BadRequestError):
        client.notes.create_note({"content": "", "deal_id": deal["id"]})
    with pytest.raises(BadRequestError):
        client.notes.create_note({"content": "Lost", "deal_id": 1})


def test_configured_rate_limit_answers_429(
    sandbox: SandboxServer, pd: requests.Session, env: dict[str, str]
) -> None:
    sandbox.configure(pipedrive_rate_limit=3)
    statuses = [pd.get(v2(env, "/pipelines"), timeout=5) for _ in range(4)]

    assert [r.status_code for r in statuses] == [200, 200, 200, 429]
    assert statuses[2].headers["x-ratelimit-remaining"] == "0"
    assert statuses[3].headers["x-ratelimit-limit"] == "3"
    assert 1 <= int(statuses[3].headers["x-ratelimit-reset"]) <= 2
    assert statuses[3].json()["error"] == "Request over limit"


def test_search_rate_limit_counts_searches_only(
    sandbox: SandboxServer, pd: requests.Session, env: dict[str, str]
) -> None:
    sandbox.configure(pipedrive_search_rate_limit=2)
    searches = [search(pd, env, term="Nino", fields="name").status_code for _ in range(3)]

    assert searches == [200, 200, 429]
    assert pd.get(v2(env, "/pipelines"), timeout=5).status_code == 200


def test_state_shows_what_was_created(
    sandbox: SandboxServer, pd: requests.Session, env: dict[str, str]
) -> None:
    pd.post(v2(env, "/deals"), json={"title": "Seen"}, timeout=5)

    state = sandbox.state()
    assert [d["title"] for d in state["pipedrive"]["deals"]] == ["Seen"]
    assert state["calls"][-1] == {
        "vendor": "pipedrive",
        "method": "POST",
        "path": "/api/v2/deals",
        "status": 200,
    }
