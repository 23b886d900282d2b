"""A change planned in the serving process (attach(serving="process")), on its way to
the training process: `Planned`, and its compact form (`planned_to_wire` /
`planned_from_wire`: marshal-able tuples of plain values, no protobuf to decode).

Imports neither grpc nor protobuf nor torch: the controller decodes the changes the
serving process queued itself (lrctl.server.posted_writes) with it.
"""

from __future__ import annotations

import pickle
from array import array
from dataclasses import dataclass
from typing import Any

from lrctl.server.planner import NameOp, PlannedChange
from lrctl.server.requests import ChangeRequest, Mode, ScheduleUpdate, Target, Update

_MODE_OF = {m.value: m for m in Mode}
_TARGET_OF = {t.value: t for t in Target}


@dataclass(slots=True)  # not frozen: made per change in the step hook (history.Record)
class Planned:
    """A change planned against config `version` after `loads` checkpoint loads
    (lrctl.server.serving_writes): the training process queues it as is while both are
    still those (a load may bring back the number with another state)."""

    request: ChangeRequest
    ops: dict[int, NameOp]
    version: int
    max_reported_changes: int
    loads: int = 0
    # The plan made there, for its due step, when it touches no schedule (its ids would
    # be provisional): applied as is at that step while version and loads are still
    # these, so the step hook need not plan it again (Controller._apply).
    plan: PlannedChange | None = None

    def plan_for(self, version: int, loads: int, step: int) -> PlannedChange | None:
        """The plan, if it is what planning it again at `step`, config `version`
        after `loads` loads would give (the same inputs to the same code)."""
        plan = self.plan
        if plan is None or plan.step != step or version != self.version or loads != self.loads:
            return None
        return plan


_WAIT = 10  # where planned_to_wire puts the request's `wait`
_PLAN = -1  # ... and the plan (None when it is not sent)


def planned_waits(wired: tuple) -> bool:
    """Whether the change in planned_to_wire's tuple waits to be applied (no decoding)."""
    return bool(wired[_WAIT])


def updates_to_wire(updates: tuple[Update, ...]) -> tuple:
    """Updates as marshal-able tuples (also a change record's: lrctl.server.record_wire)."""
    return tuple((u.selector, u.value, u.mode.value, u.target.value) for u in updates)


def updates_from_wire(wired: tuple) -> tuple[Update, ...]:
    """The Updates of updates_to_wire's tuples."""
    return tuple([Update(s, v, _MODE_OF[m], _TARGET_OF[g]) for s, v, m, g in wired])


def doubles(raw: bytes) -> array:
    """An array of doubles from its bytes."""
    out = array("d")
    out.frombytes(raw)
    return out


def planned_to_wire(planned: Planned) -> tuple:
    """A marshal-able tuple: updates as plain tuples, the positions as array bytes, each
    distinct op once (schedule specs, objects, pickled only when there are any), the
    plan's per-name arrays as bytes."""
    r = planned.request
    distinct: dict[int, int] = {}
    ops_out: list[tuple] = []
    which = array("q")
    specs: list[Any] = [u.schedule for u in r.schedules]
    spec_ids = {id(s): k for k, s in enumerate(specs)}
    for op in planned.ops.values():
        k = distinct.get(id(op))
        if k is None:
            k = distinct[id(op)] = len(ops_out)
            base, pin, sched = op
            ops_out.append((
                None if base is None else (base[0].value, base[1]),
                None if pin is None else (pin[0].value, pin[1]),
                None if sched is None else _spec_ref(sched, spec_ids, specs),
            ))
        which.append(k)
    positions = array("q", planned.ops).tobytes()
    return (
        updates_to_wire(r.updates),
        pickle.dumps(specs, pickle.HIGHEST_PROTOCOL) if specs else b"",
        tuple(u.selector for u in r.schedules),
        r.at_step, r.expected_version, r.reason, r.peer, r.user, r.role, r.token, r.wait,
        planned.version, planned.max_reported_changes,
        positions, b"" if len(ops_out) == 1 else which.tobytes(), tuple(ops_out), planned.loads,
        _plan_to_wire(planned.plan),
    )


def without_plan(wired: tuple) -> tuple:
    """planned_to_wire's tuple without the plan (smaller; the receiver plans again)."""
    return wired[:_PLAN] + (None,)


def _plan_to_wire(plan: PlannedChange | None) -> tuple | None:
    if plan is None or plan.old_schedule is not None:
        return None
    pins = None if plan.old_pin is None else (plan.old_pin.tobytes(), plan.new_pin.tobytes())  # type: ignore[union-attr]
    return (plan.step, plan.old_lr.tobytes(), plan.new_lr.tobytes(), plan.old_base.tobytes(),
            plan.new_base.tobytes(), pins)


def _plan_from_wire(t: tuple | None, indices: array) -> PlannedChange | None:
    if t is None:
        return None
    step, old_lr, new_lr, old_base, new_base, pins = t
    return PlannedChange(
        step=step, indices=indices, old_lr=doubles(old_lr), new_lr=doubles(new_lr),
        old_base=doubles(old_base), new_base=doubles(new_base),
        old_pin=None if pins is None else doubles(pins[0]), new_pin=None if pins is None else doubles(pins[1]),
        old_schedule=None, new_schedule=None, schedules={},
    )


def _spec_ref(spec: Any, ids: dict[int, int], specs: list[Any]) -> int:
    """The index of `spec` among the specs sent (CONSTANT for a cleared schedule is added)."""
    k = ids.get(id(spec))
    if k is None:
        k = ids[id(spec)] = len(specs)
        specs.append(spec)
    return k


def planned_from_wire(t: tuple) -> Planned:
    (updates, specs_raw, schedule_selectors, at_step, expected_version, reason, peer, user, role,
     token, wait, version, max_reported, positions_raw, which_raw, ops_raw, loads, plan) = t
    specs = pickle.loads(specs_raw) if specs_raw else []  # from the serving process we started
    n = len(schedule_selectors)
    request = ChangeRequest(
        updates=updates_from_wire(updates),
        schedules=tuple([ScheduleUpdate(s, spec) for s, spec in zip(schedule_selectors, specs[:n])]) if n else (),
        at_step=at_step, expected_version=expected_version, reason=reason, peer=peer, user=user,
        role=role, token=token, wait=wait,
    )
    ops_list = [(None if b is None else (_MODE_OF[b[0]], b[1]), None if p is None else (_MODE_OF[p[0]], p[1]),
                 None if s is None else specs[s]) for b, p, s in ops_raw]
    positions = array("q")
    positions.frombytes(positions_raw)
    if not which_raw:
        ops = dict.fromkeys(positions, ops_list[0])
    else:
        which = array("q")
        which.frombytes(which_raw)
        ops = dict(zip(positions, map(ops_list.__getitem__, which)))
    return Planned(request, ops, version, max_reported, loads, _plan_from_wire(plan, positions))
