"""Lead normalisation from real-shaped payloads."""

import pytest

from core.config import TypeformForm, WebsiteForm
from core.leads import (
    MalformedPayload,
    email_key,
    lead_from_form,
    lead_from_typeform,
    normalise_phone,
    typeform_form_id,
)
from tests.conftest import as_bytes, load_fixture

FORM = TypeformForm(
    fields={"full_name": "name", "email": "email", "phone": "phone", "company": "company"}
)
WEBSITE = WebsiteForm(
    fields={"name": "name", "email": "email", "phone": "phone", "company": "company"}
)


def test_typeform_full_response_golden() -> None:
    payload = load_fixture("typeform/form_response.json")
    event = lead_from_typeform(payload, FORM, "GE")
    lead = event.lead

    assert event.dedup_key == "typeform:Xq7RkP2d:k3v9x0q2m7tb1yq8w4rj6np5d0hc2zsa"
    assert lead.name == "Nino Beridze"
    assert lead.email == "Nino.Beridze+typeform@Example.com"
    assert lead.phone == "+995599123456"
    assert lead.company == "შპს „ბერიძე დიზაინი“"
    assert lead.answers == {
        "budget": 4500,
        "services": ["Website design", "SEO", "Logo refresh (ლოგოს განახლება)"],
        "timeline": "Within a month",
        "consent": True,
        "message": payload["form_response"]["answers"][-1]["text"],
    }
    assert lead.hidden["utm_campaign"] == "dec_2026_web_redesign"
    assert "utm_campaign" not in lead.answers


def test_typeform_minimal_response_keeps_missing_answers_missing() -> None:
    event = lead_from_typeform(load_fixture("typeform/form_response_minimal.json"), FORM, "GE")
    assert event.lead.name == "გიორგი წერეთელი"
    assert event.lead.phone is None and event.lead.company is None
    assert event.lead.email


def test_typeform_without_answers_is_a_lead_without_email() -> None:
    payload = load_fixture("typeform/form_response.json")
    del payload["form_response"]["answers"]
    event = lead_from_typeform(payload, FORM, "GE")
    assert event.lead.email is None and event.lead.answers == {}


@pytest.mark.parametrize(
    "body, sentence",
    [
        ([], "The body must be a JSON object."),
        ({"event_type": "form_response"}, "form_response must be a JSON object."),
        (
            {"event_type": "form_response", "form_response": {"form_id": "x"}},
            "form_response needs form_id and token strings.",
        ),
        ({"form_response": {}}, "The body has no event_type string."),
    ],
)
def test_typeform_shape_errors_are_sentences(body: object, sentence: str) -> None:
    with pytest.raises(MalformedPayload, match=sentence):
        typeform_form_id(body)


def test_website_form_golden() -> None:
    payload = load_fixture("form/lead.json")
    event = lead_from_form(payload, as_bytes(payload), WEBSITE, "GE")
    assert event.dedup_key == "form:web-2026-12-02-000317"
    assert event.lead.name == "Ana Kovač"
    assert event.lead.phone == "+385912345678"
    assert event.lead.answers["services"] == ["SEO", "Email marketing"]
    assert event.lead.hidden == {
        "utm_source": "google",
        "utm_medium": "cpc",
        "utm_campaign": "dec_2026_search",
    }


def test_website_form_without_id_dedups_on_the_bytes() -> None:
    payload = load_fixture("form/lead.json")
    del payload["submission_id"]
    first = lead_from_form(payload, as_bytes(payload), WEBSITE, "GE")
    again = lead_from_form(payload, as_bytes(payload), WEBSITE, "GE")
    payload["fields"]["message"] = "another"
    other = lead_from_form(payload, as_bytes(payload), WEBSITE, "GE")
    assert first.dedup_key == again.dedup_key != other.dedup_key


@pytest.mark.parametrize(
    "written", ["+995 599 12 34 56", "599 12 34 56", "(599) 123-456", "00995599123456"]
)
def test_one_phone_written_four_ways_is_one_number(written: str) -> None:
    assert normalise_phone(written, "GE") == "+995599123456"


def test_not_a_phone_number() -> None:
    assert normalise_phone("call me", "GE") is None


def test_email_key_keeps_the_plus_tag() -> None:
    assert email_key("  Nino.Beridze+Typeform@Example.com ") == "nino.beridze+typeform@example.com"
    assert email_key("nino.beridze@example.com") != email_key("nino.beridze+typeform@example.com")
