"""WatchMetrics fan-out: the telemetry ring's events to each subscriber's bounded queue.

Runs on the serving event loop, never on the training thread: the training thread only
seals events into the ring (lrctl.server.telemetry) and wakes this loop once; the loop
copies what is new to every subscriber's queue. The streams' state (bounded queues,
drop counts, caps) is lrctl.server.subscribers, shared with the serving process of
attach(serving="process"), which fans out there what lrctl.server.watch_feed sends it.
A subscriber whose call ends (cancelled, connection gone, server stopping) is removed
in the handler's `finally`.

asyncio and pure Python; no grpc, no torch (the telemetry passed in brings torch).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Iterator

from lrctl.common.errors import OutOfRangeError
from lrctl.server.subscribers import MIB, Subscriber, Subscribers, WatchLimits

if TYPE_CHECKING:
    from lrctl.server.telemetry import Telemetry

__all__ = ["MIB", "Subscriber", "WatchHub", "WatchLimits"]


class WatchHub:
    """The subscribers of one worker's telemetry; every method runs on the serving loop.

    `remote`: streams served by a serving process (counted by len(), for GetStatus)."""

    def __init__(self, telemetry: "Telemetry", limits: WatchLimits | None = None) -> None:
        self.telemetry = telemetry
        self.subscribers = Subscribers(limits)
        self.limits = self.subscribers.limits
        self.remote = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self.subscribers) + self.remote

    def __iter__(self) -> Iterator[Subscriber]:
        return iter(self.subscribers)

    def start(self, peer: str, token: str, *, from_step: int | None, changes_only: bool,
              include_stats: bool, per_record: int = 0) -> Subscriber:
        """A stream's start: a subscriber whose cursor is now (or just before from_step)
        with what it gets of the ring queued (bounded like any queue, drops counted);
        OutOfRangeError for a from_step that left the ring. Not subscribed."""
        telemetry = self.telemetry
        backlog: list[Any] = []
        if from_step is None:
            cursor = telemetry.last_seq
        else:
            found = telemetry.from_step(from_step)
            if found is None:
                oldest = telemetry.oldest_step()
                raise OutOfRangeError(
                    f"from_step {from_step} is gone: the oldest step whose event this worker still "
                    f"keeps is {oldest} (it keeps the last {telemetry.max_events} events); "
                    f"ask from step {oldest} or later, or leave from_step out")
            backlog, cursor = found
        sub = Subscriber(peer, token, min_step=from_step, changes_only=changes_only,
                         include_stats=include_stats, cursor=cursor, limits=self.limits,
                         per_record=per_record)
        for event in backlog:
            sub.offer(event)
        if telemetry.closed:
            sub.end()
        return sub

    def subscribe(self, peer: str, token: str = "", *, from_step: int | None = None,
                  changes_only: bool = False, include_stats: bool = False) -> Subscriber:
        """A new stream; ResourceExhaustedError past a cap, OutOfRangeError for a
        from_step that left the ring, InvalidArgumentError for a negative one."""
        self.subscribers.check(peer, token, from_step)
        sub = self.start(peer, token, from_step=from_step, changes_only=changes_only,
                         include_stats=include_stats)
        self.subscribers.add(sub)
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        loop = self._loop
        self.telemetry.wake = lambda: loop.call_soon_threadsafe(self.fan_out)
        self.fan_out()  # what was sealed between the backlog and now
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        if self.subscribers.remove(sub) and not self.subscribers:
            self.telemetry.wake = None  # no listener: the training thread wakes nobody

    def fan_out(self) -> None:
        """Hand every new sealed event to every subscriber (on the loop)."""
        telemetry = self.telemetry
        telemetry.woken()  # before reading: an event sealed from now on wakes us again
        start = self.subscribers.cursor()
        if start is None:
            return
        events, _ = telemetry.after(start)
        self.subscribers.deliver(events, events[0].seq if events else telemetry.last_seq + 1,
                                 telemetry.closed)

    def close(self) -> None:
        self.subscribers.close()
