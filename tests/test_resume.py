"""Exact resume end to end: lrctl's state rides in ``optimizer.state_dict()``.

A real training job (a 3-layer MLP, AdamW with a weight-decay and a no-decay group, a
warmup+cosine schedule for every name, remote changes at steps 30 and 70, a checkpoint
at step 50, 100 steps) runs in fresh Python processes (`JOB`, written to a temp dir):

- "full": steps 0..99 in one process;
- "a": steps 0..49, then ``torch.save({"model", "optimizer", "scheduler"})`` at step 50;
- "b": a new process loads that checkpoint (before or after attach, in the original or
  another grouping) and trains steps 50..99.

The schedule is either lrctl's (``Warmup(warmup_steps=10, decay="cosine",
total_steps=100)`` given to "*" by a change at step 0) or an adopted torch LambdaLR of
the same shape, saved and loaded by the script with ``scheduler.state_dict()`` as users
do. The step-30 change (one name's base: splits the decay group) goes through gRPC with
LRClient; the step-70 change (scale + pin) is queued with ``at_step=70`` at step 40, so
process B only gets it from the checkpoint.

Each job dumps the rate of every name at every step (read from the optimizer's group
dicts after ``optimizer.step()``: what the step used), the final weights and what lrctl
reports right after resume and at the end. Subprocess runs are made once per module, in
two parallel stages. The other tests import the same script as a module and run in this
process (caplog sees their logs).
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from conftest import wait_for
from lrctl.common.errors import InvalidArgumentError
from lrctl.server import attach

torch.set_num_threads(1)

JOB = textwrap.dedent(
    r'''
    """A training job under lrctl, phases full / a (0..50 + checkpoint) / b (resume 50..100)."""
    import math
    import sys

    import torch
    import torch.nn.functional as F
    from torch import nn

    from lrctl.client.client import LRClient
    from lrctl.common.schedules import Warmup
    from lrctl.server import attach
    from lrctl.server.requests import ChangeRequest, Mode, ScheduleUpdate, Target, Update

    torch.set_num_threads(1)

    TOTAL, CKPT = 100, 50
    LR, WD = 1e-2, 0.01
    SPLIT_NAME, SPLIT_BASE = "fc1.weight", 3e-2      # step 30: one name's base (splits a group)
    SCALE_SELECTOR, SCALE = "fc2.*", 0.5             # step 70: scale ...
    PIN_NAME, PIN = "fc3.bias", 1e-3                 # ... and pin
    WARMUP = Warmup(warmup_steps=10, decay="cosine", total_steps=100)


    class MLP(nn.Module):
        """fc1 -> relu -> fc2 -> relu -> fc3. `mutated`: fc3 lost its bias, a `scale` is new."""

        def __init__(self, mutated=False):
            super().__init__()
            self.fc1 = nn.Linear(16, 32)
            self.fc2 = nn.Linear(32, 32)
            self.fc3 = nn.Linear(32, 4, bias=not mutated)
            self.mutated = mutated
            if mutated:
                self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x):
            y = self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))
            return y * self.scale if self.mutated else y


    def make_model(mutated=False):
        torch.manual_seed(0)
        return MLP(mutated)


    def decays(name):
        return name.endswith(".weight")


    def make_optimizer(model, grouping="original", decay_lr=LR):
        """AdamW; "original": [decay, no decay]. Other groupings keep each name's
        hyperparameters and change only the partition."""
        named = list(model.named_parameters())
        if grouping == "original":
            groups = [
                {"params": [p for n, p in named if decays(n)], "weight_decay": WD, "lr": decay_lr},
                {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0},
            ]
        elif grouping == "per_param":
            groups = [{"params": [p], "weight_decay": WD if decays(n) else 0.0} for n, p in named]
        elif grouping == "swapped":  # groups and members in reverse order
            groups = [
                {"params": [p for n, p in reversed(named) if not decays(n)], "weight_decay": 0.0},
                {"params": [p for n, p in reversed(named) if decays(n)], "weight_decay": WD},
            ]
        else:
            raise ValueError(grouping)
        return torch.optim.AdamW(groups, lr=LR)


    def lr_lambda(s):
        """The torch twin of WARMUP: linear warmup over 10 steps, cosine to 0 at 100."""
        if s < 10:
            return float(s) / 10.0
        progress = min(1.0, float(s - 10) / 90.0)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


    def batch(step):
        g = torch.Generator().manual_seed(10_000 + step)
        return torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)


    def rates_by_name(model, optimizer):
        lr = {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}
        return {n: lr[id(p)] for n, p in model.named_parameters() if id(p) in lr}


    def record_tuple(ctl, r):
        changes = ctl.controller.rate_changes(r, 10**6)
        return {
            "change_id": r.change_id, "version": r.version, "step": r.step, "reason": r.reason,
            "at_step": r.at_step, "peer": r.peer,
            "changes": [(c.name, c.old_lr, c.new_lr, c.old_base, c.new_base, c.old_pin, c.new_pin)
                        for c in changes],
        }


    def snapshot(ctl, client=None):
        records, _, dropped = ctl.controller.history(0, 100)
        rows, version, step = ctl.controller.read([])
        out = {
            "step": ctl.step,
            "version": ctl.controller.version,
            "pending": ctl.controller.pending_count,
            "history": [record_tuple(ctl, r) for r in records],
            "history_dropped": dropped,
            "lineage": list(ctl.controller.lineage),
            "run_id": ctl.controller.run_id,
            "report": list(ctl.resume_report),
            "rows": {r.name: (r.lr, r.base, r.factor, r.pinned) for r in rows},
        }
        if client is not None:
            status = client.status()
            out["status"] = {"step": status.step, "version": status.version,
                             "pending": status.pending_changes, "run_id": status.run_id}
            out["grpc_history"] = [(c.version, c.step, c.change_id) for c in client.list_changes()]
        return out


    def load_optimizer(cfg, optimizer, scheduler, checkpoint):
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])


    def run(cfg, serve=True):
        """One phase of the job; returns what it saw (plain data and tensors)."""
        phase, torch_sched = cfg["phase"], cfg["sched"] == "torch"
        mutated = cfg.get("mutated", False)
        model = make_model(mutated)
        optimizer = make_optimizer(model, cfg.get("grouping", "original"), cfg.get("decay_lr", LR))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda) if torch_sched else None
        out = {"cfg": cfg}
        checkpoint = None
        if phase == "b":
            # weights_only=True, as Hugging Face and Lightning load: lrctl's state is plain data.
            checkpoint = torch.load(cfg["ckpt"], weights_only=True)
            model.load_state_dict(checkpoint["model"], strict=not mutated)
            if cfg["load"] == "before":
                load_optimizer(cfg, optimizer, scheduler, checkpoint)
        ctl = attach(model, optimizer, scheduler=scheduler, address="127.0.0.1:0", serve=serve,
                     resume=cfg.get("resume", "checkpoint"))
        client = LRClient(ctl.address, timeout=30) if serve else None
        try:
            if phase == "b" and cfg["load"] == "after":
                load_optimizer(cfg, optimizer, scheduler, checkpoint)
            start = CKPT if phase == "b" else 0
            end = CKPT if phase == "a" else TOTAL
            if phase == "b":
                out["resumed"] = snapshot(ctl, client)
                out["weights_at_resume"] = {k: v.clone() for k, v in model.state_dict().items()}
            out["rates"] = {}
            for step in range(start, end):
                if step == 0 and not torch_sched:
                    ctl.controller.submit(ChangeRequest(
                        updates=(), schedules=(ScheduleUpdate("*", WARMUP),), reason="warmup+cosine"))
                if step == 20:  # remote: gRPC, applied at step 30
                    client.set_learning_rates({SPLIT_NAME: SPLIT_BASE}, at_step=30, wait=False,
                                              reason="split")
                if step == 40:  # queued before the checkpoint, due after it
                    ctl.controller.submit(ChangeRequest(
                        updates=(Update(SCALE_SELECTOR, SCALE, Mode.SCALE),
                                 Update(PIN_NAME, PIN, Mode.ABSOLUTE, Target.PIN)),
                        at_step=70, reason="late"))
                x, y = batch(step)
                optimizer.zero_grad(set_to_none=True)
                F.mse_loss(model(x), y).backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                out["rates"][step] = rates_by_name(model, optimizer)
            if phase == "a":
                out["groups_at_save"] = len(optimizer.param_groups)
                out["state_at_save"] = {
                    n: {k: v.clone() for k, v in optimizer.state[p].items()}
                    for n, p in model.named_parameters()
                }
                out["hypers_at_save"] = {
                    n: {k: v for k, v in g.items() if k not in ("params", "param_names", "lr")}
                    for g in optimizer.param_groups for n in g.get("param_names", ())
                }
                torch.save({
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": None if scheduler is None else scheduler.state_dict(),
                }, cfg["ckpt"])
            out["end"] = snapshot(ctl, client)
            out["final"] = {k: v.clone() for k, v in model.state_dict().items()}
        finally:
            if client is not None:
                client.close()
            ctl.close()
        return out


    if __name__ == "__main__":
        import json
        cfg = json.loads(sys.argv[1])
        torch.save(run(cfg), cfg["out"])
    '''
)

NAMES = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias")
PROCESS_TIMEOUT_S = 120


def _job_module(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("lrctl_resume_job", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("resume_job")
    (d / "job.py").write_text(JOB)
    return d


@pytest.fixture(scope="module")
def job(job_dir: Path) -> Any:
    """The job script, imported as a module (for the in-process tests)."""
    return _job_module(job_dir / "job.py")


def _run_all(job_dir: Path, configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Run each config in its own Python process, a few at a time; their results by key.

    At most as many at once as there are cores: each job's time limit then measures
    the job, not how many others share the CPU with it.
    """

    def run(key: str, cfg: dict[str, Any]) -> subprocess.CompletedProcess[str] | str:
        cfg = {**cfg, "out": str(job_dir / f"{key}.pt")}
        try:
            return subprocess.run([sys.executable, str(job_dir / "job.py"), json.dumps(cfg)],
                                  capture_output=True, text=True, cwd=job_dir, timeout=PROCESS_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            return f"--- job {key} ran past {PROCESS_TIMEOUT_S}s\n{(exc.stderr or b'')[-4000:]!r}"

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        done = dict(zip(configs, pool.map(lambda item: run(*item), configs.items())))
    results: dict[str, Any] = {}
    failures = []
    for key, proc in done.items():
        if isinstance(proc, str):
            failures.append(proc)
        elif proc.returncode != 0:
            failures.append(f"--- job {key} exited {proc.returncode}\n{proc.stderr[-4000:]}")
        else:
            results[key] = torch.load(job_dir / f"{key}.pt", weights_only=False)
    results["_failures"] = failures
    return results


# Stage 2 (process B) variants: (schedule, load order, grouping, mutated model)
B_RUNS: dict[str, dict[str, Any]] = {
    "b_lrctl_after": {"sched": "lrctl", "load": "after"},
    "b_lrctl_before": {"sched": "lrctl", "load": "before"},
    "b_torch_after": {"sched": "torch", "load": "after"},
    "b_torch_before": {"sched": "torch", "load": "before"},
    "b_lrctl_per_param": {"sched": "lrctl", "load": "after", "grouping": "per_param"},
    "b_lrctl_swapped": {"sched": "lrctl", "load": "after", "grouping": "swapped"},
    "b_lrctl_mutated": {"sched": "lrctl", "load": "after", "mutated": True},
}


@pytest.fixture(scope="module")
def runs(job_dir: Path) -> dict[str, Any]:
    """Every subprocess run: full and A runs first (in parallel), then the B runs."""
    stage1 = {
        f"{phase}_{sched}": {"phase": phase, "sched": sched, "ckpt": str(job_dir / f"ckpt_{sched}.pt")}
        for phase in ("full", "a") for sched in ("lrctl", "torch")
    }
    results = _run_all(job_dir, stage1)
    stage2 = {
        key: {"phase": "b", "ckpt": str(job_dir / f"ckpt_{cfg['sched']}.pt"), **cfg}
        for key, cfg in B_RUNS.items()
        if f"a_{cfg['sched']}" in results
    }
    more = _run_all(job_dir, stage2)
    failures = results.pop("_failures") + more.pop("_failures")
    results.update(more)
    results["_failures"] = failures
    return results


def _result(runs: dict[str, Any], key: str) -> Any:
    if key not in runs:
        pytest.fail(f"job {key} did not finish:\n" + "\n".join(runs["_failures"]))
    return runs[key]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ (not bit-identical): {different}"


def _assert_same_rates(full: dict[int, dict[str, float]], part: dict[int, dict[str, float]],
                       steps: range) -> None:
    assert sorted(part) == list(steps)
    for s in steps:
        assert part[s] == full[s], f"rates of step {s} differ: {part[s]} vs uninterrupted {full[s]}"


def _history_steps(snap: dict[str, Any]) -> list[tuple[int, int]]:
    return [(r["version"], r["step"]) for r in snap["history"]]


# ------------------------------------------------------------------------------------
# sanity of the reference run itself: the schedule and both changes really happen
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sched", ["lrctl", "torch"])
def test_reference_run_exercises_schedule_and_changes(runs: dict[str, Any], job: Any, sched: str) -> None:
    full = _result(runs, f"full_{sched}")
    rates = full["rates"]
    assert sorted(rates) == list(range(100))
    # warmup, then cosine: step 0 is 0, step 10 is the peak, steps fall after it
    assert rates[0]["fc2.weight"] == 0.0
    assert rates[10]["fc2.weight"] == pytest.approx(job.LR)
    assert rates[60]["fc2.weight"] < rates[40]["fc2.weight"] < rates[20]["fc2.weight"]
    # step 30: fc1.weight re-based (its rate leaves its group's), scheduled as before
    assert rates[29]["fc1.weight"] == rates[29]["fc2.weight"]
    assert rates[30]["fc1.weight"] == pytest.approx(3 * rates[30]["fc3.weight"])
    # step 70: fc2.* scaled by 0.5, fc3.bias pinned
    assert rates[70]["fc2.weight"] == pytest.approx(0.5 * rates[70]["fc3.weight"])
    assert rates[69]["fc2.weight"] == rates[69]["fc3.weight"]
    assert [r["fc3.bias"] for s, r in rates.items() if s >= 70] == [job.PIN] * 30
    expected = [(1, 0), (2, 30), (3, 70)] if sched == "lrctl" else [(1, 30), (2, 70)]
    assert _history_steps(full["end"]) == expected


@pytest.mark.parametrize("sched", ["lrctl", "torch"])
def test_rates_match_the_reference_schedule(runs: dict[str, Any], job: Any, sched: str) -> None:
    """Before any change, every name follows the warmup+cosine of its base exactly."""
    rates = _result(runs, f"full_{sched}")["rates"]
    for s in range(30):
        expected = job.LR * (job.WARMUP.factor(s) if sched == "lrctl" else job.lr_lambda(s))
        assert rates[s]["fc3.weight"] == pytest.approx(expected, rel=1e-12, abs=1e-15), s


# ------------------------------------------------------------------------------------
# 1 + 2: uninterrupted == (0..50 in A) + (50..100 in B), B loading after or before attach
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("load", ["after", "before"])
@pytest.mark.parametrize("sched", ["lrctl", "torch"])
def test_resume_is_bit_identical(runs: dict[str, Any], sched: str, load: str) -> None:
    full, a, b = (_result(runs, k) for k in (f"full_{sched}", f"a_{sched}", f"b_{sched}_{load}"))
    _assert_same_rates(full["rates"], a["rates"], range(0, 50))
    _assert_same_rates(full["rates"], b["rates"], range(50, 100))
    _assert_same_weights(full["final"], b["final"])
    # the weights B starts from are A's, and they move
    assert any(not torch.equal(b["weights_at_resume"][k], b["final"][k]) for k in b["final"])


@pytest.mark.parametrize("load", ["after", "before"])
@pytest.mark.parametrize("sched", ["lrctl", "torch"])
def test_resume_restores_step_version_history_lineage(runs: dict[str, Any], sched: str, load: str) -> None:
    a, b = _result(runs, f"a_{sched}"), _result(runs, f"b_{sched}_{load}")
    resumed, end_a = b["resumed"], a["end"]
    before_70 = [(1, 0), (2, 30)] if sched == "lrctl" else [(1, 30)]
    # right after resume, before B's first step
    assert resumed["step"] == 50
    assert resumed["version"] == end_a["version"] == len(before_70)
    assert resumed["status"]["step"] == 50
    assert resumed["status"]["version"] == len(before_70)
    assert resumed["pending"] == resumed["status"]["pending"] == 1  # the at_step=70 change
    assert _history_steps(resumed) == before_70
    assert resumed["history"] == end_a["history"]  # per-name old -> new, who, why
    assert [(v, s) for v, s, _ in resumed["grpc_history"]] == before_70
    assert a["end"]["run_id"] in resumed["lineage"]
    assert resumed["run_id"] != a["end"]["run_id"]
    assert resumed["status"]["run_id"] == resumed["run_id"]
    assert resumed["report"] == []
    assert resumed["rows"] == end_a["rows"]  # lr, base, factor, pinned of the next step
    # at the end: the queued change applied at 70 in B, as in the uninterrupted run
    full = _result(runs, f"full_{sched}")
    assert _history_steps(b["end"]) == _history_steps(full["end"])
    assert [r["changes"] for r in b["end"]["history"]] == [r["changes"] for r in full["end"]["history"]]
    assert b["end"]["history"][-1]["reason"] == "late"
    assert b["end"]["step"] == 100 and b["end"]["pending"] == 0


# ------------------------------------------------------------------------------------
# 3: B has another grouping (same hyperparameters per name): remapped by name
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("grouping", ["per_param", "swapped"])
def test_resume_into_another_grouping_is_bit_identical(runs: dict[str, Any], grouping: str) -> None:
    full, b = _result(runs, "full_lrctl"), _result(runs, f"b_lrctl_{grouping}")
    assert b["resumed"]["step"] == 50
    assert b["resumed"]["report"] == []
    assert _history_steps(b["resumed"]) == [(1, 0), (2, 30)]
    _assert_same_rates(full["rates"], b["rates"], range(50, 100))
    _assert_same_weights(full["final"], b["final"])


# ------------------------------------------------------------------------------------
# 4: the checkpoint saved after a regroup loads with plain torch (no lrctl)
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sched", ["lrctl", "torch"])
def test_checkpoint_after_regroup_loads_with_plain_torch(runs: dict[str, Any], job: Any, job_dir: Path,
                                                         sched: str) -> None:
    a = _result(runs, f"a_{sched}")
    assert a["groups_at_save"] != 2, "the step-30 split should have regrouped the optimizer"
    checkpoint = torch.load(job_dir / f"ckpt_{sched}.pt", weights_only=True)
    saved = checkpoint["optimizer"]
    assert len(saved["param_groups"]) == 2
    model = job.make_model()
    model.load_state_dict(checkpoint["model"])
    fresh = job.make_optimizer(model)  # plain torch: nothing of lrctl attached
    fresh.load_state_dict(saved)
    params = dict(model.named_parameters())
    for name in NAMES:
        state, expected = fresh.state[params[name]], a["state_at_save"][name]
        assert state.keys() == expected.keys() and expected, name
        for key in expected:
            assert torch.equal(state[key], expected[key]), (name, key)
    for group in fresh.param_groups:  # each name keeps its own hyperparameters
        for p in group["params"]:
            name = next(n for n, q in params.items() if q is p)
            assert group["weight_decay"] == (job.WD if name.endswith(".weight") else 0.0)
            assert group["weight_decay"] == a["hypers_at_save"][name]["weight_decay"]
    # and it trains on with plain torch
    x, y = job.batch(50)
    torch.nn.functional.mse_loss(model(x), y).backward()
    fresh.step()


# ------------------------------------------------------------------------------------
# 5: resume="checkpoint" (default) vs resume="code"
# ------------------------------------------------------------------------------------
CODE_LR = 7e-3  # B's code builds the decay group (fc2.weight among it) at this rate



@pytest.mark.parametrize(("policy", "load"), [
    pytest.param(policy, load, id=f"{policy}-{load}")
    for policy in (None, "checkpoint", "code") for load in ("after", "before")
])
def test_resume_policy(runs: dict[str, Any], job: Any, job_dir: Path, caplog: pytest.LogCaptureFixture,
                       policy: str | None, load: str) -> None:
    a = _result(runs, "a_lrctl")
    a_base = a["end"]["rows"]["fc2.weight"][1]
    assert a_base == job.LR != CODE_LR
    checkpoint = torch.load(job_dir / "ckpt_lrctl.pt", weights_only=True)
    model = job.make_model()
    model.load_state_dict(checkpoint["model"])
    optimizer = job.make_optimizer(model, decay_lr=CODE_LR)
    if load == "before":
        optimizer.load_state_dict(checkpoint["optimizer"])
    caplog.set_level(logging.INFO, logger="lrctl")
    options = {} if policy is None else {"resume": policy}
    with attach(model, optimizer, serve=False, **options) as ctl:
        if load == "after":
            optimizer.load_state_dict(checkpoint["optimizer"])
        rows = {r.name: r for r in ctl.controller.read([])[0]}
        # Loaded before attach, torch already put the checkpoint's rates in the groups:
        # "code" cannot be honoured, and the report says so.
        wins_code = policy == "code" and load == "after"
        if policy == "code" and load == "before":
            assert any("loaded before attach" in line for line in ctl.resume_report), ctl.resume_report
        assert rows["fc2.weight"].base == (CODE_LR if wins_code else a_base)
        if not wins_code:
            assert rows["fc1.weight"].base == job.SPLIT_BASE
            assert {n: (r.lr, r.base, r.factor, r.pinned) for n, r in rows.items()} == a["end"]["rows"]
        # restored under either policy
        assert ctl.step == 50
        assert ctl.controller.version == 2
        assert ctl.controller.pending_count == 1
        assert [(r.version, r.step) for r in ctl.controller.history(0, 100)[0]] == [(1, 0), (2, 30)]
        assert a["end"]["run_id"] in ctl.controller.lineage
        winner = "the code's rates win" if wins_code else "the checkpoint's rates win"
        loser = "the checkpoint's rates win" if wins_code else "the code's rates win"
        messages = [r.getMessage() for r in caplog.records]
        assert any(winner in m for m in messages), messages
        assert not any(loser in m for m in messages), messages
        # the rates the optimizer really uses: train to step 71 (the queued change applies at 70)
        for step in range(50, 71):
            x, y = job.batch(step)
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            used = job.rates_by_name(model, optimizer)
            if step == 50:
                expected_fc2 = CODE_LR if wins_code else a["end"]["rows"]["fc2.weight"][0]
                assert used["fc2.weight"] == expected_fc2
        assert [(r.version, r.step) for r in ctl.controller.history(0, 100)[0]][-1] == (3, 70)
        assert used["fc3.bias"] == job.PIN


# ------------------------------------------------------------------------------------
# 6: the model gained a parameter and lost one since the checkpoint
# ------------------------------------------------------------------------------------
def test_resume_into_a_changed_model(runs: dict[str, Any]) -> None:
    b = _result(runs, "b_lrctl_mutated")
    report = " | ".join(b["resumed"]["report"])
    assert "fc3.bias" in report, report   # lost
    assert "scale" in report, report      # gained
    assert b["resumed"]["step"] == 50
    assert _history_steps(b["resumed"]) == [(1, 0), (2, 30)]
    # training went on to the end, the queued change applied at 70 (its fc3.bias pin dropped)
    assert sorted(b["rates"]) == list(range(50, 100))
    assert b["end"]["step"] == 100
    assert _history_steps(b["end"])[-1] == (3, 70)
    assert all(math.isfinite(v) for r in b["rates"].values() for v in r.values())
    assert "scale" in b["rates"][99] and "fc3.bias" not in b["rates"][99]
    assert all(torch.isfinite(t).all() for t in b["final"].values())
    assert not torch.equal(b["final"]["scale"], torch.ones(4))
    # the names both runs share follow the uninterrupted run's rates
    full = _result(runs, "full_lrctl")
    for s in range(50, 100):
        for name in ("fc1.weight", "fc2.weight", "fc2.bias", "fc3.weight"):
            assert b["rates"][s][name] == full["rates"][s][name], (s, name)


# ------------------------------------------------------------------------------------
# 7: LRControl.state_dict() / load_state_dict() round trip, without the optimizer
# ------------------------------------------------------------------------------------
def _train(job: Any, model: Any, optimizer: Any, steps: range) -> None:
    for step in steps:
        x, y = job.batch(step)
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def _configured(job: Any) -> tuple[Any, Any, Any]:
    """A job attached (no server) with a schedule, a re-based name, a pin, a scale and a
    change still waiting, 12 steps in."""
    from lrctl.server.requests import ChangeRequest, Mode, ScheduleUpdate, Target, Update

    model = job.make_model()
    optimizer = job.make_optimizer(model)
    ctl = attach(model, optimizer, serve=False)
    submit = ctl.controller.submit
    submit(ChangeRequest(updates=(), schedules=(ScheduleUpdate("*", job.WARMUP),), reason="sched"))
    _train(job, model, optimizer, range(0, 4))
    submit(ChangeRequest(updates=(Update("fc1.weight", 3e-2),), reason="split", user="alice"))
    _train(job, model, optimizer, range(4, 8))
    submit(ChangeRequest(updates=(Update("fc3.bias", 2e-3, Mode.ABSOLUTE, Target.PIN),
                                  Update("fc2.*", 0.5, Mode.SCALE)), reason="pin+scale"))
    _train(job, model, optimizer, range(8, 12))
    submit(ChangeRequest(updates=(Update("fc3.weight", 4e-3),), at_step=20, reason="later"))
    return model, optimizer, ctl


def _history(ctl: Any) -> list[tuple[Any, ...]]:
    records, _, dropped = ctl.controller.history(0, 100)
    return [
        (r.change_id, r.version, r.step, r.applied_at, r.requested_at, r.updates, r.schedules,
         r.peer, r.user, r.reason, r.at_step, tuple(ctl.controller.rate_changes(r, 10**6)))
        for r in records
    ] + [("dropped", dropped)]


def _rows(ctl: Any) -> dict[str, tuple[float, float, float, bool]]:
    return {r.name: (r.lr, r.base, r.factor, r.pinned) for r in ctl.controller.read([])[0]}


def test_control_state_dict_round_trip(job: Any) -> None:
    model, optimizer, ctl = _configured(job)
    try:
        state = ctl.state_dict()
        rows, history = _rows(ctl), _history(ctl)
        step, version, pending = ctl.step, ctl.controller.version, ctl.controller.pending_count
        run_id = ctl.controller.run_id
    finally:
        ctl.close()
    assert len(history) == 4 and pending == 1
    assert len({v[1] for v in rows.values()}) > 1  # distinct bases: the state is not trivial
    # plain data: survives torch.save / torch.load(weights_only=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    fresh_model = job.make_model()
    fresh_optimizer = job.make_optimizer(fresh_model)
    with attach(fresh_model, fresh_optimizer, serve=False) as fresh:
        assert _rows(fresh) != rows
        report = fresh.load_state_dict(state)
        assert report == []
        assert _rows(fresh) == rows
        assert _history(fresh) == history
        assert fresh.step == step and fresh.controller.version == version
        assert fresh.controller.pending_count == pending
        assert run_id in fresh.controller.lineage
        # the waiting change applies at its step in the new run, as it would have
        _train(job, fresh_model, fresh_optimizer, range(12, 21))
        last = fresh.controller.history(0, 100)[0][-1]
        assert (last.version, last.step, last.reason) == (version + 1, 20, "later")
        assert job.rates_by_name(fresh_model, fresh_optimizer)["fc3.weight"] == pytest.approx(
            4e-3 * job.WARMUP.factor(20))


def test_changes_queued_before_a_load_are_withdrawn(job: Any, tmp_path: Path) -> None:
    """A checkpoint loaded while this run has changes queued (a client's, sent before
    the script loaded it): they are withdrawn, never applied, the waiting caller told
    ABORTED naming the load, the audit log has them; the checkpoint's change waits."""
    from concurrent.futures import ThreadPoolExecutor as Pool

    from lrctl.client.client import LRClient
    from lrctl.client.errors import AbortedError

    model, optimizer, ctl = _configured(job)
    try:
        state, history = ctl.state_dict(), _history(ctl)
    finally:
        ctl.close()
    fresh_model = job.make_model()
    fresh_optimizer = job.make_optimizer(fresh_model)
    audit = tmp_path / "audit.jsonl"
    with attach(fresh_model, fresh_optimizer, address="127.0.0.1:0", audit_log=audit) as fresh, \
            LRClient(fresh.address, timeout=60) as client, Pool(1) as pool:
        waiting = pool.submit(client.set_learning_rates, {"fc1.*": 0.5}, at_step=3, reason="waits")
        client.set_learning_rates({"fc2.*": 0.25}, at_step=2, wait=False, reason="queued")
        wait_for(lambda: fresh.controller.pending_count == 2, "both changes to be queued")
        assert fresh.load_state_dict(state) == []
        with pytest.raises(AbortedError, match=r"change [12] was withdrawn, NOT applied: the job loaded "
                                               r"a checkpoint \(step 12, version 3\) before its step"):
            waiting.result(timeout=60)
        assert [p.request.reason for p in fresh.controller.pending()] == ["later"]  # the checkpoint's
        assert _history(fresh) == history  # ids as the checkpoint numbered them, no others
        _train(job, fresh_model, fresh_optimizer, range(12, 21))
        applied = fresh.controller.history(0, 100)[0][len(history) - 1:]
        assert [(r.step, r.reason) for r in applied] == [(20, "later")]
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    withdrawn = sorted((r["reason"], r["status"], r["change_id"]) for r in lines if r["status"])
    assert [w[:2] for w in withdrawn] == [("queued", "ABORTED"), ("waits", "ABORTED")]
    assert sorted(w[2] for w in withdrawn) == [1, 2]  # the ids this run gave them


# ------------------------------------------------------------------------------------
# 8: bad input to load_state_dict: a clear InvalidArgumentError, nothing changed
# ------------------------------------------------------------------------------------
def _observable(ctl: Any, optimizer: Any) -> tuple[Any, ...]:
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return (_rows(ctl), _history(ctl), ctl.step, ctl.controller.version,
            ctl.controller.pending_count, tuple(ctl.controller.lineage), repr(groups))


@pytest.fixture
def configured(job: Any) -> Iterator[tuple[Any, Any, Any]]:
    model, optimizer, ctl = _configured(job)
    try:
        yield model, optimizer, ctl
    finally:
        ctl.close()


NOT_STATES = {
    "a string": lambda ctl, opt: "lrctl state",
    "None": lambda ctl, opt: None,
    "an empty dict": lambda ctl, opt: {},
    "another format": lambda ctl, opt: {"controller": {**ctl.state_dict()["controller"], "format": 99},
                                        "scheduler": None},
    "the optimizer's state dict": lambda ctl, opt: opt.state_dict(),
    "the controller part alone": lambda ctl, opt: ctl.controller.export_state(),
}

@pytest.mark.parametrize("what", list(NOT_STATES))
def test_load_state_dict_of_not_a_state(configured: tuple[Any, Any, Any], what: str) -> None:
    _, optimizer, ctl = configured
    bad = NOT_STATES[what](ctl, optimizer)
    before = _observable(ctl, optimizer)
    with pytest.raises(InvalidArgumentError, match="format"):
        ctl.load_state_dict(bad)
    assert _observable(ctl, optimizer) == before



@pytest.mark.parametrize("missing", [
    pytest.param(m)
    for m in ("rates", "history", "pending")
])
def test_load_state_dict_of_a_truncated_state_changes_nothing(configured: tuple[Any, Any, Any],
                                                             job: Any, missing: str) -> None:
    """A state of the right format with a part missing is refused whole."""
    _, optimizer, ctl = configured
    # a state of another run, at another step and with other rates
    other_model, other_optimizer, other = _configured(job)
    try:
        _train(job, other_model, other_optimizer, range(12, 25))
        state = other.state_dict()
    finally:
        other.close()
    state["controller"] = {k: v for k, v in state["controller"].items() if k != missing}
    before = _observable(ctl, optimizer)
    with pytest.raises(InvalidArgumentError):
        ctl.load_state_dict(state)
    assert _observable(ctl, optimizer) == before


def test_bad_state_leaves_an_adopted_scheduler_untouched(job: Any) -> None:
    """A rejected state must not restore the adopted scheduler's part either."""
    model = job.make_model()
    optimizer = job.make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, job.lr_lambda)
    with attach(model, optimizer, scheduler=scheduler, serve=False) as ctl:
        for step in range(5):
            _train(job, model, optimizer, range(step, step + 1))
            scheduler.step()
        state = ctl.state_dict()
        for group in state["scheduler"]["groups"]:
            group["lr"] = 0.5  # what another run's scheduler had written
        state["controller"]["format"] = 99
        before = _observable(ctl, optimizer)
        with pytest.raises(InvalidArgumentError, match="format"):
            ctl.load_state_dict(state)
        assert _observable(ctl, optimizer) == before


def test_attach_that_cannot_resume_leaves_the_optimizer_as_it_was() -> None:
    """A state in the groups that does not load fails attach before anything stays:
    no hooks on the optimizer, the state back where it was, the scheduler untouched."""
    from lrctl.server.resume import STATE_KEY

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    bad = {"controller": {"format": 99}, "scheduler": None}
    optimizer.param_groups[0][STATE_KEY] = bad
    hooks = (dict(optimizer._optimizer_step_pre_hooks), dict(optimizer._optimizer_state_dict_post_hooks),
             dict(optimizer._optimizer_load_state_dict_pre_hooks))
    with pytest.raises(InvalidArgumentError, match="format 99"):
        attach(model, optimizer, scheduler=scheduler, serve=False)
    assert (dict(optimizer._optimizer_step_pre_hooks), dict(optimizer._optimizer_state_dict_post_hooks),
            dict(optimizer._optimizer_load_state_dict_pre_hooks)) == hooks
    assert optimizer.param_groups[0][STATE_KEY] is bad
    assert scheduler.optimizer is optimizer
