"""Benchmark 2: what lrctl costs per optimizer step when no change is pending.

Two identical one-parameter optimizers step in interleaved rounds, one plain and one
with lrctl attached (the step pre-hook installed; `--serve` also runs the gRPC server,
idle). The cost per step is the difference of their mean step times, taken as the
median over rounds. A one-element parameter keeps the optimizer's own work tiny, so
the difference is the hook and not noise from the math. Target: <= 10 us per step.

    python bench/bench_hook.py            # the full run
    python bench/bench_hook.py --quick    # a smoke run (CI), numbers not meaningful
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from lrctl.server import attach


def _job(foreach: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Linear(1, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=foreach)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return model, opt


def _time_steps(opt: torch.optim.Optimizer, steps: int) -> float:
    step = opt.step
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def _time_hook_calls(ctl, opt: torch.optim.Optimizer, calls: int) -> float:
    """The pre-hook alone, called directly: its own cost without torch's step wrapper."""
    hook = ctl.controller._before_step
    start = time.perf_counter()
    for _ in range(calls):
        hook(opt, (), {})
    return (time.perf_counter() - start) / calls


def run(rounds: int, steps: int, serve: bool) -> list[tuple[str, float, float, float]]:
    rows = []
    for foreach in (False, True):
        _, plain = _job(foreach)
        model, controlled = _job(foreach)
        ctl = attach(model, controlled, address="127.0.0.1:0", serve=serve)
        try:
            diffs, bases, hooks = [], [], []
            for _ in range(rounds):
                a = _time_steps(plain, steps)
                b = _time_steps(controlled, steps)
                diffs.append(b - a)
                bases.append(a)
                hooks.append(_time_hook_calls(ctl, controlled, steps))
            rows.append((f"SGD foreach={foreach}", statistics.median(bases),
                         statistics.median(diffs), statistics.median(hooks)))
        finally:
            ctl.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--steps", type=int, default=20_000, help="steps per timed sample")
    parser.add_argument("--serve", action="store_true", help="also run the (idle) gRPC server")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 3, 500
    torch.set_num_threads(1)
    print(f"lrctl's per-step cost with nothing pending, torch {torch.__version__}, 1 thread; "
          f"median of {args.rounds} rounds x {args.steps} steps; server {'on' if args.serve else 'off'}")
    print(f"{'optimizer':<20} {'plain step us':>14} {'lrctl extra us':>15} {'ratio':>7} {'hook alone us':>14}")
    for label, base, diff, hook in run(args.rounds, args.steps, args.serve):
        print(f"{label:<20} {base * 1e6:>14.2f} {diff * 1e6:>15.2f} {(base + diff) / base:>6.3f}x {hook * 1e6:>14.2f}")


if __name__ == "__main__":
    main()
