"""Masks for personal data in logs and in the run-history API."""

from typing import Any

_PERSONAL_KEYS = {
    "name",
    "first_name",
    "last_name",
    "email",
    "phone",
    "phone_as_typed",
    "company",
    "city",
}


def mask_email(value: str) -> str:
    """n***@example.com: the first letter and the domain stay."""
    local, _, domain = value.partition("@")
    return f"{local[:1]}***@{domain}" if domain else "***"


def mask_text(value: str) -> str:
    """N*** B***: the first letter of each word stays."""
    return " ".join(f"{word[:1]}***" for word in value.split()) or "***"


def mask_phone(value: str) -> str:
    """+99******456: the first three and last three characters stay."""
    return value[:3] + "*" * max(len(value) - 6, 0) + value[-3:] if len(value) > 6 else "***"


def mask_value(key: str, value: Any) -> Any:
    """Mask one lead attribute by its name; other values pass through."""
    if not isinstance(value, str) or key not in _PERSONAL_KEYS:
        return value
    if key == "email":
        return mask_email(value)
    if key.startswith("phone"):
        return mask_phone(value)
    return mask_text(value)


def _shape(value: Any) -> Any:
    # Answers and hidden fields can hold anything a person typed (or a prefilled email):
    # keep only their shape.
    if isinstance(value, str):
        return f"<{len(value)} characters>"
    if isinstance(value, list):
        return f"<{len(value)} items>"
    return value


def mask_lead(lead: dict[str, Any]) -> dict[str, Any]:
    """A copy of a stored lead with names, contacts, answers and hidden fields masked."""
    masked = {key: mask_value(key, value) for key, value in lead.items()}
    for part in ("answers", "hidden"):
        masked[part] = {key: _shape(value) for key, value in (lead.get(part) or {}).items()}
    return masked
