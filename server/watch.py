"""WatchMetrics fan-out: the telemetry ring's events to each subscriber's bounded queue.

Runs on the serving event loop, never on the training thread: the training thread only
seals events into the ring (lrctl.server.telemetry) and wakes this loop once; the loop
copies what is new to every subscriber's queue. A queue is bounded by count and bytes,
like the change queue's quotas (lrctl.server.queue_limits): a slow subscriber loses its
oldest events, and the next event it gets carries how many it lost. Subscribers are
capped in all, per connection (gRPC peer) and per token name, so one client cannot take
every slot. A subscriber whose call ends (cancelled, connection gone, server stopping)
is removed in the handler's `finally`.

asyncio and pure Python; no grpc, no torch.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from dataclasses import dataclass
from typing import Iterator

from lrctl.common.errors import InvalidArgumentError, OutOfRangeError, ResourceExhaustedError
from lrctl.server.telemetry import Event, Telemetry

MIB = 1024 * 1024


@dataclass(frozen=True)
class WatchLimits:
    """Bounds of WatchMetrics (attach(watch_limits=...)): how many streams in all, per
    connection and per token name, and each stream's queue (events and bytes)."""

    max_watchers: int = 64
    max_watchers_per_connection: int = 8
    max_watchers_per_token: int = 16
    queue_events: int = 1024
    queue_bytes: int = 8 * MIB

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"WatchLimits.{name} must be a positive integer, not {value!r}")


class Subscriber:
    """One WatchMetrics stream: its filter, its bounded queue and what it lost."""

    def __init__(self, peer: str, token: str, *, min_step: int | None, changes_only: bool,
                 include_stats: bool, cursor: int, limits: WatchLimits) -> None:
        self.peer, self.token = peer, token
        self.min_step = min_step
        self.changes_only = changes_only
        self.include_stats = include_stats
        self.cursor = cursor  # seq of the last event considered
        self._limits = limits
        self._queue: deque[Event] = deque()
        self._bytes = 0
        self.dropped = 0  # lost since the last event handed out
        self.lost = 0  # lost in all (for tests and status)
        self.ended = False
        self._signal = asyncio.Event()

    def _size(self, event: Event) -> int:
        return event.size if self.include_stats or not event.has_stats else min(event.size, 1024)

    def offer(self, event: Event) -> None:
        """Queue `event` if this stream wants it; drop the oldest past the bounds."""
        self.cursor = max(self.cursor, event.seq)
        if self.min_step is not None and event.step < self.min_step:
            return
        if self.changes_only and not event.changes:
            return
        queue = self._queue
        queue.append(event)
        self._bytes += self._size(event)
        limits = self._limits
        while len(queue) > 1 and (len(queue) > limits.queue_events or self._bytes > limits.queue_bytes):
            self._bytes -= self._size(queue.popleft())
            self.dropped += 1
            self.lost += 1
        self._signal.set()

    def lose(self, n: int) -> None:
        """`n` events left the ring before they reached this stream."""
        if n:
            self.dropped += n
            self.lost += n
            self._signal.set()

    def end(self) -> None:
        self.ended = True
        self._signal.set()

    async def next_batch(self) -> list[tuple[Event, int]]:
        """The queued events, each with the count lost right before it; [] once ended."""
        while not self._queue:
            if self.ended:
                return []
            self._signal.clear()
            await self._signal.wait()
        batch = []
        while self._queue:
            event = self._queue.popleft()
            self._bytes -= self._size(event)
            batch.append((event, self.dropped))
            self.dropped = 0
        return batch


class WatchHub:
    """The subscribers of one worker's telemetry; every method runs on the serving loop."""

    def __init__(self, telemetry: Telemetry, limits: WatchLimits | None = None) -> None:
        self.telemetry = telemetry
        self.limits = WatchLimits() if limits is None else limits
        self._subscribers: list[Subscriber] = []
        self._by_peer: Counter[str] = Counter()
        self._by_token: Counter[str] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._subscribers)

    def __iter__(self) -> Iterator[Subscriber]:
        return iter(list(self._subscribers))

    def subscribe(self, peer: str, token: str = "", *, from_step: int | None = None,
                  changes_only: bool = False, include_stats: bool = False) -> Subscriber:
        """A new stream; ResourceExhaustedError past a cap, OutOfRangeError for a
        from_step that left the ring, InvalidArgumentError for a negative one."""
        limits = self.limits
        if from_step is not None and from_step < 0:
            raise InvalidArgumentError(f"from_step {from_step} is negative")
        if len(self._subscribers) >= limits.max_watchers:
            raise ResourceExhaustedError(
                f"{len(self._subscribers)} WatchMetrics streams are open, the most this worker "
                f"allows (max_watchers {limits.max_watchers}); close one or retry later")
        if self._by_peer[peer] >= limits.max_watchers_per_connection:
            raise ResourceExhaustedError(
                f"connection {peer} already has {self._by_peer[peer]} WatchMetrics streams, its "
                f"quota (max_watchers_per_connection {limits.max_watchers_per_connection})")
        if token and self._by_token[token] >= limits.max_watchers_per_token:
            raise ResourceExhaustedError(
                f"token {token!r} already has {self._by_token[token]} WatchMetrics streams, its "
                f"quota (max_watchers_per_token {limits.max_watchers_per_token})")
        telemetry = self.telemetry
        backlog: list[Event] = []
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
                         include_stats=include_stats, cursor=cursor, limits=limits)
        for event in backlog:
            sub.offer(event)
        if telemetry.closed:
            sub.end()
        self._subscribers.append(sub)
        self._by_peer[peer] += 1
        if token:
            self._by_token[token] += 1
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        loop = self._loop
        telemetry.wake = lambda: loop.call_soon_threadsafe(self.fan_out)
        self.fan_out()  # what was sealed between the backlog and now
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub not in self._subscribers:
            return
        self._subscribers.remove(sub)
        self._by_peer[sub.peer] -= 1
        if not self._by_peer[sub.peer]:
            del self._by_peer[sub.peer]
        if sub.token:
            self._by_token[sub.token] -= 1
            if not self._by_token[sub.token]:
                del self._by_token[sub.token]
        if not self._subscribers:
            self.telemetry.wake = None  # no listener: the training thread wakes nobody

    def fan_out(self) -> None:
        """Hand every new sealed event to every subscriber (on the loop)."""
        telemetry = self.telemetry
        telemetry.woken()  # before reading: an event sealed from now on wakes us again
        subscribers = self._subscribers
        if not subscribers:
            return
        start = min(sub.cursor for sub in subscribers)
        events, _ = telemetry.after(start)
        first = events[0].seq if events else telemetry.last_seq + 1
        for sub in subscribers:
            sub.lose(max(0, first - sub.cursor - 1))
            sub.cursor = max(sub.cursor, first - 1)
            for event in events:
                if event.seq > sub.cursor:
                    sub.offer(event)
            if telemetry.closed:
                sub.end()

    def close(self) -> None:
        for sub in self._subscribers:
            sub.end()
