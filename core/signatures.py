"""Webhook signature checks over the raw bytes, in constant time."""

import base64
import hashlib
import hmac


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
    expected = base64.b64encode(_digest(secret, body))
    return hmac.compare_digest(expected, claimed)


def verify_hex_sha256(secret: str, body: bytes, header: str | None) -> bool:
    """Website form and Meta: `sha256=<hex HMAC-SHA256 of the raw body>`."""
    claimed = _strip_scheme(header)
    if claimed is None:
        return False
    expected = _digest(secret, body).hex().encode("ascii")
    return hmac.compare_digest(expected, claimed.lower())


def sign_base64_sha256(secret: str, body: bytes) -> str:
    """The Typeform-Signature header value for a body (demo, simulate, tests)."""
    return "sha256=" + base64.b64encode(_digest(secret, body)).decode("ascii")


def sign_hex_sha256(secret: str, body: bytes) -> str:
    """The X-Signature header value for a body (demo, simulate, tests)."""
    return "sha256=" + _digest(secret, body).hex()
