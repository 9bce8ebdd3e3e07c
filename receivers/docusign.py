"""POST /webhooks/docusign: DocuSign Connect, JSON SIM and legacy XML, signed with HMAC keys."""

import base64
import hashlib
import hmac
import re

from flask import request
from flask.typing import ResponseReturnValue

from core.config import DocuSign, settings
from core.docusign_events import EnvelopeEvent, event_from_connect
from core.leads import MalformedPayload
from receivers import webhooks
from receivers.common import answer, answer_unreadable, describe, read_body, reject, store_event

SOURCE = "docusign"
SIGNATURE_HEADER = re.compile(r"^x-docusign-signature-\d+$", re.IGNORECASE)


def signed(keys: list[str], body: bytes, headers: dict[str, str]) -> bool:
    """Any X-DocuSign-Signature-N equal to the base64 HMAC-SHA256 of the body under any key."""
    claimed = [
        value.strip().encode("utf-8", "surrogateescape")
        for name, value in headers.items()
        if SIGNATURE_HEADER.match(name)
    ]
    expected = [
        base64.b64encode(hmac.new(key.encode("utf-8"), body, hashlib.sha256).digest())
        for key in keys
    ]
    # Every pair is compared, so the time taken says nothing about which key matched.
    matches = [hmac.compare_digest(e, c) for e in expected for c in claimed]
    return any(matches)


def _settings() -> DocuSign:
    contracts = settings().contracts
    return contracts.docusign if contracts is not None else DocuSign()


def _ignore_reason(event: EnvelopeEvent) -> str | None:
    if not event.tracked:
        return f"the contract flow does not act on {event.status} envelopes"
    return None


@webhooks.post("/docusign")
def docusign() -> ResponseReturnValue:
    """Check the HMAC, normalise the message, store it (PDFs stay in the body), queue it."""
    config = _settings()
    body = read_body(request, config.connect_max_bytes)

    # No keys configured refuses every delivery: an unsigned envelope event could close deals.
    if not signed(config.hmac_keys(), body, dict(request.headers)):
        return reject(SOURCE, 401, "No X-DocuSign-Signature header matches a configured key.")

    try:
        event = event_from_connect(body)
    except MalformedPayload as exc:
        return reject(SOURCE, 400, describe(exc))

    if event is None:
        return answer_unreadable(
            SOURCE, body, "the message names no envelope this product can act on"
        )

    # Only the parsed envelope state goes into the event's data and the queue; the body,
    # with its PDFs, is the stored payload the worker reads them from.
    event_id, status = store_event(SOURCE, event, body, ignore_reason=_ignore_reason(event))
    return answer(SOURCE, event_id, status)
