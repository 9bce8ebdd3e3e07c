"""Minimal PDF writing and text reading for the emulators' exported and signed documents."""

from __future__ import annotations

import logging
import re

logger = logging.getLogger(__name__)

LINES_PER_PAGE = 48
_TEXT_OP = re.compile(rb"\(((?:\\.|[^\\)])*)\)\s*Tj|<([0-9A-Fa-f\s]*)>\s*Tj", re.DOTALL)
_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"b": b"\b", b"f": b"\f"}


def _pdf_string(text: str) -> bytes:
    # Latin-1 text goes as a literal string the standard font renders; anything else as
    # UTF-16BE hex, which keeps the text recoverable though Helvetica has no glyphs for it.
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        return b"<FEFF" + text.encode("utf-16-be").hex().upper().encode() + b">"
    escaped = raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")
    return b"(" + escaped + b")"


def _page_stream(lines: list[str]) -> bytes:
    ops = [b"BT /F1 11 Tf 14 TL 72 750 Td"]
    for line in lines:
        ops.append(_pdf_string(line) + b" Tj T*")
    ops.append(b"ET")
    return b"\n".join(ops)


def build_pdf(lines: list[str], title: str = "") -> bytes:
    """Write a valid PDF 1.4 with one line of text per entry, 48 lines a page."""
    pages = [lines[i : i + LINES_PER_PAGE] for i in range(0, len(lines), LINES_PER_PAGE)] or [[]]
    count = len(pages)
    # Objects: 1 catalog, 2 pages, 3 font, 4 info, then a page and its stream per page.
    kids = " ".join(f"{5 + 2 * i} 0 R" for i in range(count))
    objects: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {count} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        b"<< /Title " + _pdf_string(title) + b" /Producer (sandbox) >>",
    ]
    for index, page in enumerate(pages):
        stream = _page_stream(page)
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {6 + 2 * index} 0 R"
            " /Resources << /Font << /F1 3 0 R >> >> >>".encode()
        )
        objects.append(f"<< /Length {len(stream)} >>\nstream\n".encode() + stream + b"\nendstream")
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R /Info 4 0 R >>\n".encode()
    out += f"startxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def _unescape(raw: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(raw):
        char = raw[i : i + 1]
        if char != b"\\" or i + 1 >= len(raw):
            out += char
            i += 1
            continue
        nxt = raw[i + 1 : i + 2]
        octal = re.match(rb"[0-7]{1,3}", raw[i + 1 : i + 4])
        if octal:
            out.append(int(octal.group(), 8) & 0xFF)
            i += 1 + len(octal.group())
        else:
            out += _ESCAPES.get(nxt, nxt)
            i += 2
    return bytes(out)


def _decode(data: bytes) -> str:
    if data.startswith(b"\xfe\xff"):
        return data[2:].decode("utf-16-be", errors="replace")
    return data.decode("latin-1")


def pdf_text(data: bytes) -> list[str]:
    """Read the text lines of an uncompressed PDF (ours, or any using Tj); [] if none."""
    lines = []
    for match in _TEXT_OP.finditer(data):
        literal, hexed = match.group(1), match.group(2)
        if literal is not None:
            lines.append(_decode(_unescape(literal)))
        else:
            digits = re.sub(rb"\s", b"", hexed or b"")
            lines.append(_decode(bytes.fromhex((digits + b"0" * (len(digits) % 2)).decode())))
    return lines


def is_pdf(data: bytes) -> bool:
    """Tell whether bytes look like a PDF file (the %PDF- header DocuSign checks)."""
    return data.startswith(b"%PDF-")
