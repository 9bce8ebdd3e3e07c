"""Google Drive (files copy, export, delete) and Docs (get, batchUpdate) for contract PDFs."""

import logging
import re
from typing import Any

from googleapiclient.discovery import build

from connectors.errors import VendorError
from connectors.gmail import authorized_http, execute
from core.config import Google, Retry

logger = logging.getLogger(__name__)

VENDOR = "google_docs"
SCOPES = [
    "https://www.googleapis.com/auth/drive.file",
    "https://www.googleapis.com/auth/documents",
]
PDF = "application/pdf"
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_.-]+)\s*\}\}")


class GoogleDocsClient:
    """Copies a Docs template, fills it and exports it, on the sending mailbox's grant."""

    def __init__(self, settings: Google, retry: Retry) -> None:
        self._retry = retry
        http = authorized_http(settings, SCOPES)
        base = settings.api_base_url.rstrip("/") + "/" if settings.api_base_url else ""
        # Drive's discovery root is googleapis.com/drive/v3/; Docs' service path is empty.
        self._drive = self._build("drive", "v3", http, base + "drive/v3/" if base else None)
        self._docs = self._build("docs", "v1", http, base or None)

    @staticmethod
    def _build(name: str, version: str, http: Any, endpoint: str | None) -> Any:
        return build(
            name,
            version,
            http=http,
            static_discovery=True,
            cache_discovery=False,
            client_options={"api_endpoint": endpoint} if endpoint else None,
        )

    def _execute(self, request: Any, what: str, write: bool = False) -> Any:
        return execute(request, what, self._retry, VENDOR, write=write)

    def text(self, document_id: str) -> str:
        """The document's text, paragraph by paragraph (documents.get)."""
        document = self._execute(self._docs.documents().get(documentId=document_id), "get doc")
        parts = []
        for item in (document.get("body") or {}).get("content") or []:
            for element in (item.get("paragraph") or {}).get("elements") or []:
                parts.append((element.get("textRun") or {}).get("content") or "")
        return "".join(parts)

    def placeholders(self, document_id: str) -> set[str]:
        """The names of the {{placeholders}} in a document."""
        return set(PLACEHOLDER.findall(self.text(document_id)))

    def copy(self, document_id: str, name: str) -> str:
        """files.copy; returns the copy's id."""
        request = self._drive.files().copy(fileId=document_id, body={"name": name})
        return self._execute(request, "copy doc", write=True)["id"]

    def replace_all(self, document_id: str, values: dict[str, str]) -> None:
        """documents.batchUpdate with one replaceAllText per {{placeholder}}."""
        requests = [
            {
                "replaceAllText": {
                    "containsText": {"text": "{{" + name + "}}", "matchCase": True},
                    "replaceText": value,
                }
            }
            for name, value in values.items()
        ]
        if requests:
            body = {"requests": requests}
            update = self._docs.documents().batchUpdate(documentId=document_id, body=body)
            self._execute(update, "fill doc", write=True)

    def export_pdf(self, document_id: str) -> bytes:
        """files.export as application/pdf."""
        request = self._drive.files().export(fileId=document_id, mimeType=PDF)
        return self._execute(request, "export doc")

    def delete(self, document_id: str) -> None:
        """files.delete; a file already gone is fine."""
        try:
            self._execute(self._drive.files().delete(fileId=document_id), "delete doc")
        except VendorError as exc:
            if exc.status != 404:
                raise
