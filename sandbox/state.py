"""Shared in-memory sandbox state: vendor stores, settings, faults and the call log."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any, TypeVar

from flask import current_app

from sandbox.faults import FaultBook
from sandbox.vendor import VendorEmulator, VendorStore

logger = logging.getLogger(__name__)

EXTENSION_KEY = "sandbox"
DEFAULT_CONFIG: dict[str, int] = {
    "latency_ms": 0,
    "pipedrive_rate_limit": 0,
    "pipedrive_search_rate_limit": 0,
    "google_token_expires_in": 3599,
    # Pipedrive retries a failed webhook after 3, 30 and 150 s; tests scale that down.
    "pipedrive_webhook_retry_percent": 100,
    "docusign_token_expires_in": 3600,
    # DocuSign's account-wide budget: 3,000 eSignature calls an hour.
    "docusign_hourly_limit": 3000,
    "docusign_connect_retry_percent": 100,
}
# Settings that must stay above zero: a token that expires at once would make every call 401.
_POSITIVE_SETTINGS = {"google_token_expires_in", "docusign_token_expires_in"}

StoreT = TypeVar("StoreT", bound=VendorStore)


class SandboxState:
    """Everything the emulators remember, guarded by one re-entrant lock."""

    def __init__(self, emulators: Iterable[VendorEmulator], seed: bool) -> None:
        self.lock = threading.RLock()
        self.faults = FaultBook()
        self.emulators = {emulator.name: emulator for emulator in emulators}
        self.seed = seed
        self.config: dict[str, int] = dict(DEFAULT_CONFIG)
        self.calls: list[dict[str, Any]] = []
        self.stores: dict[str, VendorStore] = {}
        self.reset()

    def reset(self) -> None:
        """Return every vendor to its seed, and drop settings, faults and the call log."""
        with self.lock:
            self.close()
            self.stores = {name: em.new_store(self.seed) for name, em in self.emulators.items()}
            self.config = dict(DEFAULT_CONFIG)
            self.calls = []
        self.faults.clear()
        logger.info("sandbox reset seed=%s", self.seed)

    def close(self) -> None:
        """Stop the background work of every current store."""
        with self.lock:
            stores = list(self.stores.values())
        for store in stores:
            store.close()

    def store(self, name: str, kind: type[StoreT]) -> StoreT:
        """Return the store of vendor `name`, checked to be of type `kind`."""
        store = self.stores[name]
        assert isinstance(store, kind)
        return store

    def configure(self, raw: Any) -> dict[str, int]:
        """Apply control-API settings; raise TypeError or ValueError with a sentence."""
        if not isinstance(raw, dict):
            raise TypeError(f"Settings must be a JSON object, got {raw!r}.")
        unknown = sorted(set(raw) - set(DEFAULT_CONFIG))
        if unknown:
            raise ValueError(f"Unknown settings {unknown}; allowed: {sorted(DEFAULT_CONFIG)}.")
        for key, value in raw.items():
            floor = 1 if key in _POSITIVE_SETTINGS else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < floor:
                raise ValueError(f"Setting {key} must be an integer >= {floor}, got {value!r}.")
        with self.lock:
            self.config.update(raw)
            logger.info("sandbox configured %s", raw)
            return dict(self.config)

    def setting(self, key: str) -> int:
        """Read one setting."""
        with self.lock:
            return self.config[key]

    def log_call(self, vendor: str, method: str, path: str, status: int) -> None:
        """Append one vendor call to the call log."""
        with self.lock:
            self.calls.append({"vendor": vendor, "method": method, "path": path, "status": status})

    def snapshot(self) -> dict[str, Any]:
        """Return a JSON-ready dump of all vendors, settings, faults and calls."""
        with self.lock:
            dump: dict[str, Any] = {name: store.snapshot() for name, store in self.stores.items()}
            dump["config"] = dict(self.config)
            dump["calls"] = [dict(call) for call in self.calls]
        dump["faults"] = self.faults.snapshot()
        return dump

    def product_env(self, base_url: str) -> dict[str, str]:
        """Return the product's environment variables for a sandbox served at `base_url`."""
        env: dict[str, str] = {}
        for emulator in self.emulators.values():
            env.update(emulator.product_env(base_url))
        return env


def current_state() -> SandboxState:
    """Return the sandbox state of the running app."""
    state = current_app.extensions[EXTENSION_KEY]
    assert isinstance(state, SandboxState)
    return state
