"""The web process: create_app() builds the Flask app that receives webhooks."""

import logging
import sys
from datetime import UTC, datetime

import click
from flask import Flask, jsonify
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from core import logs, queue
from core.config import ConfigError, settings

logger = logging.getLogger(__name__)

# The largest route limit (DocuSign Connect can carry whole PDFs); each route sets its own.
MAX_BODY_BYTES = 25 * 1024 * 1024


def create_app() -> Flask:
    """The app with its receivers, health, metrics and run-history API."""
    try:
        current = settings()
    except ConfigError as exc:
        import cli

        # `flask check-config` and the other setup commands must run on a broken config.
        if not cli.config_optional():
            sys.exit(f"config error: {exc}")
        return cli.setup_app()
    logs.configure(current.log_level)

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.ensure_ascii = False
    # Heroku's and Render's routers add one X-Forwarded-For hop: rate limits need the client.
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=current.trusted_proxies, x_proto=1)

    from dashboard import register_dashboard
    from receivers import webhooks
    from receivers.limits import limiter, storage_uri
    from web.api import api
    from web.health import health
    from web.unsubscribe import unsubscribe

    app.config["RATELIMIT_STORAGE_URI"] = storage_uri()
    if app.config["RATELIMIT_STORAGE_URI"].startswith("rediss://"):
        # The same self-signed TLS as the queue's connection (core.queue.connection).
        app.config["RATELIMIT_STORAGE_OPTIONS"] = {"ssl_cert_reqs": "none"}
    limiter.init_app(app)
    app.register_blueprint(webhooks)
    app.register_blueprint(health)
    app.register_blueprint(api)
    app.register_blueprint(unsubscribe)
    register_dashboard(app)
    queue.warn_if_evicting()
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _crash)
    _register_commands(app)
    return app


def _http_error(exc: HTTPException) -> ResponseReturnValue:
    # abort(4xx, "sentence") carries the sentence; werkzeug's defaults are sentences too.
    # Keep the headers that belong to the status (Allow on 405, Retry-After on 429).
    headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
    return jsonify(error=exc.description), exc.code or 500, headers


def _crash(exc: Exception) -> ResponseReturnValue:
    logger.error("unhandled error %s", logs.safe_traceback(exc))
    return jsonify(error="The server failed to handle this request; it has been logged."), 500


def _register_commands(app: Flask) -> None:
    @app.cli.command("migrate")
    def migrate() -> None:
        """Apply the Alembic migrations to DATABASE_URL."""
        from core.migrate import upgrade_database

        upgrade_database()
        click.echo("database is at the newest revision")

    @app.cli.command("sweep")
    def sweep() -> None:
        """Queue again stranded events, and sequence steps that are due or lost their worker."""
        from core.recovery import requeue_stranded
        from flows.sequences import requeue_due_steps

        click.echo(f"requeued {requeue_stranded()} events")
        click.echo(f"requeued {requeue_due_steps()} sequence steps")

    @app.cli.command("replay")
    @click.argument("event_ids", nargs=-1)
    @click.option("--failed", is_flag=True, help="Replay every failed event.")
    @click.option("--since", type=click.DateTime(), help="With --failed: received since (UTC).")
    @click.option("--force", is_flag=True, help="Replay events that did not fail too.")
    def replay_command(
        event_ids: tuple[str, ...], failed: bool, since: datetime | None, force: bool
    ) -> None:
        """Run events again; vendor side effects already done are not done twice."""
        from core.replay import failed_event_ids, replay

        if failed:
            event_ids += tuple(failed_event_ids(since.replace(tzinfo=UTC) if since else None))
        if not event_ids:
            raise click.UsageError("name an EVENT_ID or use --failed")
        for event_id in event_ids:
            click.echo(f"{event_id}: {replay(event_id, force=force)}")

    import cli

    cli.register(app)
