"""Fault injection: specs that make matching vendor calls fail, stall or time out."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import re
import threading
from typing import Any

logger = logging.getLogger(__name__)

FAULT_KINDS = ("429", "500", "502", "503", "delay", "timeout", "graph_throttle", "google_403")
VENDOR_NAMES = ("pipedrive", "google", "facebook", "docusign", "*")
# Graph API throttling codes: app (4), user (17), page (32) and per-API (613) limits.
GRAPH_THROTTLE_CODES = (4, 17, 32, 613)
# Google answers 403 both for its per-user and per-project limits (worth a retry) and for a
# refusal (not worth one); the reason in the body is the only difference.
GOOGLE_403_REASONS = (
    "rateLimitExceeded", "userRateLimitExceeded", "quotaExceeded",
    "forbidden", "insufficientPermissions", "domainPolicy",
)  # fmt: skip
DEFAULT_DELAY_MS = 1000
DEFAULT_TIMEOUT_MS = 30000
DEFAULT_RESET_S = 2
_SPEC_KEYS = {
    "vendor", "method", "path", "kind", "count", "probability", "delay_ms", "reset_s", "code",
    "reason",
}  # fmt: skip


@dataclasses.dataclass
class FaultSpec:
    """One armed fault: which calls it matches and what it does to them."""

    id: int
    vendor: str
    kind: str
    method: str | None = None
    path: str | None = None
    remaining: int | None = 1
    probability: float | None = None
    delay_ms: int = DEFAULT_DELAY_MS
    reset_s: int = DEFAULT_RESET_S
    code: int | None = None
    reason: str | None = None
    hits: int = 0

    def matches(self, vendor: str, method: str, path: str) -> bool:
        """Tell whether a call to `vendor` with `method` and `path` falls under this fault."""
        if self.vendor != "*" and self.vendor != vendor:
            return False
        if self.method and self.method != method.upper():
            return False
        return not self.path or re.search(self.path, path) is not None

    def to_dict(self) -> dict[str, Any]:
        """Serialise for the control API."""
        return dataclasses.asdict(self)


def parse_fault_spec(raw: Any, fault_id: int) -> FaultSpec:
    """Validate a control-API fault spec; raise TypeError or ValueError with a sentence."""
    if not isinstance(raw, dict):
        raise TypeError(f"A fault spec must be a JSON object, got {raw!r}.")
    unknown = sorted(set(raw) - _SPEC_KEYS)
    if unknown:
        raise ValueError(f"Unknown fault spec keys {unknown}; allowed: {sorted(_SPEC_KEYS)}.")
    vendor = raw.get("vendor", "*")
    if vendor not in VENDOR_NAMES:
        raise ValueError(f"Fault vendor must be one of {VENDOR_NAMES}, got {vendor!r}.")
    kind = str(raw.get("kind", ""))
    if kind not in FAULT_KINDS:
        raise ValueError(f"Fault kind must be one of {FAULT_KINDS}, got {raw.get('kind')!r}.")
    path = raw.get("path")
    if path is not None:
        try:
            re.compile(path)
        except (re.error, TypeError) as exc:
            raise ValueError(f"Fault path must be a regular expression: {exc}.") from exc
    probability = raw.get("probability")
    if probability is not None and not (
        isinstance(probability, (int, float)) and 0 <= probability <= 1
    ):
        raise ValueError(f"Fault probability must be a number in 0..1, got {probability!r}.")
    count = raw.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"Fault count must be a positive integer, got {count!r}.")
    code = _fault_code(raw, kind, vendor)
    default_delay = DEFAULT_TIMEOUT_MS if kind == "timeout" else DEFAULT_DELAY_MS
    return FaultSpec(
        id=fault_id,
        vendor=vendor,
        kind=kind,
        method=raw["method"].upper() if raw.get("method") else None,
        path=path,
        # A probabilistic fault stays armed until cleared; a counted one wears out.
        remaining=None if probability is not None else count,
        probability=float(probability) if probability is not None else None,
        delay_ms=_non_negative_int(raw, "delay_ms", default_delay),
        reset_s=_non_negative_int(raw, "reset_s", DEFAULT_RESET_S),
        code=code,
        reason=_fault_reason(raw, kind, vendor),
    )


def _fault_code(raw: dict[str, Any], kind: str, vendor: str) -> int | None:
    if kind != "graph_throttle":
        if "code" in raw:
            raise ValueError("Fault code is only taken by kind graph_throttle.")
        return None
    if vendor != "facebook":
        raise ValueError(f"Fault kind graph_throttle is for vendor facebook, got {vendor!r}.")
    code = raw.get("code", 4)
    if code not in GRAPH_THROTTLE_CODES or isinstance(code, bool):
        raise ValueError(f"Fault code must be one of {GRAPH_THROTTLE_CODES}, got {code!r}.")
    return int(code)


def _fault_reason(raw: dict[str, Any], kind: str, vendor: str) -> str | None:
    if kind != "google_403":
        if "reason" in raw:
            raise ValueError("Fault reason is only taken by kind google_403.")
        return None
    if vendor != "google":
        raise ValueError(f"Fault kind google_403 is for vendor google, got {vendor!r}.")
    reason = raw.get("reason", "rateLimitExceeded")
    if reason not in GOOGLE_403_REASONS:
        raise ValueError(f"Fault reason must be one of {GOOGLE_403_REASONS}, got {reason!r}.")
    return str(reason)


def _non_negative_int(raw: dict[str, Any], key: str, default: int) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"Fault {key} must be a non-negative integer, got {value!r}.")
    return value


class FaultBook:
    """Thread-safe list of armed faults; each matching call consumes one hit atomically."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[FaultSpec] = []
        self._ids = itertools.count(1)
        # Sleepers wait on this event so clearing faults releases stalled requests at once.
        self._cleared = threading.Event()

    def add(self, raw: Any) -> FaultSpec:
        """Arm a fault from a control-API spec."""
        with self._lock:
            spec = parse_fault_spec(raw, next(self._ids))
            self._faults.append(spec)
        logger.info("fault armed id=%s vendor=%s kind=%s", spec.id, spec.vendor, spec.kind)
        return spec

    def clear(self) -> None:
        """Disarm every fault and wake requests sleeping on a delay or timeout."""
        with self._lock:
            self._faults.clear()
            self._cleared.set()
            self._cleared = threading.Event()
        logger.info("faults cleared")

    def take(self, vendor: str, method: str, path: str) -> FaultSpec | None:
        """Return a copy of the first fault that hits this call, consuming one use of it."""
        with self._lock:
            for spec in self._faults:
                if not spec.matches(vendor, method, path):
                    continue
                if spec.probability is not None:
                    if random.random() >= spec.probability:
                        continue
                else:
                    assert spec.remaining is not None
                    spec.remaining -= 1
                    if spec.remaining <= 0:
                        self._faults.remove(spec)
                spec.hits += 1
                return dataclasses.replace(spec)
        return None

    def sleep(self, delay_ms: int) -> None:
        """Sleep for a fault's delay, returning early if the faults are cleared meanwhile."""
        with self._lock:
            event = self._cleared
        event.wait(delay_ms / 1000)

    def snapshot(self) -> list[dict[str, Any]]:
        """List the armed faults for the state dump."""
        with self._lock:
            return [spec.to_dict() for spec in self._faults]
