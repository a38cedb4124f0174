"""The base of every error a client can act on.

Each carries the HTTP status, the OpenAI error code and the offending parameter that the
Ingress turns into `{"error": {"message", "type", "param", "code"}}`. Subclasses set
`status_code` and `code`; they are built from the message (and param) only, so they pickle
through Ray handles unchanged.
"""

from __future__ import annotations


class TandemError(Exception):
    """An error whose `message` tells the client what to do about it."""

    status_code = 400
    code: str | None = None
    param: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        if param is not None:
            self.param = param

    def __reduce__(self):
        return (type(self), (self.message, self.param))
