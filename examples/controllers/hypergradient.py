"""Hypergradient controller (Baydin et al., ICLR 2018), per layer, on the worker's schedule.

Baydin et al. adapt the rate by the derivative of the loss with respect to it:
d L(w_S) / d lr = -g_S . u_{S-1} / lr, where u_{S-1} is the previous update. Its sign
says whether the last step was too short (the new gradient still points along it) or
overshot. This controller uses the *normalized* form per name, the worker's
``descent_cos`` statistic = cos(-g_S, u_{S-1}) (scale-free, so one constant serves
SGD and AdamW and every layer), and moves each name's rate *multiplicatively*: a
name's base (the worker's warmup + cosine schedule stays, so the rate in force is
base x schedule factor) is multiplied by

    exp(BETA * (mean descent_cos over the window - C_TARGET)), clipped to +-MAX_STEP,

at every decision (every K steps), in three phases of the job's schedule:
during warmup only downward (the warmup climbs by itself; a climb on top of it
carried 10x starts over the edge), from the end of warmup to ADAPT_END x warmup both
ways, then frozen so the worker's cosine anneals undisturbed. Why frozen: measured on
digits (seed 101), once the loss is noise-dominated the mean descent_cos sits at
-0.05..-0.15 at 0.1x AND at 1x (Wu et al. 2018's short-horizon bias: the greedy
hypergradient always wants a smaller rate under noise), so it no longer tells rates
apart; only the early, curvature-dominated phase does (+0.65 at 0.1x vs +0.1 at 1x at
step 100). C_TARGET is that noise floor. Multiplicative steps climb from 0.1x and
fall from 10x at the same relative speed (Baydin's "multiplicative" variant).

Momentum and Adam: with momentum 0.9 successive updates are ~0.9-aligned whatever
the rate, so ``update_dot`` (update . previous update) says little; ``descent_cos``
correlates the NEW gradient with the previous update, which flips sign when a step
overshoots, with or without momentum (for Adam, u is Adam's own step; the
hypergradient formula is the same, since d w_S / d lr = -u_{S-1} / lr holds for both).

Guard: a window whose mean loss is not finite or exceeds the best window so far by
GUARD_JUMP x the first window's loss cuts every multiplier by GUARD_CUT at once
(hypergradient signals lag a blow-up by a step or two). A ratio to the best loss
(first tried: 1.5x) fires on minibatch noise once the loss is near 0.

Constants (set on seeds 100-101 of digits, never on the table's 0-2; the same for
both tasks and every start):
  BETA = 1.0         log-rate change per decision per unit of (mean cosine - C_TARGET)
  C_TARGET = -0.08   the noise floor of descent_cos (see above)
  MAX_STEP = 0.7     at most x2 / /2 per decision
  ADAPT_END = 4.0    adapt until 4 x the warmup steps, then freeze
  GUARD_JUMP = 0.25, GUARD_CUT = 0.3   the blow-up guard
  M_MIN, M_MAX = 1e-3, 1e3  bounds of a multiplier (relative to the starting base)

    python examples/controllers/hypergradient.py --address 127.0.0.1:PORT --every 10 \\
        --lockstep-timeout 2 --start-file /tmp/go

The worker needs per-parameter statistics with descent_cos (task_worker: --stats-every
1). Needs an admin token when the worker has tokens (LRCTL_TOKEN).
"""

from __future__ import annotations

import argparse
import math
from typing import Optional

from lrctl.client.control_loop import Action, Window, add_controller_arguments, read_job, run_from_args, exit_process

BETA = 1.0
C_TARGET = -0.08
MAX_STEP = 0.7
ADAPT_END = 4.0
GUARD_JUMP = 0.25
GUARD_CUT = 0.3
M_MIN, M_MAX = 1e-3, 1e3


class Hypergradient:
    """decide(window): per-name multipliers of the starting bases."""

    def __init__(self) -> None:
        self.job = None
        self.mult: dict[str, float] = {}
        self.best_loss = math.inf
        self.first_loss = math.nan

    def _warmup(self) -> int:
        schedule = next((s for s in self.job.schedule.values() if s is not None), None)
        return int(getattr(schedule, "warmup_steps", 0) or 0)

    def __call__(self, window: Window) -> Optional[Action]:
        if self.job is None:
            self.job = read_job(window.client)
            self.mult = {n: 1.0 for n in self.job.names}
        elif self.job.step == 0 and window.step > 0:
            # Read at the hold before step 0, the job's own schedule (queued for step 0)
            # was not in yet: read it again, keeping the starting bases.
            self.job.schedule = read_job(window.client).schedule
            self.job.step = window.step
        loss = window.mean("loss")
        if window.values("loss"):
            if self.first_loss != self.first_loss:
                self.first_loss = loss
            jump = GUARD_JUMP * (self.first_loss if math.isfinite(self.first_loss) else 1.0)
            if not math.isfinite(loss) or loss > self.best_loss + jump:
                self.mult = {n: max(M_MIN, m * GUARD_CUT) for n, m in self.mult.items()}
                self.best_loss = loss if math.isfinite(loss) else self.best_loss
                return self._action(f"loss {loss:.4g} vs best {self.best_loss:.4g}: blow-up, all x{GUARD_CUT}")
            self.best_loss = min(self.best_loss, loss)
        warmup = self._warmup()
        if window.step > ADAPT_END * max(warmup, 1):
            return None  # frozen: the worker's cosine anneals from here
        cos: dict[str, list[float]] = {}
        for _, stats in window.stats():
            for name, values in stats.items():
                c = values.get("descent_cos", math.nan)
                if math.isfinite(c):
                    cos.setdefault(name, []).append(c)
        if not cos:
            return None
        for name, values in cos.items():
            if name in self.mult:
                step = BETA * (sum(values) / len(values) - C_TARGET)
                # During warmup the schedule climbs by itself: only slow it down.
                step = max(-MAX_STEP, min(0.0 if window.step < warmup else MAX_STEP, step))
                self.mult[name] = min(M_MAX, max(M_MIN, self.mult[name] * math.exp(step)))
        return self._action(f"loss {loss:.4g}")

    def _action(self, why: str) -> Action:
        lo, hi = min(self.mult.values()), max(self.mult.values())
        return Action(f"{why}; multipliers {lo:.3g}..{hi:.3g}").set_bases(
            {n: self.job.base[n] * m for n, m in self.mult.items()})


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_controller_arguments(parser, every=10)
    args = parser.parse_args(argv)
    return run_from_args("hypergradient", args, Hypergradient())


if __name__ == "__main__":
    exit_process(main())
