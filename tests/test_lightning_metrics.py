"""The Lightning callback reports what the module logs; ReduceLROnPlateau is adopted.

Real Lightning fits of test_lightning's tiny module (CPU). A watcher follows the run
with ``LRClient.watch_metrics`` over gRPC from step 0.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

L = pytest.importorskip("lightning")

import torch  # noqa: E402
from torch.optim import lr_scheduler as lrs  # noqa: E402

from lrctl.integrations.lightning import LRControlCallback  # noqa: E402
from conftest import MetricsFollower  # noqa: E402
from test_lightning import Net, Recorder, loader, weights  # noqa: E402

torch.set_num_threads(1)
PATIENCE_S = 120.0


class Logging(Net):
    """Logs train_loss (on_step and on_epoch), a constant, and val_loss; remembers, per
    lrctl step it expects, the value it logged last for that step."""

    def __init__(self, style: str = "dict-step") -> None:
        super().__init__(style)
        self.train_at: dict[int, float] = {}
        self.val_at: dict[int, float] = {}

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        # Inside the optimizer step (or before it, when accumulating): this batch's
        # gradients go into the update lrctl counts as trainer.global_step.
        self.train_at[self.trainer.global_step] = loss.item()
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        loss = (self(x) - y).square().mean()
        self.log("val_loss", loss)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            value = self.trainer.callback_metrics["val_loss"]
            self.val_at[self.trainer.global_step - 1] = float(value)  # after that many updates


class Watcher(MetricsFollower, L.Callback):
    """Follows the run with WatchMetrics from step 0 (put it after the LRControlCallback)."""

    def __init__(self, lrctl_cb: LRControlCallback) -> None:
        super().__init__(PATIENCE_S)
        self.cb = lrctl_cb

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.start(self.cb.control.address)


def fit(root: Path, module: Net, callbacks: list, **kwargs: Any) -> Any:
    options: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_steps=12, logger=False, callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=str(root), deterministic=True, log_every_n_steps=1, num_sanity_val_steps=1)
    options.update(kwargs)
    trainer = L.Trainer(**options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|LeafSpec|weights_only|does not have many workers|monitor).*")
        trainer.fit(module, loader(), loader())
    return trainer


def test_module_logs_reach_watch_metrics_at_lrctl_steps(tmp_path: Path) -> None:
    cb = LRControlCallback("127.0.0.1:0", report=("head.weight",))
    watcher = Watcher(cb)
    L.seed_everything(0, verbose=False)
    module = Logging()
    trainer = fit(tmp_path, module, [cb, watcher], accumulate_grad_batches=2, val_check_interval=4)
    watcher.join()
    assert cb.control.step == trainer.global_step == 12
    got = watcher.metrics
    assert sorted(module.train_at) == list(range(12))
    for step, loss in module.train_at.items():  # the last micro-batch of each update
        assert got[step]["train_loss_step"] == loss, step
    assert module.val_at and all(got[s]["val_loss"] == v for s, v in module.val_at.items())
    epoch_ends = [s for s, m in got.items() if "train_loss_epoch" in m]
    # 10 batches an epoch, 2 a step: after updates 5 and 10, and where max_steps ended the fit
    assert epoch_ends == [4, 9, 11]
    names = {k for m in got.values() for k in m}
    assert "train_loss" not in names  # the bare name of an on_step + on_epoch metric
    assert not any(k.startswith("lrctl/") for k in names)


def test_report_metrics_false_reports_nothing(tmp_path: Path) -> None:
    cb = LRControlCallback("127.0.0.1:0", report_metrics=False)
    L.seed_everything(0, verbose=False)
    fit(tmp_path, Logging(), [cb], max_steps=3)
    assert cb.control.telemetry.last_values() == {}


class Plateau(Logging):
    """ReduceLROnPlateau on train_loss every step; every step but the first "not better"."""

    def configure_optimizers(self) -> Any:
        opt = self.make_optimizer()
        plateau = lrs.ReduceLROnPlateau(opt, factor=0.5, patience=0, threshold=100.0, threshold_mode="abs")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "train_loss_step",
                                                   "interval": "step"}}


def test_reduce_lr_on_plateau_matches_plain_lightning(tmp_path: Path) -> None:
    plain = Recorder()
    L.seed_everything(0, verbose=False)
    reference = Plateau()
    fit(tmp_path / "plain", reference, [plain], max_steps=6)

    cb, recorder = LRControlCallback("127.0.0.1:0"), Recorder()
    L.seed_everything(0, verbose=False)
    module = Plateau()
    fit(tmp_path / "lrctl", module, [cb, recorder], max_steps=6)

    assert recorder.rates == plain.rates and len(plain.rates) == 6
    assert plain.rates[0]["head.weight"] == 3e-3 and plain.rates[3]["head.weight"] == 3e-3 * 0.5**2
    for (n, a), (_, b) in zip(weights(module).items(), weights(reference).items()):
        assert torch.equal(a, b), n
    records = [r for r in cb.control.controller.history(0, 100)[0] if r.role == "schedule"]
    assert [r.step for r in records] == [2, 3, 4, 5]  # Lightning steps it after each update
