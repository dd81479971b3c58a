"""Typed serving errors, mapped once to a gRPC status code and an HTTP status (as TF Serving does)."""

from __future__ import annotations

import grpc

# TF Serving's REST handler derives the HTTP status from the gRPC code (http_rest_api_handler.cc).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


# TF Serving cuts every status message to this many characters and appends "...TRUNCATED"
# (ToGRPCStatus, model_servers/grpc_status_util.cc): a name of 100k characters echoed back would
# otherwise exceed the client's 8 KiB metadata limit and arrive as a broken stream.
MESSAGE_LIMIT = 1024


def truncated(message: str) -> str:
    return message[:MESSAGE_LIMIT] + "...TRUNCATED" if len(message) > MESSAGE_LIMIT else message


class ServingError(Exception):
    """An error a client sees: `code` is the gRPC status, `message` the exact text (gRPC and
    REST alike), cut at MESSAGE_LIMIT as TF Serving does."""

    def __init__(self, code: grpc.StatusCode, message: str):
        message = truncated(message)
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)


def invalid_argument(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.NOT_FOUND, message)


def failed_precondition(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.FAILED_PRECONDITION, message)


def unavailable(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.UNAVAILABLE, message)


class StartupError(RuntimeError):
    """A server that cannot start (a port in use, a bad socket path or TLS file): one line at the CLI."""

    exit_code = 1
