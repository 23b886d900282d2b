"""attach(..., scheduler=...) end to end: an adopted torch LR scheduler, through lrctl's
real step hook, gives the very rates torch would have given, before and after remote
changes that split and merge param groups.

Every run records the rates each optimizer step actually used with a step pre-hook
registered after attach (so it runs after lrctl's hook), mapping every parameter name to
its group's "lr". A reference run of the same model, optimizer and scheduler without
lrctl gives the expected values.

The model has three param groups (one per Linear layer, two names each):
"0.*" (lr 0.1), "2.*" (lr 0.05) and "4.*" (lr 0.02).
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as lrs

from lrctl.server import attach
from lrctl.server.requests import ChangeRequest, Mode, Target, Update

torch.set_num_threads(1)

N = 100
X = torch.linspace(-1.0, 1.0, 16 * 4).reshape(16, 4)
Y = torch.sin(torch.linspace(0.0, 3.0, 16 * 2)).reshape(16, 2)
GROUP_LRS = (0.1, 0.05, 0.02)
LAYERS = (0, 2, 4)
PATIENCE_S = 60.0  # bound for "eventually" waits, never asserted as a duration


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    return [{"params": list(model[i].parameters()), "lr": lr} for i, lr in zip(LAYERS, GROUP_LRS)]


def group_index(name: str) -> int:
    return LAYERS.index(int(name.split(".")[0]))


def loss_of(model: nn.Module) -> torch.Tensor:
    return (model(X) - Y).square().mean()


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    loss_of(model).backward()
    opt.step()


def sgd(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=0.1, momentum=0.9)


def adam(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=0.01)


def hf(name: str, **kwargs: Any) -> Callable[[torch.optim.Optimizer], Any]:
    def make(opt: torch.optim.Optimizer) -> Any:
        transformers = pytest.importorskip("transformers")
        return getattr(transformers, name)(opt, **kwargs)

    return make


def scheduler_base_lrs(sched: Any) -> list[float]:
    """The scheduler's own base rates (SequentialLR: its first child's)."""
    nodes = [sched]
    while nodes:
        node = nodes.pop(0)
        if getattr(node, "base_lrs", None) is not None:
            return [float(b) for b in node.base_lrs]
        nodes.extend(getattr(node, "_schedulers", ()))
    raise AssertionError(f"{sched!r} has no base_lrs")


@dataclass(frozen=True)
class Case:
    opt: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
    sched: Callable[[torch.optim.Optimizer], Any]
    momentum: bool = False  # the scheduler cycles SGD's momentum


CASES = {
    "LambdaLR": Case(sgd, lambda o: lrs.LambdaLR(o, lambda s: 0.97**s)),
    "hf-linear-warmup": Case(sgd, hf("get_linear_schedule_with_warmup", num_warmup_steps=10, num_training_steps=90)),
    "hf-cosine-warmup": Case(adam, hf("get_cosine_schedule_with_warmup", num_warmup_steps=10, num_training_steps=N)),
    "LinearLR": Case(sgd, lambda o: lrs.LinearLR(o, start_factor=0.1, total_iters=20)),
    "CosineAnnealingLR": Case(sgd, lambda o: lrs.CosineAnnealingLR(o, T_max=60, eta_min=0.001)),
    "StepLR": Case(sgd, lambda o: lrs.StepLR(o, step_size=15, gamma=0.5)),
    "MultiStepLR": Case(sgd, lambda o: lrs.MultiStepLR(o, milestones=[20, 45, 75], gamma=0.3)),
    "ExponentialLR": Case(sgd, lambda o: lrs.ExponentialLR(o, gamma=0.97)),
    "OneCycleLR": Case(
        sgd, lambda o: lrs.OneCycleLR(o, max_lr=[0.5, 0.2, 0.1], total_steps=N, cycle_momentum=True), momentum=True
    ),
    "SequentialLR": Case(
        sgd,
        lambda o: lrs.SequentialLR(
            o, [lrs.LinearLR(o, start_factor=0.1, total_iters=10), lrs.CosineAnnealingLR(o, T_max=N - 10)], milestones=[10]
        ),
    ),
}
CASE_PARAMS = [pytest.param(case, id=name) for name, case in CASES.items()]


class Recorder:
    """A step pre-hook recording, per optimizer step, name -> lr (and momentum) in use.

    Registered after attach, so it runs after lrctl's hook. With use_param_names it
    reads the groups' "param_names" (and checks they match the group's tensors);
    without, it maps tensors to names itself (the reference run has no param_names).
    """

    def __init__(self, opt: torch.optim.Optimizer, model: nn.Module, use_param_names: bool) -> None:
        self.names_by_id = {id(p): n for n, p in model.named_parameters()}
        self.use_param_names = use_param_names
        self.rates: list[dict[str, float]] = []
        self.momenta: list[dict[str, Any]] = []
        self.num_groups: list[int] = []
        self.errors: list[str] = []
        self.handle = opt.register_step_pre_hook(self)

    def __call__(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        rates: dict[str, float] = {}
        momenta: dict[str, Any] = {}
        for group in opt.param_groups:
            by_id = [self.names_by_id[id(p)] for p in group["params"]]
            if self.use_param_names:
                names = list(group["param_names"])
                if names != by_id:
                    self.errors.append(f"step {len(self.rates)}: param_names {names} != params {by_id}")
            else:
                names = by_id
            for name in names:
                rates[name] = group["lr"]
                momenta[name] = group.get("momentum")
        self.rates.append(rates)
        self.momenta.append(momenta)
        self.num_groups.append(len(opt.param_groups))


def reference_run(case: Case, steps: int = N) -> tuple[nn.Module, Recorder, list[float]]:
    model = make_model()
    opt = case.opt(param_groups(model))
    sched = case.sched(opt)
    rec = Recorder(opt, model, use_param_names=False)
    for _ in range(steps):
        train_step(model, opt)
        sched.step()
    return model, rec, scheduler_base_lrs(sched)


# -- remote changes (test 2 and 3) ----------------------------------------------------
SPLIT_AT, MERGE_AT, PIN_AT, UNPIN_AT, SCALE_AT = 30, 50, 60, 70, 80
SPLIT_NAME, PIN_NAME, PIN = "0.weight", "2.weight", 1e-4


def changes(base_lrs: list[float]) -> dict[int, ChangeRequest]:
    """at_step -> the change due then."""
    return {
        SPLIT_AT: ChangeRequest(updates=(Update(SPLIT_NAME, 2 * base_lrs[0]),), at_step=SPLIT_AT),
        MERGE_AT: ChangeRequest(updates=(Update(SPLIT_NAME, base_lrs[0]),), at_step=MERGE_AT),
        PIN_AT: ChangeRequest(updates=(Update(PIN_NAME, PIN, Mode.ABSOLUTE, Target.PIN),), at_step=PIN_AT),
        UNPIN_AT: ChangeRequest(updates=(Update(PIN_NAME, 0.0, Mode.UNPIN, Target.PIN),), at_step=UNPIN_AT),
        SCALE_AT: ChangeRequest(updates=(Update("4.*", 0.5, Mode.SCALE, Target.BASE),), at_step=SCALE_AT),
    }


def expected_base(name: str, step: int, base_lrs: list[float]) -> float:
    g = group_index(name)
    if name == SPLIT_NAME and SPLIT_AT <= step < MERGE_AT:
        return 2 * base_lrs[0]
    if g == 2 and step >= SCALE_AT:
        return 0.5 * base_lrs[2]
    return base_lrs[g]


def is_pinned(name: str, step: int) -> bool:
    return name == PIN_NAME and PIN_AT <= step < UNPIN_AT


def expected_groups(step: int) -> int:
    split = SPLIT_AT <= step < MERGE_AT or PIN_AT <= step < UNPIN_AT
    return 4 if split else 3


def attached_run(
    case: Case,
    *,
    remote: bool,
    read_at: tuple[int, ...] = (),
    steps: int = N,
) -> dict[str, Any]:
    model = make_model()
    opt = case.opt(param_groups(model))
    sched = case.sched(opt)
    base_lrs = scheduler_base_lrs(sched)
    ctl = attach(model, opt, scheduler=sched, serve=False)
    try:
        rec = Recorder(opt, model, use_param_names=True)
        due = changes(base_lrs) if remote else {}
        pendings = {}
        reads = {}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no order warning, no deprecation, no zip error
            for s in range(steps):
                assert ctl.step == s
                if s + 2 in due:
                    pendings[s + 2], _ = ctl.controller.submit(due[s + 2])
                if s in read_at:
                    reads[s] = ctl.controller.read([])
                train_step(model, opt)
                sched.step()
        return dict(model=model, opt=opt, sched=sched, ctl=ctl, rec=rec, pendings=pendings,
                    reads=reads, base_lrs=base_lrs)
    finally:
        ctl.close()


# -- 1. no remote change: bit for bit ----------------------------------------------------
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_adopted_scheduler_matches_reference_bit_for_bit(case: Case) -> None:
    ref_model, ref, _ = reference_run(case)
    run = attached_run(case, remote=False)
    rec = run["rec"]

    assert not rec.errors
    assert len(rec.rates) == len(ref.rates) == N
    for s in range(N):
        assert rec.rates[s] == ref.rates[s], s  # dict ==: exact floats, every name
        if case.momentum:
            assert rec.momenta[s] == ref.momenta[s], s
    assert rec.num_groups == [3] * N
    # Not vacuous: the schedule moves every group's rate.
    for name in ("0.weight", "2.weight", "4.weight"):
        assert len({r[name] for r in ref.rates}) > 2
    if case.momentum:
        assert len({m["0.weight"] for m in ref.momenta}) > 5
    for (n, p), (rn, rp) in zip(run["model"].named_parameters(), ref_model.named_parameters()):
        assert n == rn and torch.equal(p, rp), n


# -- 2. remote changes that split and merge groups ---------------------------------------
def _replay(case: Case, rec: Recorder, steps: int = N) -> nn.Module:
    """Train a fresh copy with one param group per parameter, installing by hand the
    rates (and momenta) the attached run recorded: the same weights come out iff those
    were the rates used and regrouping kept the optimizer state."""
    model = make_model()
    names = [n for n, _ in model.named_parameters()]
    groups = [{"params": [p], "lr": 0.0} for p in model.parameters()]
    opt = case.opt(groups)
    for s in range(steps):
        for name, group in zip(names, opt.param_groups):
            group["lr"] = rec.rates[s][name]
            if case.momentum:
                group["momentum"] = rec.momenta[s][name]
        train_step(model, opt)
    return model


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_remote_split_pin_merge_scale_follow_the_scheduler(case: Case) -> None:
    _, ref, base_lrs = reference_run(case)
    run = attached_run(case, remote=True)
    rec = run["rec"]

    assert not rec.errors
    for at, pending in run["pendings"].items():
        assert pending.finished.is_set() and pending.error is None, (at, pending.error)
        assert pending.outcome.applied and pending.outcome.step == at
    assert run["ctl"].controller.version == 5
    assert rec.num_groups == [expected_groups(s) for s in range(N)]

    for s in range(N):
        assert rec.rates[s].keys() == ref.rates[s].keys()
        for name, lr in rec.rates[s].items():
            g = group_index(name)
            if is_pinned(name, s):
                assert lr == PIN, (s, name)
                continue
            base = expected_base(name, s, base_lrs)
            if base == base_lrs[g]:
                assert lr == ref.rates[s][name], (s, name)  # exactly the scheduler's rate
            else:
                want = ref.rates[s][name] * base / base_lrs[g]
                assert math.isclose(lr, want, rel_tol=1e-12, abs_tol=0.0), (s, name, lr, want)
    # The split name really trained at another rate (the check above is not vacuous).
    assert rec.rates[SPLIT_AT][SPLIT_NAME] != rec.rates[SPLIT_AT]["0.bias"]

    replayed = _replay(case, rec)
    for (n, p), (_, q) in zip(run["model"].named_parameters(), replayed.named_parameters()):
        assert torch.equal(p, q), n


def test_pinned_name_keeps_following_cycled_momentum() -> None:
    case = CASES["OneCycleLR"]
    _, ref, _ = reference_run(case)
    rec = attached_run(case, remote=True)["rec"]
    mismatches = [
        (s, name, rec.momenta[s][name], ref.momenta[s][name])
        for s in range(N)
        for name in rec.momenta[s]
        if rec.momenta[s][name] != ref.momenta[s][name]
    ]
    assert not mismatches, mismatches[:5]


def test_unpinned_names_follow_cycled_momentum_through_regroups() -> None:
    """Every name that is not pinned keeps the momentum OneCycleLR gives its group,
    also in the steps where lrctl rebuilt the groups (split, merge)."""
    case = CASES["OneCycleLR"]
    _, ref, _ = reference_run(case)
    rec = attached_run(case, remote=True)["rec"]
    for s in range(N):
        for name, momentum in rec.momenta[s].items():
            if not is_pinned(name, s):
                assert momentum == ref.momenta[s][name], (s, name)


# -- 3. the controller's reads --------------------------------------------------------------
READ_AT = (SPLIT_AT + 5, PIN_AT + 5, SCALE_AT + 5, N - 1)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_reads_report_the_rates_of_the_next_step(case: Case) -> None:
    _, ref, base_lrs = reference_run(case)
    run = attached_run(case, remote=True, read_at=READ_AT)
    rec, reads = run["rec"], run["reads"]
    versions = {SPLIT_AT + 5: 1, PIN_AT + 5: 3, SCALE_AT + 5: 5, N - 1: 5}

    assert sorted(reads) == list(READ_AT)
    for s, (rows, version, step) in reads.items():
        assert step == s and version == versions[s]
        assert [r.name for r in rows] == list(rec.rates[s])  # every held name, model order
        for row in rows:
            g = group_index(row.name)
            assert row.lr == rec.rates[s][row.name], (s, row)  # what step s then used
            assert row.pinned == is_pinned(row.name, s), (s, row)
            assert row.base == expected_base(row.name, s, base_lrs), (s, row)
            assert row.factor == ref.rates[s][row.name] / base_lrs[g], (s, row)
            if row.pinned:
                assert row.lr == PIN
            else:
                assert math.isclose(row.lr, row.base * row.factor, rel_tol=1e-12, abs_tol=0.0), (s, row)
            assert row.schedule.startswith("adopted "), row


# -- 4. wrappers ---------------------------------------------------------------------------
def test_torch_compile_lists_own_names_and_selectors_work() -> None:
    model = make_model()
    compiled = torch.compile(model, backend="eager")
    assert all(n.startswith("_orig_mod.") for n, _ in compiled.named_parameters())
    opt = sgd(param_groups(model))
    sched = lrs.StepLR(opt, step_size=3, gamma=0.5)
    own = tuple(n for n, _ in model.named_parameters())

    with attach(compiled, opt, scheduler=sched, serve=False) as ctl:
        controller = ctl.controller
        assert controller.names == own
        rec = Recorder(opt, model, use_param_names=True)
        pending, _ = controller.submit(ChangeRequest(updates=(Update("re:^2\\.", 0.2),), at_step=2))
        for _ in range(8):
            opt.zero_grad()
            (compiled(X) - Y).square().mean().backward()
            opt.step()
            sched.step()
        assert pending.error is None and pending.outcome.step == 2
        rows, _, _ = controller.read(["2.*"])
        assert [r.name for r in rows] == ["2.weight", "2.bias"] and {r.base for r in rows} == {0.2}

    assert not rec.errors
    for s, rates in enumerate(rec.rates):
        factor = 0.5 ** (s // 3)
        for name, lr in rates.items():
            g = group_index(name)
            if g == 1 and s >= 2:
                assert math.isclose(lr, 0.2 * factor, rel_tol=1e-12), (s, name)
            else:
                assert lr == GROUP_LRS[g] * factor, (s, name)


@pytest.fixture
def accelerator():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        yield accelerate.Accelerator(cpu=True)
    finally:
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
        GradientState._reset_state()


def _accelerated_loop(accelerator: Any, model: nn.Module, opt: Any, sched: Any, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        accelerator.backward(loss_of(model))
        opt.step()
        sched.step()


def test_accelerate_wrappers(accelerator: Any) -> None:
    steps = 40

    def build() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        model = make_model()
        opt = sgd(param_groups(model))
        return model, opt, lrs.MultiStepLR(opt, milestones=[10, 25], gamma=0.3)

    ref_model, ref_opt, ref_sched = build()
    ref = Recorder(ref_opt, ref_model, use_param_names=False)
    for s in range(steps + 5):
        if s == steps:
            ref_weights = [p.detach().clone() for p in ref_model.parameters()]
        train_step(ref_model, ref_opt)
        ref_sched.step()

    model, opt, sched = build()
    pmodel, popt, psched = accelerator.prepare(model, opt, sched)
    assert type(popt).__name__ == "AcceleratedOptimizer" and popt.optimizer is opt
    assert type(psched).__name__ == "AcceleratedScheduler" and psched.scheduler is sched

    # The AcceleratedScheduler itself is refused (it is no LRScheduler), naming the way
    # out, before anything is touched.
    before = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    with pytest.raises(TypeError, match=r"AcceleratedScheduler.*pass its \.scheduler"):
        attach(pmodel, popt, scheduler=psched, serve=False)
    assert sched.optimizer is opt
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == before
    assert not opt._optimizer_step_pre_hooks

    with attach(pmodel, popt, scheduler=psched.scheduler, serve=False) as ctl:
        assert ctl.controller.optimizer is opt
        assert ctl.controller.names == tuple(n for n, _ in model.named_parameters())
        rec = Recorder(opt, model, use_param_names=True)  # the inner optimizer: the wrapper has no hooks of its own
        _accelerated_loop(accelerator, pmodel, popt, psched, steps)
        # Without changes: the same rates and weights as plain torch.
        assert rec.rates == ref.rates[:steps]
        for (n, p), q in zip(model.named_parameters(), ref_weights):
            assert torch.equal(p, q), n
        # A split through the wrapper: the AcceleratedOptimizer sees the new groups.
        pending, _ = ctl.controller.submit(ChangeRequest(updates=(Update("4.bias", 0.5),)))
        _accelerated_loop(accelerator, pmodel, popt, psched, 5)
        assert pending.error is None and pending.outcome.step == steps
        assert len(popt.param_groups) == 4
        assert sched.last_epoch == steps + 5
    for s in range(steps, steps + 5):
        assert math.isclose(rec.rates[s]["4.bias"], ref.rates[s]["4.bias"] * 0.5 / 0.02, rel_tol=1e-12)
        for name in ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight"):
            assert rec.rates[s][name] == ref.rates[s][name], (s, name)
    assert not rec.errors


def _refused_untouched(make_sched: Callable[[torch.optim.Optimizer, torch.optim.Optimizer], Any],
                       error: type[Exception], match: str) -> None:
    model = make_model()
    opt = sgd(param_groups(model))
    other = sgd(param_groups(make_model(1)))
    sched = make_sched(opt, other)
    tree = [sched, *getattr(sched, "_schedulers", ())]
    owners = [node.optimizer for node in tree]
    before = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    before_params = [list(g["params"]) for g in opt.param_groups]
    with pytest.raises(error, match=match):
        attach(model, opt, scheduler=sched, serve=False)
    assert all(node.optimizer is owner for node, owner in zip(tree, owners))
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == before
    assert [list(g["params"]) for g in opt.param_groups] == before_params
    assert not opt._optimizer_step_pre_hooks  # no lrctl hook left behind
    # Still attachable (nothing half-adopted) once given a fitting scheduler.
    with attach(model, opt, scheduler=lrs.StepLR(opt, step_size=2), serve=False):
        pass


def test_scheduler_of_another_optimizer_is_refused_untouched() -> None:
    _refused_untouched(lambda opt, other: lrs.StepLR(other, step_size=3), ValueError,
                       "steps a different optimizer")


def test_reduce_lr_on_plateau_of_another_optimizer_is_refused_untouched() -> None:
    _refused_untouched(lambda opt, other: lrs.ReduceLROnPlateau(other), ValueError,
                       "ReduceLROnPlateau steps a different optimizer")


def test_sequential_lr_with_a_foreign_child_is_refused_untouched() -> None:
    def make(opt: torch.optim.Optimizer, other: torch.optim.Optimizer) -> Any:
        seq = lrs.SequentialLR(opt, [lrs.ConstantLR(opt, factor=0.5, total_iters=2),
                                     lrs.ExponentialLR(opt, gamma=0.9)], milestones=[2])
        seq._schedulers[1].optimizer = other  # a child of another optimizer
        return seq

    _refused_untouched(make, ValueError, "different optimizer")


# -- 5. GradScaler --------------------------------------------------------------------------
INF_AT = (7, 8, 20)
SCALER_STEPS = 40


def _scaled_run(attached: bool, pin_at: int | None = None) -> tuple[nn.Module, Recorder, Any, Any]:
    model = make_model()
    opt = sgd(param_groups(model))
    sched = lrs.LambdaLR(opt, lambda s: 0.95**s)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ctl = attach(model, opt, scheduler=sched, serve=False) if attached else None
    rec = Recorder(opt, model, use_param_names=attached)
    if pin_at is not None:
        ctl.controller.submit(ChangeRequest(updates=(Update("4.bias", 1e-3, Mode.ABSOLUTE, Target.PIN),), at_step=pin_at))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for s in range(SCALER_STEPS):
                opt.zero_grad()
                scaler.scale(loss_of(model)).backward()
                if s in INF_AT:
                    model[2].weight.grad[0, 0] = math.inf
                scaler.step(opt)
                scaler.update()
                sched.step()
    finally:
        if ctl is not None:
            ctl.close()
    return model, rec, sched, ctl


def test_grad_scaler_skipped_steps() -> None:
    """A step the GradScaler skips (inf gradients) never calls optimizer.step(), so
    lrctl's hook does not run and `LRControl.step` does not count it, while the user's
    `scheduler.step()` still runs and advances the adopted schedule.

    Hence LRControl.step == number of optimizer.step() calls actually made ==
    scheduler.step() calls - skipped steps (here 40 - 3 = 37), whereas the scheduler's
    `last_epoch` counts every scheduler.step() (40). The rates follow the scheduler's
    count: lrctl step k uses the rate torch gives at the scheduler's epoch of that
    iteration (k plus the steps skipped so far), exactly as without lrctl. `at_step`
    values refer to lrctl's count.
    """
    if not hasattr(torch, "amp") or not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler is not available")
    ref_model, ref, ref_sched, _ = _scaled_run(attached=False)
    model, rec, sched, ctl = _scaled_run(attached=True)

    executed = SCALER_STEPS - len(INF_AT)
    assert len(ref.rates) == len(rec.rates) == executed  # the skipped steps ran no hook
    assert ctl.step == executed
    assert sched.last_epoch == ref_sched.last_epoch == SCALER_STEPS
    assert rec.rates == ref.rates
    epochs = [s for s in range(SCALER_STEPS) if s not in INF_AT]
    for k, s in enumerate(epochs):
        assert rec.rates[k]["0.weight"] == 0.1 * 0.95**s, (k, s)
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert torch.equal(p, q), n
    assert not rec.errors

    # at_step counts lrctl's steps: a pin due at step 25 is first used by the 26th
    # optimizer.step() that ran, in loop iteration 28 (three were skipped before it).
    _, pinned, pinned_sched, pinned_ctl = _scaled_run(attached=True, pin_at=25)
    assert pinned_ctl.step == executed and pinned_sched.last_epoch == SCALER_STEPS
    assert [r["4.bias"] == 1e-3 for r in pinned.rates] == [k >= 25 for k in range(executed)]
    for k in range(executed):
        assert {n: r for n, r in pinned.rates[k].items() if n != "4.bias"} == {
            n: r for n, r in ref.rates[k].items() if n != "4.bias"
        }, k


# -- 6. a remote change through the real gRPC server while training ------------------------
def _lam(s: int) -> float:
    return 1.0 / (1.0 + 0.01 * s)


def test_cli_and_client_change_while_a_thread_trains() -> None:
    from lrctl.client.client import LRClient

    model = make_model()
    opt = sgd(param_groups(model))
    sched = lrs.LambdaLR(opt, _lam)
    ctl = attach(model, opt, scheduler=sched, address="127.0.0.1:0")
    rec = Recorder(opt, model, use_param_names=True)
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            while not stop.is_set():
                train_step(model, opt)
                sched.step()
                stop.wait(0.001)
        except BaseException as exc:
            errors.append(exc)

    def wait_steps(n: int) -> None:
        deadline = time.monotonic() + PATIENCE_S
        while len(rec.rates) < n:
            assert not errors and thread.is_alive(), errors
            assert time.monotonic() < deadline, f"training did not reach {n} steps"
            time.sleep(0.005)

    thread = threading.Thread(target=loop, name="test-adopted-trainer", daemon=True)
    thread.start()
    try:
        wait_steps(5)
        proc = subprocess.run(
            [sys.executable, "-m", "lrctl.client.cli", "--address", ctl.address, "set", "2.weight=0.3"],
            capture_output=True, text=True, timeout=PATIENCE_S,
        )
        assert proc.returncode == 0, proc.stderr
        found = re.search(r"applied at step (\d+)", proc.stdout)
        assert found, proc.stdout
        split_at = int(found.group(1))
        with LRClient(ctl.address, timeout=PATIENCE_S) as client:
            result = client.set_learning_rates({"2.weight": 0.05})  # back to the group's base: merge
            merge_at = result.step
            assert result.applied and merge_at > split_at
            wait_steps(merge_at + 10)
            assert client.get_learning_rates("2.weight")["2.weight"] > 0
    finally:
        stop.set()
        thread.join(PATIENCE_S)
        ctl.close()
    assert not errors, errors
    assert not rec.errors

    assert split_at >= 5
    for s, rates in enumerate(rec.rates):
        for name, lr in rates.items():
            base = GROUP_LRS[group_index(name)]
            if name == "2.weight" and split_at <= s < merge_at:
                assert math.isclose(lr, 0.3 * _lam(s), rel_tol=1e-12), (s, name, lr)
            else:
                assert lr == base * _lam(s), (s, name, lr)  # LambdaLR's own arithmetic
        assert rec.num_groups[s] == (4 if split_at <= s < merge_at else 3), s
