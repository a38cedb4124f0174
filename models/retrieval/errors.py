"""Typed retrieval errors. Each carries the HTTP status, OpenAI error code and param the Ingress
maps to `{"error": {"message", "type", "param", "code"}}`.

Constructed with the message only, so they survive pickling through Ray handles unchanged.
"""

from __future__ import annotations

from models.protocol.errors import TandemError


class RetrievalError(TandemError):
    """Base of every error a retrieval client can cause; `message` says what to do about it."""

    code = "invalid_request"


class NotFoundError(RetrievalError):
    """A file, vector store or vector store file id that does not exist (404)."""

    status_code = 404
    code = "not_found"


class UnsupportedFileType(RetrievalError):
    """The file's type cannot be turned into text here (415)."""

    status_code = 415
    code = "unsupported_file"


class FileTooLarge(RetrievalError):
    """The upload is over RetrievalConfig.max_file_bytes (413)."""

    status_code = 413
    code = "file_too_large"


class BadFile(RetrievalError):
    """The file is empty or unreadable: binary garbage, a broken PDF, no text (400)."""

    status_code = 400
    code = "invalid_file"


class InvalidRequest(RetrievalError):
    """A parameter is out of range or malformed (400)."""

    status_code = 400
    code = "invalid_value"
