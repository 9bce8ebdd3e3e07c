"""The queue's entry point: route a stored event to the flow that handles it."""

import logging

from rq import get_current_job

from core.store import Event, session
from flows import contract, follow_up, lead_capture

logger = logging.getLogger(__name__)

FLOWS_BY_SOURCE = {
    "typeform": lead_capture.run,
    "form": lead_capture.run,
    "browser_form": lead_capture.run,
    "facebook": lead_capture.run,
    "pipedrive": follow_up.run,
    # Connect messages and envelope polls; `flask send-contract` stores "operator" events.
    "docusign": contract.run,
    "operator": contract.run,
}


def run_event(event_id: str) -> str:
    """Run the flow for one event; the job id is the event id."""
    job = get_current_job()
    retries_left = (job.retries_left or 0) if job is not None else 0

    with session() as db:
        event = db.get(Event, event_id)
        source = event.source if event is not None else None
    flow = FLOWS_BY_SOURCE.get(source or "")
    if flow is None:
        logger.warning("no flow for event event_id=%s source=%s", event_id, source)
        return "skipped"

    return flow(event_id, retries_left=retries_left)
