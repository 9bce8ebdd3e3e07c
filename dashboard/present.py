"""How stored values are shown: personal data masked, times local, durations readable."""

import json
import re
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from core.masking import mask_email, mask_lead, mask_value
from core.store import as_utc

# Vendor error texts and free-form outputs can quote an address back at us.
_EMAIL = re.compile(r"[^\s@<>\"'(),;:]+@[^\s@<>\"'(),;:]+\.[A-Za-z]{2,}")


def mask_text(text: str | None) -> str | None:
    """Every email address inside a sentence masked."""
    return _EMAIL.sub(lambda match: mask_email(match.group(0)), text) if text else text


def mask_tree(value: Any, key: str = "") -> Any:
    """A JSON tree with lead attributes masked by name and addresses masked anywhere."""
    if key == "lead" and isinstance(value, dict):
        return mask_tree(mask_lead(value))
    if isinstance(value, dict):
        return {k: mask_tree(mask_value(k, v), k) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_tree(item, key) for item in value]
    if isinstance(value, str):
        return mask_text(value)
    return value


def as_json(value: Any) -> str:
    """Masked, indented JSON for a <pre> block."""
    return json.dumps(mask_tree(value), indent=2, ensure_ascii=False, sort_keys=True)


def local_time(moment: datetime | None, zone: ZoneInfo) -> str:
    """2026-12-03 17:04:05 in the dashboard's time zone."""
    return as_utc(moment).astimezone(zone).strftime("%Y-%m-%d %H:%M:%S") if moment else ""


def duration(started: datetime | None, finished: datetime | None) -> str:
    """Milliseconds under a second, else seconds; empty while it runs."""
    if started is None or finished is None:
        return ""
    ms = (as_utc(finished) - as_utc(started)).total_seconds() * 1000
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.1f} s"
