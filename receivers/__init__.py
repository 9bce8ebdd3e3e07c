"""Webhook receivers: verify, parse into a typed event, store, enqueue, answer."""

from flask import Blueprint

webhooks = Blueprint("webhooks", __name__, url_prefix="/webhooks")

# Route modules register themselves on the blueprint.
from receivers import browser_form, facebook, form, pipedrive, typeform  # noqa: E402,F401
