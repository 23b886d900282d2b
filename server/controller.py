"""The controller: the name -> learning-rate table of one optimizer, and its changes.

Pure Python plus torch, no gRPC: handlers call it from server threads, the optimizer
step pre-hook calls it from the training thread. One lock guards the table; the hook
holds it only to count the step and, when a change is due, to apply it. Validation,
selector matching and formatting happen outside the lock, on the caller's thread.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from array import array
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from lrctl.client.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LrctlError,
)
from lrctl.server.history import History, Record
from lrctl.server.requests import ChangeRequest, Mode, Outcome, PendingChange, RateChange
from lrctl.server.selectors import NameIndex, not_found, parse_selector, quote
from lrctl.server.strategy import ApplyStrategy, CoalescedGroups, lr_value

log = logging.getLogger("lrctl.controller")

_NEVER = math.inf

StrategyFactory = Callable[
    [torch.optim.Optimizer, Sequence[torch.Tensor], Sequence[str], "list[float | None]"],
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


def _describe_value(mode: Mode, value: float) -> str:
    return f"scale by {value!r}" if mode is Mode.SCALE else f"set to {value!r}"


class Controller:
    """Owns per-name learning rates of one optimizer and applies changes at step boundaries.

    Steps are counted from 0 by a step pre-hook on the optimizer: a change applied "at
    step S" is in force for the (S+1)-th call of ``optimizer.step()`` and after.
    """

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, torch.Tensor]],
        optimizer: torch.optim.Optimizer,
        *,
        history_limit: int = 10_000,
        strategy: StrategyFactory = CoalescedGroups,
    ) -> None:
        pairs = list(named_parameters)
        names = [name for name, _ in pairs]
        self._params: list[torch.Tensor] = [p for _, p in pairs]
        self.index = NameIndex(names)
        self.optimizer = optimizer
        position = {id(p): i for i, p in enumerate(self._params)}
        self._lrs: list[float | None] = [None] * len(self._params)
        foreign = 0
        for group in optimizer.param_groups:
            for p in group["params"]:
                i = position.get(id(p))
                if i is None:
                    foreign += 1
                else:
                    self._lrs[i] = lr_value(group["lr"])
        if foreign:
            raise ValueError(
                f"the optimizer holds {foreign} tensor(s) that are not among the named "
                "parameters given to lrctl; pass the model (or named parameters) that "
                "covers every tensor the optimizer updates"
            )
        self._lock = threading.Lock()
        self._strategy = strategy(optimizer, self._params, names, self._lrs)
        self._history = History(history_limit)
        self._pending: list[PendingChange] = []
        self._next_due: float = _NEVER
        self._step = 0
        self._version = 0
        self._next_change_id = 1
        self._closed = False
        self._started = time.monotonic()
        self._last_step_at: float | None = None
        self._hook = optimizer.register_step_pre_hook(self._before_step)

    # -- reads ---------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return self.index.names

    @property
    def step(self) -> int:
        """Index of the next optimizer step."""
        return self._step

    @property
    def version(self) -> int:
        return self._version

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def learning_rates(self) -> dict[str, float]:
        """Every held parameter's current rate, in model order."""
        with self._lock:
            lrs = list(self._lrs)
        return {n: lr for n, lr in zip(self.index.names, lrs) if lr is not None}

    def filter(self, selector: str) -> tuple[int, ...]:
        """Positions of the parameters a ListParameters filter matches (may be none)."""
        if not selector:
            return tuple(range(len(self.index)))
        return self.index.match(selector)

    def describe(self, positions: Sequence[int]) -> list[ParameterView]:
        """Views of the given parameters with their rates and groups right now."""
        with self._lock:
            rates = [(self._lrs[i], self._strategy.group_of(i)) for i in positions]
        views = []
        for i, (lr, group) in zip(positions, rates):
            p = self._params[i]
            views.append(
                ParameterView(
                    name=self.index.names[i],
                    shape=tuple(p.shape),
                    numel=p.numel(),
                    dtype=str(p.dtype).removeprefix("torch."),
                    device=str(p.device),
                    requires_grad=p.requires_grad,
                    in_optimizer=lr is not None,
                    lr=lr,
                    group=group,
                    hyperparameters=self._strategy.hyperparameters(i) if lr is not None else {},
                )
            )
        return views

    def read(self, selectors: Sequence[str]) -> tuple[list[tuple[str, float, int]], int, int]:
        """(name, lr, group) for what the selectors match, in model order; version; step."""
        if selectors:
            chosen = sorted({i for s in selectors for i in self._resolve(s, for_set=False)})
        else:
            chosen = [i for i, lr in enumerate(self._lrs) if lr is not None]
        with self._lock:
            rows = [(self.index.names[i], self._lrs[i], self._strategy.group_of(i)) for i in chosen]
            version, step = self._version, self._step
        return rows, version, step  # type: ignore[return-value]

    def status(self) -> StatusView:
        with self._lock:
            lrs = [lr for lr in self._lrs if lr is not None]
            step, version, pending = self._step, self._version, len(self._pending)
            last = self._last_step_at
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
                1 for p, lr in zip(self._params, self._lrs) if lr is not None and p.requires_grad
            ),
            num_distinct_lrs=len(set(lrs)),
            num_param_groups=groups,
            state=state,
            uptime_seconds=now - self._started,
            seconds_since_last_step=None if last is None else now - last,
            pending_changes=pending,
        )

    def history(self, after_version: int, limit: int) -> tuple[list[Record], bool, int]:
        """Up to `limit` records after a version; whether more follow; how many were dropped."""
        with self._lock:
            it = self._history.after(after_version)
            records = [r for _, r in zip(range(limit), it)]
            more = next(it, None) is not None
            return records, more, self._history.dropped

    def rate_changes(self, record: Record, limit: int) -> tuple[RateChange, ...]:
        """The first `limit` per-name changes of a record, with names."""
        names = self.index.names
        n = min(limit, record.num_changes)
        return tuple(
            RateChange(names[record.indices[j]], record.old[j], record.new[j]) for j in range(n)
        )

    # -- writes --------------------------------------------------------------------
    def preview(self, request: ChangeRequest) -> Outcome:
        """What `request` would do now (a dry run); raises what submit would raise."""
        ops = self._resolve_batch(request)
        with self._lock:
            self._check_acceptable(request)
            return self._expected_outcome(0, request, ops)

    def submit(self, request: ChangeRequest) -> tuple[PendingChange, Outcome]:
        """Validate and queue a change; returns it and its expected outcome."""
        ops = self._resolve_batch(request)
        with self._lock:
            self._check_acceptable(request)
            pending = PendingChange(self._next_change_id, request, ops, time.time())
            self._next_change_id += 1
            self._pending.append(pending)
            self._next_due = min(self._next_due, pending.due)
            return pending, self._expected_outcome(pending.change_id, request, ops)

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

    def close(self) -> None:
        """Detach from the optimizer; pending changes fail, none is applied later."""
        self._hook.remove()
        with self._lock:
            self._closed = True
            pending, self._pending, self._next_due = self._pending, [], _NEVER
            step = self._step
        for p in pending:
            p.finish(
                error=FailedPreconditionError(
                    f"the worker shut down at step {step}; change {p.change_id} was not applied"
                )
            )

    # -- the step boundary (training thread) -----------------------------------------
    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        with self._lock:
            step = self._step
            self._step = step + 1
            self._last_step_at = time.monotonic()
            if self._next_due > step:
                return None
            due = [p for p in self._pending if p.due <= step]
            self._pending = [p for p in self._pending if p.due > step]
            self._next_due = min((p.due for p in self._pending), default=_NEVER)
            for pending in due:
                self._apply_guarded(pending, step)
        return None

    def _apply_guarded(self, pending: PendingChange, step: int) -> None:
        """Apply one change; whatever goes wrong costs the change, never the step."""
        try:
            outcome = self._apply(pending, step)
        except LrctlError as exc:
            pending.finish(error=exc)
        except Exception as exc:  # a bug here must not kill training
            log.exception("lrctl: applying change %d failed", pending.change_id)
            pending.finish(error=InternalError(f"applying change {pending.change_id} failed: {exc!r}"))
        else:
            pending.finish(outcome=outcome)

    def _apply(self, pending: PendingChange, step: int) -> Outcome:
        request = pending.request
        if request.expected_version is not None and request.expected_version != self._version:
            raise FailedPreconditionError(
                f"expected_version {request.expected_version} does not match config version "
                f"{self._version} at step {step}; change {pending.change_id} was not applied"
            )
        indices = array("q", pending.ops)
        old = array("d", (self._lrs[i] for i in indices))  # type: ignore[misc]
        new = array("d", self._new_values(pending.ops, old))
        for i, lr_new, lr_old in zip(indices, new, old):
            if not self._representable(i, lr_new):
                raise InvalidArgumentError(
                    f"at step {step}, the rate of {self.index.names[i]!r} ({lr_old!r}) would "
                    f"become {lr_new!r}; change {pending.change_id} was not applied"
                )
        for i, lr in zip(indices, new):
            self._lrs[i] = lr
        try:
            self._strategy.apply(dict(zip(indices, new)))
        except BaseException:
            for i, lr in zip(indices, old):
                self._lrs[i] = lr
            self._strategy.apply(dict(zip(indices, old)))
            raise
        self._version += 1
        self._history.append(
            Record(
                change_id=pending.change_id,
                version=self._version,
                step=step,
                applied_at=time.time(),
                requested_at=pending.requested_at,
                updates=request.updates,
                indices=indices,
                old=old,
                new=new,
                peer=request.peer,
                user=request.user,
                reason=request.reason,
                at_step=request.at_step,
            )
        )
        names = self.index.names
        return Outcome(
            change_id=pending.change_id,
            step=step,
            version=self._version,
            applied=True,
            changes=tuple(RateChange(names[i], o, n) for i, o, n in zip(indices, old, new)),
        )

    # -- validation (caller's thread) --------------------------------------------------
    @staticmethod
    def _new_values(ops: Mapping[int, tuple[Mode, float]], old: Iterable[float]) -> list[float]:
        return [
            value * lr if mode is Mode.SCALE else value
            for (mode, value), lr in zip(ops.values(), old)
        ]

    def _check_acceptable(self, request: ChangeRequest) -> None:
        """Checks against the live state; call with the lock held."""
        if self._closed:
            raise FailedPreconditionError("the worker is shutting down; no change is accepted")
        if request.at_step is not None and request.at_step < self._step:
            raise InvalidArgumentError(
                f"at_step {request.at_step} is already past: the next step is {self._step}"
            )
        if request.expected_version is not None and request.expected_version != self._version:
            raise FailedPreconditionError(
                f"expected_version {request.expected_version} does not match the config "
                f"version {self._version}"
            )

    def _expected_outcome(
        self, change_id: int, request: ChangeRequest, ops: Mapping[int, tuple[Mode, float]]
    ) -> Outcome:
        names = self.index.names
        old = [self._lrs[i] for i in ops]
        new = self._new_values(ops, old)  # type: ignore[arg-type]
        for i, lr_old, lr_new in zip(ops, old, new):
            if not self._representable(i, lr_new):
                raise InvalidArgumentError(
                    f"the rate of {names[i]!r} ({lr_old!r}) would become {lr_new!r}"
                )
        return Outcome(
            change_id=change_id,
            step=-1 if request.at_step is None else request.at_step,
            version=self._version,
            applied=False,
            changes=tuple(RateChange(names[i], o, n) for i, o, n in zip(ops, old, new)),  # type: ignore[arg-type]
        )

    def _resolve_batch(self, request: ChangeRequest) -> dict[int, tuple[Mode, float]]:
        """Per parameter position (model order), its (mode, value); all-or-nothing checks."""
        if not request.updates:
            raise InvalidArgumentError("empty batch: give at least one update")
        if request.at_step is not None and request.at_step < 0:
            raise InvalidArgumentError(f"at_step {request.at_step} is negative")
        ops: dict[int, tuple[Mode, float]] = {}
        origin: dict[int, int] = {}
        for k, update in enumerate(request.updates):
            self._check_value(update.selector, update.mode, update.value)
            op = (update.mode, update.value)
            for i in self._resolve(update.selector, for_set=True):
                previous = ops.setdefault(i, op)
                if previous != op:
                    first = request.updates[origin[i]]
                    raise InvalidArgumentError(
                        f"updates {quote(first.selector)} and {quote(update.selector)} disagree on "
                        f"{self.index.names[i]!r}: {_describe_value(*previous)} vs "
                        f"{_describe_value(*op)}"
                    )
                origin.setdefault(i, k)
        return dict(sorted(ops.items()))

    @staticmethod
    def _check_value(selector: str, mode: Mode, value: float) -> None:
        if not math.isfinite(value):
            raise InvalidArgumentError(f"value {value!r} for {quote(selector)} is not a finite number")
        if mode is Mode.SCALE and value <= 0:
            raise InvalidArgumentError(f"scale factor {value!r} for {quote(selector)} must be > 0")
        if mode is Mode.ABSOLUTE and value < 0:
            raise InvalidArgumentError(f"learning rate {value!r} for {quote(selector)} is negative")

    def _resolve(self, selector: str, *, for_set: bool) -> tuple[int, ...]:
        """Positions the selector matches among parameters that can be read (or set)."""
        matched = self.index.match(selector)
        if not matched:
            raise not_found(parse_selector(selector), self.index.names)
        usable = tuple(i for i in matched if self._usable(i, for_set))
        if usable:
            return usable
        name = self.index.names[matched[0]]
        why = self._why_unusable(matched[0])
        if len(matched) == 1 and parse_selector(selector).is_exact:
            raise FailedPreconditionError(f"parameter {name!r} {why}; its rate cannot be {'set' if for_set else 'read'}")
        raise FailedPreconditionError(
            f"selector {quote(selector)} matches {len(matched)} parameter(s), none of which can be "
            f"{'set' if for_set else 'read'} (e.g. {name!r} {why})"
        )

    def _representable(self, i: int, lr: float) -> bool:
        """A finite rate that the parameter's dtype can hold (else step() raises)."""
        dtype = self._params[i].dtype
        limit = torch.finfo(dtype).max if dtype.is_floating_point else math.inf
        return math.isfinite(lr) and lr <= limit

    def _usable(self, i: int, for_set: bool) -> bool:
        if self._lrs[i] is None:
            return False
        return self._params[i].requires_grad or not for_set

    def _why_unusable(self, i: int) -> str:
        reasons = []
        if not self._params[i].requires_grad:
            reasons.append("does not require grad")
        if self._lrs[i] is None:
            reasons.append("is not held by the optimizer")
        return " and ".join(reasons)
