"""Per-IP rate limits for browser-posted forms, counted in Redis across web processes."""

from flask import request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

from core import queue


def storage_uri() -> str:
    """The limiter's storage: the queue's Redis (limits spells unix sockets redis+unix)."""
    url = queue.redis_url()
    return "redis+unix://" + url.removeprefix("unix://") if url.startswith("unix://") else url


def form_key() -> str:
    """Counts per form and client address."""
    return f"{request.view_args.get('form_key', '')}:{get_remote_address()}"


# swallow_errors: a Redis outage must not turn leads away; the limit resumes with Redis.
limiter = Limiter(key_func=get_remote_address, swallow_errors=True, headers_enabled=True)
