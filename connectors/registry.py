"""Process-wide connector instances, built once from the settings."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from connectors.errors import FlowAbort
from core.config import settings

if TYPE_CHECKING:
    from connectors.calendar import CalendarClient
    from connectors.docusign import DocuSignClient
    from connectors.facebook import GraphClient
    from connectors.gmail import GmailClient
    from connectors.google_docs import GoogleDocsClient
    from connectors.pipedrive import PipedriveClient

# Each client module is imported by the function that builds it: the web process imports
# this module for the dashboard's funnel (Pipedrive only) and would otherwise load
# docusign_esign (32 MB resident) and the Google client libraries for clients it never builds.


@functools.cache
def pipedrive() -> PipedriveClient:
    """The Pipedrive client; it keeps its HTTP connections and lookup caches."""
    from connectors.pipedrive import PipedriveClient

    current = settings()
    return PipedriveClient(current.pipedrive, current.retry)


@functools.cache
def gmail() -> GmailClient:
    """The Gmail client; it keeps its OAuth token until it expires."""
    from connectors.gmail import GmailClient

    current = settings()
    return GmailClient(current.google, current.retry)


@functools.cache
def calendar() -> CalendarClient:
    """The Google Calendar client, on the same OAuth grant as Gmail."""
    from connectors.calendar import CalendarClient

    current = settings()
    return CalendarClient(current.google, current.retry)


@functools.cache
def graph() -> GraphClient:
    """The Facebook Graph client."""
    from connectors.facebook import GraphClient

    current = settings()
    if current.facebook is None:
        raise FlowAbort("a Facebook lead arrived but config.yaml has no `facebook` section")
    return GraphClient(current.facebook, current.retry)


@functools.cache
def docusign() -> DocuSignClient:
    """The DocuSign client; it keeps its JWT-grant token until shortly before it expires."""
    from connectors.docusign import DocuSignClient

    current = settings()
    if current.contracts is None:
        raise FlowAbort("a contract is to be sent but config.yaml has no `contracts` section")
    return DocuSignClient(current.contracts.docusign, current.retry)


@functools.cache
def google_docs() -> GoogleDocsClient:
    """The Drive and Docs client, on the same OAuth grant as Gmail."""
    from connectors.google_docs import GoogleDocsClient

    current = settings()
    return GoogleDocsClient(current.google, current.retry)


def reset() -> None:
    """Forget the clients and settings (tests change the environment)."""
    pipedrive.cache_clear()
    gmail.cache_clear()
    calendar.cache_clear()
    graph.cache_clear()
    docusign.cache_clear()
    google_docs.cache_clear()
    settings.cache_clear()
