"""Per-layer plateau controller: ReduceLROnPlateau, one layer at a time, from outside the job.

torch's ReduceLROnPlateau cuts every rate when the loss stops improving. Here each
name has its own plateau test, on its own statistic: ``max_dist``, the largest
distance its weights have travelled from their initial values (kept by the worker
at every step). A layer still travelling is still learning at its rate; a layer whose
distance has grown by less than THRESHOLD (relative) over PATIENCE decisions is
jittering in place, and its base is multiplied by FACTOR (then COOLDOWN decisions
without a cut for that layer). The worker's schedule (warmup + cosine) stays: the
cuts multiply it.

Guard (shared with hypergradient.py): a window whose mean training loss is not finite
or exceeds the best window so far by GUARD_JUMP x the first window's loss cuts every
layer by GUARD_CUT at once: a blow-up is the one plateau test that cannot wait.

Like ReduceLROnPlateau it only lowers rates: it rescues a start that is too high,
not one that is too low (the bench table shows it).

Constants (set on seeds 100-101 of the bench tasks, never on the table's 0-2):
  PATIENCE = 5, THRESHOLD = 0.01, FACTOR = 0.5, COOLDOWN = 5, MIN_MULT = 0.01
  GUARD_JUMP = 0.25, GUARD_CUT = 0.3

    python examples/controllers/plateau.py --address 127.0.0.1:PORT --every 10 --start-file /tmp/go

The worker needs the max_dist statistic (task_worker: --stats-every 1).
Needs an admin token when the worker has tokens (LRCTL_TOKEN).
"""

from __future__ import annotations

import argparse
import math
from typing import Optional

from lrctl.client.control_loop import Action, Window, add_controller_arguments, read_job, run_from_args, exit_process

PATIENCE = 5
THRESHOLD = 0.01
FACTOR = 0.5
COOLDOWN = 5
MIN_MULT = 0.01
GUARD_JUMP = 0.25
GUARD_CUT = 0.3


class PerLayerPlateau:
    """decide(window): per-name plateau tests on max_dist, plus the blow-up guard."""

    def __init__(self) -> None:
        self.job = None
        self.mult: dict[str, float] = {}
        self.history: dict[str, list[float]] = {}
        self.cooldown: dict[str, int] = {}
        self.best_loss = math.inf
        self.first_loss = math.nan

    def __call__(self, window: Window) -> Optional[Action]:
        if self.job is None:
            self.job = read_job(window.client)
            self.mult = {n: 1.0 for n in self.job.names}
        loss = window.mean("loss")
        if window.values("loss"):
            if self.first_loss != self.first_loss:
                self.first_loss = loss
            jump = GUARD_JUMP * (self.first_loss if math.isfinite(self.first_loss) else 1.0)
            if not math.isfinite(loss) or loss > self.best_loss + jump:
                self.mult = {n: max(MIN_MULT, m * GUARD_CUT) for n, m in self.mult.items()}
                self.history.clear()
                # Recovery is judged from here: against the pre-blow-up best, every
                # window of the way back down would count as another blow-up.
                why = f"loss {loss:.4g} vs best {self.best_loss:.4g}: blow-up, all x{GUARD_CUT}"
                self.best_loss = loss if math.isfinite(loss) else self.best_loss
                return self._action(why)
            self.best_loss = min(self.best_loss, loss)
        stats = window.latest_stats()
        cut = []
        for name, values in stats.items():
            dist = values.get("max_dist", math.nan)
            if name not in self.mult or not math.isfinite(dist):
                continue
            seen = self.history.setdefault(name, [])
            seen.append(dist)
            del seen[:-(PATIENCE + 1)]
            if self.cooldown.get(name, 0) > 0:
                self.cooldown[name] -= 1
                continue
            if len(seen) > PATIENCE and seen[-1] <= seen[0] * (1 + THRESHOLD) and self.mult[name] > MIN_MULT:
                self.mult[name] = max(MIN_MULT, self.mult[name] * FACTOR)
                self.cooldown[name] = COOLDOWN
                seen.clear()
                cut.append(name)
        if not cut:
            return None
        return self._action(f"loss {loss:.4g}; plateau: {', '.join(cut)} x{FACTOR}")

    def _action(self, why: str) -> Action:
        return Action(why).set_bases({n: self.job.base[n] * m for n, m in self.mult.items()})


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_controller_arguments(parser, every=10)
    args = parser.parse_args(argv)
    return run_from_args("plateau", args, PerLayerPlateau())


if __name__ == "__main__":
    exit_process(main())
