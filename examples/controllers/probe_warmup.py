"""Probe warmup: find the peak rate inside the run, then decay as the job planned.

A warmup exists because the rate that is best later would break the fresh network at
step 0; how high it can then go is what a sweep finds. This controller finds it in the
run itself, once, with no second run (Smith's learning-rate range test, done as the
warmup of the real run instead of in a throw-away one):

1. **Ramp.** At step 0 every name's base becomes RAMP_FROM x the job's peak and its
   schedule ``exponential`` with one decade every RAMP_DECADE x (total steps) steps:
   the worker raises the rate at every step, exactly, between the controller's
   decisions.
2. **Stop.** The training loss, smoothed (EMA, SMOOTH), is followed step by step; the
   ramp ends at the first step whose smoothed loss is RISE above the best so far, or
   not finite: the rate has crossed the edge where this network trains stably.
3. **Peak and decay.** The peak is BACKOFF x the rate at that step (the edge less a
   margin: a warmup + cosine peak is held only briefly, so the best one sits just below
   the edge), and from the next decision the rate decays from it to the job's end as the
   job's own schedule would (its cosine or linear decay and final factor, started here).
4. **Guard.** Afterwards, a window whose mean loss is GUARD_JUMP above the best window
   (relative) or not finite cuts the peak by GUARD_CUT: a late blow-up cannot wait.

The starting rate is used only as the ramp's starting point, two decades below it: the
peak found is the same whether the job started at 0.1x, 1x or 10x, which is what makes
a wrong start harmless (the bench's controller table). One rate for all names: the
sweep it replaces is of one peak rate.

Constants (set on seeds 100-101 of both bench tasks, never on the table's seeds 0-2;
the same for SGD and AdamW, and for every start):
  RAMP_FROM = 0.01    the ramp starts two decades below the job's peak
  RAMP_DECADE = 0.03  one decade per 3% of the job's steps
  SMOOTH = 0.8        EMA of the per-step training loss
  RISE = 0.05         the smoothed loss 5% above its best: the edge is crossed
  BACKOFF = 0.5       the peak: half the rate where the loss rose
  GUARD_JUMP = 0.25, GUARD_CUT = 0.5

    python examples/controllers/probe_warmup.py --address 127.0.0.1:PORT --every 5 \\
        --lockstep-timeout 2 --start-file /tmp/go

Lockstep from step 0 matters: the ramp must replace the job's warmup before its first
step. The job's schedule is read from its configuration or, when it is still queued for
step 0 (task_worker queues it so), from its pending changes. Needs the training loss
reported every step (``ctl.report(loss)``) and, with tokens, an admin token.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Optional

from lrctl.client.client import LRClient
from lrctl.client.control_loop import Action, Window, add_controller_arguments, read_job, run_from_args
from lrctl.common.schedules import Exponential, Schedule, Warmup

RAMP_FROM = 0.01
RAMP_DECADE = 0.03
SMOOTH = 0.8
RISE = 0.05
BACKOFF = 0.5
GUARD_JUMP = 0.25
GUARD_CUT = 0.5


def planned_schedule(client: LRClient, name: str) -> Optional[Schedule]:
    """`name`'s schedule in force, else the last one queued for a step not yet reached."""
    in_force = {s.name: s.schedule for s in client.get_schedules(name)}.get(name)
    if in_force is not None:
        return in_force
    queued = [(p.at_step or 0, p.change_id, a.schedule) for p in client.list_pending()
              for a in p.schedules if a.schedule is not None]
    return max(queued, key=lambda q: q[:2])[2] if queued else None


class ProbeWarmup:
    """decide(window): ramp, stop at the edge, then the job's decay from BACKOFF x edge."""

    def __init__(self) -> None:
        self.peak0 = math.nan  # the job's peak (its base): the ramp's only use of the start
        self.planned: Optional[Schedule] = None
        self.total = 0
        self.gamma = 1.0
        self.ramp_start = 0
        self.ema = math.nan
        self.best = math.inf
        self.edge: Optional[tuple[int, float]] = None  # (step, rate) where the loss rose
        self.peak = math.nan
        self.best_window = math.inf
        self.started = False

    def setup(self, client: LRClient) -> None:
        job = read_job(client)
        self.peak0 = max(job.base.values())
        self.planned = planned_schedule(client, job.names[0])
        self.total = getattr(self.planned, "total_steps", 0) or 1000
        self.gamma = 10.0 ** (1.0 / max(1.0, RAMP_DECADE * self.total))

    def _ramp_rate(self, step: int) -> float:
        return self.peak0 * RAMP_FROM * self.gamma ** max(0, step - self.ramp_start)

    def _decay_from(self, step: int) -> Schedule:
        planned = self.planned
        if isinstance(planned, Warmup) and planned.decay != "constant" and planned.total_steps > step + 1:
            return Warmup(warmup_steps=0, total_steps=planned.total_steps - step, decay=planned.decay,
                          final_factor=planned.final_factor, start_step=step)
        return Exponential(gamma=1.0)  # no decay planned: hold the peak

    def __call__(self, window: Window) -> Optional[Action]:
        if not self.started:
            self.started = True
            self.ramp_start = window.step
            return (Action(f"ramp from {self._ramp_rate(0):.3g}, x{self.gamma:.4g} per step")
                    .set_bases({"*": self._ramp_rate(0)}).schedule("*", Exponential(gamma=self.gamma, start_step=self.ramp_start)))
        if self.edge is None:
            for event in window.events:
                loss = event.metrics.get("loss")
                if loss is None:
                    continue
                self.ema = loss if self.ema != self.ema else SMOOTH * self.ema + (1 - SMOOTH) * loss
                if not math.isfinite(self.ema) or self.ema > self.best * (1 + RISE):
                    self.edge = (event.step, self._ramp_rate(event.step))
                    break
                self.best = min(self.best, self.ema)
            if self.edge is None:
                return None
            self.peak = BACKOFF * self.edge[1]
            return self._peak_action(window.step, f"loss rose at step {self.edge[0]} (rate {self.edge[1]:.3g})")
        loss = window.mean("loss")
        if window.values("loss"):
            if not math.isfinite(loss) or loss > self.best_window * (1 + GUARD_JUMP):
                self.peak *= GUARD_CUT
                self.best_window = loss if math.isfinite(loss) else self.best_window
                return self._peak_action(window.step, f"loss {loss:.4g} vs best {self.best_window:.4g}: blow-up")
            self.best_window = min(self.best_window, loss)
        return None

    def _peak_action(self, step: int, why: str) -> Action:
        # The decay restarts at this step from the (new) peak, ending where the job's ends.
        return (Action(f"{why}: peak {self.peak:.3g}").set_bases({"*": self.peak})
                .schedule("*", self._decay_from(step)))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_controller_arguments(parser, every=10)
    args = parser.parse_args(argv)
    controller = ProbeWarmup()
    return run_from_args("probe_warmup", args, controller, setup=controller.setup)


if __name__ == "__main__":
    sys.exit(main())
