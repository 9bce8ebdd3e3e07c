"""Signature checks: one test per way a signature can be wrong."""

import base64
import hashlib
import hmac
import json

from core.signatures import (
    sign_base64_sha256,
    sign_hex_sha256,
    verify_base64_sha256,
    verify_hex_sha256,
)

SECRET = "s3cret"
BODY = '{"event_id":"01KB","form_response":{"answers":[{"text":"ნინო"}]}}'.encode()


def test_typeform_signature_is_base64_of_the_hmac() -> None:
    expected = base64.b64encode(hmac.new(b"s3cret", BODY, hashlib.sha256).digest()).decode()
    assert sign_base64_sha256(SECRET, BODY) == f"sha256={expected}"
    assert verify_base64_sha256(SECRET, BODY, f"sha256={expected}")


def test_typeform_rejects_a_hex_digest() -> None:
    hex_digest = hmac.new(b"s3cret", BODY, hashlib.sha256).hexdigest()
    assert not verify_base64_sha256(SECRET, BODY, f"sha256={hex_digest}")


def test_typeform_rejects_one_changed_byte() -> None:
    header = sign_base64_sha256(SECRET, BODY)
    changed = BODY[:-2] + b"]}"[::-1]
    assert changed != BODY
    assert not verify_base64_sha256(SECRET, changed, header)


def test_typeform_rejects_a_missing_or_bare_header() -> None:
    digest = sign_base64_sha256(SECRET, BODY).removeprefix("sha256=")
    assert not verify_base64_sha256(SECRET, BODY, None)
    assert not verify_base64_sha256(SECRET, BODY, "")
    assert not verify_base64_sha256(SECRET, BODY, digest)


def test_a_reserialised_body_does_not_verify() -> None:
    header = sign_base64_sha256(SECRET, BODY)
    reserialised = json.dumps(json.loads(BODY)).encode()
    assert reserialised != BODY
    assert not verify_base64_sha256(SECRET, reserialised, header)


def test_hex_signature_round_trip_and_wrong_secret() -> None:
    header = sign_hex_sha256(SECRET, BODY)
    assert header == "sha256=" + hmac.new(b"s3cret", BODY, hashlib.sha256).hexdigest()
    assert verify_hex_sha256(SECRET, BODY, header)
    assert verify_hex_sha256(SECRET, BODY, header.upper().replace("SHA256=", "sha256="))
    assert not verify_hex_sha256("other", BODY, header)


def test_hex_rejects_a_base64_digest() -> None:
    assert not verify_hex_sha256(SECRET, BODY, sign_base64_sha256(SECRET, BODY))


def test_non_ascii_header_is_a_mismatch_not_an_error() -> None:
    assert not verify_base64_sha256(SECRET, BODY, "sha256=ééé")
    assert not verify_hex_sha256(SECRET, BODY, "sha256=ééé")
    assert not verify_hex_sha256(SECRET, BODY, "sha256=\udcff")


def test_two_secrets_are_valid_while_one_is_rotated() -> None:
    rotating = "new-secret, s3cret"
    assert verify_base64_sha256(rotating, BODY, sign_base64_sha256(SECRET, BODY))
    assert verify_base64_sha256(rotating, BODY, sign_base64_sha256("new-secret", BODY))
    assert verify_hex_sha256(rotating, BODY, sign_hex_sha256(SECRET, BODY))
    assert not verify_hex_sha256(rotating, BODY, sign_hex_sha256("retired", BODY))
    # Signing always uses the first (the new) secret.
    assert sign_hex_sha256(rotating, BODY) == sign_hex_sha256("new-secret", BODY)
