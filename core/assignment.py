"""Round-robin assignment of new leads to the reps in config, shared by every worker."""

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from connectors.errors import FlowAbort
from core.config import Rep
from core.store import Counter, session


def advance(name: str) -> int:
    """Add one to a named counter atomically and return the new value (from 1)."""
    with session() as db:
        # UPDATE ... RETURNING is a single atomic statement on SQLite and PostgreSQL, so
        # two workers can never read the same position.
        value = db.scalar(
            update(Counter).where(Counter.name == name).values(value=Counter.value + 1)
            .returning(Counter.value)
        )
    if value is not None:
        return value
    try:
        with session() as db:
            db.add(Counter(name=name, value=1))
        return 1
    except IntegrityError:
        # Another worker created it first; take the next position after theirs.
        return advance(name)


def next_rep(reps: list[Rep], active_user_ids: set[int], rotation: str) -> Rep:
    """The next active rep in the rotation; inactive Pipedrive users are skipped."""
    eligible = [rep for rep in reps if rep.pipedrive_user_id in active_user_ids]
    if not eligible:
        raise FlowAbort("no rep in config.yaml `reps` is an active Pipedrive user")
    position = advance(f"round_robin:{rotation}")
    return eligible[(position - 1) % len(eligible)]
