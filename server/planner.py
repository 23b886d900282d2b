"""The one function that plans a change: old -> new per name, with limits.

Preview (dry run), submit and apply all call `plan_change`; only the state it reads
differs (a snapshot, or the live table at the step boundary). A plan is plain data,
for one concrete step, described by parameter positions (model order, the same on
every rank), numbers and schedule ids with their specs, so that it can be shipped
to other processes unchanged. Pure Python: no torch, no grpc.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from lrctl.common.errors import InvalidArgumentError
from lrctl.server.rates import RateState, ScheduleBook, ScratchBook, rate_of
from lrctl.server.requests import Mode

# What happens to one name: (base op, pin op, schedule spec), each None when untouched.
# A base op is (ABSOLUTE | SCALE, value); a pin op is (ABSOLUTE | SCALE | UNPIN, value);
# a schedule spec is a lrctl.common.schedules.Schedule (Constant to clear).
Op = Optional[tuple[Mode, float]]
NameOp = tuple[Op, Op, Optional[Any]]

# first_unrepresentable(indices, rates): position j of the first rate that parameter
# indices[j] cannot take, or None.
LimitCheck = Callable[[Sequence[int], Sequence[float]], Optional[int]]
LimitText = Callable[[int], str]


@dataclass(slots=True)  # not frozen: made per change in the step hook (history.Record)
class PlannedChange:
    """A change planned for `step`: per name (model-order position), old and new.

    Rates are the rates in force at `step`. Pins use NaN for "no pin"; pin and
    schedule arrays are None when the change touches neither.
    """

    step: int
    indices: array  # 'q'
    old_lr: array  # 'd'
    new_lr: array
    old_base: array
    new_base: array
    old_pin: Optional[array]
    new_pin: Optional[array]
    old_schedule: Optional[array]  # 'q' schedule ids
    new_schedule: Optional[array]
    schedules: Mapping[int, Any]  # id -> spec, for every id the plan names

    def __len__(self) -> int:
        return len(self.indices)


_NO_PIN = math.nan


def plan_change(
    ops: Mapping[int, NameOp],
    state: RateState,
    book: ScheduleBook | ScratchBook,
    step: int,
    names: Sequence[str],
    first_unrepresentable: LimitCheck,
    limit_text: LimitText,
) -> PlannedChange:
    """Plan `ops` against `state` at `step`; InvalidArgumentError if a result is unusable.

    New schedules get their ids from `book.intern`: pass the live book only where the
    plan is applied, a scratch book (ScheduleBook.scratch()) to preview or validate.
    A SCALE of the base multiplies the base; a SCALE of the pin multiplies the rate in
    force at `step` (so "halve and hold" works on a scheduled name).
    """
    indices = array("q", ops)
    n = len(indices)
    bases, schedules, pins = state.base, state.schedule, state.pins
    distinct = _distinct(ops)
    touches_pins = any(op[1] is not None for op in distinct)
    touches_schedules = any(op[2] is not None for op in distinct)
    old_base = array("d", [bases[i] for i in indices])  # type: ignore[misc]
    old_sched = array("q", [schedules[i] for i in indices])
    # Per-name passes run in the step hook: skip those that cannot change anything
    # (no pins in the table, or a batch of one base-only update).
    old_pin = array("d", [pins.get(i, _NO_PIN) for i in indices]) if pins else array("d", [_NO_PIN]) * n
    memo: dict[tuple[int, float], float] = {}
    old_lr = _rates(book, step, old_sched, old_base, old_pin, memo)

    scale, absolute, unpin = Mode.SCALE, Mode.ABSOLUTE, Mode.UNPIN
    new_sched = array("q", old_sched)
    new_pin = array("d", old_pin)
    ids = {id(op[2]): book.intern(op[2]) for op in distinct if op[2] is not None}
    only = distinct[0] if len(distinct) == 1 else None
    if only is not None and only[0] is not None and only[1] is None and only[2] is None:
        mode, value = only[0]
        new_base = (array("d", [value * b for b in old_base]) if mode is scale
                    else array("d", [value]) * n)
        per_name: Mapping[int, NameOp] = {}  # done: nothing else changes per name
    else:
        new_base = array("d", old_base)
        per_name = ops
    for j, op in enumerate(per_name.values()):
        base_op, pin_op, sched = op
        if base_op is not None:
            mode, value = base_op
            new_base[j] = value * old_base[j] if mode is scale else value
        if sched is not None:
            new_sched[j] = ids[id(sched)]
        if pin_op is not None:
            mode, value = pin_op
            if mode is unpin:
                new_pin[j] = _NO_PIN
            elif mode is absolute:
                new_pin[j] = value
            else:
                new_pin[j] = value * old_lr[j]
    new_lr = _rates(book, step, new_sched, new_base, new_pin, memo)

    j = next((j for j, b in enumerate(new_base) if not math.isfinite(b)), None)
    if j is None:
        j = first_unrepresentable(indices, new_lr)
    if j is not None:
        raise InvalidArgumentError(
            f"the rate of {names[indices[j]]!r} ({old_lr[j]!r}, base {old_base[j]!r}) would "
            f"become {new_lr[j]!r} (base {new_base[j]!r}) at step {step}: {limit_text(indices[j])}"
        )
    return PlannedChange(
        step=step,
        indices=indices,
        old_lr=old_lr,
        new_lr=new_lr,
        old_base=old_base,
        new_base=new_base,
        old_pin=old_pin if touches_pins else None,
        new_pin=new_pin if touches_pins else None,
        old_schedule=old_sched if touches_schedules else None,
        new_schedule=new_sched if touches_schedules else None,
        schedules={s: book[s] for s in (set(old_sched) | set(new_sched)) if s} if touches_schedules else {},
    )


def _distinct(ops: Mapping[int, NameOp]) -> list[NameOp]:
    """The distinct op objects (a batch shares one per update: a few, not one per name)."""
    return list({id(op): op for op in ops.values()}.values())


def _rates(
    book: ScheduleBook | ScratchBook, step: int, sched: Sequence[int], base: Sequence[float],
    pin: Sequence[float], memo: dict[tuple[int, float], float],
) -> array:
    """The rate in force per name; one schedule evaluation per distinct (schedule, base)."""
    if not any(sched) and all(p != p for p in pin):  # constant, unpinned: rate = base
        return array("d", base)
    out = []
    append = out.append
    for s, b, p in zip(sched, base, pin):
        if p == p:  # a pin (NaN is none)
            append(p)
            continue
        rate = memo.get((s, b))
        if rate is None:
            rate = memo[(s, b)] = rate_of(book[s], b, None, step)
        append(rate)
    return array("d", out)
