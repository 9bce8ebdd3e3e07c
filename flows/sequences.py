"""Nurture sequences: timed emails in one Gmail thread and tasks, stopped by what the lead does.

State lives in the database (sequence_enrollments, sequence_step_runs); RQ only carries the
wake-up calls. A step runs after its row is claimed by an atomic UPDATE, so several workers
or schedulers firing the same step do it once; the email or task itself goes through
RunContext.once with a key per enrollment and step. Each step's run is recorded as a flow
run of the event that started the sequence, so GET /api/events/<that id> shows every step.
"""

import email.utils
import hashlib
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import phonenumbers
import redis
from google.auth.exceptions import RefreshError
from itsdangerous import BadSignature, URLSafeSerializer
from phonenumbers import timezone as phone_zones
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job
from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError, OperationalError

from connectors import registry
from connectors.errors import FlowAbort, PermanentVendorError, VendorError
from connectors.gmail import build_message
from core import queue, schedule
from core.config import Rep, Sequence, SequenceStep, Settings, settings
from core.leads import email_key
from core.logs import safe_traceback
from core.runs import Result, RetryLater, RunContext
from core.store import (
    Enrollment,
    FlowRun,
    OptOut,
    SequenceStepRun,
    as_utc,
    session,
    utcnow,
)
from core.templates import render_file, render_string

logger = logging.getLogger(__name__)

JOB_FUNCTION = "flows.sequences.run_step"
# A claim older than this lost its worker (RQ kills a job after JOB_TIMEOUT_S).
LEASE = timedelta(seconds=2 * queue.JOB_TIMEOUT_S)
# Hosts' clocks drift a little; RQ's scheduler may start a job a moment before its time.
EARLY_TOLERANCE = timedelta(seconds=5)
# Transient vendor trouble that outlasted the connectors' own retries: try the step later.
RETRY_DELAYS = [timedelta(minutes=m) for m in (1, 5, 15, 60, 240)]
# invalid_grant: try again this often, until someone re-authorises.
PARK_RETRY = timedelta(minutes=10)
SWEEP_LOCK = "salesflow:sequence-sweep"
SWEEP_LIMIT = 500
UNSUBSCRIBE_SALT = "salesflow.sequence-unsubscribe"
FAILED_TTL_S = 7 * 24 * 3600
LIVE_STATUSES = ("scheduled", "parked")
BOUNCE_SENDERS = ("mailer-daemon@", "postmaster@")

# Tests replace this with a fake clock; every scheduling decision reads it.
clock: Callable[[], datetime] = utcnow


# -- enrolment ----------------------------------------------------------------------------


def start(ctx: RunContext, deal_id: int, sequence: str) -> Result:
    """Enroll the deal's person in a sequence (once per deal and sequence); schedule step 1."""
    current = settings()
    definition = current.sequences.get(sequence)
    if definition is None:
        raise FlowAbort(f"config.yaml defines no sequence {sequence!r}")
    existing = _enrollment_of(deal_id, sequence)
    if existing is not None:
        return _summary(existing, "already_enrolled")

    pipedrive = registry.pipedrive()
    deal = pipedrive.get_deal(deal_id)
    person = pipedrive.get_person(deal["person_id"]) if deal.get("person_id") else {}
    address = _primary(person, "emails")
    if address is None and any(step.action == "email" for step in definition.steps):
        return {"enrollment_id": None, "status": "skipped", "reason": "no email address"}
    owner = _owner(deal["owner_id"], current)
    zone = _zone(definition, _primary(person, "phones"), owner, current.default_region)
    window = schedule.Window.from_config(definition.window, zone)
    due = schedule.due_at(clock(), definition.steps[0].delay, window)

    enrollment = Enrollment(
        sequence=sequence,
        deal_id=deal_id,
        event_id=ctx.event_id,
        person_id=person.get("id"),
        owner_id=owner.pipedrive_user_id,
        email=address,
        email_hash=_email_hash(address) if address else None,
        name=person.get("name"),
        timezone=zone,
        pipeline_id=deal.get("pipeline_id"),
        stage_id=deal.get("stage_id"),
        stage_order=_stage_order(deal.get("stage_id")),
        status="active",
        next_step=0,
        message_ids=[],
        sent_ids=[],
    )
    try:
        with session() as db:
            db.add(enrollment)
            db.flush()
            db.add(_step_row(enrollment.id, 0, due))
    except IntegrityError:
        # Another job enrolled this deal a moment ago.
        raced = _enrollment_of(deal_id, sequence)
        if raced is None:
            raise
        return _summary(raced, "already_enrolled")

    _schedule(enrollment.id, 0, due)
    logger.info(
        "sequence started event_id=%s enrollment_id=%s deal_id=%s sequence=%s",
        ctx.event_id,
        enrollment.id,
        deal_id,
        sequence,
    )
    return {**_summary(enrollment, "enrolled"), "first_step_due_at": due.isoformat()}


def stop(ctx: RunContext, deal_id: int, reason: str) -> Result:
    """Stop the deal's active enrollments with the reason; their pending steps are cancelled."""
    with session() as db:
        ids = list(
            db.scalars(
                select(Enrollment.id).where(
                    Enrollment.deal_id == deal_id, Enrollment.status == "active"
                )
            )
        )
    for enrollment_id in ids:
        _stop_enrollment(enrollment_id, reason)
        logger.info(
            "sequence stopped event_id=%s enrollment_id=%s deal_id=%s",
            ctx.event_id,
            enrollment_id,
            deal_id,
        )
    return {"stopped": ids, "reason": reason}


def _enrollment_of(deal_id: int, sequence: str) -> Enrollment | None:
    with session() as db:
        return db.scalar(
            select(Enrollment).where(
                Enrollment.deal_id == deal_id, Enrollment.sequence == sequence
            )
        )


def _summary(enrollment: Enrollment, status: str) -> Result:
    return {
        "enrollment_id": enrollment.id,
        "status": status,
        "sequence": enrollment.sequence,
        "enrollment_status": enrollment.status,
        "timezone": enrollment.timezone,
    }


def _primary(person: dict[str, Any], key: str) -> str | None:
    values = [v for v in person.get(key) or [] if isinstance(v, dict) and v.get("value")]
    chosen = next((v for v in values if v.get("primary")), values[0] if values else None)
    return str(chosen["value"]).strip() if chosen else None


def _email_hash(address: str) -> str:
    return hashlib.sha256(email_key(address).encode("utf-8")).hexdigest()


def _owner(owner_id: int, current: Settings) -> Rep:
    for rep in current.reps:
        if rep.pipedrive_user_id == owner_id:
            return rep
    # An owner outside the rotation still sends from their own name.
    user = registry.pipedrive().user(owner_id)
    zone = user.get("timezone_name") or "UTC"
    try:
        return Rep(
            name=user["name"], email=user["email"], pipedrive_user_id=owner_id, timezone=zone
        )
    except ValueError:
        return Rep(name=user["name"], email=user["email"], pipedrive_user_id=owner_id)


def lead_zone(phone: str | None, region: str) -> str | None:
    """The IANA zone of a phone number when the number pins exactly one, else None."""
    if not phone:
        return None
    try:
        number = phonenumbers.parse(phone, region)
    except phonenumbers.NumberParseException:
        return None
    zones = [z for z in phone_zones.time_zones_for_number(number) if z != "Etc/Unknown"]
    return zones[0] if len(zones) == 1 else None


def _zone(definition: Sequence, phone: str | None, owner: Rep, region: str) -> str:
    wanted = definition.window.timezone
    if wanted == "lead":
        # Pipedrive keeps no time zone for a person; the phone number is the best clue.
        return lead_zone(phone, region) or owner.timezone
    if wanted == "rep":
        return owner.timezone
    return wanted


def _stage_order(stage_id: int | None) -> int | None:
    if stage_id is None:
        return None
    return registry.pipedrive().get_stage(stage_id).get("order_nr")


# -- scheduling ---------------------------------------------------------------------------


def _step_row(enrollment_id: int, index: int, due: datetime) -> SequenceStepRun:
    return SequenceStepRun(
        enrollment_id=enrollment_id, step_index=index, status="scheduled", due_at=due, attempts=0
    )


def job_id(enrollment_id: int, index: int, due: datetime) -> str:
    """The RQ job id of one step at one due time: a re-schedule gets a new id."""
    return f"sequence-{enrollment_id}-{index}-{int(as_utc(due).timestamp())}"


def _job_options() -> dict[str, Any]:
    return {"unique": True, "result_ttl": 0, "failure_ttl": FAILED_TTL_S}


def _schedule(enrollment_id: int, index: int, due: datetime) -> None:
    """Ask RQ to run the step at its due time; when Redis is away, the sweep finds it."""
    try:
        queue.queue().enqueue_at(
            as_utc(due),
            JOB_FUNCTION,
            enrollment_id,
            index,
            job_id=job_id(enrollment_id, index, due),
            **_job_options(),
        )
    except DuplicateJobError:
        pass
    except redis.RedisError as exc:
        logger.warning(
            "step not scheduled enrollment_id=%s step=%d error=%s; the sweep will queue it",
            enrollment_id,
            index + 1,
            exc.__class__.__name__,
        )


def _job_pending(identifier: str) -> bool:
    try:
        job = Job.fetch(identifier, connection=queue.connection())
    except NoSuchJobError:
        return False
    status = job.get_status(refresh=False)
    if status in queue.PENDING_STATUSES:
        return True
    job.delete()
    return False


def requeue_due_steps(limit: int = SWEEP_LIMIT) -> int:
    """Queue the steps that are due, parked or lost their worker and have no job waiting."""
    try:
        lock = queue.connection().lock(SWEEP_LOCK, timeout=120, blocking=False)
        if not lock.acquire():
            return 0
    except redis.RedisError as exc:
        logger.warning("sequence sweep skipped: redis unavailable error=%s", type(exc).__name__)
        return 0

    now = clock()
    queued = 0
    try:
        for run in _due_runs(now, limit):
            identifier = job_id(run.enrollment_id, run.step_index, run.due_at)
            if run.status == "running":
                # The claimant died; its job may still look STARTED in RQ.
                identifier += f"-retake{run.attempts}"
            if _job_pending(identifier):
                continue
            try:
                queue.queue().enqueue(
                    JOB_FUNCTION,
                    run.enrollment_id,
                    run.step_index,
                    job_id=identifier,
                    **_job_options(),
                )
            except DuplicateJobError:
                continue
            queued += 1
            logger.info(
                "requeued sequence step enrollment_id=%s step=%d status=%s",
                run.enrollment_id,
                run.step_index + 1,
                run.status,
            )
    except redis.RedisError as exc:
        logger.warning("sequence sweep stopped: redis unavailable error=%s", type(exc).__name__)
    finally:
        try:
            lock.release()
        except redis.RedisError:
            pass
    return queued


def _due_runs(now: datetime, limit: int) -> list[SequenceStepRun]:
    with session() as db:
        return list(
            db.scalars(
                select(SequenceStepRun)
                .where(
                    or_(
                        SequenceStepRun.status.in_(LIVE_STATUSES)
                        & (SequenceStepRun.due_at <= now),
                        (SequenceStepRun.status == "running")
                        & (SequenceStepRun.claimed_at < now - LEASE),
                    )
                )
                .order_by(SequenceStepRun.due_at)
                .limit(limit)
            )
        )


# -- one step -----------------------------------------------------------------------------


def run_step(enrollment_id: int, step_index: int) -> str:
    """The RQ job of one step: claim it, check the stop conditions live, then do it once."""
    now = clock()
    if not _claim(enrollment_id, step_index, now):
        logger.info(
            "step not claimed enrollment_id=%s step=%d: done, not due or taken",
            enrollment_id,
            step_index + 1,
        )
        return "skipped"

    with session() as db:
        enrollment = db.get(Enrollment, enrollment_id)
    if enrollment.status != "active":
        _close_run(enrollment_id, step_index, "cancelled", f"the sequence is {enrollment.status}")
        return "cancelled"
    definition = settings().sequences.get(enrollment.sequence)
    if definition is None or step_index >= len(definition.steps):
        reason = f"config.yaml no longer has step {step_index + 1} of {enrollment.sequence!r}"
        _stop_enrollment(enrollment_id, reason, closing="stopped")
        return "stopped"

    window = schedule.Window.from_config(definition.window, enrollment.timezone)
    opens = schedule.next_open(now, window)
    if opens > now:
        # Late (the app was down, Redis lost the job) or early: wait for the window.
        _release(enrollment_id, step_index, "scheduled", opens, None, count_attempt=False)
        _schedule(enrollment_id, step_index, opens)
        logger.info(
            "step deferred to the sending window enrollment_id=%s step=%d",
            enrollment_id,
            step_index + 1,
        )
        return "deferred"

    ctx = _context(enrollment, step_index)
    step = definition.steps[step_index]
    try:
        return _perform(ctx, enrollment, step_index, step, definition, window, now)
    except Exception as exc:
        return _failed(ctx, enrollment, step_index, exc, now)


def _perform(
    ctx: RunContext,
    enrollment: Enrollment,
    index: int,
    step: SequenceStep,
    definition: Sequence,
    window: schedule.Window,
    now: datetime,
) -> str:
    seen: dict[str, Any] = {}
    verdict = ctx.step("check_stop_conditions", lambda: _check(enrollment, seen))
    if verdict["stop"]:
        reason = verdict["reason"]
        _stop_enrollment(enrollment.id, reason, closing="stopped")
        _finish_flow(ctx, "ignored", f"sequence stopped: {reason}")
        return "stopped"

    thread: Result = {}
    if step.action == "email":
        sent = ctx.step("send_email", lambda: _send_email(ctx, enrollment, step, index, seen))
        thread = {**sent, "subject": seen["subject"]}
    else:
        ctx.step("create_task", lambda: _create_task(ctx, enrollment, step, index, window, seen))
    _advance(enrollment.id, index, thread, definition, window, now)
    _finish_flow(ctx, "succeeded", None)
    logger.info(
        "step done event_id=%s enrollment_id=%s step=%d action=%s",
        ctx.event_id,
        enrollment.id,
        index + 1,
        step.action,
    )
    return "done"


def _claim(enrollment_id: int, index: int, now: datetime) -> bool:
    """Take the step for this job; one UPDATE, so two claimants cannot both win."""
    run = SequenceStepRun
    with session() as db:
        result = db.execute(
            update(run)
            .where(
                run.enrollment_id == enrollment_id,
                run.step_index == index,
                or_(
                    and_(run.status.in_(LIVE_STATUSES), run.due_at <= now + EARLY_TOLERANCE),
                    and_(run.status == "running", run.claimed_at < now - LEASE),
                ),
            )
            .values(status="running", claimed_at=now, attempts=run.attempts + 1)
        )
        return result.rowcount == 1


def _release(
    enrollment_id: int,
    index: int,
    status: str,
    due: datetime | None,
    error: str | None,
    *,
    count_attempt: bool = True,
) -> None:
    with session() as db:
        run = _run_row(db, enrollment_id, index)
        run.status, run.error = status, error
        if due is not None:
            run.due_at = due
        if not count_attempt:
            run.attempts -= 1
        if status not in LIVE_STATUSES:
            run.finished_at = clock()


def _close_run(enrollment_id: int, index: int, status: str, error: str | None) -> None:
    _release(enrollment_id, index, status, None, error)


def _run_row(db: Any, enrollment_id: int, index: int) -> SequenceStepRun:
    return db.scalar(
        select(SequenceStepRun).where(
            SequenceStepRun.enrollment_id == enrollment_id, SequenceStepRun.step_index == index
        )
    )


def _context(enrollment: Enrollment, index: int) -> RunContext:
    """A flow run under the event that started the sequence, one per step."""
    flow = f"sequence:{enrollment.sequence}:{enrollment.id}:step{index + 1}"[:64]
    with session() as db:
        run = db.scalar(
            select(FlowRun).where(FlowRun.event_id == enrollment.event_id, FlowRun.flow == flow)
        )
        if run is None:
            run = FlowRun(event_id=enrollment.event_id, flow=flow, status="running", attempts=0)
            db.add(run)
        run.attempts += 1
        run.status, run.error, run.finished_at = "running", None, None
        db.flush()
        return RunContext(
            event_id=enrollment.event_id, flow=flow, run_id=run.id, attempt=run.attempts
        )


def _finish_flow(ctx: RunContext, status: str, error: str | None) -> None:
    # The starting event keeps its own status: only this step's run changes.
    with session() as db:
        run = db.get(FlowRun, ctx.run_id)
        run.status, run.error, run.finished_at = status, error, utcnow()
        ctx.save_into(db)


def _advance(
    enrollment_id: int,
    index: int,
    thread: Result,
    definition: Sequence,
    window: schedule.Window,
    now: datetime,
) -> None:
    """Mark the step done and put the next one on the schedule, in one transaction."""
    following = index + 1
    due = None
    with session() as db:
        run = _run_row(db, enrollment_id, index)
        run.status, run.error, run.finished_at = "done", None, now
        run.output = {k: v for k, v in thread.items() if k != "subject"} or None
        enrollment = db.get(Enrollment, enrollment_id)
        if thread:
            if enrollment.thread_id is None:
                enrollment.thread_id, enrollment.subject = thread["thread_id"], thread["subject"]
            enrollment.message_ids = [*enrollment.message_ids, thread["message_id"]]
            enrollment.sent_ids = [*enrollment.sent_ids, thread["gmail_id"]]
        enrollment.next_step = following
        if following >= len(definition.steps):
            enrollment.status, enrollment.finished_at = "completed", now
        elif enrollment.status == "active":
            due = schedule.due_at(now, definition.steps[following].delay, window)
            db.add(_step_row(enrollment_id, following, due))
    if due is not None:
        _schedule(enrollment_id, following, due)


def _stop_enrollment(enrollment_id: int, reason: str, closing: str = "cancelled") -> None:
    """Stop an enrollment; its running step closes as `closing`, pending ones are cancelled."""
    now = clock()
    with session() as db:
        enrollment = db.get(Enrollment, enrollment_id)
        if enrollment.status == "active":
            enrollment.status, enrollment.stop_reason = "stopped", reason
            enrollment.finished_at = now
        db.execute(
            update(SequenceStepRun)
            .where(
                SequenceStepRun.enrollment_id == enrollment_id,
                SequenceStepRun.status.in_((*LIVE_STATUSES, "running")),
            )
            .values(status=closing, error=reason, finished_at=now)
        )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, VendorError) and exc.status is not None:
        return f"{exc}; status {exc.status}"
    return str(exc) or exc.__class__.__name__


def _google_refused(exc: BaseException) -> bool:
    """True for invalid_grant: the refresh token is dead until someone re-authorises."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, RefreshError) and not getattr(cause, "retryable", False):
            return True
        cause = cause.__cause__
    return False


def _failed(
    ctx: RunContext, enrollment: Enrollment, index: int, exc: Exception, now: datetime
) -> str:
    """Park, retry later or fail the step; a parked or retried step stays due, never lost."""
    reason = _describe(exc)
    with session() as db:
        attempts = _run_row(db, enrollment.id, index).attempts

    if _google_refused(exc):
        message = (
            "Google refused the refresh token (invalid_grant): sequence emails are parked; "
            "run `flask --app app google-auth`, set GOOGLE_REFRESH_TOKEN and restart"
        )
        logger.error(
            "google authorisation refused; step parked enrollment_id=%s step=%d",
            enrollment.id,
            index + 1,
        )
        _release(enrollment.id, index, "parked", now + PARK_RETRY, message, count_attempt=False)
        _finish_flow(ctx, "queued", f"parked: {message}")
        return "parked"

    transient = isinstance(exc, (RetryLater, OperationalError)) or (
        isinstance(exc, VendorError) and exc.transient
    )
    if transient and attempts <= len(RETRY_DELAYS):
        due = now + RETRY_DELAYS[attempts - 1]
        _release(enrollment.id, index, "scheduled", due, reason)
        _schedule(enrollment.id, index, due)
        _finish_flow(ctx, "queued", f"will retry at {due.isoformat()}: {reason}")
        logger.warning(
            "step will retry enrollment_id=%s step=%d attempt=%d error=%s",
            enrollment.id,
            index + 1,
            attempts,
            exc.__class__.__name__,
        )
        return "retrying"

    if not isinstance(exc, (VendorError, FlowAbort, RetryLater, OperationalError)):
        logger.error(
            "step crashed enrollment_id=%s step=%d error=%s",
            enrollment.id,
            index + 1,
            safe_traceback(exc),
        )
        reason = f"internal error: {exc.__class__.__name__}"
    _stop_enrollment(enrollment.id, f"step {index + 1} failed: {reason}", closing="failed")
    with session() as db:
        db.get(Enrollment, enrollment.id).status = "failed"
    _finish_flow(ctx, "failed", reason)
    return "failed"


# -- stop conditions ----------------------------------------------------------------------


def _check(enrollment: Enrollment, seen: dict[str, Any]) -> Result:
    """Ask the store, Pipedrive and Gmail whether the sequence should stop now."""
    verdict = (
        _opted_out(enrollment) or _deal_verdict(enrollment, seen) or _thread_verdict(enrollment)
    )
    if verdict is None:
        return {"stop": None, "reason": None}
    code, reason = verdict
    return {"stop": code, "reason": reason}


Verdict = tuple[str, str] | None


def _opted_out(enrollment: Enrollment) -> Verdict:
    if enrollment.email_hash is None:
        return None
    with session() as db:
        if db.get(OptOut, enrollment.email_hash) is not None:
            return "unsubscribed", "the lead unsubscribed"
    return None


def _deal_verdict(enrollment: Enrollment, seen: dict[str, Any]) -> Verdict:
    pipedrive = registry.pipedrive()
    try:
        deal = pipedrive.get_deal(enrollment.deal_id)
    except PermanentVendorError as exc:
        if exc.status in (404, 410):
            return "deal_deleted", "the deal was deleted"
        raise
    seen["deal"] = deal
    if deal.get("is_deleted"):
        return "deal_deleted", "the deal was deleted"
    if deal.get("status") in ("won", "lost"):
        return f"deal_{deal['status']}", f"the deal was {deal['status']}"
    if deal.get("pipeline_id") != enrollment.pipeline_id:
        return "deal_moved", "the deal moved to another pipeline"
    if deal.get("stage_id") != enrollment.stage_id:
        order = _stage_order(deal.get("stage_id"))
        if order is not None and enrollment.stage_order is not None:
            if order > enrollment.stage_order:
                return "deal_moved", "the deal moved to a later stage"
    return None


def _fetch_thread(thread_id: str) -> dict[str, Any]:
    # The headers that tell a reply (From) from a bounce (the other two).
    return registry.gmail().get_thread(
        thread_id, headers=("From", "X-Failed-Recipients", "Content-Type")
    )


def _headers(message: dict[str, Any]) -> dict[str, str]:
    items = (message.get("payload") or {}).get("headers") or []
    return {str(h.get("name", "")).lower(): str(h.get("value", "")) for h in items}


def _thread_verdict(enrollment: Enrollment) -> Verdict:
    """A reply from the lead's address, or a bounce, after the sequence's first email."""
    if not enrollment.thread_id or not enrollment.email:
        return None
    messages = _fetch_thread(enrollment.thread_id).get("messages") or []
    ours = set(enrollment.sent_ids)
    first = next((i for i, m in enumerate(messages) if m.get("id") in ours), None)
    if first is None:
        return None
    # After the first send, not only the last: a reply that raced our last email still counts.
    for message in messages[first + 1 :]:
        if message.get("id") in ours:
            continue
        headers = _headers(message)
        sender = email.utils.parseaddr(headers.get("from", ""))[1].lower()
        content_type = headers.get("content-type", "").lower()
        if (
            "x-failed-recipients" in headers
            or sender.startswith(BOUNCE_SENDERS)
            or ("multipart/report" in content_type and "delivery-status" in content_type)
        ):
            return "bounced", "the email bounced"
        if sender and email_key(sender) == email_key(enrollment.email):
            return "replied", "the lead replied"
    return None


# -- actions ------------------------------------------------------------------------------


def unsubscribe_token(enrollment: Enrollment) -> str:
    """The signed token of the enrollment's unsubscribe link."""
    return _serializer().dumps(enrollment.token)


def _serializer() -> URLSafeSerializer:
    current = settings().unsubscribe
    if current is None:
        raise FlowAbort("config.yaml has no `unsubscribe` section; sequence emails need it")
    return URLSafeSerializer(current.secret, salt=UNSUBSCRIBE_SALT)


def unsubscribe_url(enrollment: Enrollment) -> str:
    """https://<base_url>/unsubscribe/<token>."""
    base = settings().unsubscribe.base_url.rstrip("/")  # type: ignore[union-attr]
    return f"{base}/unsubscribe/{unsubscribe_token(enrollment)}"


def _template_context(
    enrollment: Enrollment, owner: Rep, index: int, seen: dict[str, Any]
) -> dict[str, Any]:
    name = enrollment.name or ""
    deal = seen.get("deal") or {}
    return {
        "lead": {"name": name, "first_name": name.partition(" ")[0], "email": enrollment.email},
        "rep": owner,
        "deal": {"id": enrollment.deal_id, "title": deal.get("title", "")},
        "company_name": settings().company_name,
        "step_number": index + 1,
    }


def _reply_subject(subject: str) -> str:
    return subject if subject.lower().startswith("re:") else f"Re: {subject}"


def _send_email(
    ctx: RunContext, enrollment: Enrollment, step: SequenceStep, index: int, seen: dict[str, Any]
) -> Result:
    """One email in the sequence's thread, with threading and one-click unsubscribe headers."""
    current = settings()
    gmail = registry.gmail()
    owner = _owner(enrollment.owner_id, current)
    context = _template_context(enrollment, owner, index, seen)
    url = unsubscribe_url(enrollment)
    context["unsubscribe_url"] = url
    domain = owner.email.partition("@")[2] or "salesflow.invalid"
    # Derived from the enrollment: a retry after a lost answer finds the message it sent.
    message_id = f"<seq.{enrollment.token}.{index + 1}@{domain}>"
    first = enrollment.thread_id is None
    subject = (
        render_string(step.subject or "", context)
        if first
        else _reply_subject(enrollment.subject or "")
    )
    seen["subject"] = subject

    def send() -> Result:
        message = build_message(
            sender_name=owner.name,
            sender_email=owner.email,
            to_name=enrollment.name,
            to_email=enrollment.email or "",
            reply_to=owner.email,
            subject=subject,
            text=render_file(f"email/sequence_{step.template}.txt.j2", context),
            html=render_file(f"email/sequence_{step.template}.html.j2", context),
            message_id=message_id,
        )
        if not first:
            message["In-Reply-To"] = enrollment.message_ids[-1]
            message["References"] = " ".join(enrollment.message_ids)
        message["List-Unsubscribe"] = f"<{url}>"
        # RFC 8058: the mail client may POST to the link itself, with this body.
        message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        sent = gmail.send(message, thread_id=enrollment.thread_id)
        return {
            "gmail_id": sent["id"],
            "thread_id": sent.get("threadId"),
            "message_id": message_id,
        }

    def recover() -> Result | None:
        found = gmail.find_by_message_id(message_id)
        if found is None:
            return None
        return {
            "gmail_id": found["id"],
            "thread_id": found.get("threadId"),
            "message_id": message_id,
        }

    return ctx.once(f"sequence:{enrollment.id}:{index}:email", send, recover)


def _create_task(
    ctx: RunContext,
    enrollment: Enrollment,
    step: SequenceStep,
    index: int,
    window: schedule.Window,
    seen: dict[str, Any],
) -> Result:
    """A Pipedrive activity on the deal for its owner, due in N working days."""
    pipedrive = registry.pipedrive()
    owner = _owner(enrollment.owner_id, settings())
    context = _template_context(enrollment, owner, index, seen)
    due = schedule.add_business_days(clock(), step.due_in_business_days, window)
    marker = f"salesflow sequence {enrollment.token} step {index + 1}"
    fields: dict[str, Any] = {
        "subject": render_string(step.subject or "", context),
        "type": step.task_type,
        "owner_id": enrollment.owner_id,
        "deal_id": enrollment.deal_id,
        "due_date": due.astimezone(window.zone).date().isoformat(),
        "note": f"Step {index + 1} of the {enrollment.sequence} sequence. ({marker})",
    }
    if enrollment.person_id:
        fields["person_id"] = enrollment.person_id

    def recover() -> Result | None:
        found = pipedrive.find_activity(enrollment.deal_id, marker)
        return {"activity_id": found["id"]} if found else None

    return ctx.once(
        f"sequence:{enrollment.id}:{index}:task",
        lambda: {"activity_id": pipedrive.create_activity(fields)["id"]},
        recover,
    )


# -- unsubscribe --------------------------------------------------------------------------


def enrollment_for_token(token: str) -> Enrollment | None:
    """The enrollment a signed unsubscribe token names; None for a bad or unknown token."""
    try:
        enrollment_token = _serializer().loads(token)
    except BadSignature:
        return None
    if not isinstance(enrollment_token, str):
        return None
    with session() as db:
        return db.scalar(select(Enrollment).where(Enrollment.token == enrollment_token))


def opt_out(enrollment: Enrollment, source: str) -> list[int]:
    """Record the address as opted out and stop every active sequence writing to it."""
    if enrollment.email_hash is None:
        return []
    try:
        with session() as db:
            if db.get(OptOut, enrollment.email_hash) is None:
                db.add(OptOut(email_hash=enrollment.email_hash, source=source))
    except IntegrityError:
        pass  # a second click at the same moment; the first recorded it
    with session() as db:
        ids = list(
            db.scalars(
                select(Enrollment.id).where(
                    Enrollment.email_hash == enrollment.email_hash, Enrollment.status == "active"
                )
            )
        )
    for enrollment_id in ids:
        _stop_enrollment(enrollment_id, "the lead unsubscribed")
    logger.info("opted out enrollment_id=%s stopped=%s source=%s", enrollment.id, ids, source)
    return ids
