"""build_optimizer(): per-name initial rates, one param group per distinct rate."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from conftest import SEED_LRS, SEED_NAMES, group_lrs, seed_model, train_step
from lrctl.server import Controller, build_optimizer


def test_seed_rates_with_default_ten() -> None:
    model = seed_model()
    opt = build_optimizer(model, torch.optim.SGD, SEED_LRS, default_lr=10)
    assert group_lrs(model, opt) == SEED_LRS
    assert len(opt.param_groups) == 4  # four distinct rates
    assert [g["param_names"] for g in opt.param_groups] == [[n] for n in SEED_NAMES]
    assert opt.defaults["lr"] == 10


def test_one_group_per_distinct_rate_and_default_for_the_rest() -> None:
    model = seed_model()
    opt = build_optimizer(model, torch.optim.SGD, {"layer1.*": 0.1, "layer2.weight": 0.1}, default_lr=10)
    assert [(g["lr"], g["param_names"]) for g in opt.param_groups] == [
        (0.1, ["layer1.weight", "layer1.bias", "layer2.weight"]),
        (10, ["layer2.bias"]),
    ]
    params = dict(model.named_parameters())
    for g in opt.param_groups:
        assert [params[n] for n in g["param_names"]] == g["params"]


def test_regex_and_glob_keys() -> None:
    model = seed_model()
    opt = build_optimizer(model, torch.optim.SGD, {"re:bias$": 0.5, "*.weight": 0.05})
    assert group_lrs(model, opt) == {
        "layer1.weight": 0.05,
        "layer1.bias": 0.5,
        "layer2.weight": 0.05,
        "layer2.bias": 0.5,
    }
    assert len(opt.param_groups) == 2


def test_frozen_parameters_are_left_out() -> None:
    model = seed_model()
    model.layer2.bias.requires_grad_(False)
    opt = build_optimizer(model, torch.optim.SGD, SEED_LRS, default_lr=10)
    held = [n for g in opt.param_groups for n in g["param_names"]]
    assert held == ["layer1.weight", "layer1.bias", "layer2.weight"]
    assert all(p is not model.layer2.bias for g in opt.param_groups for p in g["params"])


def test_unknown_name_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError) as info:
        build_optimizer(seed_model(), torch.optim.SGD, {"layer1.wieght": 0.1}, default_lr=10)
    assert "'layer1.wieght'" in str(info.value) and "'layer1.weight'" in str(info.value)


def test_selector_matching_nothing_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"encoder\.\*"):
        build_optimizer(seed_model(), torch.optim.SGD, {"encoder.*": 0.1}, default_lr=10)


def test_malformed_regex_key_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"re:layer\("):
        build_optimizer(seed_model(), torch.optim.SGD, {"re:layer(": 0.1}, default_lr=10)


def test_conflicting_keys_are_a_value_error() -> None:
    with pytest.raises(ValueError) as info:
        build_optimizer(seed_model(), torch.optim.SGD, {"layer1.*": 0.1, "*.weight": 0.2}, default_lr=10)
    message = str(info.value)
    assert "'layer1.*'" in message and "'*.weight'" in message and "'layer1.weight'" in message
    assert "0.1" in message and "0.2" in message


def test_agreeing_keys_are_fine() -> None:
    model = seed_model()
    opt = build_optimizer(model, torch.optim.SGD, {"layer1.*": 0.1, "*.weight": 0.1}, default_lr=1.0)
    assert group_lrs(model, opt)["layer1.weight"] == 0.1


def test_missing_default_is_a_value_error_naming_the_parameter() -> None:
    with pytest.raises(ValueError) as info:
        build_optimizer(seed_model(), torch.optim.SGD, {"layer1.*": 0.1})
    assert "'layer2.weight'" in str(info.value) and "default_lr" in str(info.value)


def test_no_default_needed_when_every_parameter_has_a_rate() -> None:
    model = seed_model()
    opt = build_optimizer(model, torch.optim.SGD, SEED_LRS)
    assert group_lrs(model, opt) == SEED_LRS


@pytest.mark.parametrize("bad", [math.nan, math.inf, -0.1])
def test_bad_rates_are_a_value_error(bad: float) -> None:
    """The controller refuses NaN, inf and negative rates; the builder must not start with one."""
    with pytest.raises(ValueError) as info:
        build_optimizer(seed_model(), torch.optim.SGD, {**SEED_LRS, "layer2.bias": bad})
    message = str(info.value)
    assert "'layer2.bias'" in message and repr(bad) in message, message
    assert "different rates" not in message, message  # a NaN is not a conflict with itself


@pytest.mark.parametrize(
    "cls, kwargs, expected",
    [
        (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}, {"momentum": 0.9, "nesterov": True}),
        (torch.optim.Adam, {"betas": (0.8, 0.95), "eps": 1e-6}, {"betas": (0.8, 0.95), "eps": 1e-6}),
        (torch.optim.AdamW, {"weight_decay": 0.1, "foreach": True}, {"weight_decay": 0.1, "foreach": True}),
    ],
)
def test_optimizer_kwargs_reach_every_group(cls: type, kwargs: dict[str, Any], expected: dict[str, Any]) -> None:
    model = seed_model()
    opt = build_optimizer(model, cls, SEED_LRS, default_lr=1e-3, **kwargs)
    assert isinstance(opt, cls)
    assert group_lrs(model, opt) == SEED_LRS
    for g in opt.param_groups:
        for key, value in expected.items():
            assert g[key] == value, key
    train_step(model, opt)  # it trains


def test_controller_adopts_built_groups_unchanged() -> None:
    model = seed_model()
    opt = build_optimizer(model, torch.optim.AdamW, {"layer1.*": 0.01, "layer2.*": 0.001})
    groups = list(opt.param_groups)
    controller = Controller(model.named_parameters(), opt)
    try:
        assert len(opt.param_groups) == 2
        assert all(a is b for a, b in zip(opt.param_groups, groups))
        assert controller.status().num_param_groups == 2
    finally:
        controller.close()
