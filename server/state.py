"""lrctl's state in plain data, keyed by parameter name: what a checkpoint carries.

Only lists, dicts, strings, numbers, booleans and None, so the state rides inside an
optimizer state dict that ``torch.load(..., weights_only=True)`` (Hugging Face,
Lightning) reads back, and survives a model whose parameter order changed. Pure Python.
"""

from __future__ import annotations

import math
from array import array
from typing import Any, Callable, Mapping, Optional, Sequence

from lrctl.common.errors import InvalidArgumentError
from lrctl.common.schedules import Constant, schedule_from_dict
from lrctl.server.history import Record
from lrctl.server.planner import PlannedChange
from lrctl.server.requests import Mode, ScheduleUpdate, Target, Update

FORMAT = 1
CONSTANT = Constant()
# A checkpoint keeps the newest records up to these bounds (the rest is counted as dropped).
MAX_SAVED_RECORDS = 1000
MAX_SAVED_ENTRIES = 1_000_000


def schedule_to_state(schedule: Any) -> dict[str, Any]:
    """A schedule spec as plain data; an adopted one by its group (its state rides apart)."""
    if schedule.kind == "adopted":
        return {"kind": "adopted", "group": schedule.index}
    return schedule.to_dict()


def schedule_from_state(data: Mapping[str, Any], adopted: Sequence[Any]) -> Any | None:
    """The schedule for `data`; None for an adopted group this run has no scheduler for."""
    if data.get("kind") == "adopted":
        group = int(data["group"])
        return adopted[group] if 0 <= group < len(adopted) else None
    return schedule_from_dict(data)


def _op_to_state(op: Optional[tuple[Mode, float]]) -> Optional[list[Any]]:
    return None if op is None else [op[0].value, op[1]]


def _op_from_state(data: Optional[Sequence[Any]]) -> Optional[tuple[Mode, float]]:
    return None if data is None else (Mode(data[0]), float(data[1]))


def updates_to_state(updates: Sequence[Update]) -> list[list[Any]]:
    return [[u.selector, u.value, u.mode.value, u.target.value] for u in updates]


def updates_from_state(data: Sequence[Sequence[Any]]) -> tuple[Update, ...]:
    return tuple(Update(s, float(v), Mode(m), Target(t)) for s, v, m, t in data)


def schedule_updates_to_state(updates: Sequence[ScheduleUpdate]) -> list[list[Any]]:
    return [[u.selector, None if u.schedule is None else schedule_to_state(u.schedule)] for u in updates]


def schedule_updates_from_state(data: Sequence[Sequence[Any]], adopted: Sequence[Any]) -> tuple[ScheduleUpdate, ...]:
    return tuple(ScheduleUpdate(s, None if d is None else schedule_from_state(d, adopted)) for s, d in data)


def ops_to_state(ops: Mapping[int, Any], names: Sequence[str]) -> list[list[Any]]:
    """A waiting change's per-name ops, by name."""
    return [
        [names[i], _op_to_state(base), _op_to_state(pin), None if spec is None else schedule_to_state(spec)]
        for i, (base, pin, spec) in ops.items()
    ]


def ops_from_state(
    data: Sequence[Sequence[Any]], position: Mapping[str, int], adopted: Sequence[Any]
) -> dict[int, Any]:
    """ops_to_state() read back, for the names this model has (an adopted schedule this
    run has no scheduler for becomes constant)."""
    ops = {}
    for name, base, pin, spec in data:
        if name in position:
            schedule = None if spec is None else schedule_from_state(spec, adopted)
            if spec is not None and schedule is None:
                schedule = CONSTANT
            ops[position[name]] = (_op_from_state(base), _op_from_state(pin), schedule)
    return ops


def plan_to_state(plan: PlannedChange, names: Sequence[str], schedule_key: Callable[[int], Any]) -> dict[str, Any]:
    """A plan by names (positions mean nothing in another process)."""
    return {
        "step": plan.step,
        "names": [names[i] for i in plan.indices],
        "old_lr": plan.old_lr.tolist(), "new_lr": plan.new_lr.tolist(),
        "old_base": plan.old_base.tolist(), "new_base": plan.new_base.tolist(),
        "old_pin": None if plan.old_pin is None else [_none_for_nan(p) for p in plan.old_pin],
        "new_pin": None if plan.new_pin is None else [_none_for_nan(p) for p in plan.new_pin],
        "old_schedule": None if plan.old_schedule is None else [schedule_key(s) for s in plan.old_schedule],
        "new_schedule": None if plan.new_schedule is None else [schedule_key(s) for s in plan.new_schedule],
    }


def plan_from_state(
    data: Mapping[str, Any], position: Mapping[str, int], schedule_id: Callable[[Any], int],
    book_lookup: Callable[[int], Any],
) -> PlannedChange:
    """A saved plan with positions in this model; names it no longer has are left out."""
    keep = [j for j, name in enumerate(data["names"]) if name in position]

    def pick(key: str, code: str, convert: Callable[[Any], Any] = float) -> Optional[array]:
        values = data.get(key)
        return None if values is None else array(code, [convert(values[j]) for j in keep])

    old_schedule = pick("old_schedule", "q", schedule_id)
    new_schedule = pick("new_schedule", "q", schedule_id)
    ids = set(old_schedule or ()) | set(new_schedule or ())
    return PlannedChange(
        step=int(data["step"]),
        indices=array("q", [position[data["names"][j]] for j in keep]),
        old_lr=pick("old_lr", "d"), new_lr=pick("new_lr", "d"),  # type: ignore[arg-type]
        old_base=pick("old_base", "d"), new_base=pick("new_base", "d"),  # type: ignore[arg-type]
        old_pin=pick("old_pin", "d", _nan_for_none), new_pin=pick("new_pin", "d", _nan_for_none),
        old_schedule=old_schedule, new_schedule=new_schedule,
        schedules={s: book_lookup(s) for s in ids if s},
    )


def record_to_state(record: Record, names: Sequence[str], schedule_key: Callable[[int], Any]) -> dict[str, Any]:
    return {
        "change_id": record.change_id, "version": record.version, "step": record.step,
        "applied_at": record.applied_at, "requested_at": record.requested_at,
        "updates": updates_to_state(record.updates),
        "schedules": schedule_updates_to_state(record.schedules),
        "plan": None if record.plan is None else plan_to_state(record.plan, names, schedule_key),
        "peer": record.peer, "user": record.user, "reason": record.reason, "at_step": record.at_step,
        "role": record.role, "token": record.token, "status": record.status, "error": record.error,
    }


def record_from_state(
    data: Mapping[str, Any], position: Mapping[str, int], schedule_id: Callable[[Any], int],
    book_lookup: Callable[[int], Any], adopted: Sequence[Any],
) -> Record:
    return Record(
        change_id=int(data["change_id"]), version=int(data["version"]), step=int(data["step"]),
        applied_at=float(data["applied_at"]), requested_at=float(data["requested_at"]),
        updates=updates_from_state(data["updates"]),
        schedules=schedule_updates_from_state(data["schedules"], adopted),
        plan=None if data["plan"] is None else plan_from_state(data["plan"], position, schedule_id, book_lookup),
        peer=str(data["peer"]), user=str(data["user"]), reason=str(data["reason"]),
        at_step=None if data["at_step"] is None else int(data["at_step"]),
        role=str(data.get("role", "")), token=str(data.get("token", "")),
        status=str(data.get("status", "")), error=str(data.get("error", "")),
    )


def check_format(state: Any) -> Mapping[str, Any]:
    """`state` if it is an lrctl state this version reads, else InvalidArgumentError."""
    if not isinstance(state, Mapping) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
        raise InvalidArgumentError(f"not an lrctl state of format {FORMAT} (format {found!r})")
    return state


def _none_for_nan(value: float) -> Optional[float]:
    return None if math.isnan(value) else value


def _nan_for_none(value: Optional[float]) -> float:
    return math.nan if value is None else float(value)
