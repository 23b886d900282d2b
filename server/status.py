"""The one place where errors become gRPC status codes.

Handlers raise `lrctl.common.errors.LrctlError` subclasses; this interceptor aborts the
RPC with the error's code and message. Anything else is a bug: it is logged with its
traceback on the worker and answered as INTERNAL, and training goes on.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import grpc

from lrctl.common.errors import InvalidArgumentError, LrctlError

log = logging.getLogger("lrctl.server")

# Status messages travel in HTTP/2 trailers, which gRPC caps (16 KiB by default); an
# echoed oversized value must not turn a clear error into a transport failure.
_MAX_MESSAGE = 2000


def _status(exc: LrctlError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, exc.code, grpc.StatusCode.UNKNOWN)


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 20] + " ... (message cut)"
    context.abort(code, message)


class _Undecodable:
    """What a request that does not decode becomes: the handler answers INVALID_ARGUMENT
    (grpc itself would answer INTERNAL, which means a bug of ours)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # malformed protobuf, invalid UTF-8 in a string field
            return _Undecodable(exc)

    return decode


def _refuse_undecodable(request: Any, method: str) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgumentError(f"the request to {method} could not be decoded: {request.error}")


def _guard(behavior: Callable[[Any, grpc.ServicerContext], Any], method: str) -> Callable:
    def guarded(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            _refuse_undecodable(request, method)
            return behavior(request, context)
        except LrctlError as exc:
            _abort(context, _status(exc), str(exc))
        except Exception as exc:
            if context.code() is not None:  # context.abort() already chose the status
                raise
            log.exception("lrctl: handler %s failed", method)
            _abort(context, grpc.StatusCode.INTERNAL, f"internal error in {method}: {exc!r}")

    return guarded


def _guard_stream(behavior: Callable[[Any, grpc.ServicerContext], Any], method: str) -> Callable:
    def guarded(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            _refuse_undecodable(request, method)
            yield from behavior(request, context)
        except LrctlError as exc:
            _abort(context, _status(exc), str(exc))
        except Exception as exc:
            if context.code() is not None:
                raise
            log.exception("lrctl: handler %s failed", method)
            _abort(context, grpc.StatusCode.INTERNAL, f"internal error in {method}: {exc!r}")

    return guarded


class ErrorStatusInterceptor(grpc.ServerInterceptor):
    """Maps exceptions raised by unary-unary and unary-stream handlers to status codes."""

    def intercept_service(
        self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _guard(handler.unary_unary, method),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _guard_stream(handler.unary_stream, method),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler
