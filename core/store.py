"""The event store: events, flow runs, steps, side-effect keys and counters (SQLAlchemy)."""

import functools
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

INSTANCE_DIR = Path(__file__).resolve().parent.parent / "instance"


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """An aware UTC datetime; SQLite hands back naive ones that were written as UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def new_id() -> str:
    """A new random id for events and runs."""
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON}


class Event(Base):
    """One accepted webhook delivery, deduplicated by the sender's own identity."""

    __tablename__ = "events"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    source: Mapped[str] = mapped_column(String(32))
    type: Mapped[str] = mapped_column(String(64))
    dedup_key: Mapped[str] = mapped_column(String(255), unique=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    payload: Mapped[str] = mapped_column(Text)
    deliveries: Mapped[int] = mapped_column(Integer, default=1)
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    runs: Mapped[list["FlowRun"]] = relationship(back_populates="event", order_by="FlowRun.id")


class FlowRun(Base):
    """One flow run for an event; attempts counts the jobs that worked on it."""

    __tablename__ = "flow_runs"
    __table_args__ = (UniqueConstraint("event_id", "flow"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("events.id"), index=True)
    flow: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]

    event: Mapped[Event] = relationship(back_populates="runs")
    steps: Mapped[list["Step"]] = relationship(back_populates="run", order_by="Step.id")


class Step(Base):
    """One named step of one attempt of a flow run."""

    __tablename__ = "steps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("flow_runs.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    output: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]

    run: Mapped[FlowRun] = relationship(back_populates="steps")


class SideEffect(Base):
    """An idempotency key recorded before a vendor call and completed with its result."""

    __tablename__ = "side_effects"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Counter(Base):
    """A named integer advanced atomically (round-robin positions)."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[int] = mapped_column(Integer, default=0)


class Enrollment(Base):
    """One deal's person in one sequence: where it stands and the thread it writes in."""

    __tablename__ = "sequence_enrollments"
    __table_args__ = (UniqueConstraint("deal_id", "sequence"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # Random: it makes Message-IDs unique across deployments and databases.
    token: Mapped[str] = mapped_column(String(32), unique=True, default=new_id)
    sequence: Mapped[str] = mapped_column(String(40))
    deal_id: Mapped[int] = mapped_column(Integer, index=True)
    # The event that started it; each step's run is recorded under it.
    event_id: Mapped[str] = mapped_column(ForeignKey("events.id"), index=True)
    person_id: Mapped[int | None] = mapped_column(Integer)
    owner_id: Mapped[int] = mapped_column(Integer)
    email: Mapped[str | None] = mapped_column(String(320))
    email_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    name: Mapped[str | None] = mapped_column(String(255))
    timezone: Mapped[str] = mapped_column(String(64))
    pipeline_id: Mapped[int | None] = mapped_column(Integer)
    stage_id: Mapped[int | None] = mapped_column(Integer)
    stage_order: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), index=True)
    stop_reason: Mapped[str | None] = mapped_column(Text)
    next_step: Mapped[int] = mapped_column(Integer, default=0)
    thread_id: Mapped[str | None] = mapped_column(String(64))
    subject: Mapped[str | None] = mapped_column(Text)
    # RFC 5322 Message-IDs of our emails, oldest first (the References chain).
    message_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    # Gmail ids of our emails, to tell the lead's messages in the thread from ours.
    sent_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None]


class SequenceStepRun(Base):
    """One step of one enrollment: when it is due, who claimed it, how it ended."""

    __tablename__ = "sequence_step_runs"
    __table_args__ = (UniqueConstraint("enrollment_id", "step_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    enrollment_id: Mapped[int] = mapped_column(ForeignKey("sequence_enrollments.id"), index=True)
    step_index: Mapped[int] = mapped_column(Integer)
    # scheduled, running, parked, done, stopped, cancelled, failed
    status: Mapped[str] = mapped_column(String(16), index=True)
    due_at: Mapped[datetime] = mapped_column(index=True)
    claimed_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    output: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class OptOut(Base):
    """An address that unsubscribed; kept as a hash of the normalised address."""

    __tablename__ = "opt_outs"

    email_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    source: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ContractEnvelope(Base):
    """One proposal's envelope: the key it was sent under and how far DocuSign got with it."""

    __tablename__ = "contract_envelopes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # The idempotency key, also written into the envelope's custom fields for the lookup.
    key: Mapped[str] = mapped_column(String(64), unique=True)
    envelope_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    deal_id: Mapped[int] = mapped_column(Integer, index=True)
    contract: Mapped[str] = mapped_column(String(64))
    # sending, sent, delivered, completed, declined, voided, failed; it only moves forward.
    status: Mapped[str] = mapped_column(String(16), index=True)
    event_id: Mapped[str | None] = mapped_column(String(32))
    status_changed_at: Mapped[datetime | None]
    # The last Connect message (or poll) about it, and the last time we asked DocuSign.
    last_message_at: Mapped[datetime | None]
    last_polled_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


def database_url() -> str:
    """DATABASE_URL, or a SQLite file under instance/ when it is unset."""
    url = os.environ.get("DATABASE_URL", "")
    if not url:
        INSTANCE_DIR.mkdir(exist_ok=True)
        return f"sqlite:///{INSTANCE_DIR / 'salesflow.db'}"
    # Heroku and Render hand out postgres:// URLs; SQLAlchemy wants a driver name.
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _tune_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the web and the workers read while one writes; the busy timeout makes
    # concurrent writers wait instead of failing with "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@functools.cache
def engine() -> Engine:
    """The process-wide engine for DATABASE_URL."""
    url = database_url()
    if url.startswith("sqlite"):
        created = create_engine(url, connect_args={"timeout": 10}, hide_parameters=True)
        event.listen(created, "connect", _tune_sqlite)
        return created
    # hide_parameters: an error message must not carry a lead's email into the logs.
    return create_engine(
        url, pool_pre_ping=True, pool_size=5, max_overflow=5, hide_parameters=True
    )


@functools.cache
def _session_factory() -> sessionmaker[Session]:
    return sessionmaker(engine(), expire_on_commit=False)


@contextmanager
def session() -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    db = _session_factory()()
    try:
        yield db
        db.commit()
    except BaseException:
        db.rollback()
        raise
    finally:
        db.close()


_INSERT_EVENT = insert(Event)


def add_event(values: dict[str, Any]) -> tuple[str | None, bool]:
    """Insert an event, committed on return; a known dedup_key counts a delivery: (id, new)."""
    values = {"id": new_id(), **values}
    if _insert(values):
        return values["id"], True
    with engine().begin() as connection:
        event_id = connection.scalar(
            select(Event.id).where(Event.dedup_key == values["dedup_key"])
        )
        connection.execute(
            update(Event).where(Event.id == event_id).values(deliveries=Event.deliveries + 1)
        )
    return event_id, False


def _insert(values: dict[str, Any]) -> bool:
    """One INSERT, committed as it returns; False when the dedup_key is already stored."""
    try:
        with engine().connect() as connection:
            # Autocommit: no BEGIN and COMMIT round trips, and no ORM unit of work.
            connection.execution_options(isolation_level="AUTOCOMMIT")
            connection.execute(_INSERT_EVENT, values)
        return True
    except IntegrityError:
        return False


def _after_fork_in_child() -> None:
    # RQ forks a work-horse per job: pooled connections belong to the parent.
    if engine.cache_info().currsize:
        engine().dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


def reset_engine() -> None:
    """Forget the cached engine (tests switch DATABASE_URL; forked workers need fresh pools)."""
    if engine.cache_info().currsize:
        engine().dispose()
    engine.cache_clear()
    _session_factory.cache_clear()
