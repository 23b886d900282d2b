"""lrctl in a Lightning job: ``LRControlCallback``.

The lines you add (``pip install 'lrctl[lightning]'``)::

    from lrctl.integrations.lightning import LRControlCallback

    trainer = L.Trainer(..., callbacks=[LRControlCallback(address="127.0.0.1:50051",
                                                          report=("encoder.*", "head.weight"))])
    trainer.fit(module)                        # or trainer.fit(module, ckpt_path=...)

Then, from anywhere that reaches the address: ``lrctl list``, ``lrctl set
'head.*=1e-3' --at-step 5000 --no-wait``, or ``LRClient`` (README). Nothing else in
the LightningModule changes: ``configure_optimizers`` returns its optimizer and
scheduler as usual (``{"optimizer": opt, "lr_scheduler": sched}``,
``{"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}`` or
``([opt], [sched])``). The callback attaches lrctl to the module's parameters (names
are the LightningModule's own, ``self.named_parameters()``) and to the one optimizer,
and adopts the one scheduler: Lightning keeps calling ``scheduler.step()`` at its
interval and lrctl installs the scheduler's rates per name, times any remote change.
It serves from ``on_fit_start`` (see below for the one case of ``on_train_start``)
until ``on_fit_end`` (or ``on_exception``);
``callback.control`` is the ``LRControl`` (``.step``, ``.address``, ``.port``,
``.controller``, ``.resume_report``), and stays readable after fit.

**Steps.** ``trainer.global_step`` counts the optimizer steps Lightning took and
``LRControl.step`` counts the ``optimizer.step()`` calls lrctl saw; both are restored
from a checkpoint (lrctl's count rides inside the optimizer state). In callbacks and
hooks outside the optimizer step (``on_train_batch_start``/``_end``, ...) they are
equal: the index of the next optimizer step. A change sent with ``at_step=S`` is in
force for the optimizer step Lightning takes while ``trainer.global_step == S``, and
after. Inside ``training_step`` (automatic optimization runs it as the closure *inside*
``optimizer.step()``, after lrctl's step pre-hook) ``LRControl.step`` is already
``global_step + 1``. They drift apart when a step is not taken: an fp16 ``GradScaler``
that skips a step (inf/NaN gradients) still counts in ``global_step``, not in lrctl.
A run resumed from a checkpoint saved *without* lrctl starts lrctl's count at 0 while
``global_step`` goes on (below; the callback warns).

**Logging rates by name.** ``report=("encoder.*", "head.weight")`` logs, every
``log_every_n_steps``, ``lrctl/lr/<selector>``: the rate the optimizer step of that
batch used for the first name (model order) the selector matches, through
``pl_module.log`` (so it lands on the same logger step as that batch's loss, and in
``trainer.callback_metrics``). Prefer it to ``LearningRateMonitor``, whose labels
follow param groups *by position* (``lr-AdamW/pg2``): lrctl keeps one param group per
distinct set of hyperparameters, so a remote change that splits or merges groups
silently relabels (and re-counts) the real optimizer's ``lr-AdamW/pgN``; it also reads
those groups at batch start, before lrctl's step hook installs the coming step's
rates, so its values lag one step. With an adopted scheduler, LearningRateMonitor
also reads the scheduler's stand-in optimizer (``lr-_ShadowOptimizer/pgN``): the
scheduler's rates per original group, blind to remote changes.

**Metrics.** What the module logs (``self.log``) goes to lrctl's metrics stream too
(``LRControl.report``; ``lrctl watch``, ``LRClient.watch_metrics``), read from
``trainer.callback_metrics``: at ``on_train_batch_end`` the values logged by that
batch, at ``on_validation_end`` the validation metrics, at ``on_train_epoch_end`` the
epoch aggregates. A value is reported when its tensor is new since the last read (no
device sync: tensors are converted only when someone listens). Of a metric logged
with both ``on_step`` and ``on_epoch``, the ``_step`` and ``_epoch`` names are
reported, not the bare name (whose value flips from one to the other). Steps are
lrctl's: a batch that took an optimizer step reports at that step (``LRControl.step -
1``), a batch still accumulating gradients at the step it accumulates for
(``LRControl.step``); validation and epoch ends at the last step taken. Non-numeric
values, names lrctl cannot take and lrctl's own ``lrctl/lr/*`` are skipped.
``report_metrics=False`` turns it off.

**ReduceLROnPlateau.** A module returning ``{"optimizer": opt, "lr_scheduler":
{"scheduler": ReduceLROnPlateau(opt), "monitor": "val_loss"}}`` is adopted like any
scheduler: Lightning keeps stepping it with the monitored value at its interval, every
name follows its reductions at its own base, each reduction is recorded in lrctl's
history (role "schedule") at the optimizer step it first applies to, and its counters
ride in the optimizer's checkpoint.

**Checkpoints.** Nothing to do: lrctl's state (bases, pins, schedules, step, history
tail, changes still waiting for their step) rides inside ``optimizer.state_dict()``,
which Lightning saves, in the module's original param grouping, so a checkpoint taken
while lrctl had regrouped also loads into a plain Lightning run. Save them during fit
(``ModelCheckpoint``, or ``trainer.save_checkpoint`` from a callback): once fit ends
lrctl is detached, and a ``trainer.save_checkpoint`` after ``trainer.fit`` saves the
optimizer in lrctl's live grouping, without lrctl's state (an lrctl limitation).

**Where it attaches, and why.** Lightning 2.6 runs ``setup`` -> (``ckpt_path``:
``on_load_checkpoint``) -> ``configure_optimizers`` (optimizers and
``trainer.lr_scheduler_configs`` now exist) -> ``on_fit_start`` ->
``restore_training_state()`` (optimizer state, then scheduler state, then loops) ->
sanity check -> ``on_train_start``. The callback attaches in ``on_fit_start``, before
the restore: the checkpoint's optimizer state then goes through lrctl's load hooks,
which map it into the live groups by parameter name and restore lrctl's state
(including the adopted scheduler's last rates) before any step and before any
callback's ``on_train_start``, where ``control.step == trainer.global_step`` holds.
Lightning loads the scheduler's counters next; adoption left the scheduler's identity
alone, so that load lands where it should. (Attaching after the restore works for
lrctl checkpoints too: attach finds lrctl's state in the loaded group dicts.)
One exception: a checkpoint saved *without* lrctl (a run you now put under lrctl)
carries no lrctl state, and loading it through lrctl would keep the freshly built
rates, while a chainable torch scheduler continues from the *restored* group rates.
``on_load_checkpoint`` sees this, and the callback then attaches in ``on_train_start``,
after torch's own load, so the adopted scheduler starts from the restored rates, and
lrctl counts steps on from ``trainer.global_step``.

Single process only: lrctl does not yet broadcast changes to every rank, so the
callback refuses ``trainer.world_size > 1``.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Optional, Sequence

import torch

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "lrctl.integrations.lightning needs Lightning: pip install 'lrctl[lightning]'"
    ) from exc

from lrctl.server.wrappers import unwrap_optimizer
from lrctl.server.control import LRControl, attach
from lrctl.server.factory import DEFAULT_ADDRESS
from lrctl.server.rates import rate_of
from lrctl.server.resume import STATE_KEY
from lrctl.server.telemetry import MAX_METRICS_PER_REPORT, reportable

__all__ = ["LRControlCallback", "METRIC_PREFIX"]

log = logging.getLogger("lrctl.integrations.lightning")

METRIC_PREFIX = "lrctl/lr/"

# attach() arguments the callback decides itself.
_OWN = frozenset({"model", "optimizer", "scheduler", "address", "resume"})


class LRControlCallback(pl.Callback):
    """Put a Lightning fit under lrctl's control (see the module docstring).

    `address`, `resume` and `attach_kwargs` (``insecure``, ``serve``,
    ``history_limit``, ``max_workers``) go to ``lrctl.server.attach``. `report` is a
    sequence of selectors whose rate (of the first name each matches) is logged as
    ``lrctl/lr/<selector>`` every ``log_every_n_steps``. `report_metrics` reports what
    the module logs to lrctl's metrics stream (see "Metrics" in the module docstring).
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        resume: str = "checkpoint",
        report: Sequence[str] = (),
        report_metrics: bool = True,
        **attach_kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(report, str):
            report = (report,)
        accepted = set(inspect.signature(attach).parameters) - _OWN
        unknown = sorted(set(attach_kwargs) - accepted)
        if unknown:
            raise TypeError(
                f"LRControlCallback got unexpected argument(s) {', '.join(unknown)}; it passes "
                f"address, resume and {', '.join(sorted(accepted))} to lrctl's attach (the model, "
                "optimizer and scheduler come from the LightningModule)"
            )
        self.address = address
        self.resume = resume
        self.report: tuple[str, ...] = tuple(report)
        self.attach_kwargs = dict(attach_kwargs)
        self.control: Optional[LRControl] = None
        self._trainer: Optional[pl.Trainer] = None
        self._report_names: list[str] = []  # first name each selector matches
        self._hook: Any = None
        self._captured: Optional[dict[str, float]] = None
        self._defer = False  # attach in on_train_start instead of on_fit_start
        self._capture_failed = False
        self.report_metrics = bool(report_metrics)
        self._seen: dict[str, Any] = {}  # callback_metrics as last read: what is new since
        self._batch_start_step = 0
        self._report_failed = False

    # -- attach ------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._defer = False

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Runs before configure_optimizers. A checkpoint saved without lrctl has no lrctl
        # state: attach after torch's own load then, so the adopted scheduler starts from
        # the group rates it restored (see the module docstring).
        groups = [g for state in checkpoint.get("optimizer_states") or () for g in state.get("param_groups", ())]
        self._defer = bool(groups) and not any(STATE_KEY in g for g in groups)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()  # a second fit() with the same callback attaches afresh
        self.control = None
        if not self._defer:
            self._attach(trainer, pl_module)

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule, start_step: int = 0) -> None:
        if trainer.world_size > 1:
            raise RuntimeError(
                f"LRControlCallback supports single-process training; this trainer has "
                f"world_size {trainer.world_size}. lrctl does not yet apply a change on every "
                "rank at the same step"
            )
        optimizers = list(trainer.optimizers)
        if len(optimizers) != 1:
            raise ValueError(
                f"LRControlCallback controls exactly one optimizer; configure_optimizers gave "
                f"{len(optimizers)} optimizers. Put the parameters in one optimizer with one "
                "param group per rate (lrctl addresses them by name)"
            )
        configs = list(trainer.lr_scheduler_configs)
        if len(configs) > 1:
            raise ValueError(
                f"LRControlCallback adopts at most one LR scheduler; configure_optimizers gave "
                f"{len(configs)} schedulers. Combine them into one (torch's SequentialLR or "
                "ChainedScheduler)"
            )
        scheduler = configs[0].scheduler if configs else None
        control = attach(
            pl_module,
            optimizers[0],
            scheduler=scheduler,
            address=self.address,
            resume=self.resume,
            start_step=start_step,
            **self.attach_kwargs,
        )
        self.control = control
        self._trainer = trainer
        self._seen = dict(trainer.callback_metrics)  # what was logged before lrctl is not news
        try:
            self._report_names = [self._first_name(selector) for selector in self.report]
        except BaseException:
            self._close()
            raise
        if self._report_names:
            # Registered after attach, so it runs right after lrctl's own step pre-hook:
            # the step's changes are applied and the scheduler has not stepped yet.
            optimizer = unwrap_optimizer(optimizers[0])
            self._hook = optimizer.register_step_pre_hook(self._capture)

    def _first_name(self, selector: str) -> str:
        assert self.control is not None
        try:
            rows, _, _ = self.control.controller.read([selector])
        except Exception as exc:
            raise ValueError(f"LRControlCallback report selector {selector!r}: {exc}") from exc
        return rows[0].name

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._defer:
            self._defer = False
            # No lrctl state to restore the step from: count on from Lightning's.
            self._attach(trainer, pl_module, start_step=trainer.global_step)
        control = self.control
        if control is not None and control.step != trainer.global_step:
            log.warning(
                "lrctl: lrctl counts optimizer steps from %d but trainer.global_step is %d (the "
                "checkpoint was saved without lrctl, or an fp16 GradScaler skipped steps): a "
                "change sent with at_step S applies at lrctl's step S, i.e. at global_step S + %d",
                control.step, trainer.global_step, trainer.global_step - control.step,
            )

    # -- logging by name -------------------------------------------------------------
    def _log_due(self) -> bool:
        trainer = self._trainer
        connector = getattr(trainer, "_logger_connector", None)
        try:
            return bool(connector.should_update_logs) if connector is not None else True
        except Exception:  # a Lightning without it: log every step
            return True

    def _capture(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """The rates this optimizer step uses, by name (runs inside optimizer.step())."""
        control = self.control
        if control is None or not self._log_due():
            return
        step = control.step - 1  # lrctl's hook has counted the step being taken
        try:
            # Not controller.read(): it reports the rates of the *next* step (control.step).
            rows, _, _, _ = control.controller.schedules(self._report_names)
            by_name = {row.name: row for row in rows}
            # The table's own rule (pin, else schedule.rate(base, step)); an adopted torch
            # scheduler reports what it installed, since it steps only after this step.
            self._captured = {
                name: rate_of(by_name[name].schedule, by_name[name].base, by_name[name].pin, step)
                for name in self._report_names
            }
        except Exception:  # logging must never cost the training step
            if not self._capture_failed:
                self._capture_failed = True
                log.exception("lrctl: reading the rates to log failed; lrctl/lr/* is not logged")
            self._captured = None

    # -- metrics to lrctl's stream ------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.control is not None:
            self._batch_start_step = self.control.step

    def _report_new(self, trainer: pl.Trainer, step: int, skip_epoch: bool) -> None:
        """Report the callback metrics whose value is new since the last read, at `step`."""
        control = self.control
        if control is None or not self.report_metrics:
            return
        try:
            metrics = trainer.callback_metrics
            seen, self._seen = self._seen, dict(metrics)
            scalars: dict[str, Any] = {}
            for key, value in metrics.items():
                if seen.get(key) is value or key.startswith(METRIC_PREFIX):
                    continue
                if skip_epoch and key.endswith("_epoch"):
                    continue  # an epoch aggregate, reported at the epoch's end
                if f"{key}_step" in metrics or f"{key}_epoch" in metrics:
                    continue  # the bare name of an on_step+on_epoch metric: ambiguous
                value = reportable(key, value)
                if value is None:
                    continue
                scalars[key] = value
                if len(scalars) == MAX_METRICS_PER_REPORT:
                    break
            if scalars:
                control.report(step=max(step, 0), **scalars)
        except Exception as exc:  # reporting must never cost training
            if not self._report_failed:
                self._report_failed = True
                log.warning("lrctl: reporting the module's logged metrics failed (said once): %s", exc)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:  # not a measurement of training: never reported
            self._seen = dict(trainer.callback_metrics)
        elif self.control is not None:
            self._report_new(trainer, self.control.step - 1, skip_epoch=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.control is not None:
            self._report_new(trainer, self.control.step - 1, skip_epoch=False)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._log_rates(pl_module)
        control = self.control
        if control is not None:
            # A batch that stepped reports at that step; one still accumulating, at the
            # step its gradients are for.
            stepped = control.step > self._batch_start_step
            self._report_new(trainer, control.step - 1 if stepped else control.step, skip_epoch=True)

    def _log_rates(self, pl_module: pl.LightningModule) -> None:
        captured, self._captured = self._captured, None
        if not captured:
            return
        for selector, name in zip(self.report, self._report_names):
            # float64 on the CPU: the logged value is the rate itself, not its float32 rounding.
            value = torch.tensor(captured[name], dtype=torch.float64)
            pl_module.log(METRIC_PREFIX + selector, value, on_step=True, on_epoch=False,
                          prog_bar=False, logger=True, batch_size=1)

    # -- detach ------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()  # a backstop; closing twice is harmless

    def _close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._captured = None
        if self.control is not None:
            self.control.close()  # keeps .control readable (controller, history, step)
