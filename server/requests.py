"""Plain data for change requests, independent of gRPC and torch."""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from lrctl.common.errors import LrctlError
from lrctl.server.queue_limits import estimate_bytes

log = logging.getLogger("lrctl.server")


class Mode(Enum):
    """How an update's value is meant."""

    ABSOLUTE = "absolute"
    SCALE = "scale"
    UNPIN = "unpin"  # target PIN only: the rate follows base x schedule again


class Target(Enum):
    """What an update changes: a name's base rate (the default) or its pin."""

    BASE = "base"
    PIN = "pin"


@dataclass(slots=True)  # not frozen: made per change in the step hook (history.Record)
class Update:
    """One entry of a batch: set (or scale) the base, or the pin, of what `selector` matches."""

    selector: str
    value: float
    mode: Mode = Mode.ABSOLUTE
    target: Target = Target.BASE


@dataclass(frozen=True)
class ScheduleUpdate:
    """One entry of a batch: give what `selector` matches this schedule (None: constant)."""

    selector: str
    schedule: Any  # a lrctl.common.schedules.Schedule, or None to clear


@dataclass(slots=True)  # not frozen: made per change in the step hook (history.Record)
class ChangeRequest:
    """A batch of updates and its options, as a handler hands it to the controller."""

    updates: tuple[Update, ...]
    schedules: tuple[ScheduleUpdate, ...] = ()
    at_step: int | None = None
    expected_version: int | None = None
    reason: str = ""
    peer: str = "local"
    user: str = ""
    role: str = ""  # authenticated role and token name ("" without tokens)
    token: str = ""
    wait: bool = False  # a caller waits for it to apply (ListPending shows it)


@dataclass(frozen=True)
class RateChange:
    """One parameter's rate in force before and after a change, and what made it.

    The rate in force is the pin when there is one, else base x schedule factor.
    Schedules are named by their one-line description; "" means constant.
    """

    name: str
    old_lr: float
    new_lr: float
    old_base: float = math.nan
    new_base: float = math.nan
    old_pin: float | None = None
    new_pin: float | None = None
    old_schedule: str = ""
    new_schedule: str = ""


@dataclass(frozen=True)
class Outcome:
    """What a change did (or, before it is applied, is expected to do)."""

    change_id: int
    step: int  # -1: the next step boundary, whichever that is
    version: int
    applied: bool
    changes: tuple[RateChange, ...]


# One lock for the finishing of every change (a lock of its own cost the step hook ~6 us
# a change to make): held for a few list and flag operations, never while a callback runs.
_FINISH_LOCK = threading.Lock()


@dataclass(eq=False, slots=True)
class PendingChange:
    """An accepted change waiting for its step boundary.

    `ops` maps a parameter position to what happens to it; `finished` is set (and
    `done` true) once the change is applied, rejected at its step, or withdrawn.
    `deadline` (time.monotonic) is when its waiting caller will have been told it
    failed: a step boundary that comes later (a paused or overloaded worker) drops it
    instead of applying it.
    `size` estimates the bytes it holds (lrctl.server.queue_limits; given when the
    serving process estimated it already).
    """

    change_id: int
    request: ChangeRequest
    ops: dict[int, Any]  # position -> NameOp (lrctl.server.planner)
    requested_at: float
    outcome: Outcome | None = None
    error: LrctlError | None = None
    deadline: float | None = None
    # Set once its record is in the history and its finishing is under way (at once,
    # or through the audit log's writer): nothing else may finish it then.
    handed_over: bool = False
    _callbacks: list[Callable[["PendingChange"], None]] = field(default_factory=list, repr=False)
    size: int = -1
    # How the serving process planned it (lrctl.server.planned_wire.Planned), if it did.
    planned: Any = None
    # The Event is made only for a caller that waits on it: most changes have none, and
    # making one costs the step hook more than the rest of the change's bookkeeping.
    _done: bool = field(default=False, repr=False)
    _event: threading.Event | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.size < 0:
            self.size = estimate_bytes(self.request, self.ops, None if self.planned is None else self.planned.plan)

    @property
    def done(self) -> bool:
        """Whether the change is finished."""
        return self._done

    @property
    def finished(self) -> threading.Event:
        """An Event set once the change is finished."""
        with _FINISH_LOCK:
            if self._event is None:
                self._event = threading.Event()
                if self._done:
                    self._event.set()
            return self._event

    @property
    def due(self) -> int:
        """The step before which it applies; 0 for 'as soon as possible'."""
        return 0 if self.request.at_step is None else self.request.at_step

    def add_done_callback(self, fn: Callable[["PendingChange"], None]) -> None:
        """Call fn(self) once the change is finished (at once if it already is).

        fn runs on the thread that finishes the change, often the training thread inside
        the step hook with the controller's lock held: it must be quick and must not
        take that lock (an event loop's call_soon_threadsafe is the intended use).
        """
        with _FINISH_LOCK:
            if not self._done:
                self._callbacks.append(fn)
                return
        fn(self)

    def finish(self, outcome: Outcome | None = None, error: LrctlError | None = None) -> None:
        self.outcome, self.error = outcome, error
        with _FINISH_LOCK:
            self._done = True
            if self._event is not None:
                self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # a waiter's mistake must not cost the step
                log.exception("lrctl: a done-callback of change %d failed", self.change_id)
