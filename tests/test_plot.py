"""`lrctl plot`: a valid PNG whose data (--csv) are the rates a real worker had at each step.

The training loop runs in the test thread and records, after every optimizer.step(), the
rate each parameter's group actually had. Changes are queued with --at-step semantics
(wait=False) so they land at known steps: a schedule, a base change, a pin and its
removal, a scale. The CLI runs as a subprocess, against the live worker and against
its audit log.
"""

from __future__ import annotations

import csv
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LRCTL, SEED_NAMES, assert_error, group_lrs, per_parameter_optimizer, seed_model, train_step
from lrctl.client.client import LRClient
from lrctl.common.schedules import Warmup
from lrctl.server import attach

STEPS = 45
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk of a PNG (failing if it is not one)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, data[:16]
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def lr_series(path: Path) -> dict[str, dict[int, float]]:
    """label -> {step: value} of the rate rows of a --csv file."""
    out: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if row["kind"] == "lr":
            out.setdefault(row["series"], {})[int(row["step"])] = float(row["value"])
    return out


def plot(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*LRCTL, "plot", *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A worker that trained STEPS steps with changes at known steps, still serving.

    Yields (address, audit log path, rates[step][name], losses, tmp dir)."""
    tmp = tmp_path_factory.mktemp("plot")
    audit = tmp / "audit.jsonl"
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    ctl = attach(model, optimizer, address="127.0.0.1:0", audit_log=str(audit))
    try:
        with LRClient(ctl.address, timeout=30) as client:
            schedule = Warmup(warmup_steps=10, decay="cosine", total_steps=40)
            client.set_schedules({"layer1.*": schedule}, at_step=5, wait=False)
            client.set_learning_rates({"layer2.weight": 0.05}, at_step=12, wait=False)
            client.pin_learning_rates({"layer1.bias": 0.003}, at_step=20, wait=False)
            client.scale_learning_rates("layer2.*", 0.5, at_step=25, wait=False)
            client.unpin("layer1.bias", at_step=30, wait=False)
        rates, losses = [], []
        for step in range(STEPS):
            assert ctl.controller.step == step
            train_step(model, optimizer)
            ctl.report(loss=1.0 / (step + 1), step=step)
            rates.append(group_lrs(model, optimizer))  # the rates this step used
            losses.append({"step": step, "metrics": {"loss": 1.0 / (step + 1), "acc": 0.5}})
        metrics = tmp / "metrics.ndjson"
        metrics.write_text("".join(json.dumps(m) + "\n" for m in losses))
        yield ctl.address, audit, rates, metrics, tmp
    finally:
        ctl.close(grace=0.5)


def _check_against(series: dict[str, dict[int, float]], rates: list[dict[str, float]], last: int) -> None:
    for name in SEED_NAMES:
        got = series[name]
        assert sorted(got) == list(range(last + 1)), f"{name}: steps {sorted(got)[:5]}..."
        for step, value in got.items():
            assert value == rates[step][name], (name, step, value, rates[step][name])


def test_plot_from_worker_draws_the_rates_it_had(run):
    address, _, rates, metrics, tmp = run
    out, data = tmp / "worker.png", tmp / "worker.csv"
    selects = [a for n in SEED_NAMES for a in ("--select", n)]
    proc = plot(str(out), "--address", address, *selects, "--csv", str(data), "--metrics", str(metrics))
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "5 change step(s)" in proc.stdout
    width, height = png_size(out)
    assert (width, height) == (1200, 680)  # rates and the loss panel
    series = lr_series(data)
    assert set(series) == set(SEED_NAMES)
    _check_against(series, rates, STEPS - 1)
    # The run really moved: warmup from 0, the pin, the scale.
    assert series["layer1.weight"][4] == 0.01 and series["layer1.weight"][5] == 0.005  # warmup 5/10
    assert series["layer1.bias"][20] == 0.003 and series["layer1.bias"][30] != 0.003
    with open(data, newline="") as f:
        loss = [r for r in csv.DictReader(f) if r["kind"] == "loss"]
    assert [float(r["value"]) for r in loss] == [1.0 / (s + 1) for s in range(STEPS)]


def test_plot_from_worker_draws_the_loss_it_reported(run):
    """Without --metrics, the loss is what the job passed to report(), from the worker's ring."""
    address, _, _, _, tmp = run
    out, data = tmp / "reported.png", tmp / "reported.csv"
    proc = plot(str(out), "--address", address, "--csv", str(data))
    assert proc.returncode == 0, proc.stderr
    assert png_size(out) == (1200, 680)  # the loss panel is there
    with open(data, newline="") as f:
        loss = [(int(r["step"]), float(r["value"])) for r in csv.DictReader(f) if r["kind"] == "loss"]
    # The newest step's event is still open to reports (the job has not moved past it).
    assert loss == [(s, 1.0 / (s + 1)) for s in range(STEPS - 1)]


def test_plot_from_audit_file_draws_the_same(run):
    _, audit, rates, _, tmp = run
    out, data = tmp / "file.png", tmp / "file.csv"
    selects = [a for n in SEED_NAMES for a in ("--select", n)]
    proc = plot(str(out), "--file", str(audit), *selects, "--csv", str(data), "--to-step", str(STEPS - 1))
    assert proc.returncode == 0, proc.stderr
    assert png_size(out) == (1200, 420)  # rates only
    _check_against(lr_series(data), rates, STEPS - 1)


def test_plot_groups_names_and_selectors(run):
    address, _, rates, _, tmp = run
    data = tmp / "groups.csv"
    # layer1.* has one schedule but a pin on the bias for a while: two distinct series.
    proc = plot(str(tmp / "g.png"), "--address", address, "--select", "layer1.*", "--select",
                "re:^layer2\\.", "--csv", str(data))
    assert proc.returncode == 0, proc.stderr
    series = lr_series(data)
    assert set(series) == {"layer1.*: layer1.weight", "layer1.*: layer1.bias", "re:^layer2\\.: layer2.weight",
                           "re:^layer2\\.: layer2.bias"}
    assert "'layer1.*' matches names with 2 different rate series" in proc.stderr
    # --top: fewer lines, and a note saying so.
    proc = plot(str(tmp / "t.png"), "--address", address, "--top", "2", "--csv", str(data))
    assert proc.returncode == 0, proc.stderr
    assert len(lr_series(data)) == 2
    assert "showing 2 of 4 lines" in proc.stderr


def test_plot_bad_inputs(run, tmp_path):
    address, audit, _, _, _ = run
    out = str(tmp_path / "x.png")
    assert_error(plot(out, "--address", address, "--select", "nope.*"), 2, "'nope.*'", "matches no parameter")
    assert_error(plot(out, "--file", str(tmp_path / "missing.jsonl")), 2, "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_error(plot(out, "--file", str(empty)), 2, "no applied change", "empty.jsonl")
    bad = tmp_path / "bad.ndjson"
    bad.write_text('{"step": 1, "metrics": {"loss": 1.0}}\nnot json\n')
    assert_error(plot(out, "--file", str(audit), "--metrics", str(bad)), 2, "line 2", "bad.ndjson")
    assert_error(plot(out, "--file", str(audit), "--select", "re:("), 2, "re:(")
    assert_error(plot(out, "--address", "127.0.0.1:1", "--timeout", "2"), 3)
    assert not Path(out).exists()


def test_plot_without_matplotlib_says_what_to_install(run, tmp_path):
    _, audit, _, _, _ = run
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named matplotlib', name='matplotlib')\n")
    import os

    env = {**os.environ, "PYTHONPATH": str(shim.parent)}
    proc = plot(str(tmp_path / "x.png"), "--file", str(audit), env=env)
    assert_error(proc, 1, "pip install 'lrctl[plot]'")
    assert not (tmp_path / "x.png").exists()


def test_cli_start_up_does_not_import_plot_code():
    code = ("import sys, lrctl.client.cli as cli; cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith(('matplotlib', 'lrctl.client.plot', "
            "'lrctl.client.rate_history'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_plot_says_what_an_adopted_scheduler_hides(tmp_path):
    import torch

    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    ctl = attach(model, optimizer, address="127.0.0.1:0", scheduler=scheduler)
    try:
        for _ in range(5):
            train_step(model, optimizer)
            scheduler.step()
        out = str(tmp_path / "a.png")
        proc = plot(out, "--address", ctl.address)
        assert_error(proc, 2, "no rate can be drawn", "adopted")
        proc = plot(out, "--address", ctl.address, "--select", "layer1.weight")
        assert_error(proc, 2, "'layer1.weight'", "adopted")
        # A pin is drawn whatever the scheduler: the pinned name is, the others are named.
        with LRClient(ctl.address, timeout=30) as client:
            client.pin_learning_rates({"layer2.bias": 0.5}, wait=False)
        train_step(model, optimizer)
        scheduler.step()
        train_step(model, optimizer)
        proc = plot(out, "--address", ctl.address, "--select", "layer2.bias", "--csv", str(tmp_path / "a.csv"))
        assert proc.returncode == 0, proc.stderr
        assert "3 name(s) not drawn" in proc.stderr and "adopted" in proc.stderr
        assert "1 name(s) drawn only where pinned: layer2.bias" in proc.stderr
        assert lr_series(tmp_path / "a.csv")["layer2.bias"] == {5: 0.5, 6: 0.5}  # steps 0-4: unknown
    finally:
        ctl.close(grace=0.5)
