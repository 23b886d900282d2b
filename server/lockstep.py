"""Lockstep: the worker holds at a step boundary until one controller has decided.

Pure Python (no grpc, no torch): the step pre-hook (lrctl.server.controller) calls
`LockstepGate.hold` on the training thread, outside the controller's lock, before the
changes due at that step are applied; the Lockstep handler (lrctl.server.service)
hands the controller's decisions to `decide` and ends the gate with `close` when its
stream ends. A hold ends at the first of: the decision for its step, the timeout,
`close`. So a dead controller costs training at most one timeout, and a controller
whose connection drops costs it nothing more once the server notices.

Why the hold comes before the apply: the controller acts through the ordinary calls
(SetLearningRates with at_step = the held step), which the controller's validation
accepts while that step has not begun (`at_step >= step`), so its changes land at the
held step itself, whole. After a timeout the step begins; a change sent later names a
past step and is refused, so nothing is applied after its caller was told it failed.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

from lrctl.common.errors import InvalidArgumentError

log = logging.getLogger("lrctl.lockstep")

MIN_TIMEOUT_S = 0.001
MAX_TIMEOUT_S = 60.0
MAX_EVERY = 1_000_000_000


def check_open(every: int, timeout: float) -> None:
    """InvalidArgumentError naming a bad `every` or `timeout` of an open."""
    if not 1 <= every <= MAX_EVERY:
        raise InvalidArgumentError(f"every {every} is out of range: give a step count from 1 to {MAX_EVERY}")
    if not (math.isfinite(timeout) and MIN_TIMEOUT_S <= timeout <= MAX_TIMEOUT_S):
        raise InvalidArgumentError(
            f"timeout_seconds {timeout!r} is out of range: give {MIN_TIMEOUT_S:g} to {MAX_TIMEOUT_S:g} "
            "seconds (training goes on by itself after it)")


@dataclass(frozen=True)
class TurnOutcome:
    """What happened at a held step: ended by the timeout, a decision that came after
    that, and the change ids recorded at that step (applied, failed)."""

    step: int
    timed_out: bool
    decided_late: bool
    applied: tuple[int, ...]
    failed: tuple[int, ...]


@dataclass(frozen=True)
class Turn:
    """A held step as the controller is told of it."""

    step: int
    version: int
    wall_time: float
    timeout: float
    previous: TurnOutcome | None
    ignored_decisions: int  # decisions for steps whose hold had ended, since the last turn


@dataclass(frozen=True)
class GateStatus:
    """A gate as GetStatus shows it."""

    peer: str
    token: str
    every: int
    timeout: float
    held_step: int | None
    turns: int
    timeouts: int
    ignored_decisions: int


# change ids recorded at a step: (applied, failed); the controller reads its history.
RecordsAt = Callable[[int], tuple[tuple[int, ...], tuple[int, ...]]]


class LockstepGate:
    """One controller's lockstep: hold every `every` steps for at most `timeout` s.

    `send(turn)` hands a turn to the stream; it is called on the training thread and
    must not block (the handler's outbox is bounded and drops the oldest unsent turn).
    `on_close()` tells the stream that the gate was closed (by the worker's close, or
    the stream itself); it must not block either.
    """

    def __init__(self, every: int, timeout: float, send: Callable[[Turn], None], *,
                 peer: str = "local", token: str = "",
                 on_close: Callable[[], None] | None = None) -> None:
        check_open(every, timeout)
        self.every, self.timeout, self.peer, self.token = every, timeout, peer, token
        self._send = send
        self._on_close = on_close
        self._cond = threading.Condition(threading.Lock())
        self._held: int | None = None  # the step held now
        self._decided = False
        self._closed = False
        self._first: int | None = None  # the first and the latest step held
        self._last: int | None = None
        self._last_timed_out = False
        self._last_late = False
        self._ignored = 0
        self.turns = 0
        self.timeouts = 0
        self.ignored_decisions = 0

    def holds_at(self, step: int) -> bool:
        """Whether hold() would hold at `step` (training thread)."""
        return not (step % self.every or self._closed)

    def hold(self, step: int, version: int, records_at: RecordsAt) -> bool:
        """At the boundary of `step` (training thread): when it is a held step, send
        its turn and wait for the decision, the timeout or close(). True when the hold
        ended by the timeout."""
        if not self.holds_at(step):
            return False
        # Read before taking the condition's lock (decide() takes it on the event loop):
        # only this thread writes _last.
        records = None if self._last is None else records_at(self._last)
        with self._cond:
            if self._closed:
                return False
            previous = None
            if records is not None and self._last is not None:
                previous = TurnOutcome(self._last, self._last_timed_out, self._last_late, *records)
            turn = Turn(step, version, time.time(), self.timeout, previous, self._ignored)
            self._ignored, self._last_late = 0, False
            self._held, self._decided = step, False
            if self._first is None:
                self._first = step
            self._last = step
            self.turns += 1
            try:
                self._send(turn)
            except Exception:  # the stream's loop is gone: a failed send must not cost the step
                log.warning("lrctl: lockstep turn for step %d could not be sent; lockstep is off",
                            step, exc_info=True)
                self._closed = True
                self._held = None
                return False
            try:
                decided = self._cond.wait_for(lambda: self._decided or self._closed, self.timeout)
            finally:
                self._held = None
            timed_out = not decided
            self._last_timed_out = timed_out
            if timed_out:
                self.timeouts += 1
            return timed_out

    def decide(self, step: int) -> bool:
        """The controller decided for `step` (any thread). True when that released the
        hold; False for a step whose hold had already ended (ignored, counted and
        reported in the next turn). InvalidArgumentError for a step never held."""
        with self._cond:
            if self._held == step and not self._decided:
                self._decided = True
                self._cond.notify_all()
                return True
            first, last = self._first, self._last
            if first is None or not first <= step <= last or (step - first) % self.every:
                held = "no step held yet" if last is None else f"the latest held step is {last}"
                raise InvalidArgumentError(
                    f"decided {step} names a step that was never held ({held}; holds come every "
                    f"{self.every} step(s))")
            self._ignored += 1
            self.ignored_decisions += 1
            if step == last:
                self._last_late = self._last_late or self._last_timed_out
            return False

    def close(self) -> None:
        """End lockstep: a hold in progress returns at once, none begins later, and
        `on_close` tells the stream (once)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._on_close is not None:
            try:
                self._on_close()
            except Exception:  # the stream's loop is gone: nothing left to tell
                log.debug("lrctl: lockstep close could not reach its stream", exc_info=True)

    @property
    def closed(self) -> bool:
        return self._closed

    def status(self) -> GateStatus:
        with self._cond:
            return GateStatus(self.peer, self.token, self.every, self.timeout, self._held,
                              self.turns, self.timeouts, self.ignored_decisions)
