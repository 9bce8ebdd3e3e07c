"""POST /webhooks/form: leads posted as signed JSON by the company's website backend."""

import hashlib

from flask import request
from flask.typing import ResponseReturnValue
from pydantic import ValidationError

from core.config import settings
from core.leads import MalformedPayload, lead_from_form
from core.signatures import verify_hex_sha256
from receivers import webhooks
from receivers.common import accept, describe, parse_json, read_body, reject

SOURCE = "form"


@webhooks.post("/form")
def website_form() -> ResponseReturnValue:
    """Verify X-Signature, parse the lead, store it and queue it."""
    config = settings()
    body = read_body(request, config.webhooks.form.max_bytes)

    signature = request.headers.get("X-Signature")
    if not verify_hex_sha256(config.webhooks.form.secret, body, signature):
        return reject(SOURCE, 401, "The X-Signature header is missing or does not match.")

    form = config.lead_capture.sources.form
    try:
        payload = parse_json(body)
        if form is None:
            digest = hashlib.sha256(body).hexdigest()
            return accept(
                SOURCE,
                None,
                body,
                kind="lead",
                dedup_key=f"form:unconfigured:{digest}",
                ignore_reason="no website form is configured",
            )
        event = lead_from_form(payload, body, form, config.default_region)
    except (MalformedPayload, ValidationError) as exc:
        return reject(SOURCE, 400, describe(exc))

    reason = None if event.lead.email else "the submission has no email address"
    return accept(SOURCE, event, body, ignore_reason=reason)
