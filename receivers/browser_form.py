"""POST /webhooks/form/<form_key>: contact forms posted straight from a visitor's browser."""

import logging
from urllib.parse import urlsplit

from flask import abort, redirect, request
from flask.typing import ResponseReturnValue

from core.config import BrowserForm, settings
from core.leads import MalformedPayload, lead_from_browser
from receivers import webhooks
from receivers.common import answer, count, describe, read_body, reject, store_event
from receivers.limits import form_key, limiter

logger = logging.getLogger(__name__)

SOURCE = "browser_form"


def _form(key: str) -> BrowserForm:
    form = settings().lead_capture.sources.browser_forms.get(key)
    if form is None:
        abort(404, f"There is no form {key!r} on this deployment.")
    return form


def _rate_limit() -> str:
    return _form(request.view_args["form_key"]).rate_limit


def _origin() -> str | None:
    origin = request.headers.get("Origin")
    if origin and origin != "null":
        return origin
    # Some browsers send only a Referer on a same-page form post.
    referer = urlsplit(request.headers.get("Referer", ""))
    return f"{referer.scheme}://{referer.netloc}" if referer.scheme and referer.netloc else None


def _wants_json() -> bool:
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json" and request.accept_mimetypes[best] > 0


@webhooks.post("/form/<form_key>")
@limiter.limit(_rate_limit, key_func=form_key)
def browser_form(form_key: str) -> ResponseReturnValue:
    """Check origin and honeypot, validate, store and queue; 303 to the thank-you page."""
    form = _form(form_key)
    body = read_body(request, settings().webhooks.form.max_bytes)

    origin = _origin()
    if origin not in form.allowed_origins:
        return reject(SOURCE, 403, "This form does not accept posts from that origin.")

    fields = {name: request.form.getlist(name) for name in request.form}
    if form.honeypot and any(value.strip() for value in fields.get(form.honeypot, [])):
        # A bot filled the field people cannot see: thank it and keep nothing.
        logger.info("honeypot filled form=%s", form_key)
        return redirect(form.thank_you_url, code=303)
    if not fields:
        return reject(SOURCE, 400, "The form post carries no fields.")

    try:
        event = lead_from_browser(fields, form_key, body, form, settings().default_region)
    except MalformedPayload as exc:
        return reject(SOURCE, 400, describe(exc))
    if not event.lead.email:
        return reject(SOURCE, 400, "The form needs an email address.")

    event_id, status = store_event(SOURCE, event, body)
    if _wants_json():
        return answer(SOURCE, event_id, status)
    count(SOURCE, status)
    return redirect(form.thank_you_url, code=303)
