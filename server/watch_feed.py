"""WatchMetrics with serving="process": the training process's end of the fan-out.

The serving process (lrctl.server.serving_main) keeps the streams (bounded queues,
drops, caps: lrctl.server.subscribers). This end sends each telemetry event to it once,
whatever the number of streams, on a socket of its own (the feed), and sends nothing
while no stream is open (the telemetry then wakes nobody).

Who sends: the thread that sealed the event, mostly the training thread, right after
the step hook sealed it. Waking the serving loop for each event instead cost the
training thread a GIL hand-over per step and ~0.2 ms of the loop's Python under the GIL
(bench/README.md, "Where the 4 streams' cost is"). So the training thread sends the
event as plain numbers (marshal: step, time, version, metrics) and the serving process
builds the protobuf message, change records included (their plain values:
lrctl.server.record_wire). Only statistics are encoded here (on stats steps, while a
stream asks for them). An event whose tensors are on a device (a CUDA loss) is not
read on the training thread (that would wait for the device): from it on, the serving
loop thread of this process sends, until it has caught up; the order stays the seq
order.

Batched: a job that steps faster than every `batch_s` (50 ms) sends at most one frame a
`batch_s`, with all the events sealed since the last (each event's send cost the
training thread ~70-100 us, most of it fixed per send: with caches cold after the
step's tensors, every Python call costs several times its tight-loop figure;
bench/README.md section 3c, "The feed, batched"). An event waits up to `batch_s` before
the streams get it (the serving process reads each send as it comes). A
slower job's events go out as each is sealed; so do all of them while a lockstep
controller is attached (it may wait for each step's event) and when the telemetry
closes. Events a fast job sealed just before it paused are sent by a timer of this
process's event loop (looking every 0.2 s while a stream is open, sending once nothing
was sealed for `batch_s`), so a pause never holds them back for long.

The send never blocks: when the socket is full (the serving process is behind), the
rest of the frame is kept and the loop sends it once the socket has room; events sealed
meanwhile stay in the telemetry ring and are sent after it. Events that leave the ring
before they were sent are not sent; the streams see the gap in seq numbers and count
them as dropped. So a serving process that falls behind costs training nothing but
the ring's bounded memory.

Start-from-step: the serving process asks this process once, when a stream opens, for
the stream's start (lrctl.server.serving_wire's WATCH frame): the ring's events from
`from_step` on, cut to the stream's own queue bounds (what the stream would have kept
of them in-process, its drops counted), and the seq of the last event considered. The
live part joins by seq: the feed is turned on before the start is taken, so every event
after that seq comes on the feed, possibly before the start itself (two sockets): the
serving process keeps a new stream's feed events until its start came. The training
process's ring is the one place that can answer from_step: a ring in the serving
process would hold nothing from the time nobody watched (nothing is sent then) and
would double the memory bound.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from lrctl.common.errors import LrctlError
from lrctl.server import serving_wire as wire

if TYPE_CHECKING:
    from lrctl.server.service import LearningRateControlService
    from lrctl.server.telemetry import Event

FEED_BATCH_S = 0.05
# The loop's timer for a paused job: it sends only when the training thread has sealed
# nothing for a batch period (a job still stepping sends its own: each send the loop
# makes takes the GIL from the training thread), and it looks this seldom.
_PAUSED_CHECK_S = 0.2
# Frames joined into one send, at most about this many bytes: a send the socket takes
# only in part keeps the rest as the tail, and events should wait in the telemetry
# ring (bounded, counted as dropped when they leave it), not in a tail.
_JOIN_BYTES = 4096


class WatchFeed:
    """The events of one worker's telemetry, to its serving process.

    `send` sends a frame on the link (the loop thread only); `sock` is the feed, this
    end non-blocking; `batch_s`: the least time between two sends of a fast job (0:
    each event as it is sealed)."""

    def __init__(self, service: "LearningRateControlService", loop: asyncio.AbstractEventLoop,
                 send: Callable[[tuple[Any, ...]], None], code: Callable[[LrctlError], int],
                 sock: socket.socket, batch_s: float = FEED_BATCH_S) -> None:
        self._service = service
        self._controller = service._controller
        self._batch_s = batch_s
        self._hub = service.watchers
        self._telemetry = service.watchers.telemetry
        self._loop, self._send, self._code = loop, send, code
        self._sock = sock
        self._on = False
        self._stats = False
        self._per_records: tuple[int, ...] = ()
        # The sending state, under _lock (held by one sending thread at a time).
        self._lock = threading.Lock()
        self._again = False  # a thread found the lock held: the holder sends once more
        self._loop_turn = False  # ... and that thread was the loop's
        self._cursor = 0  # seq of the last event sent (or being sent: see _tail)
        self._tail = b""  # the part of a frame the socket has not taken yet
        self._on_loop = False  # an event on a device came: the loop sends until caught up
        self._waiting = False  # the loop waits for the socket to have room
        self._closed_sent = False
        self._sent_at = 0.0  # time.monotonic() of the last send of events
        self._sealed_at = 0.0  # ... of the last event the training thread left unsent
        self._flush: asyncio.TimerHandle | None = None  # the loop's timer (a stream is open)
        self.frames = 0  # events sent (for tests and bench)
        self.sends = 0  # ... in this many sends

    def configure(self, count: int, stats: bool, per_records: tuple[int, ...]) -> None:
        """The serving process's streams changed: `count` open, whether any wants
        statistics, the per-name limits of their change records. 0: the feed stops.
        On the loop thread."""
        self._hub.remote = count
        self._stats, self._per_records = stats, tuple(per_records)
        telemetry = self._telemetry
        if count and not self._on:
            with self._lock:
                self._cursor = telemetry.last_seq
                self._on = True
            telemetry.wake = self.push
            self._pump(on_loop=True)  # sealed while the wake was being set
            if self._batch_s and self._flush is None:
                self._flush = self._loop.call_later(_PAUSED_CHECK_S, self._flush_tick)
        elif not count and self._on:
            self._on = False
            telemetry.wake = None  # no listener: the training thread sends nothing
            if self._flush is not None:
                self._flush.cancel()
                self._flush = None

    def start(self, cid: int, from_step: int | None, changes_only: bool, include_stats: bool,
              per_record: int, count: int, stats: bool, per_records: tuple[int, ...]) -> None:
        """A stream opens: the feed on (with the new stream counted), then its start."""
        self.configure(count, stats, per_records)
        try:
            sub = self._hub.start("", "", from_step=from_step, changes_only=changes_only,
                                  include_stats=include_stats, per_record=per_record)
        except LrctlError as exc:
            self._send((wire.END, cid, self._code(exc), str(exc), None, -1))
            return
        events = [self._event(e, (per_record,), include_stats) for e in sub.queued()]
        self._send((wire.WATCH_START, cid, sub.cursor, sub.dropped, events, sub.ended))

    def stop(self) -> None:
        """The link ended: send nothing more."""
        self.configure(0, False, ())

    # -- sending (any thread; see the module docstring) --------------------------------
    def push(self) -> None:
        """Telemetry's wake: send what was sealed (on the thread that sealed it), or
        leave it to the next send when the last was less than `batch_s` ago."""
        telemetry = self._telemetry
        telemetry.woken()  # every sealing calls this again: nothing to re-arm later
        now = time.monotonic()
        if (now - self._sent_at < self._batch_s and not telemetry.closed
                and not self._controller.lockstep_attached):
            self._sealed_at = now
            return
        self._pump(on_loop=False)

    def _flush_tick(self) -> None:
        """The loop's timer: send what a job that paused sealed last (see push)."""
        self._flush = None
        if not self._on:
            return
        if time.monotonic() - self._sealed_at >= self._batch_s and self._cursor < self._telemetry.last_seq:
            self._pump(on_loop=True)
        self._flush = self._loop.call_later(_PAUSED_CHECK_S, self._flush_tick)

    def _pump(self, on_loop: bool) -> None:
        # Never waits for the lock: a thread that finds it held leaves its events to the
        # holder, which looks again after releasing it (so none is left unsent); a turn
        # of the loop's (events only the loop may read) is handed back to the loop.
        while True:
            self._again = True
            if on_loop:
                self._loop_turn = True
            if not self._lock.acquire(blocking=False):
                return
            try:
                self._again = False
                if on_loop:
                    self._loop_turn = False
                if self._on:
                    self._send_new(on_loop)
            finally:
                self._lock.release()
            if self._loop_turn and not on_loop:
                self._loop_turn = False
                self._call_soon(self._pump, True)
            if not self._again:
                return

    def _send_new(self, on_loop: bool) -> None:
        if self._on_loop and not on_loop:
            return  # the loop sends until it has caught up
        if self._tail and not self._write(b""):
            return  # still full: the loop goes on once there is room
        telemetry = self._telemetry
        closed = telemetry.closed  # read first: closed, it has sealed its last event
        events, _ = telemetry.after(self._cursor)
        if not events and not closed:
            return
        self._sent_at = time.monotonic()
        per_records, stats = self._per_records, self._stats
        frames: list[bytes] = []
        size = 0
        for event in events:
            if not on_loop and event.on_device(stats):
                self._on_loop = True
                self._call_soon(self._pump, True)
                break
            if size >= _JOIN_BYTES:
                if not self._write(b"".join(frames), len(frames)):
                    return  # the socket is full: the loop goes on once there is room
                frames, size = [], 0
            frame = wire.pack(self._event(event, per_records, stats))
            frames.append(frame)
            size += len(frame)
            self._cursor = event.seq
        else:
            self._on_loop = False
        if frames and not self._write(b"".join(frames), len(frames)):
            return  # the socket is full: the loop goes on once there is room
        if self._on_loop and not on_loop:
            return  # the loop sends from the event on a device on
        if closed and not self._closed_sent:
            self._closed_sent = True
            self._write(wire.pack((self._cursor + 1,)))

    def _write(self, frame: bytes, events: int = 0) -> bool:
        """Send the tail and `frame` (of `events` events); False if the socket did not
        take all of it (the rest is the tail, and the loop waits for room)."""
        data = self._tail + frame if self._tail else frame
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:  # the serving process is gone: the link's end stops the feed
            self._tail = b""
            self._on = False
            return False
        if frame:
            self.frames += events
            self.sends += 1
        if sent == len(data):
            self._tail = b""
            return True
        self._tail = data[sent:]
        if not self._waiting:
            self._waiting = True
            self._call_soon(self._wait_for_room)
        return False

    def _wait_for_room(self) -> None:
        try:
            self._loop.add_writer(self._sock.fileno(), self._room)
        except (OSError, ValueError):  # the socket was closed: stopping
            self._waiting = False

    def _room(self) -> None:
        self._loop.remove_writer(self._sock.fileno())
        self._waiting = False
        self._pump(on_loop=True)

    def _call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: we are stopping
            pass

    def _event(self, event: "Event", per_records: tuple[int, ...], stats: bool) -> tuple[Any, ...]:
        """An event as serving_wire's feed carries it (its metrics read here: on the
        training thread only when on_device said they are on the CPU)."""
        if event.changes or (stats and event.has_stats):
            changes, extra = self._service.event_extras(event, per_records, stats)
        else:  # most steps: numbers only
            changes, extra = (), b""
        return (event.seq, event.step, event.time, event.version, event.metrics(), event.has_stats,
                event.size, changes, extra)
