"""Errors with the gRPC status each maps to; mapped to statuses in one place (the servicers)."""

from __future__ import annotations

import grpc


class ApdispatchError(Exception):
    """Base class; ``code`` is the gRPC status a server answers with."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, request_id: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id


class InvalidRequestError(ApdispatchError):
    """Bad input; the message names the offending field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str, *, request_id: str = "") -> None:
        super().__init__(f"{field}: {problem}", request_id=request_id)
        self.field = field


class NotFoundError(ApdispatchError):
    """Unknown task or variant."""

    code = grpc.StatusCode.NOT_FOUND


class RejectedError(ApdispatchError):
    """No target can meet the SLA; answered at once."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(ApdispatchError):
    """The AP or the chosen worker could not be reached, or failed."""

    code = grpc.StatusCode.UNAVAILABLE


_BY_CODE: dict[grpc.StatusCode, type[ApdispatchError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RejectedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
}


def from_status(code: grpc.StatusCode, message: str, *, request_id: str = "") -> ApdispatchError:
    """The client-side exception for a status a server answered with."""
    cls = _BY_CODE.get(code, ApdispatchError)
    if cls is InvalidRequestError:
        field, _, problem = message.partition(": ")
        return InvalidRequestError(field, problem or message, request_id=request_id)
    err = cls(message, request_id=request_id)
    if cls is ApdispatchError:
        err.code = code
    return err
