"""Gunicorn settings of the web process (Procfile `web`); command-line flags win."""

import os

# The platform routes to $PORT; 8000 when run by hand.
bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
# Heroku sets WEB_CONCURRENCY from the dyno size; Render leaves it to us.
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Threads keep a slow client from holding a whole process; a receiver only verifies, stores
# and enqueues, so a few threads per process are plenty.
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "4"))

# Heroku's router and Render's proxy give up on a request after 30 s: answer or fail before.
timeout = 25
# A deploy or restart sends SIGTERM; finish the requests in flight (Heroku kills at 30 s).
graceful_timeout = 20
# Connections stay open between the router and the dyno.
keepalive = 5
# Restart processes now and then so a slow leak never grows into an outage.
max_requests = 2000
max_requests_jitter = 200

# The request line is logged as method and path only: %(U)s has no query string, and a
# query string can carry a token (Pipedrive v1 takes api_token there). No referer either.
accesslog = "-"
access_log_format = (
    'remote=%(h)s request="%(m)s %(U)s" status=%(s)s bytes=%(B)s ms=%(M)s '
    'request_id=%({x-request-id}i)s agent="%(a)s"'
)
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")

# The master builds the app once and forks the workers from it: they share its pages
# copy-on-write (each worker's own memory, USS, falls from ~70 to ~27 MB after 2,000
# webhooks) and a worker recycled by max_requests starts without importing anything.
# Fork safety: when_ready below closes what create_app() connected; core.store drops a
# pool inherited by a fork, and redis-py and prometheus_client notice the new pid.
# A HUP restarts the workers from the master's copy: new code needs a restart (a deploy).
preload_app = True
# The platform's router is the only client; trust its X-Forwarded-* headers.
forwarded_allow_ips = "*"

# Several processes answer /metrics in turn: prometheus_client's multiprocess mode sums
# their counters from files in one folder. It must be set before the app imports it.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    import tempfile

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="salesflow-metrics-")


def child_exit(server, worker):  # noqa: ANN001 - gunicorn's hook signature
    """Drop a dead worker's live gauges from the multiprocess files."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def when_ready(server):  # noqa: ANN001 - gunicorn's hook signature
    """Close the database and Redis connections the preloaded app opened in the master."""
    if not server.cfg.preload_app:
        return
    from core import queue, store

    # Before the first fork: no worker inherits a socket, each opens its own on first use.
    store.reset_engine()
    if queue.connection.cache_info().currsize:
        queue.connection().connection_pool.disconnect()
