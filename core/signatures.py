"""Webhook signature checks over the raw bytes, in constant time.

A secret setting may hold several secrets, comma-separated: during a rotation the sender
signs with the new one while deliveries signed with the old one are still in flight.
"""

import base64
import hashlib
import hmac


def secrets_of(value: str) -> list[str]:
    """The secrets in a setting: several, comma-separated, are all valid while one rotates."""
    return [part.strip() for part in value.split(",") if part.strip()]


def _digest(secret: str, body: bytes) -> bytes:
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).digest()


def _strip_scheme(header: str | None) -> bytes | None:
    # Bytes, so a header with non-ASCII characters is simply a mismatch.
    if not header or not header.startswith("sha256="):
        return None
    return header[len("sha256=") :].encode("utf-8", "surrogateescape")


def verify_base64_sha256(secret: str, body: bytes, header: str | None) -> bool:
    """Typeform: `sha256=<base64 HMAC-SHA256 of the raw body>`."""
    claimed = _strip_scheme(header)
    if claimed is None:
        return False
    # Every secret is tried, so the time taken does not tell which one matched.
    matches = [
        hmac.compare_digest(base64.b64encode(_digest(key, body)), claimed)
        for key in secrets_of(secret)
    ]
    return any(matches)


def verify_hex_sha256(secret: str, body: bytes, header: str | None) -> bool:
    """Website form and Meta: `sha256=<hex HMAC-SHA256 of the raw body>`."""
    claimed = _strip_scheme(header)
    if claimed is None:
        return False
    matches = [
        hmac.compare_digest(_digest(key, body).hex().encode("ascii"), claimed.lower())
        for key in secrets_of(secret)
    ]
    return any(matches)


def sign_base64_sha256(secret: str, body: bytes) -> str:
    """The Typeform-Signature header value for a body (demo, simulate, tests)."""
    key = secrets_of(secret)[0]
    return "sha256=" + base64.b64encode(_digest(key, body)).decode("ascii")


def sign_hex_sha256(secret: str, body: bytes) -> str:
    """The X-Signature header value for a body (demo, simulate, tests)."""
    return "sha256=" + _digest(secrets_of(secret)[0], body).hex()
