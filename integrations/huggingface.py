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
  history, changes still waiting for their step), so attach restores it; ``resume=
  "code"`` keeps the base rates this run was built with instead. An attach that fails
  raises (RuntimeError naming the cause): training does not start without control.
- ``on_log`` adds ``lrctl/step`` and, per selector in ``report``, ``lrctl/lr/<selector>``:
  the rate of the first name the selector matches.
- ``on_train_end`` closes: stops serving and detaches lrctl's hooks (the optimizer keeps
  the rates it has).

Steps: ``state.global_step`` counts optimizer updates the Trainer attempted, lrctl's
``LRControl.step`` (and ``lrctl/step``, ``--at-step``) counts ``optimizer.step()`` calls
that happened. They agree (also with gradient accumulation, where both count updates,
not micro-batches) unless a GradScaler skips steps on inf/NaN gradients (fp16): those are
not counted by lrctl, so lrctl's step then trails ``global_step``. ``--at-step S`` applies
right before lrctl's step S, i.e. to the update that makes ``global_step`` S + 1.

Rates in the logs: the Trainer's own ``learning_rate`` is the scheduler's rate of param
group 0 (of the Trainer's original grouping) for the update just made; it knows nothing
of the rates you set. ``lrctl/lr/<selector>`` is what that name really trains at: its pin,
else its base x the scheduler's factor, for the next update (the one about to be made:
one scheduler tick after ``learning_rate``, and without changes still waiting for a
later step).

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

__all__ = ["LRControlCallback"]

log = logging.getLogger("lrctl.integrations.huggingface")

LOG_PREFIX = "lrctl/lr/"
STEP_KEY = "lrctl/step"


def _inner_scheduler(scheduler: Any) -> Any:
    """The torch scheduler inside Accelerate's AcceleratedScheduler (at most a few levels)."""
    for _ in range(4):
        inner = getattr(scheduler, "scheduler", None)
        if inner is None or inner is scheduler or hasattr(scheduler, "last_epoch"):
            break
        scheduler = inner
    return scheduler


class LRControlCallback(TrainerCallback):
    """Put a ``transformers.Trainer`` run under lrctl's control (see the module docstring).

    `address`: where to serve ("127.0.0.1:0" picks a free port; read ``.port`` after
    training began). `resume`: whose rates win when resuming from a checkpoint,
    "checkpoint" (default) or "code". `report`: selectors whose rate ``on_log`` adds as
    ``lrctl/lr/<selector>``. Other keyword arguments go to ``lrctl.server.attach``
    (``insecure``, ``history_limit``, ``max_workers``, ``serve``...).
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        resume: str = "checkpoint",
        report: Iterable[str] = (),
        **attach_kwargs: Any,
    ) -> None:
        if isinstance(report, str):
            report = [report]
        self.report: tuple[str, ...] = tuple(report)
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
        kwargs_ = dict(self._attach_kwargs)
        scheduler = kwargs_.pop("scheduler", lr_scheduler)
        if scheduler is not None:
            scheduler = _inner_scheduler(scheduler)
        try:
            ctl = attach(model, optimizer, scheduler=scheduler, address=self._address,
                         resume=self._resume, **kwargs_)
        except Exception as exc:
            raise RuntimeError(f"lrctl could not attach to the Trainer's optimizer: {exc}") from exc
        self.control = ctl
        try:
            for selector in self.report:  # a typo fails now, not silently in every log
                ctl.controller.read([selector])
        except Exception as exc:
            self.close()
            raise RuntimeError(f"lrctl: report selector {selector!r}: {exc}") from exc
        where = ctl.address if ctl._server is not None else "not serving (serve=False)"
        log.info("lrctl: serving learning rates on %s (step %d)", where, ctl.step)
        for line in ctl.resume_report:
            log.warning("lrctl: resume: %s", line)

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
        logs[STEP_KEY] = ctl.step
        for selector in self.report:
            try:
                rows, _, _ = ctl.controller.read([selector])
            except Exception as exc:  # a log line must never end training
                log.warning("lrctl: cannot read %r for the logs: %s", selector, exc)
                continue
            if rows:
                logs[LOG_PREFIX + selector] = rows[0].lr

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
