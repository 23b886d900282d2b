"""Write requests and replies between their messages and lrctl.server.requests' plain data.

One place for both servers: the in-process handlers (lrctl.server.service) and the
serving process of attach(serving="process") (lrctl.server.serving_writes) turn a
SetLearningRates / SetSchedules / ClearSchedules message into a ChangeRequest and an
Outcome into a reply with these, so both refuse a bad message with the same message.
Also the compact form of a change planned in the serving process, as it crosses to the
training process (`planned_to_wire` / `planned_from_wire`: marshal-able tuples, no
protobuf to decode there).

Imports neither grpc nor torch (protobuf only).
"""

from __future__ import annotations

import pickle
from array import array
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from lrctl.common.errors import InvalidArgumentError
from lrctl.common.schedule_messages import schedule_from_pb, schedule_to_pb
from lrctl.server.planner import NameOp
from lrctl.server.requests import ChangeRequest, Mode, Outcome, RateChange, ScheduleUpdate, Target, Update
from lrctl.server.subscribers import DEFAULT_REPORTED_CHANGES
from lrctl.v1 import lrctl_pb2 as pb

_MODE_OF = {m.value: m for m in Mode}
_TARGET_OF = {t.value: t for t in Target}
WriteRequest = Any  # pb.SetLearningRatesRequest | pb.SetSchedulesRequest | pb.ClearSchedulesRequest

MODES = {pb.UPDATE_MODE_ABSOLUTE: Mode.ABSOLUTE, pb.UPDATE_MODE_SCALE: Mode.SCALE,
         pb.UPDATE_MODE_UNPIN: Mode.UNPIN}
MODE_TO_PB = {mode: code for code, mode in MODES.items()}
TARGETS = {pb.UPDATE_TARGET_UNSPECIFIED: Target.BASE, pb.UPDATE_TARGET_BASE: Target.BASE,
           pb.UPDATE_TARGET_PIN: Target.PIN}
# BASE travels as the default (0): records of plain rate changes stay as small as before.
TARGET_TO_PB = {Target.BASE: pb.UPDATE_TARGET_UNSPECIFIED, Target.PIN: pb.UPDATE_TARGET_PIN}


def rate_changes_pb(changes: Iterable[RateChange]) -> list[pb.RateChange]:
    return [
        pb.RateChange(name=c.name, old_lr=c.old_lr, new_lr=c.new_lr, old_base=c.old_base,
                      new_base=c.new_base, old_pin=c.old_pin, new_pin=c.new_pin,
                      old_schedule=c.old_schedule, new_schedule=c.new_schedule)
        for c in changes
    ]


def updates_pb(updates: Iterable[Update]) -> list[pb.LearningRateUpdate]:
    return [
        pb.LearningRateUpdate(selector=u.selector, mode=MODE_TO_PB[u.mode], value=u.value,
                              target=TARGET_TO_PB[u.target])
        for u in updates
    ]


def schedules_pb(updates: Iterable[ScheduleUpdate]) -> list[pb.ScheduleAssignment]:
    return [
        pb.ScheduleAssignment(selector=u.selector, schedule=schedule_to_pb(u.schedule))
        for u in updates
    ]


def schedules_from_pb(assignments: Iterable[pb.ScheduleAssignment]) -> tuple[ScheduleUpdate, ...]:
    out = []
    for k, a in enumerate(assignments):
        try:
            schedule = schedule_from_pb(a.schedule)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"schedules[{k}] ({a.selector!r}): {exc}") from None
        out.append(ScheduleUpdate(a.selector, schedule))
    return tuple(out)


def updates_from_pb(updates: Iterable[pb.LearningRateUpdate]) -> tuple[Update, ...]:
    out = []
    for k, u in enumerate(updates):
        mode = MODES.get(u.mode)
        if mode is None:
            name = pb.UpdateMode.Name(u.mode) if u.mode in pb.UpdateMode.values() else str(u.mode)
            raise InvalidArgumentError(
                f"updates[{k}] ({u.selector!r}) has mode {name}; use UPDATE_MODE_ABSOLUTE, "
                "UPDATE_MODE_SCALE or UPDATE_MODE_UNPIN"
            )
        target = TARGETS.get(u.target)
        if target is None:
            raise InvalidArgumentError(
                f"updates[{k}] ({u.selector!r}) has target {u.target}; use UPDATE_TARGET_BASE "
                "or UPDATE_TARGET_PIN"
            )
        out.append(Update(u.selector, u.value, mode, target))
    return tuple(out)


def check_message(request: WriteRequest) -> None:
    """The checks of a write message before anything else is read of it."""
    if isinstance(request, pb.SetSchedulesRequest) and not request.schedules:
        raise InvalidArgumentError("empty batch: give at least one schedule assignment")
    if isinstance(request, pb.ClearSchedulesRequest) and not request.selectors:
        raise InvalidArgumentError("empty batch: give at least one selector")
    if request.max_reported_changes < 0:
        raise InvalidArgumentError(f"max_reported_changes {request.max_reported_changes} is negative")


def parts(request: WriteRequest) -> tuple[tuple[Update, ...], tuple[ScheduleUpdate, ...]]:
    """A write message's rate updates and schedule assignments."""
    if isinstance(request, pb.SetLearningRatesRequest):
        return updates_from_pb(request.updates), schedules_from_pb(request.schedules)
    if isinstance(request, pb.SetSchedulesRequest):
        return (), schedules_from_pb(request.schedules)
    return (), tuple(ScheduleUpdate(s, None) for s in request.selectors)


def waits(request: WriteRequest) -> bool:
    """Whether its caller waits for the change to apply (a dry run never does)."""
    return request.wait and not request.dry_run


def change_request(request: WriteRequest, identity: Mapping[str, str], peer: str, user: str) -> ChangeRequest:
    updates, schedules = parts(request)
    return ChangeRequest(
        updates=updates,
        schedules=schedules,
        at_step=request.at_step if request.HasField("at_step") else None,
        expected_version=request.expected_version if request.HasField("expected_version") else None,
        reason=request.reason,
        peer=peer,
        user=user,
        wait=waits(request),
        **identity,
    )


def reply(max_reported_changes: int, outcome: Outcome) -> pb.SetLearningRatesResponse:
    limit = max_reported_changes or DEFAULT_REPORTED_CHANGES
    return pb.SetLearningRatesResponse(
        applied=outcome.applied,
        step=outcome.step,
        version=outcome.version,
        changes=rate_changes_pb(outcome.changes[:limit]),
        change_id=outcome.change_id,
        num_changes=len(outcome.changes),
    )


def user_of(metadata: Iterable[tuple[str, Any]] | None) -> str:
    for key, value in metadata or ():
        if key == "lrctl-user":
            return str(value)
    return ""


# -- a change planned in the serving process, on its way to the training process -----

@dataclass(frozen=True)
class Planned:
    """A change planned against config `version` after `loads` checkpoint loads
    (lrctl.server.serving_writes): the training process queues it as is while both are
    still those (a load may bring back the number with another state)."""

    request: ChangeRequest
    ops: dict[int, NameOp]
    version: int
    max_reported_changes: int
    loads: int = 0


_WAIT = 10  # where planned_to_wire puts the request's `wait`


def planned_waits(wired: tuple) -> bool:
    """Whether the change in planned_to_wire's tuple waits to be applied (no decoding)."""
    return bool(wired[_WAIT])


def planned_to_wire(planned: Planned) -> tuple:
    """A marshal-able tuple: updates as plain tuples, the positions as array bytes, each
    distinct op once (schedule specs, objects, pickled only when there are any)."""
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
        tuple((u.selector, u.value, u.mode.value, u.target.value) for u in r.updates),
        pickle.dumps(specs, pickle.HIGHEST_PROTOCOL) if specs else b"",
        tuple(u.selector for u in r.schedules),
        r.at_step, r.expected_version, r.reason, r.peer, r.user, r.role, r.token, r.wait,
        planned.version, planned.max_reported_changes,
        positions, b"" if len(ops_out) == 1 else which.tobytes(), tuple(ops_out), planned.loads,
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
     token, wait, version, max_reported, positions_raw, which_raw, ops_raw, loads) = t
    specs = pickle.loads(specs_raw) if specs_raw else []  # from the serving process we started
    n = len(schedule_selectors)
    request = ChangeRequest(
        updates=tuple([Update(s, v, _MODE_OF[m], _TARGET_OF[g]) for s, v, m, g in updates]),
        schedules=tuple(ScheduleUpdate(s, spec) for s, spec in zip(schedule_selectors, specs[:n])),
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
    return Planned(request, ops, version, max_reported, loads)
