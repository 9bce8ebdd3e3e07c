"""Logging set-up: one line per state change, key=value, no personal data."""

import logging
import sys
import traceback


def configure(level: str = "INFO") -> None:
    """Send every logger to stderr in one format (12-factor: the platform keeps the logs)."""
    root = logging.getLogger()
    if any(getattr(handler, "_salesflow", False) for handler in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    )
    handler._salesflow = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # Library chatter would log full URLs, and URLs carry query-string tokens (Pipedrive v1).
    for noisy in ("urllib3", "googleapiclient.discovery", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def safe_traceback(exc: BaseException) -> str:
    """The exception's class and frames without its message, which can quote personal data."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = " <- ".join(
        f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames[-6:])
    )
    return f"{exc.__class__.__name__} at {where}" if where else exc.__class__.__name__
