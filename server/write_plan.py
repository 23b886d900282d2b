"""The checks and the plan of a write, once for both places that make them.

The live Controller (lrctl.server.controller) and the serving process of
attach(serving="process") (lrctl.server.serving_writes, from a read snapshot) resolve a
change's selectors, check its values, plan its expected outcome and run the worker's
guardrails with this one class, so a bad request gets the same status and message
from either. The checks against the live state (closing, at_step past or too far
ahead, expected_version) are `check_acceptable`, also shared; the training process
makes them again, authoritatively, before it queues a change.

Pure Python: no torch, no grpc, no protobuf.
"""

from __future__ import annotations

import math
from array import array
from typing import Any, Callable, Mapping, Protocol, Sequence

from lrctl.common.errors import FailedPreconditionError, InvalidArgumentError
from lrctl.server.guardrails import BoundGuardrails, NameSettings
from lrctl.server.history import RateChanges
from lrctl.server.planner import NameOp, PlannedChange, plan_change
from lrctl.server.queue_limits import QueueLimits, check_horizon
from lrctl.server.rates import CONSTANT, RateState, ScheduleBook, ScratchBook
from lrctl.server import read_model
from lrctl.server.requests import ChangeRequest, Mode, Outcome, Target
from lrctl.server.selectors import NameIndex, quote

MAX_REASON_CHARS = 4096
Check = Callable[[], None]


class Limits(Protocol):
    """The largest rates the optimizer can apply (an ApplyStrategy, or a snapshot's copy)."""

    def max_lr(self, indices: Sequence[int]) -> float: ...

    @property
    def safe_lr(self) -> float: ...


class NameLimits:
    """Limits from one number per name (the serving process's copy of the strategy's)."""

    def __init__(self, per_name: Sequence[float], safe_lr: float) -> None:
        self._per_name, self._safe = per_name, safe_lr

    @property
    def safe_lr(self) -> float:
        return self._safe

    def max_lr(self, indices: Sequence[int]) -> float:
        per_name = self._per_name
        return min((per_name[i] for i in indices), default=math.inf)


def describe_op(part: int, op: Any) -> str:
    if part == 2:
        return f"schedule {op.describe()}"
    mode, value = op
    what = "base" if part == 0 else "pin"
    if mode is Mode.UNPIN:
        return "unpin"
    return f"scale {what} by {value!r}" if mode is Mode.SCALE else f"set {what} to {value!r}"


def check_acceptable(request: ChangeRequest, *, closed: bool, step: int, version: int,
                     limits: QueueLimits) -> None:
    """A change's checks against the live state (`step`: the next step)."""
    if closed:
        raise FailedPreconditionError("the worker is shutting down; no change is accepted")
    if request.at_step is not None and request.at_step < step:
        raise InvalidArgumentError(f"at_step {request.at_step} is already past: the next step is {step}")
    check_horizon(request.at_step, step, limits)
    if request.expected_version is not None and request.expected_version != version:
        raise FailedPreconditionError(
            f"expected_version {request.expected_version} does not match the config "
            f"version {version}"
        )


def check_value(selector: str, mode: Mode, value: float, target: Target = Target.BASE) -> None:
    if mode is Mode.UNPIN:
        if target is not Target.PIN:
            raise InvalidArgumentError(f"unpin of {quote(selector)} must target the pin")
        return
    if not math.isfinite(value):
        raise InvalidArgumentError(f"value {value!r} for {quote(selector)} is not a finite number")
    if mode is Mode.SCALE and value <= 0:
        raise InvalidArgumentError(f"scale factor {value!r} for {quote(selector)} must be > 0")
    # copysign: -0.0 counts as negative too (it would read back as "-0.0").
    if mode is Mode.ABSOLUTE and math.copysign(1.0, value) < 0:
        raise InvalidArgumentError(f"learning rate {value!r} for {quote(selector)} is negative")


class WritePlanner:
    """Resolves and plans changes over one name index, its usable parameters, its rate
    limits and its guardrails."""

    def __init__(self, index: NameIndex, usable: read_model.Usable, guard: BoundGuardrails,
                 limits: Limits, dtype_name: Callable[[int], str]) -> None:
        self.index, self.usable, self.guard = index, usable, guard
        self.limits, self._dtype_name = limits, dtype_name

    # -- selectors and values -------------------------------------------------------
    def resolve_batch(self, request: ChangeRequest, check: Check | None = None) -> dict[int, NameOp]:
        """Per parameter position (model order), what happens to it; all-or-nothing checks."""
        if not request.updates and not request.schedules:
            raise InvalidArgumentError("empty batch: give at least one update")
        if request.at_step is not None and request.at_step < 0:
            raise InvalidArgumentError(f"at_step {request.at_step} is negative")
        if len(request.reason) > MAX_REASON_CHARS:
            # The history keeps every reason: a bound keeps it from holding megabytes.
            raise InvalidArgumentError(
                f"reason of {len(request.reason)} characters is too long (at most {MAX_REASON_CHARS})"
            )
        entries: list[tuple[str, NameOp]] = []
        for update in request.updates:
            check_value(update.selector, update.mode, update.value, update.target)
            part = (update.mode, update.value)
            op: NameOp = (part, None, None) if update.target is Target.BASE else (None, part, None)
            entries.append((update.selector, op))
        for schedule_update in request.schedules:
            spec = CONSTANT if schedule_update.schedule is None else schedule_update.schedule
            entries.append((schedule_update.selector, (None, None, spec)))
        ops: dict[int, NameOp] = {}
        resolved: list[tuple[int, ...]] = []
        for selector, op in entries:
            if check is not None:
                check()
            indices = read_model.resolve(self.index, self.usable, selector, for_set=True, check=check)
            resolved.append(indices)
            if ops.keys().isdisjoint(indices):  # the usual case: one dict update in C
                ops.update(dict.fromkeys(indices, op))
                continue
            for i in indices:
                previous = ops.setdefault(i, op)
                if previous is not op:
                    ops[i] = self._merge(i, previous, op, selector, entries, resolved)
        if len(resolved) == 1:
            return ops  # one selector's positions: already in model order
        order = sorted(ops)
        return dict(zip(order, map(ops.__getitem__, order)))

    def _merge(
        self, i: int, previous: NameOp, op: NameOp, selector: str,
        entries: Sequence[tuple[str, NameOp]], resolved: Sequence[tuple[int, ...]],
    ) -> NameOp:
        """Two updates touch parameter i: they must agree on whatever both change."""
        merged = list(previous)
        for part, (mine, theirs) in enumerate(zip(op, previous)):
            if mine is None:
                continue
            if theirs is not None and theirs != mine:
                # The first update that touched i this way (error path: a scan is fine).
                first = next(s for (s, o), r in zip(entries, resolved) if i in r and o[part] is not None)
                raise InvalidArgumentError(
                    f"updates {quote(first)} and {quote(selector)} disagree on "
                    f"{self.index.names[i]!r}: {describe_op(part, theirs)} vs "
                    f"{describe_op(part, mine)}"
                )
            merged[part] = mine
        return tuple(merged)  # type: ignore[return-value]

    # -- plans ----------------------------------------------------------------------
    def plan(self, ops: Mapping[int, NameOp], state: RateState, book: ScheduleBook | ScratchBook,
             step: int) -> PlannedChange:
        """Plan against `state`, interning new schedules in `book` (the live book only
        where the plan is applied), then run the guardrails on the same state."""
        plan = plan_change(ops, state, book, step, self.index.names,
                           self.first_unrepresentable, self.limit_text)
        # A refused plan may have added its schedule to a live book: harmless, the book
        # keeps specs by value and is bounded.
        self.guard.check(plan.step, lambda: self.settings(plan, state, book))
        return plan

    def expected_outcome(
        self, change_id: int, request: ChangeRequest, ops: Mapping[int, NameOp], state: RateState,
        book: ScheduleBook, version: int, step: int,
    ) -> Outcome:
        """What the change would do to `state` at config `version`; raises if invalid.

        Planned for its due step (the next one, `step`, when none is given)."""
        return self.outcome_of(change_id, request, self.expected_plan(request, ops, state, book, step), version)

    def expected_plan(
        self, request: ChangeRequest, ops: Mapping[int, NameOp], state: RateState, book: ScheduleBook,
        step: int,
    ) -> PlannedChange:
        """The change planned against `state` for its due step (`step`, the next one,
        when it names none), without adding to `book`; raises if invalid."""
        return self.plan(ops, state, book.scratch(), step if request.at_step is None else request.at_step)

    def outcome_of(self, change_id: int, request: ChangeRequest, plan: PlannedChange, version: int) -> Outcome:
        """The expected outcome of a change planned (expected_plan) at config `version`."""
        return Outcome(
            change_id=change_id,
            step=-1 if request.at_step is None else request.at_step,
            version=version,
            applied=False,
            changes=self.changes(plan),  # type: ignore[arg-type]
        )

    def changes(self, plan: PlannedChange) -> RateChanges:
        schedules = plan.schedules  # ids of a previewed plan may be provisional: its own specs
        return RateChanges(self.index.names, plan,
                           lambda sid: "" if sid == 0 else schedules[sid].describe())

    @staticmethod
    def settings(plan: PlannedChange, state: RateState, book: Any) -> NameSettings:
        """What the guardrails read of a plan: per touched name, pinned or not and the
        schedule it follows after the change."""
        indices = plan.indices
        if plan.new_pin is not None:
            pinned = [p == p for p in plan.new_pin]  # NaN: no pin
        else:
            pins = state.pins
            pinned = [i in pins for i in indices] if pins else [False] * len(indices)
        ids = (plan.new_schedule if plan.new_schedule is not None
               else array("q", map(state.schedule.__getitem__, indices)))
        return NameSettings(indices, plan.old_lr, plan.new_lr, plan.new_base, pinned, ids,
                            {sid: book[sid] for sid in set(ids)})

    # -- rate limits ----------------------------------------------------------------
    def first_unrepresentable(self, indices: Sequence[int], new: Sequence[float]) -> int | None:
        """Position j of the first new[j] that parameter indices[j] cannot take, or None."""
        if not indices:
            return None
        limits = self.limits
        if all(map(math.isfinite, new)):
            top = max(new)
            if top <= limits.safe_lr or top <= limits.max_lr(indices):
                return None  # the usual case: no look at each parameter
        return next(
            (j for j, (i, lr) in enumerate(zip(indices, new))
             if not (math.isfinite(lr) and lr <= limits.max_lr((i,)))),
            None,
        )

    def limit_text(self, i: int) -> str:
        return (f"above {self.limits.max_lr((i,)):g}, the largest rate its optimizer can apply "
                f"to a {self._dtype_name(i)} parameter")
