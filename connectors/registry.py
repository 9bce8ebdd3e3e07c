"""Process-wide connector instances, built once from the settings."""

import functools

from connectors.calendar import CalendarClient
from connectors.errors import FlowAbort
from connectors.facebook import GraphClient
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


@functools.cache
def calendar() -> CalendarClient:
    """The Google Calendar client, on the same OAuth grant as Gmail."""
    current = settings()
    return CalendarClient(current.google, current.retry)


@functools.cache
def graph() -> GraphClient:
    """The Facebook Graph client."""
    current = settings()
    if current.facebook is None:
        raise FlowAbort("a Facebook lead arrived but config.yaml has no `facebook` section")
    return GraphClient(current.facebook, current.retry)


def reset() -> None:
    """Forget the clients and settings (tests change the environment)."""
    pipedrive.cache_clear()
    gmail.cache_clear()
    calendar.cache_clear()
    graph.cache_clear()
    settings.cache_clear()
