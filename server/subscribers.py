"""WatchMetrics subscribers: bounded per-stream queues, drop counts and caps.

The one place for a stream's state, whichever process serves it: the in-process server
(lrctl.server.watch, events straight from the telemetry ring) and the serving process
of attach(serving="process") (lrctl.server.serving_main, events as the training process
sent them, encoded once). An event is anything with `seq`, `step`, `changes` (truthy
when it carries change records), `has_stats` and `size` (bytes, estimated from above).

A queue is bounded by count and bytes, like the change queue's quotas
(lrctl.server.queue_limits): a slow subscriber loses its oldest events, and the next
event it gets carries how many it lost. Subscribers are capped in all, per connection
(gRPC peer) and per token name, so one client cannot take every slot.

asyncio and pure Python; neither grpc nor torch (the serving process has no torch).
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

from lrctl.common.errors import InvalidArgumentError, ResourceExhaustedError

MIB = 1024 * 1024
# Per-name entries of a change record a stream gets when it does not say (as ListChanges),
# and the most it may ask for.
DEFAULT_REPORTED_CHANGES = 1000
MAX_ENTRIES_PER_CHANGE_PAGE = 200_000
# WatchMetricsBatched: the most bytes of events one message joins (one larger event comes
# alone); well under the 4 MiB a gRPC client receives by default.
BATCH_BYTES = 256 * 1024

T = TypeVar("T")


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


def changes_per_record(requested: int) -> int:
    """The per-name entries a stream's change records list, from its request's
    max_changes_per_record; InvalidArgumentError for a negative one."""
    if requested < 0:
        raise InvalidArgumentError(f"max_changes_per_record {requested} is negative")
    return min(requested or DEFAULT_REPORTED_CHANGES, MAX_ENTRIES_PER_CHANGE_PAGE)


def runs(items: list[T], size: Callable[[T], int], limit: int = BATCH_BYTES) -> Iterator[list[T]]:
    """`items` in order, in runs of at most `limit` bytes each by `size` (an item larger
    than `limit` is a run of its own): the messages of a WatchMetricsBatched stream."""
    run: list[T] = []
    total = 0
    for item in items:
        n = size(item)
        if run and total + n > limit:
            yield run
            run, total = [], 0
        run.append(item)
        total += n
    if run:
        yield run


class Subscriber:
    """One WatchMetrics stream: its filter, its bounded queue and what it lost."""

    def __init__(self, peer: str, token: str, *, min_step: int | None, changes_only: bool,
                 include_stats: bool, cursor: int, limits: WatchLimits, per_record: int = 0) -> None:
        self.peer, self.token = peer, token
        self.min_step = min_step
        self.changes_only = changes_only
        self.include_stats = include_stats
        self.per_record = per_record
        self.cursor = cursor  # seq of the last event considered
        self.ready = True  # False while its start is being fetched (serving process)
        self._limits = limits
        self._queue: deque[Any] = deque()
        self._bytes = 0
        self.dropped = 0  # lost since the last event handed out
        self.lost = 0  # lost in all (for tests and status)
        self.ended = False
        self._signal = asyncio.Event()

    def _size(self, event: Any) -> int:
        return event.size if self.include_stats or not event.has_stats else min(event.size, 1024)

    def offer(self, event: Any) -> None:
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

    def take(self, events: Iterable[Any], next_seq: int) -> None:
        """`events` in seq order, the first of them (or else the next to come) numbered
        `next_seq`: the events between this stream's cursor and it were lost; those
        already considered are skipped."""
        self.lose(max(0, next_seq - self.cursor - 1))
        self.cursor = max(self.cursor, next_seq - 1)
        for event in events:
            if event.seq > self.cursor:
                self.offer(event)

    def lose(self, n: int) -> None:
        """`n` events left the ring before they reached this stream."""
        if n:
            self.dropped += n
            self.lost += n
            self._signal.set()

    def end(self) -> None:
        self.ended = True
        self._signal.set()

    def queued(self) -> list[Any]:
        """The events queued now, oldest first (a start handed on, see WatchHub.start)."""
        return list(self._queue)

    async def next_batch(self) -> list[tuple[Any, int]]:
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


class Subscribers:
    """The open streams and their caps; every method runs on the serving event loop."""

    def __init__(self, limits: WatchLimits | None = None) -> None:
        self.limits = WatchLimits() if limits is None else limits
        self._subscribers: list[Subscriber] = []
        self._by_peer: Counter[str] = Counter()
        self._by_token: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._subscribers)

    def __iter__(self) -> Iterator[Subscriber]:
        return iter(list(self._subscribers))

    def check(self, peer: str, token: str, from_step: int | None) -> None:
        """InvalidArgumentError for a negative from_step, ResourceExhaustedError past a cap."""
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

    def add(self, sub: Subscriber) -> None:
        self._subscribers.append(sub)
        self._by_peer[sub.peer] += 1
        if sub.token:
            self._by_token[sub.token] += 1

    def remove(self, sub: Subscriber) -> bool:
        """Forget `sub`; False if it was not here."""
        if sub not in self._subscribers:
            return False
        self._subscribers.remove(sub)
        self._by_peer[sub.peer] -= 1
        if not self._by_peer[sub.peer]:
            del self._by_peer[sub.peer]
        if sub.token:
            self._by_token[sub.token] -= 1
            if not self._by_token[sub.token]:
                del self._by_token[sub.token]
        return True

    def cursor(self) -> int | None:
        """The oldest cursor of the ready streams (where a fan-out starts); None: none."""
        cursors = [sub.cursor for sub in self._subscribers if sub.ready]
        return min(cursors) if cursors else None

    def deliver(self, events: Iterable[Any], next_seq: int, closed: bool) -> None:
        """Hand `events` (in seq order, the first of them or else the next one to come
        numbered `next_seq`) to every ready stream: a stream behind `next_seq` lost the
        events between; `closed`: the stream ends after them."""
        events = list(events)
        for sub in self._subscribers:
            if not sub.ready:
                continue
            sub.take(events, next_seq)
            if closed:
                sub.end()

    def close(self) -> None:
        for sub in self._subscribers:
            sub.end()
