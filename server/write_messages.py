"""Write requests and replies between their messages and lrctl.server.requests' plain data.

One place for both servers: the in-process handlers (lrctl.server.service) and the
serving process of attach(serving="process") (lrctl.server.serving_writes) turn a
SetLearningRates / SetSchedules / ClearSchedules message into a ChangeRequest and an
Outcome into a reply with these, so both refuse a bad message with the same message.
(The compact form of a change planned in the serving process, as it crosses to the
training process, is lrctl.server.planned_wire's.)

Imports neither grpc nor torch (protobuf only).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from lrctl.common.errors import InvalidArgumentError
from lrctl.common.schedule_messages import schedule_from_pb, schedule_to_pb
from lrctl.server.requests import ChangeRequest, Mode, Outcome, RateChange, ScheduleUpdate, Target, Update
from lrctl.server.subscribers import DEFAULT_REPORTED_CHANGES
from lrctl.v1 import lrctl_pb2 as pb

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
