"""One error hierarchy for the AP, the workers and the SDK.

Each class carries the gRPC status it maps to (``code``); a server turns them
into statuses in one place, its servicer, and the SDK turns statuses back into
them (:func:`from_status`).
"""

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
    """Bad input; the message names the offending field (``field: problem``, or the
    problem alone when it names what it is about itself)."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str, *, request_id: str = "") -> None:
        super().__init__(f"{field}: {problem}" if field else problem, request_id=request_id)
        self.field = field


class InvalidInputError(InvalidRequestError):
    """An input a worker's model cannot run; the message, worded as Triton words it,
    names the input and the model."""

    def __init__(self, message: str, *, request_id: str = "") -> None:
        super().__init__("", message, request_id=request_id)


class NotFoundError(ApdispatchError):
    """Unknown task, variant or model."""

    code = grpc.StatusCode.NOT_FOUND


class RejectedError(ApdispatchError):
    """No target can meet the SLA; answered at once."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(ApdispatchError):
    """The AP or the chosen worker could not be reached, or failed."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(ApdispatchError):
    """The deadline passed before the request could run."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED

    def __init__(
        self, message: str = "deadline exceeded before the request got a slot", *, request_id: str = ""
    ) -> None:
        super().__init__(message, request_id=request_id)


class UnauthenticatedError(ApdispatchError):
    """No credential, or one the AP does not know."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(ApdispatchError):
    """A known caller asking for what its credential does not allow."""

    code = grpc.StatusCode.PERMISSION_DENIED


_BY_CODE: dict[grpc.StatusCode, type[ApdispatchError]] = {
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RejectedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def from_status(code: grpc.StatusCode, message: str, *, request_id: str = "") -> ApdispatchError:
    """The client-side exception for a status a server answered with."""
    cls = _BY_CODE.get(code, ApdispatchError)
    if cls is InvalidRequestError:
        field, sep, problem = message.partition(": ")
        if not sep:
            field, problem = "", message
        return InvalidRequestError(field, problem, request_id=request_id)
    err = cls(message, request_id=request_id)
    if cls is ApdispatchError:
        err.code = code
    return err
