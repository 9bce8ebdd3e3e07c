"""Vendor emulators (Pipedrive, Google, Facebook Graph) that real clients reach over HTTP."""

from sandbox.app import create_sandbox_app

__all__ = ["create_sandbox_app"]
