"""Admission: what a call may cost the worker before it starts.

Two limits, both counted on the event loop that serves the calls (no thread is held
while a call waits):

- `Budget`: expensive work (writes and dry runs, reads with patterns or many
  selectors, large pages) runs on a small pool of its own (2 threads by default), so
  health checks and cheap reads, answered on the event loop, never queue behind it.
  Beyond the pool, up to `queued` calls (and `queued_bytes` of their requests) wait
  for a turn asynchronously, each until its deadline or cancellation; beyond that a
  call is refused at once with RESOURCE_EXHAUSTED ("server busy ..."). The short queue
  takes a burst (100 waiting Sets sent together) without client retries; the refusal
  keeps a flood from growing memory or latency without bound.
- `WaitingQuota`: calls that wait for their change to apply hold no thread, only a
  count: in all, per connection (the gRPC peer) and per token name, so that one client
  cannot take every slot.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from lrctl.common.errors import ResourceExhaustedError
from lrctl.server.cancel import CallCheck, CallerGoneError

T = TypeVar("T")

DEFAULT_EXPENSIVE_WORKERS = 2
DEFAULT_EXPENSIVE_QUEUED = 256
DEFAULT_EXPENSIVE_QUEUED_BYTES = 32 << 20
DEFAULT_MAX_WAITING = 1000
DEFAULT_MAX_WAITING_PER_CONNECTION = 100
DEFAULT_MAX_WAITING_PER_TOKEN = 250


class Budget:
    """At most `workers` expensive calls run at once; `queued` more wait for a turn.

    `run` must be awaited on one event loop (all counting happens there). `stopped`
    counts calls whose work was cut short because their caller had gone.
    """

    def __init__(
        self,
        workers: int = DEFAULT_EXPENSIVE_WORKERS,
        queued: int = DEFAULT_EXPENSIVE_QUEUED,
        queued_bytes: int = DEFAULT_EXPENSIVE_QUEUED_BYTES,
    ) -> None:
        if workers < 1 or queued < 0 or queued_bytes < 0:
            raise ValueError(f"bad budget: workers={workers}, queued={queued}, queued_bytes={queued_bytes}")
        self.workers, self.max_queued, self.max_queued_bytes = workers, queued, queued_bytes
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="lrctl-work")
        self.running = 0
        self._queue: deque[tuple[asyncio.Future[None], int]] = deque()
        self._queued_bytes = 0
        self.stopped = 0
        self.completed = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _busy(self) -> ResourceExhaustedError:
        return ResourceExhaustedError(
            f"server busy: {self.running} expensive requests in progress and {len(self._queue)} "
            f"waiting to start (at most {self.workers} and {self.max_queued}); retry"
        )

    async def _admit(self, size: int) -> None:
        if self.running < self.workers:  # then no live call is queued: _release hands slots on
            self.running += 1
            return
        if len(self._queue) >= self.max_queued or self._queued_bytes + size > self.max_queued_bytes:
            raise self._busy()
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (turn, size)
        self._queue.append(entry)
        self._queued_bytes += size
        try:
            await turn  # _release hands its slot over: running stays counted
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release()  # handed a slot just as the caller left: pass it on
            elif entry in self._queue:
                self._queue.remove(entry)
                self._queued_bytes -= size
            raise

    def _release(self) -> None:
        self.running -= 1
        while self._queue:
            turn, size = self._queue.popleft()
            self._queued_bytes -= size
            if not turn.done():
                self.running += 1
                turn.set_result(None)
                return

    async def run(
        self,
        work: Callable[[], T],
        call: CallCheck,
        *,
        size: int = 0,
        on_abandoned: Callable[[T], Any] | None = None,
    ) -> T:
        """work() on a budget thread once admitted; its result.

        If the awaiting call is cancelled, `call` is cancelled too (so work that checks
        it stops), and `on_abandoned(result)` runs on the loop if the work still
        completes (to withdraw what it queued). The slot is freed when the work ends,
        not when its caller leaves: the budget counts threads really busy.
        """
        await self._admit(size)
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._pool, _checked, work, call)
        except BaseException:  # the pool is shut down
            self._release()
            raise
        future.add_done_callback(lambda f: self._finished(f, call))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            call.cancel(CallerGoneError("the client cancelled the call; its work was stopped"))
            if on_abandoned is not None:
                future.add_done_callback(lambda f: _abandoned(f, on_abandoned))
            raise

    def _finished(self, future: asyncio.Future[Any], call: CallCheck) -> None:
        if not future.cancelled():
            future.exception()  # retrieved: an abandoned call's error is not "never retrieved"
        if call.fired:
            self.stopped += 1
        else:
            self.completed += 1
        self._release()

    def shutdown(self) -> None:
        """Stop the threads once their current work ends; queued work never starts."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _checked(work: Callable[[], T], call: CallCheck) -> T:
    call.check()  # its caller left while it waited for a turn
    return work()


def _abandoned(future: asyncio.Future[Any], on_abandoned: Callable[[Any], Any]) -> None:
    if not future.cancelled() and future.exception() is None:
        on_abandoned(future.result())


class WaitingQuota:
    """Counts of calls waiting for their change to apply: in all, per connection, per token."""

    def __init__(
        self,
        total: int = DEFAULT_MAX_WAITING,
        per_connection: int = DEFAULT_MAX_WAITING_PER_CONNECTION,
        per_token: int = DEFAULT_MAX_WAITING_PER_TOKEN,
    ) -> None:
        if min(total, per_connection, per_token) < 1:
            raise ValueError(
                f"bad waiting limits: total={total}, per_connection={per_connection}, per_token={per_token}"
            )
        self.total, self.per_connection, self.per_token = total, per_connection, per_token
        self._lock = threading.Lock()
        self.waiting = 0
        self._by_peer: Counter[str] = Counter()
        self._by_token: Counter[str] = Counter()

    def acquire(self, peer: str, token: str = "") -> None:
        """Count one more waiting call, or raise RESOURCE_EXHAUSTED naming the full limit."""
        advice = "send it with wait=false (and follow the history), or retry when one is done"
        with self._lock:
            if self.waiting >= self.total:
                raise ResourceExhaustedError(
                    f"{self.waiting} calls already wait for their changes to apply, the most this "
                    f"worker allows in all (max_waiting {self.total}); {advice}"
                )
            if self._by_peer[peer] >= self.per_connection:
                raise ResourceExhaustedError(
                    f"{self._by_peer[peer]} calls from this connection ({peer}) already wait for their "
                    f"changes to apply, the most one connection may have (max_waiting_per_connection "
                    f"{self.per_connection}); {advice}"
                )
            if token and self._by_token[token] >= self.per_token:
                raise ResourceExhaustedError(
                    f"{self._by_token[token]} calls with token {token!r} already wait for their changes "
                    f"to apply, the most one token may have (max_waiting_per_token {self.per_token}); {advice}"
                )
            self.waiting += 1
            self._by_peer[peer] += 1
            if token:
                self._by_token[token] += 1

    def release(self, peer: str, token: str = "") -> None:
        with self._lock:
            self.waiting -= 1
            self._by_peer[peer] -= 1
            if not self._by_peer[peer]:
                del self._by_peer[peer]
            if token:
                self._by_token[token] -= 1
                if not self._by_token[token]:
                    del self._by_token[token]
