"""Flow runs: named steps recorded in the store, side effects done once by key."""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from connectors.errors import FlowAbort, FlowIgnored, VendorError
from core.logs import safe_traceback
from core.store import Event, FlowRun, SideEffect, Step, as_utc, session, utcnow

logger = logging.getLogger(__name__)

Result = dict[str, Any]
FINAL_STATUSES = {"succeeded", "ignored"}
# How often a write with an unknown outcome is looked up and tried again within one job.
AMBIGUOUS_TRIES = 3
# A pending side effect older than this lost its job; younger, another job may own it.
PENDING_STALE = timedelta(seconds=60)


class RetryLater(Exception):
    """Raised out of the job so the queue's retry schedule runs it again."""


@dataclass(frozen=True)
class RunContext:
    """What a flow's steps need to record themselves.

    Step records and "done" marks are written with the next commit the run makes anyway:
    the claim of the next side effect, or the run's end. A worker that dies in between
    loses only history; every effect it did is still claimed (pending), so the next
    attempt asks the vendor before doing it again.
    """

    event_id: str
    flow: str
    run_id: int
    attempt: int
    _unsaved_steps: list[dict[str, Any]] = field(default_factory=list, compare=False, repr=False)
    _unsaved_done: dict[str, Result] = field(default_factory=dict, compare=False, repr=False)

    def step(self, name: str, action: Callable[[], Result]) -> Result:
        """Run one named step and record its status, timing, output and error."""
        started_at = utcnow()
        logger.info("step started event_id=%s flow=%s step=%s", self.event_id, self.flow, name)
        try:
            output = action()
        except Exception as exc:
            self._note_step(name, started_at, "failed", None, _describe(exc))
            logger.info(
                "step failed event_id=%s flow=%s step=%s error=%s",
                self.event_id,
                self.flow,
                name,
                exc.__class__.__name__,
            )
            raise

        self._note_step(name, started_at, "succeeded", output, None)
        logger.info("step succeeded event_id=%s flow=%s step=%s", self.event_id, self.flow, name)
        return output

    def once(
        self,
        key: str,
        action: Callable[[], Result],
        recover: Callable[[], Result | None] | None = None,
    ) -> Result:
        """Do a side effect once per key; a retry after a crash asks `recover` first."""
        effect = self._claim(key)
        if effect is not None and effect.status == "done":
            return effect.result or {}

        if effect is not None:
            # The last attempt may have reached the vendor and died before recording it.
            found = recover() if recover is not None else None
            if found is not None:
                self._unsaved_done[key] = found
                return found
            if _age(effect.created_at) < PENDING_STALE:
                # Young: another job may be in the middle of it right now.
                raise RetryLater(f"side effect {key} is in progress elsewhere")

        result = _act(key, action, recover)
        self._unsaved_done[key] = result
        if recover is None:
            # Nobody could look this one up after a crash: mark it done at once.
            with session() as db:
                self.save_into(db)
        return result

    def save_into(self, db: Session) -> None:
        """Write the steps and done marks not saved yet, and a heartbeat, in `db`'s transaction."""
        for values in self._unsaved_steps:
            db.add(Step(run_id=self.run_id, attempt=self.attempt, **values))
        for key, result in self._unsaved_done.items():
            # The key was claimed (inserted) before the vendor call, so an UPDATE finds it.
            db.execute(
                update(SideEffect)
                .where(SideEffect.key == key)
                .values(status="done", result=result, updated_at=utcnow())
            )
        # A heartbeat for the sweep; an UPDATE, not a load of the event's whole payload.
        db.execute(update(Event).where(Event.id == self.event_id).values(updated_at=utcnow()))
        # Forgotten only once written: a transaction that fails keeps them for the next one.
        sa_event.listen(db, "after_commit", self._forget_saved, once=True)

    def _forget_saved(self, db: Session) -> None:
        self._unsaved_steps.clear()
        self._unsaved_done.clear()

    def _note_step(
        self,
        name: str,
        started_at: datetime,
        status: str,
        output: Result | None,
        error: str | None,
    ) -> None:
        self._unsaved_steps.append(
            {
                "name": name,
                "status": status,
                "output": output,
                "error": error,
                "started_at": started_at,
                "finished_at": utcnow(),
            }
        )

    def _claim(self, key: str) -> SideEffect | None:
        """Record `key` as pending with what is unsaved; if it exists, return its record."""
        try:
            with session() as db:
                self.save_into(db)
                db.add(SideEffect(key=key, status="pending"))
            return None
        except IntegrityError:
            pass
        with session() as db:
            self.save_into(db)
            effect = db.get(SideEffect, key)
        if effect is None:
            # Seen a moment ago and gone now: let the retry schedule look again.
            raise RetryLater(f"side effect {key} changed under us")
        return effect


def _act(
    key: str, action: Callable[[], Result], recover: Callable[[], Result | None] | None
) -> Result:
    """Do the side effect; when a write's outcome is unknown, look before trying again."""
    attempt = 1
    while True:
        try:
            return action()
        except VendorError as exc:
            if not exc.ambiguous or recover is None or attempt >= AMBIGUOUS_TRIES:
                raise
            found = recover()
            if found is not None:
                logger.info("ambiguous write had been done key=%s", key)
                return found
            logger.info("ambiguous write had not been done key=%s attempt=%d", key, attempt)
            time.sleep(0.2 * attempt)
            attempt += 1


def _age(moment: datetime) -> timedelta:
    return utcnow() - as_utc(moment)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, VendorError):
        parts = [str(exc)]
        if exc.status is not None:
            parts.append(f"status {exc.status}")
        if exc.request_id:
            parts.append(f"request id {exc.request_id}")
        return "; ".join(parts)
    return str(exc) or exc.__class__.__name__


def _start(event_id: str, flow: str) -> tuple[RunContext, Event] | None:
    with session() as db:
        event = db.get(Event, event_id)
        if event is None:
            logger.warning("no such event event_id=%s flow=%s", event_id, flow)
            return None
        if event.status in FINAL_STATUSES:
            logger.info("already done event_id=%s flow=%s status=%s", event_id, flow, event.status)
            return None
        run = db.scalar(select(FlowRun).where(FlowRun.event_id == event_id, FlowRun.flow == flow))
        if run is None:
            run = FlowRun(event_id=event_id, flow=flow, status="running", attempts=0)
            db.add(run)
        run.attempts += 1
        run.status, run.error, run.finished_at = "running", None, None
        event.status, event.reason = "running", None
        db.flush()
        ctx = RunContext(event_id=event_id, flow=flow, run_id=run.id, attempt=run.attempts)
        # Loaded in this session and kept after its commit: the flow reads it, never writes it.
        return ctx, event


def _finish(ctx: RunContext, status: str, reason: str | None) -> None:
    # Plain UPDATEs: loading the rows (the event with its whole payload) would only cost.
    with session() as db:
        ctx.save_into(db)
        finished = utcnow()
        db.execute(
            update(FlowRun)
            .where(FlowRun.id == ctx.run_id)
            .values(status=status, error=reason, finished_at=finished)
        )
        db.execute(
            update(Event)
            .where(Event.id == ctx.event_id)
            .values(status=status, reason=reason, updated_at=finished)
        )
    logger.info(
        "run %s event_id=%s flow=%s attempt=%d", status, ctx.event_id, ctx.flow, ctx.attempt
    )


def execute(
    event_id: str,
    flow: str,
    body: Callable[[RunContext, Event], None],
    *,
    retries_left: int = 0,
) -> str:
    """Run a flow for an event and record the outcome; returns the run's final status."""
    started = _start(event_id, flow)
    if started is None:
        return "skipped"
    ctx, event = started

    try:
        body(ctx, event)
    except FlowIgnored as exc:
        # Looked at and found to need nothing (our own change, no trigger): not a failure.
        _finish(ctx, "ignored", str(exc))
        return "ignored"
    except FlowAbort as exc:
        _finish(ctx, "failed", str(exc))
        return "failed"
    except (VendorError, OperationalError, RetryLater) as exc:
        transient = not isinstance(exc, VendorError) or exc.transient
        if transient and retries_left > 0:
            _finish(ctx, "queued", f"will retry: {_describe(exc)}")
            raise RetryLater(_describe(exc)) from exc
        # Dead letter: the run stays failed with the vendor's reason until someone replays it.
        _finish(ctx, "failed", _describe(exc))
        return "failed"
    except Exception as exc:
        logger.error(
            "run crashed event_id=%s flow=%s error=%s", event_id, flow, safe_traceback(exc)
        )
        _finish(ctx, "failed", f"internal error: {exc.__class__.__name__}")
        return "failed"

    _finish(ctx, "succeeded", None)
    return "succeeded"
