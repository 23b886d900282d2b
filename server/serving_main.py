"""The serving process of attach(serving="process"): `python -m lrctl.server.serving_main --fd N ...`.

It owns the gRPC server, built by the one factory (bind, TLS, tokens and roles, health,
reflection, max concurrent calls), and forwards each LearningRateControl call to the
training process over the socket it was given (lrctl.server.serving_wire), so that
grpc's own serving machinery (~70% of the server's Python time, bench/README.md
section 3) runs here and not under the training process's GIL.

It imports neither torch nor the controller, and lives exactly as long as its link:
when the training process closes it (close(grace): drain, then exit) or dies (end of
stream: stop at once), this process stops serving and exits. SIGINT and SIGTERM are
ignored: a Ctrl-C or a `kill` of the process group is the training process's to handle
(it closes its link, which stops this one), not a way to leave a job unserved.

Reads of rates, schedules and parameters are answered here from a snapshot
(lrctl.server.serving_reads); writes are planned here from the same snapshot, dry runs and
bad requests answered here, valid changes handed over pre-planned
(lrctl.server.serving_writes). WatchMetrics is not forwarded: its streams are kept here (_Watch, on
lrctl.server.subscribers), fed once for all of them by the training process, on a
socket of their own (lrctl.server.watch_feed).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import marshal
import mmap
import os
import pickle
import signal
import socket
import sys
import threading
from typing import Any, AsyncIterator

import grpc

from lrctl.common.errors import LrctlError
from lrctl.server import serving_wire as wire
from lrctl.server.admission import Budget
from lrctl.server.factory import SERVICE_NAME, build_server
from lrctl.server.feed_reader import FeedReader
from lrctl.server.planned_wire import without_plan
from lrctl.server.posted_writes import BODY_MAX, PostedRing
from lrctl.server.queue_limits import estimate_bytes
from lrctl.server.record_wire import record_pb
from lrctl.server.serving_reads import REQUESTS as SNAPSHOT_READS, SnapshotReads
from lrctl.server.serving_writes import HandOver, SnapshotWrites
from lrctl.server.status import RequestCounts, status_code
from lrctl.server.subscribers import Subscriber, Subscribers, WatchLimits, changes_per_record, runs
from lrctl.v1 import lrctl_pb2

log = logging.getLogger("lrctl.serving")
_CODES = {s.value[0]: s for s in grpc.StatusCode}
_GONE = "the training process is not answering (it exited, or is closing)"
_EVENTS_TAG = b"\x0a"  # MetricsEvents.events: field 1, length-delimited
_CACHE_ENTRIES = 256
_STEPPED = {
    "/lrctl.v1.LearningRateControl/GetLearningRates": lrctl_pb2.GetLearningRatesResponse,
    "/lrctl.v1.LearningRateControl/GetSchedules": lrctl_pb2.GetSchedulesResponse,
}


class _SharedCounts(RequestCounts):
    """The calls answered here, counted where the training process reads them for its
    lrctl_requests_total (lrctl.server.serving_wire.count_answered) as well."""

    def __init__(self, shared: Any) -> None:
        super().__init__()
        self._shared = shared

    def add(self, method: str, code: str) -> None:
        super().add(method, code)
        method = "/" + method.lstrip("/")
        if method in wire.ANSWERED:
            with self._lock:  # reads may finish on the budget's threads
                wire.count_answered(self._shared, method, code)


class _Link:
    """This end of the socket; everything runs on the server's event loop."""

    def __init__(self, shared: Any) -> None:
        self.shared = shared  # the training process's published step and version
        # (method, request bytes) -> (version stamp, response bytes, message type to set the step of)
        self.cache: dict[tuple[str, bytes], tuple[int, bytes, Any]] = {}
        # The newest version a write's answer named: never answer older. Versions here
        # are stamps (serving_wire.stamp), as published.
        self.acked = 0
        self.hits = 0
        self._ids = itertools.count(1)
        self.calls: dict[int, asyncio.Queue[tuple[Any, ...] | None]] = {}
        self.writer: asyncio.StreamWriter | None = None
        self.closed = False
        self.quit: threading.Event = threading.Event()
        self.grace: float | None = None  # None: the training process died
        # Reads answered here from a snapshot of the training process's table.
        self.reads = SnapshotReads(lambda: wire.read_shared(self.shared),
                                   lambda: self.send((wire.SNAPSHOT_WANTED, 0)),
                                   lambda newer_than: wire.read_snapshot(self.shared, newer_than))
        # ... and writes planned here from the same snapshot, and the streams (main()
        # makes both, from the configuration).
        self.writes: SnapshotWrites | None = None
        self.watch: _Watch | None = None
        self.feed: FeedReader | None = None  # the streams' events (start() makes it)
        # Where Sets that do not wait are queued without the training process's loop.
        self.posted: PostedRing | None = None

    async def start(self, sock: socket.socket, feed: socket.socket) -> None:
        reader, self.writer = await asyncio.open_connection(sock=sock)
        asyncio.ensure_future(self._read(reader))
        assert self.watch is not None
        self.feed = FeedReader(asyncio.get_running_loop(), feed, self.watch.feed)

    def send(self, frame: tuple[Any, ...]) -> None:
        if not self.closed and self.writer is not None:
            self.writer.write(wire.pack(frame))

    def open(self, method: str, context: grpc.aio.ServicerContext, request: bytes | None) -> tuple[int, asyncio.Queue]:
        cid, queue = next(self._ids), asyncio.Queue()
        self.calls[cid] = queue
        if self.closed:
            queue.put_nowait(None)
            return cid, queue
        metadata = tuple((k, v) for k, v in context.invocation_metadata() or ())
        remaining = context.time_remaining()
        if remaining is None or remaining > wire.NO_DEADLINE_S:
            remaining = -1.0
        self.send((wire.CALL, cid, method, metadata, context.peer(), float(remaining), request))
        return cid, queue

    def open_planned(self, method: str, context: grpc.aio.ServicerContext, planned: tuple) -> tuple[int, asyncio.Queue]:
        """A write planned here goes to the training process (lrctl.server.serving_writes)."""
        cid, queue = self.call_id()
        if not self.closed:
            remaining = context.time_remaining()
            if remaining is None or remaining > wire.NO_DEADLINE_S:
                remaining = -1.0
            self.send((wire.PLANNED, cid, method, context.peer(), float(remaining), planned))
        return cid, queue

    def post(self, planned: HandOver) -> int | None:
        """Queue a change that does not wait and is due at the next boundary in the
        ring (lrctl.server.posted_writes): its change id, or None (it takes the link)."""
        request = planned.planned.request
        if (self.posted is None or self.closed or request.wait or request.at_step is not None
                or request.expected_version is not None):
            return None
        body, plan = marshal.dumps(planned.wire), planned.planned.plan
        if len(body) > BODY_MAX:  # the plan's arrays make it long: the training process plans it
            body, plan = marshal.dumps(without_plan(planned.wire)), None
        size = estimate_bytes(request, planned.planned.ops, plan)
        change_id = self.posted.post(body, loads=planned.planned.loads, size=size, limits=planned.limits)
        if change_id is not None:
            self.acked = max(self.acked, wire.stamp(planned.planned.loads, planned.planned.version))
        return change_id

    def cached(self, method: str, request: bytes) -> bytes | None:
        """The kept answer to this exact request if the version it was computed at is
        still in force (and no newer than a write acknowledged), its step brought up to
        date; else None."""
        entry = self.cache.get((method, request))
        if entry is None:
            return None
        version, body, message_type = entry
        step, published = wire.read_shared(self.shared)
        if version != published or version < self.acked:
            return None
        self.hits += 1
        self.reads.requests.add(method, "OK")
        if message_type is None:
            return body
        message = message_type.FromString(body)
        message.step = step
        return message.SerializeToString()

    def ack(self, version: int) -> None:
        """A write's answer named `version`: taken as of the loads published now (one
        that crossed a load may be counted too new: its reads are forwarded, which is
        always right, until the versions pass it or a snapshot says otherwise)."""
        _, published = wire.read_shared(self.shared)
        self.acked = max(self.acked, wire.stamp(wire.stamp_loads(published), version))

    def keep(self, method: str, request: bytes, version: int, body: bytes, message_type: Any) -> None:
        if len(self.cache) >= _CACHE_ENTRIES:
            self.cache.clear()  # entries of old versions, mostly: start again
        self.cache[(method, request)] = (version, body, message_type)

    def finish(self, cid: int, ended: bool) -> None:
        if self.calls.pop(cid, None) is not None and not ended:
            self.send((wire.CANCEL, cid))  # a waiting Set withdraws its change

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while (frame := await wire.read_frame(reader)) is not None:
            kind = frame[0]
            if kind == wire.QUIT:
                self.grace = frame[1]
                self.quit.set()
                continue
            if kind == wire.SNAPSHOT:
                if frame[1] is not None:  # a new static part: kept answers may be stale
                    self.cache.clear()
                version = self.reads.received(frame[1], frame[2])
                if version is not None and version < self.acked:
                    # Made after every answer before it on this link, yet older than
                    # one: an answer that crossed a checkpoint load was counted as of
                    # the newer load (ack). The snapshot is the truth.
                    self.acked = version
                continue
            queue = self.calls.get(frame[1])
            if queue is not None:
                queue.put_nowait(frame)
        self.closed = True
        if self.feed is not None:
            self.feed.close()
        for queue in self.calls.values():
            queue.put_nowait(None)
        if self.watch is not None:
            self.watch.subscribers.close()
        self.quit.set()

    def call_id(self) -> tuple[int, asyncio.Queue]:
        """An id and the queue its answers come to (until finish or a pop of calls)."""
        cid, queue = next(self._ids), asyncio.Queue()
        self.calls[cid] = queue
        if self.closed:
            queue.put_nowait(None)
        return cid, queue


def _varint(n: int) -> bytes:
    """`n` (>= 0) as a protobuf varint."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class _WireEvent:
    """A telemetry event as the training process sent it (lrctl.server.watch_feed)."""

    __slots__ = ("seq", "step", "changes", "has_stats", "size", "_base", "records", "_parts", "stats")

    def __init__(self, seq: int, step: int, time: float, version: int, metrics: dict[str, float],
                 has_stats: bool, size: int, records: tuple, stats: bytes) -> None:
        self.seq, self.step, self.has_stats, self.size = seq, step, has_stats, size
        self.changes = bool(records)
        self._base: bytes | tuple[float, int, dict[str, float]] = (time, version, metrics)
        self.records, self.stats = records, stats  # records: record_wire's tuples
        self._parts: dict[int, bytes] = {}  # per_record -> the serialized records

    def body(self, sub: Subscriber, dropped: int) -> bytes:
        """This event's MetricsEvent for `sub` (serialized messages concatenate as they merge)."""
        body = self._base
        if isinstance(body, tuple):  # built here, once, for every stream
            time, version, metrics = body
            body = self._base = lrctl_pb2.MetricsEvent(
                step=self.step, time=time, version=version, metrics=metrics).SerializeToString()
        if self.changes:
            part = self._parts.get(sub.per_record)
            if part is None:  # built here, once for each per-name limit streams ask for
                part = self._parts[sub.per_record] = lrctl_pb2.MetricsEvent(
                    changes=[record_pb(r, sub.per_record) for r in self.records]).SerializeToString()
            body += part
        if sub.include_stats and self.stats:
            body += self.stats
        if dropped:
            body += lrctl_pb2.MetricsEvent(dropped=dropped).SerializeToString()
        return body


class _Watch:
    """The WatchMetrics streams of this serving process, fed once for all of them."""

    def __init__(self, link: _Link, limits: WatchLimits, tokens: Any) -> None:
        self.link, self.tokens = link, tokens
        self.subscribers = Subscribers(limits)
        # A new stream's feed events until its start came (bounded as its queue).
        self._early: dict[Subscriber, Subscriber] = {}
        self.closed = False  # the training process closed its telemetry: streams end OK

    def config(self) -> tuple[int, bool, tuple[int, ...]]:
        subs = list(self.subscribers)
        return (len(subs), any(s.include_stats for s in subs), tuple(sorted({s.per_record for s in subs})))

    def feed(self, frame: tuple[Any, ...]) -> None:
        """A frame of the feed: an event, or (next seq,): the telemetry closed."""
        if len(frame) == 1:
            self.closed = True
            self.subscribers.deliver((), frame[0], True)
            return
        event = _WireEvent(*frame)
        self.subscribers.deliver((event,), event.seq, False)
        for early in self._early.values():
            early.offer(event)

    def keep_early(self, sub: Subscriber) -> None:
        """Keep the feed's events for `sub` until its start comes, within its queue's
        bounds (events and bytes): every event, whatever the stream's filter, because
        the start's cursor decides which of them follow it."""
        self._early[sub] = Subscriber(sub.peer, sub.token, min_step=None, changes_only=False,
                                      include_stats=sub.include_stats, cursor=0,
                                      limits=self.subscribers.limits)

    def _join(self, sub: Subscriber, start: tuple[Any, ...]) -> None:
        """Queue a stream's start, then the feed's events after it (those that came
        before it included: two sockets), counting what is missing between as dropped."""
        _, _, sub.cursor, dropped, events, ended = start
        sub.lose(dropped)
        for event in events:
            sub.offer(_WireEvent(*event))
        for event in self._early.pop(sub).queued():  # each with its own gap (drops between)
            sub.take((event,), event.seq)
        if ended or self.closed or self.link.closed:
            sub.end()
        sub.ready = True

    def token(self, context: grpc.aio.ServicerContext) -> str:
        if self.tokens is None:
            return ""
        found = self.tokens.identify(context.invocation_metadata())
        return "" if found is None else found.name

    async def stream(self, body: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """A WatchMetrics call: a message per event."""
        async for batch in self._counted(wire.WATCH_METHOD, body, context):
            for message in batch:
                yield message

    async def stream_batched(self, body: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """A WatchMetricsBatched call: the events that came together in one MetricsEvents
        (serialized messages concatenate as they merge: each event is field 1, length-
        delimited), up to BATCH_BYTES."""
        async for batch in self._counted(wire.WATCH_BATCHED_METHOD, body, context):
            for run in runs(batch, len):
                yield b"".join([_EVENTS_TAG + _varint(len(message)) + message for message in run])

    async def _counted(self, method: str, body: bytes,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[list[bytes]]:
        """A watch call's batches of event messages, the call counted as the in-process
        interceptor counts it: with the status it ended with (OK or an error's code); a
        call the client left, not at all."""
        counts = self.link.reads.requests
        try:
            async for batch in self._stream(method, body, context):
                yield batch
        except grpc.aio.AbortError:
            code = context.code()
            counts.add(method, code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN")
            raise
        counts.add(method, "OK")

    async def _stream(self, method: str, body: bytes,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[list[bytes]]:
        link = self.link
        try:
            request = lrctl_pb2.WatchMetricsRequest.FromString(body)
            per_record = changes_per_record(request.max_changes_per_record)
            from_step = request.from_step if request.HasField("from_step") else None
            peer, token = context.peer(), self.token(context)
            self.subscribers.check(peer, token, from_step)
        except LrctlError as exc:
            await context.abort(status_code(exc), str(exc))
        except Exception as exc:  # an undecodable request
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request to {method} could not be decoded: {exc}")
        sub = Subscriber(peer, token, min_step=from_step, changes_only=request.changes_only,
                         include_stats=request.include_stats, cursor=0, limits=self.subscribers.limits,
                         per_record=per_record)
        sub.ready = False  # no feed events until its start came
        self.subscribers.add(sub)
        self.keep_early(sub)
        cid, queue = link.call_id()
        try:
            link.send((wire.WATCH, cid, from_step, request.changes_only, request.include_stats,
                       per_record, *self.config()))
            frame = await queue.get()
            link.calls.pop(cid, None)
            if frame is None or frame[0] == wire.END:
                await _end(context, frame)
            self._join(sub, frame)
            while True:
                batch = await sub.next_batch()
                if not batch:
                    if not self.closed and link.closed:
                        await context.abort(grpc.StatusCode.UNAVAILABLE, _GONE)
                    return  # the worker closed: the stream ends
                yield [event.body(sub, lost) for event, lost in batch]
        finally:
            link.calls.pop(cid, None)
            self._early.pop(sub, None)
            if self.subscribers.remove(sub):
                link.send((wire.WATCH_CONFIG, *self.config()))


async def _end(context: grpc.aio.ServicerContext, frame: tuple[Any, ...] | None) -> None:
    """Abort the call as the training process ended it (or UNAVAILABLE: it is gone)."""
    if frame is None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, _GONE)
    code = _CODES.get(frame[2], grpc.StatusCode.UNKNOWN)
    if code is not grpc.StatusCode.OK:
        await context.abort(code, frame[3])


def _handlers(link: _Link) -> grpc.GenericRpcHandler:
    """A bytes-in, bytes-out handler for every method of the service, of its own shape."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for m in lrctl_pb2.DESCRIPTOR.services_by_name["LearningRateControl"].methods:
        method = f"/{SERVICE_NAME}/{m.name}"
        if method == wire.WATCH_METHOD:
            assert link.watch is not None
            handlers[method] = grpc.unary_stream_rpc_method_handler(link.watch.stream)
        elif method == wire.WATCH_BATCHED_METHOD:
            assert link.watch is not None
            handlers[method] = grpc.unary_stream_rpc_method_handler(link.watch.stream_batched)
        elif m.client_streaming:
            handlers[method] = grpc.stream_stream_rpc_method_handler(_bidi(link, method))
        elif m.server_streaming:
            handlers[method] = grpc.unary_stream_rpc_method_handler(_server_stream(link, method))
        else:
            handlers[method] = grpc.unary_unary_rpc_method_handler(_unary(link, method))
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {k.rsplit("/", 1)[1]: v for k, v in handlers.items()})


def _unary(link: _Link, method: str) -> Any:
    cacheable = method in wire.CACHEABLE
    message_type = _STEPPED.get(method)
    write = method in wire.WRITES

    snapshot_read = method in SNAPSHOT_READS

    async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if snapshot_read:
            answer = await link.reads.answer(method, request, context, link.acked)
            if answer is not None:
                return answer
        if write:
            assert link.writes is not None
            planned = await link.writes.answer(method, request, context, link.acked)
            if isinstance(planned, bytes):
                return planned
            if planned is not None:
                return await _hand_over(link, method, context, planned)
        if cacheable:
            answer = link.cached(method, request)
            if answer is not None:
                return answer
        cid, queue = link.open(method, context, request)
        frame = await _answer(link, cid, queue, context)
        body = frame[4]
        if cacheable and frame[5] >= 0:
            link.keep(method, request, frame[5], body, message_type)
        elif write:
            link.ack(lrctl_pb2.SetLearningRatesResponse.FromString(body).version)
        return body

    return call


async def _answer(link: _Link, cid: int, queue: asyncio.Queue, context: grpc.aio.ServicerContext) -> tuple:
    """The training process's answer to call `cid`: an ACCEPTED frame, or an END frame
    that succeeded (the call is aborted as it ended it otherwise, or if it is gone). A
    call left before its answer is cancelled there (a waiting Set withdraws its change)."""
    ended = False
    try:
        frame = await queue.get()
        ended = frame is not None
        if frame is None or frame[0] != wire.ACCEPTED:
            await _end(context, frame)
    finally:
        link.finish(cid, ended)
    return frame


async def _hand_over(link: _Link, method: str, context: grpc.aio.ServicerContext, planned: HandOver) -> bytes:
    """A write planned here, queued by the training process: the reply from this plan
    (the training process names the change id), or the training process's own answer
    (it planned the change again, or it waited for it to apply)."""
    change_id = link.post(planned)
    if change_id is not None:
        link.reads.requests.add(method, "OK")
        return planned.reply(change_id)
    cid, queue = link.open_planned(method, context, planned.wire)
    frame = await _answer(link, cid, queue, context)
    if frame[0] == wire.ACCEPTED:
        link.acked = max(link.acked, wire.stamp(planned.planned.loads, planned.planned.version))
        return planned.reply(frame[2])
    body = frame[4]
    link.ack(lrctl_pb2.SetLearningRatesResponse.FromString(body).version)
    return body


async def _responses(link: _Link, cid: int, queue: asyncio.Queue, context: grpc.aio.ServicerContext,
                     ended: list[bool]) -> AsyncIterator[bytes]:
    while True:
        frame = await queue.get()
        if frame is not None and frame[0] == wire.RESPONSE:
            yield frame[2]
        elif frame is not None and frame[0] == wire.INITIAL_METADATA:
            await context.send_initial_metadata(frame[2])
        else:
            ended[0] = frame is not None
            await _end(context, frame)
            return


def _server_stream(link: _Link, method: str) -> Any:
    async def call(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        cid, queue = link.open(method, context, request)
        ended = [False]
        try:
            async for response in _responses(link, cid, queue, context, ended):
                yield response
        finally:
            link.finish(cid, ended[0])

    return call


def _bidi(link: _Link, method: str) -> Any:
    async def call(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        cid, queue = link.open(method, context, None)
        ended = [False]

        async def pump() -> None:
            async for request in requests:
                link.send((wire.REQUEST, cid, request))
            link.send((wire.HALF_CLOSE, cid))

        pumping = asyncio.ensure_future(pump())
        try:
            async for response in _responses(link, cid, queue, context, ended):
                yield response
        finally:
            pumping.cancel()
            link.finish(cid, ended[0])

    return call


def main(fd: int, shared_fd: int, feed_fd: int, posted_fd: int) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    feed = socket.socket(fileno=feed_fd)
    raw = wire.recv_raw_blocking(sock)
    if raw is None:
        return 0
    config: dict[str, Any] = pickle.loads(raw)  # from our parent only (a socketpair)
    link = _Link(mmap.mmap(shared_fd, wire.SHARED_BYTES))
    os.close(shared_fd)
    link.posted = PostedRing(posted_fd)  # its fd stays open: the ring's lock is taken on it
    link.watch = _Watch(link, config.pop("watch_limits"), config.get("tokens"))
    link.reads.requests = _SharedCounts(link.shared)
    link.writes = SnapshotWrites(link.reads, config.get("tokens"),
                                 lambda: wire.read_closing(link.shared))
    # Reads and writes answered here are bounded as the attach() call bounds them there.
    link.reads.budget = Budget(*config.pop("budget"))
    try:
        built = build_server([lambda s: s.add_generic_rpc_handlers((_handlers(link),))], **config)
    except (ValueError, OSError) as exc:
        sock.sendall(wire.pack((wire.FAILED, type(exc).__name__, str(exc))))
        return 1
    try:
        asyncio.run_coroutine_threadsafe(link.start(sock, feed), built.loop).result()
        built.loop.call_soon_threadsafe(link.send, (wire.STARTED, built.host, built.port, built.address))
        link.quit.wait()
    finally:
        # A closing training process still answers calls in flight for `grace` s; a dead
        # one answers nothing: stop at once (calls get UNAVAILABLE).
        built.stop(link.grace if link.grace is not None else 0.0)
        sock.close()
        feed.close()
    return 0


if __name__ == "__main__":
    if sys.argv[1::2] != ["--fd", "--shared-fd", "--feed-fd", "--posted-fd"] or len(sys.argv) != 9:
        sys.exit("usage: python -m lrctl.server.serving_main --fd N --shared-fd M --feed-fd F --posted-fd P"
                 "  (started by attach(serving='process'))")
    sys.exit(main(int(sys.argv[2]), int(sys.argv[4]), int(sys.argv[6]), int(sys.argv[8])))
