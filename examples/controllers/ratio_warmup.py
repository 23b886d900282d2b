"""Ratio warmup: warm up to a target update size, not to a guessed rate.

What a good peak rate does is move the weights by a certain fraction of their size per
step; which rate does that depends on the model, the optimizer, the batch and the data,
and is what a sweep finds. This controller measures it in the run and sets the peak so
that the whole model's update-to-weight ratio ``||w_{t+1} - w_t|| / ||w_t||`` reaches U
at the end of the job's warmup, then leaves the job's own decay alone:

1. **Probe, for two steps.** At the hold of step 0 every name's base becomes PROBE x
   the job's peak: steps 0 and 1 move the weights by almost nothing, whatever the
   starting rate was (step 0's statistics reach the controller at step 2's hold). No
   longer: a longer pause at the start is what stalled AdamW runs on the character
   model's loss plateau (bench/README.md "ratio_warmup": even the swept fixed schedule
   stalls 2 of 4 tuning seeds after a 5-step pause, none of 8 after a 1-step one), so
   the controller holds the worker at every step until it freezes the base.
2. **Track, during the job's warmup.** At every step the controller reads the worker's
   ``update_ratio`` and ``param_norm`` of every name,
   makes the whole model's ratio from them, and divides it by the rate that step ran at:
   k, how far one unit of rate moves this network now. k drifts while the network
   warms (Adam's normalized steps shrink as the gradients turn to noise) and is noisy
   step to step (SGD), so its log is fitted by least squares over the last FIT of the
   warmup and read at the newest step. The base becomes U / k: the job's warmup factor
   times that base is the rate the worker runs at, step by step, between decisions.
3. **Freeze.** The decision at the end of the warmup fixes the base; the job's decay
   (its cosine and final factor, the worker's own schedule) runs from it, and the
   controller decides every ``--every`` steps from then on.
4. **Guard.** Afterwards a window whose mean loss jumps GUARD_JUMP x the first loss
   above the best window, or is not finite, halves the base.

The starting rate only sets the probe's size (and the first PROBE-sized steps), so a
start at 0.1x or 10x of the best gives the same run to within those first steps. One
rate for all names, as the sweep it replaces.

Constants (set on the bench's tuning seeds 100-103, never on the table's seeds 0-2; see
bench/README.md "ratio_warmup"):
  PROBE = 1e-3                     of the job's peak, for the first window
  FIT = 0.5                        the trailing half of the warmup
  U = 0.025 (SGD), 0.03 (Adam)     the whole model's update ratio per step at the peak
      digits (SGD momentum), seeds 100-103 at 1x: U 0.02 -> 0.0463, 0.025 -> 0.0411,
      0.03 -> 0.0392 but peaks up to 0.40 and 0.035 -> 0.0507 (peaks 0.46-0.49 lose two
      seeds); the fixed schedule at its swept best 0.0458. chargpt (AdamW), seeds
      100-101 at 1x: U 0.025 -> 2.061, 0.03 -> 2.046, 0.035 -> 2.046; fixed 2.030.
      Deciding every step during the warmup (the probe two steps, the statistics two
      steps behind, as the worker's events come), simulated on seeds 100-111 (chargpt
      at 1x) and 100-107 (digits at 0.1x / 1x / 10x): chargpt 2.0296 against the
      fixed schedule's 2.0349, no seed stalled; digits 0.0441 / 0.0448 / 0.0428
      against 0.0471.
  GUARD_JUMP = 0.25, GUARD_CUT = 0.5

    python examples/controllers/ratio_warmup.py --address 127.0.0.1:PORT --every 10 \\
        --lockstep-timeout 2 --start-file /tmp/go

Needs lockstep from step 0 (the probe must be in before the first step), the worker's
``update_ratio`` and ``param_norm`` statistics every step (task_worker --stats-every 1),
the training loss reported for the guard, and, with tokens, an admin token.
"""

from __future__ import annotations

import argparse
import math
from typing import Optional

from lrctl.client.control_loop import (Action, BlowUpGuard, Job, Window, add_controller_arguments, read_job,
                                       run_from_args, exit_process)

PROBE = 1e-3
FIT = 0.5
U = {"sgd": 0.025, "adam": 0.03}
GUARD_JUMP = 0.25
GUARD_CUT = 0.5


def model_ratio(stats: dict[str, dict[str, float]]) -> float:
    """The whole model's update-to-weight ratio from per-name ratios and norms (NaN if none)."""
    moved = size = 0.0
    for v in stats.values():
        ratio, norm = v.get("update_ratio", math.nan), v.get("param_norm", math.nan)
        if math.isfinite(ratio) and math.isfinite(norm) and norm > 0:
            moved += (ratio * norm) ** 2
            size += norm * norm
    return math.sqrt(moved / size) if size > 0 else math.nan


def trend_at(points: list[tuple[int, float]], step: int) -> float:
    """The least-squares line through (step, value) points, read at `step`."""
    n = len(points)
    mx = sum(s for s, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((s - mx) ** 2 for s, _ in points)
    slope = sum((s - mx) * (v - my) for s, v in points) / sxx if sxx > 0 else 0.0
    return my + slope * (step - mx)


class RatioWarmup:
    """decide(window): probe, set the base from the measured update ratio, freeze, guard."""

    def __init__(self, every_after: int = 10) -> None:
        self.every_after = every_after  # the cadence once the base is frozen
        self.job: Optional[Job] = None
        self.bases: list[tuple[int, float]] = []  # (from step, base) as installed
        self.log_k: list[tuple[int, float]] = []  # (step, log(model ratio / rate))
        self.seen = -1  # the newest step whose statistics are in log_k
        self.frozen = False
        self.guard = BlowUpGuard(GUARD_JUMP)

    def _warmup(self) -> tuple[int, object]:
        schedule = next((s for s in self.job.schedule.values() if s is not None), None)  # type: ignore[union-attr]
        return int(getattr(schedule, "warmup_steps", 0)), schedule

    def _rate(self, step: int) -> float:
        """The rate the worker ran `step` at: the base in force then times the job's factor."""
        base = next((b for s, b in reversed(self.bases) if s <= step), math.nan)  # NaN: before the probe
        _, schedule = self._warmup()
        return base * (schedule.factor(step) if schedule is not None else 1.0)  # type: ignore[attr-defined]

    def _set(self, step: int, base: float, why: str) -> Action:
        self.bases = [(s, b) for s, b in self.bases if s < step] + [(step, base)]
        return Action(f"{why}: base {base:.4g}").set_bases({"*": base})

    def __call__(self, window: Window) -> Optional[Action]:
        if self.job is None:
            # At the hold of step 0 the job's own step-0 changes (its schedule) are in.
            self.job = read_job(window.client)  # type: ignore[arg-type]
            peak = max(self.job.base.values())
            return self._set(window.step, PROBE * peak, "probe")
        if self.guard.first_loss != self.guard.first_loss and window.values("loss"):
            self.guard.first_loss = window.values("loss")[0]
        if self.frozen:
            why = self.guard.check(window)
            return None if why is None else self._set(window.step, self.bases[-1][1] * GUARD_CUT, why)
        for step, stats in window.stats():
            ratio = model_ratio(stats)
            rate = self._rate(step) if step > self.seen else math.nan
            if ratio > 0 and rate > 0:
                self.log_k.append((step, math.log(ratio / rate)))
                self.seen = step
        if not self.log_k:
            return None
        warmup, _ = self._warmup()
        span = max(1, int(FIT * warmup))
        recent = [p for p in self.log_k if p[0] > self.seen - span] or self.log_k[-1:]
        k = math.exp(trend_at(recent, self.seen))
        family = "adam" if self.job.adaptive else "sgd"  # type: ignore[union-attr]
        why = f"model update ratio {k * self._rate(self.seen):.3g} at rate {self._rate(self.seen):.3g}"
        if window.step >= warmup:
            self.frozen = True
            window.every = self.every_after
            why = f"end of warmup, {why}"
        return self._set(window.step, U[family] / k, why)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_controller_arguments(parser, every=10)
    args = parser.parse_args(argv)
    # Every step until the base is frozen (decide sets --every then): the probe is two steps.
    decide = RatioWarmup(every_after=args.every)
    args.every = 1
    # Decisions keep state (the bases, the ramp): a conflict resends one, never decides twice.
    return run_from_args("ratio_warmup", args, decide, on_conflict="resend")


if __name__ == "__main__":
    exit_process(main())
