"""The controller on its own (no gRPC): selectors, validation, step boundaries, history,
and the coalesced param groups under it.

Steps are driven by hand from the test thread, so every assertion about "at which step"
is exact.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Iterator

import pytest
import torch
from torch import nn

from conftest import SEED_LRS, SEED_NAMES, SeedModel, group_lrs, per_parameter_optimizer, seed_model, train_step
from lrctl.client.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LrctlError,
    NotFoundError,
    ResourceExhaustedError,
)
from lrctl.server import Controller
from lrctl.server.requests import ChangeRequest, Mode, PendingChange, Update


def req(*updates: tuple, **options) -> ChangeRequest:
    """ChangeRequest from (selector, value) or (selector, value, Mode) tuples."""
    return ChangeRequest(updates=tuple(Update(*u) for u in updates), **options)


def set_(selector: str, value: float) -> tuple:
    return (selector, value, Mode.ABSOLUTE)


def times(selector: str, factor: float) -> tuple:
    return (selector, factor, Mode.SCALE)


class Rig:
    """Seed model + optimizer + controller, stepped by the test thread."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs) -> None:
        self.model = model
        self.optimizer = optimizer
        self.controller = Controller(model.named_parameters(), optimizer, **kwargs)
        self.params = dict(model.named_parameters())

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            train_step(self.model, self.optimizer)

    def apply(self, request: ChangeRequest) -> PendingChange:
        """Submit, step once, and return the (finished) pending change."""
        pending, _ = self.controller.submit(request)
        self.step()
        assert pending.finished.is_set()
        return pending

    def optimizer_lrs(self) -> dict[str, float]:
        return group_lrs(self.model, self.optimizer)

    def snapshot(self) -> tuple:
        """Everything a rejected change must leave as it was."""
        c = self.controller
        records, _, dropped = c.history(-1, 10_000)
        return (
            c.learning_rates(),
            self.optimizer_lrs(),
            c.version,
            [(r.change_id, r.version) for r in records],
            dropped,
            c.pending_count,
            len(self.optimizer.param_groups),
        )

    def check_groups(self, coalesced: bool = True) -> None:
        """Every group's param_names match its params; every held param in exactly one group
        at the rate the controller reports (and, when `coalesced`, one group per rate)."""
        rates = self.controller.learning_rates()
        seen = []
        for group in self.optimizer.param_groups:
            assert len(group["param_names"]) == len(group["params"])
            for name, p in zip(group["param_names"], group["params"]):
                assert self.params[name] is p, f"group says {name!r} but holds another tensor"
                assert float(group["lr"]) == rates[name]
                seen.append(name)
        assert sorted(seen) == sorted(rates)
        assert len(set(seen)) == len(seen)
        if coalesced:
            # One group per distinct rate (all other hyperparameters are equal here).
            assert len(self.optimizer.param_groups) == len(set(rates.values()))
        assert self.controller.status().num_param_groups == len(self.optimizer.param_groups)
        groups = {n: g for g, group in enumerate(self.optimizer.param_groups) for n in group["param_names"]}
        views = self.controller.describe(self.controller.filter(""))
        assert {v.name: v.group for v in views if v.in_optimizer} == groups


@pytest.fixture
def rig() -> Iterator[Rig]:
    model = seed_model()
    r = Rig(model, per_parameter_optimizer(model))
    try:
        yield r
    finally:
        r.controller.close()


def changed_names(rig: Rig, *updates: tuple) -> list[str]:
    return [c.name for c in rig.controller.preview(req(*updates)).changes]


# -- selectors ---------------------------------------------------------------------------


def test_exact_name_resolves_to_that_parameter(rig: Rig) -> None:
    assert changed_names(rig, set_("layer1.weight", 0.5)) == ["layer1.weight"]


@pytest.mark.parametrize(
    "selector, expected",
    [
        ("layer1.*", ["layer1.weight", "layer1.bias"]),
        ("*.bias", ["layer1.bias", "layer2.bias"]),
        ("layer?.weight", ["layer1.weight", "layer2.weight"]),
        ("layer[2].*", ["layer2.weight", "layer2.bias"]),
        ("*", list(SEED_NAMES)),
    ],
)
def test_glob_selectors_resolve_in_model_order(rig: Rig, selector: str, expected: list[str]) -> None:
    assert changed_names(rig, set_(selector, 0.5)) == expected


@pytest.mark.parametrize(
    "selector, expected",
    [
        (r"re:^layer2\.", ["layer2.weight", "layer2.bias"]),
        ("re:bias$", ["layer1.bias", "layer2.bias"]),
        ("re:weight", ["layer1.weight", "layer2.weight"]),  # re.search: matches anywhere
        (r"re:^layer[12]\.(weight|bias)$", list(SEED_NAMES)),
    ],
)
def test_regex_selectors_resolve_with_search(rig: Rig, selector: str, expected: list[str]) -> None:
    assert changed_names(rig, set_(selector, 0.5)) == expected


def test_read_by_selectors_and_all(rig: Rig) -> None:
    rows, version, step = rig.controller.read(["layer2.*", "layer1.bias"])
    assert [(r.name, r.lr) for r in rows] == [
        ("layer1.bias", 0.1),
        ("layer2.weight", 0.001),
        ("layer2.bias", 1.0),
    ]
    # No schedule, no pin: the rate is the base.
    assert all((r.base, r.factor, r.pinned, r.schedule) == (r.lr, 1.0, False, "") for r in rows)
    groups = {v.name: v.group for v in rig.controller.describe(rig.controller.filter(""))}
    assert all(r.group == groups[r.name] for r in rows)
    assert (version, step) == (0, 0)
    rows, _, _ = rig.controller.read([])
    assert [r.name for r in rows] == list(SEED_NAMES)
    assert {r.name: r.lr for r in rows} == SEED_LRS


# -- rejected values and selectors ----------------------------------------------------------


@pytest.mark.parametrize(
    "update, error, fragment",
    [
        (set_("layer1.weight", math.nan), InvalidArgumentError, "nan"),
        (set_("layer1.weight", math.inf), InvalidArgumentError, "inf"),
        (set_("layer1.weight", -math.inf), InvalidArgumentError, "-inf"),
        (times("layer1.weight", math.nan), InvalidArgumentError, "nan"),
        (times("layer1.weight", math.inf), InvalidArgumentError, "inf"),
        (set_("layer1.weight", -0.5), InvalidArgumentError, "-0.5"),
        (times("layer1.weight", 0.0), InvalidArgumentError, "0.0"),
        (times("layer1.weight", -2.0), InvalidArgumentError, "-2.0"),
        (set_("re:layer(1", 0.5), InvalidArgumentError, "re:layer(1"),
        (set_("re:", 0.5), InvalidArgumentError, "re:"),
        (set_("", 0.5), InvalidArgumentError, "empty selector"),
        (set_("encoder.*", 0.5), NotFoundError, "encoder.*"),
        (set_("re:^decoder", 0.5), NotFoundError, "re:^decoder"),
        (set_("layer3.weight", 0.5), NotFoundError, "layer3.weight"),
    ],
)
def test_bad_update_is_rejected_naming_the_value(rig: Rig, update: tuple, error: type, fragment: str) -> None:
    before = rig.snapshot()
    for attempt in (rig.controller.preview, rig.controller.submit):
        with pytest.raises(error) as info:
            attempt(req(update))
        assert type(info.value) is error
        assert fragment in str(info.value), str(info.value)
    rig.step()
    assert rig.snapshot() == before


def test_unknown_name_suggests_the_closest_name(rig: Rig) -> None:
    with pytest.raises(NotFoundError) as info:
        rig.controller.submit(req(set_("layer1.wieght", 0.5)))
    message = str(info.value)
    assert "'layer1.wieght'" in message
    assert "did you mean" in message and "'layer1.weight'" in message


@pytest.mark.parametrize(
    "selector, hint",
    [
        ("layer3.*", "names that start with 'layer': 'layer1.bias', 'layer1.weight', 'layer2.bias'"),
        ("re:^layer1\\.wieght", "names that start with 'layer1.w': 'layer1.weight'"),
    ],
)
def test_a_pattern_that_matches_nothing_shows_names_near_it(rig: Rig, selector: str, hint: str) -> None:
    with pytest.raises(NotFoundError) as info:
        rig.controller.submit(req(set_(selector, 0.5)))
    assert f"selector '{selector}' matches no parameter; {hint}" == str(info.value)


def test_empty_batch_is_rejected(rig: Rig) -> None:
    with pytest.raises(InvalidArgumentError, match="empty batch"):
        rig.controller.submit(req())


def test_two_entries_disagreeing_on_one_name_are_rejected(rig: Rig) -> None:
    before = rig.snapshot()
    with pytest.raises(InvalidArgumentError) as info:
        rig.controller.submit(req(set_("layer1.*", 0.5), set_("*.weight", 0.7)))
    message = str(info.value)
    assert "'layer1.weight'" in message and "0.5" in message and "0.7" in message
    with pytest.raises(InvalidArgumentError, match="layer2.bias"):
        rig.controller.submit(req(set_("layer2.bias", 0.5), times("*.bias", 0.5)))
    rig.step()
    assert rig.snapshot() == before


def test_two_entries_agreeing_on_one_name_are_allowed(rig: Rig) -> None:
    pending = rig.apply(req(set_("layer1.*", 0.5), set_("*.weight", 0.5)))
    assert pending.error is None
    assert rig.controller.learning_rates() == {
        "layer1.weight": 0.5,
        "layer1.bias": 0.5,
        "layer2.weight": 0.5,
        "layer2.bias": 1.0,
    }
    assert [c.name for c in pending.outcome.changes] == ["layer1.weight", "layer1.bias", "layer2.weight"]


def test_at_step_already_past_is_rejected(rig: Rig) -> None:
    rig.step(3)
    with pytest.raises(InvalidArgumentError) as info:
        rig.controller.submit(req(set_("layer1.weight", 0.5), at_step=2))
    assert "at_step 2" in str(info.value) and "3" in str(info.value)
    # The next step itself is fine.
    pending = rig.apply(req(set_("layer1.weight", 0.5), at_step=3))
    assert pending.outcome.step == 3


def test_negative_at_step_is_rejected(rig: Rig) -> None:
    with pytest.raises(InvalidArgumentError, match="at_step -1"):
        rig.controller.submit(req(set_("layer1.weight", 0.5), at_step=-1))


def test_expected_version_mismatch_at_submit(rig: Rig) -> None:
    with pytest.raises(FailedPreconditionError) as info:
        rig.controller.submit(req(set_("layer1.weight", 0.5), expected_version=7))
    assert "expected_version 7" in str(info.value) and "0" in str(info.value)
    assert rig.controller.pending_count == 0


def test_expected_version_mismatch_at_apply(rig: Rig) -> None:
    first, _ = rig.controller.submit(req(set_("layer1.weight", 0.5), expected_version=0))
    second, _ = rig.controller.submit(req(set_("layer2.weight", 0.5), expected_version=0))
    rig.step()
    assert first.error is None and first.outcome.version == 1
    assert isinstance(second.error, FailedPreconditionError)
    assert "expected_version 0" in str(second.error) and "version 1" in str(second.error)
    assert rig.controller.learning_rates()["layer2.weight"] == 0.001
    assert rig.controller.version == 1


def test_matching_expected_version_applies(rig: Rig) -> None:
    rig.apply(req(set_("layer1.weight", 0.5)))
    pending = rig.apply(req(set_("layer1.weight", 0.25), expected_version=1))
    assert pending.error is None and pending.outcome.version == 2


@pytest.fixture
def rig64() -> Iterator[Rig]:
    """The seed model in float64, where any finite double is a rate the kernels accept."""
    model = seed_model().double()
    r = Rig(model, per_parameter_optimizer(model))
    try:
        yield r
    finally:
        r.controller.close()


def test_scale_overflow_to_inf_is_rejected_at_submit(rig64: Rig) -> None:
    rig = rig64
    rig.apply(req(set_("layer1.weight", 1e300)))
    before = rig.snapshot()
    with pytest.raises(InvalidArgumentError) as info:
        rig.controller.submit(req(times("layer1.*", 1e10)))
    assert "'layer1.weight'" in str(info.value) and "inf" in str(info.value)
    rig.step()
    assert rig.snapshot() == before


def test_scale_overflow_to_inf_is_rejected_at_apply(rig64: Rig) -> None:
    rig = rig64
    # Both are fine on their own when submitted; together they overflow at the step.
    big, _ = rig.controller.submit(req(set_("layer1.weight", 1e300)))
    over, _ = rig.controller.submit(req(times("layer1.*", 1e10)))
    rig.step()
    assert big.error is None
    assert isinstance(over.error, InvalidArgumentError)
    assert "'layer1.weight'" in str(over.error) and "inf" in str(over.error)
    rates = rig.controller.learning_rates()
    assert rates["layer1.weight"] == 1e300 and rates["layer1.bias"] == 0.1  # nothing of `over`
    assert rig.controller.version == 1
    assert rig.optimizer_lrs() == rates


@pytest.mark.parametrize("update", [set_("layer1.weight", 1e39), times("layer2.bias", 1e39)])
def test_rate_beyond_the_parameter_dtype_range_is_rejected(rig: Rig, update: tuple) -> None:
    """A float32 parameter cannot step with lr > float32 max: torch raises inside
    optimizer.step() ("value cannot be converted to type float without overflow"), which
    would kill the user's training loop. Such a rate must be refused up front."""
    before = rig.snapshot()
    with pytest.raises(InvalidArgumentError) as info:
        rig.controller.submit(req(update))
    assert "1e+39" in str(info.value), str(info.value)
    assert "above 3.40282e+38, the largest rate its optimizer can apply to a float32" in str(info.value)
    rig.step()  # must not raise
    assert rig.snapshot() == before


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("foreach", [False, True])
def test_adam_rate_limit_counts_the_first_step_bias_correction(opt_cls, foreach: bool) -> None:
    """Adam's first step uses lr / (1 - beta1): 1e38 fits float32, 1e39 as a step does not."""
    model = seed_model()
    rig = Rig(model, opt_cls(model.parameters(), lr=0.01, foreach=foreach))
    before = rig.snapshot()
    with pytest.raises(InvalidArgumentError, match=r"above 3.40282e\+37"):
        rig.controller.submit(req(set_("layer1.weight", 1e38)))
    rig.step(2)  # must not raise
    assert rig.snapshot()[:3] == before[:3]
    assert rig.apply(req(set_("layer1.weight", 3e37))).error is None
    rig.step()


def test_complex_parameters_have_a_rate_limit_too() -> None:
    with warnings.catch_warnings():  # "complex modules are a new feature"
        warnings.simplefilter("ignore", UserWarning)
        model = nn.Linear(2, 2).to(torch.complex64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    controller = Controller(model.named_parameters(), opt)
    with pytest.raises(InvalidArgumentError, match="complex64"):
        controller.submit(req(set_("weight", 1e300)))
    model(torch.ones(1, 2, dtype=torch.complex64)).abs().sum().backward()
    opt.step()  # must not raise
    controller.close()


def test_a_tensor_lr_limits_by_its_own_dtype() -> None:
    """float64 parameters with a float32 tensor lr: 1e39 would silently become inf."""
    model = seed_model().double()
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01), foreach=False)
    rig = Rig(model, opt)
    with pytest.raises(InvalidArgumentError, match=r"above 3.40282e\+37"):
        rig.controller.submit(req(set_("layer1.weight", 1e39)))
    rig.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_groups_sharing_one_lr_tensor_are_changed_one_at_a_time() -> None:
    """torch gives groups without their own lr the same defaults["lr"] tensor: setting
    one group's rate must not change the others' (nor the optimizer's defaults)."""
    model = seed_model()
    opt = torch.optim.Adam(
        [{"params": model.layer1.parameters()},
         {"params": model.layer2.parameters(), "weight_decay": 0.1}],
        lr=torch.tensor(0.01), foreach=False,
    )
    assert opt.param_groups[0]["lr"] is opt.param_groups[1]["lr"]
    rig = Rig(model, opt)
    assert rig.apply(req(set_("layer1.*", 0.5))).error is None
    untouched = float(torch.tensor(0.01))  # what a float32 tensor makes of 0.01
    assert rig.optimizer_lrs() == {
        "layer1.weight": 0.5, "layer1.bias": 0.5, "layer2.weight": untouched, "layer2.bias": untouched,
    }
    assert rig.controller.learning_rates() == rig.optimizer_lrs()
    assert float(opt.defaults["lr"]) == untouched


@pytest.mark.parametrize("edited", [False, True], ids=["before-the-edit", "after-the-edit"])
def test_an_interrupt_inside_the_hook_finishes_every_due_change(rig: Rig, monkeypatch, edited: bool) -> None:
    """Ctrl-C can land in the training thread while the hook applies changes: the step
    is interrupted, but no caller may wait forever and nothing is half-applied (whether
    the strategy had changed the groups yet or not)."""
    first, _ = rig.controller.submit(req(set_("layer1.weight", 0.5)))
    second, _ = rig.controller.submit(req(set_("layer2.weight", 0.5)))
    before = rig.snapshot()
    groups_before = [(g["param_names"], float(g["lr"])) for g in rig.optimizer.param_groups]
    real_move = rig.controller._strategy.move
    calls = []

    def interrupted_once(moved, rates):
        calls.append((dict(moved), dict(rates)))
        if len(calls) == 1:
            if edited:
                real_move(moved, rates)
            raise KeyboardInterrupt
        real_move(moved, rates)

    monkeypatch.setattr(rig.controller._strategy, "move", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        rig.step()
    assert first.finished.is_set() and second.finished.is_set()
    assert isinstance(first.error, InternalError) and isinstance(second.error, InternalError)
    assert "may not have been applied" in str(second.error)
    assert rig.snapshot()[:3] == before[:3] and rig.controller.pending_count == 0
    assert [(g["param_names"], float(g["lr"])) for g in rig.optimizer.param_groups] == groups_before
    rig.check_groups()
    monkeypatch.undo()
    assert rig.apply(req(set_("layer1.weight", 0.5))).error is None  # training goes on
    assert rig.optimizer_lrs() == rig.controller.learning_rates() == {**SEED_LRS, "layer1.weight": 0.5}
    rig.check_groups()


def test_lbfgs_is_refused_up_front() -> None:
    """LBFGS asserts one param group inside step(): the first split would kill training."""
    model = seed_model()
    with pytest.raises(ValueError, match="LBFGS allows exactly one param group"):
        Controller(model.named_parameters(), torch.optim.LBFGS(model.parameters()))


def test_negative_zero_is_a_negative_rate(rig: Rig) -> None:
    with pytest.raises(InvalidArgumentError, match="learning rate -0.0 .* is negative"):
        rig.controller.submit(req(set_("layer1.weight", -0.0)))
    assert rig.apply(req(set_("layer1.weight", 0.0))).error is None  # +0 freezes it


def test_reason_is_bounded(rig: Rig) -> None:
    with pytest.raises(InvalidArgumentError, match="reason of 4097 characters is too long"):
        rig.controller.submit(req(set_("layer1.weight", 0.5), reason="x" * 4097))
    assert rig.controller.pending_count == 0
    pending = rig.apply(req(set_("layer1.weight", 0.5), reason="x" * 4096))
    assert pending.error is None


# -- parameters that cannot be set --------------------------------------------------------


@pytest.fixture
def odd_rig() -> Iterator[Rig]:
    """layer2.bias is frozen but held by the optimizer; layer1.bias is not held at all."""
    model = seed_model()
    model.layer2.bias.requires_grad_(False)
    opt = per_parameter_optimizer(
        model, lrs={"layer1.weight": 0.01, "layer2.weight": 0.001, "layer2.bias": 1.0}
    )
    r = Rig(model, opt)
    try:
        yield r
    finally:
        r.controller.close()


def test_frozen_parameter_cannot_be_set(odd_rig: Rig) -> None:
    with pytest.raises(FailedPreconditionError) as info:
        odd_rig.controller.submit(req(set_("layer2.bias", 0.5)))
    assert "'layer2.bias'" in str(info.value) and "does not require grad" in str(info.value)


def test_parameter_not_in_optimizer_cannot_be_set(odd_rig: Rig) -> None:
    with pytest.raises(FailedPreconditionError) as info:
        odd_rig.controller.submit(req(set_("layer1.bias", 0.5)))
    assert "'layer1.bias'" in str(info.value) and "not held by the optimizer" in str(info.value)
    with pytest.raises(FailedPreconditionError, match="layer1.bias"):
        odd_rig.controller.read(["layer1.bias"])


def test_selector_matching_only_unsettable_parameters_is_rejected(odd_rig: Rig) -> None:
    with pytest.raises(FailedPreconditionError) as info:
        odd_rig.controller.submit(req(set_("*.bias", 0.5)))
    assert "'*.bias'" in str(info.value)


def test_unsettable_parameters_are_listed_with_flags(odd_rig: Rig) -> None:
    c = odd_rig.controller
    views = {v.name: v for v in c.describe(c.filter(""))}
    assert list(views) == list(SEED_NAMES)
    assert (views["layer1.weight"].in_optimizer, views["layer1.weight"].settable) == (True, True)
    assert views["layer1.weight"].lr == 0.01
    assert (views["layer1.bias"].in_optimizer, views["layer1.bias"].settable) == (False, False)
    assert views["layer1.bias"].lr is None and views["layer1.bias"].group == -1
    assert (views["layer2.bias"].in_optimizer, views["layer2.bias"].settable) == (True, False)
    assert views["layer2.bias"].requires_grad is False and views["layer2.bias"].lr == 1.0
    status = c.status()
    assert (status.num_parameters, status.num_settable) == (4, 2)
    # The frozen-but-held parameter can still be read.
    rows, _, _ = c.read(["layer2.bias"])
    assert [(r.name, r.lr) for r in rows] == [("layer2.bias", 1.0)]


def test_optimizer_holding_unnamed_tensors_is_refused() -> None:
    model = seed_model()
    extra = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([*model.parameters(), extra], lr=0.1)
    with pytest.raises(ValueError, match="1 tensor"):
        Controller(model.named_parameters(), opt)


# -- step boundaries -------------------------------------------------------------------------


class InStepProbe:
    """A step pre-hook registered after lrctl's: records the rates each step runs with."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.seen: list[dict[str, float]] = []
        rig.optimizer.register_step_pre_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        self.seen.append(self.rig.optimizer_lrs())


def test_at_step_applies_exactly_before_that_step(rig: Rig) -> None:
    probe = InStepProbe(rig)
    pending, expected = rig.controller.submit(req(set_("layer1.*", 0.5), at_step=3))
    assert expected.step == 3 and not expected.applied
    rig.step(3)
    assert not pending.finished.is_set()
    assert rig.controller.learning_rates()["layer1.weight"] == 0.01
    rig.step(2)
    assert pending.outcome.step == 3 and pending.outcome.applied
    records, _, _ = rig.controller.history(0, 10)
    assert [r.step for r in records] == [3]
    assert [s["layer1.weight"] for s in probe.seen] == [0.01, 0.01, 0.01, 0.5, 0.5]
    assert [s["layer1.bias"] for s in probe.seen] == [0.1, 0.1, 0.1, 0.5, 0.5]
    assert [s["layer2.bias"] for s in probe.seen] == [1.0] * 5


def test_at_step_update_magnitude_with_plain_sgd(rig: Rig) -> None:
    """The 4th step (step 3) moves layer2.bias by exactly new_lr * grad."""
    rig.controller.submit(req(set_("layer2.bias", 0.25), at_step=3))
    p = rig.params["layer2.bias"]
    for step in range(5):
        x = torch.randn(4, 10)
        rig.optimizer.zero_grad()
        rig.model(x).sum().backward()
        before, grad = p.detach().clone(), p.grad.detach().clone()
        rig.optimizer.step()
        lr = 0.25 if step >= 3 else 1.0
        assert torch.equal(p.detach(), before.add(grad, alpha=-lr)), f"step {step}"


def test_immediate_change_applies_at_the_next_step(rig: Rig) -> None:
    probe = InStepProbe(rig)
    rig.step(2)
    pending, expected = rig.controller.submit(req(set_("layer2.weight", 0.05)))
    assert expected.step == -1
    rig.step()
    assert pending.outcome.step == 2
    assert [s["layer2.weight"] for s in probe.seen] == [0.001, 0.001, 0.05]


def test_pending_changes_apply_in_order_with_consecutive_versions(rig: Rig) -> None:
    a, _ = rig.controller.submit(req(set_("layer1.weight", 0.5)))
    b, _ = rig.controller.submit(req(times("layer1.weight", 2.0)))  # from the rate in force
    c, _ = rig.controller.submit(req(set_("layer2.bias", 0.125)))
    rig.step()
    assert [p.outcome.version for p in (a, b, c)] == [1, 2, 3]
    assert [p.outcome.step for p in (a, b, c)] == [0, 0, 0]
    assert b.outcome.changes[0].old_lr == 0.5 and b.outcome.changes[0].new_lr == 1.0
    records, _, _ = rig.controller.history(0, 10)
    assert [(r.change_id, r.version) for r in records] == [(a.change_id, 1), (b.change_id, 2), (c.change_id, 3)]
    assert rig.controller.learning_rates()["layer1.weight"] == 1.0


def test_changes_due_at_different_steps_apply_in_step_order(rig: Rig) -> None:
    late, _ = rig.controller.submit(req(set_("layer1.weight", 0.3), at_step=2))
    early, _ = rig.controller.submit(req(set_("layer1.weight", 0.2), at_step=1))
    rig.step(3)
    assert (early.outcome.step, early.outcome.version) == (1, 1)
    assert (late.outcome.step, late.outcome.version) == (2, 2)
    assert rig.controller.learning_rates()["layer1.weight"] == 0.3


def test_withdrawn_change_never_applies(rig: Rig) -> None:
    before = rig.snapshot()
    pending, _ = rig.controller.submit(req(set_("layer1.weight", 0.5)))
    assert rig.controller.pending_count == 1
    assert rig.controller.withdraw(pending) is True
    assert isinstance(pending.error, DeadlineExceededError)
    rig.step(3)
    assert rig.snapshot() == before
    assert rig.controller.withdraw(pending) is False  # already gone


def test_withdraw_after_apply_does_nothing(rig: Rig) -> None:
    pending = rig.apply(req(set_("layer1.weight", 0.5)))
    assert rig.controller.withdraw(pending) is False
    assert pending.error is None and rig.controller.learning_rates()["layer1.weight"] == 0.5


def test_close_fails_pending_changes(rig: Rig) -> None:
    pending, _ = rig.controller.submit(req(set_("layer1.weight", 0.5), at_step=1))
    rig.controller.close()
    assert pending.finished.is_set()
    assert isinstance(pending.error, FailedPreconditionError)
    assert str(pending.change_id) in str(pending.error)
    rig.step(3)  # the hook is gone: nothing applies, nothing is counted
    assert rig.controller.learning_rates()["layer1.weight"] == 0.01
    assert rig.optimizer_lrs()["layer1.weight"] == 0.01
    assert rig.controller.status().state == "closing"
    with pytest.raises(FailedPreconditionError, match="shutting down"):
        rig.controller.submit(req(set_("layer1.weight", 0.5)))


# -- atomicity ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        set_("layer2.*", -1.0),
        set_("layer2.wieght", 0.2),
        times("layer2.bias", 0.0),
        set_("re:(", 0.2),
        set_("layer1.weight", 0.9),  # disagrees with the first entry
    ],
)
def test_batch_with_one_bad_entry_changes_nothing(rig: Rig, bad: tuple) -> None:
    rig.step()
    before = rig.snapshot()
    groups_before = [dict(g) for g in rig.optimizer.param_groups]
    with pytest.raises(LrctlError):
        rig.controller.submit(req(set_("layer1.*", 0.5), set_("layer2.weight", 0.2), bad))
    rig.step(2)
    assert rig.snapshot() == before
    assert [g["lr"] for g in rig.optimizer.param_groups] == [g["lr"] for g in groups_before]


# -- history --------------------------------------------------------------------------------------


def test_history_records_who_when_where_old_and_new(rig: Rig) -> None:
    rig.step(2)
    request = req(
        times("layer1.*", 0.5),
        reason="warmup done",
        peer="ipv4:127.0.0.1:5555",
        user="alice@host",
        at_step=2,
    )
    pending = rig.apply(request)
    records, more, dropped = rig.controller.history(0, 10)
    assert (more, dropped) == (False, 0)
    (record,) = records
    assert record.change_id == pending.change_id
    assert (record.version, record.step, record.at_step) == (1, 2, 2)
    assert (record.peer, record.user, record.reason) == ("ipv4:127.0.0.1:5555", "alice@host", "warmup done")
    assert record.updates == request.updates
    assert record.requested_at <= record.applied_at
    assert record.num_changes == 2
    changes = rig.controller.rate_changes(record, 10)
    assert [(c.name, c.old_lr, c.new_lr) for c in changes] == [
        ("layer1.weight", 0.01, 0.01 * 0.5),
        ("layer1.bias", 0.1, 0.1 * 0.5),
    ]
    assert len(rig.controller.rate_changes(record, 1)) == 1


def test_local_requests_are_recorded_as_local(rig: Rig) -> None:
    rig.apply(req(set_("layer1.weight", 0.5)))
    (record,), _, _ = rig.controller.history(0, 10)
    assert record.peer == "local" and record.user == "" and record.at_step is None


def test_bounded_history_drops_oldest_and_counts_them() -> None:
    model = seed_model()
    rig = Rig(model, per_parameter_optimizer(model), history_limit=3)
    try:
        for k in range(5):
            rig.apply(req(set_("layer1.weight", 0.1 + k)))
        records, more, dropped = rig.controller.history(0, 100)
        assert [r.version for r in records] == [3, 4, 5]
        assert (more, dropped) == (False, 2)
        records, more, _ = rig.controller.history(3, 1)
        assert [r.version for r in records] == [4] and more
        records, _, _ = rig.controller.history(1, 100)  # asks for some that were dropped
        assert [r.version for r in records] == [3, 4, 5]
        assert rig.controller.history(5, 100)[0] == []
    finally:
        rig.controller.close()


# -- coalesced param groups --------------------------------------------------------------------


def test_attach_keeps_groups_until_a_change_needs_a_regroup() -> None:
    """One group per parameter, all at one rate: attach keeps them as they are (code that
    indexes groups by position, e.g. a torch LR scheduler, keeps working); a change that
    keeps the partition edits them in place; the first change that needs a regroup
    coalesces equal rates, and the optimizer state (momentum buffers) survives it."""
    model = seed_model()
    opt = per_parameter_optimizer(model, lrs={n: 0.1 for n in SEED_NAMES}, momentum=0.9)
    groups = list(opt.param_groups)
    assert len(groups) == 4
    rig = Rig(model, opt)
    try:
        # Attach: the same group objects, in the same order, one parameter each.
        assert len(opt.param_groups) == 4
        assert all(a is b for a, b in zip(opt.param_groups, groups))
        assert [g["param_names"] for g in opt.param_groups] == [[n] for n in SEED_NAMES]
        assert [g["params"][0] for g in opt.param_groups] == [rig.params[n] for n in SEED_NAMES]
        assert all(g["lr"] == 0.1 for g in opt.param_groups)
        rig.check_groups(coalesced=False)
        assert rig.controller.status().num_param_groups == 4
        assert rig.controller.status().num_distinct_lrs == 1
        rig.step(2)  # momentum buffers exist from here on
        buffers = {n: opt.state[p]["momentum_buffer"] for n, p in rig.params.items()}
        assert all(b is not None for b in buffers.values())

        # A change that keeps the partition: the groups are edited in place.
        assert rig.apply(req(set_("layer1.weight", 0.5))).error is None
        assert all(a is b for a, b in zip(opt.param_groups, groups)) and len(opt.param_groups) == 4
        assert [g["lr"] for g in opt.param_groups] == [0.5, 0.1, 0.1, 0.1]
        rig.check_groups(coalesced=False)

        # layer1.bias joins layer1.weight's rate: a merge, so a regroup, which coalesces
        # the untouched layer2 pair (equal rates) too: 4 groups -> 2.
        assert rig.apply(req(set_("layer1.bias", 0.5))).error is None
        assert len(opt.param_groups) == 2
        assert [g["param_names"] for g in opt.param_groups] == [
            ["layer1.weight", "layer1.bias"], ["layer2.weight", "layer2.bias"],
        ]
        assert [g["lr"] for g in opt.param_groups] == [0.5, 0.1]
        assert all(g["momentum"] == 0.9 for g in opt.param_groups)
        rig.check_groups()
        assert rig.controller.status().num_param_groups == 2
        # State is keyed by the parameter: the same buffers, updated in place by the step.
        assert all(opt.state[p]["momentum_buffer"] is buffers[n] for n, p in rig.params.items())
        rig.step()
        assert all(opt.state[p]["momentum_buffer"] is buffers[n] for n, p in rig.params.items())
    finally:
        rig.controller.close()


def test_already_coalesced_groups_are_adopted_as_they_are() -> None:
    model = seed_model()
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(
        [
            {"params": [params["layer1.weight"], params["layer2.weight"]], "lr": 0.01},
            {"params": [params["layer1.bias"], params["layer2.bias"]], "lr": 0.1},
        ],
        lr=10,
    )
    groups = list(opt.param_groups)
    rig = Rig(model, opt)
    try:
        assert all(a is b for a, b in zip(opt.param_groups, groups))
        assert opt.param_groups[0]["param_names"] == ["layer1.weight", "layer2.weight"]
        rig.check_groups()
    finally:
        rig.controller.close()


def test_distinct_rates_get_distinct_groups(rig: Rig) -> None:
    assert len(rig.optimizer.param_groups) == 4
    rig.check_groups()


def test_equal_rates_share_a_group(rig: Rig) -> None:
    rig.apply(req(set_("layer1.*", 0.05)))
    assert len(rig.optimizer.param_groups) == 3
    rig.check_groups()
    g = rig.controller.describe(rig.controller.filter("layer1.*"))
    assert g[0].group == g[1].group
    rig.apply(req(set_("*", 0.05)))
    assert len(rig.optimizer.param_groups) == 1
    rig.check_groups()


def test_change_that_keeps_the_partition_edits_groups_in_place(rig: Rig) -> None:
    rig.apply(req(set_("layer1.*", 0.05)))  # {layer1.*}, {layer2.weight}, {layer2.bias}
    groups_list = rig.optimizer.param_groups
    groups = list(groups_list)
    rig.apply(req(times("layer1.*", 2.0), set_("layer2.bias", 0.5)))
    assert rig.optimizer.param_groups is groups_list
    assert all(a is b for a, b in zip(rig.optimizer.param_groups, groups))
    assert [g["lr"] for g in groups] == [0.1, 0.001, 0.5]
    rig.check_groups()


def test_swapping_two_groups_rates_edits_in_place(rig: Rig) -> None:
    groups = list(rig.optimizer.param_groups)
    rig.apply(req(set_("layer1.weight", 0.1), set_("layer1.bias", 0.01)))
    assert all(a is b for a, b in zip(rig.optimizer.param_groups, groups))
    assert rig.optimizer_lrs()["layer1.weight"] == 0.1 and rig.optimizer_lrs()["layer1.bias"] == 0.01
    rig.check_groups()


def test_split_rebuilds_groups(rig: Rig) -> None:
    rig.apply(req(set_("layer1.*", 0.05)))
    groups_list = rig.optimizer.param_groups
    groups = list(groups_list)
    rig.apply(req(set_("layer1.bias", 0.07)))
    assert len(rig.optimizer.param_groups) == 4
    assert rig.optimizer.param_groups is groups_list  # the list is kept, its groups are new
    assert not any(a is b for a, b in zip(rig.optimizer.param_groups, groups))
    rig.check_groups()


def test_merge_rebuilds_groups(rig: Rig) -> None:
    groups = list(rig.optimizer.param_groups)
    rig.apply(req(set_("layer2.weight", 0.01)))  # joins layer1.weight's rate
    assert len(rig.optimizer.param_groups) == 3
    assert not any(a is b for a, b in zip(rig.optimizer.param_groups, groups))
    rig.check_groups()
    merged = rig.controller.describe(rig.controller.filter("*.weight"))
    assert merged[0].group == merged[1].group


def test_groups_stay_consistent_through_many_changes(rig: Rig) -> None:
    sequence = [
        req(set_("*", 0.1)),
        req(set_("layer1.weight", 0.2)),
        req(times("re:bias$", 3.0)),
        req(set_("layer2.*", 0.2)),
        req(times("*", 0.5)),
        req(set_("layer1.bias", 0.1), set_("layer2.bias", 0.1)),
        req(set_("layer1.weight", 0.0)),
    ]
    for r in sequence:
        pending = rig.apply(r)
        assert pending.error is None
        rig.check_groups()
    assert rig.controller.learning_rates() == {
        "layer1.weight": 0.0,
        "layer1.bias": 0.1,
        "layer2.weight": 0.1,
        "layer2.bias": 0.1,
    }


def test_groups_keep_other_hyperparameters_apart() -> None:
    """Equal rates but different weight decay must not share a group."""
    model = seed_model()
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(
        [
            {"params": [params["layer1.weight"], params["layer2.weight"]], "weight_decay": 0.01},
            {"params": [params["layer1.bias"], params["layer2.bias"]], "weight_decay": 0.0},
        ],
        lr=0.1,
        momentum=0.9,
    )
    rig = Rig(model, opt)
    try:
        assert len(opt.param_groups) == 2
        rig.apply(req(set_("layer1.weight", 0.3)))
        assert len(opt.param_groups) == 3
        decay = {n: g["weight_decay"] for g in opt.param_groups for n in g["param_names"]}
        assert decay == {"layer1.weight": 0.01, "layer2.weight": 0.01, "layer1.bias": 0.0, "layer2.bias": 0.0}
        assert all(g["momentum"] == 0.9 for g in opt.param_groups)
        views = {v.name: v for v in rig.controller.describe(rig.controller.filter(""))}
        assert views["layer1.weight"].hyperparameters["weight_decay"] == 0.01
        assert views["layer1.weight"].hyperparameters["momentum"] == 0.9
    finally:
        rig.controller.close()


def test_rates_read_back_exactly_as_set(rig: Rig) -> None:
    values = {"layer1.weight": 1 / 3, "layer1.bias": 0.1 + 0.2, "layer2.weight": 1e-12, "layer2.bias": 0.0}
    rig.apply(req(*(set_(n, v) for n, v in values.items())))
    assert rig.controller.learning_rates() == values
    assert rig.optimizer_lrs() == values
    rows, _, _ = rig.controller.read([])
    assert {r.name: r.lr for r in rows} == values
    assert {r.name: r.base for r in rows} == values


def test_seed_schedule_reproduces_the_expected_table() -> None:
    """The seed example's 10-step inverse-time schedule, driven through the controller."""
    model = SeedModel()
    rig = Rig(model, per_parameter_optimizer(model))
    probe = InStepProbe(rig)
    try:
        for i in range(10):
            rig.controller.submit(req(*(set_(n, lr / (i + 1)) for n, lr in SEED_LRS.items())))
            train_step(model, rig.optimizer, torch.zeros(1, 10))
        for i, seen in enumerate(probe.seen):
            assert seen == {n: lr / (i + 1) for n, lr in SEED_LRS.items()}
        assert repr(probe.seen[2]["layer1.weight"]) == "0.0033333333333333335"
        assert repr(probe.seen[6]["layer2.weight"]) == "0.00014285714285714287"
        assert rig.controller.version == 10
    finally:
        rig.controller.close()


def test_history_is_bounded_in_bytes_too() -> None:
    from array import array

    from lrctl.server.history import History, Record, record_bytes
    from lrctl.server.planner import plan_change
    from lrctl.server.rates import RateState, ScheduleBook

    def record(version: int, n: int) -> Record:
        """A record of a change that sets n names from 1.0 to 2.0."""
        state = RateState([1.0] * n, array("q", [0] * n), {})
        plan = plan_change(
            {i: ((Mode.ABSOLUTE, 2.0), None, None) for i in range(n)}, state, ScheduleBook(),
            version, [f"p{i}" for i in range(n)], lambda indices, rates: None, str,
        )
        assert (len(plan), list(plan.old_lr), list(plan.new_lr)) == (n, [1.0] * n, [2.0] * n)
        r = Record(
            change_id=version, version=version, step=version, applied_at=0.0, requested_at=0.0,
            updates=(), schedules=(), plan=plan, peer="local", user="", reason="", at_step=None,
        )
        assert r.num_changes == n
        return r

    four = record_bytes(record(1, 4))
    history = History(limit=100, max_bytes=2 * four + 10)
    for v in range(1, 5):
        history.append(record(v, 4))
    # Four records of `four` bytes over a bound of two: the oldest go.
    assert [r.version for r in history.after(0)] == [3, 4]
    assert history.dropped == 2 and history.bytes <= 2 * four + 10
    history.append(record(5, 500))  # larger than the bound alone: still kept, alone
    assert [r.version for r in history.after(0)] == [5]
    assert history.dropped == 4
    assert [r.version for r in history.after(4)] == [5]
    # The request's updates, kept as sent, weigh too: 2 names but 9 updates each.
    many = tuple(Update(f"layer{k}.weight", 0.5) for k in range(9))
    history.append(dataclasses.replace(record(6, 2), updates=many))
    history.append(dataclasses.replace(record(7, 2), updates=many))
    assert [r.version for r in history.after(0)] == [7]


def test_the_queue_of_changes_is_bounded(rig: Rig) -> None:
    from lrctl.server.controller import MAX_PENDING

    for k in range(MAX_PENDING):  # from many connections: each has its own, smaller, quota
        request = dataclasses.replace(req(set_("layer1.weight", 0.5), at_step=10**5 + k), peer=f"peer{k % 20}")
        rig.controller.submit(request)
    with pytest.raises(ResourceExhaustedError, match=f"{MAX_PENDING} changes already wait.*lrctl pending --cancel"):
        rig.controller.submit(dataclasses.replace(req(set_("layer1.weight", 0.5)), peer="another"))
    rig.step()  # training goes on
    assert rig.controller.pending_count == MAX_PENDING


def test_a_change_whose_deadline_passed_is_dropped_at_its_step_not_applied(rig: Rig) -> None:
    """A paused or overloaded worker (SIGSTOP, a long evaluation) may reach the step
    boundary after a waiting caller was told DEADLINE_EXCEEDED: the hook drops such a
    change instead of applying it; one whose deadline has not passed applies."""
    late, _ = rig.controller.submit(ChangeRequest((Update("layer1.bias", 0.5),)),
                                    deadline=time.monotonic() - 0.01)
    on_time, _ = rig.controller.submit(ChangeRequest((Update("layer2.bias", 0.25),)),
                                       deadline=time.monotonic() + 60)
    rig.step()
    assert late.finished.is_set() and isinstance(late.error, DeadlineExceededError)
    assert "NOT applied" in str(late.error) and "step 0" in str(late.error)
    assert on_time.outcome is not None and on_time.outcome.step == 0
    rates = rig.controller.learning_rates()
    assert rates["layer1.bias"] == SEED_LRS["layer1.bias"] and rates["layer2.bias"] == 0.25
    records, _, _ = rig.controller.history(0, 10)
    # The dropped one is recorded as failed (it changed nothing, version 0 in force).
    assert [(r.change_id, r.version, r.status) for r in records] == [
        (late.change_id, 0, "DEADLINE_EXCEEDED"), (on_time.change_id, 1, "")]
    assert records[0].plan is None and "NOT applied" in records[0].error
