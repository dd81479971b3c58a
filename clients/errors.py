"""The one error type clients raise: what the server (or the network) said, in one line."""

from __future__ import annotations


class ClientError(Exception):
    """A failed call. `code` is the gRPC status name (REST statuses are mapped back to it)."""

    exit_code = 1  # the CLI exits with this after printing the message

    def __init__(self, message: str, code: str = "UNKNOWN"):
        super().__init__(message)
        self.code = code


HTTP_TO_CODE = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED",
                501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED", 500: "INTERNAL"}
