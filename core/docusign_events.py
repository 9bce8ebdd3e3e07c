"""DocuSign Connect messages (JSON SIM and legacy XML) normalised into one typed envelope event."""

import base64
import binascii
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException
from pydantic import BaseModel

from core.leads import MalformedPayload

# The envelope's life only moves forward; a message about an earlier state changes nothing.
RANKS = {"sent": 1, "delivered": 2, "completed": 3, "declined": 3, "voided": 3}
FINAL = ("completed", "declined", "voided")
EVENT_STATUS = {f"envelope-{status}": status for status in RANKS}
DEAL_FIELD = "pipedrive_deal_id"
KEY_FIELD = "idempotency_key"
XML_NS = "{http://www.docusign.net/API/3.0}"
# Legacy XML names the time of each status after the status itself.
XML_TIMES = {"sent": "Sent", "delivered": "Delivered", "completed": "Completed",
             "declined": "Declined", "voided": "Voided"}  # fmt: skip


class EnvelopeEvent(BaseModel):
    """One envelope's state as a Connect message (or a poll) reported it; no documents."""

    source: Literal["docusign"] = "docusign"
    format: Literal["json", "xml", "poll"]
    # envelope-completed, recipient-completed, ... (the XML's snapshot has no event name)
    event: str
    envelope_id: str
    status: str
    status_changed_at: datetime | None = None
    deal_id: int | None = None
    idempotency_key: str | None = None
    documents: int = 0

    @property
    def type(self) -> str:
        """envelope.<status>, e.g. envelope.completed."""
        return f"envelope.{self.status}"

    @property
    def dedup_key(self) -> str:
        """The envelope, its state and when it got there: a resend of the same is a duplicate."""
        # Milliseconds: legacy XML carries no finer times, and JSON and XML of one change
        # must meet as duplicates.
        moment = (
            self.status_changed_at.astimezone(UTC).isoformat(timespec="milliseconds")
            if self.status_changed_at
            else "unknown"
        )
        return f"docusign:{self.envelope_id}:{self.status}:{moment}"

    @property
    def tracked(self) -> bool:
        """Whether the flow acts on this status (created drafts and the like it does not)."""
        return self.status in RANKS


@dataclass
class EnvelopeDetails:
    """What the worker reads from the stored body: reasons and the signed PDFs."""

    decline_reason: str | None = None
    void_reason: str | None = None
    documents: list[tuple[str, bytes]] = field(default_factory=list)


def parse_time(value: Any) -> datetime | None:
    """A DocuSign timestamp (seven fraction digits, Z or none) as an aware datetime."""
    if not isinstance(value, str) or not value:
        return None
    try:
        # DocuSign writes seven fraction digits; Python reads at most six.
        head, dot, fraction = value.rstrip("Z").partition(".")
        moment = datetime.fromisoformat(head + (dot + fraction[:6] if dot else ""))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _int(value: Any) -> int | None:
    text = str(value).strip() if value is not None else ""
    return int(text) if text.isdigit() and len(text) < 19 else None


# -- JSON SIM ---------------------------------------------------------------------------


def _json_fields(summary: dict[str, Any]) -> dict[str, str]:
    fields = (summary.get("customFields") or {}).get("textCustomFields") or []
    return {
        str(item.get("name")): str(item.get("value") or "")
        for item in fields
        if isinstance(item, dict)
    }


def _from_json(payload: Any) -> EnvelopeEvent | None:
    if not isinstance(payload, dict):
        raise MalformedPayload("The body is not a JSON object.")
    data = payload.get("data")
    if not isinstance(data, dict):
        return None
    summary = data.get("envelopeSummary") if isinstance(data.get("envelopeSummary"), dict) else {}
    envelope_id = data.get("envelopeId") or summary.get("envelopeId")
    event = payload.get("event")
    if not isinstance(envelope_id, str) or not envelope_id or not isinstance(event, str):
        return None
    # The summary is the envelope as it is now (aggregate messages too); the event name
    # is only a fallback for configurations that send no data.
    status = summary.get("status") or EVENT_STATUS.get(event)
    if not isinstance(status, str):
        return None
    fields = _json_fields(summary)
    return EnvelopeEvent(
        format="json",
        event=event[:64],
        envelope_id=envelope_id[:64],
        status=status.lower()[:16],
        status_changed_at=parse_time(summary.get("statusChangedDateTime")),
        deal_id=_int(fields.get(DEAL_FIELD)),
        idempotency_key=fields.get(KEY_FIELD) or None,
        documents=sum(1 for d in summary.get("envelopeDocuments") or [] if _has_pdf(d)),
    )


def _has_pdf(document: Any) -> bool:
    return isinstance(document, dict) and bool(document.get("PDFBytes"))


def _json_details(payload: dict[str, Any]) -> EnvelopeDetails:
    summary = (payload.get("data") or {}).get("envelopeSummary") or {}
    signers = (summary.get("recipients") or {}).get("signers") or []
    reason = next((s.get("declinedReason") for s in signers if s.get("declinedReason")), None)
    documents = [
        (str(d.get("name") or f"document {d.get('documentId')}"), _pdf(d.get("PDFBytes")))
        for d in summary.get("envelopeDocuments") or []
        if _has_pdf(d)
    ]
    return EnvelopeDetails(reason, summary.get("voidedReason"), documents)


def _pdf(value: Any) -> bytes:
    try:
        return base64.b64decode(str(value), validate=False)
    except (binascii.Error, ValueError):
        return b""


# -- legacy XML -------------------------------------------------------------------------


def _parse_xml(body: bytes) -> Element:
    try:
        # DocuSign never sends a DTD: refusing one stops external entities and entity bombs.
        return SafeET.fromstring(body, forbid_dtd=True)
    except DefusedXmlException:
        raise MalformedPayload(
            "The XML body declares a DTD or entities, which DocuSign never sends; it was refused."
        ) from None
    except ParseError:
        raise MalformedPayload("The body is not well-formed XML.") from None


def _text(element: Element | None, name: str) -> str | None:
    found = element.find(XML_NS + name) if element is not None and name else None
    return found.text.strip() if found is not None and found.text else None


def _xml_time(root: Element, envelope: Element, status: str) -> datetime | None:
    local = parse_time(_text(envelope, XML_TIMES.get(status, "")))
    if local is None:
        return None
    # The XML's times are the account's local time; TimeZoneOffset is its offset in hours.
    offset = _int((_text(root, "TimeZoneOffset") or "0").lstrip("-+")) or 0
    sign = -1 if (_text(root, "TimeZoneOffset") or "").startswith("-") else 1
    return local - sign * timedelta(hours=offset)


def _xml_fields(envelope: Element) -> dict[str, str]:
    fields = {}
    for item in envelope.iter(f"{XML_NS}CustomField"):
        name = _text(item, "Name")
        if name:
            fields[name] = _text(item, "Value") or ""
    return fields


def _from_xml(root: Element) -> EnvelopeEvent | None:
    if root.tag != f"{XML_NS}DocuSignEnvelopeInformation":
        raise MalformedPayload("The XML body is not a DocuSignEnvelopeInformation message.")
    envelope = root.find(f"{XML_NS}EnvelopeStatus")
    envelope_id, status = _text(envelope, "EnvelopeID"), _text(envelope, "Status")
    if envelope is None or not envelope_id or not status:
        return None
    status = status.lower()
    fields = _xml_fields(envelope)
    return EnvelopeEvent(
        format="xml",
        event="snapshot",
        envelope_id=envelope_id[:64],
        status=status[:16],
        status_changed_at=_xml_time(root, envelope, status),
        deal_id=_int(fields.get(DEAL_FIELD)),
        idempotency_key=fields.get(KEY_FIELD) or None,
        documents=sum(1 for _ in root.iter(f"{XML_NS}PDFBytes")),
    )


def _xml_details(root: Element) -> EnvelopeDetails:
    envelope = root.find(f"{XML_NS}EnvelopeStatus")
    reason = None
    for recipient in root.iter(f"{XML_NS}RecipientStatus"):
        reason = reason or _text(recipient, "DeclineReason")
    documents = [
        (_text(item, "Name") or "document", _pdf(_text(item, "PDFBytes")))
        for item in root.iter(f"{XML_NS}DocumentPDF")
        if _text(item, "PDFBytes")
    ]
    return EnvelopeDetails(reason, _text(envelope, "VoidReason"), documents)


# -- entry points -----------------------------------------------------------------------


def _is_xml(body: bytes) -> bool:
    return body.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<")


def _json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise MalformedPayload("The body is not UTF-8 text.") from None
    except ValueError:
        raise MalformedPayload("The body is neither JSON nor XML.") from None
    except RecursionError:
        raise MalformedPayload("The body nests JSON too deeply.") from None


def event_from_connect(body: bytes) -> EnvelopeEvent | None:
    """The typed event, or None for a well-formed message about something we do not track."""
    if _is_xml(body):
        return _from_xml(_parse_xml(body))
    return _from_json(_json(body))


def envelope_details(body: str | bytes) -> EnvelopeDetails:
    """Decline and void reasons and the included PDFs, read again from the stored body."""
    raw = body.encode("utf-8") if isinstance(body, str) else body
    if _is_xml(raw):
        return _xml_details(_parse_xml(raw))
    payload = _json(raw)
    return _json_details(payload) if isinstance(payload, dict) else EnvelopeDetails()
