"""The Hugging Face callback reports the Trainer's logs; reduce_lr_on_plateau is adopted.

Real ``transformers.Trainer`` runs of a tiny GPT-2 on CPU (the job of test_huggingface).
A watcher reads the run through ``LRClient.watch_metrics`` over gRPC, from step 0.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from lrctl.integrations.huggingface import LRControlCallback  # noqa: E402
from lrctl.server.adopt import unwrap_optimizer  # noqa: E402
from conftest import MetricsFollower  # noqa: E402
from test_huggingface import RandomTokens, make_model  # noqa: E402

torch.set_num_threads(1)
PATIENCE_S = 120.0


def make_trainer(output_dir: Path, callbacks: list[Any], **overrides: Any) -> Any:
    """test_huggingface's job, with 8 fixed samples to evaluate on."""
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir), learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=2,
        weight_decay=0.01, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        dataloader_num_workers=0, seed=7, data_seed=11, save_strategy="no", disable_tqdm=True,
    )
    kwargs.update(overrides)
    return Trainer(model=make_model(), args=TrainingArguments(**kwargs), train_dataset=RandomTokens(),
                   eval_dataset=RandomTokens(8), callbacks=callbacks)


class Watcher(MetricsFollower, TrainerCallback):
    """Follows the run with WatchMetrics from step 0 on a thread (started once lrctl
    serves: put it after the LRControlCallback); `metrics` maps step -> name -> value."""

    def __init__(self, lrctl_cb: LRControlCallback) -> None:
        super().__init__(PATIENCE_S)
        self.cb = lrctl_cb

    def on_train_begin(self, args, state, control, **kwargs):
        self.start(self.cb.address)


def numeric(entry: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in entry.items()
            if k != "step" and not k.startswith("lrctl/") and isinstance(v, (int, float))}


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def test_trainer_logs_reach_watch_metrics_at_lrctl_steps(tmp_path: Path) -> None:
    cb = LRControlCallback("127.0.0.1:0")
    watcher = Watcher(cb)
    trainer = make_trainer(tmp_path, [cb, watcher], max_steps=12, logging_steps=4,
                           gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=6,
                           per_device_eval_batch_size=4)
    trainer.train()
    watcher.join()
    assert cb.control.step == trainer.state.global_step == 12  # updates, not micro-batches
    entries = [e for e in trainer.state.log_history if numeric(e)]
    kinds = {k for e in entries for k in e}
    assert {"loss", "grad_norm", "learning_rate", "epoch", "eval_loss", "train_loss"} <= kinds
    for entry in entries:
        got = watcher.metrics.get(entry["step"] - 1, {})  # logged after global_step += 1
        for key, value in numeric(entry).items():
            assert key in got, f"{key} of the log at global_step {entry['step']} not at lrctl step {entry['step'] - 1}"
            if key != "epoch":  # logged at several steps alike: the last one per step wins
                assert same(got[key], value), (key, entry["step"], got[key], value)
    # lrctl's own keys are not reported back, and strings never are.
    assert not any(k.startswith("lrctl/") for m in watcher.metrics.values() for k in m)


def test_report_metrics_false_reports_nothing(tmp_path: Path) -> None:
    cb = LRControlCallback("127.0.0.1:0", report_metrics=False)
    trainer = make_trainer(tmp_path, [cb], max_steps=4, logging_steps=2)
    trainer.train()
    assert cb.control.telemetry.last_values() == {}


class RateRecorder(TrainerCallback):
    """Per optimizer step, the rate of each parameter (by name) and its group's, read in a
    step pre-hook registered at the first step (after lrctl's: what the step uses)."""

    def __init__(self) -> None:
        self.rates: list[dict[str, float]] = []
        self._hooked = False

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._hooked:
            return
        self._hooked = True
        names = {id(p): n for n, p in model.named_parameters()}

        def record(opt: torch.optim.Optimizer, *_: Any) -> None:
            self.rates.append({names[id(p)]: float(g["lr"]) for g in opt.param_groups for p in g["params"]})

        unwrap_optimizer(optimizer).register_step_pre_hook(record)


PLATEAU = dict(max_steps=14, lr_scheduler_type="reduce_lr_on_plateau", warmup_steps=0,
               # every evaluation but the first is "not better": a reduction per evaluation
               lr_scheduler_kwargs={"factor": 0.5, "patience": 0, "threshold": 100.0,
                                    "threshold_mode": "abs"},
               eval_strategy="steps", eval_steps=4,
               per_device_eval_batch_size=4, logging_steps=4)


def test_reduce_lr_on_plateau_trainer_matches_plain_trainer(tmp_path: Path) -> None:
    plain = RateRecorder()
    reference = make_trainer(tmp_path / "plain", [plain], **PLATEAU)
    reference.train()

    cb, recorder = LRControlCallback("127.0.0.1:0"), RateRecorder()
    trainer = make_trainer(tmp_path / "lrctl", [cb, recorder], **PLATEAU)
    trainer.train()

    assert recorder.rates == plain.rates and len(plain.rates) == 14
    distinct = sorted({r for step in plain.rates for r in step.values()}, reverse=True)
    assert distinct == [1e-3, 5e-4, 2.5e-4]  # evaluations at 4 (best), 8 and 12
    for a, b in zip(trainer.model.parameters(), reference.model.parameters()):
        assert torch.equal(a, b)
    records = [r for r in cb.control.controller.history(0, 100)[0] if r.role == "schedule"]
    assert [r.step for r in records] == [8, 12]  # the updates after the evaluations at 8, 12
    assert all(r.user == "schedule" and "ReduceLROnPlateau" in r.reason for r in records)
    assert [(c.old_lr, c.new_lr) for c in cb.control.controller.rate_changes(records[0], 100)][0] == (1e-3, 5e-4)
