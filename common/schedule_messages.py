"""Schedules on the wire: lrctl.common.schedules <-> the lrctl.v1.Schedule message.

Shared by the client (which builds requests) and the worker (which reads them and
reports schedules back). Protobuf only: neither grpc nor torch.
"""

from __future__ import annotations

from typing import Any

from lrctl.common.errors import InvalidArgumentError
from lrctl.common.schedules import (
    Constant,
    Exponential,
    InverseTime,
    OneCycle,
    PiecewiseLinear,
    Schedule,
    StepDecay,
    Warmup,
)
from lrctl.v1 import lrctl_pb2 as pb

_DECAYS = {
    pb.WARMUP_DECAY_UNSPECIFIED: "constant",
    pb.WARMUP_DECAY_CONSTANT: "constant",
    pb.WARMUP_DECAY_LINEAR: "linear",
    pb.WARMUP_DECAY_COSINE: "cosine",
}
_DECAYS_PB = {"constant": pb.WARMUP_DECAY_CONSTANT, "linear": pb.WARMUP_DECAY_LINEAR,
              "cosine": pb.WARMUP_DECAY_COSINE}
_ANNEALS = {pb.ONE_CYCLE_ANNEAL_UNSPECIFIED: "cos", pb.ONE_CYCLE_ANNEAL_COS: "cos",
            pb.ONE_CYCLE_ANNEAL_LINEAR: "linear"}
_ANNEALS_PB = {"cos": pb.ONE_CYCLE_ANNEAL_COS, "linear": pb.ONE_CYCLE_ANNEAL_LINEAR}


def _enum(table: dict[int, str], value: int, what: str) -> str:
    try:
        return table[value]
    except KeyError:
        raise InvalidArgumentError(f"{what} {value} is not a known value") from None


def schedule_from_pb(msg: pb.Schedule) -> Schedule:
    """The schedule a message describes; InvalidArgumentError naming what is wrong."""
    kind = msg.WhichOneof("kind")
    start = {"start_step": msg.start_step}
    if kind is None or kind == "constant":
        return Constant(**start)
    if kind == "warmup":
        w = msg.warmup
        return Warmup(warmup_steps=w.warmup_steps, total_steps=w.total_steps,
                      decay=_enum(_DECAYS, w.decay, "warmup: decay"), start_factor=w.start_factor,
                      final_factor=w.final_factor,
                      num_cycles=w.num_cycles if w.HasField("num_cycles") else 0.5, **start)
    if kind == "step":
        s = msg.step
        return StepDecay(gamma=s.gamma, step_size=s.step_size, milestones=tuple(s.milestones), **start)
    if kind == "exponential":
        return Exponential(gamma=msg.exponential.gamma, **start)
    if kind == "inverse_time":
        it = msg.inverse_time
        return InverseTime(gamma=it.gamma if it.HasField("gamma") else 1.0, **start)
    if kind == "one_cycle":
        o = msg.one_cycle
        optional = {f: getattr(o, f) for f in ("pct_start", "div_factor", "final_div_factor") if o.HasField(f)}
        return OneCycle(total_steps=o.total_steps, anneal=_enum(_ANNEALS, o.anneal, "one_cycle: anneal"),
                        three_phase=o.three_phase, **optional, **start)
    if kind == "piecewise_linear":
        points = tuple((p.step, p.factor) for p in msg.piecewise_linear.points)
        return PiecewiseLinear(points=points, **start)
    if kind == "adopted":
        raise InvalidArgumentError(
            "an adopted schedule cannot be assigned: it is a torch scheduler object in the "
            "worker; give a built-in schedule instead"
        )
    raise InvalidArgumentError(f"schedule kind {kind!r} is not known to this worker")


def schedule_to_pb(schedule: Any) -> pb.Schedule:
    """The message for a built-in schedule, or an AdoptedSchedule for an adopted one;
    None (no schedule: cleared) is constant."""
    if schedule is None:
        schedule = Constant()
    kind = schedule.kind
    if kind == "adopted":
        return pb.Schedule(adopted=pb.AdoptedSchedule(scheduler=schedule.scheduler_name,
                                                      group=schedule.index))
    msg = pb.Schedule(start_step=schedule.start_step)
    if kind == "constant":
        msg.constant.SetInParent()
    elif kind == "warmup":
        msg.warmup.MergeFrom(pb.WarmupSchedule(
            warmup_steps=schedule.warmup_steps, total_steps=schedule.total_steps,
            decay=_DECAYS_PB[schedule.decay], start_factor=schedule.start_factor,
            final_factor=schedule.final_factor, num_cycles=schedule.num_cycles))
    elif kind == "step":
        msg.step.MergeFrom(pb.StepSchedule(gamma=schedule.gamma, step_size=schedule.step_size,
                                           milestones=schedule.milestones))
    elif kind == "exponential":
        msg.exponential.MergeFrom(pb.ExponentialSchedule(gamma=schedule.gamma))
    elif kind == "inverse_time":
        msg.inverse_time.MergeFrom(pb.InverseTimeSchedule(gamma=schedule.gamma))
    elif kind == "one_cycle":
        msg.one_cycle.MergeFrom(pb.OneCycleSchedule(
            total_steps=schedule.total_steps, pct_start=schedule.pct_start,
            div_factor=schedule.div_factor, final_div_factor=schedule.final_div_factor,
            anneal=_ANNEALS_PB[schedule.anneal], three_phase=schedule.three_phase))
    elif kind == "piecewise_linear":
        msg.piecewise_linear.points.extend(
            pb.SchedulePoint(step=s, factor=f) for s, f in schedule.points)
    else:
        raise ValueError(f"no message for schedule kind {kind!r}")
    return msg
