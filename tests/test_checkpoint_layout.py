"""Optimizer checkpoints across lrctl's regrouping (lrctl.server.checkpoint).

lrctl's regroup is simulated here by hand: `optimizer.param_groups[:]` is rebuilt with a
different partition (one original group split in two, two merged into one, members
reordered), each group with "param_names", after a few steps so that momentum buffers
and Adam moments exist. Checkpoints go through torch.save/torch.load, as real ones do
(a dict loaded in the process that made it would share state tensors with it).
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch import nn

from lrctl.server.checkpoint import Layout, NameReport, remap_by_name, to_layout

torch.set_num_threads(1)

# name -> (class, constructor kwargs, whether group lrs are 0-dim tensors)
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any], bool]] = {
    "sgd_momentum": (torch.optim.SGD, {"momentum": 0.9}, False),
    "adam": (torch.optim.Adam, {}, False),
    "adamw": (torch.optim.AdamW, {}, False),
    "adamw_foreach": (torch.optim.AdamW, {"foreach": True}, False),
    "adamw_fused_false": (torch.optim.AdamW, {"fused": False}, False),
    "adam_tensor_lr": (torch.optim.Adam, {"foreach": False}, True),
}

# The user's grouping: three groups; the last two share hyperparameters (lrctl may
# merge them once their rates agree).
ORIGINAL = (
    (("0.weight", "0.bias"), 0.05, 1e-2),
    (("2.weight", "2.bias"), 0.02, 0.0),
    (("4.weight", "4.bias"), 0.03, 0.0),
)  # (names, lr, weight_decay)

# lrctl's grouping after a change: group 0 split in two (same new rate), groups 1 and 2
# merged (one new rate) and reordered. Index of the ORIGINAL group each takes its
# hyperparameters from, member names, rate.
REGROUPED = (
    (0, ("0.bias",), 0.04),
    (1, ("4.weight", "2.weight", "2.bias", "4.bias"), 0.025),
    (0, ("0.weight",), 0.04),
)

# Another grouping: one group per parameter, rates of their own.
PER_PARAM = tuple((g, (n,), 0.01 * (k + 1)) for k, (g, n) in enumerate(
    (g, n) for g, (names, _, _) in enumerate(ORIGINAL) for n in names
))


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))


def names_of(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def build(model: nn.Module, kind: str, *, named: bool = False) -> torch.optim.Optimizer:
    """A fresh optimizer in the user's original grouping (optionally with param_names)."""
    cls, kwargs, tensor_lr = OPTIMIZERS[kind]
    params = dict(model.named_parameters())
    groups = []
    for names, lr, wd in ORIGINAL:
        members = [(n, params[n]) for n in names if n in params]
        groups.append({
            "params": members if named else [p for _, p in members],
            "lr": torch.tensor(lr) if tensor_lr else lr,
            "weight_decay": wd,
        })
    return cls(groups, **kwargs)


def regroup(optimizer: torch.optim.Optimizer, model: nn.Module, templates: list[dict[str, Any]],
            partition: tuple) -> None:
    """What lrctl's coalescing strategy does: rebuild param_groups in place."""
    params = dict(model.named_parameters())
    groups = []
    for g, names, lr in partition:
        group = {k: v for k, v in templates[g].items() if k not in ("params", "param_names")}
        like = templates[g]["lr"]
        group["lr"] = torch.tensor(lr, dtype=like.dtype) if isinstance(like, torch.Tensor) else lr
        group["params"] = [params[n] for n in names]
        group["param_names"] = list(names)
        groups.append(group)
    optimizer.param_groups[:] = groups


def templates_of(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [dict(g) for g in optimizer.param_groups]


def rates_of(partition: tuple) -> dict[str, float]:
    return {n: lr for _, names, lr in partition for n in names}


DATA = torch.Generator().manual_seed(1)
X = torch.randn(64, 4, generator=DATA)
Y = torch.randn(64, 2, generator=DATA)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for s in range(start, start + steps):
        i = (s * 8) % 64
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(X[i:i + 8]), Y[i:i + 8]).backward()
        optimizer.step()


def roundtrip(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def copy_model(model: nn.Module, seed: int = 99) -> nn.Module:
    fresh = mlp(seed)
    fresh.load_state_dict(roundtrip(model.state_dict()))
    return fresh


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n


def as_rates(kind: str, rates: list[float]) -> list[float]:
    """`rates` as the optimizer stores them (0-dim float32 tensors for a tensor lr)."""
    return [float(torch.tensor(r)) for r in rates] if OPTIMIZERS[kind][2] else rates


def group_rates(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in optimizer.param_groups]


def hypers(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Every group entry but params, tensors as floats (for comparisons)."""
    return [
        {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in g.items() if k != "params"}
        for g in optimizer.param_groups
    ]


# ---------------------------------------------------------------------------- to_layout


@pytest.mark.parametrize("named", [False, True], ids=["plain_groups", "named_groups"])
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_to_layout_loads_into_fresh_original_optimizer(kind: str, named: bool) -> None:
    model = mlp()
    opt = build(model, kind, named=named)
    names = names_of(model)
    train(model, opt, 3)
    layout = Layout.of(opt, names)
    regroup(opt, model, templates_of(opt), REGROUPED)
    train(model, opt, 2, start=3)
    rates = rates_of(REGROUPED)

    live = opt.state_dict()
    converted = to_layout(live, opt, layout, names, rates.__getitem__)

    # the original layout, torch's numbering, the rates in force, shared state
    assert [g["param_names"] for g in converted["param_groups"]] == [list(n) for n, _, _ in ORIGINAL]
    assert [g["params"] for g in converted["param_groups"]] == [[0, 1], [2, 3], [4, 5]]
    assert [float(g["lr"]) for g in converted["param_groups"]] == as_rates(kind, [0.04, 0.025, 0.025])
    assert [g["weight_decay"] for g in converted["param_groups"]] == [wd for _, _, wd in ORIGINAL]
    for g in converted["param_groups"]:
        assert isinstance(g["lr"], torch.Tensor) == OPTIMIZERS[kind][2]
        if isinstance(g["lr"], torch.Tensor):
            assert g["lr"].dtype == torch.float32 and g["lr"].dim() == 0
    params = dict(model.named_parameters())
    by_name = [n for n, _, _ in ORIGINAL for n in n]
    for i, n in enumerate(by_name):
        for key, value in opt.state[params[n]].items():
            assert converted["state"][i][key] is value  # shared, not copied

    # plain torch loads it into a fresh optimizer of the original grouping
    fresh_model = copy_model(model)
    fresh = build(fresh_model, kind)
    fresh.load_state_dict(roundtrip(converted))
    assert group_rates(fresh) == as_rates(kind, [0.04, 0.025, 0.025])

    train(model, opt, 6, start=5)
    train(fresh_model, fresh, 6, start=5)
    assert_same_params(model, fresh_model)


def test_to_layout_through_torch_hooks() -> None:
    """A state_dict post hook's return value replaces the dict state_dict() returns."""
    model = mlp()
    opt = build(model, "adam")
    names = names_of(model)
    train(model, opt, 2)
    layout = Layout.of(opt, names)
    regroup(opt, model, templates_of(opt), REGROUPED)
    rates = rates_of(REGROUPED)
    assert len(opt.state_dict()["param_groups"]) == 3
    assert [len(g["params"]) for g in opt.state_dict()["param_groups"]] == [1, 4, 1]
    handle = opt.register_state_dict_post_hook(
        lambda o, sd: to_layout(sd, o, layout, names, rates.__getitem__)
    )
    saved = opt.state_dict()
    handle.remove()
    assert [len(g["params"]) for g in saved["param_groups"]] == [2, 2, 2]
    fresh_model = copy_model(model)
    fresh = build(fresh_model, "adam")
    fresh.load_state_dict(roundtrip(saved))
    train(model, opt, 4, start=2)
    train(fresh_model, fresh, 4, start=2)
    assert_same_params(model, fresh_model)


def test_to_layout_skips_names_no_longer_held() -> None:
    model = mlp()
    opt = build(model, "sgd_momentum")
    names = names_of(model)
    train(model, opt, 2)
    layout = Layout.of(opt, names)
    # lrctl no longer holds 2.bias and both of layer 0's parameters
    partition = ((1, ("4.weight", "2.weight", "4.bias"), 0.02),)
    regroup(opt, model, templates_of(opt), partition)
    # torch's own state_dict() fails on state of a parameter no group holds (KeyError):
    # whoever drops a parameter from the groups must drop its state too.
    params = dict(model.named_parameters())
    for n in ("0.weight", "0.bias", "2.bias"):
        del opt.state[params[n]]
    converted = to_layout(opt.state_dict(), opt, layout, names, rates_of(partition).__getitem__)
    groups = converted["param_groups"]
    assert [g["param_names"] for g in groups] == [[], ["2.weight"], ["4.weight", "4.bias"]]
    assert [g["params"] for g in groups] == [[], [0], [1, 2]]
    assert groups[0]["lr"] == 0.05  # empty: keeps its original rate
    assert [groups[1]["lr"], groups[2]["lr"]] == [0.02, 0.02]
    assert sorted(converted["state"]) == [0, 1, 2]


def test_layout_is_frozen_against_in_place_rate_edits() -> None:
    model = mlp()
    opt = build(model, "adam_tensor_lr")
    layout = Layout.of(opt, names_of(model))
    opt.param_groups[0]["lr"].fill_(7.0)  # lrctl edits tensor rates in place
    assert float(layout.groups[0].hyperparameters["lr"]) == float(torch.tensor(0.05))
    assert layout.names == tuple(n for names, _, _ in ORIGINAL for n in names)
    with pytest.raises(TypeError):
        layout.groups[0].hyperparameters["lr"] = 1.0  # type: ignore[index]


def test_layout_requires_names() -> None:
    model = mlp()
    opt = build(model, "sgd_momentum")
    with pytest.raises(ValueError, match="no name"):
        Layout.of(opt, {})


# ------------------------------------------------------------------------ remap_by_name


def _continue_both(model: nn.Module, opt: torch.optim.Optimizer, resumed_model: nn.Module,
                   resumed: torch.optim.Optimizer, start: int) -> None:
    train(model, opt, 6, start=start)
    train(resumed_model, resumed, 6, start=start)
    assert_same_params(model, resumed_model)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_remap_original_checkpoint_into_regrouped_optimizer(kind: str) -> None:
    """Saved from the user's grouping (with names), loaded where lrctl regrouped."""
    model = mlp()
    opt = build(model, kind, named=True)
    train(model, opt, 3)
    checkpoint = roundtrip({"model": model.state_dict(), "optim": opt.state_dict()})
    # uninterrupted run: lrctl regroups right after the save
    regroup(opt, model, templates_of(opt), REGROUPED)

    resumed_model = mlp(seed=5)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = build(resumed_model, kind)
    names = names_of(resumed_model)
    regroup(resumed, resumed_model, templates_of(resumed), REGROUPED)  # lrctl's rates
    before_rates, before = group_rates(resumed), hypers(resumed)

    remapped, report = remap_by_name(checkpoint["optim"], resumed, names)
    assert report == NameReport() and report.complete
    resumed.load_state_dict(remapped)
    assert group_rates(resumed) == before_rates
    assert hypers(resumed) == before
    _continue_both(model, opt, resumed_model, resumed, start=3)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_remap_regrouped_checkpoint_into_other_grouping(kind: str) -> None:
    """Saved straight from lrctl's grouping (no to_layout), loaded into another one."""
    model = mlp()
    opt = build(model, kind)
    train(model, opt, 2)
    regroup(opt, model, templates_of(opt), REGROUPED)
    train(model, opt, 2, start=2)
    checkpoint = roundtrip({"model": model.state_dict(), "optim": opt.state_dict()})
    regroup(opt, model, templates_of(build(mlp(), kind)), PER_PARAM)

    resumed_model = copy_model(model)
    resumed = build(resumed_model, kind)
    regroup(resumed, resumed_model, templates_of(resumed), PER_PARAM)
    before_rates, before = group_rates(resumed), hypers(resumed)
    remapped, report = remap_by_name(checkpoint["optim"], resumed, names_of(resumed_model))
    assert report.complete
    assert [len(g["params"]) for g in remapped["param_groups"]] == [1] * 6
    resumed.load_state_dict(remapped)
    assert group_rates(resumed) == before_rates
    assert hypers(resumed) == before
    _continue_both(model, opt, resumed_model, resumed, start=4)


def test_remap_through_torch_load_pre_hook() -> None:
    """The pre hook's return value is what load_state_dict loads."""
    model = mlp()
    opt = build(model, "adamw_foreach", named=True)
    train(model, opt, 3)
    checkpoint = roundtrip(opt.state_dict())
    regroup(opt, model, templates_of(opt), REGROUPED)

    resumed_model = copy_model(model)
    resumed = build(resumed_model, "adamw_foreach")
    regroup(resumed, resumed_model, templates_of(resumed), REGROUPED)
    names = names_of(resumed_model)
    with pytest.raises(ValueError, match="size of optimizer's group"):
        resumed.load_state_dict(checkpoint)  # plain torch cannot
    reports = []

    def pre_hook(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
        remapped, report = remap_by_name(state_dict, optimizer, names)
        reports.append(report)
        return remapped

    resumed.register_load_state_dict_pre_hook(pre_hook)
    resumed.load_state_dict(checkpoint)
    assert reports == [NameReport()]
    assert [g["param_names"] for g in resumed.param_groups] == [list(n) for _, n, _ in REGROUPED]
    _continue_both(model, opt, resumed_model, resumed, start=3)


class Grown(nn.Module):
    """The MLP after an edit: the head lost its bias, a learned output scale was added."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2, bias=False))
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.scale


def test_remap_with_gained_and_lost_parameters() -> None:
    old = mlp()
    opt = build(old, "adam", named=True)
    train(old, opt, 3)
    saved = roundtrip(opt.state_dict())

    new = Grown()
    with torch.no_grad():
        for n, p in old.named_parameters():
            if n != "4.bias":
                dict(new.body.named_parameters())[n].copy_(p)
    names = {id(p): n.removeprefix("body.") for n, p in new.named_parameters()}
    live = torch.optim.Adam([
        {"params": [new.body[0].weight, new.body[0].bias], "lr": 0.05},
        {"params": [new.body[2].weight, new.body[2].bias, new.body[4].weight, new.scale], "lr": 0.02},
    ])
    remapped, report = remap_by_name(saved, live, names)
    assert report.missing_in_checkpoint == ("scale",)
    assert report.unknown_in_checkpoint == ("4.bias",)
    assert "scale" in report.describe() and "4.bias" in report.describe()
    live.load_state_dict(remapped)
    assert group_rates(live) == [0.05, 0.02]
    assert new.scale not in live.state or not live.state[new.scale]
    old_params = dict(old.named_parameters())
    for n, p in new.body.named_parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(live.state[p][key], opt.state[old_params[n]][key]), (n, key)
    train(new, live, 2)  # trains on: the new parameter gets fresh state
    assert float(live.state[new.scale]["step"]) == 2.0
    assert float(live.state[new.body[0].weight]["step"]) == 5.0


def test_remap_without_names_matching_counts_is_unchanged() -> None:
    model = mlp()
    opt = build(model, "sgd_momentum")
    train(model, opt, 2)
    saved = roundtrip(opt.state_dict())
    assert all("param_names" not in g for g in saved["param_groups"])
    fresh = build(copy_model(model), "sgd_momentum")
    result, report = remap_by_name(saved, fresh, names_of(model))
    assert result is saved
    assert report == NameReport() and report.complete


def test_remap_without_names_mismatched_counts_raises() -> None:
    model = mlp()
    opt = build(model, "sgd_momentum")
    train(model, opt, 2)
    saved = roundtrip(opt.state_dict())
    regroup(opt, model, templates_of(opt), REGROUPED)
    with pytest.raises(ValueError) as err:
        remap_by_name(saved, opt, names_of(model))
    message = str(err.value)
    assert "3 parameter group(s) of sizes [2, 2, 2]" in message
    assert "3 of sizes [1, 4, 1]" in message
    assert "no parameter names" in message
    # different group counts
    regroup(opt, model, templates_of(build(mlp(), "sgd_momentum")), PER_PARAM)
    with pytest.raises(ValueError, match=r"3 parameter group.*6 of sizes"):
        remap_by_name(saved, opt, names_of(model))


def test_name_report_describe() -> None:
    assert "every parameter" in NameReport().describe()
    report = NameReport(tuple(f"m{i}" for i in range(7)), ("gone",))
    line = report.describe()
    assert "\n" not in line
    assert "7 parameters not in the checkpoint" in line
    assert "m0, m1, m2, m3, m4 and 2 more" in line and "m5" not in line
    assert "1 checkpoint parameter no longer in the model was dropped: gone" in line
