"""A prototype of a "forwarding sidecar" server, for benchmark 3 (bench_server_load.py).

The problem it probes: at 100 requests/s, lrctl's in-process gRPC server costs a training
step ~7.5%, and ~85% of the server's Python time under the training process's GIL is
grpc's own serving machinery (completion-queue polling, pool hand-offs), not lrctl's
handlers. Here a child process owns the gRPC server; the training process keeps only
lrctl's handler logic, fed over a local socket:

    client --gRPC--> sidecar (this file run as a script; grpc + health, no torch, no lrctl)
                       | request bytes, method, deadline, peer, lrctl-user   (one frame)
                       v
    training process: one dispatcher thread -> an event loop thread running the same
                      LearningRateControlService handlers (coroutines), wrapped by the
                      same ErrorStatusInterceptor as the real server -> (status code,
                      details, response bytes)   (one frame back)

Results: bench/README.md, section 3 (the "forward" rows of bench_server_load.py).

Bench-only: named so that tests/test_bench_quick.py does not run it as a benchmark. It
leaves out reflection, TLS/auth hooks and graceful draining (close() answers requests
still in flight with UNAVAILABLE), and forwards only the lrctl-user metadata.

Frames on the socket: a 4-byte big-endian length, then
  sidecar -> trainer  _REQ (kind R or C, id, remaining deadline s or -1, lengths) +
                      method + user + peer + request bytes; C (cancel) has no strings
  trainer -> sidecar  _REP (id, status code, details length) + details + response bytes
  the sidecar's first frame is its bound port (_PORT).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent import futures
from typing import Any, Callable

import grpc

SERVICE = "lrctl.v1.LearningRateControl"
_LEN = struct.Struct("!I")
_REQ = struct.Struct("!cIdHHH")  # kind, id, remaining deadline (-1: none), len method/user/peer
_REP = struct.Struct("!IBI")  # id, status code, details length
_PORT = struct.Struct("!H")
_NO_DEADLINE_S = 1e7
_STATUS_BY_CODE = {s.value[0]: s for s in grpc.StatusCode}
log = logging.getLogger("lrctl.forwarding")


def _send(sock: socket.socket, lock: threading.Lock, *parts: bytes) -> None:
    payload = b"".join(parts)
    with lock:  # several threads write to one stream: a frame must go out whole
        sock.sendall(_LEN.pack(len(payload)) + payload)


def _recv(rfile: Any) -> bytes | None:
    """One frame from a buffered reader, or None at end of stream."""
    head = rfile.read(_LEN.size)
    if len(head) < _LEN.size:
        return None
    (n,) = _LEN.unpack(head)
    body = rfile.read(n)
    return body if len(body) == n else None


# --- the training process's side ----------------------------------------------------

class _Abort(Exception):
    """What _Context.abort raises, as grpc's context.abort does (handlers do not go on)."""


class _Context:
    """What service.py and status.py use of a grpc.ServicerContext, and nothing more."""

    def __init__(self, peer: str, user: str, deadline: float | None) -> None:
        self._peer, self._user, self._deadline = peer, user, deadline
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._callbacks: list[Callable[[], None]] = []
        self._cancelled = False

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("lrctl-user", self._user),) if self._user else ()

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def is_active(self) -> bool:
        return not self._cancelled and (self._deadline is None or time.monotonic() < self._deadline)

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self._callbacks.append(callback)
        return True

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details
        raise _Abort(details)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def terminate(self, cancelled: bool = False) -> None:
        """The RPC is over (answered, or cancelled by the client): run the callbacks once,
        as grpc does when an RPC terminates."""
        self._cancelled = self._cancelled or cancelled
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("lrctl: RPC termination callback failed")


class ForwardingServed:
    """lrctl attached with serve=False, served by a sidecar process on a free loopback
    port; this process runs only the handlers (the bench's "forward" server kind)."""

    def __init__(self, model: Any, opt: Any) -> None:
        from lrctl.server import attach  # imports torch: the training side only
        from lrctl.server.service import LearningRateControlService
        from lrctl.server.status import ErrorStatusInterceptor
        from lrctl.v1 import lrctl_pb2_grpc as pb_grpc

        self._ctl = attach(model, opt, serve=False)
        service = LearningRateControlService(self._ctl.controller)

        # The exact method handlers the real server would run: the generated registration
        # (same (de)serializers) seen through status.py's interceptor (same error mapping).
        class Capture:
            def add_generic_rpc_handlers(self, handlers: Any) -> None:
                pass

            def add_registered_method_handlers(self, name: str, handlers: dict[str, Any]) -> None:
                self.handlers = {f"/{name}/{m}": h for m, h in handlers.items()}

        class Details:  # a grpc.HandlerCallDetails
            def __init__(self, method: str) -> None:
                self.method, self.invocation_metadata = method, ()

        capture = Capture()
        pb_grpc.add_LearningRateControlServicer_to_server(service, capture)
        status = ErrorStatusInterceptor()
        self._service = service

        # The handlers are coroutines (as in the real server): they run on an event loop
        # thread; the dispatcher hands each request over and goes back to reading.
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="lrctl-fwd-loop", daemon=True)
        self._loop_thread.start()

        async def intercepted() -> dict[str, Any]:
            async def found(handler: Any) -> Any:
                return handler

            return {m: await status.intercept_service(lambda _d, h=h: found(h), Details(m))
                    for m, h in capture.handlers.items()}

        self._handlers = asyncio.run_coroutine_threadsafe(intercepted(), self._loop).result()
        self._calls: dict[int, futures.Future[None]] = {}  # in flight, to cancel
        self._sock, child = socket.socketpair()
        self._wlock = threading.Lock()
        try:
            # A plain subprocess, not multiprocessing: spawn would re-import the user's
            # __main__ (the training script) in the child.
            self._proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--fd", str(child.fileno())],
                pass_fds=[child.fileno()])
            child.close()
            self._rfile = self._sock.makefile("rb")
            first = _recv(self._rfile)
            if first is None:
                raise RuntimeError(f"forwarding sidecar exited (code {self._proc.wait()})")
        except BaseException:
            self._ctl.close()
            self._sock.close()
            raise
        self.address = f"127.0.0.1:{_PORT.unpack(first)[0]}"
        self._thread = threading.Thread(target=self._dispatch, name="lrctl-fwd", daemon=True)
        self._thread.start()

    def _dispatch(self) -> None:
        rfile = self._rfile
        while (frame := _recv(rfile)) is not None:
            kind, rid, remaining, lm, lu, lp = _REQ.unpack_from(frame)
            if kind == b"C":  # the client left: cancel its call (a waiting Set withdraws)
                call = self._calls.get(rid)
                if call is not None:
                    call.cancel()
                continue
            o = _REQ.size
            method = frame[o:o + lm].decode()
            user = frame[o + lm:o + lm + lu].decode()
            peer = frame[o + lm + lu:o + lm + lu + lp].decode()
            body = frame[o + lm + lu + lp:]
            ctx = _Context(peer, user, None if remaining < 0 else time.monotonic() + remaining)
            handler = self._handlers.get(method)
            if handler is None:  # the sidecar forwards only this service's methods
                self._reply(rid, grpc.StatusCode.UNIMPLEMENTED, f"method {method} not found")
                continue
            try:
                request = handler.request_deserializer(body)
            except Exception as exc:
                self._reply(rid, grpc.StatusCode.INTERNAL, f"cannot parse the request: {exc!r}")
                continue
            self._calls[rid] = asyncio.run_coroutine_threadsafe(self._call(rid, handler, request, ctx), self._loop)

    async def _call(self, rid: int, handler: Any, request: Any, ctx: _Context) -> None:
        try:
            response = handler.response_serializer(await handler.unary_unary(request, ctx))
            self._reply(rid, grpc.StatusCode.OK, "", response)
        except asyncio.CancelledError:
            self._reply(rid, grpc.StatusCode.CANCELLED, "cancelled")
        except Exception as exc:  # _Abort, or a bug past status.py's guard (grpc: UNKNOWN)
            if ctx.code() is not None:
                self._reply(rid, ctx.code(), ctx.details())
            else:
                self._reply(rid, grpc.StatusCode.UNKNOWN, f"Exception calling application: {exc!r}")
        finally:
            self._calls.pop(rid, None)
            ctx.terminate()

    def _reply(self, rid: int, code: grpc.StatusCode, details: str, body: bytes = b"") -> None:
        d = details.encode()
        try:
            _send(self._sock, self._wlock, _REP.pack(rid, code.value[0], len(d)), d, body)
        except OSError:
            pass  # the sidecar is gone (closing): nobody to answer

    def sidecar_cpu(self) -> float:
        """CPU seconds the sidecar process has used so far (Linux /proc; 0 elsewhere)."""
        try:
            with open(f"/proc/{self._proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return 0.0

    def close(self, grace: float = 2.0) -> None:
        """Fail pending changes, then end the stream: the sidecar answers calls still in
        flight UNAVAILABLE, stops its server and exits, which ends the dispatcher. (No
        draining: `grace` only bounds the wait for the sidecar to exit.)"""
        self._ctl.close()
        try:
            self._sock.shutdown(socket.SHUT_WR)
            self._proc.wait(grace + 5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        except OSError:
            pass
        finally:
            self._thread.join(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(5)
            self._service.close()
            self._rfile.close()
            self._sock.close()


# --- the sidecar process --------------------------------------------------------------

class _Forwarder(grpc.GenericRpcHandler):
    """Every lrctl method, as raw bytes: one frame out, wait for the matching reply."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock, self._wlock = sock, threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, list[Any]] = {}  # id -> [Event, reply frame or None]
        self._closed = False
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        if not method.startswith(f"/{SERVICE}/"):
            return None  # health is served here; anything else: UNIMPLEMENTED
        handler = self._handlers.get(method)
        if handler is None:  # no (de)serializers: the handler gets and returns bytes
            name = method.encode()
            handler = self._handlers[method] = grpc.unary_unary_rpc_method_handler(
                lambda request, context: self._forward(name, request, context))
        return handler

    def _forward(self, method: bytes, request: bytes, context: grpc.ServicerContext) -> bytes:
        rid, slot = next(self._ids), [threading.Event(), None]
        self._pending[rid] = slot
        user = next((str(v) for k, v in context.invocation_metadata() if k == "lrctl-user"), "")
        user_b, peer = user.encode(), context.peer().encode()
        remaining = context.time_remaining()
        if remaining is not None and remaining > _NO_DEADLINE_S:
            remaining = None  # grpc's sync server reports "no deadline" as ~infinite time left
        try:
            if self._closed:
                raise OSError
            _send(self._sock, self._wlock,
                  _REQ.pack(b"R", rid, -1.0 if remaining is None else remaining, len(method), len(user_b), len(peer)),
                  method, user_b, peer, request)
            # A client that cancels (or whose deadline passes) before the answer: tell the
            # trainer, so a waiting Set withdraws its change, as in the in-process server.
            context.add_callback(lambda: slot[1] is None and self._send_cancel(rid))
            slot[0].wait(None if remaining is None else remaining + 1.0)
        except OSError:
            pass
        finally:
            self._pending.pop(rid, None)
        if slot[1] is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the training process is not answering")
        r, code, ld = _REP.unpack_from(slot[1])
        if code != 0:
            context.abort(_STATUS_BY_CODE[code], slot[1][_REP.size:_REP.size + ld].decode())
        return slot[1][_REP.size + ld:]

    def _send_cancel(self, rid: int) -> None:
        try:
            _send(self._sock, self._wlock, _REQ.pack(b"C", rid, -1.0, 0, 0, 0))
        except OSError:
            pass

    def read_replies(self) -> None:
        """Until the trainer closes its end (close(), or it died): hand out replies."""
        rfile = self._sock.makefile("rb")
        while (frame := _recv(rfile)) is not None:
            slot = self._pending.get(_REP.unpack_from(frame)[0])
            if slot is not None:
                slot[1] = frame
                slot[0].set()
        self._closed = True
        for slot in list(self._pending.values()):
            slot[0].set()  # unanswered: UNAVAILABLE


def sidecar_main(fd: int) -> None:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    sock = socket.socket(fileno=fd)
    forwarder = _Forwarder(sock)
    # As server/factory.py builds it: a pool of 8, at most 64 calls, no port sharing.
    server = grpc.server(futures.ThreadPoolExecutor(8, thread_name_prefix="fwd-grpc"),
                         handlers=[forwarder], maximum_concurrent_rpcs=64,
                         options=[("grpc.so_reuseport", 0)])
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    _send(sock, threading.Lock(), _PORT.pack(port))
    forwarder.read_replies()  # returns when the training process closes the socket or dies
    health_servicer.enter_graceful_shutdown()
    server.stop(1.0).wait()


if __name__ == "__main__":
    if sys.argv[1:2] != ["--fd"] or len(sys.argv) != 3:
        sys.exit("usage: forwarding_proto.py --fd N  (started by ForwardingServed)")
    sidecar_main(int(sys.argv[2]))
