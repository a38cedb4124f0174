"""Turn uploaded bytes into plain text: plain text, Markdown and PDF (pypdf)."""

from __future__ import annotations

import io
import logging
import os
import re
import unicodedata

from models.retrieval.errors import BadFile, UnsupportedFileType

TEXT_EXTENSIONS = (".txt", ".text", ".log", ".csv", ".json", ".rst")
MARKDOWN_EXTENSIONS = (".md", ".markdown")
PDF_EXTENSIONS = (".pdf",)
SUPPORTED_EXTENSIONS = TEXT_EXTENSIONS + MARKDOWN_EXTENSIONS + PDF_EXTENSIONS

_MIN_PRINTABLE_FRACTION = 0.95


def extract_text(filename: str, data: bytes) -> str:
    """The text of an uploaded file, chosen by its extension.

    Raises UnsupportedFileType (415) for other extensions and BadFile (400) when the file is
    empty, binary, a broken PDF, or holds no text.
    """
    ext = os.path.splitext(filename)[1].lower()
    if ext not in SUPPORTED_EXTENSIONS:
        shown = ext or "no extension"
        raise UnsupportedFileType(
            f"'{filename}' ({shown}) is not a supported file type; "
            f"supported: {', '.join(SUPPORTED_EXTENSIONS)}",
            param="file",
        )
    if not data:
        raise BadFile(f"'{filename}' is empty", param="file")
    if ext in PDF_EXTENSIONS:
        text = _pdf_text(filename, data)
    else:
        text = _decode_text(filename, data)
        if ext in MARKDOWN_EXTENSIONS:
            text = markdown_to_text(text)
    text = _normalise_whitespace(text)
    if not text:
        raise BadFile(f"'{filename}' contains no text", param="file")
    return text


def _decode_text(filename: str, data: bytes) -> str:
    """UTF-8 (with or without BOM), else Windows-1252; binary data is refused."""
    if b"\x00" in data:
        raise BadFile(f"'{filename}' looks binary (it contains NUL bytes), not text", param="file")
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            text = data.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    else:
        raise BadFile(f"'{filename}' is not UTF-8 or Windows-1252 text", param="file")
    if _printable_fraction(text) < _MIN_PRINTABLE_FRACTION:
        raise BadFile(
            f"'{filename}' does not look like text (too many control characters); "
            "upload .txt/.md as UTF-8 or a .pdf",
            param="file",
        )
    return text


def _printable_fraction(text: str) -> float:
    sample = text[:20000]
    if not sample:
        return 1.0
    ok = sum(1 for ch in sample if ch in "\n\r\t" or unicodedata.category(ch)[0] != "C")
    return ok / len(sample)


def _pdf_text(filename: str, data: bytes) -> str:
    if not data.lstrip()[:5] == b"%PDF-":
        raise BadFile(f"'{filename}' is not a PDF (no %PDF- header)", param="file")
    from pypdf import PdfReader

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # broken files are reported as BadFile
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise BadFile(f"'{filename}' is an encrypted PDF; upload it decrypted", param="file")
        pages = [page.extract_text() or "" for page in reader.pages]
    except BadFile:
        raise
    except Exception as exc:  # pypdf raises many kinds for damaged files
        raise BadFile(
            f"'{filename}' is a broken PDF that could not be read ({type(exc).__name__}: {exc})",
            param="file",
        ) from exc
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text:
        raise BadFile(
            f"'{filename}' has no extractable text (scanned pages would need OCR)", param="file"
        )
    return text


_MD_RULES = [
    (re.compile(r"^```[^\n]*$", re.M), ""),  # code fences; the code itself stays
    (re.compile(r"!\[([^\]]*)\]\([^)]*\)"), r"\1"),  # images -> alt text
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),  # links -> link text
    (re.compile(r"<[^>\n]+>"), ""),  # inline HTML tags
    (re.compile(r"^\s{0,3}#{1,6}\s*", re.M), ""),  # heading markers
    (re.compile(r"^\s{0,3}>\s?", re.M), ""),  # block quotes
    (re.compile(r"^\s*[-*+]\s+", re.M), "- "),  # bullets, normalised
    (re.compile(r"^\s*([-*_]\s*){3,}$", re.M), ""),  # horizontal rules
    (re.compile(r"(\*\*|__)(.+?)\1"), r"\2"),  # bold
    (re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?!\w)"), r"\1"),  # italic
    (re.compile(r"`([^`\n]+)`"), r"\1"),  # inline code
]


def markdown_to_text(markdown: str) -> str:
    """Markdown with its markup removed (headings, emphasis, links, fences); words kept."""
    text = markdown
    for pattern, repl in _MD_RULES:
        text = pattern.sub(repl, text)
    return text


def _normalise_whitespace(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t\f\v]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()
