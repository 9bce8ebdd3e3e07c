"""The RQ worker class: a forking worker that also requeues stranded events."""

import logging
from typing import Any

from rq.worker import Worker

# Imported here so that each forked work-horse inherits the flow modules instead of
# importing them again for every job.
import flows.dispatch  # noqa: E402,F401
from core import logs
from core.config import settings
from core.recovery import requeue_stranded

logger = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 30


class FlowWorker(Worker):
    """rq's forking Worker plus a sweep for stored-but-unqueued work every 30 s."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("maintenance_interval", SWEEP_INTERVAL_S)
        super().__init__(*args, **kwargs)
        logs.configure(settings().log_level)

    def run_maintenance_tasks(self) -> None:
        """RQ's registry clean-up, then the sweep."""
        super().run_maintenance_tasks()
        try:
            requeue_stranded()
        except Exception:
            # The sweep must never take the worker down; the next interval tries again.
            logger.exception("sweep failed")
