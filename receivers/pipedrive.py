"""POST /webhooks/pipedrive: Pipedrive webhooks, v1 and v2 bodies, with HTTP Basic auth."""

import hmac

from flask import request
from flask.typing import ResponseReturnValue

from core.config import settings
from core.leads import MalformedPayload
from core.pipedrive_events import PipedriveEvent, event_from_pipedrive
from receivers import webhooks
from receivers.common import (
    answer,
    answer_unreadable,
    describe,
    parse_json,
    read_body,
    reject,
    store_event,
)

SOURCE = "pipedrive"


def _authorised(user: str, password: str) -> bool:
    """Constant-time check of the Basic credentials; none configured refuses everyone."""
    given = request.authorization
    if not user or not password or given is None or given.type != "basic":
        return False
    # Both compared, always: stopping at a wrong user would say which half was wrong.
    user_ok = hmac.compare_digest((given.username or "").encode(), user.encode())
    password_ok = hmac.compare_digest((given.password or "").encode(), password.encode())
    return user_ok and password_ok


def _ignore_reason(event: PipedriveEvent) -> str | None:
    """Why no flow acts on the event, or None when the follow-up flow should see it."""
    if event.entity != "deal":
        return f"no flow acts on {event.entity} events"
    if event.action == "changed" and not (event.stage_changed or event.status_changed):
        return "the deal changed neither stage nor status"
    if event.action in ("deleted", "merged"):
        return f"no trigger acts on {event.action} deals"
    return None


@webhooks.post("/pipedrive")
def pipedrive() -> ResponseReturnValue:
    """Check the Basic credentials, normalise the change, store it and queue it."""
    config = settings().pipedrive
    body = read_body(request, config.webhook_max_bytes)

    if not _authorised(config.webhook_user, config.webhook_password):
        response, status = reject(
            SOURCE, 401, "The HTTP Basic credentials are missing or do not match."
        )
        response.headers["WWW-Authenticate"] = 'Basic realm="salesflow"'
        return response, status

    try:
        payload = parse_json(body)
        event = event_from_pipedrive(payload)
    except MalformedPayload as exc:
        return reject(SOURCE, 400, describe(exc))

    # Anything else that authenticated gets a 200: a 4xx makes Pipedrive retry, and ten
    # failures ban the webhook for 30 minutes, losing the good events with the odd one.
    if event is None:
        return answer_unreadable(
            SOURCE, body, "the body is not a Pipedrive change this product understands"
        )

    event_id, status = store_event(SOURCE, event, body, ignore_reason=_ignore_reason(event))
    return answer(SOURCE, event_id, status)
