"""Benchmark 1: the cost of optimizer.step() under per-parameter control.

Configurations, all measured in the same run, interleaved round by round so that
machine noise hits each alike:
  (a) plain    the optimizer with one param group (the baseline)
  (b) recipe   the seed recipe: one param group per parameter
  (c) lrctl-1  lrctl attached, every rate equal
  (d) lrctl-8 / lrctl-32   lrctl with 8 / 32 distinct rates (by layer)
  (e) lrctl-all            lrctl with every rate distinct
Each figure is the median time of one optimizer.step() over the rounds, printed as a
ratio to (a) and to (b). Gradients are filled once and reused, so only step() is timed.

    python bench/bench_step.py            # the full run
    python bench/bench_step.py --quick    # a smoke run (CI), numbers not meaningful
    python bench/bench_step.py --width 128  # same 1024 tensors, 16x the elements each
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import torch
from torch import nn

from lrctl.server import attach
from lrctl.server.requests import ChangeRequest, Update


def make_model(blocks: int, width: int) -> nn.Module:
    """A deep stack of small blocks: 4 tensors each (weight, bias, norm weight, norm bias)."""
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.LayerNorm(width)]
    return nn.Sequential(*layers)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "SGD(momentum)": lambda params, foreach: torch.optim.SGD(params, lr=0.01, momentum=0.9, foreach=foreach),
    "AdamW": lambda params, foreach: torch.optim.AdamW(params, lr=0.001, foreach=foreach),
}


def _distinct_rates(model: nn.Module, n_rates: int, base: float) -> dict[str, float]:
    """Rates by layer: parameter i of the model gets one of n_rates values."""
    names = [n for n, _ in model.named_parameters()]
    per_bucket = max(1, -(-len(names) // n_rates))
    return {name: base * (1 + (i // per_bucket)) / 64 for i, name in enumerate(names)}


class Config:
    """One configuration: a model copy, its optimizer, maybe lrctl, ready to step."""

    def __init__(self, label: str, model: nn.Module, make_opt: Callable, foreach: bool,
                 groups: str, n_rates: int | None) -> None:
        self.label = label
        self.model = model
        self.ctl = None
        params = list(model.parameters())
        if groups == "one":
            self.opt = make_opt(params, foreach)
        else:
            self.opt = make_opt([{"params": [p]} for p in params], foreach)
        if n_rates is not None:
            self.ctl = attach(model, self.opt, serve=False)
            base = self.opt.param_groups[0]["lr"]
            if n_rates > 1:
                rates = _distinct_rates(model, n_rates, base)
                pending, _ = self.ctl.controller.submit(_request(rates))
                self.opt.step()  # applies the change (and regroups) once, untimed
                assert pending.outcome is not None, pending.error
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        self.opt.step()  # warm up: create optimizer state

    def time_steps(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.opt.step()
        return (time.perf_counter() - start) / steps


def _request(rates: dict[str, float]) -> ChangeRequest:
    return ChangeRequest(tuple(Update(n, lr) for n, lr in rates.items()), reason="bench")


def run(blocks: int, width: int, rounds: int, steps: int) -> list[tuple[str, str, dict[str, float]]]:
    results = []
    for opt_name, make_opt in OPTIMIZERS.items():
        for foreach in (True, False):
            torch.manual_seed(0)
            base = make_model(blocks, width)
            specs = [
                ("(a) plain", "one", None),
                ("(b) recipe", "per-param", None),
                ("(c) lrctl-1", "one", 1),
                ("(d) lrctl-8", "one", 8),
                ("(d) lrctl-32", "one", 32),
                ("(e) lrctl-all", "one", len(list(base.parameters()))),
            ]
            configs = [Config(label, copy.deepcopy(base), make_opt, foreach, g, n) for label, g, n in specs]
            samples: dict[str, list[float]] = {c.label: [] for c in configs}
            for _ in range(rounds):
                for c in configs:
                    samples[c.label].append(c.time_steps(steps))
            medians = {label: statistics.median(v) for label, v in samples.items()}
            for c in configs:
                if c.ctl is not None:
                    c.ctl.close()
            results.append((opt_name, f"foreach={foreach}", medians))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--blocks", type=int, default=256, help="blocks of 4 tensors (default 256: 1024 tensors)")
    parser.add_argument("--width", type=int, default=32,
                        help="features of each Linear/LayerNorm (default 32; the tensor count stays 4 * blocks)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed sample")
    args = parser.parse_args()
    if args.quick:
        args.blocks, args.rounds, args.steps = 16, 2, 2
    torch.set_num_threads(1)
    n_tensors = 4 * args.blocks
    print(f"optimizer.step() with {n_tensors} parameter tensors (width {args.width}), "
          f"torch {torch.__version__}, 1 thread; median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'optimizer':<14} {'foreach':<14} {'config':<15} {'ms/step':>8} {'vs (a)':>7} {'vs (b)':>7}")
    for opt_name, foreach, medians in run(args.blocks, args.width, args.rounds, args.steps):
        a, b = medians["(a) plain"], medians["(b) recipe"]
        for label, t in medians.items():
            print(f"{opt_name:<14} {foreach:<14} {label:<15} {t * 1e3:>8.3f} {t / a:>6.2f}x {t / b:>6.2f}x")


if __name__ == "__main__":
    main()
