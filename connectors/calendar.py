"""Google Calendar: events.insert and events.get through google-api-python-client."""

import logging
from typing import Any

from googleapiclient.discovery import build

from connectors.errors import VendorError
from connectors.gmail import authorized_http, execute
from core.config import Google, Retry

logger = logging.getLogger(__name__)

VENDOR = "calendar"
SCOPES = ["https://www.googleapis.com/auth/calendar.events"]


class CalendarClient:
    """Puts events on the reps' calendars with the sending mailbox's OAuth grant."""

    def __init__(self, settings: Google, retry: Retry) -> None:
        self._retry = retry
        http = authorized_http(settings, SCOPES)
        # The bundled discovery document's root is googleapis.com/calendar/v3/.
        options = (
            {"api_endpoint": settings.api_base_url.rstrip("/") + "/calendar/v3/"}
            if settings.api_base_url
            else None
        )
        self._service = build(
            "calendar",
            "v3",
            http=http,
            static_discovery=True,
            cache_discovery=False,
            client_options=options,
        )

    def _execute(self, request: Any, what: str) -> dict[str, Any]:
        return execute(request, what, self._retry, VENDOR)

    def get_event(self, calendar_id: str, event_id: str) -> dict[str, Any] | None:
        """events.get, or None when the calendar has no such event."""
        request = self._service.events().get(calendarId=calendar_id, eventId=event_id)
        try:
            return self._execute(request, "get event")
        except VendorError as exc:
            if exc.status in (404, 410):
                return None
            raise

    def insert_event(self, calendar_id: str, event: dict[str, Any]) -> dict[str, Any]:
        """events.insert with the client's own id; a 409 means an earlier try made it."""
        request = self._service.events().insert(calendarId=calendar_id, body=event)
        try:
            return self._execute(request, "insert event")
        except VendorError as exc:
            if exc.status != 409 or "id" not in event:
                raise
        logger.info("calendar event exists already event_id=%s", event["id"])
        found = self.get_event(calendar_id, event["id"])
        # A 409 on an id we chose, that events.get cannot see, is a deleted event: Calendar
        # keeps ids of cancelled events. It was made once, which is what the key promises.
        return found or {"id": event["id"], "status": "cancelled"}
