"""Typed, immutable results of LRClient calls, made from the protobuf messages.

Callers get plain Python values (floats, tuples, dicts, short strings) instead of
protobuf messages, so code that uses the client does not depend on the generated stubs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Literal, Optional

from lrctl.common.schedule_messages import schedule_from_pb
from lrctl.common.schedules import Schedule
from lrctl.v1 import lrctl_pb2

UpdateModeName = Literal["absolute", "scale", "unpin"]
UpdateTargetName = Literal["base", "pin"]

_MODE_TO_PROTO: dict[str, int] = {
    "absolute": lrctl_pb2.UPDATE_MODE_ABSOLUTE,
    "scale": lrctl_pb2.UPDATE_MODE_SCALE,
    "unpin": lrctl_pb2.UPDATE_MODE_UNPIN,
}
_MODE_FROM_PROTO: dict[int, str] = {v: k for k, v in _MODE_TO_PROTO.items()}
_TARGET_TO_PROTO: dict[str, int] = {
    "base": lrctl_pb2.UPDATE_TARGET_UNSPECIFIED,
    "pin": lrctl_pb2.UPDATE_TARGET_PIN,
}
_TARGET_FROM_PROTO: dict[int, str] = {
    lrctl_pb2.UPDATE_TARGET_UNSPECIFIED: "base",
    lrctl_pb2.UPDATE_TARGET_BASE: "base",
    lrctl_pb2.UPDATE_TARGET_PIN: "pin",
}

_STATE_PREFIX = "TRAINING_STATE_"


@dataclass(frozen=True)
class Update:
    """One entry of a batch: set `selector`'s base rate to `value` or multiply it by `value`.

    With target="pin" the names are pinned at `value` (or at `value` x their rate in
    force, with mode="scale") whatever their schedule; mode="unpin" removes the pin.
    """

    selector: str
    value: float
    mode: UpdateModeName = "absolute"
    target: UpdateTargetName = "base"

    def __post_init__(self) -> None:
        # Only the mode and target are checked here; values are the worker's to judge,
        # so that the client and every other language get the same errors.
        if self.mode not in _MODE_TO_PROTO:
            raise ValueError(f"Update mode must be 'absolute', 'scale' or 'unpin', not {self.mode!r}")
        if self.target not in _TARGET_TO_PROTO:
            raise ValueError(f"Update target must be 'base' or 'pin', not {self.target!r}")

    def to_proto(self) -> lrctl_pb2.LearningRateUpdate:
        """The wire form of this update."""
        return lrctl_pb2.LearningRateUpdate(
            selector=self.selector, mode=_MODE_TO_PROTO[self.mode], value=float(self.value),
            target=_TARGET_TO_PROTO[self.target],
        )

    @classmethod
    def from_proto(cls, msg: lrctl_pb2.LearningRateUpdate) -> Update:
        """An Update from its wire form (unknown values read as 'unspecified')."""
        # Bypass validation: a record read back from the worker is reported as it is.
        obj = cls.__new__(cls)
        object.__setattr__(obj, "selector", msg.selector)
        object.__setattr__(obj, "value", msg.value)
        object.__setattr__(obj, "mode", _MODE_FROM_PROTO.get(msg.mode, "unspecified"))
        object.__setattr__(obj, "target", _TARGET_FROM_PROTO.get(msg.target, "unspecified"))
        return obj


@dataclass(frozen=True)
class ParameterInfo:
    """One parameter tensor of the model and its current hyperparameters."""

    name: str
    shape: tuple[int, ...]
    numel: int
    dtype: str
    device: str
    requires_grad: bool
    in_optimizer: bool
    settable: bool
    lr: Optional[float]
    group: int
    hyperparameters: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, msg: lrctl_pb2.Parameter) -> ParameterInfo:
        """A ParameterInfo from a Parameter message."""
        return cls(
            name=msg.name,
            shape=tuple(msg.shape),
            numel=msg.numel,
            dtype=msg.dtype,
            device=msg.device,
            requires_grad=msg.requires_grad,
            in_optimizer=msg.in_optimizer,
            settable=msg.settable,
            lr=msg.lr if msg.HasField("lr") else None,
            group=msg.group,
            hyperparameters=dict(msg.hyperparameters),
        )


@dataclass(frozen=True)
class LearningRate:
    """The rate of one parameter (pin, else base x factor) and its physical group.

    `schedule` describes the schedule in one line ("" for constant)."""

    name: str
    lr: float
    group: int
    base: float = 0.0
    factor: float = 1.0
    pinned: bool = False
    schedule: str = ""


@dataclass(frozen=True)
class LearningRates:
    """A consistent reading of rates (model order) with the worker's version and step."""

    rates: list[LearningRate]
    version: int
    step: int

    @classmethod
    def from_proto(cls, msg: lrctl_pb2.GetLearningRatesResponse) -> LearningRates:
        """A LearningRates from a GetLearningRatesResponse."""
        return cls(
            rates=[LearningRate(r.name, r.lr, r.group, r.base, r.factor, r.pinned, r.schedule)
                   for r in msg.rates],
            version=msg.version,
            step=msg.step,
        )


@dataclass(frozen=True)
class RateChange:
    """One parameter's rate in force before and after a change, and what made it.

    Pins are None when there is none; schedules are one-line descriptions ("" for
    constant, and both "" when the change did not touch schedules).
    """

    name: str
    old_lr: float
    new_lr: float
    old_base: float = 0.0
    new_base: float = 0.0
    old_pin: Optional[float] = None
    new_pin: Optional[float] = None
    old_schedule: str = ""
    new_schedule: str = ""

    @classmethod
    def from_proto(cls, msg: lrctl_pb2.RateChange) -> RateChange:
        """A RateChange from its wire form."""
        return cls(
            msg.name, msg.old_lr, msg.new_lr, msg.old_base, msg.new_base,
            msg.old_pin if msg.HasField("old_pin") else None,
            msg.new_pin if msg.HasField("new_pin") else None,
            msg.old_schedule, msg.new_schedule,
        )

    def what_changed(self) -> list[str]:
        """Which of base, pin, schedule this change moved (in that order)."""
        moved = []
        if self.old_base != self.new_base:
            moved.append("base")
        if self.old_pin != self.new_pin:
            moved.append("pin")
        if self.old_schedule != self.new_schedule:
            moved.append("schedule")
        return moved


@dataclass(frozen=True)
class ScheduleAssignment:
    """A schedule given to what `selector` matches (None: back to constant)."""

    selector: str
    schedule: Optional[Schedule]


@dataclass(frozen=True)
class NameSchedule:
    """One parameter's base, pin and schedule.

    `schedule` is the spec (lrctl.common.schedules), or None for a torch scheduler the
    worker adopted (`adopted` then names it, e.g. "LambdaLR group 0").
    """

    name: str
    base: float
    pin: Optional[float]
    schedule: Optional[Schedule]
    description: str
    adopted: str = ""

    @classmethod
    def from_proto(cls, msg: lrctl_pb2.NameSchedule) -> NameSchedule:
        """A NameSchedule from its wire form."""
        adopted = ""
        schedule: Optional[Schedule] = None
        if msg.schedule.WhichOneof("kind") == "adopted":
            adopted = f"{msg.schedule.adopted.scheduler} group {msg.schedule.adopted.group}"
        else:
            schedule = schedule_from_pb(msg.schedule)
        return cls(msg.name, msg.base, msg.pin if msg.HasField("pin") else None, schedule,
                   msg.description, adopted)


@dataclass(frozen=True)
class SetResult:
    """The answer to a set or scale request.

    `applied` is True once the change took effect at `step`; False for a dry run or an
    accepted (wait=False) change, whose `step` is when it is due (-1: next boundary).
    `changes` may list fewer than `num_changes` entries (max_reported_changes).
    """

    applied: bool
    step: int
    version: int
    changes: list[RateChange]
    change_id: int
    num_changes: int

    @classmethod
    def from_proto(cls, msg: lrctl_pb2.SetLearningRatesResponse) -> SetResult:
        """A SetResult from a SetLearningRatesResponse."""
        return cls(
            applied=msg.applied,
            step=msg.step,
            version=msg.version,
            changes=[RateChange.from_proto(c) for c in msg.changes],
            change_id=msg.change_id,
            num_changes=msg.num_changes,
        )


def state_name(state: int) -> str:
    """Short name of a TrainingState value ("training"); unknown values stay readable."""
    try:
        full = lrctl_pb2.TrainingState.Name(state)
    except ValueError:
        # A newer worker may report a state this client does not know yet.
        return f"unknown({state})"
    return full.removeprefix(_STATE_PREFIX).lower()


@dataclass(frozen=True)
class Guardrail:
    """A bound the worker sets on the rates of the names `selector` matches (None: no bound)."""

    selector: str
    min_lr: Optional[float] = None
    max_lr: Optional[float] = None

    @classmethod
    def from_proto(cls, msg: lrctl_pb2.Guardrail) -> Guardrail:
        return cls(
            selector=msg.selector,
            min_lr=msg.min_lr if msg.HasField("min_lr") else None,
            max_lr=msg.max_lr if msg.HasField("max_lr") else None,
        )


@dataclass(frozen=True)
class LockstepInfo:
    """The lockstep controller attached to a worker (Status.lockstep)."""

    peer: str
    token_name: str
    every: int
    timeout: float
    held_step: Optional[int]  # the step held now; None when training is not held
    turns: int
    timeouts: int  # turns of this controller whose hold ended by the timeout
    ignored_decisions: int  # its decisions that came after their hold had ended

    @classmethod
    def from_proto(cls, msg: lrctl_pb2.LockstepStatus) -> LockstepInfo:
        return cls(msg.peer, msg.token_name, msg.every, msg.timeout_seconds,
                   msg.held_step if msg.HasField("held_step") else None, msg.turns, msg.timeouts,
                   msg.ignored_decisions)


@dataclass(frozen=True)
class TurnOutcome:
    """What happened at a held step: whether its hold ended by the timeout, whether a
    decision for it came after that (and was ignored), and the ids of the changes
    recorded at that step (applied, and accepted but failed there)."""

    step: int
    timed_out: bool
    decided_late: bool
    applied_change_ids: tuple[int, ...]
    failed_change_ids: tuple[int, ...]

    @classmethod
    def from_proto(cls, msg: lrctl_pb2.LockstepOutcome) -> TurnOutcome:
        return cls(msg.step, msg.timed_out, msg.decided_late, tuple(msg.applied_change_ids),
                   tuple(msg.failed_change_ids))


@dataclass(frozen=True)
class Turn:
    """A step the worker holds at (after applying the changes already due at it) until
    `decide()` or its timeout. Act first (set_learning_rates(..., at_step=turn.step,
    wait=False, expected_version=turn.version)), then decide()."""

    step: int
    version: int  # config version at the hold
    wall_time: float  # when the hold began, seconds since the Unix epoch
    timeout: float  # seconds the worker holds at most
    previous: Optional[TurnOutcome]  # the previous held step of this session
    ignored_decisions: int  # decisions since the previous turn for holds already ended
    dropped_turns: int  # turns not read in time, dropped by the worker before this one
    _decide: Callable[[int], None] = field(default=lambda step: None, repr=False, compare=False)

    def decide(self) -> None:
        """Tell the worker this step is decided: training goes on at once. Never blocks;
        a decision that comes after the timeout is ignored and reported in the next turn."""
        self._decide(self.step)

    @classmethod
    def from_proto(cls, msg: lrctl_pb2.LockstepTurn, decide: Callable[[int], None]) -> Turn:
        return cls(msg.step, msg.version, msg.wall_time, msg.timeout_seconds,
                   TurnOutcome.from_proto(msg.previous) if msg.HasField("previous") else None,
                   msg.ignored_decisions, msg.dropped_turns, decide)


@dataclass(frozen=True)
class Status:
    """The worker's step, config version, optimizer, grouping, training state and guardrails.

    `state` is one of "waiting_for_first_step", "training", "closing" (or "unspecified").
    """

    step: int
    version: int
    optimizer: str
    num_parameters: int
    num_settable: int
    num_distinct_lrs: int
    num_param_groups: int
    state: str
    uptime_seconds: float
    seconds_since_last_step: Optional[float]
    pending_changes: int
    server_version: str
    run_id: str = ""
    guardrails: tuple[Guardrail, ...] = ()
    max_factor: Optional[float] = None  # guardrail: largest factor per change; None: no bound
    lockstep: Optional[LockstepInfo] = None  # the lockstep controller attached; None: none
    lockstep_timeouts: int = 0  # holds ended by the timeout in this run, all controllers
    oldest_event_step: Optional[int] = None  # oldest step WatchMetrics can start from
    watchers: int = 0  # WatchMetrics streams open

    @classmethod
    def from_proto(cls, msg: lrctl_pb2.GetStatusResponse) -> Status:
        """A Status from a GetStatusResponse."""
        return cls(
            step=msg.step,
            version=msg.version,
            optimizer=msg.optimizer,
            num_parameters=msg.num_parameters,
            num_settable=msg.num_settable,
            num_distinct_lrs=msg.num_distinct_lrs,
            num_param_groups=msg.num_param_groups,
            state=state_name(msg.state),
            uptime_seconds=msg.uptime_seconds,
            seconds_since_last_step=(
                msg.seconds_since_last_step if msg.HasField("seconds_since_last_step") else None
            ),
            pending_changes=msg.pending_changes,
            server_version=msg.server_version,
            run_id=msg.run_id,
            guardrails=tuple(Guardrail.from_proto(g) for g in msg.guardrails),
            max_factor=msg.max_factor if msg.HasField("max_factor") else None,
            lockstep=LockstepInfo.from_proto(msg.lockstep) if msg.HasField("lockstep") else None,
            lockstep_timeouts=msg.lockstep_timeouts,
            oldest_event_step=msg.oldest_event_step if msg.HasField("oldest_event_step") else None,
            watchers=msg.watchers,
        )


@dataclass(frozen=True)
class ChangeRecord:
    """One change from the worker's history: who, when, at which step, what.

    `status` is "" for an applied change; for an accepted change that failed at its
    step it names the gRPC status it failed with ("FAILED_PRECONDITION", ...) and
    `error` says why (it changed nothing, and `version` is the one in force then).
    `changes` may list fewer than `num_changes` entries (max_changes_per_record).
    """

    change_id: int
    version: int
    step: int
    applied_at: float
    requested_at: float
    updates: list[Update]
    changes: list[RateChange]
    peer: str
    user: str
    reason: str
    at_step: Optional[int]
    num_changes: int
    schedules: list[ScheduleAssignment] = field(default_factory=list)
    role: str = ""  # authenticated role and token name; "" when the worker has no tokens
    token_name: str = ""
    status: str = ""
    error: str = ""

    @property
    def failed(self) -> bool:
        """True for an accepted change that failed at its step (nothing was applied)."""
        return bool(self.status)

    @classmethod
    def from_proto(cls, msg: lrctl_pb2.ChangeRecord) -> ChangeRecord:
        """A ChangeRecord from its wire form."""
        return cls(
            change_id=msg.change_id,
            version=msg.version,
            step=msg.step,
            applied_at=msg.applied_at,
            requested_at=msg.requested_at,
            updates=[Update.from_proto(u) for u in msg.updates],
            changes=[RateChange.from_proto(c) for c in msg.changes],
            peer=msg.peer,
            user=msg.user,
            reason=msg.reason,
            at_step=msg.at_step if msg.HasField("at_step") else None,
            num_changes=msg.num_changes,
            schedules=[_assignment_from_proto(a) for a in msg.schedules],
            role=msg.role,
            token_name=msg.token_name,
            status=msg.status,
            error=msg.error,
        )


def _assignment_from_proto(msg: lrctl_pb2.ScheduleAssignment) -> ScheduleAssignment:
    schedule = schedule_from_pb(msg.schedule)
    return ScheduleAssignment(msg.selector, None if schedule.is_constant and not schedule.start_step else schedule)


@dataclass(frozen=True)
class PendingChange:
    """An accepted change still waiting for its step (LRClient.list_pending).

    `at_step` None: due at the next step boundary. `updates` and `schedules` are as
    sent (cut for a change too big for one page; `num_names` counts every name).
    """

    change_id: int
    at_step: Optional[int]
    requested_at: float
    updates: list[Update]
    schedules: list[ScheduleAssignment]
    peer: str
    user: str
    role: str
    token_name: str
    reason: str
    waiting: bool
    num_names: int
    expected_version: Optional[int]

    @classmethod
    def from_proto(cls, msg: lrctl_pb2.PendingChangeInfo) -> PendingChange:
        """A PendingChange from its wire form."""
        return cls(
            change_id=msg.change_id,
            at_step=msg.at_step if msg.HasField("at_step") else None,
            requested_at=msg.requested_at,
            updates=[Update.from_proto(u) for u in msg.updates],
            schedules=[_assignment_from_proto(a) for a in msg.schedules],
            peer=msg.peer,
            user=msg.user,
            role=msg.role,
            token_name=msg.token_name,
            reason=msg.reason,
            waiting=msg.waiting,
            num_names=msg.num_names,
            expected_version=msg.expected_version if msg.HasField("expected_version") else None,
        )


@dataclass(frozen=True)
class CancelResult:
    """What LRClient.cancel_changes did: ids cancelled (never to be applied), and ids
    that were not queued (unknown, already applied, withdrawn or cancelled)."""

    cancelled: list[int]
    not_found: list[int]


@dataclass(frozen=True)
class MetricsEvent:
    """One step of a watched job (LRClient.watch_metrics).

    `metrics`: the scalars reported for the step (NaN/inf kept). `stats`: per name (or
    stats group) -> statistic -> value, when due and asked for; else empty. `changes`:
    change records applied or failed at this step. `dropped`: events this stream lost
    right before this one (it read too slowly); 0 normally.
    """

    step: int
    time: float
    version: int
    metrics: dict[str, float]
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    changes: list[ChangeRecord] = field(default_factory=list)
    dropped: int = 0

    @classmethod
    def from_proto(cls, msg: lrctl_pb2.MetricsEvent) -> MetricsEvent:
        """A MetricsEvent from its wire form."""
        return cls(
            step=msg.step,
            time=msg.time,
            version=msg.version,
            metrics=dict(msg.metrics),
            stats={s.name: dict(s.values) for s in msg.stats},
            changes=[ChangeRecord.from_proto(c) for c in msg.changes],
            dropped=msg.dropped,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of `lrctl watch --json`: step, time, version, metrics, dropped,
        and stats and changes when there are any."""
        out: dict[str, Any] = {"step": self.step, "time": self.time, "version": self.version,
                               "metrics": dict(self.metrics)}
        if self.stats:
            out["stats"] = {name: dict(values) for name, values in self.stats.items()}
        if self.changes:
            out["changes"] = [_change_dict(c) for c in self.changes]
        out["dropped"] = self.dropped
        return out


def _change_dict(record: ChangeRecord) -> dict[str, Any]:
    # Schedules by to_dict(): asdict() would drop their kind (a class attribute).
    schedules = [{"selector": a.selector, "schedule": None if a.schedule is None else a.schedule.to_dict()}
                 for a in record.schedules]
    return {**asdict(replace(record, schedules=[])), "schedules": schedules}


class ChangeList(list):  # type: ignore[type-arg]
    """A reading of the history (a list of ChangeRecord) and what it could not include.

    `dropped`: records the worker's bounded history dropped from its front, in all;
    `gap`: True when records right after where the reading began had been dropped
    (it does not start right after `after_version`); `oldest_version`: version of
    the oldest applied change the worker still holds (0 if none).
    """

    dropped: int = 0
    gap: bool = False
    oldest_version: int = 0
