"""The dashboard blueprint: every page needs a signed-in user, every action a CSRF token."""

from typing import Any

from flask import Blueprint, render_template, request
from flask.typing import ResponseReturnValue
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException

from dashboard.security import login_redirect, signed_in_user

bp = Blueprint(
    "dashboard",
    __name__,
    url_prefix="/dashboard",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)
# Checked by the dashboard's own hook, not app-wide: webhooks are signed, not CSRF-tokened.
csrf = CSRFProtect()

PUBLIC_ENDPOINTS = {"dashboard.login", "dashboard.static"}
# Pages carry masked personal data: only our own scripts, no framing, no caching.
POLICY = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)


@bp.before_request
def guard() -> ResponseReturnValue | None:
    """Send strangers to the login page; refuse a form post without a valid CSRF token."""
    if request.endpoint not in PUBLIC_ENDPOINTS and signed_in_user() is None:
        return login_redirect()
    csrf.protect()
    return None


@bp.context_processor
def signed_in() -> dict[str, Any]:
    """Templates show who is signed in."""
    return {"user": signed_in_user()}


@bp.after_request
def harden(response: Any) -> Any:
    """Security headers on every dashboard answer."""
    response.headers["Content-Security-Policy"] = POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    if request.endpoint != "dashboard.static":
        response.headers["Cache-Control"] = "no-store"
    return response


@bp.errorhandler(CSRFError)
def csrf_refused(exc: CSRFError) -> ResponseReturnValue:
    """A form without its token (or from another site) is refused with a sentence."""
    message = "This form has expired or did not come from the dashboard; reload and try again."
    return render_template("dashboard/error.html", message=message, code=400), 400


@bp.errorhandler(HTTPException)
def http_error(exc: HTTPException) -> ResponseReturnValue:
    """Errors inside the dashboard as pages, not JSON."""
    code = exc.code or 500
    return render_template("dashboard/error.html", message=exc.description, code=code), code
