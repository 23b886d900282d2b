"""The client's view of lrctl's errors: the shared hierarchy (lrctl.common.errors),
and the one translation from a gRPC status back to it."""

from __future__ import annotations

import grpc

from lrctl.common.errors import (
    ERRORS_BY_CODE,
    AbortedError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LrctlError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)

__all__ = [
    "AbortedError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "LrctlError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "TLSError",
    "UnauthenticatedError",
    "UnavailableError",
    "error_for_status",
]


class TLSError(UnavailableError):
    """The connection failed on transport security (a TLS handshake, or a plaintext
    client at a TLS worker); the message says which side to fix. Status UNAVAILABLE."""


def error_for_status(code: grpc.StatusCode, message: str) -> LrctlError:
    """The lrctl exception for a gRPC status code and message."""
    cls = ERRORS_BY_CODE.get(code.name, LrctlError)
    err = cls(message)
    if cls is LrctlError:
        err.code = code.name
    return err
