"""The operator's dashboard at /dashboard: overview, events and replay, queues."""

from flask import Flask


def register_dashboard(app: Flask) -> None:
    """Sessions, CSRF, the dashboard's pages and rq-dashboard, all behind one login."""
    # The view modules add their routes to the blueprint when imported.
    from dashboard import auth, events, overview, queues  # noqa: F401
    from dashboard.blueprint import bp, csrf
    from dashboard.security import configure_sessions

    configure_sessions(app)
    csrf.init_app(app)
    app.register_blueprint(bp)
    queues.mount_rq_dashboard(app)
