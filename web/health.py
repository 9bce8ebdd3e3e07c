"""GET /healthz and GET /metrics."""

import logging
import os

import redis
from flask import Blueprint, Response, jsonify
from flask.typing import ResponseReturnValue
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from core import queue
from core.metrics import QueueCollector, SpeedToLeadCollector
from core.store import engine

logger = logging.getLogger(__name__)

health = Blueprint("health", __name__)


@health.get("/healthz")
def healthz() -> ResponseReturnValue:
    """200 when the database and Redis answer, 503 (degraded) otherwise."""
    checks = {"database": "ok", "redis": "ok"}
    try:
        with engine().connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        checks["database"] = f"unreachable: {exc.__class__.__name__}"
    try:
        queue.connection().ping()
    except (redis.RedisError, RuntimeError) as exc:
        checks["redis"] = f"unreachable: {exc.__class__.__name__}"

    healthy = all(value == "ok" for value in checks.values())
    return jsonify(status="ok" if healthy else "degraded", **checks), 200 if healthy else 503


@health.get("/metrics")
def metrics() -> Response:
    """Prometheus text format, summed over the web processes when gunicorn runs several."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return Response(generate_latest(), mimetype=CONTENT_TYPE_LATEST)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    # Speed to lead lives in Redis, not in the process files.
    registry.register(SpeedToLeadCollector())
    registry.register(QueueCollector())
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
