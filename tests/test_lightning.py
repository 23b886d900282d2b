"""LRControlCallback in real Lightning fits (CPU, tiny model, 40 steps).

The module: three Linear layers, "body.*" and "mid.*" in param group 0 (lr 1e-2),
"head.*" in group 1 (lr 3e-3), AdamW, CosineAnnealingLR(T_max=40) stepped every step,
10 deterministic batches per epoch. A `Recorder` step pre-hook, registered on the real
optimizer in on_train_start (after lrctl attached and any checkpoint was restored, so
it runs after lrctl's hook), notes per trainer.global_step the rate every name used and
the number of physical param groups. The reference rates come from a
plain torch run of the same scheduler.

Also imported by the script that the resume test runs in a new process (`_fit_*`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

L = pytest.importorskip("lightning")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.optim import lr_scheduler as lrs  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lrctl.client.client import LRClient  # noqa: E402
from lrctl.client.errors import UnavailableError  # noqa: E402
from lrctl.client.types import Update  # noqa: E402
from lrctl.integrations.lightning import METRIC_PREFIX, LRControlCallback  # noqa: E402
from lrctl.server.adopt import unwrap_optimizer  # noqa: E402

torch.set_num_threads(1)

TESTS_DIR = Path(__file__).resolve().parent
STEPS = 40
BATCHES = 10  # per epoch: step 20 is an epoch boundary, so a plain DataLoader resumes exactly
GROUP_LRS = (1e-2, 3e-3)
NAMES = ("body.weight", "body.bias", "mid.weight", "mid.bias", "head.weight", "head.bias")
PATIENCE_S = 120  # bound for subprocesses; never asserted as a duration


def group_of(name: str) -> int:
    return 1 if name.startswith("head.") else 0


class Net(L.LightningModule):
    """`style` picks what configure_optimizers returns."""

    def __init__(self, style: str = "dict-step") -> None:
        super().__init__()
        self.style = style
        self.body = nn.Linear(4, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)
        if style == "two-optimizers":
            self.automatic_optimization = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(torch.tanh(self.body(x)))))

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = (self(x) - y).square().mean()
        if self.style == "two-optimizers":
            for opt in self.optimizers():
                opt.zero_grad()
            self.manual_backward(loss)
            for opt in self.optimizers():
                opt.step()
            return None
        return loss

    def make_optimizer(self) -> torch.optim.Optimizer:
        groups = [
            {"params": [*self.body.parameters(), *self.mid.parameters()], "lr": GROUP_LRS[0]},
            {"params": list(self.head.parameters()), "lr": GROUP_LRS[1]},
        ]
        return torch.optim.AdamW(groups, weight_decay=0.01)

    def configure_optimizers(self) -> Any:
        opt = self.make_optimizer()
        style = self.style
        if style == "none":
            return opt
        if style == "two-optimizers":
            return [torch.optim.SGD(self.body.parameters(), lr=0.1),
                    torch.optim.SGD([*self.mid.parameters(), *self.head.parameters()], lr=0.1)]
        sched = lrs.CosineAnnealingLR(opt, T_max=STEPS)
        if style == "dict-step":
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if style == "dict-plain":  # Lightning's default interval: "epoch"
            return {"optimizer": opt, "lr_scheduler": sched}
        if style == "tuple":
            return [opt], [sched]
        if style == "two-schedulers":
            return [opt], [sched, lrs.LambdaLR(opt, lambda s: 1.0)]
        raise AssertionError(style)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(4 * BATCHES, 4, generator=g)
    y = torch.randn(4 * BATCHES, 2, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


def make_trainer(root: Path, callbacks: list, *, max_steps: int = STEPS, logger: Any = False,
                 checkpointing: bool = False, log_every_n_steps: int = 50) -> Any:
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=logger, callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=checkpointing,
        default_root_dir=str(root), deterministic=True, log_every_n_steps=log_every_n_steps,
        num_sanity_val_steps=0,
    )


def new_module(style: str = "dict-step") -> Net:
    L.seed_everything(0, verbose=False)
    return Net(style)


def quiet_fit(trainer: Any, module: Net, **kwargs: Any) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|LeafSpec|weights_only|does not have many workers).*")
        trainer.fit(module, loader(), **kwargs)


def reference_rates(steps: int = STEPS + 1) -> list[tuple[float, float]]:
    """Per step, each group's lr from a plain torch run of the same scheduler."""
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    opt = torch.optim.AdamW([{"params": [p], "lr": lr} for p, lr in zip(params, GROUP_LRS)], weight_decay=0.01)
    sched = lrs.CosineAnnealingLR(opt, T_max=STEPS)
    out = []
    for _ in range(steps):
        out.append(tuple(g["lr"] for g in opt.param_groups))
        opt.step()  # no gradients: nothing moves, the scheduler's order check is satisfied
        sched.step()
    return out


class Recorder(L.Callback):
    """Registers (at on_train_start: after lrctl attached, after any checkpoint restore) a
    step pre-hook on the real optimizer; per trainer.global_step: name -> lr, number of groups."""

    def __init__(self) -> None:
        self.rates: dict[int, dict[str, float]] = {}
        self.groups: dict[int, int] = {}
        self.steps_seen: list[tuple[int, int]] = []  # (global_step, lrctl step) at batch end
        self._lrctl: Optional[LRControlCallback] = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self._lrctl = next((c for c in trainer.callbacks if isinstance(c, LRControlCallback)), None)

        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            step = trainer.global_step  # inside optimizer.step(): not yet counted by Lightning
            self.rates[step] = {names[id(p)]: float(g["lr"]) for g in opt.param_groups for p in g["params"]}
            self.groups[step] = len(opt.param_groups)

        self.handle = unwrap_optimizer(trainer.optimizers[0]).register_step_pre_hook(hook)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if self._lrctl is not None and self._lrctl.control is not None:
            self.steps_seen.append((trainer.global_step, self._lrctl.control.step))

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.handle.remove()


class OnTrainStart(L.Callback):
    """Runs `fn(control)` once training starts (lrctl attached, checkpoint restored)."""

    def __init__(self, lrctl: LRControlCallback, fn: Callable[[Any], None]) -> None:
        self.lrctl, self.fn = lrctl, fn

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.fn(self.lrctl.control)


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# -- 0. no remote change: the callback changes nothing ------------------------------------
@pytest.mark.parametrize("style", ["dict-step", "dict-plain", "tuple", "none"])
def test_attached_run_is_bit_identical_to_plain_lightning(tmp_path: Path, style: str) -> None:
    steps = 25  # crosses epoch boundaries, where the "epoch" interval schedulers step
    plain_rec = Recorder()
    plain = new_module(style)
    quiet_fit(make_trainer(tmp_path / "plain", [plain_rec], max_steps=steps), plain)

    cb = LRControlCallback("127.0.0.1:0", report=("mid.*",))
    rec = Recorder()
    logger = L.pytorch.loggers.CSVLogger(tmp_path / "logs", name="run")
    module = new_module(style)
    trainer = make_trainer(tmp_path / "lrctl", [cb, rec], max_steps=steps, logger=logger, log_every_n_steps=5)
    quiet_fit(trainer, module)

    assert sorted(rec.rates) == list(range(steps))
    assert rec.rates == plain_rec.rates  # exact floats, every name, every step
    assert set(rec.groups.values()) == {2}
    distinct = {"dict-step": steps, "dict-plain": 3, "tuple": 3, "none": 1}[style]  # epochs 0-2
    assert len({r["body.weight"] for r in rec.rates.values()}) == distinct
    assert_bit_identical(weights(module), weights(plain))
    assert cb.control is not None and cb.control.step == trainer.global_step == steps
    assert rec.steps_seen == [(s, s) for s in range(1, steps + 1)]  # outside the step: equal
    rows, _, _ = cb.control.controller.read([])
    assert all(r.schedule.startswith("adopted ") for r in rows) == (style != "none")
    # Logged every log_every_n_steps (Lightning's rule: batches 4, 9, ...), the rate used.
    logged = read_metrics(Path(logger.log_dir) / "metrics.csv", METRIC_PREFIX + "mid.*")
    assert sorted(logged) == [s for s in range(steps) if (s + 1) % 5 == 0]
    assert all(v == rec.rates[s]["mid.weight"] for s, v in logged.items())


def test_logged_rate_is_the_rate_each_step_used_with_an_lrctl_schedule(tmp_path: Path) -> None:
    """An lrctl schedule set remotely (no torch scheduler): lrctl/lr/<selector> at logger
    step S is the rate optimizer step S used, not the next step's."""
    from lrctl.common.schedules import Exponential

    def schedule(control: Any) -> None:
        with LRClient(control.address, timeout=30) as client:
            client.set_schedules({"head.*": Exponential(gamma=0.5, start_step=3)}, at_step=3, wait=False)

    cb = LRControlCallback("127.0.0.1:0", report=("head.*", "body.bias"))
    rec = Recorder()
    logger = L.pytorch.loggers.CSVLogger(tmp_path / "logs", name="run")
    trainer = make_trainer(tmp_path, [cb, rec, OnTrainStart(cb, schedule)], max_steps=8, logger=logger,
                           log_every_n_steps=1)
    quiet_fit(trainer, new_module("none"))

    for s in range(8):
        want = GROUP_LRS[1] * 0.5 ** max(0, s - 3)
        assert math.isclose(rec.rates[s]["head.weight"], want, rel_tol=1e-12, abs_tol=0.0), s
    path = Path(logger.log_dir) / "metrics.csv"
    assert read_metrics(path, METRIC_PREFIX + "head.*") == {s: rec.rates[s]["head.weight"] for s in range(8)}
    assert read_metrics(path, METRIC_PREFIX + "body.bias") == {s: GROUP_LRS[0] for s in range(8)}


def read_metrics(path: Path, key: str) -> dict[int, float]:
    with open(path, newline="") as f:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(f) if row.get(key)}


# -- 1. remote changes from another process ------------------------------------------------
CLIENT_SCRIPT = textwrap.dedent(r"""
    import json, sys
    from lrctl.client import cli
    from lrctl.client.client import LRClient
    address = sys.argv[1]
    results = []
    with LRClient(address, timeout=30) as client:
        client.wait_until_ready(30)
        for r in (
            client.set_learning_rates({"body.weight": 0.02}, at_step=5, wait=False, reason="split"),
            client.scale_learning_rates("head.*", 0.5, at_step=10, wait=False),
            client.pin_learning_rates({"mid.bias": 1e-4}, at_step=15, wait=False),
            client.unpin("mid.bias", at_step=25, wait=False),
        ):
            results.append([r.applied, r.step])
    print(json.dumps(results), flush=True)
    # The last one through the CLI: merge body.weight back into its group.
    sys.exit(cli.main(["--address", address, "set", "body.weight=0.01", "--at-step", "30", "--no-wait"]))
""")
SPLIT, SCALE, PIN, UNPIN, MERGE = 5, 10, 15, 25, 30
PIN_RATE = 1e-4


def expected_base(name: str, step: int) -> float:
    if name == "body.weight" and SPLIT <= step < MERGE:
        return 0.02
    if name.startswith("head.") and step >= SCALE:
        return 0.5 * GROUP_LRS[1]
    return GROUP_LRS[group_of(name)]


def is_pinned(name: str, step: int) -> bool:
    return name == "mid.bias" and PIN <= step < UNPIN


def expected_groups(step: int) -> int:
    return 2 + (SPLIT <= step < MERGE) + (PIN <= step < UNPIN)


def check_rate(name: str, step: int, lr: float, ref: list[tuple[float, float]]) -> None:
    g = group_of(name)
    if is_pinned(name, step):
        assert lr == PIN_RATE, (step, name)
        return
    base = expected_base(name, step)
    if base == GROUP_LRS[g]:
        assert lr == ref[step][g], (step, name, lr, ref[step][g])  # exactly the scheduler's
    else:
        want = ref[step][g] * base / GROUP_LRS[g]
        assert math.isclose(lr, want, rel_tol=1e-12, abs_tol=0.0), (step, name, lr, want)


class ReadBack(L.Callback):
    """Reads the worker over gRPC (LRClient) at the end of the given batches."""

    def __init__(self, lrctl: LRControlCallback, at: tuple[int, ...]) -> None:
        self.lrctl, self.at = lrctl, at
        self.reads: dict[int, Any] = {}
        self.history: list[Any] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if trainer.global_step in self.at:
            with LRClient(self.lrctl.control.address, timeout=30) as client:
                self.reads[trainer.global_step] = client.read_learning_rates()
                self.history = client.list_changes()


def test_remote_changes_from_another_process_follow_the_scheduler(tmp_path: Path) -> None:
    cb = LRControlCallback("127.0.0.1:0", report=("body.weight", "head.*", "re:^mid\\."))
    rec = Recorder()
    sent: dict[str, Any] = {}

    def send_changes(control: Any) -> None:
        proc = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT, control.address], capture_output=True,
                              text=True, timeout=PATIENCE_S)
        sent.update(rc=proc.returncode, out=proc.stdout, err=proc.stderr, pending=control.controller.pending_count)

    reads = ReadBack(cb, at=(8, 21, STEPS))
    logger = L.pytorch.loggers.CSVLogger(tmp_path / "logs", name="run")
    monitor = L.pytorch.callbacks.LearningRateMonitor(logging_interval="step")
    trainer = make_trainer(tmp_path, [cb, rec, OnTrainStart(cb, send_changes), reads, monitor], logger=logger,
                           log_every_n_steps=1)
    quiet_fit(trainer, new_module())

    assert sent["rc"] == 0, sent
    assert json.loads(sent["out"].splitlines()[0]) == [[False, SPLIT], [False, SCALE], [False, PIN], [False, UNPIN]]
    assert sent["pending"] == 5  # all queued before step 0
    ref = reference_rates()

    # Every step's rate of every name: the scheduler's rate of its original group x base / base_lr.
    assert sorted(rec.rates) == list(range(STEPS))
    for step, rates in rec.rates.items():
        assert sorted(rates) == sorted(NAMES)
        for name, lr in rates.items():
            check_rate(name, step, lr, ref)
        assert rec.groups[step] == expected_groups(step), step  # the groups really split and merged
    assert rec.rates[SPLIT]["body.weight"] != rec.rates[SPLIT]["body.bias"]
    assert cb.control.step == trainer.global_step == STEPS

    # Read back over gRPC: what was set (bases, pin), and the rates the next step used.
    assert sorted(reads.reads) == [8, 21, STEPS]
    for at, reading in reads.reads.items():
        assert reading.step == at
        by_name = {r.name: r for r in reading.rates}
        assert list(by_name) == list(NAMES)
        for name, row in by_name.items():
            assert row.base == expected_base(name, at), (at, name)
            assert row.pinned == is_pinned(name, at), (at, name)
            check_rate(name, at, row.lr, ref)
            if at < STEPS:
                assert row.lr == rec.rates[at][name], (at, name)
    assert reads.reads[8].rates[0].base == 0.02
    assert {r.name: r.lr for r in reads.reads[21].rates}["mid.bias"] == PIN_RATE
    assert [(c.version, c.step) for c in reads.history] == [(1, SPLIT), (2, SCALE), (3, PIN), (4, UNPIN), (5, MERGE)]
    assert reads.history[0].reason == "split"

    # lrctl/lr/<selector>: the rate of the first name matched, every step, exactly.
    path = Path(logger.log_dir) / "metrics.csv"
    for selector, name in (("body.weight", "body.weight"), ("head.*", "head.weight"), ("re:^mid\\.", "mid.weight")):
        logged = read_metrics(path, METRIC_PREFIX + selector)
        assert logged == {s: rec.rates[s][name] for s in range(STEPS)}, selector
    assert METRIC_PREFIX + "head.*" in trainer.callback_metrics
    # LearningRateMonitor, by contrast, labels physical groups by position: "pg2" was the
    # head's group, then body/mid's once body.weight got a group of its own, and pg3/pg4
    # came and went with the regroups.
    pg2 = read_metrics(path, "lr-AdamW/pg2")
    assert pg2[SPLIT] == rec.rates[SPLIT - 1]["head.weight"]  # read before lrctl's hook: a step late
    assert pg2[SPLIT + 1] == rec.rates[SPLIT]["body.bias"]
    assert sorted(read_metrics(path, "lr-AdamW/pg4")) == list(range(PIN + 1, UNPIN + 1))

    # Closed at on_fit_end: nothing serves any more.
    with LRClient(cb.control.address, timeout=5) as client, pytest.raises(UnavailableError):
        client.status()


# -- 2. resume through fit(ckpt_path=...) in a new process ---------------------------------
def queue_changes(control: Any) -> None:
    """Queued before step 0: a split at 10 (before the step-20 checkpoint) and, at 30, a
    pin plus a scale (still waiting when the checkpoint is taken: it rides inside it)."""
    with LRClient(control.address, timeout=30) as client:
        client.set_learning_rates({"body.weight": 0.02}, at_step=10, wait=False)
        client.set_learning_rates([Update("mid.bias", 1e-4, "absolute", "pin"), Update("head.*", 2.0, "scale")],
                                  at_step=30, wait=False)


def _fit_plain(root: Path) -> dict[str, torch.Tensor]:
    module = new_module()
    quiet_fit(make_trainer(root, []), module)
    return weights(module)


def _fit_resumed(root: Path, ckpt: str) -> dict[str, Any]:
    cb = LRControlCallback("127.0.0.1:0")
    rec = Recorder()
    module = new_module()
    trainer = make_trainer(root, [cb, rec])
    quiet_fit(trainer, module, ckpt_path=ckpt)
    control = cb.control
    history, _, _ = control.controller.history(0, 100)
    return {
        "weights": weights(module), "rates": rec.rates, "groups": rec.groups, "step": control.step,
        "global_step": trainer.global_step, "version": control.controller.version,
        "history": [r.step for r in history], "report": control.resume_report,
        "replay_report": control.replay_report,
    }


RESUME_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    sys.path.insert(0, sys.argv[1])
    import test_lightning as t
    root, ckpt, out = Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.save({"plain": t._fit_plain(root / "plain-b"), "resumed": t._fit_resumed(root / "run2", ckpt)}, out)
""")
# The same resume with LRCTL_REPLAY set: the recorded run's own checkpoint replays on.
REPLAY_RESUME_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    sys.path.insert(0, sys.argv[1])
    import test_lightning as t
    root, ckpt, out = Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.save({"resumed": t._fit_resumed(root / "run3", ckpt)}, out)
""")


def test_resume_from_checkpoint_in_a_new_process_is_bit_identical(tmp_path: Path) -> None:
    ModelCheckpoint = L.pytorch.callbacks.ModelCheckpoint
    audit = tmp_path / "run1-audit.jsonl"  # to replay
    cb = LRControlCallback("127.0.0.1:0", audit_log=str(audit))
    rec = Recorder()
    ckdir = tmp_path / "ck"
    saver = ModelCheckpoint(dirpath=ckdir, every_n_train_steps=20, save_top_k=-1)
    module = new_module()
    trainer = make_trainer(tmp_path / "run1", [cb, rec, OnTrainStart(cb, queue_changes), saver], checkpointing=True)
    quiet_fit(trainer, module)
    run1 = weights(module)
    assert cb.control.step == STEPS and cb.control.controller.version == 2
    (ckpt,) = ckdir.glob("*step=20.ckpt")
    assert rec.groups[19] == 3  # the checkpoint was taken while body.weight had a group of its own

    plain_a = _fit_plain(tmp_path / "plain-a")
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    out = tmp_path / "out.pt"
    proc = subprocess.run([sys.executable, str(script), str(TESTS_DIR), str(tmp_path), str(ckpt), str(out)],
                          capture_output=True, text=True, timeout=PATIENCE_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=False)

    # Deterministic to begin with: two plain runs, in two processes, are bit-identical.
    assert_bit_identical(got["plain"], plain_a)
    assert not all(torch.equal(run1[n], plain_a[n]) for n in run1)  # the changes did change training

    resumed = got["resumed"]
    assert_bit_identical(resumed["weights"], run1)
    assert sorted(resumed["rates"]) == list(range(20, STEPS))
    assert resumed["rates"] == {s: rec.rates[s] for s in range(20, STEPS)}
    assert resumed["groups"] == {s: rec.groups[s] for s in range(20, STEPS)}
    assert resumed["rates"][30]["mid.bias"] == 1e-4  # the change that waited inside the checkpoint
    assert resumed["step"] == resumed["global_step"] == STEPS
    assert resumed["version"] == 2 and resumed["history"] == [10, 30]
    assert resumed["report"] == []

    # Resumed again with LRCTL_REPLAY set to run 1's audit log: the step-30 change (a pin
    # and a x2 scale) that waited inside the checkpoint is the recorded one, applied once.
    script = tmp_path / "replay_resume.py"
    script.write_text(REPLAY_RESUME_SCRIPT)
    out = tmp_path / "replayed.pt"
    proc = subprocess.run([sys.executable, str(script), str(TESTS_DIR), str(tmp_path), str(ckpt), str(out)],
                          capture_output=True, text=True, timeout=PATIENCE_S,
                          env={**os.environ, "LRCTL_REPLAY": str(audit)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    replayed = torch.load(out, weights_only=False)["resumed"]
    assert replayed["replay_report"] == [] and replayed["history"] == [10, 30]
    assert_bit_identical(replayed["weights"], run1)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_checkpoint_saved_after_a_regroup_loads_into_plain_lightning(tmp_path: Path) -> None:
    """The optimizer state of a checkpoint saved while lrctl had split a group is in the
    module's original grouping: plain torch loads it, and so does plain Lightning."""
    cb = LRControlCallback("127.0.0.1:0")
    rec = Recorder()
    ckdir = tmp_path / "ck"
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckdir, every_n_train_steps=10, save_top_k=-1)

    def split(control: Any) -> None:
        with LRClient(control.address, timeout=30) as client:
            client.set_learning_rates({"body.weight": 0.02, "head.bias": 1e-3}, at_step=3, wait=False)

    trainer = make_trainer(tmp_path / "run", [cb, rec, OnTrainStart(cb, split), saver], max_steps=10,
                           checkpointing=True)
    quiet_fit(trainer, new_module())
    assert rec.groups[9] == 4
    (ckpt,) = ckdir.glob("*step=10.ckpt")

    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]
    assert [g["params"] for g in saved["param_groups"]] == [[0, 1, 2, 3], [4, 5]]
    fresh = new_module().make_optimizer()
    fresh.load_state_dict(saved)  # plain torch, no lrctl
    assert len(fresh.param_groups) == 2

    plain = new_module()
    plain_trainer = make_trainer(tmp_path / "plain", [], max_steps=13)
    quiet_fit(plain_trainer, plain, ckpt_path=str(ckpt))  # plain Lightning, no lrctl
    assert plain_trainer.global_step == 13


def _resume_plain_checkpoint(tmp_path: Path) -> tuple[LRControlCallback, Any, Recorder, Net, Recorder, Net]:
    """A plain Lightning run saved at step 10; resumed to 14 with and without lrctl."""
    first = make_trainer(tmp_path / "first", [], max_steps=10)
    quiet_fit(first, new_module())
    ckpt = str(tmp_path / "plain.ckpt")
    first.save_checkpoint(ckpt)

    plain_rec, plain = Recorder(), new_module()
    quiet_fit(make_trainer(tmp_path / "plain", [plain_rec], max_steps=14), plain, ckpt_path=ckpt)
    cb, rec, module = LRControlCallback("127.0.0.1:0"), Recorder(), new_module()
    trainer = make_trainer(tmp_path / "lrctl", [cb, rec], max_steps=14)
    quiet_fit(trainer, module, ckpt_path=ckpt)
    return cb, trainer, rec, module, plain_rec, plain


def test_resume_from_a_checkpoint_saved_without_lrctl(tmp_path: Path, caplog: Any) -> None:
    """Putting a running job under lrctl: the adopted scheduler goes on from the rates the
    checkpoint restored, exactly as in plain Lightning."""
    with caplog.at_level("WARNING", logger="lrctl.integrations.lightning"):
        cb, trainer, rec, module, plain_rec, plain = _resume_plain_checkpoint(tmp_path)
    assert sorted(rec.rates) == [10, 11, 12, 13]
    assert rec.rates == plain_rec.rates
    assert_bit_identical(weights(module), weights(plain))
    assert trainer.global_step == 14
    # lrctl counts on from Lightning's step: nothing to warn about.
    assert not any("trainer.global_step is" in r.getMessage() for r in caplog.records)


def test_resume_from_a_checkpoint_saved_without_lrctl_keeps_the_step(tmp_path: Path) -> None:
    cb, trainer, *_ = _resume_plain_checkpoint(tmp_path)
    assert cb.control.step == trainer.global_step == 14


def test_checkpoint_saved_after_fit_loads_into_a_plain_optimizer(tmp_path: Path) -> None:
    cb = LRControlCallback("127.0.0.1:0")

    def split(control: Any) -> None:
        with LRClient(control.address, timeout=30) as client:
            client.set_learning_rates({"body.weight": 0.02}, at_step=2, wait=False)

    trainer = make_trainer(tmp_path, [cb, OnTrainStart(cb, split)], max_steps=4)
    quiet_fit(trainer, new_module())
    trainer.save_checkpoint(tmp_path / "final.ckpt")
    saved = torch.load(tmp_path / "final.ckpt", weights_only=False)["optimizer_states"][0]
    new_module().make_optimizer().load_state_dict(saved)


# -- 3. what the callback refuses --------------------------------------------------------
@pytest.mark.parametrize(
    "style, error, match",
    [
        ("two-optimizers", ValueError, "exactly one optimizer; configure_optimizers gave 2 optimizers"),
        ("two-schedulers", ValueError, "at most one LR scheduler; configure_optimizers gave 2 schedulers"),
    ],
)
def test_unsupported_configurations_fail_fit_clearly(tmp_path: Path, style: str, error: type, match: str) -> None:
    cb = LRControlCallback("127.0.0.1:0")
    trainer = make_trainer(tmp_path, [cb], max_steps=2)
    with pytest.raises(error, match=match):
        quiet_fit(trainer, new_module(style))
    assert cb.control is None  # nothing attached, nothing left serving


def test_failures_close_the_server(tmp_path: Path) -> None:
    # A report selector that matches nothing: attach happened, the server is closed again.
    cb = LRControlCallback("127.0.0.1:0", report=("nope.*",))
    with pytest.raises(ValueError, match="report selector 'nope.\\*'"):
        quiet_fit(make_trainer(tmp_path / "a", [cb], max_steps=2), new_module())
    with LRClient(cb.control.address, timeout=5) as client, pytest.raises(UnavailableError):
        client.status()

    # A crash in training_step: on_exception closes lrctl.
    class Crash(Net):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if self.trainer.global_step == 3:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    cb = LRControlCallback("127.0.0.1:0")
    L.seed_everything(0, verbose=False)
    with pytest.raises(RuntimeError, match="boom"):
        quiet_fit(make_trainer(tmp_path / "b", [cb], max_steps=10), Crash())
    assert cb.control.step == 4  # lrctl counted step 3 before its closure (training_step) ran
    with LRClient(cb.control.address, timeout=5) as client, pytest.raises(UnavailableError):
        client.status()

    with pytest.raises(TypeError, match="scheduler"):
        LRControlCallback(scheduler=object())
