"""Who is signed in: ADMIN_TOKEN or a configured user; the session cookie and its key."""

import hmac
import logging
import os
import secrets
from datetime import timedelta
from urllib.parse import urlsplit

from flask import Flask, redirect, request, session, url_for
from flask.sessions import SecureCookieSessionInterface
from werkzeug.security import check_password_hash
from werkzeug.wrappers import Response

from core.config import settings

logger = logging.getLogger(__name__)

ADMIN = "admin"
SESSION_LIFETIME = timedelta(hours=12)
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class DashboardSessions(SecureCookieSessionInterface):
    """Secure cookies, except in debug or testing, or over plain http on the loopback."""

    def get_cookie_secure(self, app: Flask) -> bool:
        """Whether this answer's cookie may travel over https only."""
        if app.debug or app.testing:
            return False
        # A browser on the same machine (the demo, the e2e test) speaks plain http.
        if request.scheme == "http" and urlsplit(request.host_url).hostname in LOOPBACK_HOSTS:
            return False
        return super().get_cookie_secure(app)


def configure_sessions(app: Flask) -> None:
    """SECRET_KEY from the environment and the session cookie's flags."""
    key = os.environ.get("SECRET_KEY", "")
    if not key:
        # Sessions then end with the process: gunicorn's master (the app is preloaded there),
        # whose workers share this key, or a process that ran create_app() itself.
        logger.warning("SECRET_KEY is not set: dashboard sessions last only for this process")
        key = secrets.token_urlsafe(32)
    app.secret_key = key
    app.session_interface = DashboardSessions()
    app.config.update(
        SESSION_COOKIE_NAME="salesflow_dashboard",
        SESSION_COOKIE_SECURE=True,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=SESSION_LIFETIME,
        # The token lives as long as the session; an hour-old open page can still replay.
        WTF_CSRF_TIME_LIMIT=None,
        WTF_CSRF_CHECK_DEFAULT=False,
    )


def check_credentials(user: str, password: str) -> str | None:
    """The user these credentials sign in, or None."""
    users = settings().dashboard.users
    if user in users:
        return user if check_password_hash(users[user], password) else None
    token = os.environ.get("ADMIN_TOKEN", "")
    if token and user in ("", ADMIN) and hmac.compare_digest(password.encode(), token.encode()):
        return ADMIN
    return None


def signed_in_user() -> str | None:
    """The session's user while its credentials still exist in the config or environment."""
    user = session.get("user")
    if not isinstance(user, str):
        return None
    if user in settings().dashboard.users:
        return user
    if user == ADMIN and os.environ.get("ADMIN_TOKEN"):
        return user
    return None


def sign_in(user: str) -> None:
    """Start a fresh session for the user."""
    session.clear()
    session.permanent = True
    session["user"] = user


def login_redirect() -> Response:
    """To the login page, coming back to this page after."""
    return redirect(url_for("dashboard.login", next=request.full_path.rstrip("?")))


def safe_next(target: str | None) -> str:
    """Only a path inside the dashboard: a login must not bounce to another site."""
    if target and target.startswith("/dashboard") and "//" not in target and "\\" not in target:
        return target
    return url_for("dashboard.overview")
