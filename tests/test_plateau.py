"""ReduceLROnPlateau adopted as lrctl's schedule: parity with torch, history, resume.

The reference is torch's own ReduceLROnPlateau stepping a plain loop's optimizer; the
lrctl side adopts an identical scheduler and feeds it the same metric sequence, either
through ``LRControl.report`` (``plateau_metric``) or by calling ``scheduler.step``
itself. Rates are compared per name and step with ==, and the weights bit for bit.
"""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as lrs

from lrctl.server import attach

from conftest import group_lrs

torch.set_num_threads(1)

X = torch.linspace(-1.0, 1.0, 8 * 4).reshape(8, 4)
STEPS_PER_EPOCH = 3
# Improves, stalls (patience 1), a NaN (a bad epoch, as in torch), cooldown, min_lr reached.
METRICS = [1.0, 0.9, 0.95, 0.95, 0.7, 0.71, 0.72, 0.73, math.nan, 0.74, 0.75, 0.76, 0.77,
           0.78, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6]


def build(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, lrs.ReduceLROnPlateau]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    opt = torch.optim.SGD([
        {"params": list(model[0].parameters()), "lr": 0.1},
        {"params": list(model[1].parameters()), "lr": 0.03},
    ], lr=0.1, momentum=0.9)
    plateau = lrs.ReduceLROnPlateau(opt, factor=0.5, patience=1, cooldown=1, min_lr=[0.01, 0.001])
    return model, opt, plateau


def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(X).square().mean().backward()
    opt.step()


def metric(epoch: int, as_tensor: bool) -> Any:
    value = METRICS[epoch]
    return torch.tensor(value, dtype=torch.float64) if as_tensor and epoch % 2 else value


def reference(epochs: int = len(METRICS)) -> tuple[list[dict[str, float]], nn.Module]:
    """Per optimizer step, the rate of each name torch's own plateau gave that step."""
    model, opt, plateau = build()
    rates = []
    for epoch in range(epochs):
        for _ in range(STEPS_PER_EPOCH):
            step(model, opt)
            rates.append(group_lrs(model, opt))
        plateau.step(metric(epoch, as_tensor=True))
    return rates, model


def run_lrctl(ctl: Any, model: nn.Module, opt: torch.optim.Optimizer, plateau: Any, feed: str,
              epochs: range) -> list[dict[str, float]]:
    rates = []
    for epoch in epochs:
        for _ in range(STEPS_PER_EPOCH):
            step(model, opt)
            rates.append(group_lrs(model, opt))
        value = metric(epoch, as_tensor=True)
        if feed == "report":
            ctl.report(val_loss=value, step=ctl.step - 1)
        else:
            ctl.report(val_loss=value, step=ctl.step - 1)  # reported, but not what feeds it
            plateau.step(value)
    return rates


@pytest.mark.parametrize("feed", ["report", "scheduler.step"])
def test_plateau_parity_with_torch(feed: str) -> None:
    want, want_model = reference()
    model, opt, plateau = build()
    metric_name = "val_loss" if feed == "report" else None
    with attach(model, opt, scheduler=plateau, plateau_metric=metric_name, serve=False) as ctl:
        got = run_lrctl(ctl, model, opt, plateau, feed, range(len(METRICS)))
        records = [r for r in ctl.controller.history(0, 1000)[0] if r.role == "schedule"]
    assert got == want
    for a, b in zip(model.parameters(), want_model.parameters()):
        assert torch.equal(a, b)
    # Each reduction is one change by the schedule, at the first step that used it.
    moves = [k for k in range(1, len(want)) if want[k] != want[k - 1]]
    assert [r.step for r in records] == moves and len(moves) >= 3
    for r in records:
        changes = {c.name: c for c in ctl.controller.rate_changes(r, 100)}
        moved = [n for n in want[r.step] if want[r.step][n] != want[r.step - 1][n]]
        assert sorted(changes) == sorted(moved)  # a group already at its min_lr did not move
        for name, c in changes.items():
            assert (c.old_lr, c.new_lr) == (want[r.step - 1][name], want[r.step][name])
            assert c.old_base == c.new_base
        assert r.user == "schedule" and "ReduceLROnPlateau" in r.reason


def test_resume_continues_the_plateau_state() -> None:
    want, want_model = reference()
    model, opt, plateau = build()
    half = 7  # mid-patience and mid-cooldown: counters that a fresh scheduler lacks
    with attach(model, opt, scheduler=plateau, plateau_metric="val_loss", serve=False) as ctl:
        first = run_lrctl(ctl, model, opt, plateau, "report", range(half))
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
        assert plateau.num_bad_epochs or plateau.cooldown_counter
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model2, opt2, plateau2 = build(seed=1)  # a fresh job: other weights, a fresh scheduler
    model2.load_state_dict(saved["model"])
    with attach(model2, opt2, scheduler=plateau2, plateau_metric="val_loss", serve=False) as ctl2:
        opt2.load_state_dict(saved["opt"])  # the scheduler's own state is not loaded by hand
        assert (plateau2.best, plateau2.num_bad_epochs, plateau2.cooldown_counter, plateau2.last_epoch) == (
            plateau.best, plateau.num_bad_epochs, plateau.cooldown_counter, plateau.last_epoch)
        assert ctl2.step == half * STEPS_PER_EPOCH
        second = run_lrctl(ctl2, model2, opt2, plateau2, "report", range(half, len(METRICS)))
        schedule_records = [r for r in ctl2.controller.history(0, 1000)[0] if r.role == "schedule"]
    assert first + second == want
    for a, b in zip(model2.parameters(), want_model.parameters()):
        assert torch.equal(a, b)
    # The history tail came along; the resumed run added the later reductions only.
    assert [r.step for r in schedule_records] == [k for k in range(1, len(want)) if want[k] != want[k - 1]]


def test_remote_base_change_scales_with_the_plateau() -> None:
    model, opt, plateau = build()
    with attach(model, opt, scheduler=plateau, plateau_metric="val_loss", serve=False) as ctl:
        ctl.controller.rebase({0: 0.2})  # "0.weight" gets twice its group's base
        for value in (1.0, 1.0, 1.0):
            step(model, opt)
            ctl.report(val_loss=value)
        step(model, opt)
        rates = group_lrs(model, opt)
    assert rates["0.weight"] == 0.2 * (0.05 / 0.1)
    assert rates["0.bias"] == 0.05


def test_bad_plateau_options_are_refused_untouched() -> None:
    model, opt, plateau = build()
    with pytest.raises(ValueError, match="plateau_metric 'val_loss'.*StepLR"):
        attach(model, opt, scheduler=lrs.StepLR(opt, step_size=2), plateau_metric="val_loss", serve=False)
    with pytest.raises(ValueError, match="metric name 'val loss'"):
        attach(model, opt, scheduler=plateau, plateau_metric="val loss", serve=False)
    assert plateau.optimizer is opt and not opt._optimizer_step_pre_hooks
    # A bad reported value refuses the report and does not step the plateau.
    with attach(model, opt, scheduler=plateau, plateau_metric="val_loss", serve=False) as ctl:
        with pytest.raises(ValueError, match="val_loss"):
            ctl.report(val_loss="low")
        assert plateau.last_epoch == 0
        step(model, opt)  # training goes on
        ctl.report(val_loss=1.0)
        assert plateau.last_epoch == 1


def test_reductions_in_cli_history_export_and_replay(tmp_path: Any) -> None:
    import json
    import subprocess
    import sys

    from lrctl.common.replay_file import read_replay

    model, opt, plateau = build()
    audit = tmp_path / "audit.jsonl"
    with attach(model, opt, scheduler=plateau, plateau_metric="val_loss", address="127.0.0.1:0",
                audit_log=str(audit)) as ctl:
        for value in (1.0, 1.0, 1.0):
            step(model, opt)
            ctl.report(val_loss=value)
        step(model, opt)  # the reduction takes effect here, at step 3
        cli = [sys.executable, "-m", "lrctl.client.cli", "--address", ctl.address]
        shown = subprocess.run([*cli, "history", "--json"], capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        export = tmp_path / "export.jsonl"
        done = subprocess.run([*cli, "history", "--export", str(export)], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    assert '"schedule"' in shown.stdout and "ReduceLROnPlateau" in shown.stdout
    exported = [json.loads(line) for line in export.read_text().splitlines()]
    assert [(r["step"], r["role"], r["user"]) for r in exported] == [(3, "schedule", "schedule")]
    assert {c["name"]: c["lr"] for c in exported[0]["changes"]}["0.weight"] == [0.1, 0.05]
    # Replay leaves them out: the replayed run's plateau makes them itself.
    assert read_replay(str(export)) == [] and read_replay(str(audit)) == []
