"""POST /webhooks/typeform: Typeform form_response webhooks."""

from flask import request
from flask.typing import ResponseReturnValue
from pydantic import ValidationError

from core.config import settings
from core.leads import MalformedPayload, lead_from_typeform, typeform_form_id
from core.signatures import verify_base64_sha256
from receivers import webhooks
from receivers.common import accept, describe, parse_json, read_body, reject

SOURCE = "typeform"


@webhooks.post("/typeform")
def typeform() -> ResponseReturnValue:
    """Verify the Typeform signature, parse the lead, store it and queue it."""
    config = settings()
    body = read_body(request, config.webhooks.typeform.max_bytes)

    signature = request.headers.get("Typeform-Signature")
    if not verify_base64_sha256(config.webhooks.typeform.secret, body, signature):
        return reject(SOURCE, 401, "The Typeform-Signature header is missing or does not match.")

    try:
        payload = parse_json(body)
        event_type, form_id = typeform_form_id(payload)
    except MalformedPayload as exc:
        return reject(SOURCE, 400, describe(exc))

    form = config.lead_capture.sources.typeform.get(form_id)
    if event_type != "form_response" or form is None:
        token = payload["form_response"]["token"]
        reason = f"no flow acts on {event_type} events of form {form_id}"
        return accept(
            SOURCE,
            None,
            body,
            kind=event_type,
            dedup_key=f"typeform:{form_id}:{token}",
            ignore_reason=reason,
        )

    try:
        event = lead_from_typeform(payload, form, config.default_region)
    except (MalformedPayload, ValidationError) as exc:
        return reject(SOURCE, 400, describe(exc))

    reason = None if event.lead.email else "the submission has no email address"
    return accept(SOURCE, event, body, ignore_reason=reason)
