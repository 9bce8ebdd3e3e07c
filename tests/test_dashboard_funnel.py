"""The overview's funnel: deals per stage from Pipedrive, conversion between stages."""

import requests

from dashboard import funnel
from tests.conftest import load_fixture, run_worker
from tests.test_dashboard import page, sign_in
from tests.test_lead_flow import pipedrive, post_form

STAGES = [{"id": i, "name": f"S{i}"} for i in (1, 2, 3, 4)]


def test_a_deal_reached_every_stage_up_to_its_own_and_won_reached_all() -> None:
    deals = [
        {"stage_id": 1, "status": "open"},
        {"stage_id": 3, "status": "open"},
        {"stage_id": 2, "status": "lost"},
        {"stage_id": 1, "status": "won"},
    ]
    stages, won = funnel.build(STAGES, deals)
    assert [(s.name, s.reached) for s in stages] == [("S1", 4), ("S2", 3), ("S3", 2), ("S4", 1)]
    assert [s.conversion for s in stages] == [None, 0.75, 2 / 3, 0.5]
    assert won == 1


def test_the_overview_shows_the_funnel_from_pipedrive(client, sandbox) -> None:
    funnel._cache.clear()
    for index in range(3):
        lead = load_fixture("form/lead.json")
        lead["submission_id"] = f"funnel-{index}"
        lead["fields"]["email"] = f"funnel{index}@example.org"
        post_form(client, lead)
    run_worker()
    first = pipedrive(sandbox)["deals"][0]["id"]
    requests.post(
        f"{sandbox.url}/_sandbox/pipedrive/deals/{first}", json={"stage_id": 4}, timeout=5
    ).raise_for_status()

    sign_in(client)
    html = page(client, "/dashboard/overview")
    assert '<tr data-stage="Qualified"><td>Qualified</td><td class="num">3</td>' in html
    assert '<tr data-stage="Proposal made"><td>Proposal made</td><td class="num">1</td>' in html


def test_pipedrive_down_shows_a_sentence_not_an_error(client, sandbox) -> None:
    funnel._cache.clear()
    sandbox.fault(vendor="pipedrive", kind="503", probability=1.0)
    sign_in(client)
    html = page(client, "/dashboard/overview")
    assert "Pipedrive did not answer" in html


def test_the_overview_counts_contracts_and_the_median_time_to_sign(client, sandbox) -> None:
    from datetime import timedelta

    from core.store import ContractEnvelope, session, utcnow

    sent = utcnow() - timedelta(days=2)
    rows = [
        ("completed", 2),
        ("completed", 6),
        ("completed", 30),
        ("declined", 5),
        ("sent", None),
        ("voided", 1),
    ]
    with session() as db:
        for index, (status, hours) in enumerate(rows):
            changed = sent + timedelta(hours=hours) if hours is not None else None
            db.add(
                ContractEnvelope(
                    key=f"k{index}",
                    envelope_id=f"e{index}",
                    deal_id=index,
                    contract="Service agreement",
                    status=status,
                    sent_at=sent,
                    status_changed_at=changed,
                )
            )
    funnel._cache.clear()
    sign_in(client)
    html = page(client, "/dashboard/overview")
    assert 'data-metric="contracts-sent">6<' in html
    assert 'data-metric="contracts-signed">3<' in html
    assert 'data-metric="contracts-declined">1<' in html
    assert "Median time to sign:\n      6.0 hours; 1 voided." in html
