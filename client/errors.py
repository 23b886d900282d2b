"""The exception hierarchy shared by the worker and the client.

The worker raises these; one interceptor turns them into gRPC status codes. The client
turns status codes back into the same classes, so both sides speak one vocabulary.
"""

from __future__ import annotations

import grpc


class LrctlError(Exception):
    """Base class of every lrctl error; `code` is the gRPC status it travels as."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(LrctlError):
    """The request is malformed: a bad value, selector, page token or step."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(LrctlError):
    """A name or selector matches no parameter."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(LrctlError):
    """The request is well formed but the worker's state does not allow it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDeniedError(LrctlError):
    """The caller is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class UnauthenticatedError(LrctlError):
    """The caller did not prove who it is."""

    code = grpc.StatusCode.UNAUTHENTICATED


class DeadlineExceededError(LrctlError):
    """No answer in time; for a waiting Set, the change was withdrawn, not applied."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnavailableError(LrctlError):
    """The worker cannot be reached (not running, wrong address, shutting down)."""

    code = grpc.StatusCode.UNAVAILABLE


class AbortedError(LrctlError):
    """A concurrent change interrupted a multi-call read; start it again."""

    code = grpc.StatusCode.ABORTED


class ResourceExhaustedError(LrctlError):
    """The worker is busy or the message is too large."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class InternalError(LrctlError):
    """A bug on the worker side; the request failed, training goes on."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[LrctlError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        FailedPreconditionError,
        PermissionDeniedError,
        UnauthenticatedError,
        DeadlineExceededError,
        UnavailableError,
        AbortedError,
        ResourceExhaustedError,
        InternalError,
    )
}


def error_for_status(code: grpc.StatusCode, message: str) -> LrctlError:
    """The lrctl exception for a gRPC status code and message."""
    cls = _BY_CODE.get(code, LrctlError)
    err = cls(message)
    if cls is LrctlError:
        err.code = code
    return err
