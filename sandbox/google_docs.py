"""Google Drive v3 (files copy, get, export, delete) and Docs v1 (get, batchUpdate) routes."""

from __future__ import annotations

import copy
import datetime as dt
import logging
import re
import secrets
from typing import Any

from flask import Response, jsonify, request

from sandbox import google
from sandbox.google import GoogleError, validate_against_schema
from sandbox.pdf import build_pdf
from sandbox.state import current_state

logger = logging.getLogger(__name__)

DOC_MIME = "application/vnd.google-apps.document"
PROPOSAL_TEMPLATE_ID = "1pRq7sandboxProposalTemplate0aBcDeFgHiJkLmNo"
ROOT_FOLDER_ID = "0AKsandboxRootFolderUk9PVA"
PROPOSAL_LINES = (
    "Proposal for {{company}}",
    "Prepared for {{client_name}}",
    "Total: {{amount}}",
    "Start date: {{start_date}}",
    "Scope: website design and a paid social campaign, as discussed.",
    "Client signature: /sig1/",
)
EXPORTS = {"application/pdf", "text/plain"}
DEFAULT_FILE_FIELDS = ("kind", "id", "name", "mimeType")
DOCS_API = "docs.v1"
DRIVE_API = "drive.v3"


def _stamp(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _new_file(file_id: str, name: str, lines: list[str]) -> dict[str, Any]:
    now = _stamp(dt.datetime.now(dt.UTC))
    return {
        "kind": "drive#file",
        "id": file_id,
        "name": name,
        "mimeType": DOC_MIME,
        "parents": [ROOT_FOLDER_ID],
        "createdTime": now,
        "modifiedTime": now,
        "trashed": False,
        "revision": 1,
        "lines": list(lines),
    }


def seed_files() -> dict[str, dict[str, Any]]:
    """Return the seeded Drive: the proposal template with {{placeholders}} and /sig1/."""
    return {
        PROPOSAL_TEMPLATE_ID: _new_file(
            PROPOSAL_TEMPLATE_ID, "Proposal template", list(PROPOSAL_LINES)
        )
    }


def _files() -> dict[str, dict[str, Any]]:
    return current_state().store(google.VENDOR, google.GoogleStore).files


def _file(file_id: str) -> dict[str, Any]:
    record = _files().get(file_id)
    if record is None:
        raise GoogleError(
            404,
            f"File not found: {file_id}.",
            "notFound",
            location="fileId",
            locationType="parameter",
        )
    return record


def _file_view(record: dict[str, Any]) -> dict[str, Any]:
    fields = request.args.get("fields", "")
    wanted = [f.strip() for f in fields.split(",") if f.strip()] or list(DEFAULT_FILE_FIELDS)
    public = {k: v for k, v in record.items() if k not in ("lines", "revision")}
    if "*" in wanted:
        return copy.deepcopy(public)
    return {key: copy.deepcopy(public[key]) for key in wanted if key in public}


# --- Drive v3 -------------------------------------------------------------------------------


@google.bp.get("/drive/v3/files/<file_id>")
def get_file(file_id: str) -> Response:
    """Return a file's metadata, default fields kind,id,name,mimeType (files.get)."""
    with current_state().lock:
        return jsonify(_file_view(_file(file_id)))


@google.bp.post("/drive/v3/files/<file_id>/copy")
def copy_file(file_id: str) -> Response:
    """Copy a file, with the name and parents the body gives (files.copy)."""
    body = request.get_json(silent=True)
    if body is None and not request.data:
        body = {}
    if not isinstance(body, dict):
        raise GoogleError(400, "Invalid JSON payload received. Expected an object.", "invalid")
    validate_against_schema(body, {"$ref": "File"}, "file", DRIVE_API)
    with current_state().lock:
        source = _file(file_id)
        new_id = "1" + secrets.token_urlsafe(32)[:43]
        record = _new_file(
            new_id, body.get("name") or f"Copy of {source['name']}", source["lines"]
        )
        if body.get("parents"):
            record["parents"] = list(body["parents"])
        _files()[new_id] = record
    logger.info("drive file copied source=%s id=%s", file_id, new_id)
    return jsonify(_file_view(record))


@google.bp.get("/drive/v3/files/<file_id>/export")
def export_file(file_id: str) -> Response:
    """Export a Docs file as PDF (one line per paragraph) or plain text (files.export)."""
    mime = request.args.get("mimeType")
    if not mime:
        raise GoogleError(
            400,
            "Required parameter: mimeType",
            "required",
            location="mimeType",
            locationType="parameter",
        )
    with current_state().lock:
        record = copy.deepcopy(_file(file_id))
    if record["mimeType"] != DOC_MIME:
        raise GoogleError(403, "Export only supports Docs Editors files.", "fileNotExportable")
    if mime not in EXPORTS:
        # Drive converts Docs to more types (docx, odt, html...); the sandbox builds these two.
        raise GoogleError(400, "The requested conversion is not supported.", "badRequest")
    if mime == "text/plain":
        text = "\ufeff" + "\r\n".join(record["lines"]) + "\r\n"
        return Response(text.encode("utf-8"), content_type="text/plain")
    return Response(build_pdf(record["lines"], record["name"]), content_type="application/pdf")


@google.bp.delete("/drive/v3/files/<file_id>")
def delete_file(file_id: str) -> Response:
    """Delete a file for good, skipping the trash (files.delete); 204 with no body."""
    with current_state().lock:
        _file(file_id)
        del _files()[file_id]
    logger.info("drive file deleted id=%s", file_id)
    return Response(status=204)


# --- Docs v1 --------------------------------------------------------------------------------


def _utf16(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def document_view(record: dict[str, Any]) -> dict[str, Any]:
    """Return a Docs file as documents.get writes it: a section break, then paragraphs."""
    content: list[dict[str, Any]] = [
        {
            "endIndex": 1,
            "sectionBreak": {
                "sectionStyle": {
                    "columnSeparatorStyle": "NONE",
                    "contentDirection": "LEFT_TO_RIGHT",
                    "sectionType": "CONTINUOUS",
                }
            },
        }
    ]
    index = 1
    for line in record["lines"]:
        text = line + "\n"
        end = index + _utf16(text)
        run = {"startIndex": index, "endIndex": end, "textRun": {"content": text, "textStyle": {}}}
        content.append(
            {
                "startIndex": index,
                "endIndex": end,
                "paragraph": {
                    "elements": [run],
                    "paragraphStyle": {
                        "namedStyleType": "NORMAL_TEXT",
                        "direction": "LEFT_TO_RIGHT",
                    },
                },
            }
        )
        index = end
    return {
        "title": record["name"],
        "body": {"content": content},
        "documentStyle": {
            "pageSize": {
                "height": {"magnitude": 792, "unit": "PT"},
                "width": {"magnitude": 612, "unit": "PT"},
            }
        },
        "revisionId": f"ALBJ4Lsandbox{record['revision']:06d}",
        "suggestionsViewMode": "SUGGESTIONS_INLINE",
        "documentId": record["id"],
    }


def _document(document_id: str) -> dict[str, Any]:
    record = _files().get(document_id)
    if record is None or record["mimeType"] != DOC_MIME:
        raise GoogleError(404, "Requested entity was not found.", "notFound")
    return record


@google.bp.get("/v1/documents/<document_id>")
def get_document(document_id: str) -> Response:
    """Return a document's structure (documents.get)."""
    with current_state().lock:
        return jsonify(document_view(_document(document_id)))


def _check_requests(body: Any) -> list[dict[str, Any]]:
    if not isinstance(body, dict):
        raise GoogleError(400, "Invalid JSON payload received. Expected an object.", "invalid")
    for key in body:
        if key not in ("requests", "writeControl"):
            raise google._invalid_payload(
                f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.'
            )
    validate_against_schema(
        body.get("writeControl"), {"$ref": "WriteControl"}, "write_control", DOCS_API
    )
    items = body.get("requests") or []
    if not isinstance(items, list):
        raise google._invalid_payload("Invalid value at 'requests', expected a list.")
    for number, item in enumerate(items):
        validate_against_schema(item, {"$ref": "Request"}, f"requests[{number}]", DOCS_API)
        kinds = [key for key, value in item.items() if value is not None]
        if len(kinds) != 1:
            raise GoogleError(
                400,
                f"Invalid requests[{number}]: exactly one kind of request must be set, got "
                f"{kinds or 'none'}.",
                "badRequest",
            )
        if kinds[0] != "replaceAllText":
            raise GoogleError(
                400,
                f"Invalid requests[{number}]: the sandbox does not emulate {kinds[0]}; it "
                "supports replaceAllText.",
                "badRequest",
            )
        criteria = item["replaceAllText"].get("containsText") or {}
        if not criteria.get("text"):
            raise GoogleError(
                400,
                f"Invalid requests[{number}].replaceAllText: The text to match must not be empty.",
                "badRequest",
            )
    return items


def _replace_all(lines: list[str], request_body: dict[str, Any]) -> tuple[list[str], int]:
    criteria = request_body["containsText"]
    flags = 0 if criteria.get("matchCase") else re.IGNORECASE
    pattern = re.compile(re.escape(criteria["text"]), flags)
    replacement = request_body.get("replaceText") or ""
    changed = 0
    out = []
    for line in lines:
        line, count = pattern.subn(lambda _: replacement, line)
        changed += count
        out.append(line)
    return out, changed


@google.bp.post("/v1/documents/<document_id>:batchUpdate")
def batch_update(document_id: str) -> Response:
    """Apply replaceAllText requests atomically (documents.batchUpdate)."""
    items = _check_requests(request.get_json(silent=True))
    with current_state().lock:
        record = _document(document_id)
        required = ((request.get_json(silent=True) or {}).get("writeControl") or {}).get(
            "requiredRevisionId"
        )
        if required and required != document_view(record)["revisionId"]:
            raise GoogleError(
                400, "The document was modified since requiredRevisionId.", "failedPrecondition"
            )
        lines, replies = list(record["lines"]), []
        for item in items:
            lines, changed = _replace_all(lines, item["replaceAllText"])
            # proto3 JSON leaves a zero count out.
            replies.append({"replaceAllText": {"occurrencesChanged": changed} if changed else {}})
        record["lines"] = lines
        record["revision"] += 1
        record["modifiedTime"] = _stamp(dt.datetime.now(dt.UTC))
        revision = document_view(record)["revisionId"]
    logger.info("docs batchUpdate id=%s requests=%s", document_id, len(items))
    return jsonify(
        {
            "replies": replies,
            "writeControl": {"requiredRevisionId": revision},
            "documentId": document_id,
        }
    )
