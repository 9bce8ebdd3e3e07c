"""The Graph API emulator driven by requests, and Meta's webhook bytes and signature."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import pytest
import requests

from sandbox import facebook
from sandbox.testing import SandboxError, SandboxServer

FIELDS = "id,created_time,ad_id,form_id,field_data"


def graph(env: dict[str, str], object_id: str, **params: str) -> requests.Response:
    query = {"access_token": env["FACEBOOK_PAGE_ACCESS_TOKEN"], "fields": FIELDS, **params}
    return requests.get(f"{env['FACEBOOK_GRAPH_URL']}/v21.0/{object_id}", params=query, timeout=5)


def test_fixture_lead_matches_graph_lead_json(
    env: dict[str, str], fixture_json: Callable[[str], Any]
) -> None:
    response = graph(env, facebook.FIXTURE_LEADGEN_ID)

    assert response.status_code == 200
    assert response.json() == fixture_json("facebook/graph_lead.json")
    assert list(response.json()) == ["created_time", "id", "ad_id", "form_id", "field_data"]
    assert "Kova\\u010d" in response.text and "č" not in response.text


def test_only_requested_fields_and_id_always(env: dict[str, str]) -> None:
    body = graph(env, facebook.FIXTURE_LEADGEN_ID, fields="field_data").json()
    default = graph(env, facebook.FIXTURE_LEADGEN_ID, fields="").json()
    unknown = graph(env, facebook.FIXTURE_LEADGEN_ID, fields="id,colour")

    assert list(body) == ["id", "field_data"]
    assert set(default) == {"id"}
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == 100


def test_seeded_leads_cover_georgian_phone_only_and_batch(env: dict[str, str]) -> None:
    georgian = graph(env, facebook.GEORGIAN_LEADGEN_ID)
    phone_only = graph(env, facebook.PHONE_ONLY_LEADGEN_ID).json()
    batch = [graph(env, lead_id).status_code for lead_id in facebook.BATCH_LEADGEN_IDS]

    names = {item["name"]: item["values"] for item in georgian.json()["field_data"]}
    assert names["რომელი სერვისები გაინტერესებთ?"] == ["ვებგვერდის დიზაინი", "SEO"]
    assert "\\u10e0" in georgian.text
    assert {item["name"] for item in phone_only["field_data"]} >= {"phone_number"}
    assert "email" not in {item["name"] for item in phone_only["field_data"]}
    assert batch == [200, 200, 200]


def test_any_version_is_accepted_and_unversioned_is_refused(env: dict[str, str]) -> None:
    base, token = env["FACEBOOK_GRAPH_URL"], {"access_token": env["FACEBOOK_PAGE_ACCESS_TOKEN"]}
    lead = facebook.FIXTURE_LEADGEN_ID

    assert requests.get(f"{base}/v19.0/{lead}", params=token, timeout=5).status_code == 200
    unversioned = requests.get(f"{base}/{lead}", params=token, timeout=5)
    bad_version = requests.get(f"{base}/latest/{lead}", params=token, timeout=5)
    assert unversioned.status_code == 400 and "error" in unversioned.json()
    assert bad_version.status_code == 400 and bad_version.json()["error"]["code"] == 2500


@pytest.mark.parametrize("token", ["wrong", None])
def test_bad_or_missing_token(env: dict[str, str], token: str | None) -> None:
    params = {} if token is None else {"access_token": token}
    url = f"{env['FACEBOOK_GRAPH_URL']}/v21.0/{facebook.FIXTURE_LEADGEN_ID}"
    error = requests.get(url, params=params, timeout=5).json()["error"]

    assert error["code"] == (190 if token else 104)
    assert error["type"] == "OAuthException" and error["fbtrace_id"]


def test_token_in_authorization_header_and_appsecret_proof(env: dict[str, str]) -> None:
    token = env["FACEBOOK_PAGE_ACCESS_TOKEN"]
    proof = hmac.new(env["FACEBOOK_APP_SECRET"].encode(), token.encode(), hashlib.sha256)
    url = f"{env['FACEBOOK_GRAPH_URL']}/v21.0/{facebook.FIXTURE_LEADGEN_ID}"
    headers = {"Authorization": f"OAuth {token}"}

    good = requests.get(url, params={"appsecret_proof": proof.hexdigest()}, headers=headers)
    bad = requests.get(url, params={"appsecret_proof": "00"}, headers=headers, timeout=5)
    assert good.status_code == 200
    assert bad.status_code == 400 and bad.json()["error"]["code"] == 100


def test_expired_token_is_190_subcode_463(sandbox: SandboxServer, env: dict[str, str]) -> None:
    requests.post(f"{sandbox.url}/_sandbox/graph/token/expire", timeout=5)
    error = graph(env, facebook.FIXTURE_LEADGEN_ID).json()["error"]

    assert (error["code"], error["error_subcode"]) == (190, 463)
    assert error["message"].startswith("Error validating access token: Session has expired")


def test_unknown_and_unreadable_leads_are_100_33(
    sandbox: SandboxServer, env: dict[str, str]
) -> None:
    sandbox.graph_lead(
        id="555", form_id="874512369014785", readable=False,
        field_data=[{"name": "email", "values": ["x@example.com"]}],
    )  # fmt: skip
    for lead_id in ("424242", "555"):
        response = graph(env, lead_id)
        error = response.json()["error"]

        assert response.status_code == 400
        assert (error["code"], error["error_subcode"], error["type"]) == (
            100, 33, "GraphMethodException",
        )  # fmt: skip
        assert "https:\\/\\/developers.facebook.com" in response.text


@pytest.mark.parametrize("code", [4, 17, 32, 613])
def test_throttle_faults(sandbox: SandboxServer, env: dict[str, str], code: int) -> None:
    sandbox.fault(vendor="facebook", kind="graph_throttle", code=code)
    throttled = graph(env, facebook.FIXTURE_LEADGEN_ID)

    assert throttled.status_code == 400
    assert throttled.json()["error"]["code"] == code
    assert throttled.json()["error"]["is_transient"] is True
    assert graph(env, facebook.FIXTURE_LEADGEN_ID).status_code == 200


def test_5xx_fault_is_graph_shaped(sandbox: SandboxServer, env: dict[str, str]) -> None:
    sandbox.fault(vendor="facebook", kind="503")
    response = graph(env, facebook.FIXTURE_LEADGEN_ID)

    assert response.status_code == 503 and response.json()["error"]["code"] == 2


def test_bad_throttle_specs_are_refused(sandbox: SandboxServer) -> None:
    with pytest.raises(SandboxError, match="code"):
        sandbox.fault(vendor="facebook", kind="graph_throttle", code=5)
    with pytest.raises(SandboxError, match="facebook"):
        sandbox.fault(vendor="google", kind="graph_throttle", code=4)


def test_added_lead_is_served_and_bad_leads_refused(
    sandbox: SandboxServer, env: dict[str, str]
) -> None:
    answers = [{"name": "Koje usluge?", "values": ["SEO", "Web"]}]
    sandbox.graph_lead(id="777", form_id="874512369014785", field_data=answers)

    assert graph(env, "777").json()["field_data"] == answers
    with pytest.raises(SandboxError, match="field_data"):
        sandbox.graph_lead(id="778", form_id="1", field_data=[{"name": "x", "values": "y"}])
    with pytest.raises(SandboxError, match="exists"):
        sandbox.graph_lead(id="777", form_id="1", field_data=answers)


def test_webhook_body_is_escaped_and_signed_like_meta(
    sandbox: SandboxServer, env: dict[str, str]
) -> None:
    leads = [graph(env, lead_id).json() for lead_id in facebook.BATCH_LEADGEN_IDS]
    body = facebook.leadgen_webhook_body(leads, now=1796228824)
    signature = facebook.sign_webhook(body, env["FACEBOOK_APP_SECRET"])

    parsed = json.loads(body)
    changes = [c for entry in parsed["entry"] for c in entry["changes"]]
    assert [c["value"]["leadgen_id"] for c in changes] == list(facebook.BATCH_LEADGEN_IDS)
    assert len(parsed["entry"]) == 2
    expected = hmac.new(env["FACEBOOK_APP_SECRET"].encode(), body, hashlib.sha256).hexdigest()
    assert signature == f"sha256={expected}"
    assert facebook.meta_json({"u": "https://x/č"}) == b'{"u":"https:\\/\\/x\\/\\u010d"}'
    # Parsing and dumping again changes the bytes, so the signature no longer holds.
    assert json.dumps(parsed).encode() != body

    built = requests.post(
        f"{sandbox.url}/_sandbox/graph/webhook",
        json={"leadgen_ids": [facebook.FIXTURE_LEADGEN_ID]}, timeout=5,
    ).json()  # fmt: skip
    raw = built["body"].encode()
    assert built["headers"]["X-Hub-Signature-256"] == facebook.sign_webhook(
        raw, env["FACEBOOK_APP_SECRET"]
    )
    assert json.loads(raw)["entry"][0]["changes"][0]["value"]["page_id"] == facebook.PAGE_ID


def test_product_env_points_at_graph(sandbox: SandboxServer) -> None:
    env = sandbox.env()

    assert env["FACEBOOK_GRAPH_URL"] == f"{sandbox.url}/graph"
    assert {"FACEBOOK_PAGE_ACCESS_TOKEN", "FACEBOOK_APP_SECRET", "FACEBOOK_VERIFY_TOKEN"} <= set(
        env
    )
