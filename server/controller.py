"""The controller: the per-name rate table of one optimizer, and its changes.

Three parts: the pure planner (lrctl.server.planner: old -> new per name, limits,
for preview, submit and apply alike; the worker's guardrails, lrctl.server.guardrails,
check each plan it makes), the queue of accepted changes, each due at a
concrete step, and the rate table (lrctl.server.rates: base, schedule and pin per
name) that the step hook installs through the apply strategy.

Pure Python plus torch, no gRPC: handlers call it from server threads, the optimizer
step pre-hook calls it from the training thread. One lock guards the table; the hook
holds it to count the step, apply the changes that are due, and move scheduled rates
(O(rate classes), nothing when no schedule is in use). Validation, selector matching
and formatting happen outside the lock, on the caller's thread.

Scale (bench/bench_scale.py, 100,000 names): per-name RateChange objects are made only
for what a reply or the history reads (RateChanges), never in the step hook or for a
waiting Set; the dtype limit check looks at each distinct dtype once (falling back to
the per-name check only to name a value that fails); submit does its per-name work
outside the lock; a batch of disjoint selectors is merged with dict updates. Per-name
passes are plain comprehensions: on CPython 3.11 they beat map/compress over bound
methods (measured), and cProfile overstates Python loops, so time before changing one.
"""

from __future__ import annotations

import logging
import marshal
import math
import threading
import time
import uuid
from array import array
from collections import deque
from dataclasses import dataclass, replace
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from lrctl.common.errors import (
    AbortedError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LrctlError,
)
from lrctl.server.controller_state import ControllerState
from lrctl.server.guardrails import Guardrail, Guardrails
from lrctl.server.lockstep import GateStatus, LockstepGate
from lrctl.server.history import (
    DEFAULT_HISTORY_LIMIT,
    DEFAULT_HISTORY_MAX_BYTES,
    History,
    RateChanges,
    Record,
)
from lrctl.server.planned_wire import planned_from_wire
from lrctl.server.planner import NameOp, PlannedChange
from lrctl.server.posted_writes import TAKE_WAIT_S, PostedRing
from lrctl.server.queue_limits import QueueLimits, check_room
from lrctl.server.rates import RateState, RateTable, ScheduleBook
from lrctl.server import read_model
from lrctl.server.read_model import ParameterRow, RateRow, ScheduleRow, StaticPart, VersionedPart
from lrctl.server.requests import ChangeRequest, Outcome, PendingChange, RateChange, ScheduleUpdate
from lrctl.server.selectors import NameIndex
from lrctl.server.strategy import ApplyStrategy, CoalescedGroups, lr_value
from lrctl.server.telemetry import Telemetry
from lrctl.server.write_plan import WritePlanner, check_acceptable

log = logging.getLogger("lrctl.controller")

_NEVER = math.inf
# Queued changes are bounded in number and bytes, in all and per connection and token
# (lrctl.server.queue_limits.QueueLimits; these are the defaults).
MAX_PENDING = QueueLimits().max_changes
# Steps whose start times the hook keeps for lrctl_steps_per_second (lrctl.server.metrics).
STEP_WINDOW = 64

# Raises to stop the work of a call whose caller has gone (lrctl.server.cancel.CallCheck.check).
Check = Callable[[], None]

StrategyFactory = Callable[
    [torch.optim.Optimizer, Sequence[torch.Tensor], Sequence[str], Sequence[int], Mapping[int, float]],
    ApplyStrategy,
]


@dataclass(frozen=True)
class ParameterView:
    """A parameter and its current hyperparameters, as ListParameters shows it."""

    name: str
    shape: tuple[int, ...]
    numel: int
    dtype: str
    device: str
    requires_grad: bool
    in_optimizer: bool
    lr: float | None
    group: int
    hyperparameters: Mapping[str, float]

    @property
    def settable(self) -> bool:
        return self.in_optimizer and self.requires_grad


@dataclass(frozen=True)
class StatusView:
    """A snapshot of the controller's state."""

    step: int
    version: int
    optimizer: str
    num_parameters: int
    num_settable: int
    num_distinct_lrs: int
    num_param_groups: int
    state: str  # "waiting_for_first_step" | "training" | "closing"
    uptime_seconds: float
    seconds_since_last_step: float | None
    pending_changes: int
    run_id: str
    guardrails: tuple[Guardrail, ...] = ()
    max_factor: float | None = None


_DTYPE_NAMES: dict[torch.dtype, str] = {}
_DEVICE_NAMES: dict[torch.device, str] = {}


def _dtype_name(dtype: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def _device_name(device: torch.device) -> str:
    name = _DEVICE_NAMES.get(device)
    if name is None:
        name = _DEVICE_NAMES[device] = str(device)
    return name


@dataclass(frozen=True)
class MetricsSnapshot:
    """Numbers copied under the lock for the metrics endpoint (lrctl.server.metrics),
    which formats them outside it."""

    step: int
    version: int
    pending_changes: int
    step_times: tuple[float, ...]  # time.monotonic() of the latest steps' starts, oldest first
    now: float  # time.monotonic() when copied
    group_lrs: tuple[Any, ...]  # each physical param group's lr as the optimizer holds it
    rates: dict[int, float]  # rate class -> rate for the next step
    class_of: array  # name position -> rate class (-1: not held)
    changes: dict[str, int]  # recorded changes of this process by status ("OK": applied)


@dataclass(frozen=True)
class PendingView:
    """A queued change as ListPending shows it (Controller.pending())."""

    change_id: int
    request: ChangeRequest  # updates, schedules, at_step, who, reason, as sent
    requested_at: float
    waiting: bool  # a caller waits for it
    num_names: int
    size: int  # estimated bytes it holds in the queue


@dataclass(frozen=True)
class HistoryPage:
    """A reading of the history (Controller.history_page)."""

    records: list[Record]
    more: bool
    dropped: int  # records dropped from the front, in all
    oldest_version: int  # of the oldest applied record held; 0 if none
    gap: bool  # records this reading should have started with were dropped
    held: int  # records held


class Controller(ControllerState):
    """Owns per-name learning rates of one optimizer and applies changes at step boundaries.

    Steps are counted from 0 by a step pre-hook on the optimizer: a change applied "at
    step S" is in force for the (S+1)-th call of ``optimizer.step()`` and after.

    `group_schedules` (one per optimizer param group, or None) gives the names of a
    group a schedule, and `group_bases` their base rates (default: the group's lr):
    this is how a user's torch scheduler is adopted (lrctl.server.adopt).
    `on_step` callables run first in every step hook. `schedule_moves` (an adopted
    ReduceLROnPlateau's, lrctl.server.adopt) returns the moves a schedule made that are
    no function of the step; the hook records each batch of them as a change of the
    history (role "schedule") at the step they take effect. `start_step` is the index of the
    next step (0; a trainer resuming from a checkpoint without lrctl's state passes
    its own step count). `queue_limits` bounds the queue of accepted changes (how far
    ahead, how many, how many bytes, each connection's and token's share).
    `guardrails` bound the rates changes may set
    (lrctl.server.guardrails); a rule that matches no name raises ValueError.
    """

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, torch.Tensor]],
        optimizer: torch.optim.Optimizer,
        *,
        history_limit: int = DEFAULT_HISTORY_LIMIT,
        history_max_bytes: int = DEFAULT_HISTORY_MAX_BYTES,
        strategy: StrategyFactory = CoalescedGroups,
        group_schedules: Sequence[Any] | None = None,
        group_bases: Sequence[float] | None = None,
        on_step: Sequence[Callable[[], None]] = (),
        schedule_moves: Callable[[], Sequence[Any]] | None = None,
        start_step: int = 0,
        queue_limits: QueueLimits | None = None,
        guardrails: Guardrails | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError(
                "LBFGS allows exactly one param group, so lrctl cannot give its parameters "
                "rates of their own; use another optimizer"
            )
        pairs = list(named_parameters)
        names = [name for name, _ in pairs]
        self._params: list[torch.Tensor] = [p for _, p in pairs]
        self.index = NameIndex(names)
        self.guardrails = Guardrails() if guardrails is None else guardrails
        self._guard = self.guardrails.bind(self.index)
        self.run_id = uuid.uuid4().hex  # versions and change ids count from 0 per run
        self.optimizer = optimizer
        position = {id(p): i for i, p in enumerate(self._params)}
        n_groups = len(optimizer.param_groups)
        for what, given in (("group_schedules", group_schedules), ("group_bases", group_bases)):
            if given is not None and len(given) != n_groups:
                raise ValueError(f"{what} has {len(given)} entries for {n_groups} param groups")
        self._book = ScheduleBook()
        bases: list[float | None] = [None] * len(self._params)
        schedules = [0] * len(self._params)
        foreign = 0
        for g, group in enumerate(optimizer.param_groups):
            base = lr_value(group["lr"]) if group_bases is None else float(group_bases[g])
            sid = 0
            if group_schedules is not None and group_schedules[g] is not None:
                sid = self._book.intern(group_schedules[g])
            for p in group["params"]:
                i = position.get(id(p))
                if i is None:
                    foreign += 1
                else:
                    bases[i], schedules[i] = base, sid
        if foreign:
            raise ValueError(
                f"the optimizer holds {foreign} tensor(s) that are not among the named "
                "parameters given to lrctl; pass the model (or named parameters) that "
                "covers every tensor the optimizer updates"
            )
        self._lock = threading.Lock()
        self._table = RateTable(bases, schedules, self._book)
        if start_step < 0:
            raise ValueError(f"start_step {start_step} is negative")
        self._installed: dict[int, float] = self._table.rates(start_step)
        self._strategy = strategy(optimizer, self._params, names, self._table.class_of, self._installed)
        self._table.set_limits(self._strategy.limit_of)
        self._warn_outside_guardrails()
        self._history_limit = history_limit
        self._history_max_bytes = history_max_bytes
        self._history = History(history_limit, history_max_bytes)
        # Where finished changes go before their callers hear of them: the audit log
        # (lrctl.server.audit) completes them once their record is on disk.
        self.audit: Any = None
        # One event per step (metrics, change records, version) for WatchMetrics.
        self.telemetry = Telemetry() if telemetry is None else telemetry
        self.lineage: tuple[str, ...] = ()  # run ids of the runs this one resumed from
        self._pending: list[PendingChange] = []
        self.queue_limits = QueueLimits() if queue_limits is None else queue_limits
        self._next_due: float = _NEVER
        self._step = start_step
        self._version = 0
        # Checkpoint loads so far: a load may bring back a version number this run used
        # for another state, so a number names one state only between two loads.
        self.loads = 0
        self._next_change_id = 1
        # While a serving process queues changes itself (lrctl.server.posted_writes):
        # its ring, whose counter gives the change ids meanwhile.
        self._posted: PostedRing | None = None
        # Set when a change from the ring touched a parameter frozen since the serving
        # process's snapshot: it then gets a new static part at once (it looks every second).
        self.grads_changed = False
        self._closed = False
        self._started = time.monotonic()
        # Start times of the latest steps, the last one the latest step's (status, the
        # metrics' steps per second); bounded, so the hook's cost is one append.
        self._step_times: deque[float] = deque(maxlen=STEP_WINDOW)
        self._on_step = tuple(on_step)
        self._schedule_moves = schedule_moves
        # Called at the end of every step hook, once this boundary's changes are in (the
        # serving process's published step and version). A tuple, replaced whole: a
        # close() on another thread never mutates what a step is iterating.
        self._after_step: tuple[Callable[[], None], ...] = ()
        self._on_close: tuple[Callable[[], None], ...] = ()
        # The lockstep controller's gate (lrctl.server.lockstep), if one is attached;
        # without one, the hook's whole cost for lockstep is the test of this attribute.
        self._gate: LockstepGate | None = None
        self.lockstep_timeouts = 0  # holds ended by the timeout, this run, all gates
        self._portable, self._portable_checked = True, 1  # read_versioned: schedules seen so far
        self._usable = read_model.Usable(self._held, self._with_grad, self._why_unusable)
        self._writes = WritePlanner(self.index, self._usable, self._guard, self._strategy,
                                    lambda i: _dtype_name(self._params[i].dtype))
        self._hook = optimizer.register_step_pre_hook(self._before_step)

    def _warn_outside_guardrails(self) -> None:
        """The job's own starting rates are not refused, only reported: the guardrails
        bound what clients change, and a name outside may be moved back in."""
        if not self._guard.bounded:
            return
        installed, class_of = self._installed, self._table.class_of
        outside = self._guard.outside({i: installed[c] for i, c in enumerate(class_of) if c >= 0})
        if outside:
            i = outside[0]
            log.warning(
                "lrctl: %d parameter(s) start with a rate outside their guardrails, e.g. %r at %r "
                "(bounds %r..%r); changes must bring them inside",
                len(outside), self.index.names[i], installed[class_of[i]], self._guard.low[i],
                self._guard.high[i])

    # -- reads ---------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return self.index.names

    @property
    def step(self) -> int:
        """Index of the next optimizer step."""
        return self._step

    @property
    def parameters(self) -> tuple[torch.Tensor, ...]:
        """The named parameters, in model order (names[i] is parameters[i]'s name)."""
        return tuple(self._params)

    def rebase(self, bases: Mapping[int, float]) -> None:
        """Set the base rates of names (position -> base) without a recorded change: a
        plain torch checkpoint (no lrctl state) was loaded and its rates win. The names
        keep their schedules; pins are left alone. It counts as a load: the config
        version stays, so (loads, version) must name the new state for what a serving
        process read or planned before it (Controller.loads_and_version)."""
        with self._lock:
            indices = [i for i in bases if self._table.base[i] is not None]
            ring = self._posted
            if ring is not None:  # changes planned before it are not queued there again
                with self._ring_emptied(ring) as header:
                    ring.set_loads(header, self.loads + 1)
            self.loads += 1
            self._commit(indices, [bases[i] for i in indices], None, None, self._step)
        for after in self._after_step:  # published before the load returns
            after()

    def adopted_positions(self) -> set[int]:
        """Positions of the names whose schedule is an adopted torch scheduler."""
        book, table = self._book, self._table
        with self._lock:
            return {i for i, s in enumerate(table.schedule) if s and book[s].kind == "adopted"}

    def reinstall(self) -> None:
        """Write every rate (and driven hyperparameter) into the optimizer again, e.g.
        after a plain torch load_state_dict replaced its group dicts."""
        with self._lock:
            self._reinstall()

    def _reinstall(self) -> None:
        """reinstall() with the lock held."""
        self._installed = self._table.rates(self._step)
        self._strategy.set_rates(self._installed)
        self._install_driven()

    def _install_driven(self) -> None:
        """The hyperparameters adopted schedulers drive (momentum, betas), into the groups."""
        if self._table.driven:
            self._strategy.set_hyperparameters(
                {c: schedule.driven() for c, schedule in self._table.driven.items()})

    @property
    def version(self) -> int:
        return self._version

    def loads_and_version(self) -> tuple[int, int]:
        """(checkpoint loads, config version) of one state, without the lock (a step hook
        reads it every step): a load counts itself before it sets the version
        (ControllerState.apply_state), so loads that did not move across the version's
        read name that version's state."""
        while True:
            loads = self.loads
            version = self._version
            if self.loads == loads:
                return loads, version

    def add_after_step(self, callback: Callable[[], None]) -> None:
        """Call `callback()` at the end of every step hook (training thread), and after
        a checkpoint load (the loading thread): it must be cheap and must not raise."""
        with self._lock:
            self._after_step = (*self._after_step, callback)

    def add_on_close(self, callback: Callable[[], None]) -> None:
        """Call `callback()` when close() begins (it must be cheap and must not raise)."""
        with self._lock:
            self._on_close = (*self._on_close, callback)

    def remove_after_step(self, callback: Callable[[], None]) -> None:
        with self._lock:
            # ==, not `is`: a bound method is a new object each time it is read.
            self._after_step = tuple(c for c in self._after_step if c != callback)

    @property
    def rates_move_with_step(self) -> bool:
        """True while a schedule (or an adopted scheduler) moves some rate with the step:
        then a read's rates are those of one step only."""
        table = self._table
        return bool(table.scheduled or table.driven)

    @property
    def pending_count(self) -> int:
        with self._lock:
            self._take_posted(wait=False)
            return len(self._pending)

    def learning_rates(self) -> dict[str, float]:
        """Every held parameter's rate for the next step, in model order."""
        with self._lock:
            rates = self._table.rates(self._step)
            class_of = array("q", self._table.class_of)
        return {n: rates[c] for n, c in zip(self.index.names, class_of) if c >= 0}

    def filter(self, selector: str, *, check: Check | None = None) -> Sequence[int]:
        """Positions of the parameters a ListParameters filter matches (may be none)."""
        return self.index.filter(selector, check=check)

    def names_at(self, positions: Sequence[int]) -> Sequence[str]:
        """The names at the given positions (ListParameters' names view)."""
        return self.index.names_at(positions)

    def describe(self, positions: Sequence[int]) -> list[ParameterView]:
        """Views of the given parameters with their rates and groups right now."""
        return [ParameterView(*row) for row in self.parameter_rows(positions)]

    def _rates_of(
        self, positions: Sequence[int], step: int | None = None
    ) -> tuple[list[float | None], list[int], int]:
        """Rates at `step` (default: the next step) and groups of `positions` (lock held)."""
        table = self._table
        step = self._step if step is None else step
        rates = table.rates(step)
        class_of = table.class_of
        lrs = [rates.get(class_of[i]) for i in positions]
        return lrs, self._strategy.groups_of(positions), step

    def parameter_rows(self, positions: Sequence[int]) -> list[ParameterRow]:
        """describe() as plain tuples in ParameterView's field order (ListParameters)."""
        with self._lock:
            lrs, groups, _ = self._rates_of(positions)
        names, params, hyperparameters = self.index.names, self._params, self._strategy.hyperparameters
        rows: list[ParameterRow] = []
        append = rows.append
        for i, lr, group in zip(positions, lrs, groups):
            p, held = params[i], lr is not None
            append((
                names[i], tuple(p.shape), p.numel(), _dtype_name(p.dtype), _device_name(p.device),
                p.requires_grad, held, lr, group, hyperparameters(i) if held else {},
            ))
        return rows

    def read(
        self, selectors: Sequence[str], *, step: int | None = None
    ) -> tuple[list[RateRow], int, int]:
        """Rate rows for what the selectors match, in model order; version; step.

        `step` defaults to the next step; ``controller.step - 1`` gives the rates the
        last step used (what a trainer's logger wants), as far as the current bases,
        pins and schedules tell (an adopted torch scheduler only knows its latest rate).
        """
        rows, version, step, _ = self.read_page(selectors, step=step)
        return rows, version, step

    def _chosen(self, selectors: Sequence[str], check: Check | None = None) -> Sequence[int]:
        return read_model.chosen(self.index, self._usable, selectors, check)

    def read_page(
        self, selectors: Sequence[str], start: int = 0, limit: int | None = None,
        *, step: int | None = None, check: Check | None = None,
    ) -> tuple[list[RateRow], int, int, int]:
        """read() of matches [start, start + limit), and the number of matches in all.

        Rates are those of `step` (default: the next step), unless a change is applied first.
        `check` (here and in the other calls that resolve selectors) is called between
        selectors and every ~1024 names, and raises to stop work whose caller has gone.
        """
        chosen = self._chosen(selectors, check)
        total = len(chosen)
        chosen = chosen[start:] if limit is None else chosen[start:start + limit]
        names, table, book = self.index.names, self._table, self._book
        with self._lock:
            lrs, groups, step = self._rates_of(chosen, step)
            version = self._version
            bases = [table.base[i] for i in chosen]
            schedules = [table.schedule[i] for i in chosen]
            pinned = [i in table.pins for i in chosen]
            rows = read_model.rate_rows(names, chosen, lrs, groups, bases, schedules, pinned, book, step)  # type: ignore[arg-type]
        return rows, version, step, total

    def schedules(
        self, selectors: Sequence[str], start: int = 0, limit: int | None = None,
        *, check: Check | None = None,
    ) -> tuple[list[ScheduleRow], int, int, int]:
        """Each matched name's base, pin and schedule, for matches [start, start + limit);
        version; step; the number of matches in all."""
        chosen = self._chosen(selectors, check)
        total = len(chosen)
        chosen = chosen[start:] if limit is None else chosen[start:start + limit]
        names, table, book = self.index.names, self._table, self._book
        with self._lock:
            rows = [
                ScheduleRow(names[i], table.base[i], table.pins.get(i), table.schedule[i],  # type: ignore[arg-type]
                            book[table.schedule[i]])
                for i in chosen
            ]
            return rows, self._version, self._step, total

    # -- read snapshots (the serving process, lrctl.server.read_model) -------------
    def read_static(self) -> StaticPart:
        """What reads need that never changes after attach (sent once)."""
        params, table = self._params, self._table
        held = [b is not None for b in table.base]
        hypers: list[dict[str, float]] = []
        ids: dict[int, int] = {}
        hyper_of = []
        for i, h in enumerate(held):
            if not h:
                hyper_of.append(-1)
                continue
            values = self._strategy.hyperparameters(i)
            k = ids.get(id(values))
            if k is None:  # one entry per template, not per name
                k = ids[id(values)] = len(hypers)
                hypers.append(dict(values))
            hyper_of.append(k)
        return StaticPart(
            names=list(self.index.names), shapes=[tuple(p.shape) for p in params],
            numels=[p.numel() for p in params], dtypes=[_dtype_name(p.dtype) for p in params],
            devices=[_device_name(p.device) for p in params],
            requires_grad=[p.requires_grad for p in params], held=held, hyper_of=hyper_of, hypers=hypers,
            max_lr=[self._strategy.limit_of(i) if h else math.inf for i, h in enumerate(held)],
            safe_lr=self._strategy.safe_lr, guardrails=self.guardrails, queue_limits=self.queue_limits)

    def grad_flags(self) -> bytes:
        """Each parameter's requires_grad now, in model order (read_static's copy goes
        stale when a job freezes or unfreezes layers)."""
        return bytes([p.requires_grad for p in self._params])

    def read_versioned(self, book_start: int) -> VersionedPart | None:
        """The table at this (step, version), copied under the lock; None while the
        reads cannot be answered from a copy (an adopted torch scheduler: its rates and
        driven hyperparameters live in torch objects)."""
        with self._lock:
            table, book = self._table, self._book
            checked = self._portable_checked
            if checked < len(book):  # the book only grows: look at each schedule once
                self._portable = self._portable and all(read_model.is_portable(book[s]) for s in range(checked, len(book)))
                self._portable_checked = len(book)
            if table.driven or not self._portable:
                return None
            # Empty parts without a comprehension each: this runs in the step hook after
            # every change, and most jobs have no pins and no new schedules.
            pins = dict(table.pins)
            return VersionedPart(
                version=self._version, loads=self.loads, step=self._step, class_of=table.class_of.tobytes(),
                classes=table.classes(), pins=pins,
                pinned_base={i: table.base[i] for i in pins} if pins else {},  # type: ignore[misc]
                pinned_schedule={i: table.schedule[i] for i in pins} if pins else {},
                groups=array("q", self._strategy.groups_of(range(len(self._params)))).tobytes(),
                new_schedules=[book[s] for s in range(book_start, len(book))] if book_start < len(book) else [],
                book_start=book_start)

    def status(self) -> StatusView:
        with self._lock:
            self._take_posted(wait=False)
            step, version, pending = self._step, self._version, len(self._pending)
            rates = set(self._table.rates(step).values())
            last = self._step_times[-1] if self._step_times else None
            groups = self._strategy.num_groups
        now = time.monotonic()
        if self._closed:
            state = "closing"
        else:
            state = "training" if step else "waiting_for_first_step"
        cls = type(self.optimizer)
        return StatusView(
            step=step,
            version=version,
            optimizer=f"{cls.__module__}.{cls.__qualname__}",
            num_parameters=len(self.index),
            num_settable=sum(
                1 for p, b in zip(self._params, self._table.base) if b is not None and p.requires_grad
            ),
            num_distinct_lrs=len(rates),
            num_param_groups=groups,
            state=state,
            uptime_seconds=now - self._started,
            seconds_since_last_step=None if last is None else now - last,
            pending_changes=pending,
            run_id=self.run_id,
            guardrails=self.guardrails.rules,
            max_factor=self.guardrails.max_factor,
        )

    def readable_positions(self, selector: str) -> tuple[int, ...]:
        """Positions of the held parameters `selector` matches (model order); raises
        NotFoundError / FailedPreconditionError as a read of it would."""
        return self._resolve(selector, for_set=False)

    def metrics_snapshot(self) -> MetricsSnapshot:
        """What the metrics endpoint shows, copied under the lock: O(groups + rate
        classes) Python work plus one memcpy of the class array; no formatting."""
        with self._lock:
            self._take_posted(wait=False)
            step = self._step
            return MetricsSnapshot(
                step=step,
                version=self._version,
                pending_changes=len(self._pending),
                step_times=tuple(self._step_times),
                now=time.monotonic(),
                group_lrs=tuple([g["lr"] for g in self.optimizer.param_groups]),
                rates=self._table.rates(step),
                class_of=self._table.class_of[:],
                changes=dict(self._history.counts),
            )

    def history(self, after_version: int, limit: int) -> tuple[list[Record], bool, int]:
        """Up to `limit` records after a version; whether more follow; how many were dropped."""
        page = self.history_page(after_version, 0, limit)
        return page.records, page.more, page.dropped

    def history_page(self, after_version: int, after_seq: int, limit: int) -> "HistoryPage":
        """Up to `limit` records after the change that made `after_version` and after
        record `after_seq` (0: from the start), with what a reader needs to know of drops."""
        with self._lock:
            history = self._history
            it = history.after(after_version, after_seq)
            records = [r for _, r in zip(range(limit), it)]
            more = next(it, None) is not None
            return HistoryPage(records, more, history.dropped, history.oldest_version,
                               history.gap(after_version, after_seq), len(history))

    def rate_changes(self, record: Record, limit: int) -> tuple[RateChange, ...]:
        """The first `limit` per-name changes of a record, with names."""
        if record.plan is None:
            return ()
        return self._changes(record.plan)[:limit]

    def _changes(self, plan: PlannedChange) -> RateChanges:
        return self._writes.changes(plan)

    def matched_names(self, request: ChangeRequest) -> list[str]:
        """The names `request` would touch, in model order; raises what submit would for
        its selectors and values (replay checks a recorded change against this run)."""
        names = self.index.names
        return [names[i] for i in self._resolve_batch(request)]

    # -- writes --------------------------------------------------------------------
    def preview(self, request: ChangeRequest, *, check: Check | None = None) -> Outcome:
        """What `request` would do now (a dry run); raises what submit would raise."""
        ops = self._resolve_batch(request, check)
        with self._lock:
            self._check_acceptable(request)
            state, version, step = self._table.copy(), self._version, self._step
        return self._expected_outcome(0, request, ops, state, version, step)

    def submit(
        self, request: ChangeRequest, *, deadline: float | None = None, check: Check | None = None,
        planned: Any = None,
    ) -> tuple[PendingChange, Outcome | None]:
        """Validate and queue a change; returns it and its expected outcome.

        The per-name work (old -> new, limits) runs on a copy of the table taken under
        the lock, outside it, so the step hook never waits for it (100k names: ~40 ms).
        The change is queued only if no change was applied meanwhile (the config
        version is unchanged), else planned again; a third try holds the lock. A
        change that fails validation is never queued. `deadline` (time.monotonic): past
        it, the change is dropped at its step, not applied (see PendingChange). `check`:
        see read_page; a change whose caller has gone is never queued.

        `planned` (lrctl.server.planned_wire.Planned: `request`'s positions and ops,
        resolved, checked and planned against config version `planned.version` in the
        serving process) is queued at once, with the live-state checks only, while the
        version is still that one and every parameter it touches still requires grad;
        the outcome is then None (the planner has it). Otherwise it is planned again
        here, as any change.
        """
        # A parameter frozen since the serving process's snapshot was made: resolved again here.
        if planned is not None and len(self._with_grad(planned.ops)) == len(planned.ops):
            ops = planned.ops
            with self._lock:
                if self._version == planned.version and self.loads == planned.loads:
                    self._check_acceptable(request)
                    return self._enqueue(request, ops, deadline, planned), None
        else:
            ops = self._resolve_batch(request, check)
        if check is not None:
            check()
        for _ in range(2):
            with self._lock:
                self._check_acceptable(request)
                state, version, step = self._table.copy(), self._version, self._step
            outcome = self._expected_outcome(0, request, ops, state, version, step)  # may raise
            with self._lock:
                if self._version == version:
                    self._check_acceptable(request)
                    pending = self._enqueue(request, ops, deadline)
                    return pending, replace(outcome, change_id=pending.change_id)
        with self._lock:  # changes keep landing meanwhile: all of it under the lock
            self._check_acceptable(request)
            outcome = self._expected_outcome(0, request, ops, self._table, self._version, self._step)
            pending = self._enqueue(request, ops, deadline)
            return pending, replace(outcome, change_id=pending.change_id)

    def _enqueue(
        self, request: ChangeRequest, ops: dict[int, NameOp], deadline: float | None = None,
        planned: Any = None,
    ) -> PendingChange:
        """Queue a validated change (lock held), within the queue's bounds and shares."""
        pending = PendingChange(0, request, ops, time.time(), deadline=deadline, planned=planned)
        ring = self._posted
        if ring is None:
            check_room(self._pending, pending, self.queue_limits)  # O(queue): at most max_changes
            pending.change_id = self._next_change_id
            self._next_change_id += 1
            self._queue(pending)
            return pending
        with self._ring_emptied(ring) as header:
            check_room(self._pending, pending, self.queue_limits)
            pending.change_id = ring.claim(header)
            self._queue(pending)
            ring.set_queue(header, *self._queue_load())
        return pending

    def _queue(self, pending: PendingChange) -> None:
        self._pending.append(pending)
        self._next_due = min(self._next_due, pending.due)

    def _claim_id(self) -> int:
        """The next change id (lock held), after what the serving process queued."""
        ring = self._posted
        if ring is None:
            change_id = self._next_change_id
            self._next_change_id += 1
            return change_id
        with self._ring_emptied(ring) as header:
            return ring.claim(header)

    def _peek_change_id(self) -> int:
        """The id the next change will get (lock held)."""
        ring = self._posted
        if ring is None:
            return self._next_change_id
        with ring.locked() as header:
            return ring.next_id(header)

    def _queue_load(self, past: int | None = None) -> tuple[int, int]:
        """The queue's count and estimated bytes, as the ring's header holds them (lock
        held); with `past`, of the changes that stay queued past step boundary `past`."""
        if not self._pending:
            return 0, 0
        staying = self._pending if past is None else [p for p in self._pending if p.due > past]
        return len(staying), sum(p.size for p in staying)

    # -- changes the serving process queued itself (lrctl.server.posted_writes) ----------
    def attach_posted(self, ring: PostedRing) -> None:
        """Let a serving process queue changes through `ring`; its counter gives the
        change ids from now on."""
        with self._lock:
            with ring.locked() as header:
                ring.set_next_id(header, self._next_change_id)
                ring.set_loads(header, self.loads)
                ring.set_queue(header, *self._queue_load())
                ring.set_closed(header, self._closed)
            self._posted = ring

    def detach_posted(self) -> None:
        """Stop taking changes from the ring (its serving process stopped): what it
        holds is queued, and the ids count on here."""
        with self._lock:
            ring = self._posted
            if ring is None:
                return
            with self._ring_emptied(ring) as header:
                ring.set_closed(header)
                self._next_change_id = ring.next_id(header)
            self._posted = None

    @contextmanager
    def _ring_emptied(self, ring: PostedRing) -> Iterator[list[int]]:
        """The ring's header under its lock, once what the ring held is in the queue
        (lock held): whatever the block queues or numbers comes after it, in the order
        the ids were given."""
        with ring.locked() as header:
            self._adopt_posted(ring.take(header, *self._queue_load()))
            yield header

    def _take_posted(self, wait: bool = True, boundary: int | None = None) -> list[PendingChange] | None:
        """Queue what the serving process put in the ring (lock held); None if it did
        not take the ring. The step hook and the counts do not wait long for the ring's
        lock (`wait` False): the ring then waits for the next boundary, or read.

        At step `boundary`, the step hook's, the changes due there are not queued but
        returned, to be applied after the queue's (they are newer: whatever the queue
        holds was queued after the ring was last taken), and the ring's header is told
        the queue as it will be past that boundary: every change in the ring is due
        there (posted_writes), and no change is queued before the boundary's changes
        are applied."""
        ring = self._posted
        if ring is None or not ring.waiting():
            return None
        stays = boundary is None
        load = self._queue_load(boundary)
        taken = ring.take_now(*load, ring_stays=stays)
        if taken is None:
            held = ring.locked() if wait else ring.try_locked(TAKE_WAIT_S)
            if held is None:
                return None
            with held as header:
                taken = ring.take(header, *load, ring_stays=stays)
        # The ring's lock is free meanwhile: the serving process posts on.
        return self._adopt_posted(taken, boundary)

    def _adopt_posted(self, entries: Sequence[tuple[int, float, int, bytes]],
                      boundary: int | None = None) -> list[PendingChange]:
        """Queue changes taken from the ring (lock held), with the checks that need the
        live state; one that fails them is recorded as failed (its caller was answered).
        Those due at step `boundary` are returned instead: applied there, they never
        wait in the queue, so its bounds need not be checked for them."""
        now: list[PendingChange] = []
        for change_id, requested_at, size, body in entries:
            try:
                planned = planned_from_wire(marshal.loads(body))
            except Exception:  # a bug: the serving process wrote what it planned
                log.exception("lrctl: change %d from the serving process could not be read; "
                              "it was not applied", change_id)
                continue
            pending = PendingChange(change_id, planned.request, planned.ops, requested_at, size=size,
                                    planned=planned)
            try:
                frozen = [i for i in planned.ops if not self._params[i].requires_grad]
                if frozen:
                    self.grads_changed = True  # the serving process's static part is stale
                    raise FailedPreconditionError(
                        f"parameter {self.index.names[frozen[0]]!r} no longer requires grad; "
                        f"change {change_id} was not applied")
                if boundary is not None and pending.due <= boundary:
                    now.append(pending)
                    continue
                check_room(self._pending, pending, self.queue_limits)
            except LrctlError as exc:
                log.warning("lrctl: change %d was not applied: %s", change_id, exc)
                self._fail(pending, self._step if boundary is None else boundary, exc)
                continue
            self._queue(pending)
        return now

    def withdraw(self, pending: PendingChange, error: LrctlError | None = None) -> bool:
        """Take a change back if it has not been applied; True when it was withdrawn."""
        with self._lock:
            if pending not in self._pending:
                return False
            self._pending.remove(pending)
            self._next_due = min((p.due for p in self._pending), default=_NEVER)
        pending.finish(
            error=error
            or DeadlineExceededError(f"change {pending.change_id} withdrawn before it was applied")
        )
        return True

    def queued(self) -> list[PendingChange]:
        """The queued changes themselves, in order of acceptance (for the worker's own
        feeders: lrctl.server.replay)."""
        with self._lock:
            self._take_posted()
            return list(self._pending)

    def pending(self) -> list[PendingView]:
        """A snapshot of the queued changes, in order of acceptance."""
        with self._lock:
            self._take_posted()
            queued = list(self._pending)
        views = [
            PendingView(p.change_id, p.request, p.requested_at,
                        p.request.wait and not p.done, len(p.ops), p.size)
            for p in queued
        ]
        return sorted(views, key=lambda v: v.change_id)

    def cancel(self, change_ids: Iterable[int], *, by: str, reason: str = "") -> tuple[list[int], list[int]]:
        """Take queued changes out of the queue; they are never applied. Returns (cancelled,
        not found) ids; not found: unknown, already applied, withdrawn or cancelled.

        Under the lock, as the step hook applies changes: a change is either applied
        first (and not found here) or cancelled first (and never applied). A waiting
        caller gets ABORTED at once, naming `by`; the history (and the audit log)
        records the cancelled change as failed with that status and message.
        """
        wanted = dict.fromkeys(change_ids)  # in the order given, without repeats
        why = f": {reason}" if reason else ""
        with self._lock:
            self._take_posted()
            taken = [p for p in self._pending if p.change_id in wanted]
            if taken:
                gone = {id(p) for p in taken}
                self._pending = [p for p in self._pending if id(p) not in gone]
                self._next_due = min((p.due for p in self._pending), default=_NEVER)
            for p in taken:  # recorded (history, audit log): who took it out, and why
                self._fail(p, self._step, AbortedError(
                    f"change {p.change_id} was cancelled by {by} before it was applied{why}"))
        for p in taken:
            log.warning("lrctl: change %d cancelled by %s before it was applied (reason %r)",
                        p.change_id, by, reason)
        found = {p.change_id for p in taken}
        return [i for i in wanted if i in found], [i for i in wanted if i not in found]

    def close(self) -> None:
        """Detach from the optimizer; pending changes fail (recorded as failed), none is
        applied later. The on_close callbacks run first (the serving process's dry runs
        say "shutting down" from then on)."""
        for callback in self._on_close:
            try:
                callback()
            except Exception:  # closing goes on
                log.exception("lrctl: a close callback failed")
        self._hook.remove()
        gate = self._gate
        if gate is not None:
            self.detach_lockstep(gate)
        with self._lock:
            self._closed = True
            ring = self._posted
            if ring is not None:
                with self._ring_emptied(ring) as header:  # nothing is queued there from now on
                    ring.set_closed(header)
            pending, self._pending, self._next_due = self._pending, [], _NEVER
            step = self._step
            for p in pending:
                self._fail(p, step, FailedPreconditionError(
                    f"the worker shut down at step {step}; change {p.change_id} was not applied"))
        self.telemetry.close()

    # -- lockstep ----------------------------------------------------------------------
    def attach_lockstep(self, gate: LockstepGate) -> None:
        """Make `gate` the one lockstep controller; FailedPreconditionError naming the
        holder's peer when another is attached, or when the worker is shutting down."""
        with self._lock:
            if self._closed:
                raise FailedPreconditionError("the worker is shutting down; lockstep cannot start")
            holder = self._gate
            if holder is not None and not holder.closed:
                raise FailedPreconditionError(
                    f"lockstep is held by another controller ({holder.peer}"
                    + (f", token {holder.token!r}" if holder.token else "")
                    + "); one lockstep controller at a time: end that one first")
            self._gate = gate

    def detach_lockstep(self, gate: LockstepGate) -> None:
        """End `gate`: a hold in progress is released at once; lockstep is off."""
        gate.close()
        with self._lock:
            if self._gate is gate:
                self._gate = None

    @property
    def lockstep_attached(self) -> bool:
        """True while a lockstep controller is attached (a read without the lock)."""
        gate = self._gate
        return gate is not None and not gate.closed

    def lockstep_status(self) -> GateStatus | None:
        """The attached gate's status, or None."""
        gate = self._gate
        return None if gate is None or gate.closed else gate.status()

    def _records_at(self, step: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Ids of the changes recorded at `step`, (applied, failed): the history's tail,
        read back to the first record of an earlier step."""
        with self._lock:
            records = self._history.at_step(step)
        return (tuple(r.change_id for r in records if not r.failed),
                tuple(r.change_id for r in records if r.failed))

    def _hold(self, gate: LockstepGate) -> None:
        """Lockstep's hold at this boundary (training thread, no lock held: the
        controller's calls that decide go through the lock meanwhile). The step counter
        is only written on this thread, so it is read here without the lock."""
        try:
            if gate.hold(self._step, self._version, self._records_at):
                with self._lock:
                    self.lockstep_timeouts += 1
        except Exception:  # a bug here must not cost the step
            log.exception("lrctl: lockstep hold failed; lockstep is off")
            self.detach_lockstep(gate)

    # -- the step boundary (training thread) -----------------------------------------
    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        for on_step in self._on_step:
            on_step()
        gate = self._gate
        if gate is not None:
            if self._posted is not None:
                with self._lock:
                    self._take_posted(wait=False)
            if self._next_due <= self._step and gate.holds_at(self._step):
                # Changes already due at a held step are applied before the hold, so the
                # turn's version includes them: a decision taken on it (expected_version =
                # turn.version) is refused only by a writer that came in during the hold.
                with self._lock:
                    self._apply_due(self._step, time.monotonic())
                for after in self._after_step:  # published before the turn names the version
                    after()
            self._hold(gate)
        with self._lock:
            step = self._step
            self._step = step + 1
            self._step_times.append(time.monotonic())
            self.telemetry.step(step, self._version)
            if self._schedule_moves is not None:
                self._record_moves(step)
            # Taken just before they are applied: nothing between can leave them unapplied.
            posted = None if self._posted is None else self._take_posted(wait=False, boundary=step)
            if self._next_due <= step or posted:
                self._apply_due(step, room_left=posted is not None, posted=posted or ())
            if self._table.scheduled or self._table.driven:
                self._tick(step)
        for after in self._after_step:
            after()
        return None

    def _record_moves(self, step: int) -> None:
        """Record what a metric-fed schedule changed since the last step as one applied
        change (lock held): who is the schedule, old and new per name that follows it
        (pinned names did not move). A failure costs the record, never the step."""
        try:
            moves = self._schedule_moves()  # type: ignore[misc]
            if not moves:
                return
            table, book = self._table, self._book
            by_sid = {sid: m for m in moves if (sid := book.find(m.group)) is not None}
            indices, old_lr, new_lr, bases = array("q"), array("d"), array("d"), array("d")
            for i, sid in enumerate(table.schedule):
                move = by_sid.get(sid)
                base = table.base[i]
                if move is None or base is None or i in table.pins:
                    continue
                indices.append(i)
                bases.append(base)
                old_lr.append(move.group.rate_for(base, move.old_lr))
                new_lr.append(move.group.rate_for(base, move.new_lr))
            if not indices:
                return
            plan = PlannedChange(step=step, indices=indices, old_lr=old_lr, new_lr=new_lr,
                                 old_base=bases, new_base=array("d", bases), old_pin=None,
                                 new_pin=None, old_schedule=None, new_schedule=None, schedules={})
            describe = getattr(moves[0].group, "move_reason", None)
            reason = describe() if callable(describe) else "the schedule moved the rate"
            self._version += 1
            change_id = self._claim_id()
            now = time.time()
            record = self._history.append(Record(
                change_id=change_id, version=self._version, step=step, applied_at=now,
                requested_at=now, updates=(), schedules=(), plan=plan, peer="worker",
                user="schedule", reason=reason, at_step=None, role="schedule",
            ))
            self.telemetry.add_change(record)
            if self.audit is not None:
                self.audit.submit(record, None, None, None, self._changes(plan))
        except Exception:  # a bug here must not cost the step
            log.exception("lrctl: recording the schedule's rate change at step %d failed", step)

    def _apply_due(self, step: int, now: float | None = None, room_left: bool = False,
                   posted: Sequence[PendingChange] = ()) -> None:
        """Apply the changes due at `step` (lock held), the queue's and then `posted`,
        those taken from the ring at this boundary; `room_left`: the ring's header
        already counts them gone (_take_posted at this boundary)."""
        due: list[PendingChange] = []
        if self._next_due <= step:
            due = [p for p in self._pending if p.due <= step]
            self._pending = [p for p in self._pending if p.due > step]
            self._next_due = min((p.due for p in self._pending), default=_NEVER)
        due += posted
        now = self._step_times[-1] if now is None else now
        for k, pending in enumerate(due):
            if pending.deadline is not None and now > pending.deadline:
                # Its caller has been (or is being) told DEADLINE_EXCEEDED: never apply it.
                self._fail(pending, step, DeadlineExceededError(
                    f"change {pending.change_id} was dropped, NOT applied: step {step} began after "
                    "its caller's deadline (the worker was paused or busy)"))
                log.warning("lrctl: change %d dropped at step %d: its deadline had passed",
                            pending.change_id, step)
                continue
            try:
                self._apply_guarded(pending, step)
            except BaseException:  # KeyboardInterrupt & co. in the training thread
                self._abandon(due[k:], step)
                raise
        if self._posted is not None and not room_left:
            self._leave_room(self._posted)

    def _leave_room(self, ring: PostedRing) -> None:
        """Tell the ring the queue's count and bytes once changes left it at a boundary
        (lock held), so that the serving process queues the next ones there and not over
        the link. Never waits: a ring held now keeps its (higher) count until the next."""
        held = ring.try_locked(0.0)
        if held is not None:
            with held as header:
                ring.set_queue(header, *self._queue_load())

    def _tick(self, step: int) -> None:
        """Install this step's rate of every scheduled class whose rate moved."""
        installed = self._installed
        moved = {c: r for c, r in self._table.scheduled_rates(step).items() if installed.get(c) != r}
        if moved:
            self._strategy.set_rates(moved)
            installed.update(moved)
        self._install_driven()

    def _abandon(self, changes: Sequence[PendingChange], step: int) -> None:
        """Finish changes that an interrupt left half-way, so no caller waits forever."""
        for pending in changes:
            if not pending.done and not pending.handed_over:
                self._fail(pending, step, InternalError(
                    f"step {step} was interrupted while applying changes; change "
                    f"{pending.change_id} may not have been applied: the history tells"
                ))

    def _apply_guarded(self, pending: PendingChange, step: int) -> None:
        """Apply one change; whatever goes wrong costs the change, never the step."""
        try:
            outcome, record = self._apply(pending, step)
        except LrctlError as exc:
            # Said here too: a change accepted without waiting has no one to tell.
            log.warning("lrctl: change %d was not applied: %s", pending.change_id, exc)
            self._fail(pending, step, exc)
        except Exception as exc:  # a bug here must not kill training
            log.exception("lrctl: applying change %d failed", pending.change_id)
            self._fail(pending, step, InternalError(f"applying change {pending.change_id} failed: {exc!r}"))
        else:
            self._hand_over(pending, record, outcome=outcome)

    def _hand_over(
        self, pending: PendingChange, record: Record, *, outcome: Outcome | None = None,
        error: LrctlError | None = None,
    ) -> None:
        """Finish a change whose record is in the history (lock held): through the audit
        log when there is one (it finishes the change once the record is on disk, on
        its own thread: the step never waits for the disk), else at once."""
        pending.handed_over = True
        self.telemetry.add_change(record)
        if self.audit is None:
            pending.finish(outcome=outcome, error=error)
        else:
            self.audit.submit(record, pending, outcome, error,
                              None if record.plan is None else self._changes(record.plan))

    def _fail(self, pending: PendingChange, step: int, error: LrctlError) -> None:
        """Record an accepted change that failed at `step` (it changed nothing) and
        finish it with `error` (lock held)."""
        request = pending.request
        record = self._history.append(Record(
            change_id=pending.change_id, version=self._version, step=step,
            applied_at=time.time(), requested_at=pending.requested_at,
            updates=request.updates,
            schedules=self._canonical(request.schedules),
            plan=None, peer=request.peer, user=request.user, reason=request.reason,
            at_step=request.at_step, role=request.role, token=request.token,
            status=error.code, error=str(error),
        ))
        self._hand_over(pending, record, error=error)

    def _canonical(self, schedules: tuple[ScheduleUpdate, ...]) -> tuple[ScheduleUpdate, ...]:
        """`schedules` with the book's own copies of their specs (a record adds no
        schedule points of its own)."""
        if not schedules:
            return ()
        return tuple([replace(u, schedule=self._book.canonical(u.schedule)) for u in schedules])

    def _install(self, plan: PlannedChange, forward: bool) -> None:
        """Put a plan's new (or, backwards, old) values in the table and the optimizer."""
        if forward:
            self._commit(plan.indices, plan.new_base, plan.new_schedule, plan.new_pin, plan.step)
        else:
            self._commit(plan.indices, plan.old_base, plan.old_schedule, plan.old_pin, plan.step)

    def _commit(
        self, indices: Sequence[int], bases: Sequence[float], schedules: Sequence[int] | None,
        pins: Sequence[float] | None, step: int,
    ) -> None:
        """Per-name values into the table, the names that changed class into their new
        groups at their class's rate for `step` (lock held; see RateTable.commit)."""
        table = self._table
        moved = table.commit(indices, bases, schedules, pins)
        if not moved:  # every name kept its class (a Set to the rates in force)
            return
        rates = {c: table.class_rate(c, step) for c in set(moved.values())}
        self._strategy.move(moved, rates)
        self._installed.update(rates)

    def _apply(self, pending: PendingChange, step: int) -> tuple[Outcome | None, Record]:
        request = pending.request
        if request.expected_version is not None and request.expected_version != self._version:
            raise FailedPreconditionError(
                f"expected_version {request.expected_version} does not match config version "
                f"{self._version} at step {step}; change {pending.change_id} was not applied"
            )
        planned = pending.planned
        plan = None if planned is None else planned.plan_for(self._version, self.loads, step)
        if plan is None:
            try:
                plan = self._plan(pending.ops, self._table, step, apply=True)
            except (InvalidArgumentError, FailedPreconditionError) as exc:
                raise type(exc)(f"{exc}; change {pending.change_id} was not applied") from None
        try:
            self._install(plan, forward=True)
        except BaseException:
            self._install(plan, forward=False)
            raise
        self._version += 1
        record = self._history.append(
            Record(
                change_id=pending.change_id,
                version=self._version,
                step=step,
                applied_at=time.time(),
                requested_at=pending.requested_at,
                updates=request.updates,
                schedules=self._canonical(request.schedules),
                plan=plan,
                peer=request.peer,
                user=request.user,
                reason=request.reason,
                at_step=request.at_step,
                role=request.role,
                token=request.token,
            )
        )
        if pending.planned is not None and not request.wait:
            # The serving process answered its caller when it queued it, and nothing here
            # holds the change: no one reads an outcome (the record has it all).
            return None, record
        return Outcome(
            change_id=pending.change_id,
            step=step,
            version=self._version,
            applied=True,
            changes=self._changes(plan),  # type: ignore[arg-type]
        ), record

    # -- validation (caller's thread; lrctl.server.write_plan, shared with the serving process)
    def _plan(
        self, ops: Mapping[int, NameOp], state: RateState, step: int, *, apply: bool = False
    ) -> PlannedChange:
        """Plan against `state`; only a plan being applied adds schedules to the book."""
        return self._writes.plan(ops, state, self._book if apply else self._book.scratch(), step)

    def _check_acceptable(self, request: ChangeRequest) -> None:
        """Checks against the live state; call with the lock held."""
        check_acceptable(request, closed=self._closed, step=self._step, version=self._version,
                         limits=self.queue_limits)

    def _expected_outcome(
        self, change_id: int, request: ChangeRequest, ops: Mapping[int, NameOp], state: RateState,
        version: int, step: int,
    ) -> Outcome:
        """What the change would do to `state` at config `version`; raises if invalid."""
        return self._writes.expected_outcome(change_id, request, ops, state, self._book, version, step)

    def _resolve_batch(self, request: ChangeRequest, check: Check | None = None) -> dict[int, NameOp]:
        """Per parameter position (model order), what happens to it; all-or-nothing checks."""
        return self._writes.resolve_batch(request, check)

    def _resolve(self, selector: str, *, for_set: bool, check: Check | None = None) -> tuple[int, ...]:
        """Positions the selector matches among parameters that can be read (or set)."""
        return read_model.resolve(self.index, self._usable, selector, for_set=for_set, check=check)

    def _held(self, positions: Sequence[int]) -> tuple[int, ...]:
        """The positions (in their order) of parameters the optimizer holds."""
        bases = self._table.base
        return tuple([i for i in positions if bases[i] is not None])

    def _with_grad(self, positions: Sequence[int]) -> tuple[int, ...]:
        params = self._params
        return tuple([i for i in positions if params[i].requires_grad])

    def _why_unusable(self, i: int) -> str:
        return read_model.why_unusable(self._params[i].requires_grad, self._table.base[i] is not None)
