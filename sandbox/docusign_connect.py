"""DocuSign Connect messages (JSON SIM and legacy XML), their HMAC headers and their delivery."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import hmac
import json
import logging
import threading
import time
import xml.etree.ElementTree as ET
import zoneinfo
from collections.abc import Callable
from typing import Any, Protocol

import requests

logger = logging.getLogger(__name__)

CONFIGURATION_ID = 10418278
# DESIGN.md: DocuSign gives a listener about 5 s. Connect's own retry waits are long (after the
# next successful acknowledgement, then at least 24 h apart, up to ten times); the sandbox uses
# a short ladder instead, scaled by the docusign_connect_retry_percent setting.
DELIVERY_TIMEOUT_S = 5
RETRY_DELAYS_S = (5, 30, 120)
XML_NAMESPACE = "http://www.docusign.net/API/3.0"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
ACCOUNT_ZONE = zoneinfo.ZoneInfo("Asia/Tbilisi")
ACCOUNT_ZONE_NAME = "Georgian Standard Time"
ENVELOPE_EVENTS = (
    "envelope-sent", "envelope-delivered", "envelope-completed", "envelope-declined",
    "envelope-voided",
)  # fmt: skip
XML_STATUS = {
    "created": "Created", "sent": "Sent", "delivered": "Delivered", "completed": "Completed",
    "declined": "Declined", "voided": "Voided",
}  # fmt: skip


class ConnectStore(Protocol):
    """What a delivery needs of the DocuSign store."""

    deliveries: list[dict[str, Any]]
    stop: threading.Event


def ds_time(moment: dt.datetime) -> str:
    """Format a UTC instant the way DocuSign's JSON does: seven fraction digits and Z."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond:06d}0Z"


def _xml_time(value: str | None) -> str | None:
    # Legacy XML carries account-local times with milliseconds and no zone designator.
    if not value:
        return None
    moment = dt.datetime.fromisoformat(value.rstrip("Z")[:26]).replace(tzinfo=dt.UTC)
    local = moment.astimezone(ACCOUNT_ZONE)
    return local.strftime("%Y-%m-%dT%H:%M:%S.") + f"{local.microsecond // 1000:03d}"


def hmac_signatures(body: bytes, keys: list[str]) -> dict[str, str]:
    """Return X-DocuSign-Signature-N headers: base64 HMAC-SHA256 of the body per key."""
    return {
        f"X-DocuSign-Signature-{index}": base64.b64encode(
            hmac.new(key.encode("utf-8"), body, hashlib.sha256).digest()
        ).decode()
        for index, key in enumerate(keys, start=1)
    }


# --- JSON SIM -------------------------------------------------------------------------------


def json_message(
    event: str,
    summary: dict[str, Any],
    account_id: str,
    user_id: str,
    moment: dt.datetime,
    retry_count: int = 0,
) -> dict[str, Any]:
    """Build a Connect JSON SIM message around an envelope summary."""
    envelope_id = summary["envelopeId"]
    return {
        "event": event,
        "apiVersion": "v2.1",
        "uri": f"/restapi/v2.1/accounts/{account_id}/envelopes/{envelope_id}",
        "retryCount": retry_count,
        "configurationId": CONFIGURATION_ID,
        "generatedDateTime": ds_time(moment),
        "data": {
            "accountId": account_id,
            "userId": user_id,
            "envelopeId": envelope_id,
            "envelopeSummary": summary,
        },
    }


# --- legacy XML -----------------------------------------------------------------------------


def _sub(parent: ET.Element, tag: str, text: str | None = None, nil: bool = False) -> ET.Element:
    element = ET.SubElement(parent, f"{{{XML_NAMESPACE}}}{tag}")
    if nil:
        element.set(f"{{{XSI}}}nil", "true")
    elif text is not None:
        element.text = text
    return element


def _xml_tab_statuses(parent: ET.Element, tabs: dict[str, list[dict[str, Any]]]) -> None:
    kinds = {"signHereTabs": "SignHere", "dateSignedTabs": "DateSigned", "textTabs": "Custom"}
    statuses = _sub(parent, "TabStatuses")
    for key, kind in kinds.items():
        for tab in tabs.get(key, []):
            status = _sub(statuses, "TabStatus")
            _sub(status, "TabType", kind)
            _sub(status, "Status", "Signed" if tab.get("status") == "signed" else "Active")
            _sub(status, "XPosition", tab.get("xPosition") or "0")
            _sub(status, "YPosition", tab.get("yPosition") or "0")
            _sub(status, "TabLabel", tab.get("tabLabel", ""))
            _sub(status, "TabName", tab.get("name", ""))
            _sub(status, "TabValue", tab.get("value"))
            _sub(status, "DocumentID", tab.get("documentId", "1"))
            _sub(status, "PageNumber", tab.get("pageNumber", "1"))
            if kind == "Custom":
                _sub(status, "OriginalValue", tab.get("originalValue", tab.get("value")))
                _sub(status, "CustomTabType", "Text")


def _xml_recipient(parent: ET.Element, recipient: dict[str, Any], kind: str) -> None:
    status = _sub(parent, "RecipientStatus")
    _sub(status, "Type", kind)
    _sub(status, "Email", recipient["email"])
    _sub(status, "UserName", recipient["name"])
    _sub(status, "RoutingOrder", recipient["routingOrder"])
    for tag, key in (("Sent", "sentDateTime"), ("Delivered", "deliveredDateTime")):
        if recipient.get(key):
            _sub(status, tag, _xml_time(recipient[key]))
    if recipient.get("signedDateTime"):
        _sub(status, "Signed", _xml_time(recipient["signedDateTime"]))
    if recipient.get("declinedDateTime"):
        _sub(status, "Declined", _xml_time(recipient["declinedDateTime"]))
    reason = recipient.get("declinedReason")
    _sub(status, "DeclineReason", reason, nil=not reason)
    _sub(status, "Status", XML_STATUS.get(recipient["status"], recipient["status"].title()))
    _sub(status, "RecipientIPAddress", "203.0.113.47" if recipient.get("signedDateTime") else None)
    _sub(status, "CustomFields")
    if kind == "Signer":
        _xml_tab_statuses(status, recipient.get("tabs", {}))
    _sub(status, "AccountStatus", "Active")
    _sub(status, "RecipientId", recipient["recipientIdGuid"])


def xml_message(
    summary: dict[str, Any], pdfs: list[tuple[dict[str, Any], bytes]], moment: dt.datetime
) -> bytes:
    """Build a legacy DocuSignEnvelopeInformation message; `pdfs` are included documents."""
    ET.register_namespace("", XML_NAMESPACE)
    ET.register_namespace("xsi", XSI)
    ET.register_namespace("xsd", "http://www.w3.org/2001/XMLSchema")
    root = ET.Element(f"{{{XML_NAMESPACE}}}DocuSignEnvelopeInformation")
    envelope = _sub(root, "EnvelopeStatus")
    recipients = _sub(envelope, "RecipientStatuses")
    for signer in summary["recipients"].get("signers", []):
        _xml_recipient(recipients, signer, "Signer")
    for copy_to in summary["recipients"].get("carbonCopies", []):
        _xml_recipient(recipients, copy_to, "CarbonCopy")
    local = moment.astimezone(ACCOUNT_ZONE)
    _sub(envelope, "TimeGenerated", local.strftime("%Y-%m-%dT%H:%M:%S.") + f"{local.microsecond}0")
    _sub(envelope, "EnvelopeID", summary["envelopeId"])
    _sub(envelope, "Subject", summary.get("emailSubject", ""))
    _sub(envelope, "UserName", summary["sender"]["userName"])
    _sub(envelope, "Email", summary["sender"]["email"])
    _sub(envelope, "Status", XML_STATUS[summary["status"]])
    times = (
        ("Created", "createdDateTime"), ("Sent", "sentDateTime"),
        ("Delivered", "deliveredDateTime"), ("Signed", "completedDateTime"),
        ("Completed", "completedDateTime"), ("Declined", "declinedDateTime"),
        ("Voided", "voidedDateTime"),
    )  # fmt: skip
    for tag, key in times:
        if summary.get(key):
            _sub(envelope, tag, _xml_time(summary[key]))
    if summary.get("voidedReason"):
        _sub(envelope, "VoidReason", summary["voidedReason"])
    _sub(envelope, "ACStatus", "Original")
    _sub(envelope, "SigningLocation", "Online")
    _sub(envelope, "SenderIPAddress", "198.51.100.12")
    _sub(envelope, "EnvelopePDFHash")
    fields = _sub(envelope, "CustomFields")
    for field in summary.get("customFields", {}).get("textCustomFields", []):
        element = _sub(fields, "CustomField")
        _sub(element, "Name", field["name"])
        _sub(element, "Show", field.get("show", "false").title())
        _sub(element, "Required", field.get("required", "false").title())
        _sub(element, "Value", field.get("value", ""))
        _sub(element, "CustomFieldType", "Text")
    _sub(envelope, "AutoNavigation", "true")
    _sub(envelope, "EnvelopeIdStamping", "true")
    _sub(envelope, "AuthoritativeCopy", "false")
    documents = _sub(envelope, "DocumentStatuses")
    template_name = (summary.get("templates") or [{}])[0].get("name")
    for document in summary.get("envelopeDocuments", []):
        element = _sub(documents, "DocumentStatus")
        _sub(element, "ID", document["documentId"])
        _sub(element, "Name", document["name"])
        if template_name:
            _sub(element, "TemplateName", template_name)
        _sub(element, "Sequence", document["order"])
    if pdfs:
        holder = _sub(root, "DocumentPDFs")
        for document, data in pdfs:
            element = _sub(holder, "DocumentPDF")
            _sub(element, "Name", document["name"])
            _sub(element, "PDFBytes", base64.b64encode(data).decode())
            _sub(element, "DocumentID", document["documentId"])
            _sub(element, "DocumentType", "CONTENT")
    _sub(root, "TimeZone", ACCOUNT_ZONE_NAME)
    offset = local.utcoffset()
    hours = int(offset.total_seconds() // 3600) if offset is not None else 0
    _sub(root, "TimeZoneOffset", str(hours))
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


# --- delivery -------------------------------------------------------------------------------


def deliver(
    store: ConnectStore,
    lock: threading.RLock,
    messages: list[tuple[str, Callable[[int], bytes]]],
    target: dict[str, Any],
    delays: list[float],
) -> threading.Thread:
    """POST messages in order in one thread; `messages` are (event, render(retry_count))."""
    thread = threading.Thread(
        target=_deliver_all,
        args=(store, lock, messages, copy.deepcopy(target), delays),
        name="docusign-connect",
        daemon=True,
    )
    thread.start()
    return thread


def _deliver_all(
    store: ConnectStore,
    lock: threading.RLock,
    messages: list[tuple[str, Callable[[int], bytes]]],
    target: dict[str, Any],
    delays: list[float],
) -> None:
    for event, render in messages:
        for attempt in range(1, len(delays) + 2):
            if attempt > 1 and store.stop.wait(delays[attempt - 2]):
                return  # the sandbox was reset or stopped meanwhile
            if _attempt(store, lock, event, render(attempt - 1), target, attempt):
                break


def _attempt(
    store: ConnectStore,
    lock: threading.RLock,
    event: str,
    body: bytes,
    target: dict[str, Any],
    attempt: int,
) -> bool:
    is_xml = target["format"] == "xml"
    headers = {
        "Content-Type": "text/xml; charset=utf-8" if is_xml else "application/json; charset=utf-8",
        "User-Agent": "DocuSign Connect",
        **hmac_signatures(body, target["keys"]),
    }
    status: int | None = None
    error = None
    started = time.monotonic()
    try:
        answer = requests.post(
            target["url"], data=body, headers=headers, timeout=DELIVERY_TIMEOUT_S
        )
        status = answer.status_code
    except requests.RequestException as exc:
        error = f"{type(exc).__name__}: {exc}"
    ok = status is not None and 200 <= status < 300
    record = {
        "envelope_id": target["envelope_id"],
        "event": event,
        "format": target["format"],
        "url": target["url"],
        "attempt": attempt,
        "status_code": status,
        "error": error,
        "ok": ok,
        "duration_ms": int((time.monotonic() - started) * 1000),
        "sent_at": ds_time(dt.datetime.now(dt.UTC)),
        "headers": {k: v for k, v in headers.items() if k.startswith("X-DocuSign")},
        "size": len(body),
        # The exact bytes, so a test can replay a delivery as a duplicate.
        "body": body.decode("utf-8"),
    }
    with lock:
        if store.stop.is_set():
            return True
        store.deliveries.append(record)
    logger.info(
        "docusign connect delivery envelope=%s event=%s attempt=%s status=%s",
        target["envelope_id"], event, attempt, status if status is not None else error,
    )  # fmt: skip
    return ok


def json_bytes(message: dict[str, Any]) -> bytes:
    """Serialise a JSON SIM message as Connect sends it: UTF-8, non-ASCII as is."""
    return json.dumps(message, ensure_ascii=False).encode("utf-8")
