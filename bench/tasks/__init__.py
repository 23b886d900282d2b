"""The controller benchmark tasks (issue 14): chargpt and digits.

A task is a training job of fixed size: `build(seed, peak_lr)` gives a job with
`.model`, `.optimizer` (every group at `peak_lr`), `.train_step()` (one optimizer step,
returns the detached loss) and `.evaluate()` (validation loss, float). The learning-rate
schedule is not the job's: lrctl applies it (`schedule(steps)`, warmup + cosine to 0.1x,
as nanoGPT), so that a controller sees and changes it like any other rate.

Imported by bench scripts with bench/ on sys.path (`from tasks import TASKS`); torch is
imported by the task modules, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["TASKS", "Task", "get_task"]


@dataclass(frozen=True)
class Task:
    """A benchmark task: its job factory, step budget and schedule shape."""

    name: str
    steps: int  # the fixed budget
    warmup_steps: int
    eval_every: int
    rate_name: str  # the representative name whose per-step rate a result carries
    center_lr: float  # the middle of the sweep's grid (a known-good rate)
    final_factor: float = 0.1  # cosine ends at this fraction of the peak (nanoGPT: min_lr = lr/10)
    build: Callable[[int, float], Any] = None  # type: ignore[assignment]

    def warmup_steps_for(self, steps: int) -> int:
        """Warmup scales with a shortened budget (a smoke run of 20 steps warms 1)."""
        return max(1, round(self.warmup_steps * steps / self.steps))

    def schedule(self, steps: int | None = None) -> Any:
        """lrctl's warmup + cosine for a run of `steps` (default: the task's budget).

        The warmup starts at 1/(warmup+1), not 0, so step 0 trains (nanoGPT's
        lr * (it+1)/(warmup_iters+1))."""
        from lrctl.common.schedules import Warmup

        steps = self.steps if steps is None else steps
        warmup = self.warmup_steps_for(steps)
        return Warmup(warmup_steps=warmup, total_steps=max(steps, warmup + 1), decay="cosine",
                      start_factor=1.0 / (warmup + 1), final_factor=self.final_factor)


def _chargpt(seed: int, peak_lr: float) -> Any:
    from tasks.chargpt import CharGPTJob

    return CharGPTJob(seed, peak_lr)


def _digits(seed: int, peak_lr: float) -> Any:
    from tasks.digits import DigitsJob

    return DigitsJob(seed, peak_lr)


TASKS: dict[str, Task] = {
    "chargpt": Task("chargpt", steps=600, warmup_steps=30, eval_every=100,
                    rate_name="h.1.attn.c_attn.weight", center_lr=3e-3, build=_chargpt),
    "digits": Task("digits", steps=4000, warmup_steps=200, eval_every=500,
                   rate_name="fc2.weight", center_lr=0.1, build=_digits),
}


def get_task(name: str) -> Task:
    """The task called `name`; ValueError naming the known ones otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None
