"""The one place where errors become gRPC status codes.

Handlers raise `lrctl.common.errors.LrctlError` subclasses; this interceptor (a
grpc.aio one, for coroutine and synchronous handlers alike) aborts the RPC with the
error's code and message. Anything else is a bug: it is logged with its
traceback on the worker and answered as INTERNAL, and training goes on.

Being the one place that knows each call's status, it also counts the calls by method
and status code (RequestCounts: lrctl_requests_total of the metrics endpoint).
"""

from __future__ import annotations

import inspect
import logging
import threading
from typing import Any, Callable

import grpc

from lrctl.common.errors import InvalidArgumentError, LrctlError

log = logging.getLogger("lrctl.server")

# Status messages travel in HTTP/2 trailers, which gRPC caps (16 KiB by default); an
# echoed oversized value must not turn a clear error into a transport failure.
_MAX_MESSAGE = 2000


class RequestCounts:
    """Calls answered by the handlers the interceptor wraps, by (method, status code
    name); "OK" for a call that returned. Method names come from registered handlers
    and codes from grpc.StatusCode, so the set of keys stays small."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # handlers finish on the event loop and pool threads
        self._counts: dict[tuple[str, str], int] = {}

    def add(self, method: str, code: str) -> None:
        key = (method.lstrip("/"), code)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    def snapshot(self) -> dict[tuple[str, str], int]:
        """A copy: (method, code) -> calls."""
        with self._lock:
            return dict(self._counts)


def status_code(exc: LrctlError) -> grpc.StatusCode:
    """The gRPC status code of one of lrctl's errors (the one mapping, for both modes)."""
    return getattr(grpc.StatusCode, exc.code, grpc.StatusCode.UNKNOWN)


class _Undecodable:
    """What a request that does not decode becomes: the handler answers INVALID_ARGUMENT
    (grpc itself would answer INTERNAL, which means a bug of ours)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def lenient_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserialize` that returns a marker instead of raising on bytes it cannot decode
    (refuse_undecodable turns it into INVALID_ARGUMENT naming the method)."""
    if deserialize is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # malformed protobuf, invalid UTF-8 in a string field
            return _Undecodable(exc)

    return decode


def refuse_undecodable(request: Any, method: str) -> None:
    """InvalidArgumentError for a request lenient_deserializer could not decode."""
    if isinstance(request, _Undecodable):
        raise InvalidArgumentError(f"the request to {method} could not be decoded: {request.error}")


def failure_status(exc: Exception, method: str, counts: RequestCounts) -> tuple[grpc.StatusCode, str]:
    """The status an exception from a handler becomes, counted under its code. Raises
    `exc` again when it is not ours to map (an abort that already chose its status)."""
    if isinstance(exc, LrctlError):
        message = str(exc)
        if len(message) > _MAX_MESSAGE:
            message = message[: _MAX_MESSAGE - 20] + " ... (message cut)"
        code = status_code(exc)
    elif isinstance(exc, grpc.aio.AbortError):
        raise exc
    else:
        log.error("lrctl: handler %s failed", method, exc_info=exc)
        code, message = grpc.StatusCode.INTERNAL, f"internal error in {method}: {exc!r}"
    counts.add(method, code.name)
    return code, message


def _guard(behavior: Callable[[Any, Any], Any], method: str, counts: RequestCounts) -> Callable:
    """A synchronous handler (run on the server's thread pool)."""

    def guarded(request: Any, context: Any) -> Any:
        try:
            refuse_undecodable(request, method)
            response = behavior(request, context)
        except Exception as exc:
            context.abort(*failure_status(exc, method, counts))
        counts.add(method, "OK")
        return response

    return guarded


def _guard_stream(behavior: Callable[[Any, Any], Any], method: str, counts: RequestCounts) -> Callable:
    """A synchronous generator handler."""

    def guarded(request: Any, context: Any) -> Any:
        try:
            refuse_undecodable(request, method)
            yield from behavior(request, context)
        except Exception as exc:
            context.abort(*failure_status(exc, method, counts))
        counts.add(method, "OK")

    return guarded


def _guard_async(behavior: Callable[[Any, Any], Any], method: str, counts: RequestCounts) -> Callable:
    """A coroutine handler (run on the event loop)."""

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            refuse_undecodable(request, method)
            response = await behavior(request, context)
        except Exception as exc:  # asyncio.CancelledError is a BaseException: it passes
            await context.abort(*failure_status(exc, method, counts))
        counts.add(method, "OK")
        return response

    return guarded


def _guard_async_stream(behavior: Callable[[Any, Any], Any], method: str, counts: RequestCounts) -> Callable:
    """An async generator handler."""

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            refuse_undecodable(request, method)
            async for response in behavior(request, context):
                yield response
        except Exception as exc:
            await context.abort(*failure_status(exc, method, counts))
        counts.add(method, "OK")

    return guarded


async def _decoded(requests: Any, method: str) -> Any:
    """A request stream whose undecodable message raises INVALID_ARGUMENT."""
    async for request in requests:
        refuse_undecodable(request, method)
        yield request


def _guard_async_bidi(behavior: Callable[[Any, Any], Any], method: str, counts: RequestCounts) -> Callable:
    """An async generator handler of a request stream (Lockstep)."""
    stream = _guard_async_stream(behavior, method, counts)

    async def guarded(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        async for response in stream(_decoded(requests, method), context):
            yield response

    return guarded


def _is_async(behavior: Any) -> bool:
    return inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)


class ErrorStatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions raised by unary-unary, unary-stream and async-generator
    stream-stream handlers to status codes.

    Wraps synchronous handlers (which grpc.aio runs on its thread pool) and coroutine or
    async-generator handlers (run on the event loop) alike, keeping each what it was.
    """

    def __init__(self, counts: RequestCounts | None = None) -> None:
        self.counts = RequestCounts() if counts is None else counts
        # Handlers are the same objects call after call: each is wrapped once (every
        # call's Python runs in the training process, under its GIL).
        self._wrapped: dict[int, tuple[grpc.RpcMethodHandler, str, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if handler.request_streaming and not (
            handler.stream_stream is not None and inspect.isasyncgenfunction(handler.stream_stream)
        ):
            return handler
        method = handler_call_details.method
        hit = self._wrapped.get(id(handler))
        if hit is not None and hit[0] is handler and hit[1] == method:
            return hit[2]
        wrapped = self._wrap(handler, method)
        if len(self._wrapped) >= 1024:  # handlers made per call (a generic handler may)
            self._wrapped.clear()
        self._wrapped[id(handler)] = (handler, method, wrapped)  # holding it keeps its id unique
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _guard_async_bidi(handler.stream_stream, method, self.counts),
                request_deserializer=lenient_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_unary is not None:
            behavior = handler.unary_unary
            return grpc.unary_unary_rpc_method_handler(
                (_guard_async if _is_async(behavior) else _guard)(behavior, method, self.counts),
                request_deserializer=lenient_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            behavior = handler.unary_stream
            if inspect.isasyncgenfunction(behavior):
                guard = _guard_async_stream
            elif inspect.iscoroutinefunction(behavior):  # writes with context.write()
                guard = _guard_async
            else:
                guard = _guard_stream
            return grpc.unary_stream_rpc_method_handler(
                guard(behavior, method, self.counts),
                request_deserializer=lenient_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler
