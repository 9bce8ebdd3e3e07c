"""Vendor emulators (Pipedrive, Google) that the product's real clients talk to over HTTP."""

from sandbox.app import create_sandbox_app

__all__ = ["create_sandbox_app"]
