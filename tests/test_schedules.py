"""lrctl.common.schedules: exact agreement with transformers and torch, the seed table,
validation, the JSON and CLI forms, and importing without torch or grpc.

"Exact" means `==` on floats: a schedule adopted from transformers or torch must give
the optimizer the very same rates, not close ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import warnings

import pytest

from lrctl.common.errors import InvalidArgumentError
from lrctl.common.schedules import (
    KINDS,
    Constant,
    Exponential,
    InverseTime,
    OneCycle,
    PiecewiseLinear,
    Schedule,
    StepDecay,
    Warmup,
    parse_schedule,
    schedule_from_dict,
)

# One sample of every kind (several for some), used by the generic tests below.
SAMPLES: list[Schedule] = [
    Constant(),
    Warmup(warmup_steps=10),
    Warmup(warmup_steps=10, total_steps=50, decay="linear", start_factor=0.1, final_factor=0.05),
    Warmup(warmup_steps=0, total_steps=30, decay="cosine", num_cycles=1.5, start_step=3),
    StepDecay(gamma=0.5, step_size=7),
    StepDecay(gamma=0.1, milestones=(30, 80)),
    Exponential(gamma=0.97),
    InverseTime(),
    InverseTime(gamma=0.25, start_step=4),
    OneCycle(total_steps=100),
    OneCycle(total_steps=37, pct_start=0.25, div_factor=10, final_div_factor=100, anneal="linear", three_phase=True),
    PiecewiseLinear(points=((0, 0.0), (100, 1.0), (1000, 0.1))),
]


def sample_id(schedule: Schedule) -> str:
    return schedule.describe()


def sgd(base: float, **kwargs):
    torch = pytest.importorskip("torch")
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=base, **kwargs)


def driven_rates(optimizer, scheduler, steps: int) -> list[float]:
    """The lr the optimizer holds at steps 0..steps-1, driving the scheduler as a training loop does."""
    rates = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # steps without gradients are fine here
        for _ in range(steps):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
    return rates


# -- transformers ------------------------------------------------------------------

BASES = (0.1, 3e-4, 1.0)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("warmup", [0, 1, 10, 37])
def test_constant_with_warmup_matches_transformers(base: float, warmup: int) -> None:
    tf = pytest.importorskip("transformers")
    opt = sgd(base)
    total = 60
    want = driven_rates(opt, tf.get_constant_schedule_with_warmup(opt, warmup), total + 21)
    schedule = Warmup(warmup_steps=warmup)
    assert [schedule.rate(base, i) for i in range(total + 21)] == want


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize(("warmup", "total"), [(10, 50), (0, 30), (7, 8), (100, 1000)])
def test_linear_with_warmup_matches_transformers(base: float, warmup: int, total: int) -> None:
    tf = pytest.importorskip("transformers")
    opt = sgd(base)
    want = driven_rates(opt, tf.get_linear_schedule_with_warmup(opt, warmup, total), total + 21)
    schedule = Warmup(warmup_steps=warmup, total_steps=total, decay="linear")
    assert [schedule.rate(base, i) for i in range(total + 21)] == want


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize(("warmup", "total", "cycles"), [(10, 50, 0.5), (0, 30, 0.5), (7, 8, 0.5), (20, 300, 1.5)])
def test_cosine_with_warmup_matches_transformers(base: float, warmup: int, total: int, cycles: float) -> None:
    tf = pytest.importorskip("transformers")
    opt = sgd(base)
    want = driven_rates(opt, tf.get_cosine_schedule_with_warmup(opt, warmup, total, num_cycles=cycles), total + 21)
    schedule = Warmup(warmup_steps=warmup, total_steps=total, decay="cosine", num_cycles=cycles)
    got = [schedule.rate(base, i) for i in range(total + 21)]
    assert got[: total + 1] == want[: total + 1]
    # Past total_steps transformers' cosine rises again; lrctl holds the end value.
    assert got[total + 1 :] == [got[total]] * 20


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize(("warmup", "total", "min_rate"), [(10, 50, 0.1), (0, 40, 0.05), (5, 200, 0.3333)])
def test_cosine_with_min_lr_matches_transformers(base: float, warmup: int, total: int, min_rate: float) -> None:
    tf = pytest.importorskip("transformers")
    opt = sgd(base)
    hf = tf.get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=min_rate)
    want = driven_rates(opt, hf, total + 21)
    schedule = Warmup(warmup_steps=warmup, total_steps=total, decay="cosine", final_factor=min_rate)
    got = [schedule.rate(base, i) for i in range(total + 21)]
    assert got[: total + 1] == want[: total + 1]
    assert got[total] == base * min_rate
    assert got[total + 1 :] == [got[total]] * 20


def test_warmup_start_factor_and_linear_floor() -> None:
    schedule = Warmup(warmup_steps=4, total_steps=8, decay="linear", start_factor=0.2, final_factor=0.1)
    factors = [schedule.factor(i) for i in range(12)]
    assert factors[0] == 0.2
    assert factors[2] == 0.2 + 0.8 * 0.5
    assert factors[4] == 1.0
    assert factors[8:] == [0.1] * 4


# -- torch -------------------------------------------------------------------------

ONE_CYCLE_CONFIGS = [
    dict(total_steps=100),
    dict(total_steps=100, anneal="linear"),
    dict(total_steps=100, three_phase=True),
    dict(total_steps=100, anneal="linear", three_phase=True),
    dict(total_steps=37, pct_start=0.25, div_factor=10.0, final_div_factor=100.0),
    dict(total_steps=37, pct_start=0.4, div_factor=3.0, final_div_factor=7.0, anneal="linear", three_phase=True),
    dict(total_steps=10, pct_start=0.05),  # the warm-up phase ends before step 0
    dict(total_steps=2, pct_start=0.25, anneal="linear"),
    dict(total_steps=3, pct_start=0.5, three_phase=True),
    dict(total_steps=1000, pct_start=0.123, three_phase=True),
]


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("config", ONE_CYCLE_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_one_cycle_matches_torch(base: float, config: dict) -> None:
    torch = pytest.importorskip("torch")
    opt = sgd(base, momentum=0.9)
    total = config["total_steps"]
    torch_args = dict(config)
    torch_args["anneal_strategy"] = torch_args.pop("anneal", "cos")
    want = driven_rates(opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=base, **torch_args), total)
    schedule = OneCycle(**config)
    got = [schedule.rate(base, i) for i in range(total + 21)]
    assert got[:total] == want
    # torch refuses to go past its last step; lrctl holds the last value.
    assert got[total:] == [want[-1]] * 21
    assert [schedule.factor(i) for i in range(total)] == [schedule.rate(1.0, i) for i in range(total)]


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize(("gamma", "step_size"), [(0.1, 30), (0.5, 1), (0.9, 7)])
def test_step_size_matches_torch_closed_form(base: float, gamma: float, step_size: int) -> None:
    torch = pytest.importorskip("torch")
    sched = torch.optim.lr_scheduler.StepLR(sgd(base), step_size=step_size, gamma=gamma)
    schedule = StepDecay(gamma=gamma, step_size=step_size)
    for i in range(120):
        sched.last_epoch = i
        assert schedule.rate(base, i) == sched._get_closed_form_lr()[0] == base * gamma ** (i // step_size)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize(("gamma", "milestones"), [(0.1, (30, 80)), (0.5, (0, 1, 2, 50)), (0.3, (7,))])
def test_milestones_match_torch_closed_form(base: float, gamma: float, milestones: tuple[int, ...]) -> None:
    torch = pytest.importorskip("torch")
    sched = torch.optim.lr_scheduler.MultiStepLR(sgd(base), milestones=list(milestones), gamma=gamma)
    schedule = StepDecay(gamma=gamma, milestones=milestones)
    for i in range(milestones[-1] + 21):
        sched.last_epoch = i
        assert schedule.rate(base, i) == sched._get_closed_form_lr()[0]


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("gamma", [0.9, 0.999, 1.01])
def test_exponential_matches_torch(base: float, gamma: float) -> None:
    torch = pytest.importorskip("torch")
    opt = sgd(base)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
    schedule = Exponential(gamma=gamma)
    for i in range(200):
        sched.last_epoch = i
        assert schedule.rate(base, i) == sched._get_closed_form_lr()[0] == base * gamma**i
    # The recursive form (lr * gamma each step) rounds differently: close, not equal.
    stepped = driven_rates(opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma), 50)
    assert stepped == pytest.approx([schedule.rate(base, i) for i in range(50)], rel=1e-12)


# -- the seed example ----------------------------------------------------------------

SEED_TABLE = {
    2: ("0.0033333333333333335", "0.03333333333333333", "0.0003333333333333333", "0.3333333333333333"),
    5: ("0.0016666666666666668", "0.016666666666666666", "0.00016666666666666666", "0.16666666666666666"),
    6: ("0.0014285714285714286", "0.014285714285714287", "0.00014285714285714287", "0.14285714285714285"),
    8: ("0.0011111111111111111", "0.011111111111111112", "0.00011111111111111112", "0.1111111111111111"),
}
SEED_BASES = (0.01, 0.1, 0.001, 1.0)


def test_inverse_time_reproduces_the_seed_table() -> None:
    schedule = InverseTime(gamma=1.0)
    for i in range(10):
        got = [schedule.rate(base, i) for base in SEED_BASES]
        assert got == [base / (i + 1) for base in SEED_BASES]
        if i in SEED_TABLE:
            assert tuple(repr(r) for r in got) == SEED_TABLE[i]
    assert InverseTime().factor(3) == 0.25
    assert InverseTime(gamma=0.0).rate(0.5, 10**9) == 0.5


# -- shapes ------------------------------------------------------------------------


def test_piecewise_linear_interpolates_and_holds_the_ends() -> None:
    schedule = PiecewiseLinear(points=((10, 0.0), (20, 1.0), (40, 0.5)))
    assert [schedule.factor(i) for i in (0, 5, 10)] == [0.0, 0.0, 0.0]
    assert schedule.factor(15) == 0.5
    assert schedule.factor(19) == 0.9
    assert schedule.factor(20) == 1.0
    assert schedule.factor(30) == 0.75
    assert schedule.factor(40) == 0.5
    assert schedule.factor(10**9) == 0.5
    assert schedule.rate(0.2, 30) == 0.2 * 0.75
    single = PiecewiseLinear(points=((5, 0.3),))
    assert {single.factor(i) for i in range(20)} == {0.3}


def test_piecewise_linear_is_monotone_between_points() -> None:
    schedule = PiecewiseLinear(points=((0, 1.0), (7, 0.3), (1000, 0.0)))
    factors = [schedule.factor(i) for i in range(1001)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))
    assert factors[0] == 1.0 and factors[7] == 0.3 and factors[1000] == 0.0


@pytest.mark.parametrize("schedule", SAMPLES, ids=sample_id)
def test_start_step_delays_the_schedule(schedule: Schedule) -> None:
    origin = dataclasses.replace(schedule, start_step=0)
    shifted = dataclasses.replace(schedule, start_step=25)
    for step in range(25):
        assert shifted.rate(0.1, step) == origin.rate(0.1, 0)
        assert shifted.factor(step) == origin.factor(0)
    for k in range(150):
        assert shifted.rate(0.1, 25 + k) == origin.rate(0.1, k)
        assert shifted.factor(25 + k) == origin.factor(k)


def test_constant_is_the_only_constant() -> None:
    assert Constant().is_constant
    assert Constant().rate(0.3, 12345) == 0.3 and Constant().factor(7) == 1.0
    assert [s.is_constant for s in SAMPLES if not isinstance(s, Constant)] == [False] * (len(SAMPLES) - 1)


def test_describe() -> None:
    schedule = Warmup(warmup_steps=100, total_steps=1000, decay="cosine", final_factor=0.1)
    assert schedule.describe() == "warmup 100 steps (from 0.0) then cosine to 0.1 at step 1000"
    assert Warmup(warmup_steps=5).describe() == "warmup 5 steps (from 0.0) then constant"
    assert StepDecay(gamma=0.1, milestones=(30, 80)).describe() == "x0.1 at steps 30, 80"
    assert "from step 7" in Exponential(gamma=0.9, start_step=7).describe()
    for s in SAMPLES:
        text = s.describe()
        assert text and "\n" not in text and len(text) < 200
    many = PiecewiseLinear(points=tuple((i, 1.0) for i in range(100)))
    assert len(many.describe()) < 200


def test_schedule_base_is_abstract() -> None:
    with pytest.raises(TypeError):
        Schedule()
    assert set(KINDS) == {
        "constant", "warmup", "step", "exponential", "inverse_time", "one_cycle", "piecewise_linear"
    }
    assert all(cls.kind == kind for kind, cls in KINDS.items())


# -- JSON form, hashing ------------------------------------------------------------


@pytest.mark.parametrize("schedule", SAMPLES, ids=sample_id)
def test_dict_round_trip(schedule: Schedule) -> None:
    d = schedule.to_dict()
    assert d["kind"] == schedule.kind
    assert json.loads(json.dumps(d)) == d  # plain JSON, nothing lost
    back = schedule_from_dict(json.loads(json.dumps(d)))
    assert back == schedule and hash(back) == hash(schedule)
    assert back.to_dict() == d
    assert type(schedule).from_dict(d) == schedule == Schedule.from_dict(d)
    assert [back.rate(0.1, i) for i in range(60)] == [schedule.rate(0.1, i) for i in range(60)]


def test_points_and_milestones_are_lists_in_json() -> None:
    d = PiecewiseLinear(points=((0, 0.0), (100, 1.0))).to_dict()
    assert d == {"kind": "piecewise_linear", "start_step": 0, "points": [[0, 0.0], [100, 1.0]]}
    assert StepDecay(gamma=0.1, milestones=(3, 9)).to_dict()["milestones"] == [3, 9]


def test_from_dict_errors_name_the_bad_thing() -> None:
    with pytest.raises(InvalidArgumentError, match="'cyclic'.*known kinds: constant, warmup"):
        schedule_from_dict({"kind": "cyclic"})
    with pytest.raises(InvalidArgumentError, match="no 'kind'"):
        schedule_from_dict({"gamma": 0.5})
    with pytest.raises(InvalidArgumentError, match="exponential: unknown option 'gama'.*gamma"):
        schedule_from_dict({"kind": "exponential", "gama": 0.5})
    with pytest.raises(InvalidArgumentError, match="exponential: missing required option gamma"):
        schedule_from_dict({"kind": "exponential"})
    with pytest.raises(InvalidArgumentError, match="mapping"):
        schedule_from_dict(["exponential"])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="expected a warmup schedule"):
        Warmup.from_dict({"kind": "constant"})


def test_equal_specs_hash_equal() -> None:
    a = Exponential(gamma=1)
    b = Exponential(gamma=1.0)
    assert a == b and hash(a) == hash(b)
    assert type(a.gamma) is float and a.to_dict() == b.to_dict()
    assert StepDecay(gamma=0.5, milestones=[3, 9]) == StepDecay(gamma=0.5, milestones=(3, 9))
    assert hash(StepDecay(gamma=0.5, milestones=[3, 9])) == hash(StepDecay(gamma=0.5, milestones=(3, 9)))
    listed = PiecewiseLinear(points=[[0, 0], [10, 1]])
    assert listed == PiecewiseLinear(points=((0, 0.0), (10, 1.0)))
    assert listed.points == ((0, 0.0), (10, 1.0)) and type(listed.points[1][1]) is float
    assert InverseTime(gamma=-0.0).to_dict() == InverseTime(gamma=0.0).to_dict()
    interned = {Exponential(gamma=0.5), Exponential(gamma=0.5), Exponential(gamma=0.25), InverseTime(gamma=0.5)}
    assert len(interned) == 3
    assert Constant() != Constant(start_step=1)
    assert all(s == dataclasses.replace(s) and hash(s) == hash(dataclasses.replace(s)) for s in SAMPLES)


def test_schedules_are_frozen() -> None:
    schedule = Exponential(gamma=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.gamma = 0.1  # type: ignore[misc]
    with pytest.raises(TypeError):
        Exponential(0.5)  # type: ignore[misc]  # keyword-only


# -- CLI text ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "options", "expected"),
    [
        ("constant", {}, Constant()),
        (
            "warmup",
            {"warmup_steps": "100", "total_steps": "1000", "decay": "cosine"},
            Warmup(warmup_steps=100, total_steps=1000, decay="cosine"),
        ),
        (
            "warmup",
            {"warmup_steps": "10", "total_steps": "20", "decay": "linear", "start_factor": "0.1",
             "final_factor": "1e-2", "start_step": "5"},
            Warmup(warmup_steps=10, total_steps=20, decay="linear", start_factor=0.1, final_factor=0.01, start_step=5),
        ),
        ("step", {"gamma": "0.1", "milestones": "30,80"}, StepDecay(gamma=0.1, milestones=(30, 80))),
        ("step", {"gamma": "0.5", "step_size": "7"}, StepDecay(gamma=0.5, step_size=7)),
        ("exponential", {"gamma": "0.99"}, Exponential(gamma=0.99)),
        ("inverse_time", {}, InverseTime()),
        ("inverse_time", {"gamma": "2"}, InverseTime(gamma=2.0)),
        (
            "one_cycle",
            {"total_steps": "100", "pct_start": "0.25", "anneal": "linear", "three_phase": "true",
             "div_factor": "10", "final_div_factor": "1e3"},
            OneCycle(total_steps=100, pct_start=0.25, anneal="linear", three_phase=True, div_factor=10.0,
                     final_div_factor=1000.0),
        ),
        ("one_cycle", {"total_steps": "50", "three_phase": "no"}, OneCycle(total_steps=50)),
        (
            "piecewise_linear",
            {"points": "0:0.0,100:1.0,1000:0.1"},
            PiecewiseLinear(points=((0, 0.0), (100, 1.0), (1000, 0.1))),
        ),
        ("piecewise_linear", {"points": " 0 : 1 , 5:0.5 "}, PiecewiseLinear(points=((0, 1.0), (5, 0.5)))),
        (" exponential ", {"gamma": 0.5}, Exponential(gamma=0.5)),  # non-text values pass through
    ],
)
def test_parse_schedule(kind: str, options: dict, expected: Schedule) -> None:
    got = parse_schedule(kind, options)
    assert got == expected and hash(got) == hash(expected)


@pytest.mark.parametrize(
    ("kind", "options", "fragments"),
    [
        ("cosine", {}, ["'cosine'", "known kinds", "constant", "warmup", "piecewise_linear"]),
        ("warmup", {"warmup": "10"}, ["warmup: unknown option 'warmup'", "warmup_steps", "total_steps", "start_step"]),
        ("warmup", {}, ["warmup: missing required option warmup_steps"]),
        ("warmup", {"warmup_steps": "ten"}, ["warmup: warmup_steps 'ten' is not an integer"]),
        ("warmup", {"warmup_steps": "1.5"}, ["warmup_steps '1.5'"]),
        ("warmup", {"warmup_steps": "10", "start_factor": "x"}, ["start_factor 'x' is not a number"]),
        ("warmup", {"warmup_steps": "10", "decay": "cosin", "total_steps": "20"}, ["decay 'cosin'", "cosine"]),
        ("warmup", {"warmup_steps": "100", "total_steps": "50", "decay": "linear"},
         ["warmup: total_steps 50 is less than warmup_steps 100"]),
        ("one_cycle", {"total_steps": "10", "three_phase": "maybe"}, ["three_phase 'maybe' is not true or false"]),
        ("step", {"gamma": "0.1", "milestones": "30,eighty"}, ["milestones '30,eighty'", "list of integers"]),
        ("step", {"gamma": "0.1", "milestones": "30,,80"}, ["milestones '30,,80'"]),
        ("piecewise_linear", {"points": "0:0.0,100"}, ["points '0:0.0,100'", "step:factor"]),
        ("piecewise_linear", {"points": "0:a"}, ["points '0:a'"]),
        ("piecewise_linear", {"points": ""}, ["points is empty"]),
        ("exponential", {"gamma": "nan"}, ["exponential: gamma nan is not a finite number"]),
        ("exponential", {"gamma": "-1"}, ["exponential: gamma -1.0 is not positive"]),
    ],
)
def test_parse_schedule_errors(kind: str, options: dict, fragments: list[str]) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        parse_schedule(kind, options)
    for fragment in fragments:
        assert fragment in str(info.value)


# -- validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kwargs", "fragments"),
    [
        (Constant, {"start_step": -1}, ["constant", "start_step -1 is negative"]),
        (Constant, {"start_step": True}, ["constant", "start_step must be an integer", "True"]),
        (Constant, {"start_step": 2**62 + 1}, ["start_step", str(2**62 + 1), "2**62"]),
        (Constant, {"start_step": 1.0}, ["start_step must be an integer, got 1.0"]),
        (Warmup, {"warmup_steps": -5}, ["warmup: warmup_steps -5 is negative"]),
        (Warmup, {"warmup_steps": "10"}, ["warmup: warmup_steps must be an integer, got '10'"]),
        (Warmup, {"warmup_steps": 10, "decay": "exp"}, ["warmup: decay 'exp'", "constant, linear, cosine"]),
        (Warmup, {"warmup_steps": 100, "total_steps": 50, "decay": "cosine"},
         ["warmup: total_steps 50 is less than warmup_steps 100"]),
        (Warmup, {"warmup_steps": 100, "total_steps": 100, "decay": "linear"},
         ["warmup: total_steps 100 equals warmup_steps 100"]),
        (Warmup, {"warmup_steps": 10, "total_steps": 100},
         ["warmup: total_steps 100 has no effect with decay constant"]),
        (Warmup, {"warmup_steps": 10, "final_factor": 0.1}, ["final_factor 0.1 has no effect"]),
        (Warmup, {"warmup_steps": 1, "total_steps": 9, "decay": "linear", "num_cycles": 2.0},
         ["num_cycles 2.0 has no effect with decay linear"]),
        (Warmup, {"warmup_steps": 10, "start_factor": -0.1}, ["warmup: start_factor -0.1 is negative"]),
        (Warmup, {"warmup_steps": 10, "start_factor": math.inf}, ["warmup: start_factor inf is not a finite number"]),
        (Warmup, {"warmup_steps": 10, "start_factor": False}, ["start_factor must be a number, got False"]),
        (Warmup, {"warmup_steps": 1, "total_steps": 9, "decay": "cosine", "final_factor": math.nan},
         ["final_factor nan is not a finite number"]),
        (Warmup, {"warmup_steps": 1, "total_steps": 9, "decay": "cosine", "num_cycles": -1.0},
         ["num_cycles -1.0 is negative"]),
        (Warmup, {"warmup_steps": 1, "total_steps": 9, "decay": "cosine", "num_cycles": 1e308},
         ["num_cycles 1e+308 is too large"]),
        (Warmup, {"warmup_steps": 1, "start_factor": 10**400}, ["start_factor", "not a finite number"]),
        (StepDecay, {"gamma": 0.0, "step_size": 3}, ["step: gamma 0.0 is not positive"]),
        (StepDecay, {"gamma": 0.5}, ["step: give exactly one of step_size > 0 or milestones"]),
        (StepDecay, {"gamma": 0.5, "step_size": 3, "milestones": (5,)}, ["exactly one", "step_size 3", "[5]"]),
        (StepDecay, {"gamma": 0.5, "milestones": (5, 5)}, ["step: milestones [5, 5] are not strictly increasing"]),
        (StepDecay, {"gamma": 0.5, "milestones": (5, -1)}, ["step: milestones[1] -1 is negative"]),
        (StepDecay, {"gamma": 0.5, "milestones": 5}, ["milestones must be a sequence of integers, got 5"]),
        (StepDecay, {"gamma": 0.5, "milestones": tuple(range(10_001))}, ["milestones has 10001 entries"]),
        (Exponential, {"gamma": -0.5}, ["exponential: gamma -0.5 is not positive"]),
        (Exponential, {"gamma": "0.5"}, ["exponential: gamma must be a number, got '0.5'"]),
        (InverseTime, {"gamma": -1.0}, ["inverse_time: gamma -1.0 is negative"]),
        (OneCycle, {"total_steps": 1}, ["one_cycle: total_steps 1 is less than 2"]),
        (OneCycle, {"total_steps": 10, "pct_start": 1.0}, ["one_cycle: pct_start 1.0 is not between 0 and 1"]),
        (OneCycle, {"total_steps": 10, "pct_start": 0}, ["one_cycle: pct_start 0.0 is not between 0 and 1"]),
        (OneCycle, {"total_steps": 10, "div_factor": 0}, ["one_cycle: div_factor 0.0 is not positive"]),
        (OneCycle, {"total_steps": 10, "final_div_factor": -1}, ["one_cycle: final_div_factor -1.0 is not positive"]),
        (OneCycle, {"total_steps": 10, "anneal": "cosine"}, ["one_cycle: anneal 'cosine'", "cos, linear"]),
        (OneCycle, {"total_steps": 10, "three_phase": 1}, ["one_cycle: three_phase must be true or false, got 1"]),
        (OneCycle, {"total_steps": 10, "pct_start": 0.1}, ["one_cycle: pct_start 0.1 x total_steps 10"]),
        (PiecewiseLinear, {"points": ()}, ["piecewise_linear: points is empty"]),
        (PiecewiseLinear, {"points": ((0, 1.0), (0, 2.0))}, ["points[1] step 0 is not after the previous step 0"]),
        (PiecewiseLinear, {"points": ((5, 1.0), (2, 2.0))}, ["points[1] step 2 is not after the previous step 5"]),
        (PiecewiseLinear, {"points": ((0, -1.0),)}, ["piecewise_linear: points[0] factor -1.0 is negative"]),
        (PiecewiseLinear, {"points": ((0, math.inf),)}, ["points[0] factor inf is not a finite number"]),
        (PiecewiseLinear, {"points": ((-1, 1.0),)}, ["points[0] step -1 is negative"]),
        (PiecewiseLinear, {"points": ((0, 1.0, 2.0),)}, ["points[0] must be a [step, factor] pair"]),
        (PiecewiseLinear, {"points": tuple((i, 1.0) for i in range(10_001))}, ["10001 points, more than 10000"]),
    ],
)
def test_validation_names_kind_field_and_value(cls: type[Schedule], kwargs: dict, fragments: list[str]) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        cls(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_limits_are_accepted() -> None:
    assert len(PiecewiseLinear(points=tuple((i, 1.0) for i in range(10_000))).points) == 10_000
    assert Constant(start_step=2**62).rate(0.5, 0) == 0.5
    assert Warmup(warmup_steps=10, start_factor=2.0).factor(0) == 2.0  # >= 0 is enough


# -- never raise ---------------------------------------------------------------------

HUGE_STEPS = (0, 1, 10**6, 2**53 + 1, 2**62, 2**62 + 12345, 10**30, 10**400)


@pytest.mark.parametrize("schedule", SAMPLES, ids=sample_id)
def test_huge_steps_never_raise(schedule: Schedule) -> None:
    for step in HUGE_STEPS:
        factor = schedule.factor(step)
        assert isinstance(factor, float) and not math.isnan(factor)
        rate = schedule.rate(0.1, step)
        assert isinstance(rate, float) and not math.isnan(rate)


def test_overflow_gives_inf() -> None:
    growing = [Exponential(gamma=1.5), StepDecay(gamma=10.0, step_size=1), StepDecay(gamma=2.0, milestones=(1,))]
    for schedule in growing[:2]:
        assert schedule.factor(100_000) == math.inf
        assert schedule.rate(0.1, 100_000) == math.inf
        assert schedule.factor(10**400) == math.inf
        assert schedule.rate(0.0, 100_000) == 0.0  # not nan
    assert growing[2].factor(10**400) == 2.0
    assert Exponential(gamma=0.5).factor(10**400) == 0.0
    assert InverseTime(gamma=1e300).rate(1.0, 10**10) == 0.0
    assert PiecewiseLinear(points=((0, 0.0), (2**62, 1e308))).factor(2**61) == 5e307


# -- imports -------------------------------------------------------------------------

BLOCKED_IMPORT = r"""
import sys

class Block:
    '''Fails every import of torch and grpc, as if they were not installed.'''
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "grpc"):
            raise ImportError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, Block())
for name in list(sys.modules):
    assert name.partition(".")[0] not in ("torch", "grpc"), name

import lrctl.common.errors
import lrctl.common.schedules as schedules

s = schedules.parse_schedule("warmup", {"warmup_steps": "2", "total_steps": "4", "decay": "linear"})
assert s.rate(1.0, 1) == 0.5, s
assert schedules.schedule_from_dict(s.to_dict()) == s
try:
    import torch
except ImportError:
    pass
else:
    raise AssertionError("the blocker let torch through")
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "grpc"))
assert not loaded, loaded
print("ok")
"""


def test_imports_without_torch_or_grpc() -> None:
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORT], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
