"""What every receiver shares: size limits, the store-then-enqueue step and the answers."""

import hashlib
import io
import json
import logging
import time
from typing import Any, Protocol

import redis
from flask import Request, abort, g, jsonify
from flask.typing import ResponseReturnValue
from pydantic import ValidationError

from core import metrics, queue
from core.leads import MalformedPayload
from core.store import add_event

logger = logging.getLogger(__name__)


class StoredEvent(Protocol):
    """What the store needs of a typed event (a lead, a Pipedrive change): kind and identity."""

    @property
    def type(self) -> str:
        """The event's kind, stored as events.type."""

    @property
    def dedup_key(self) -> str:
        """The sender's identity of the event: a second delivery is a duplicate."""

    def model_dump(self, *, mode: str) -> dict[str, Any]:
        """The event as JSON-ready data (pydantic models have it)."""


def read_body(req: Request, max_bytes: int) -> bytes:
    """The raw body, refusing more than the route's limit with a 413."""
    g.started = time.perf_counter()
    if req.content_length is not None and req.content_length > max_bytes:
        abort(413, f"The body is larger than this route's limit of {max_bytes} bytes.")
    if req.content_length is None and req.environ.get("wsgi.input_terminated"):
        # Chunked: werkzeug would stop at the limit without a word; read one byte past it.
        body = req.environ["wsgi.input"].read(max_bytes + 1)
        if len(body) > max_bytes:
            abort(413, f"The body is larger than this route's limit of {max_bytes} bytes.")
        req.environ["wsgi.input"] = io.BytesIO(body)
        req.environ["CONTENT_LENGTH"] = str(len(body))
    req.max_content_length = max_bytes
    # Cached: request.form, where a route wants it, is parsed from these same bytes.
    return req.get_data(cache=True)


def _no_constants(name: str) -> Any:
    raise MalformedPayload(f"The body uses {name}, which JSON does not allow.")


def parse_json(body: bytes) -> Any:
    """The parsed body, or MalformedPayload with a sentence for the 400."""
    try:
        # RFC 8259: JSON between systems is UTF-8 (json.loads on bytes would guess UTF-16).
        payload = json.loads(body.decode("utf-8"), parse_constant=_no_constants)
        if b"\\u" in body or b"\\U" in body:
            # A \ud800 escape parses into a lone surrogate that no database can store.
            json.dumps(payload, ensure_ascii=False).encode("utf-8")
        return payload
    except UnicodeEncodeError:
        raise MalformedPayload("The body escapes a lone UTF-16 surrogate.") from None
    except UnicodeDecodeError:
        raise MalformedPayload("The body is not UTF-8 text.") from None
    except ValueError:
        raise MalformedPayload("The body is not valid JSON.") from None
    except RecursionError:
        raise MalformedPayload("The body nests JSON too deeply.") from None


def describe(exc: MalformedPayload | ValidationError) -> str:
    """A sentence for a 400 from a parse error."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"The body has an invalid value at {where}: {first['msg']}."
    return str(exc)


def reject(source: str, status: int, sentence: str) -> ResponseReturnValue:
    """A 4xx with a sentence saying what is wrong; nothing is stored or queued."""
    metrics.WEBHOOKS.labels(source, str(status)).inc()
    # The sentence can quote what the sender typed (a field name, an address): only the
    # status is logged.
    logger.info("webhook rejected source=%s status=%d", source, status)
    return jsonify(error=sentence), status


def _store(
    source: str,
    kind: str,
    dedup_key: str,
    data: dict[str, Any],
    raw: bytes,
    status: str,
    reason: str | None,
) -> tuple[str, bool]:
    """Insert the event; on a repeat delivery return the stored id and False."""
    # Senders choose the ids inside these: keep them within the columns, whatever they send.
    if len(dedup_key) > 200:
        dedup_key = f"{source}:sha256:{hashlib.sha256(dedup_key.encode()).hexdigest()}"
    kind = kind[:64]
    reason = reason[:500] if reason else reason
    event_id, created = add_event(
        {
            "source": source,
            "type": kind,
            "dedup_key": dedup_key,
            "status": status,
            "reason": reason,
            "data": data,
            "payload": raw.decode("utf-8", "replace"),
        }
    )
    if event_id is None:
        abort(503, "The event store refused the event; please deliver it again.")
    return event_id, created


def enqueue(source: str, event_id: str) -> None:
    """Queue a stored event; a Redis outage is logged, the sweep queues it later."""
    try:
        queue.enqueue_event(event_id)
    except redis.RedisError as exc:
        metrics.ENQUEUE_FAILURES.inc()
        logger.warning(
            "enqueue failed source=%s event_id=%s error=%s",
            source,
            event_id,
            exc.__class__.__name__,
        )
        return
    logger.info("event queued source=%s event_id=%s", source, event_id)


def store_event(
    source: str,
    event: StoredEvent | None,
    raw: bytes,
    *,
    kind: str = "",
    dedup_key: str = "",
    ignore_reason: str | None = None,
) -> tuple[str, str]:
    """Store one event before answering and queue it unless ignored: (event id, status)."""
    if event is not None:
        kind, dedup_key = event.type, event.dedup_key
    data = event.model_dump(mode="json") if event is not None else {}
    status = "ignored" if ignore_reason else "queued"
    event_id, created = _store(source, kind, dedup_key, data, raw, status, ignore_reason)
    if not created:
        logger.info("duplicate delivery source=%s event_id=%s", source, event_id)
        return event_id, "duplicate"
    if ignore_reason:
        logger.info("event ignored source=%s event_id=%s", source, event_id)
        return event_id, "ignored"
    enqueue(source, event_id)
    return event_id, "queued"


def accept(
    source: str,
    event: StoredEvent | None,
    raw: bytes,
    *,
    kind: str = "",
    dedup_key: str = "",
    ignore_reason: str | None = None,
) -> ResponseReturnValue:
    """Store, queue and answer one event as the contract says."""
    event_id, status = store_event(
        source, event, raw, kind=kind, dedup_key=dedup_key, ignore_reason=ignore_reason
    )
    return answer(source, event_id, status)


def count(source: str, status: str) -> None:
    """Record an accepted delivery and its ack time in the metrics."""
    metrics.WEBHOOKS.labels(source, status).inc()
    metrics.ACK_SECONDS.labels(source).observe(time.perf_counter() - g.get("started", 0.0))


def answer(source: str, event_id: str, status: str, **extra: Any) -> ResponseReturnValue:
    """The contract's 200: the event id and what became of it."""
    count(source, status)
    return jsonify(event_id=event_id, status=status, **extra), 200


def answer_unreadable(source: str, body: bytes, reason: str) -> ResponseReturnValue:
    """Keep an authenticated body we cannot act on, as ignored, and answer 200.

    Its digest is its identity, so a redelivery is a duplicate. A 4xx would only make the
    vendor retry it (Pipedrive bans a webhook after ten failures, DocuSign backs off).
    """
    digest = hashlib.sha256(body).hexdigest()
    event_id, status = store_event(
        source,
        None,
        body,
        kind="unknown",
        dedup_key=f"{source}:unreadable:{digest}",
        ignore_reason=reason,
    )
    return answer(source, event_id, status)
