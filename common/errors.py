"""The exception hierarchy shared by the worker and the client.

Neither grpc nor torch is imported here: the controller, the strategy and the
schedules raise these without any transport, and each edge maps them. `code` is the
name of the gRPC status an error travels as ("INVALID_ARGUMENT"); the worker's
`server/status.py` and the client turn names into grpc.StatusCode and back.
"""

from __future__ import annotations


class LrctlError(Exception):
    """Base class of every lrctl error; `code` names the gRPC status it travels as."""

    code: str = "UNKNOWN"


class InvalidArgumentError(LrctlError):
    """The request is malformed: a bad value, selector, page token or step."""

    code = "INVALID_ARGUMENT"


class NotFoundError(LrctlError):
    """A name or selector matches no parameter."""

    code = "NOT_FOUND"


class FailedPreconditionError(LrctlError):
    """The request is well formed but the worker's state does not allow it."""

    code = "FAILED_PRECONDITION"


class PermissionDeniedError(LrctlError):
    """The caller is known but may not do this."""

    code = "PERMISSION_DENIED"


class UnauthenticatedError(LrctlError):
    """The caller did not prove who it is."""

    code = "UNAUTHENTICATED"


class DeadlineExceededError(LrctlError):
    """No answer in time; for a waiting Set, the change was withdrawn, not applied."""

    code = "DEADLINE_EXCEEDED"


class UnavailableError(LrctlError):
    """The worker cannot be reached (not running, wrong address, shutting down)."""

    code = "UNAVAILABLE"


class AbortedError(LrctlError):
    """A concurrent change interrupted a multi-call read; start it again."""

    code = "ABORTED"


class ResourceExhaustedError(LrctlError):
    """The worker is busy or the message is too large."""

    code = "RESOURCE_EXHAUSTED"


class DataLossError(LrctlError):
    """The change WAS applied, but its record could not be written to the audit log."""

    code = "DATA_LOSS"


class OutOfRangeError(LrctlError):
    """A position that is not (or no longer) there: e.g. a WatchMetrics from_step whose
    events have left the worker's ring."""

    code = "OUT_OF_RANGE"


class InternalError(LrctlError):
    """A bug on the worker side; the request failed, training goes on."""

    code = "INTERNAL"


ERRORS_BY_CODE: dict[str, type[LrctlError]] = {
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
        DataLossError,
        OutOfRangeError,
        InternalError,
    )
}
