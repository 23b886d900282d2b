"""WatchMetrics with serving="process": the training process's end of the fan-out.

The serving process (lrctl.server.serving_main) keeps the streams (bounded queues,
drops, caps: lrctl.server.subscribers). This end sends each telemetry event to it once,
whatever the number of streams, encoded once (lrctl.server.service's event_parts: the
change records once per per-name limit some stream asked for, statistics only when a
stream asked for them), in one frame per wakeup of the loop (so about one per step);
while no stream is open the telemetry wakes nobody and nothing is sent.

Start-from-step: the serving process asks this process once, when a stream opens, for
the stream's start (lrctl.server.serving_wire's WATCH frame): the ring's events from
`from_step` on, cut to the stream's own queue bounds (what the stream would have kept
of them in-process, its drops counted), and the seq of the last event considered. The
live part joins by seq: the feed is turned on before the start is taken, so every event
after that seq comes in a feed frame, and the serving process skips the feed's events
up to it (no gap, no duplicate). The training process's ring is the one place that
can answer from_step: a ring in the serving process would hold nothing from the time
nobody watched (nothing is sent then) and would double the memory bound.

Runs on ServingProcess's event loop thread, never on the training thread.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Callable

from lrctl.common.errors import LrctlError
from lrctl.server import serving_wire as wire

if TYPE_CHECKING:
    from lrctl.server.service import LearningRateControlService
    from lrctl.server.telemetry import Event


class WatchFeed:
    """The events of one worker's telemetry, to its serving process."""

    def __init__(self, service: "LearningRateControlService", loop: asyncio.AbstractEventLoop,
                 send: Callable[[tuple[Any, ...]], None], code: Callable[[LrctlError], int]) -> None:
        self._service = service
        self._hub = service.watchers
        self._telemetry = service.watchers.telemetry
        self._loop, self._send, self._code = loop, send, code
        self._on = False
        self._cursor = 0  # seq of the last event sent
        self._stats = False
        self._per_records: tuple[int, ...] = ()

    def configure(self, count: int, stats: bool, per_records: tuple[int, ...]) -> None:
        """The serving process's streams changed: `count` open, whether any wants
        statistics, the per-name limits of their change records. 0: the feed stops."""
        self._hub.remote = count
        self._stats, self._per_records = stats, tuple(per_records)
        telemetry = self._telemetry
        if count and not self._on:
            self._on = True
            self._cursor = telemetry.last_seq
            loop = self._loop
            telemetry.wake = lambda: loop.call_soon_threadsafe(self.run)
            self.run()  # sealed while the wake was being set
        elif not count and self._on:
            self._on = False
            telemetry.wake = None  # no listener: the training thread wakes nobody

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
        events = [self._encode(e, (per_record,), include_stats) for e in sub.queued()]
        self._send((wire.WATCH_START, cid, sub.cursor, sub.dropped, events, sub.ended))

    def run(self) -> None:
        """Send what was sealed since the last run (on the loop, after a wake)."""
        telemetry = self._telemetry
        telemetry.woken()  # before reading: an event sealed from now on wakes us again
        if not self._on:
            return
        events, _ = telemetry.after(self._cursor)
        closed = telemetry.closed
        if not events and not closed:
            return
        next_seq = events[0].seq if events else telemetry.last_seq + 1
        if events:
            self._cursor = events[-1].seq
        per_records, stats = self._per_records, self._stats
        self._send((wire.FEED, [self._encode(e, per_records, stats) for e in events], next_seq, closed))

    def _encode(self, event: "Event", per_records: tuple[int, ...], stats: bool) -> tuple[Any, ...]:
        base, changes, extra = self._service.event_parts(event, per_records, stats)
        return (event.seq, event.step, bool(event.changes), event.has_stats, event.size, base, changes, extra)
