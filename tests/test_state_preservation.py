"""The key proof of group coalescing: regrouping never changes the math.

Model A trains under lrctl, whose coalesced groups are edited in place, split, merged
and rebuilt as rates change. Model B is an identical copy (copy.deepcopy) trained by a
hand-built optimizer with one param group per parameter, whose group lrs are set by
hand to the same per-parameter rates. Optimizer updates are elementwise per parameter,
so both must stay bit-identical: every parameter and every optimizer state tensor is
compared with torch.equal after every step.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from conftest import SEED_LRS, SEED_NAMES, seed_model
from lrctl.server import Controller
from lrctl.server.requests import ChangeRequest, Mode, Update

OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd_momentum": (torch.optim.SGD, {"momentum": 0.9}),
    "sgd_nesterov_wd": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {"weight_decay": 0.05}),
}

STEPS = 12


def _updates(*items: tuple[str, float, Mode]) -> ChangeRequest:
    return ChangeRequest(updates=tuple(Update(s, v, m) for s, v, m in items))


# Before step k, this change goes in through the controller; `kind` says what it does to
# the physical groups (checked), given the rates in force then.
SCHEDULE: dict[int, tuple[str, ChangeRequest]] = {
    # seed rates: four distinct rates -> four groups
    2: ("merge", _updates(("layer1.*", 0.02, Mode.ABSOLUTE))),  # layer1.{weight,bias} join
    4: ("in_place", _updates(("layer1.*", 0.5, Mode.SCALE))),  # whole group scaled
    5: ("in_place", _updates(("layer2.weight", 0.004, Mode.ABSOLUTE), ("layer2.bias", 0.3, Mode.ABSOLUTE))),
    6: ("split", _updates(("layer1.bias", 0.03, Mode.ABSOLUTE))),
    8: ("regex", _updates(("re:weight$", 3.0, Mode.SCALE))),
    9: ("merge", _updates(("*", 0.005, Mode.ABSOLUTE))),  # everything in one group
    10: ("split", _updates(("re:^layer2", 2.0, Mode.SCALE))),
    11: ("in_place", _updates(("*", 1.5, Mode.SCALE))),
}


def _expected_rates(rates: dict[str, float], request: ChangeRequest) -> dict[str, float]:
    """The rates after `request`, computed independently of lrctl (same float expressions)."""
    out = dict(rates)
    for u in request.updates:
        for name in SEED_NAMES:
            if _matches(u.selector, name):
                out[name] = u.value * rates[name] if u.mode is Mode.SCALE else u.value
    return out


def _matches(selector: str, name: str) -> bool:
    import fnmatch
    import re

    if selector.startswith("re:"):
        return re.search(selector[3:], name) is not None
    return fnmatch.fnmatchcase(name, selector)


def _state_tensors(opt: torch.optim.Optimizer, params: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
        for name, p in params.items()
        if p in opt.state
    }


def _assert_identical(step: int, params_a, params_b, opt_a, opt_b) -> None:
    for name in SEED_NAMES:
        assert torch.equal(params_a[name], params_b[name]), f"{name} differs after step {step}"
    state_a, state_b = _state_tensors(opt_a, params_a), _state_tensors(opt_b, params_b)
    assert state_a.keys() == state_b.keys() == set(SEED_NAMES)
    for name in SEED_NAMES:
        assert state_a[name].keys() == state_b[name].keys(), name
        assert state_a[name], f"no state tensors for {name}"
        for key in state_a[name]:
            assert torch.equal(state_a[name][key], state_b[name][key]), (
                f"optimizer state {key!r} of {name} differs after step {step}"
            )


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for_loop"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_regrouping_is_bit_identical_to_per_parameter_groups(opt_name: str, foreach: bool) -> None:
    cls, kwargs = OPTIMIZERS[opt_name]
    model_a = seed_model(7)
    model_b = copy.deepcopy(model_a)
    params_a = dict(model_a.named_parameters())
    params_b = dict(model_b.named_parameters())

    def per_param(params: dict[str, torch.Tensor]) -> torch.optim.Optimizer:
        groups = [{"params": [params[n]], "lr": SEED_LRS[n]} for n in SEED_NAMES]
        return cls(groups, lr=10.0, foreach=foreach, **kwargs)

    opt_a, opt_b = per_param(params_a), per_param(params_b)
    controller = Controller(model_a.named_parameters(), opt_a)
    try:
        gen = torch.Generator().manual_seed(99)
        xs = torch.randn(STEPS, 8, 10, generator=gen)
        ys = torch.randn(STEPS, 8, 1, generator=gen)
        rates = dict(SEED_LRS)
        for step in range(STEPS):
            if step in SCHEDULE:
                kind, request = SCHEDULE[step]
                groups_before = list(opt_a.param_groups)
                state_before = {n: opt_a.state[p] for n, p in params_a.items()}
                state_keys_before = {id(p) for p in opt_a.state}
                pending, _ = controller.submit(request)
                rates = _expected_rates(rates, request)
                for name, p in params_b.items():  # mirror by hand on B
                    (group,) = [g for g in opt_b.param_groups if g["params"][0] is p]
                    group["lr"] = rates[name]
            for model, opt in ((model_a, opt_a), (model_b, opt_b)):
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.mse_loss(model(xs[step]), ys[step]).backward()
                opt.step()
            if step in SCHEDULE:
                assert pending.error is None, pending.error
                assert pending.outcome.step == step
                assert controller.learning_rates() == rates  # exactly the values set
                same = [a is b for a, b in zip(opt_a.param_groups, groups_before)]
                if kind == "in_place":
                    assert len(opt_a.param_groups) == len(groups_before) and all(same), kind
                elif kind in ("merge", "split"):
                    assert not all(same) or len(opt_a.param_groups) != len(groups_before), kind
                # No state lost or re-keyed: the same per-parameter state dicts, keyed by
                # the same tensors.
                if step > 0:
                    assert {id(p) for p in opt_a.state} == state_keys_before
                    for n, p in params_a.items():
                        assert opt_a.state[p] is state_before[n], f"state of {n} replaced at step {step}"
            # Coalesced: one group per distinct rate, each holding the right parameters.
            assert len(opt_a.param_groups) == len(set(rates.values()))
            for group in opt_a.param_groups:
                for n, p in zip(group["param_names"], group["params"]):
                    assert params_a[n] is p and group["lr"] == rates[n]
            _assert_identical(step, params_a, params_b, opt_a, opt_b)
        assert controller.version == len(SCHEDULE)
    finally:
        controller.close()


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_state_survives_a_rebuild_keyed_by_the_same_tensors(opt_name: str) -> None:
    cls, kwargs = OPTIMIZERS[opt_name]
    model = seed_model()
    params = dict(model.named_parameters())
    opt = cls([{"params": [p], "lr": SEED_LRS[n]} for n, p in params.items()], lr=10.0, **kwargs)
    controller = Controller(model.named_parameters(), opt)
    try:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 10)).sum().backward()
            opt.step()
        keys = list(opt.state.keys())
        snapshot = {n: {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for n, p in params.items()}
        objects = {n: opt.state[p] for n, p in params.items()}
        controller.submit(_updates(("*", 0.01, Mode.ABSOLUTE)))  # merge all: rebuild
        # Apply at the boundary without changing the state: a step with no gradients.
        opt.zero_grad(set_to_none=True)
        opt.step()
        assert len(opt.param_groups) == 1
        assert list(opt.state.keys()) == keys
        for n, p in params.items():
            assert opt.state[p] is objects[n]
            for k, v in snapshot[n].items():
                assert torch.equal(opt.state[p][k], v), (n, k)
        # And the optimizer's own state_dict round trip still works after regrouping.
        sd = opt.state_dict()
        assert len(sd["param_groups"]) == 1 and len(sd["state"]) == 4
    finally:
        controller.close()
