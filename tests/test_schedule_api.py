"""Schedules, pins and bases over real gRPC: SetSchedules / ClearSchedules /
GetSchedules, UPDATE_TARGET_PIN and UPDATE_MODE_UNPIN, the new LearningRate and
RateChange fields, the history's schedule assignments, and the CLI verbs on top
(`schedule set|clear|show`, `set --pin`, `scale --pin`, `unpin`, `get`, `history`).

Each test gets its own worker on a free loopback port (`served` in conftest). Tests
that need exact steps drive optimizer.step() from the test thread and record the rate
every step really used with a step pre-hook registered after attach (it runs after
lrctl's hook); tests that wait for a change, and every bad-input test, run the
background `training` loop, which must survive them.

"Exact" means `==` on floats: the rate the optimizer holds at step S must be the very
float `schedule.rate(base, S)` of lrctl.common.schedules.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from typing import Any, Callable

import grpc
import pytest
import torch

from conftest import (
    SEED_LRS,
    SEED_NAMES,
    Served,
    Trainer,
    assert_error,
    group_lrs,
    ok,
    rpc_error,
    table,
    train_step,
)
from lrctl.client.client import LRClient
from lrctl.common.schedule_messages import schedule_from_pb, schedule_to_pb
from lrctl.common.schedules import (
    Constant,
    Exponential,
    InverseTime,
    OneCycle,
    PiecewiseLinear,
    Schedule,
    StepDecay,
    Warmup,
    schedule_from_dict,
)
from lrctl.server import attach
from lrctl.server.requests import ChangeRequest, Update
from lrctl.v1 import lrctl_pb2 as pb
from lrctl.v1 import lrctl_pb2_grpc as pb_grpc

T = 10  # per-call deadline (s) for calls that should answer at once
WAIT_T = 30  # deadline of calls that wait for the background loop's next step

WARMUP_COSINE = Warmup(warmup_steps=5, decay="cosine", total_steps=50)
WARMUP_COSINE_TEXT = "warmup 5 steps (from 0.0) then cosine to 0.0 at step 50"


# -- helpers ---------------------------------------------------------------------------


def assign(selector: str, schedule: Schedule | pb.Schedule) -> pb.ScheduleAssignment:
    message = schedule if isinstance(schedule, pb.Schedule) else schedule_to_pb(schedule)
    return pb.ScheduleAssignment(selector=selector, schedule=message)


def base_set(selector: str, value: float) -> pb.LearningRateUpdate:
    return pb.LearningRateUpdate(selector=selector, mode=pb.UPDATE_MODE_ABSOLUTE, value=value)


def base_scale(selector: str, value: float) -> pb.LearningRateUpdate:
    return pb.LearningRateUpdate(selector=selector, mode=pb.UPDATE_MODE_SCALE, value=value)


def pin(selector: str, value: float) -> pb.LearningRateUpdate:
    return pb.LearningRateUpdate(selector=selector, mode=pb.UPDATE_MODE_ABSOLUTE, value=value,
                                 target=pb.UPDATE_TARGET_PIN)


def pin_scale(selector: str, value: float) -> pb.LearningRateUpdate:
    return pb.LearningRateUpdate(selector=selector, mode=pb.UPDATE_MODE_SCALE, value=value,
                                 target=pb.UPDATE_TARGET_PIN)


def unpin(selector: str, target: int = pb.UPDATE_TARGET_PIN) -> pb.LearningRateUpdate:
    return pb.LearningRateUpdate(selector=selector, mode=pb.UPDATE_MODE_UNPIN, target=target)


def set_schedules(served: Served, *assignments: pb.ScheduleAssignment, **options: Any) -> pb.SetLearningRatesResponse:
    return served.stub.SetSchedules(pb.SetSchedulesRequest(schedules=list(assignments), **options),
                                    timeout=WAIT_T if options.get("wait") else T)


def clear_schedules(served: Served, *selectors: str, **options: Any) -> pb.SetLearningRatesResponse:
    return served.stub.ClearSchedules(pb.ClearSchedulesRequest(selectors=list(selectors), **options),
                                      timeout=WAIT_T if options.get("wait") else T)


def set_rates(served: Served, *updates: pb.LearningRateUpdate, schedules: tuple = (), **options: Any) -> pb.SetLearningRatesResponse:
    request = pb.SetLearningRatesRequest(updates=list(updates), schedules=list(schedules), **options)
    return served.stub.SetLearningRates(request, timeout=WAIT_T if options.get("wait") else T)


def read_rates(served: Served, *selectors: str) -> pb.GetLearningRatesResponse:
    return served.stub.GetLearningRates(pb.GetLearningRatesRequest(selectors=list(selectors)), timeout=T)


def get_schedules(served: Served, *selectors: str) -> pb.GetSchedulesResponse:
    return served.stub.GetSchedules(pb.GetSchedulesRequest(selectors=list(selectors)), timeout=T)


def history(served: Served) -> list[pb.ChangeRecord]:
    return list(served.stub.ListChanges(pb.ListChangesRequest(), timeout=T).changes)


def status(served: Served) -> pb.GetStatusResponse:
    return served.stub.GetStatus(pb.GetStatusRequest(), timeout=T)


def assert_status(error: grpc.RpcError, code: grpc.StatusCode, *fragments: str) -> None:
    assert error.code() == code, f"{error.code()}: {error.details()}"
    for fragment in fragments:
        assert fragment in error.details(), f"{fragment!r} not in {error.details()!r}"


def record_rates(served: Served) -> list[dict[str, float]]:
    """The rate of each name that every later optimizer.step() really used, by step.

    Registered after attach, the hook runs after lrctl's: it sees what the step uses.
    Call before the first step, so that list index = step.
    """
    assert served.controller.step == 0
    seen: list[dict[str, float]] = []
    served.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(group_lrs(served.model, opt)))
    return seen


def changes_by_name(reply: pb.SetLearningRatesResponse | pb.ChangeRecord) -> dict[str, pb.RateChange]:
    return {c.name: c for c in reply.changes}


def snapshot(served: Served) -> tuple:
    """Everything a rejected request must leave as it was (rates move with the step under
    a schedule, so bases, pins and schedules are compared, not the moving rates)."""
    schedules = get_schedules(served)
    rows = [(r.name, r.base, r.pin if r.HasField("pin") else None, r.schedule.SerializeToString(deterministic=True),
             r.description) for r in schedules.schedules]
    s = status(served)
    return rows, schedules.version, s.version, s.pending_changes, [r.change_id for r in history(served)]


# -- happy paths: exact rates at every step ---------------------------------------------


def test_warmup_cosine_on_a_glob_at_a_step_gives_base_times_factor_bit_for_bit(served: Served) -> None:
    seen = record_rates(served)
    served.step(2)
    reply = set_schedules(served, assign("layer1.*", WARMUP_COSINE), at_step=4, reason="warm up layer1")
    assert (reply.applied, reply.step, reply.version) == (False, 4, 0) and reply.change_id > 0
    assert [(c.name, c.new_schedule) for c in reply.changes] == [
        ("layer1.weight", WARMUP_COSINE_TEXT), ("layer1.bias", WARMUP_COSINE_TEXT)]
    for step in range(2, 60):
        reading = read_rates(served)
        assert reading.step == step == served.controller.step
        for r in reading.rates:  # GetLearningRates: base, factor and lr for the reported step
            # Read before step 4's boundary, the change due there is not in force yet.
            scheduled = r.name.startswith("layer1.") and step > 4
            factor = WARMUP_COSINE.factor(step) if scheduled else 1.0
            assert (r.base, r.factor, r.pinned) == (SEED_LRS[r.name], factor, False), (step, r)
            assert r.lr == (WARMUP_COSINE.rate(r.base, step) if scheduled else r.base), (step, r)
            assert r.schedule == (WARMUP_COSINE_TEXT if scheduled else "")
        served.step()
        if step != 4:
            assert seen[step] == {r.name: r.lr for r in reading.rates}  # what the step really used
    for step, rates in enumerate(seen):
        for name, base in SEED_LRS.items():
            if name.startswith("layer1.") and step >= 4:
                assert rates[name] == base * WARMUP_COSINE.factor(step), (step, name)
            else:
                assert rates[name] == base, (step, name)
    # The shape is there: warm-up, peak at step 5, decayed to 0 at step 50.
    assert [seen[s]["layer1.weight"] for s in (4, 5, 50, 59)] == [0.01 * 0.8, 0.01, 0.0, 0.0]
    (record,) = history(served)
    assert (record.change_id, record.version, record.step, record.at_step) == (reply.change_id, 1, 4, 4)
    assert record.reason == "warm up layer1" and list(record.updates) == []
    assert [(a.selector, schedule_from_pb(a.schedule)) for a in record.schedules] == [("layer1.*", WARMUP_COSINE)]
    changes = changes_by_name(record)
    assert list(changes) == ["layer1.weight", "layer1.bias"] and record.num_changes == 2
    for name, c in changes.items():
        base = SEED_LRS[name]
        assert (c.old_lr, c.new_lr) == (base, WARMUP_COSINE.rate(base, 4))
        assert (c.old_base, c.new_base) == (base, base)
        assert (c.old_schedule, c.new_schedule) == ("", WARMUP_COSINE_TEXT)
        assert not c.HasField("old_pin") and not c.HasField("new_pin")


def test_seed_example_through_inverse_time_reproduces_the_seed_table(served: Served) -> None:
    """shared/seed-example.md: rate_i = initial / (i + 1) for steps 0..9, printed digits."""
    table = [
        ("0.01", "0.1", "0.001", "1.0"),
        ("0.005", "0.05", "0.0005", "0.5"),
        ("0.0033333333333333335", "0.03333333333333333", "0.0003333333333333333", "0.3333333333333333"),
        ("0.0025", "0.025", "0.00025", "0.25"),
        ("0.002", "0.02", "0.0002", "0.2"),
        ("0.0016666666666666668", "0.016666666666666666", "0.00016666666666666666", "0.16666666666666666"),
        ("0.0014285714285714286", "0.014285714285714287", "0.00014285714285714287", "0.14285714285714285"),
        ("0.00125", "0.0125", "0.000125", "0.125"),
        ("0.0011111111111111111", "0.011111111111111112", "0.00011111111111111112", "0.1111111111111111"),
        ("0.001", "0.01", "0.0001", "0.1"),
    ]
    seen = record_rates(served)
    message = pb.Schedule(inverse_time=pb.InverseTimeSchedule(gamma=1.0))
    reply = set_schedules(served, *(assign(name, message) for name in SEED_NAMES), at_step=0)
    assert reply.step == 0 and reply.num_changes == 4
    for _ in range(10):
        train_step(served.model, served.optimizer, torch.zeros(1, 10))
    got = [tuple(repr(rates[name]) for name in SEED_NAMES) for rates in seen]
    assert got == table
    assert [[rates[n] for n in SEED_NAMES] for rates in seen] == [
        [SEED_LRS[n] / (i + 1) for n in SEED_NAMES] for i in range(10)]


def test_base_changes_under_a_schedule_move_the_rate_from_the_new_base(served: Served) -> None:
    seen = record_rates(served)
    decay = Exponential(gamma=0.9)
    set_schedules(served, assign("layer1.weight", decay), at_step=0)
    served.step(3)
    set_rates(served, base_set("layer1.weight", 0.05), at_step=3)
    served.step(3)
    set_rates(served, base_scale("layer1.weight", 0.5), at_step=6)
    served.step(3)
    bases = [0.01] * 3 + [0.05] * 3 + [0.05 * 0.5] * 3
    assert [rates["layer1.weight"] for rates in seen] == [decay.rate(b, s) for s, b in enumerate(bases)]
    assert all(rates["layer1.bias"] == 0.1 for rates in seen)  # untouched
    _, set_record, scale_record = history(served)
    c = changes_by_name(set_record)["layer1.weight"]
    assert (c.old_base, c.new_base) == (0.01, 0.05)
    assert (c.old_lr, c.new_lr) == (decay.rate(0.01, 3), decay.rate(0.05, 3))
    assert (c.old_schedule, c.new_schedule) == ("", "")  # the change did not touch schedules
    assert not c.HasField("old_pin") and not c.HasField("new_pin")
    c = changes_by_name(scale_record)["layer1.weight"]
    assert (c.old_base, c.new_base) == (0.05, 0.05 * 0.5)  # scale multiplies the base
    assert (c.old_lr, c.new_lr) == (decay.rate(0.05, 6), decay.rate(0.025, 6))
    reading = read_rates(served, "layer1.weight")
    (r,) = reading.rates
    assert (r.base, r.factor, r.lr, reading.step) == (0.025, decay.factor(9), decay.rate(0.025, 9), 9)


def test_pin_holds_the_rate_whatever_the_schedule_and_unpin_returns_to_base_times_factor(served: Served) -> None:
    seen = record_rates(served)
    set_schedules(served, assign("layer1.*", WARMUP_COSINE), at_step=0)
    served.step(3)
    reply = set_rates(served, pin("layer1.weight", 0.123), at_step=3)
    c = changes_by_name(reply)["layer1.weight"]
    assert not c.HasField("old_pin") and c.new_pin == 0.123 and c.new_lr == 0.123
    assert (c.old_base, c.new_base) == (0.01, 0.01)
    served.step(5)  # steps 3..7: warm-up, then the peak, then the decay
    assert [rates["layer1.weight"] for rates in seen[3:8]] == [0.123] * 5
    assert [rates["layer1.bias"] for rates in seen[3:8]] == [WARMUP_COSINE.rate(0.1, s) for s in range(3, 8)]

    reading = read_rates(served, "layer1.*")
    assert reading.step == 8
    w, b = reading.rates
    assert (w.lr, w.base, w.factor, w.pinned, w.schedule) == (
        0.123, 0.01, WARMUP_COSINE.factor(8), True, WARMUP_COSINE_TEXT)
    assert (b.lr, b.pinned) == (WARMUP_COSINE.rate(0.1, 8), False)
    rows = {r.name: r for r in get_schedules(served, "layer1.*").schedules}
    assert rows["layer1.weight"].HasField("pin") and rows["layer1.weight"].pin == 0.123
    assert not rows["layer1.bias"].HasField("pin")
    assert schedule_from_pb(rows["layer1.weight"].schedule) == WARMUP_COSINE  # the schedule stays

    # A scale of the pin target pins at value x the rate in force at that step.
    reply = set_rates(served, pin_scale("layer1.bias", 0.5), at_step=8)
    held = 0.5 * WARMUP_COSINE.rate(0.1, 8)
    c = changes_by_name(reply)["layer1.bias"]
    assert (c.old_lr, c.new_lr, c.new_pin, c.new_base) == (WARMUP_COSINE.rate(0.1, 8), held, held, 0.1)
    served.step(2)
    assert [rates["layer1.bias"] for rates in seen[8:10]] == [held, held]

    reply = set_rates(served, unpin("layer1.*"), at_step=10)
    changes = changes_by_name(reply)
    assert (changes["layer1.weight"].old_pin, changes["layer1.bias"].old_pin) == (0.123, held)
    assert not any(c.HasField("new_pin") for c in changes.values())
    served.step(4)
    for step in range(10, 14):
        assert seen[step]["layer1.weight"] == WARMUP_COSINE.rate(0.01, step)
        assert seen[step]["layer1.bias"] == WARMUP_COSINE.rate(0.1, step)
    assert not any(r.pinned for r in read_rates(served).rates)
    assert [r.step for r in history(served)] == [0, 3, 8, 10]


def test_clear_schedules_returns_names_to_their_base(served: Served) -> None:
    seen = record_rates(served)
    decay = StepDecay(gamma=0.5, step_size=2)
    set_schedules(served, assign("*", decay), at_step=0)
    served.step(3)
    set_rates(served, pin("layer2.bias", 0.7), at_step=3)
    served.step(2)
    reply = clear_schedules(served, "layer1.*", "layer2.bias", at_step=5, reason="back to flat")
    changes = changes_by_name(reply)
    assert list(changes) == ["layer1.weight", "layer1.bias", "layer2.bias"]
    for c in changes.values():
        assert (c.old_schedule, c.new_schedule) == ("x0.5 every 2 steps", "")
    assert changes["layer1.weight"].new_lr == 0.01 and changes["layer2.bias"].new_lr == 0.7  # still pinned
    served.step(3)
    for step in range(5, 8):
        assert seen[step] == {"layer1.weight": 0.01, "layer1.bias": 0.1,
                              "layer2.weight": decay.rate(0.001, step), "layer2.bias": 0.7}
    rows = {r.name: r for r in get_schedules(served).schedules}
    for name in ("layer1.weight", "layer1.bias", "layer2.bias"):
        assert rows[name].schedule.WhichOneof("kind") == "constant" and rows[name].description == ""
        assert schedule_from_pb(rows[name].schedule) == Constant()
    assert schedule_from_pb(rows["layer2.weight"].schedule) == decay
    record = history(served)[-1]
    assert record.reason == "back to flat" and list(record.updates) == []
    assert [(a.selector, a.schedule.WhichOneof("kind")) for a in record.schedules] == [
        ("layer1.*", "constant"), ("layer2.bias", "constant")]  # a cleared schedule is constant
    set_rates(served, unpin("layer2.bias"), at_step=8)
    served.step()
    assert seen[8]["layer2.bias"] == 1.0  # rate = base


def test_a_mixed_batch_lands_whole_at_one_step(served: Served) -> None:
    """Updates (base, scale, pin) and schedules in one SetLearningRates; a schedule and a
    base change on the same name are allowed together."""
    seen = record_rates(served)
    served.step(2)
    decay, steps = Exponential(gamma=0.9), StepDecay(gamma=0.5, milestones=(6, 8))
    reply = set_rates(
        served,
        base_set("layer1.weight", 0.05), base_scale("layer2.weight", 2.0), pin("layer2.bias", 0.3),
        schedules=(assign("layer1.*", decay), assign("layer2.bias", steps)),
        at_step=5, reason="mixed",
    )
    assert (reply.applied, reply.step, reply.num_changes) == (False, 5, 4)
    served.step(3)
    for step in range(2, 5):
        assert seen[step] == SEED_LRS, step  # nothing before the step
    served.step(5)
    for step in range(5, 10):
        assert seen[step] == {"layer1.weight": decay.rate(0.05, step), "layer1.bias": decay.rate(0.1, step),
                              "layer2.weight": 0.002, "layer2.bias": 0.3}, step
    (record,) = history(served)
    assert (record.version, record.step, record.at_step, record.num_changes) == (1, 5, 5, 4)
    assert list(record.updates) == [base_set("layer1.weight", 0.05), base_scale("layer2.weight", 2.0),
                                    pin("layer2.bias", 0.3)]
    assert [(a.selector, schedule_from_pb(a.schedule)) for a in record.schedules] == [
        ("layer1.*", decay), ("layer2.bias", steps)]
    c = changes_by_name(record)
    assert (c["layer1.weight"].old_base, c["layer1.weight"].new_base) == (0.01, 0.05)
    assert (c["layer1.weight"].new_lr, c["layer1.weight"].new_schedule) == (decay.rate(0.05, 5), "x0.9 per step")
    assert (c["layer2.weight"].new_base, c["layer2.weight"].new_lr) == (0.002, 0.002)
    assert (c["layer2.bias"].new_pin, c["layer2.bias"].new_lr) == (0.3, 0.3)
    assert c["layer2.bias"].new_schedule == "x0.5 at steps 6, 8"
    row = {r.name: r for r in get_schedules(served).schedules}["layer2.bias"]
    assert (row.base, row.pin, schedule_from_pb(row.schedule)) == (1.0, 0.3, steps)


def test_dry_runs_report_the_would_be_changes_and_change_nothing(served: Served) -> None:
    decay = Exponential(gamma=0.5)
    set_schedules(served, assign("layer1.weight", WARMUP_COSINE), at_step=0)
    served.step(2)
    before = snapshot(served)

    reply = set_schedules(served, assign("layer2.*", decay), dry_run=True, wait=True)
    assert (reply.applied, reply.change_id, reply.version, reply.num_changes) == (False, 0, 1, 2)
    assert [(c.name, c.old_lr, c.new_lr, c.old_schedule, c.new_schedule) for c in reply.changes] == [
        ("layer2.weight", 0.001, decay.rate(0.001, 2), "", "x0.5 per step"),
        ("layer2.bias", 1.0, decay.rate(1.0, 2), "", "x0.5 per step"),
    ]
    reply = clear_schedules(served, "layer1.weight", dry_run=True)
    (c,) = reply.changes
    assert (c.old_lr, c.new_lr, c.old_schedule, c.new_schedule) == (
        WARMUP_COSINE.rate(0.01, 2), 0.01, WARMUP_COSINE_TEXT, "")
    assert (reply.applied, reply.change_id) == (False, 0)
    reply = set_rates(served, pin("layer1.weight", 0.5), unpin("layer2.bias"), base_set("layer1.bias", 0.2),
                      schedules=(assign("layer1.bias", decay),), dry_run=True)
    changes = changes_by_name(reply)
    assert (changes["layer1.weight"].new_pin, changes["layer1.weight"].new_lr) == (0.5, 0.5)
    assert (changes["layer1.bias"].new_base, changes["layer1.bias"].new_lr) == (0.2, decay.rate(0.2, 2))
    assert reply.change_id == 0

    served.step(3)
    assert snapshot(served) == before
    assert status(served).version == 1 and len(history(served)) == 1


def _round_trip_cases() -> list[tuple[str, pb.Schedule, Schedule]]:
    specs: list[tuple[str, Schedule]] = [
        ("constant", Constant()),
        ("warmup constant", Warmup(warmup_steps=10, start_factor=0.1)),
        ("warmup linear", Warmup(warmup_steps=10, total_steps=50, decay="linear", start_factor=0.1,
                                 final_factor=0.05)),
        ("warmup cosine", Warmup(warmup_steps=0, total_steps=30, decay="cosine", num_cycles=1.5)),
        ("step step_size", StepDecay(gamma=0.5, step_size=7)),
        ("step milestones", StepDecay(gamma=0.1, milestones=(30, 80))),
        ("exponential", Exponential(gamma=0.97)),
        ("inverse_time", InverseTime(gamma=0.25)),
        ("one_cycle", OneCycle(total_steps=37, pct_start=0.25, div_factor=10, final_div_factor=100,
                               anneal="linear", three_phase=True)),
        ("piecewise_linear", PiecewiseLinear(points=((0, 0.0), (100, 1.0), (1000, 0.1)))),
        ("start_step", Warmup(warmup_steps=5, total_steps=40, decay="linear", start_step=12)),
        ("start_step exponential", Exponential(gamma=0.9, start_step=3)),
    ]
    cases = [(name, schedule_to_pb(spec), spec) for name, spec in specs]
    # Messages a client of another language writes by hand: absent optional fields
    # take their documented defaults.
    cases += [
        ("no kind is constant", pb.Schedule(), Constant()),
        ("inverse_time default gamma", pb.Schedule(inverse_time=pb.InverseTimeSchedule()), InverseTime(gamma=1.0)),
        ("one_cycle defaults", pb.Schedule(one_cycle=pb.OneCycleSchedule(total_steps=100)),
         OneCycle(total_steps=100, pct_start=0.3, div_factor=25.0, final_div_factor=1e4)),
        ("warmup decay unspecified", pb.Schedule(warmup=pb.WarmupSchedule(warmup_steps=4)), Warmup(warmup_steps=4)),
        ("warmup cosine default cycles",
         pb.Schedule(warmup=pb.WarmupSchedule(warmup_steps=2, total_steps=9, decay=pb.WARMUP_DECAY_COSINE)),
         Warmup(warmup_steps=2, total_steps=9, decay="cosine", num_cycles=0.5)),
    ]
    return cases


ROUND_TRIPS = _round_trip_cases()


@pytest.mark.parametrize("message, spec", [c[1:] for c in ROUND_TRIPS], ids=[c[0] for c in ROUND_TRIPS])
def test_get_schedules_returns_what_was_set(served: Served, message: pb.Schedule, spec: Schedule) -> None:
    seen = record_rates(served)
    reply = set_schedules(served, assign("layer2.bias", message), at_step=0)
    description = "" if spec == Constant() else spec.describe()
    assert reply.changes[0].new_schedule == description
    served.step(3)
    reading = get_schedules(served, "layer2.bias")
    assert (reading.version, reading.step) == (1, 3)
    (row,) = reading.schedules
    assert (row.name, row.base, row.HasField("pin")) == ("layer2.bias", 1.0, False)
    assert schedule_from_pb(row.schedule) == spec
    assert row.schedule == schedule_to_pb(spec)
    assert row.description == description
    with LRClient(served.ctl.address, timeout=T) as client:
        (typed,) = client.get_schedules("layer2.bias")
    assert (typed.schedule, typed.pin, typed.description) == (spec, None, description)
    (record,) = history(served)
    (sent,) = record.schedules
    assert sent.selector == "layer2.bias" and schedule_from_pb(sent.schedule) == spec
    assert [rates["layer2.bias"] for rates in seen] == [spec.rate(1.0, s) for s in range(3)]
    (r,) = read_rates(served, "layer2.bias").rates
    assert (r.factor, r.lr, r.schedule) == (spec.factor(3), spec.rate(1.0, 3), description)


def test_get_schedules_of_every_name_in_model_order(served: Served) -> None:
    reading = get_schedules(served)
    assert [r.name for r in reading.schedules] == list(SEED_NAMES)
    assert [(r.base, r.HasField("pin"), r.schedule.WhichOneof("kind"), r.description) for r in reading.schedules] == [
        (lr, False, "constant", "") for lr in SEED_LRS.values()]
    err = rpc_error(lambda: get_schedules(served, "layer1.wieght"))
    assert_status(err, grpc.StatusCode.NOT_FOUND, "layer1.wieght")


def test_waiting_schedule_calls_apply_while_training(served: Served, training: Trainer) -> None:
    reply = set_schedules(served, assign("layer2.*", Exponential(gamma=0.99)), wait=True)
    assert reply.applied and reply.version == 1 and reply.step >= 1
    reply = clear_schedules(served, "layer2.weight", wait=True)
    assert reply.applied and reply.version == 2
    (c,) = reply.changes
    assert (c.name, c.new_lr, c.old_schedule, c.new_schedule) == ("layer2.weight", 0.001, "x0.99 per step", "")
    records = history(served)
    assert [r.version for r in records] == [1, 2] and records[1].step == reply.step
    assert [r.schedules[0].schedule.WhichOneof("kind") for r in records] == ["exponential", "constant"]


# -- bad input: the right status, the bad value named, nothing half-applied ------------------


def _ss(*assignments: pb.ScheduleAssignment, **options: Any) -> tuple[str, Any]:
    return "SetSchedules", pb.SetSchedulesRequest(schedules=list(assignments), **options)


def _cs(*selectors: str, **options: Any) -> tuple[str, Any]:
    return "ClearSchedules", pb.ClearSchedulesRequest(selectors=list(selectors), **options)


def _sl(*updates: pb.LearningRateUpdate, schedules: tuple = (), **options: Any) -> tuple[str, Any]:
    return "SetLearningRates", pb.SetLearningRatesRequest(updates=list(updates), schedules=list(schedules), **options)


GOOD = pb.Schedule(exponential=pb.ExponentialSchedule(gamma=0.5))
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND

BAD_REQUESTS: list[tuple[str, Callable[[], tuple[str, Any]], grpc.StatusCode, tuple[str, ...]]] = [
    ("warmup total_steps < warmup_steps",
     lambda: _ss(assign("layer1.*", pb.Schedule(warmup=pb.WarmupSchedule(
         warmup_steps=10, total_steps=5, decay=pb.WARMUP_DECAY_COSINE)))),
     INVALID, ("total_steps 5", "warmup_steps 10", "layer1.*")),
    ("exponential negative gamma",
     lambda: _ss(assign("layer1.*", pb.Schedule(exponential=pb.ExponentialSchedule(gamma=-0.5)))),
     INVALID, ("gamma -0.5",)),
    ("step negative gamma",
     lambda: _ss(assign("layer1.*", pb.Schedule(step=pb.StepSchedule(gamma=-2.0, step_size=3)))),
     INVALID, ("gamma -2.0",)),
    ("inverse_time negative gamma",
     lambda: _ss(assign("layer1.*", pb.Schedule(inverse_time=pb.InverseTimeSchedule(gamma=-1.0)))),
     INVALID, ("gamma -1.0",)),
    ("one_cycle pct_start 1.5",
     lambda: _ss(assign("layer1.*", pb.Schedule(one_cycle=pb.OneCycleSchedule(total_steps=100, pct_start=1.5)))),
     INVALID, ("pct_start 1.5",)),
    ("one_cycle unknown anneal",
     lambda: _ss(assign("layer1.*", pb.Schedule(one_cycle=pb.OneCycleSchedule(total_steps=100, anneal=5)))),
     INVALID, ("anneal 5",)),
    ("warmup unknown decay",
     lambda: _ss(assign("layer1.*", pb.Schedule(warmup=pb.WarmupSchedule(warmup_steps=3, decay=9)))),
     INVALID, ("decay 9",)),
    ("10001 piecewise points",
     lambda: _ss(assign("layer1.*", pb.Schedule(piecewise_linear=pb.PiecewiseLinearSchedule(
         points=[pb.SchedulePoint(step=i, factor=1.0) for i in range(10_001)])))),
     INVALID, ("10001",)),
    ("unsorted milestones",
     lambda: _ss(assign("layer1.*", pb.Schedule(step=pb.StepSchedule(gamma=0.5, milestones=[30, 10])))),
     INVALID, ("milestones [30, 10]",)),
    ("NaN factor in points",
     lambda: _ss(assign("layer1.*", pb.Schedule(piecewise_linear=pb.PiecewiseLinearSchedule(
         points=[pb.SchedulePoint(step=0, factor=1.0), pb.SchedulePoint(step=10, factor=math.nan)])))),
     INVALID, ("points[1]", "nan")),
    ("negative start_step",
     lambda: _ss(assign("layer1.*", pb.Schedule(start_step=-1, exponential=pb.ExponentialSchedule(gamma=0.5)))),
     INVALID, ("start_step -1",)),
    ("adopted schedule",
     lambda: _ss(assign("layer1.*", pb.Schedule(adopted=pb.AdoptedSchedule(scheduler="LambdaLR", group=0)))),
     INVALID, ("adopted",)),
    ("a good assignment then a bad one",
     lambda: _ss(assign("layer1.*", GOOD),
                 assign("layer2.*", pb.Schedule(exponential=pb.ExponentialSchedule(gamma=-0.5)))),
     INVALID, ("schedules[1]", "layer2.*", "gamma -0.5")),
    ("good updates with a bad schedule",
     lambda: _sl(base_set("layer1.weight", 0.5), pin("layer2.bias", 0.1),
                 schedules=(assign("layer1.*", pb.Schedule(one_cycle=pb.OneCycleSchedule(
                     total_steps=100, pct_start=1.5))),)),
     INVALID, ("pct_start 1.5",)),
    ("two schedules disagree on one name",
     lambda: _ss(assign("layer1.*", GOOD),
                 assign("layer1.weight", pb.Schedule(exponential=pb.ExponentialSchedule(gamma=0.6)))),
     INVALID, ("layer1.*", "layer1.weight", "x0.5 per step", "x0.6 per step")),
    ("empty SetSchedules", lambda: _ss(), INVALID, ("empty",)),
    ("empty ClearSchedules", lambda: _cs(), INVALID, ("empty",)),
    ("unknown selector in SetSchedules",
     lambda: _ss(assign("layer1.*", GOOD), assign("layer1.wieght", GOOD)),
     NOT_FOUND, ("layer1.wieght", "layer1.weight")),
    ("unknown selector in ClearSchedules", lambda: _cs("layer1.*", "encoder.*"), NOT_FOUND, ("encoder.*",)),
    ("unknown selector in a mixed batch",
     lambda: _sl(base_set("layer1.weight", 0.5), schedules=(assign("head.*", GOOD),)), NOT_FOUND, ("head.*",)),
    ("UNPIN with target BASE",
     lambda: _sl(unpin("layer1.weight", target=pb.UPDATE_TARGET_BASE)), INVALID, ("unpin", "layer1.weight")),
    ("UNPIN with target unspecified",
     lambda: _sl(unpin("layer1.weight", target=pb.UPDATE_TARGET_UNSPECIFIED)), INVALID, ("unpin", "layer1.weight")),
    ("unknown UpdateTarget 7",
     lambda: _sl(pb.LearningRateUpdate(selector="layer1.weight", mode=pb.UPDATE_MODE_ABSOLUTE, value=0.1, target=7)),
     INVALID, ("target 7", "layer1.weight")),
    ("unknown UpdateMode 9 on a pin",
     lambda: _sl(pb.LearningRateUpdate(selector="layer1.weight", mode=9, value=0.1, target=pb.UPDATE_TARGET_PIN)),
     INVALID, ("mode 9",)),
    ("pin NaN", lambda: _sl(pin("layer1.weight", math.nan)), INVALID, ("nan", "layer1.weight")),
    ("pin negative", lambda: _sl(pin("layer1.weight", -0.5)), INVALID, ("-0.5", "layer1.weight")),
    ("pin inf", lambda: _sl(pin("layer1.weight", math.inf)), INVALID, ("inf",)),
    ("two pins of one name disagree",
     lambda: _sl(pin("layer1.weight", 0.1), pin("layer1.*", 0.2)),
     INVALID, ("'layer1.weight'", "'layer1.*'", "0.1", "0.2")),
    ("scale of a pin by 0", lambda: _sl(pin_scale("layer1.*", 0.0)), INVALID, ("0.0", "layer1.*")),
    ("scale of a pin by -2", lambda: _sl(pin_scale("layer1.*", -2.0)), INVALID, ("-2.0",)),
    ("at_step in the past: SetSchedules", lambda: _ss(assign("layer1.*", GOOD), at_step=0), INVALID, ("at_step 0",)),
    ("at_step in the past: ClearSchedules", lambda: _cs("layer1.*", at_step=0), INVALID, ("at_step 0",)),
    ("at_step in the past: pins", lambda: _sl(pin("layer1.*", 0.3), at_step=0), INVALID, ("at_step 0",)),
    ("negative max_reported_changes", lambda: _cs("layer1.*", max_reported_changes=-1), INVALID,
     ("max_reported_changes -1",)),
    ("expected_version mismatch",
     lambda: _ss(assign("layer1.*", GOOD), expected_version=99), grpc.StatusCode.FAILED_PRECONDITION,
     ("expected_version 99",)),
]


@pytest.fixture
def baseline(served: Served, training: Trainer) -> Served:
    """A training worker with a schedule and a pin in force, for rejected requests to keep."""
    set_rates(served, pin("layer2.bias", 0.25), schedules=(assign("layer1.weight", WARMUP_COSINE),), wait=True)
    return served


@pytest.mark.parametrize("build, code, fragments", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_their_status_and_change_nothing(
    baseline: Served, training: Trainer, build: Callable[[], tuple[str, Any]], code: grpc.StatusCode,
    fragments: tuple[str, ...],
) -> None:
    served = baseline
    method, request = build()
    before = snapshot(served)
    err = rpc_error(lambda: getattr(served.stub, method)(request, timeout=T))
    assert_status(err, code, *fragments)
    training.wait_steps(3)  # training goes on, and nothing lands at a later step either
    assert snapshot(served) == before
    if hasattr(request, "dry_run"):  # a dry run judges it alike
        request.dry_run = True
        assert_status(rpc_error(lambda: getattr(served.stub, method)(request, timeout=T)), code, *fragments)


@pytest.mark.parametrize("how", ["rejected", "dry_run"])
def test_requests_that_change_nothing_do_not_use_up_the_schedule_book(served: Served, how: str) -> None:
    for k in range(20):  # 20 x 10,000 points: the whole 200,000-point budget
        big = pb.Schedule(piecewise_linear=pb.PiecewiseLinearSchedule(
            points=[pb.SchedulePoint(step=i, factor=1.0 + k / 1000) for i in range(10_000)]))
        if how == "rejected":
            err = rpc_error(lambda: set_schedules(served, assign("layer1.weight", big), assign("nothing.here", big)))
            assert err.code() == grpc.StatusCode.NOT_FOUND
        else:
            assert set_schedules(served, assign("layer1.weight", big), dry_run=True).change_id == 0
    assert snapshot(served)[2:] == (0, 0, [])  # nothing was ever applied or queued
    small = PiecewiseLinear(points=((0, 1.0), (10, 0.5)))
    reply = set_schedules(served, assign("layer1.weight", small))  # must be accepted
    assert reply.change_id > 0


# -- the CLI -----------------------------------------------------------------------------


def run_cli(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "lrctl.client.cli", "--address", address, *args]
    env = {k: v for k, v in os.environ.items() if k not in ("LRCTL_ADDRESS", "LRCTL_DEBUG")}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)


APPLIED = re.compile(r"applied at step (\d+) \(version (\d+)\)")


def test_cli_schedule_set_prints_each_name_and_the_step(served: Served, training: Trainer) -> None:
    out = ok(run_cli(served.ctl.address, "schedule", "set", "layer1.*", "warmup", "warmup_steps=5",
                     "decay=cosine", "total_steps=50", "--reason", "warm up"))
    lines = out.splitlines()
    assert len(lines) == 3
    for line, (name, base) in zip(lines, [("layer1.weight", 0.01), ("layer1.bias", 0.1)]):
        prefix = f"{name}: {base!r} -> "
        assert line.startswith(prefix), line
        assert line.endswith(f" (schedule constant -> {WARMUP_COSINE_TEXT})"), line
    match = APPLIED.fullmatch(lines[2])
    assert match, lines[2]
    step = int(match.group(1))
    assert lines[0] == f"layer1.weight: 0.01 -> {WARMUP_COSINE.rate(0.01, step)!r} (schedule constant -> {WARMUP_COSINE_TEXT})"
    (record,) = history(served)
    assert (record.step, record.version, record.reason) == (step, int(match.group(2)), "warm up")
    assert [(a.selector, schedule_from_pb(a.schedule)) for a in record.schedules] == [("layer1.*", WARMUP_COSINE)]
    rows = {r.name: r for r in get_schedules(served).schedules}
    assert schedule_from_pb(rows["layer1.bias"].schedule) == WARMUP_COSINE


CLI_USAGE_ERRORS = [
    (("schedule", "set", "x", "bogus"), ("bogus",)),
    (("schedule", "set", "layer1.weight", "warmup", "warmup_steps=5", "bogus_opt=3"), ("bogus_opt",)),
    (("schedule", "set", "layer1.weight", "exponential", "gamma"), ("'gamma'", "KEY=VALUE")),
    (("schedule", "set", "layer1.weight", "exponential", "=0.5"), ("=0.5",)),
    (("schedule", "set", "layer1.weight", "exponential", "gamma=abc"), ("abc",)),
    (("schedule", "set", "layer1.weight", "exponential", "gamma=-1"), ("gamma -1",)),
    (("schedule", "set", "layer1.weight", "warmup"), ("warmup_steps",)),
    (("schedule", "set", "layer1.weight", "step", "gamma=0.5", "milestones=30,10"), ("milestones",)),
    (("schedule", "set", "layer1.weight", "one_cycle", "total_steps=100", "pct_start=1.5"), ("pct_start 1.5",)),
    (("schedule", "set", "layer1.weight"), ("KIND",)),
    (("schedule", "bogus"), ("bogus",)),
    (("schedule",), ("ACTION",)),
    (("unpin",), ("unpin",)),
    (("set", "--pin", "layer1.weight"), ("layer1.weight",)),
]


@pytest.mark.parametrize("args, fragments", CLI_USAGE_ERRORS, ids=[" ".join(a) for a, _ in CLI_USAGE_ERRORS])
def test_cli_usage_errors_exit_2_with_one_line(served: Served, args: tuple[str, ...], fragments: tuple[str, ...]) -> None:
    assert_error(run_cli(served.ctl.address, *args), 2, *fragments)
    s = status(served)
    assert (s.version, s.pending_changes) == (0, 0)


CLI_REJECTED = [
    (("schedule", "set", "nothing*", "exponential", "gamma=0.5"), ("nothing*",)),
    (("schedule", "clear", "layer1.wieght"), ("layer1.wieght", "layer1.weight")),
    (("set", "--pin", "layer1.weight=nan"), ("nan",)),
    (("set", "--pin", "layer1.weight=-1"), ("-1",)),
    (("set", "--pin", "layer1.weight=0.1", "layer1.*=0.2"), ("layer1.weight", "layer1.*")),
    (("scale", "--pin", "layer1.*", "0"), ("0",)),
    (("unpin", "layer1.wieght"), ("layer1.wieght",)),
    (("schedule", "set", "layer1.*", "exponential", "gamma=0.5", "--at-step", "0"), ("at_step 0",)),
]


@pytest.mark.parametrize("args, fragments", CLI_REJECTED, ids=[" ".join(a) for a, _ in CLI_REJECTED])
def test_cli_rejected_requests_exit_4_and_change_nothing(
    served: Served, training: Trainer, args: tuple[str, ...], fragments: tuple[str, ...]
) -> None:
    training.wait_steps(1)  # at_step 0 is past
    before = snapshot(served)
    assert_error(run_cli(served.ctl.address, *args), 4, *fragments)
    assert snapshot(served) == before


def test_cli_schedule_show_json_round_trips_the_specs(served: Served) -> None:
    specs = {
        "layer1.weight": Warmup(warmup_steps=5, total_steps=50, decay="linear", start_factor=0.1, start_step=7),
        "layer1.bias": StepDecay(gamma=0.1, milestones=(30, 80)),
        "layer2.weight": PiecewiseLinear(points=((0, 0.0), (100, 1.0), (1000, 0.1))),
    }
    set_schedules(served, *(assign(n, s) for n, s in specs.items()), at_step=0)
    set_rates(served, pin("layer2.bias", 0.5), at_step=0)
    served.step()
    rows = json.loads(ok(run_cli(served.ctl.address, "schedule", "show", "--json")))
    assert [r["name"] for r in rows] == list(SEED_NAMES)
    for row in rows:
        spec = specs.get(row["name"], Constant())
        assert schedule_from_dict(row["schedule"]) == spec
        assert row["description"] == ("" if spec == Constant() else spec.describe())
        assert row["base"] == SEED_LRS[row["name"]]
        assert row["pin"] == (0.5 if row["name"] == "layer2.bias" else None)
    human = table(ok(run_cli(served.ctl.address, "schedule", "show", "layer2.*")))
    assert human == [["NAME", "BASE", "PIN", "SCHEDULE"],
                     ["layer2.weight", "0.001", "-", specs["layer2.weight"].describe()],
                     ["layer2.bias", "1.0", "0.5", "constant"]]
    # What `schedule set` parses is what `schedule show` gives back.
    ok(run_cli(served.ctl.address, "schedule", "set", "layer2.bias", "one_cycle", "total_steps=100",
               "anneal=linear", "three_phase=true", "--start-step", "3", "--no-wait"))
    served.step()
    (row,) = json.loads(ok(run_cli(served.ctl.address, "schedule", "show", "layer2.bias", "--json")))
    assert schedule_from_dict(row["schedule"]) == OneCycle(total_steps=100, anneal="linear", three_phase=True,
                                                           start_step=3)


def test_cli_pins_unpin_and_history(served: Served, training: Trainer) -> None:
    address = served.ctl.address
    ok(run_cli(address, "schedule", "set", "layer1.*", "warmup", "warmup_steps=5", "decay=cosine",
               "total_steps=50"))
    out = ok(run_cli(address, "set", "--pin", "layer2.weight=0.02")).splitlines()
    assert out[0] == "layer2.weight: 0.001 -> 0.02 (pinned at 0.02)" and APPLIED.fullmatch(out[1])
    out = ok(run_cli(address, "scale", "--pin", "layer2.bias", "0.5")).splitlines()
    assert out[0] == "layer2.bias: 1.0 -> 0.5 (pinned at 0.5)"
    out = ok(run_cli(address, "unpin", "layer2.weight")).splitlines()
    assert out[0] == "layer2.weight: 0.02 -> 0.001 (unpinned)"
    rows = {r.name: r for r in get_schedules(served).schedules}
    assert not rows["layer2.weight"].HasField("pin") and rows["layer2.bias"].pin == 0.5
    updates = [row[6] for row in table(ok(run_cli(address, "history")))[1:]]
    assert updates == [f"schedule layer1.*: {WARMUP_COSINE_TEXT}", "pin layer2.weight=0.02",
                       "pin layer2.bias x0.5", "unpin layer2.weight"]
    out = ok(run_cli(address, "schedule", "clear", "layer1.*")).splitlines()
    assert out[0].startswith("layer1.weight: ") and out[0].endswith(
        f"-> 0.01 (schedule {WARMUP_COSINE_TEXT} -> constant)")
    assert table(ok(run_cli(address, "history", "--limit", "1")))[1][6] == "schedule layer1.*: constant"


def test_cli_get_shows_base_factor_and_note(served: Served) -> None:
    address = served.ctl.address
    short = table(ok(run_cli(address, "get")))
    assert short[0] == ["NAME", "LR", "GROUP"]  # no schedule, no pin: the short table
    set_schedules(served, assign("layer1.*", WARMUP_COSINE), at_step=0)
    set_rates(served, pin("layer1.weight", 0.3), at_step=0)
    served.step(3)
    rows = table(ok(run_cli(address, "get")))
    assert rows[0] == ["NAME", "LR", "BASE", "FACTOR", "GROUP", "NOTE"]
    by_name = {row[0]: row for row in rows[1:]}
    factor = WARMUP_COSINE.factor(3)
    assert by_name["layer1.weight"][1:4] == ["0.3", "0.01", repr(factor)] and by_name["layer1.weight"][5] == "pinned"
    assert by_name["layer1.bias"][1:4] == [repr(WARMUP_COSINE.rate(0.1, 3)), "0.1", repr(factor)]
    assert by_name["layer1.bias"][5] == WARMUP_COSINE_TEXT
    assert by_name["layer2.weight"][1:4] == ["0.001", "0.001", "1.0"] and len(by_name["layer2.weight"]) == 5
    got = json.loads(ok(run_cli(address, "get", "--json")))
    assert [r["name"] for r in got] == list(SEED_NAMES)
    assert {(r["step"], r["version"]) for r in got} == {(3, 2)}
    for r in got:
        if r["name"].startswith("layer1."):
            assert (r["base"], r["factor"], r["schedule"]) == (SEED_LRS[r["name"]], factor, WARMUP_COSINE_TEXT)
        else:
            assert (r["base"], r["factor"], r["schedule"], r["pinned"]) == (SEED_LRS[r["name"]], 1.0, "", False)
    assert [(r["lr"], r["pinned"]) for r in got[:2]] == [(0.3, True), (WARMUP_COSINE.rate(0.1, 3), False)]


def test_cli_history_json_carries_schedule_specs_that_read_back(served: Served) -> None:
    set_schedules(served, assign("layer1.*", Exponential(gamma=0.9)), assign("layer2.*", InverseTime(gamma=0.9)),
                  at_step=0)
    served.step()
    (record,) = json.loads(ok(run_cli(served.ctl.address, "history", "--json")))
    assert [(a["selector"], schedule_from_dict(a["schedule"])) for a in record["schedules"]] == [
        ("layer1.*", Exponential(gamma=0.9)), ("layer2.*", InverseTime(gamma=0.9))]


ESCAPE_SELECTOR = "re:^layer1\\.bias$|\x1b\\[2J\x1b]0;pwned\x07"


@pytest.mark.parametrize("where", ["schedule selector", "pin selector", "reason"])
def test_cli_history_does_not_print_terminal_escapes(served: Served, where: str) -> None:
    if where == "schedule selector":
        set_schedules(served, assign(ESCAPE_SELECTOR, Exponential(gamma=0.9)), at_step=0)
    elif where == "pin selector":
        set_rates(served, pin(ESCAPE_SELECTOR, 0.3), at_step=0)
    else:
        set_rates(served, base_set("layer1.bias", 0.3), at_step=0, reason="ok\x1b[2J\x1b]0;pwned\x07")
    served.step()
    assert len(history(served)) == 1  # the crafted row is in the history
    out = ok(run_cli(served.ctl.address, "history"))
    assert "\x1b" not in out and "\x07" not in out, repr(out)
    assert "pwned" in out  # shown, escaped, not dropped


def test_get_schedules_pages_fit_a_default_client_and_stay_at_one_version() -> None:
    """5,000 names of ~1,000 characters (5 MB in one reply): pages of a paged reading
    end at 3 MiB, so a channel with gRPC's default 4 MiB limit reads them all; a change
    between two pages answers ABORTED; LRClient pages and restarts by itself."""
    params = [(f"block{i:05d}." + "w" * 990, torch.nn.Parameter(torch.zeros(1))) for i in range(5000)]
    optimizer = torch.optim.SGD([p for _, p in params], lr=0.1)
    ctl = attach(params, optimizer, address="127.0.0.1:0")
    try:
        with grpc.insecure_channel(ctl.address) as channel:  # gRPC's default receive limit
            stub = pb_grpc.LearningRateControlStub(channel)
            names, token, pages = [], "", 0
            while True:
                reply = stub.GetSchedules(pb.GetSchedulesRequest(page_size=5000, page_token=token), timeout=60)
                assert reply.total_size == 5000 and reply.ByteSize() <= 4 * 1024 * 1024
                names += [s.name for s in reply.schedules]
                pages += 1
                token = reply.next_page_token
                if not token:
                    break
            assert names == [n for n, _ in params] and pages >= 2
            first = stub.GetSchedules(pb.GetSchedulesRequest(page_size=10), timeout=T)
            ctl.controller.submit(ChangeRequest(updates=(Update(params[0][0], 0.5),)))
            optimizer.step()
            with pytest.raises(grpc.RpcError) as info:
                stub.GetSchedules(pb.GetSchedulesRequest(page_size=10, page_token=first.next_page_token), timeout=T)
            assert info.value.code() == grpc.StatusCode.ABORTED
            assert "read again from the first page" in info.value.details()
        with LRClient(ctl.address, timeout=60) as client:
            paged = client.get_schedules(page_size=700)
            assert [s.name for s in paged] == [n for n, _ in params] and paged[0].base == 0.5
    finally:
        ctl.close()
