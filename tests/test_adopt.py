"""Adopted torch LR schedulers reproduce, bit for bit, what they would have written.

Each case builds the same two-group model twice: one optimizer+scheduler untouched (the
reference), one adopted. Both loops call `opt.step(); sched.step()`. The adopted side
reads its rates in a real step pre-hook, where lrctl's hook reads them, and the hook
only records: so the real groups must keep the values they had at adoption.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as lrs

from lrctl.server.adopt import AdoptedScheduler, GroupSchedule, unwrap_optimizer

torch.set_num_threads(1)

X = torch.linspace(-1.0, 1.0, 8 * 4).reshape(8, 4)

OptFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
SchedFactory = Callable[[torch.optim.Optimizer], Any]


def sgd(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=0.1, momentum=0.9)


def adam(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=0.01)


def build(opt_factory: OptFactory, sched_factory: SchedFactory, seed: int = 0):
    """A fixed two-layer model with one param group per layer, its optimizer and scheduler."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    groups = [
        {"params": list(model[0].parameters()), "lr": 0.1},
        {"params": list(model[1].parameters()), "lr": 0.03},
    ]
    opt = opt_factory(groups)
    return model, opt, sched_factory(opt)


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(X).square().mean().backward()
    opt.step()


def plain(value: Any) -> Any:
    """A comparable copy of a group value (tensors become floats or tuples of floats)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else tuple(value.tolist())
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    return value


def snapshot(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: plain(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]


def driven_key(opt: torch.optim.Optimizer, sched: Any) -> str | None:
    if not getattr(sched, "cycle_momentum", False):
        return None
    return "betas" if "betas" in opt.param_groups[0] else "momentum"


def reference_run(opt_factory: OptFactory, sched_factory: SchedFactory, steps: int):
    """Per step and group: the lr torch put in the real group, and the driven key's value."""
    model, opt, sched = build(opt_factory, sched_factory)
    key = driven_key(opt, sched)
    rates, driven = [], []
    for _ in range(steps):
        rates.append([g["lr"] for g in opt.param_groups])
        driven.append([{key: g[key]} if key else {} for g in opt.param_groups])
        train_step(model, opt)
        sched.step()
    return rates, driven


def adopted_run(adopted: AdoptedScheduler, model: nn.Module, opt: torch.optim.Optimizer, steps: int):
    """Run `steps` steps with lrctl's pre-hook stand-in; warnings are errors throughout."""
    rates: list[list[float]] = []
    driven: list[list[dict[str, Any]]] = []

    def pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        adopted.mark_stepped()
        rates.append([grp.rate(grp.base_lr, len(rates)) for grp in adopted.groups])
        driven.append([grp.driven() for grp in adopted.groups])

    handle = opt.register_step_pre_hook(pre_hook)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(steps):
                train_step(model, opt)
                adopted.scheduler.step()
    finally:
        handle.remove()
    return rates, driven


def hf(name: str, **kwargs: Any) -> SchedFactory:
    def make(opt: torch.optim.Optimizer) -> Any:
        transformers = pytest.importorskip("transformers")
        return getattr(transformers, name)(opt, **kwargs)

    return make


N = 80

CASES = [
    pytest.param(sgd, lambda o: lrs.LambdaLR(o, [lambda s: 0.97**s, lambda s: 1.0 / (1 + s)]), N, id="LambdaLR"),
    pytest.param(sgd, hf("get_linear_schedule_with_warmup", num_warmup_steps=10, num_training_steps=70), N, id="hf-linear-warmup"),
    pytest.param(adam, hf("get_cosine_schedule_with_warmup", num_warmup_steps=10, num_training_steps=70), N, id="hf-cosine-warmup"),
    pytest.param(sgd, lambda o: lrs.LinearLR(o, start_factor=0.1, total_iters=20), N, id="LinearLR"),
    pytest.param(sgd, lambda o: lrs.CosineAnnealingLR(o, T_max=30, eta_min=0.001), N, id="CosineAnnealingLR"),
    pytest.param(sgd, lambda o: lrs.StepLR(o, step_size=7, gamma=0.5), N, id="StepLR"),
    pytest.param(sgd, lambda o: lrs.MultiStepLR(o, milestones=[10, 25, 40], gamma=0.3), N, id="MultiStepLR"),
    pytest.param(sgd, lambda o: lrs.ExponentialLR(o, gamma=0.95), N, id="ExponentialLR"),
    pytest.param(sgd, lambda o: lrs.OneCycleLR(o, max_lr=[0.5, 0.2], total_steps=N), N, id="OneCycleLR-sgd-momentum"),
    pytest.param(adam, lambda o: lrs.OneCycleLR(o, max_lr=0.05, total_steps=N, three_phase=True, anneal_strategy="linear"), N, id="OneCycleLR-adam-betas"),
    pytest.param(
        sgd,
        lambda o: lrs.SequentialLR(
            o, [lrs.LinearLR(o, start_factor=0.1, total_iters=10), lrs.CosineAnnealingLR(o, T_max=50)], milestones=[10]
        ),
        N,
        id="SequentialLR",
    ),
    pytest.param(
        sgd,
        lambda o: lrs.ChainedScheduler([lrs.ConstantLR(o, factor=0.5, total_iters=5), lrs.ExponentialLR(o, gamma=0.97)], o),
        N,
        id="ChainedScheduler",
    ),
    pytest.param(sgd, lambda o: lrs.CyclicLR(o, base_lr=0.01, max_lr=[0.1, 0.05], step_size_up=10), N, id="CyclicLR-sgd-momentum"),
    pytest.param(
        adam,
        lambda o: lrs.CyclicLR(o, base_lr=0.001, max_lr=0.01, step_size_up=7, mode="triangular2", base_momentum=0.8, max_momentum=0.95),
        N,
        id="CyclicLR-adam-betas",
    ),
    pytest.param(sgd, lambda o: lrs.ConstantLR(o, factor=0.3, total_iters=15), N, id="ConstantLR"),
    pytest.param(sgd, lambda o: lrs.PolynomialLR(o, total_iters=40, power=2.0), N, id="PolynomialLR"),
    pytest.param(sgd, lambda o: lrs.MultiplicativeLR(o, lambda s: 0.98), N, id="MultiplicativeLR"),
    pytest.param(sgd, lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=10, T_mult=2, eta_min=0.001), N, id="CosineAnnealingWarmRestarts"),
]


@pytest.mark.parametrize("opt_factory, sched_factory, steps", CASES)
def test_adopted_matches_reference_bit_for_bit(opt_factory, sched_factory, steps):
    ref_rates, ref_driven = reference_run(opt_factory, sched_factory, steps)

    model, opt, sched = build(opt_factory, sched_factory)
    adopted = AdoptedScheduler(sched, opt)
    at_adoption = snapshot(opt)
    rates, driven = adopted_run(adopted, model, opt, steps)

    assert adopted.scheduler is sched
    assert len(adopted.groups) == len(opt.param_groups) == 2
    for step in range(steps):
        for g in range(2):
            assert rates[step][g] == ref_rates[step][g], (step, g)
            assert driven[step][g] == ref_driven[step][g], (step, g)
    # Schedules that actually move: the comparison above is not vacuous.
    assert len({r[0] for r in rates}) > 1
    # The scheduler wrote only the shadow.
    assert snapshot(opt) == at_adoption


def test_driven_keys_and_schedule_surface():
    _, opt, sched = build(adam, lambda o: lrs.OneCycleLR(o, max_lr=[0.05, 0.02], total_steps=20))
    adopted = AdoptedScheduler(sched, opt)
    group = adopted.groups[1]
    assert isinstance(group, GroupSchedule)
    assert group.kind == "adopted" and group.is_constant is False
    assert set(group.driven()) == {"betas"}
    assert group.base_lr == 0.02 / 25.0  # OneCycleLR's initial_lr: max_lr / div_factor
    assert group.describe() == "adopted torch OneCycleLR, group 1 (last_epoch 0)"

    _, opt, sched = build(sgd, lambda o: lrs.StepLR(o, step_size=1, gamma=0.5))
    adopted = AdoptedScheduler(sched, opt)
    adopted.mark_stepped()
    sched.step()
    sched.step()
    group = adopted.groups[0]
    assert group.driven() == {}
    assert group.describe() == "adopted torch StepLR, group 0 (last_epoch 2)"
    assert group.current_lr() == 0.1 * 0.5 * 0.5
    assert group.factor(123) == group.current_lr() / 0.1
    # A name re-based away from the scheduler's base keeps the scheduler's factor.
    assert group.rate(0.4, 0) == pytest.approx(0.1)
    assert group.rate(0.1, 999) == group.current_lr()


def test_zero_base_lr():
    def zero_first(groups):
        groups[0]["lr"] = 0.0
        return sgd(groups)

    _, opt, sched = build(zero_first, lambda o: lrs.ExponentialLR(o, gamma=0.5))
    adopted = AdoptedScheduler(sched, opt)
    adopted.mark_stepped()
    sched.step()
    group = adopted.groups[0]
    assert group.base_lr == 0.0
    assert group.factor(1) == 1.0
    assert group.rate(0.0, 1) == 0.0
    assert group.rate(0.25, 1) == 0.25  # no factor to scale by: the base stays unscheduled


def test_torch_still_warns_when_the_loop_is_out_of_order():
    # Fidelity goes both ways: stepping the scheduler before any optimizer step is
    # reported exactly as torch reports it without lrctl.
    _, opt, sched = build(sgd, lambda o: lrs.StepLR(o, step_size=3))
    AdoptedScheduler(sched, opt)
    with pytest.warns(UserWarning, match="before `optimizer.step\\(\\)`"):
        sched.step()


def test_tensor_lr():
    def tensor_adam(groups):
        for g in groups:
            del g["lr"]  # both groups inherit (and share) the default tensor, as torch does
        return torch.optim.Adam(groups, lr=torch.tensor(0.01), foreach=False)

    def factory(o):
        return lrs.LambdaLR(o, [lambda s: 0.9**s, lambda s: 1.0 / (1 + s)])

    model, opt, sched = build(tensor_adam, factory)
    ref_model, ref_opt, ref_sched = build(tensor_adam, factory)
    adopted = AdoptedScheduler(sched, opt)
    assert isinstance(adopted.state_dict()["groups"][0]["lr"], torch.Tensor)

    ref_rates = []
    for _ in range(30):
        ref_rates.append([g["lr"].item() for g in ref_opt.param_groups])
        train_step(ref_model, ref_opt)
        ref_sched.step()
    rates, _ = adopted_run(adopted, model, opt, 30)

    assert rates == ref_rates
    assert all(isinstance(r, float) for row in rates for r in row)
    assert isinstance(adopted.state_dict()["groups"][0]["lr"], torch.Tensor)
    assert [g["lr"].item() for g in opt.param_groups] == [pytest.approx(0.01)] * 2


def test_single_tensor_lr_step_lr():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01), foreach=False)
    sched = lrs.StepLR(opt, step_size=5, gamma=0.5)
    adopted = AdoptedScheduler(sched, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(12):
            adopted.mark_stepped()
            opt.step()
            sched.step()
    assert adopted.groups[0].current_lr() == torch.tensor(0.01 * 0.25).item()
    assert opt.param_groups[0]["lr"].item() == pytest.approx(0.01)


ROUND_TRIP = [
    pytest.param(adam, lambda o: lrs.OneCycleLR(o, max_lr=[0.05, 0.02], total_steps=60), id="OneCycleLR"),
    pytest.param(sgd, lambda o: lrs.CosineAnnealingLR(o, T_max=20), id="CosineAnnealingLR"),
    pytest.param(
        sgd,
        lambda o: lrs.SequentialLR(
            o, [lrs.LinearLR(o, start_factor=0.1, total_iters=10), lrs.CosineAnnealingLR(o, T_max=40)], milestones=[10]
        ),
        id="SequentialLR",
    ),
    pytest.param(sgd, lambda o: lrs.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=8), id="CyclicLR"),
]


def _through_bytes(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("opt_factory, sched_factory", ROUND_TRIP)
def test_state_round_trip(opt_factory, sched_factory):
    ref_rates, ref_driven = reference_run(opt_factory, sched_factory, 60)

    model, opt, sched = build(opt_factory, sched_factory)
    adopted = AdoptedScheduler(sched, opt)
    first, _ = adopted_run(adopted, model, opt, 30)
    assert first == ref_rates[:30]
    sched_state = _through_bytes(sched.state_dict())
    adopted_state = _through_bytes(adopted.state_dict())

    model, opt, sched = build(opt_factory, sched_factory)
    adopted = AdoptedScheduler(sched, opt)
    sched.load_state_dict(sched_state)
    adopted.load_state_dict(adopted_state)
    rates, driven = adopted_run(adopted, model, opt, 30)

    assert rates == ref_rates[30:]
    assert driven == ref_driven[30:]


def test_load_state_dict_refuses_other_group_count():
    _, opt, sched = build(sgd, lambda o: lrs.StepLR(o, step_size=3))
    state = AdoptedScheduler(sched, opt).state_dict()
    torch.manual_seed(0)
    one_group = torch.optim.SGD(nn.Linear(4, 3).parameters(), lr=0.1)
    adopted = AdoptedScheduler(lrs.StepLR(one_group, step_size=3), one_group)
    with pytest.raises(ValueError, match="2 param groups.*adopted with 1"):
        adopted.load_state_dict(state)
    with pytest.raises(ValueError, match="not an AdoptedScheduler state"):
        adopted.load_state_dict({"lr": 0.1})


def _objects(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [value] + [o for v in value.values() for o in _objects(v)]
    if isinstance(value, (list, tuple)):
        return [value] + [o for v in value for o in _objects(v)]
    return [value]


def test_scheduler_state_dict_after_adoption_has_no_shadow():
    factory = ROUND_TRIP[2].values[1]  # SequentialLR: nested children too
    _, opt, sched = build(sgd, factory)
    adopted = AdoptedScheduler(sched, opt)
    adopted.mark_stepped()
    sched.step()
    state = sched.state_dict()
    shadow = sched.optimizer
    assert shadow is not opt
    assert all(o is not shadow and not isinstance(o, torch.optim.Optimizer) for o in _objects(state))
    assert "optimizer" not in state
    _through_bytes(state)  # plain data: loads with weights_only


def test_release_restores_optimizer_and_copies_nothing():
    _, opt, sched = build(
        sgd,
        lambda o: lrs.SequentialLR(
            o, [lrs.ConstantLR(o, factor=0.5, total_iters=3), lrs.ExponentialLR(o, gamma=0.9)], milestones=[3]
        ),
    )
    adopted = AdoptedScheduler(sched, opt)
    assert all(s.optimizer is sched.optimizer is not opt for s in sched._schedulers)
    adopted.mark_stepped()
    sched.step()
    before = snapshot(opt)

    adopted.release()
    adopted.release()  # harmless twice
    assert sched.optimizer is opt
    assert all(s.optimizer is opt for s in sched._schedulers)
    assert snapshot(opt) == before
    # Handed back, the scheduler writes the real groups again (past ConstantLR's hold).
    opt.step()  # no grads: changes nothing, but torch's order check sees a real step
    for _ in range(3):
        sched.step()
    assert opt.param_groups[0]["lr"] != before[0]["lr"]


def test_already_adopted_is_refused():
    _, opt, sched = build(sgd, lambda o: lrs.StepLR(o, step_size=3))
    adopted = AdoptedScheduler(sched, opt)
    with pytest.raises(ValueError, match="already adopted"):
        AdoptedScheduler(sched, opt)
    adopted.release()
    AdoptedScheduler(sched, opt)


def test_reduce_lr_on_plateau_inside_a_chain_is_refused():
    _, opt, _ = build(sgd, lambda o: None)
    plateau = lrs.ReduceLROnPlateau(opt)
    chain = lrs.ChainedScheduler([lrs.ExponentialLR(opt, gamma=0.9)])
    chain._schedulers.append(plateau)  # torch itself refuses to build this; lrctl too
    with pytest.raises(ValueError, match="ReduceLROnPlateau.*inside"):
        AdoptedScheduler(chain, opt)
    assert plateau.optimizer is opt


def test_scheduler_of_another_optimizer_is_refused():
    _, opt, _ = build(sgd, lambda o: None)
    _, other, other_sched = build(sgd, lambda o: lrs.StepLR(o, step_size=3))
    with pytest.raises(ValueError, match="StepLR steps a different optimizer"):
        AdoptedScheduler(other_sched, opt)
    assert other_sched.optimizer is other


def test_non_scheduler_is_refused():
    _, opt, _ = build(sgd, lambda o: None)

    class LooksLikeOne:
        optimizer = opt

        def step(self) -> None:
            pass

    with pytest.raises(TypeError, match="LooksLikeOne is not a torch.optim.lr_scheduler.LRScheduler"):
        AdoptedScheduler(LooksLikeOne(), opt)


def test_custom_scheduler_subclass_is_adopted():
    class Halving(lrs.LRScheduler):
        def get_lr(self):
            return [base * 0.5 ** (self.last_epoch // 4) for base in self.base_lrs]

    ref_rates, _ = reference_run(sgd, Halving, 20)
    model, opt, sched = build(sgd, Halving)
    adopted = AdoptedScheduler(sched, opt)
    rates, _ = adopted_run(adopted, model, opt, 20)
    assert rates == ref_rates
    assert adopted.groups[0].describe().startswith("adopted ")
    assert "Halving" in adopted.groups[0].describe()


class HasOptimizer:
    def __init__(self, inner: Any) -> None:
        self.optimizer = inner


class HasPrivateOptimizer:
    def __init__(self, inner: Any) -> None:
        self._optimizer = inner


def test_unwrap_optimizer():
    _, opt, _ = build(sgd, lambda o: None)
    assert unwrap_optimizer(opt) is opt
    assert unwrap_optimizer(HasOptimizer(opt)) is opt
    assert unwrap_optimizer(HasPrivateOptimizer(opt)) is opt
    assert unwrap_optimizer(HasOptimizer(HasPrivateOptimizer(opt))) is opt
    with pytest.raises(TypeError, match="HasOptimizer"):
        unwrap_optimizer(HasOptimizer("adam"))
    with pytest.raises(TypeError, match="object"):
        unwrap_optimizer(object())
    too_deep: Any = opt
    for _ in range(10):
        too_deep = HasOptimizer(too_deep)
    with pytest.raises(TypeError):
        unwrap_optimizer(too_deep)


def test_adopt_through_a_wrapper():
    _, opt, sched = build(sgd, lambda o: lrs.StepLR(o, step_size=3))
    adopted = AdoptedScheduler(sched, HasOptimizer(opt))
    assert adopted.optimizer is opt


def test_lightning_optimizer():
    core = pytest.importorskip("lightning.pytorch.core.optimizer")
    _, opt, _ = build(sgd, lambda o: None)
    wrapped = core.LightningOptimizer(opt)
    assert isinstance(wrapped, torch.optim.Optimizer)  # why unwrapping cannot stop at isinstance
    assert unwrap_optimizer(wrapped) is opt
    # A scheduler built on the wrapper is the same optimizer's scheduler.
    sched = lrs.StepLR(wrapped, step_size=3)
    adopted = AdoptedScheduler(sched, opt)
    adopted.release()
    assert sched.optimizer is wrapped


def test_accelerated_optimizer():
    pytest.importorskip("accelerate")
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState

    _, opt, sched = build(sgd, lambda o: lrs.CosineAnnealingLR(o, T_max=10))
    try:
        Accelerator(cpu=True)
        wrapped = AcceleratedOptimizer(opt, device_placement=False)
    except Exception as exc:  # pragma: no cover - depends on the accelerate version
        pytest.skip(f"AcceleratedOptimizer cannot be built on CPU here: {exc}")
    try:
        assert isinstance(wrapped, torch.optim.Optimizer)
        assert unwrap_optimizer(wrapped) is opt
        adopted = AdoptedScheduler(sched, wrapped)
        assert adopted.optimizer is opt
        assert sched.optimizer is not opt
    finally:
        AcceleratorState._reset_state(True)


def test_rates_are_finite_floats_for_every_case():
    # rate() hands plain floats to lrctl's table, never tensors.
    _, opt, sched = build(sgd, lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=3))
    adopted = AdoptedScheduler(sched, opt)
    for _ in range(7):
        adopted.mark_stepped()
        sched.step()
        for group in adopted.groups:
            value = group.rate(group.base_lr, 0)
            assert type(value) is float and math.isfinite(value)
