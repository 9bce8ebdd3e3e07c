"""The contract every vendor emulator module fulfils so the app can route, guard and fault it."""

from __future__ import annotations

import abc
import logging
from typing import Any

from flask import Blueprint, Response

from sandbox.faults import FaultSpec

logger = logging.getLogger(__name__)


class VendorStore(abc.ABC):
    """In-memory data of one vendor; always read and written under the sandbox lock."""

    @abc.abstractmethod
    def snapshot(self) -> dict[str, Any]:
        """Return a JSON-ready copy of everything the vendor holds."""

    def close(self) -> None:  # noqa: B027 - optional hook, most stores have nothing to stop
        """Stop background work (webhook deliveries) when the store is replaced or shut down."""


class VendorEmulator(abc.ABC):
    """One vendor: its URL prefix, blueprint, credentials and vendor-shaped answers."""

    name: str
    prefix: str

    @abc.abstractmethod
    def blueprint(self) -> Blueprint:
        """Return the blueprint with the vendor's routes, relative to `prefix`."""

    @abc.abstractmethod
    def new_store(self, seed: bool) -> VendorStore:
        """Build a fresh store, with the demo seed data when `seed` is true."""

    @abc.abstractmethod
    def guard(self, path: str) -> Response | None:
        """Check auth and rate limits for a call; return the vendor's refusal, or None."""

    @abc.abstractmethod
    def fault_response(self, spec: FaultSpec, path: str) -> Response:
        """Answer an injected 429 or 5xx the way the vendor does."""

    @abc.abstractmethod
    def error_response(self, status: int, message: str, path: str) -> Response:
        """Answer a routing error (404, 405) the way the vendor does."""

    def control_blueprint(self) -> Blueprint | None:
        """Return the vendor's own control routes (under /_sandbox/...), if it has any."""
        return None

    def decorate(self, response: Response, path: str) -> Response:
        """Add headers the vendor puts on every answer."""
        return response

    @abc.abstractmethod
    def product_env(self, base_url: str) -> dict[str, str]:
        """Return the product's environment variables that point it at this emulator."""
