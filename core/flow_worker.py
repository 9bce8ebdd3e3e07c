"""The RQ worker classes: connectors warmed once, a sweep of stranded work every 30 s."""

import logging
import time
from typing import Any

from rq.defaults import DEFAULT_MAINTENANCE_TASK_INTERVAL, DEFAULT_WORKER_TTL
from rq.worker import SimpleWorker, Worker

# Imported up front so that jobs, and FlowWorker's forked work-horses, find them loaded.
import flows.dispatch  # noqa: F401
from connectors import registry
from core import logs, queue
from core.config import settings
from core.recovery import requeue_stranded
from core.templates import _files
from flows.contract import poll_envelopes
from flows.sequences import requeue_due_steps

logger = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 30
# The idle worker blocks on Redis for worker_ttl - 15 s between maintenance runs: 45 keeps
# the sweep at about every 30 s even when no job arrives (and after Redis comes back empty).
WORKER_TTL_S = 45
# Warm again a little before the Pipedrive lookup cache (600 s) and the Google token (1 h)
# run out, so that no job waits for a refresh.
REWARM_INTERVAL_S = 300


def warm_up() -> None:
    """Build the connectors and fill their caches before the first job.

    What is built here (HTTP sessions, Pipedrive users, stages and deal fields, the Google
    access token, compiled email templates) is not fetched again per job: the in-process
    worker keeps it, and FlowWorker's forked work-horses inherit it. A vendor that is down
    only costs the warm-up: the jobs then fetch what they need themselves.
    """
    current = settings()
    started = time.perf_counter()
    try:
        pipedrive = registry.pipedrive()
        pipedrive.active_user_ids()
        pipedrive.deal_fields()
        capture = current.lead_capture
        pipedrive.stage_ids(capture.pipeline, capture.stage)
        # A read-only call makes the Gmail client refresh its access token now.
        registry.gmail().find_by_message_id("<warm-up@salesflow.invalid>")
    except Exception as exc:
        logger.warning("warm-up incomplete error=%s", exc.__class__.__name__)
    env = _files()
    for name in env.list_templates(extensions=["j2"]):
        env.get_template(name)
    _close_connections()
    logger.info("connectors warmed ms=%d", (time.perf_counter() - started) * 1000)


def _close_connections() -> None:
    # Kept-alive sockets must not be shared between the parent and its horses: each horse
    # opens its own connection on first use and the parent keeps none.
    registry.pipedrive()._http.close()
    service = registry.gmail()._service
    http = getattr(getattr(service, "_http", None), "http", None)
    for connection in getattr(http, "connections", {}).values():
        connection.close()
    if http is not None:
        http.connections.clear()


def _our_defaults(kwargs: dict[str, Any]) -> None:
    # `rq worker` passes its own defaults explicitly: replace those, keep deliberate flags.
    for key, rq_default, ours in (
        ("maintenance_interval", DEFAULT_MAINTENANCE_TASK_INTERVAL, SWEEP_INTERVAL_S),
        ("worker_ttl", DEFAULT_WORKER_TTL, WORKER_TTL_S),
        ("default_worker_ttl", DEFAULT_WORKER_TTL, WORKER_TTL_S),
    ):
        if kwargs.get(key) in (None, rq_default):
            kwargs[key] = ours


def _poll_envelopes() -> None:
    # Envelopes Connect has been silent about (at most one poll per 15 minutes each).
    try:
        poll_envelopes()
    except Exception as exc:
        logger.error("envelope poll failed error=%s", logs.safe_traceback(exc))


class _Maintenance:
    """What both worker classes add to RQ's maintenance: the sweeps and a fresh warm-up."""

    _warmed_at: float

    def _get_ready(self) -> None:
        logs.configure(settings().log_level)
        warm_up()
        self._warmed_at = time.monotonic()

    def run_maintenance_tasks(self) -> None:
        """RQ's registry clean-up, then the sweep, then a fresh warm-up when due."""
        super().run_maintenance_tasks()  # type: ignore[misc]
        try:
            requeue_stranded()
            requeue_due_steps()
        except Exception as exc:
            # The sweep must never take the worker down; the next interval tries again.
            logger.error("sweep failed error=%s", logs.safe_traceback(exc))
        _poll_envelopes()
        if time.monotonic() - self._warmed_at > REWARM_INTERVAL_S:
            warm_up()
            self._warmed_at = time.monotonic()


class FlowWorker(_Maintenance, Worker):
    """rq's forking Worker, a work-horse per job: for `rq worker --worker-class`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _our_defaults(kwargs)
        super().__init__(*args, **kwargs)
        self._get_ready()


class InProcessFlowWorker(_Maintenance, SimpleWorker):
    """Runs jobs in its own process, no fork per job; core.worker supervises the process.

    A forked work-horse per job costs a fork, fresh database and HTTP connections and a
    cold start of everything the job touches; here those live as long as the process.
    Crash isolation moves one level up: the supervisor starts a new process when this one
    dies and the sweep runs the job it was doing again.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _our_defaults(kwargs)
        super().__init__(*args, **kwargs)
        self._get_ready()


def run(max_jobs: int | None = None) -> None:
    """Run an in-process worker with its scheduler until stopped or `max_jobs` are done."""
    worker = InProcessFlowWorker([queue.queue()], connection=queue.connection())
    worker.work(with_scheduler=True, max_jobs=max_jobs)
