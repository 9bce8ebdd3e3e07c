"""Process-wide connector instances, built once from the settings."""

import functools

from connectors.gmail import GmailClient
from connectors.pipedrive import PipedriveClient
from core.config import settings


@functools.cache
def pipedrive() -> PipedriveClient:
    """The Pipedrive client; it keeps its HTTP connections and lookup caches."""
    current = settings()
    return PipedriveClient(current.pipedrive, current.retry)


@functools.cache
def gmail() -> GmailClient:
    """The Gmail client; it keeps its OAuth token until it expires."""
    current = settings()
    return GmailClient(current.google, current.retry)


def reset() -> None:
    """Forget the clients and settings (tests change the environment)."""
    pipedrive.cache_clear()
    gmail.cache_clear()
    settings.cache_clear()
