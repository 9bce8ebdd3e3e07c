"""The receivers' write path: the event row's INSERT, then the unique enqueue."""

from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import select

from core import queue
from core.store import Event, add_event, session
from tests.conftest import queued_job_ids


def test_a_job_that_waits_is_not_queued_twice(clean) -> None:
    assert queue.enqueue_event("once")
    assert not queue.enqueue_event("once")
    assert queued_job_ids() == ["once"]


def test_the_inserted_row_has_its_defaults_and_json(clean) -> None:
    data = {"lead": {"name": "Nino", "answers": {"budget": [1, 2]}}}
    values = {
        "source": "typeform",
        "type": "lead",
        "dedup_key": "typeform:form:token",
        "status": "queued",
        "reason": None,
        "data": data,
        "payload": "{}",
    }
    event_id, created = add_event(values)
    again, created_again = add_event(values)

    assert created and not created_again and again == event_id
    with session() as db:
        event = db.get(Event, event_id)
        assert event.data == data and event.deliveries == 2
        assert event.received_at is not None and event.updated_at >= event.received_at


def lead_row(dedup_key: str) -> dict:
    """The values a receiver stores for one lead."""
    return {
        "source": "typeform",
        "type": "lead",
        "dedup_key": dedup_key,
        "status": "queued",
        "reason": None,
        "data": {"lead": {"email": "nino@example.test"}},
        "payload": "{}",
    }


def test_concurrent_deliveries_are_each_stored_once(clean) -> None:
    # 8 threads, 40 deliveries of 10 events: new rows and repeats race for the same keys.
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: add_event(lead_row(f"typeform:f:{i % 10}")), range(40)))

    ids: dict[str, set[str]] = {}
    for index, (event_id, _) in enumerate(results):
        ids.setdefault(f"typeform:f:{index % 10}", set()).add(event_id)
    assert sum(created for _, created in results) == 10
    assert all(len(same) == 1 for same in ids.values())
    with session() as db:
        stored = db.execute(select(Event.dedup_key, Event.deliveries)).all()
    assert sorted(stored) == sorted((key, 4) for key in ids)
