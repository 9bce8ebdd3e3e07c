"""Queues: depth and registries at a glance, and rq-dashboard mounted behind our login."""

import logging
from typing import Any

import redis
from flask import Flask, current_app, render_template, request
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import SQLAlchemyError

from core import queue
from core.metrics import failed_runs, queue_stats
from dashboard.blueprint import bp
from dashboard.security import login_redirect, signed_in_user

logger = logging.getLogger(__name__)

RQ_PREFIX = "/dashboard/rq"


@bp.get("/queues")
def queues() -> ResponseReturnValue:
    """The flows queue's depth, registries and oldest waiting job; failed runs."""
    stats: Any = None
    try:
        stats = queue_stats()
    except (redis.RedisError, RuntimeError) as exc:
        logger.warning("queue page without redis error=%s", exc.__class__.__name__)
    try:
        failed = failed_runs()
    except SQLAlchemyError:
        failed = None
    return render_template(
        "dashboard/queues.html",
        stats=stats,
        failed=failed,
        queue_name=queue.QUEUE_NAME,
        rq_mounted="rq_dashboard" in current_app.blueprints,
    )


def _rq_url(url: str) -> str:
    # Heroku's Key-Value Store serves TLS with a self-signed certificate (as core.queue says).
    if url.startswith("rediss://") and "ssl_cert_reqs" not in url:
        return url + ("&" if "?" in url else "?") + "ssl_cert_reqs=none"
    return url


def mount_rq_dashboard(app: Flask) -> None:
    """rq-dashboard at /dashboard/rq, read-only, for signed-in users only."""
    import rq_dashboard

    try:
        url = queue.redis_url()
    except RuntimeError:
        logger.warning("rq-dashboard not mounted: REDIS_URL is not set")
        return
    app.config["RQ_DASHBOARD_REDIS_URL"] = _rq_url(url)
    rq_dashboard.web.setup_rq_connection(app)
    app.register_blueprint(rq_dashboard.blueprint, url_prefix=RQ_PREFIX)
    app.before_request(_guard_rq_dashboard)
    app.after_request(_harden_rq_dashboard)


def _guard_rq_dashboard() -> ResponseReturnValue | None:
    if request.blueprint != "rq_dashboard":
        return None
    if signed_in_user() is None:
        return login_redirect()
    if request.method not in ("GET", "HEAD"):
        # Its delete, requeue and empty buttons post without a CSRF token and go around the
        # event store; replay failed events from the dashboard's Events page instead.
        message = "rq-dashboard is read-only here: replay failed events from Events."
        return render_template("dashboard/error.html", message=message, code=403), 403
    return None


def _harden_rq_dashboard(response: Any) -> Any:
    if request.blueprint == "rq_dashboard":
        # Its pages use inline scripts, so only framing and sniffing are closed.
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-store"
    return response
