"""Sign in with a configured user's password or with ADMIN_TOKEN; sign out."""

import logging

from flask import flash, redirect, render_template, request, session, url_for
from flask.typing import ResponseReturnValue

from dashboard.blueprint import bp
from dashboard.security import check_credentials, safe_next, sign_in, signed_in_user
from receivers.limits import limiter

logger = logging.getLogger(__name__)


@bp.route("/login", methods=["GET", "POST"])
# Per client address, counted in Redis across web processes: password guessing stays slow.
@limiter.limit("10 per minute", methods=["POST"])
def login() -> ResponseReturnValue:
    """The login form; a good password or ADMIN_TOKEN starts a session."""
    target = safe_next(request.values.get("next"))
    if request.method == "GET":
        if signed_in_user() is not None:
            return redirect(target)
        return render_template("dashboard/login.html", next=target)

    user = check_credentials(
        request.form.get("user", "").strip(), request.form.get("password", "")
    )
    if user is None:
        logger.info("dashboard login refused")
        message = "That user name and password (or admin token) do not match."
        return render_template("dashboard/login.html", next=target, error=message), 401
    sign_in(user)
    logger.info("dashboard login user=%s", user)
    return redirect(target)


@bp.post("/logout")
def logout() -> ResponseReturnValue:
    """End the session."""
    session.clear()
    flash("You are signed out.")
    return redirect(url_for("dashboard.login"))
