"""attach(serving="process"): the training process's end of a serving process.

The serving process (lrctl.server.serving_main, started with subprocess and
sys.executable, never fork: torch and CUDA processes must not fork) owns the gRPC
server. This module starts it, hands it the configuration, and answers the calls it
forwards (lrctl.server.serving_wire) with the very handlers the in-process server runs:
LearningRateControlService behind status.py's ErrorStatusInterceptor, as coroutines on
an event loop thread of this process. So every guarantee of the in-process server
holds as is: changes are queued and applied by the same controller, a waiting Set is
acknowledged with its step, a caller that goes away withdraws its change, and Lockstep
holds in this process's step hook. Writes mostly arrive pre-planned (the serving process
resolved, checked and planned them from its snapshot: lrctl.server.serving_writes); the
same handler code queues them (LearningRateControlService.submit_planned), with the
live-state checks only while the config version (and the count of checkpoint loads)
is the planned one, planning them again itself otherwise. Most Sets do not come here at
all: one that does not wait and is due at the next boundary is queued by the serving
process itself, in shared memory, and taken into the controller's queue by the step
hook (lrctl.server.posted_writes: no wakeup of this process per Set).

Lifecycle: close() (LRControl.close, after the controller failed what was queued) asks
the serving process to drain for `grace` s and waits for it to exit. If the serving
process dies, this process logs an error once and trains on unserved (never hangs);
if this process dies, the serving process sees its link end and exits.
"""

from __future__ import annotations

import asyncio
import logging
import marshal
import mmap
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import types
from typing import Any, Optional

import grpc

from lrctl.server import serving_wire as wire
from lrctl.server.factory import start_event_loop, stop_event_loop
from lrctl.server.posted_writes import PostedRing
from lrctl.server.status import ErrorStatusInterceptor, RequestCounts, failure_status, status_code
from lrctl.server.watch_feed import WatchFeed
from lrctl.server.tls import ServerTLS
from lrctl.server.planned_wire import planned_from_wire, planned_waits
from lrctl.v1 import lrctl_pb2_grpc as pb_grpc

log = logging.getLogger("lrctl.server")
ENV = "LRCTL_SERVING"
MODES = ("inprocess", "process")
_START_TIMEOUT_S = 120.0  # importing grpc on a loaded 2-core machine can take a while
# How often the published step and version are checked against the controller's (a
# version changed between steps is seen within this; a checkpoint load publishes at once).
_CHECK_S = 0.1
# How long after the serving process last asked for a read snapshot each new version's
# snapshot is sent to it unasked.
_PUSH_S = 2.0
# How often the parameters' requires_grad flags are compared with those of the read
# snapshot's static part (a job that unfreezes layers: reads show it within this).
_GRADS_S = 1.0
_FEED_BUFFER = 4 * 1024 * 1024
# Jobs of at most this many names get each new version's read snapshot written by the
# thread that applied it (_write_snapshot); bigger ones from the link thread.
_HERE_NAMES = 4096


def serving_mode(value: str | None) -> str:
    """attach's `serving`, or $LRCTL_SERVING, or "inprocess"; ValueError naming a bad one."""
    if value is None:
        value = os.environ.get(ENV) or "inprocess"
    if value not in MODES:
        raise ValueError(f"serving {value!r} is not one of {', '.join(map(repr, MODES))}"
                         f" (attach(serving=...) or ${ENV})")
    return value


class _Abort(grpc.aio.AbortError):
    """What _Context.abort raises, as grpc.aio's does."""


class _Context:
    """What service.py and status.py use of a grpc.aio.ServicerContext, for a forwarded call."""

    def __init__(self, link: "ServingProcess", cid: int, metadata: tuple, peer: str, remaining: float) -> None:
        self._link, self._cid = link, cid
        self._metadata, self._peer = metadata, peer
        self._deadline = None if remaining < 0 else time.monotonic() + remaining
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def invocation_metadata(self) -> tuple:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def send_initial_metadata(self, metadata: Any) -> None:
        self._link._send((wire.INITIAL_METADATA, self._cid, tuple((str(k), v) for k, v in metadata)))

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self.code, self.details = code, details
        raise _Abort(details)


class _Capture:
    """A stand-in server that keeps the generated registration's method handlers."""

    handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, name: str, handlers: dict[str, Any]) -> None:
        self.handlers = {f"/{name}/{m}": h for m, h in handlers.items()}


class _Details:  # a grpc.HandlerCallDetails
    def __init__(self, method: str) -> None:
        self.method, self.invocation_metadata = method, ()


class _Counts(RequestCounts):
    """The calls this process answered, plus those its serving process answered itself
    (reads, writes, WatchMetrics; counted in the shared memory): lrctl_requests_total
    sees them all."""

    def __init__(self) -> None:
        super().__init__()
        self.shared: Any = None
        self._last: dict[tuple[str, str], int] = {}

    def answered_there(self) -> dict[tuple[str, str], int]:
        shared = self.shared
        if shared is not None:
            try:
                self._last = wire.read_answered(shared)
            except ValueError:  # closed: the last counts read stay
                pass
        return self._last

    def forwarded(self) -> dict[tuple[str, str], int]:
        """Only the calls this process answered."""
        return super().snapshot()

    def snapshot(self) -> dict[tuple[str, str], int]:
        out = super().snapshot()
        for key, n in self.answered_there().items():
            out[key] = out.get(key, 0) + n
        return out


class ServingProcess:
    """A started serving process and this process's answering end; the interface of
    factory.BuiltServer that LRControl uses (address, port, tls, requests, stop)."""

    def __init__(self, service: Any, *, address: str, insecure: bool = False, tokens: Any = None,
                 tls: Optional[ServerTLS] = None, max_workers: int = 8) -> None:
        self.tls = tls
        self.requests = _Counts()
        self._service = service
        self._calls: dict[int, tuple[asyncio.Task, Optional[asyncio.Queue]]] = {}
        self._closing = False
        self._stopped = False
        self._link: wire.FrameProtocol | None = None
        self._static_sent = False  # read snapshots: the static part went out
        self._grads = service._controller.grad_flags()  # ... with these requires_grad flags
        self._grads_checked = 0.0
        self._book_sent = 1  # ... and the schedules before this id (0, constant, is known)
        self._sent_stamp = -1  # ... and the version stamp (serving_wire.stamp) of the last one sent
        # Until when a new version's snapshot is sent unasked (the serving process asked
        # for one lately: it answers reads and plans writes from it).
        self._push_until = 0.0
        self._published_stamp = -1
        # Read snapshots sent over the link, and written into the shared memory by the
        # thread that applied a change (_write_snapshot): tests and benchmarks.
        self.snapshots_sent = self.snapshots_written = 0
        capture = _Capture()
        pb_grpc.add_LearningRateControlServicer_to_server(service, capture)
        status = ErrorStatusInterceptor(self.requests)
        self._loop, self._thread = start_event_loop()

        async def intercepted() -> dict[str, Any]:
            async def found(handler: Any) -> Any:
                return handler

            return {m: await status.intercept_service(lambda _d, h=h: found(h), _Details(m))
                    for m, h in capture.handlers.items()}

        self._handlers = asyncio.run_coroutine_threadsafe(intercepted(), self._loop).result()
        # WatchMetrics streams live in the serving process; this feeds them, on a socket
        # of their own that the training thread writes to (never blocking on it).
        self._feed_sock, feed_child = socket.socketpair()
        self._feed_sock.setblocking(False)
        # Room for many events: the serving process can fall behind by this much before
        # events wait in the telemetry ring (the kernel caps it at net.core.wmem_max).
        self._feed_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _FEED_BUFFER)
        self._feed = WatchFeed(service, self._loop, self._send, lambda exc: status_code(exc).value[0],
                               self._feed_sock)
        self._controller = controller = service._controller
        self._names = len(controller.index)
        self._shared_fd = os.memfd_create("lrctl-serving")  # close-on-exec: only pass_fds hands it on
        os.ftruncate(self._shared_fd, wire.SHARED_BYTES)
        self._shared = mmap.mmap(self._shared_fd, wire.SHARED_BYTES)
        self._shared_lock = threading.Lock()
        self.requests.shared = self._shared
        # Sets that do not wait, queued by the serving process itself (lrctl.server.posted_writes).
        self._posted = PostedRing.create()
        self._publish()
        # At the end of lrctl's step hook: the step and the version that this boundary's
        # changes made. (Not a step hook of our own: removing one at close() from another
        # thread, while a step is held in lockstep, would break that step's iteration.)
        controller.add_after_step(self._publish)
        controller.add_on_close(self._closing_now)
        self._sock, child = socket.socketpair()
        children = [child, feed_child]
        try:
            # A plain subprocess of this interpreter: multiprocessing's spawn would import
            # the user's __main__ (the training script) again in the child.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lrctl.server.serving_main", "--fd", str(child.fileno()),
                 "--shared-fd", str(self._shared_fd), "--feed-fd", str(feed_child.fileno()),
                 "--posted-fd", str(self._posted.fd)],
                pass_fds=[child.fileno(), self._shared_fd, feed_child.fileno(), self._posted.fd],
                stdin=subprocess.DEVNULL)
            for end in children:
                end.close()
            config = dict(address=address, insecure=insecure, tokens=tokens, tls=tls, max_workers=max_workers,
                          watch_limits=service.watchers.limits,
                          budget=(service.budget.workers, service.budget.max_queued))
            self._sock.sendall(wire.pack_raw(pickle.dumps(config)))
            self._sock.settimeout(_START_TIMEOUT_S)
            raw = wire.recv_raw_blocking(self._sock)
            self._sock.settimeout(None)
            if raw is None:
                raise RuntimeError(f"the lrctl serving process exited while starting (code {self.process.wait()})")
            first = marshal.loads(raw)
            if first[0] == wire.FAILED:
                raise (ValueError if first[1] == "ValueError" else OSError)(first[2])
            _, self.host, self.port, self._address = first
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()
            controller.attach_posted(self._posted)
        except BaseException:
            for end in children:
                end.close()
            self._abandon()
            raise

    def _publish(self) -> None:
        """Write the controller's step and version where the serving process reads them
        (the step hook: ~1 us; a checkpoint load; and a 0.1 s check, for versions changed
        between steps)."""
        controller = self._controller
        stamp = self._stamp()
        fresh = stamp != self._published_stamp
        # A change was applied: while the serving process uses snapshots, it gets the
        # new one without asking, in the shared memory, before the version it is of.
        wanted = fresh and self._push_until and time.monotonic() < self._push_until
        try:
            with self._shared_lock:
                written = wanted and self._write_snapshot()
                wire.write_shared(self._shared, controller.step, stamp)
        except ValueError:  # closed meanwhile (a step racing close()): nothing to publish to
            return
        if fresh:
            self._published_stamp = stamp
            if wanted and not written:  # through the link (no frame to wait for and read there)
                try:
                    self._loop.call_soon_threadsafe(self._push_snapshot)
                except RuntimeError:  # the loop is closed: we are stopping
                    pass

    def _write_snapshot(self) -> bool:
        """The new version's read snapshot into the shared memory, on this thread (the
        step hook's, mostly): for a job of at most _HERE_NAMES names whose schedule book
        did not grow since the link last sent it. A wakeup of the link thread, which
        the training thread would wait for as for the GIL, costs more than this."""
        if not self._static_sent or self._names > _HERE_NAMES:
            return False
        try:
            part = self._controller.read_versioned(self._book_sent)
            if part is None or part.new_schedules:
                return False
            if not wire.write_snapshot(self._shared, wire.stamp(part.loads, part.version), part.to_wire()):
                return False
        except Exception:  # a bug: it must not cost the step (the link sends the snapshot)
            log.exception("lrctl: a read snapshot could not be written; the link sends it")
            return False
        self.snapshots_written += 1
        return True

    def _closing_now(self) -> None:
        """The controller closes: the serving process refuses changes (dry runs too)."""
        if self._shared.closed:  # stopped already (or never started)
            return
        try:
            wire.set_closing(self._shared)
        except (ValueError, TypeError):  # closed meanwhile
            pass

    def _check_published(self) -> None:
        if self._stopped:
            return
        if wire.read_shared(self._shared) != (self._controller.step, self._stamp()):
            self._publish()
        now = time.monotonic()
        if now - self._grads_checked >= _GRADS_S or self._controller.grads_changed:
            self._grads_checked = now
            self._controller.grads_changed = False
            if self._controller.grad_flags() != self._grads:
                # The static part and the answers the serving process keeps are stale:
                # a new static part, with the whole book (the serving process starts its
                # snapshot over from it, and forgets the answers it kept).
                self._static_sent, self._book_sent = False, 1
                self._send_snapshot()
        self._loop.call_later(_CHECK_S, self._check_published)

    def _abandon(self) -> None:
        self._controller.remove_after_step(self._publish)
        self._controller.detach_posted()
        try:
            self._sock.close()
            self._feed_sock.close()
        finally:
            proc = getattr(self, "process", None)
            if proc is not None:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            stop_event_loop(self._loop, self._thread)
            self._shared.close()
            os.close(self._shared_fd)
            self._posted.close()

    @property
    def address(self) -> str:
        """host:port with the bound port, or unix:/abs/path, as the serving process bound it."""
        return self._address

    @property
    def alive(self) -> bool:
        """False once the serving process has exited."""
        return self.process.poll() is None

    # -- the link (on this process's event loop) -------------------------------------
    async def _start(self) -> None:
        self._link = wire.FrameProtocol(self._on_frame, self._on_end)
        await self._loop.create_connection(lambda: self._link, sock=self._sock)
        self._loop.call_later(_CHECK_S, self._check_published)

    def _send(self, frame: tuple[Any, ...]) -> None:
        self._link.send(frame)

    def _on_frame(self, frame: tuple[Any, ...]) -> None:
        kind, cid = frame[0], frame[1]
        if kind == wire.CALL:
            self._begin(cid, *frame[2:])
        elif kind == wire.REQUEST or kind == wire.HALF_CLOSE:
            call = self._calls.get(cid)
            if call is not None and call[1] is not None:
                call[1].put_nowait(frame[2] if kind == wire.REQUEST else None)
        elif kind == wire.CANCEL:
            call = self._calls.get(cid)
            if call is not None:
                call[0].cancel()
        elif kind == wire.PLANNED:
            self._begin_planned(cid, *frame[2:])
        elif kind == wire.SNAPSHOT_WANTED:
            self._push_until = time.monotonic() + _PUSH_S
            if self._sent_stamp != self._stamp() or not self._static_sent:
                self._send_snapshot()
            # else: the snapshot of this version went out unasked and crossed this
            # request: the serving process has it (it asks for newer ones only).
        elif kind == wire.WATCH:
            self._feed.start(*frame[1:])
        elif kind == wire.WATCH_CONFIG:
            self._feed.configure(*frame[1:])

    def _push_snapshot(self) -> None:
        if self._sent_stamp != self._stamp() and self._static_sent:
            self._send_snapshot()

    def _stamp(self) -> int:
        """The controller's version as published (serving_wire.stamp)."""
        return wire.stamp(*self._controller.loads_and_version())

    def _send_snapshot(self) -> None:
        """A read snapshot for the serving process (lrctl.server.serving_reads): made
        here, on the link thread, once per version a read needed, never per request;
        the static part only the first time."""
        controller = self._controller
        static, versioned = None, None
        try:
            if not self._static_sent:
                self._grads = controller.grad_flags()
                static = pickle.dumps(controller.read_static(), pickle.HIGHEST_PROTOCOL)
                self._static_sent = True
            part = controller.read_versioned(self._book_sent)
            if part is not None:
                self._book_sent += len(part.new_schedules)
                self._sent_stamp = wire.stamp(part.loads, part.version)
                versioned = part.to_wire()
        except Exception:  # a bug: must not end the link (reads are forwarded from now on)
            log.exception("lrctl: a read snapshot could not be made; reads are forwarded from now on")
            static, versioned = None, None
        self.snapshots_sent += 1
        self._send((wire.SNAPSHOT, static, versioned))

    def _on_end(self) -> None:
        for task, _ in list(self._calls.values()):
            task.cancel()
        self._feed.stop()
        if not self._closing:
            code = self.process.poll()
            log.error("lrctl: the serving process exited (%s): this job is no longer served "
                      "(training goes on; changes already queued still apply)",
                      "still running" if code is None else f"code {code}")

    def _begin(self, cid: int, method: str, metadata: tuple, peer: str, remaining: float,
               body: bytes | None) -> None:
        handler = self._handlers.get(method)
        if handler is None:
            self._send((wire.END, cid, grpc.StatusCode.UNIMPLEMENTED.value[0], f"method {method} not found", None, -1))
            return
        context = _Context(self, cid, metadata, peer, remaining)
        requests: Optional[asyncio.Queue] = None
        if handler.stream_stream is not None:
            requests = asyncio.Queue()
            run = self._stream(cid, handler.stream_stream(self._requests(requests, handler), context), context)
        elif handler.unary_stream is not None:
            run = self._stream(cid, handler.unary_stream(_decode(handler, body), context), context)
        else:
            # Most unary calls never wait (reads, dry runs, Sets that do not wait): started
            # here, they end without a Task or another turn of the loop. A waiting Set
            # would only add the hand-over to a Task: it gets one from the start.
            request = _decode(handler, body)
            run = self._unary(cid, handler, request, context, method in wire.CACHEABLE)
            if not getattr(request, "wait", False) or getattr(request, "dry_run", False):
                task = _eager(run)
                if task is not None:
                    self._calls[cid] = (task, None)
                return
        self._calls[cid] = (asyncio.ensure_future(run), requests)

    def _begin_planned(self, cid: int, method: str, peer: str, remaining: float, planned: tuple) -> None:
        """A write the serving process planned (lrctl.server.serving_writes): queued by
        the same handler code as any Set (LearningRateControlService.submit_planned)."""
        context = _Context(self, cid, (), peer, remaining)
        run = self._planned(cid, method, planned, context)
        if not planned_waits(planned):  # most end without a Task (see _begin)
            task = _eager(run)
            if task is not None:
                self._calls[cid] = (task, None)
            return
        self._calls[cid] = (asyncio.ensure_future(run), None)

    async def _planned(self, cid: int, method: str, wired: tuple, context: _Context) -> None:
        try:
            planned = planned_from_wire(wired)
            result = await self._service.submit_planned(planned, context, len(planned.ops))
        except asyncio.CancelledError:
            pass  # the caller went away (or the link ended): its change was withdrawn
        except Exception as exc:  # as status.py's guard answers a forwarded call
            code, message = failure_status(exc, method, self.requests)
            self._send((wire.END, cid, code.value[0], message, None, -1))
        else:
            self.requests.add(method, "OK")
            if isinstance(result, int):
                self._send((wire.ACCEPTED, cid, result))
            else:
                self._send((wire.END, cid, 0, "", result.SerializeToString(), -1))
        finally:
            self._calls.pop(cid, None)

    @staticmethod
    async def _requests(queue: asyncio.Queue, handler: Any) -> Any:
        while (body := await queue.get()) is not None:
            yield _decode(handler, body)

    async def _unary(self, cid: int, handler: Any, request: Any, context: _Context, cacheable: bool) -> None:
        controller = self._controller
        # A read computed with no change applied meanwhile, and no schedule in force,
        # is the answer for as long as its version is: the serving process keeps it.
        before = -1 if not cacheable or controller.rates_move_with_step else self._stamp()
        try:
            response = await handler.unary_unary(request, context)
            version = before if before >= 0 and self._stamp() == before else -1
            self._send((wire.END, cid, 0, "", handler.response_serializer(response), version))
        except asyncio.CancelledError:
            pass  # the caller went away (or the link ended): nobody to answer
        except _Abort:
            self._send((wire.END, cid, context.code.value[0], context.details, None, -1))
        except Exception as exc:  # past status.py's guard: grpc would answer UNKNOWN
            log.exception("lrctl: forwarded call %s failed", cid)
            self._send((wire.END, cid, grpc.StatusCode.UNKNOWN.value[0], f"Exception calling application: {exc!r}", None, -1))
        finally:
            self._calls.pop(cid, None)

    async def _stream(self, cid: int, responses: Any, context: _Context) -> None:
        try:
            async for response in responses:
                self._send((wire.RESPONSE, cid, response.SerializeToString()))
            self._send((wire.END, cid, 0, "", None, -1))
        except asyncio.CancelledError:
            pass
        except _Abort:
            self._send((wire.END, cid, context.code.value[0], context.details, None, -1))
        except Exception as exc:
            log.exception("lrctl: forwarded stream %s failed", cid)
            self._send((wire.END, cid, grpc.StatusCode.UNKNOWN.value[0], f"Exception calling application: {exc!r}", None, -1))
        finally:
            await responses.aclose()
            self._calls.pop(cid, None)

    # -- lifecycle -------------------------------------------------------------------
    def stop(self, grace: float = 2.0) -> None:
        """Ask the serving process to stop, letting calls in flight finish for `grace` s
        (answered from here meanwhile); returns once it has exited and the link ended."""
        if self._stopped:
            return
        self._stopped = True
        self._closing = True
        self._controller.remove_after_step(self._publish)
        self._loop.call_soon_threadsafe(self._send, (wire.QUIT, float(grace)))
        try:
            self.process.wait(grace + 30)
        except subprocess.TimeoutExpired:
            log.warning("lrctl: the serving process did not stop in time; killing it")
            self.process.kill()
            self.process.wait()
        finally:
            def close() -> None:
                if self._link is not None and self._link.transport is not None:
                    self._link.transport.close()
            self._loop.call_soon_threadsafe(close)
            stop_event_loop(self._loop, self._thread)
            self._sock.close()
            self._feed_sock.close()
            self.requests.answered_there()
            self.requests.shared = None
            self._controller.detach_posted()  # the serving process is gone: it queues nothing more
            self._shared.close()
            os.close(self._shared_fd)
            self._posted.close()


def _eager(coro: Any) -> Optional[asyncio.Task]:
    """Run `coro` now, until it ends (None) or first waits: then the rest runs as a Task
    (asyncio's eager tasks, which Python 3.12 has built in). What it raises is its own
    business: _unary answers every error."""
    try:
        waiting = coro.send(None)
    except StopIteration:
        return None
    return asyncio.ensure_future(_resume(coro, waiting))


async def _resume(coro: Any, waiting: Any) -> Any:
    return await _drive(coro, waiting)


@types.coroutine
def _drive(coro: Any, waiting: Any) -> Any:
    """Go on with a coroutine started by hand that is waiting on `waiting` (a future it
    yielded, or None): hand each future up to the Task, and what the Task throws in
    (a cancellation) down to the coroutine; as `yield from` does for one not started."""
    while True:
        try:
            yield waiting
        except BaseException as exc:
            try:
                waiting = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                waiting = coro.send(None)
            except StopIteration as stop:
                return stop.value


def _decode(handler: Any, body: bytes | None) -> Any:
    # status.py's lenient deserializer: an undecodable request becomes INVALID_ARGUMENT.
    return handler.request_deserializer(body or b"")
