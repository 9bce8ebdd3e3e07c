"""Webhook receivers: verify, parse into a typed event, store, enqueue, answer."""

from flask import Blueprint

webhooks = Blueprint("webhooks", __name__, url_prefix="/webhooks")

# Route modules register themselves on the blueprint.
from receivers import (  # noqa: E402,F401
    browser_form,
    docusign,
    facebook,
    form,
    pipedrive,
    typeform,
)
