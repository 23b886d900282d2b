"""lrctl for Hugging Face ``transformers.Trainer``: one callback.

The lines you add::

    from lrctl.integrations.huggingface import LRControlCallback

    trainer = Trainer(model=model, args=args, train_dataset=train_dataset,
                      callbacks=[LRControlCallback(address="127.0.0.1:50051",
                                                   report=["transformer.h.0.*"])])
    trainer.train()            # resume_from_checkpoint=... works too

then, from another terminal: ``lrctl list``, ``lrctl set 'transformer.h.0.*=5e-4'``...

What the callback does:

- ``on_train_begin`` attaches lrctl to the Trainer's model and (unwrapped) optimizer and
  adopts the Trainer's LR scheduler (an Accelerate ``AcceleratedScheduler`` is unwrapped
  to its ``.scheduler``): the Trainer keeps stepping it, and every name follows it at its
  own base rate, also after lrctl splits or merges param groups. It logs the address at
  INFO level. When resuming (``trainer.train(resume_from_checkpoint=...)``) the Trainer
  has already loaded optimizer.pt, which carries lrctl's state (bases, pins, step,
  history, changes still waiting for their step), so attach restores it. With
  ``resume="code"`` the names get the Trainer's own base rates back (its scheduler's
  base rates, which the Trainer itself restores from scheduler.pt), dropping the bases
  and pins set remotely; step, history and waiting changes resume all the same. An
  attach that fails raises (RuntimeError naming the cause): training does not start
  without control.
- ``on_log`` adds ``lrctl/step`` and, per selector in ``report``, ``lrctl/lr/<selector>``:
  the rate of the first name the selector matches, to the logs (and to that entry of
  ``trainer.state.log_history``). The Trainer runs its ``report_to`` loggers
  (TensorBoard, W&B, ...) before the callbacks you pass, so they see a log before this
  callback adds to it; to have lrctl's keys reach them, move the callback first::

      trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(LRControlCallback))

  (Its ``on_train_end`` then runs first too.)
- ``on_log`` also reports what the Trainer logs (``loss``, ``grad_norm``,
  ``learning_rate``, ``epoch``, ``eval_loss`` and the other ``eval_*`` metrics, the
  final ``train_*`` summary...) to lrctl (``LRControl.report``), for ``lrctl watch`` and
  ``LRClient.watch_metrics``: numbers only (strings and the like are skipped, as are
  names lrctl cannot take: longer than 64 characters or with a space), at lrctl's
  step of the update just made, ``lrctl.step - 1``, i.e. ``global_step - 1``: the
  Trainer logs after ``global_step += 1``, so its ``"step": 10`` is lrctl's step 9,
  also for an evaluation run after that update, and with gradient accumulation (both
  count updates). ``report_metrics=False`` turns it off.
- ``lr_scheduler_type="reduce_lr_on_plateau"``: the Trainer builds a
  ``ReduceLROnPlateau`` and steps it itself after each evaluation with
  ``metric_for_best_model`` (``eval_loss`` by default); the callback adopts it like any
  other scheduler, so every name follows its reductions at its own base, each
  reduction is in lrctl's history (role "schedule") at the update it first applies
  to, and its counters ride in optimizer.pt. (Do not pass ``plateau_metric``: the
  Trainer already feeds it.)
- ``on_train_end`` closes: stops serving and detaches lrctl's hooks (the optimizer keeps
  the rates it has).

Steps: ``state.global_step`` counts optimizer updates the Trainer attempted, lrctl's
``LRControl.step`` (and ``lrctl/step``, ``--at-step``) counts ``optimizer.step()`` calls
that happened. They agree (also with gradient accumulation, where both count updates,
not micro-batches) unless a GradScaler skips steps on inf/NaN gradients (fp16): those are
not counted by lrctl, so lrctl's step then trails ``global_step``. ``--at-step S`` applies
right before lrctl's step S, i.e. to the update that makes ``global_step`` S + 1. lrctl's
step is saved in optimizer.pt, so a resumed run goes on counting where it stopped; with
a checkpoint saved without lrctl, lrctl counts on from ``global_step``.

Rates in the logs: the Trainer's own ``learning_rate`` is the scheduler's rate of param
group 0 (of the Trainer's original grouping) for the update just made; it knows nothing
of the rates you set. ``lrctl/lr/<selector>`` is what that name really trains at: its pin,
else its base x the scheduler's factor, for the next update: one scheduler tick after
``learning_rate``, and without changes queued for a step (``--at-step``) that has not
begun, even the next one (they apply as it begins).

If training raises, the Trainer calls no callback (it has no ``on_exception``): lrctl
stays attached and serving until the process exits (attach registers
``LRControl.close`` with ``atexit``), until the next ``trainer.train()`` with this
callback (which closes the old one first), or until you call ``callback.close()``. In a
notebook, use the callback as a context manager (``with LRControlCallback() as cb:``) or
call ``close()`` in a ``finally``.

Multi-process training (DDP, FSDP, DeepSpeed) is not supported yet: every rank must
apply a change at the same step, and lrctl serves and applies on one process only.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from lrctl.server.control import LRControl, attach
from lrctl.server.factory import DEFAULT_ADDRESS
from lrctl.server.telemetry import MAX_METRICS_PER_REPORT, reportable

__all__ = ["LRControlCallback"]

log = logging.getLogger("lrctl.integrations.huggingface")

LOG_PREFIX = "lrctl/lr/"
STEP_KEY = "lrctl/step"


def _inner_scheduler(scheduler: Any) -> Any:
    """The torch scheduler inside Accelerate's AcceleratedScheduler (at most a few levels)."""
    try:
        from accelerate.scheduler import AcceleratedScheduler
    except ImportError:  # no accelerate, no wrapper
        return scheduler
    for _ in range(4):
        if not isinstance(scheduler, AcceleratedScheduler):
            break
        scheduler = scheduler.scheduler
    return scheduler


class LRControlCallback(TrainerCallback):
    """Put a ``transformers.Trainer`` run under lrctl's control (see the module docstring).

    `address`: where to serve ("127.0.0.1:0" picks a free port; read ``.port`` after
    training began). `resume`: whose rates win when resuming from a checkpoint,
    "checkpoint" (default) or "code". `report`: selectors whose rate ``on_log`` adds as
    ``lrctl/lr/<selector>``. `report_metrics`: report the Trainer's logged numbers to
    lrctl's metrics stream (``lrctl watch``). Other keyword arguments go to ``lrctl.server.attach``
    (``insecure``, ``history_limit``, ``max_workers``, ``serve``...; ``scheduler=`` to
    adopt another scheduler than the Trainer's).

    Names are those of ``model.named_parameters()``: a tied weight has one name (GPT-2's
    ``lm_head.weight`` is ``transformer.wte.weight``). After attach: ``.control`` (the
    LRControl: ``.step``, ``.controller``, ``.resume_report``...), ``.address``, ``.port``.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        resume: str = "checkpoint",
        report: Iterable[str] = (),
        report_metrics: bool = True,
        **attach_kwargs: Any,
    ) -> None:
        if isinstance(report, str):
            report = [report]
        self.report: tuple[str, ...] = tuple(report)
        self.report_metrics = bool(report_metrics)
        self._report_failed = False
        self._address = address
        self._resume = resume
        self._attach_kwargs = attach_kwargs
        self.control: Optional[LRControl] = None

    # -- what attach gave ----------------------------------------------------------------
    def _attached(self) -> LRControl:
        if self.control is None:
            raise RuntimeError("lrctl is not attached yet: it attaches when training begins")
        return self.control

    @property
    def address(self) -> str:
        """host:port lrctl serves on (the bound port when given port 0)."""
        return self._attached().address

    @property
    def port(self) -> int:
        return self._attached().port

    # -- Trainer events --------------------------------------------------------------------
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        self.close()  # a previous train() that raised left it attached
        if getattr(args, "world_size", 1) > 1:
            raise RuntimeError(
                f"lrctl: LRControlCallback does not support multi-process training yet "
                f"(world size {args.world_size}): every rank must apply a change at the same "
                "step, and lrctl applies changes on one process only. Remove the callback or "
                "train on one process"
            )
        if model is None or optimizer is None:
            raise RuntimeError(
                "lrctl: the Trainer gave LRControlCallback no model or optimizer at "
                "on_train_begin; cannot attach"
            )
        options = dict(self._attach_kwargs)
        scheduler = options.pop("scheduler", lr_scheduler)
        if scheduler is not None:
            scheduler = _inner_scheduler(scheduler)
        if (options.get("plateau_metric") is not None and "scheduler" not in self._attach_kwargs
                and scheduler is not None and scheduler is _inner_scheduler(lr_scheduler)):
            raise RuntimeError(
                f"lrctl: plateau_metric {options['plateau_metric']!r} would feed the Trainer's "
                "ReduceLROnPlateau a second time: the Trainer steps it itself after each "
                "evaluation (metric_for_best_model). Drop plateau_metric")
        try:
            # A checkpoint's lrctl state (the Trainer loaded optimizer.pt already) wins over
            # start_step; without one, lrctl counts on from the Trainer's step.
            ctl = attach(model, optimizer, scheduler=scheduler, address=self._address,
                         resume=self._resume, start_step=state.global_step, **options)
        except Exception as exc:
            raise RuntimeError(f"lrctl could not attach to the Trainer's optimizer: {exc}") from exc
        self.control = ctl
        try:
            for selector in self.report:  # a typo fails now, not silently in every log
                ctl.controller.read([selector])
        except Exception as exc:
            self.close()
            raise RuntimeError(f"lrctl: report selector {selector!r}: {exc}") from exc
        try:
            where = ctl.address
        except RuntimeError:  # attached with serve=False
            where = "nowhere (serve=False)"
        # (What a resume could not match is logged by lrctl as it resumes: ctl.resume_report.)
        log.info("lrctl: serving learning rates on %s (step %d)", where, ctl.step)
        if ctl.step != state.global_step:
            log.warning(
                "lrctl: lrctl's step is %d but the Trainer's global_step is %d (a checkpoint "
                "without lrctl's state, or steps a GradScaler skipped): --at-step and the steps "
                "lrctl reports count lrctl's steps", ctl.step, state.global_step)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Optional[dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        ctl = self.control
        if ctl is None or logs is None:
            return
        if self.report_metrics:
            self._report(ctl, logs)
        added: dict[str, Any] = {STEP_KEY: ctl.step}
        for selector in self.report:
            try:
                rows, _, _ = ctl.controller.read([selector])
            except Exception as exc:  # a log line must never end training
                log.warning("lrctl: cannot read %r for the logs: %s", selector, exc)
                continue
            if rows:
                added[LOG_PREFIX + selector] = rows[0].lr
        # Trainer.log() put a copy of `logs` into log_history just before on_log; put the
        # values there too (trainer_state.json), when that entry is this one.
        history = state.log_history
        if (history and history[-1].get("step") == state.global_step
                and set(history[-1]) - {"step"} <= set(logs)):
            history[-1].update(added)
        logs.update(added)

    def _report(self, ctl: LRControl, logs: dict[str, Any]) -> None:
        """The numbers of one Trainer log to lrctl's metrics stream, at the update just made."""
        scalars: dict[str, Any] = {}
        for key, value in logs.items():
            if len(scalars) == MAX_METRICS_PER_REPORT:
                break
            value = reportable(key, value)
            if value is not None:
                scalars[key] = value
        if not scalars:
            return
        try:
            ctl.report(step=max(ctl.step - 1, 0), **scalars)
        except Exception as exc:  # reporting must never end training
            if not self._report_failed:
                self._report_failed = True
                log.warning("lrctl: reporting the Trainer's logs failed (said once): %s", exc)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self.close()

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop serving and detach (the optimizer keeps its rates); harmless if not attached.

        The LRControl stays readable as ``.control`` (its controller's history, rates)."""
        if self.control is not None:
            self.control.close()

    def __enter__(self) -> "LRControlCallback":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
