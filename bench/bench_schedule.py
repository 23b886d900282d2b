"""Benchmark 7: a warmup + cosine schedule on every group, lrctl vs torch's LambdaLR.

Whole training steps (zero_grad, forward, backward, optimizer.step(), and
scheduler.step() where the loop has one) of an MLP (16 Linear layers: 32 tensors),
its tensors split by layer into K param groups (K = 1, 8, 32). Per optimizer and K,
all built from one model and measured in the same run:

  base            plain torch: K groups (distinct lrs) and a LambdaLR with one
                  warmup+cosine lambda per group (distinct warmup lengths), stepped
                  after every optimizer.step()   -- the baseline
  lrctl bases     the same K groups, attach(serve=False), then every name gets one
                  Warmup(decay="cosine") schedule: K distinct bases, 1 schedule,
                  K rate classes; no torch scheduler in the loop
  lrctl scheds    K groups at one lr, each group its own Warmup (distinct warmup
                  lengths): K distinct schedules, K rate classes
  adopted         the baseline's optimizer and LambdaLR, attach(scheduler=...); the
                  loop still calls scheduler.step()

Windows of --steps steps are interleaved, base X1 base X2 base X3 base (the lrctl
order reversed every other round); a window's ratio is its time over the mean of the
two base windows beside it. Reported: median ratio over rounds and its min-max; the
extra us of optimizer.step() (where lrctl's hook runs) over base's in the same round;
and, after the rounds, the hook alone (Controller._before_step called directly, every
class's rate moving) next to torch's LambdaLR.step() alone, in us per call. Every
schedule runs for 10^6 steps, so every rate moves on every step. Target: <= 1.02x.

    python bench/bench_schedule.py            # the full run (~2.5 min)
    python bench/bench_schedule.py --quick    # a smoke run (CI), numbers not meaningful
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from typing import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lrctl.common.schedules import Warmup
from lrctl.server import attach
from lrctl.server.requests import ChangeRequest, ScheduleUpdate

pc = time.perf_counter

TOTAL_STEPS = 1_000_000  # every rate moves on every step of the run
WARMUP = 2000  # warmup of group k: WARMUP + 37 * k steps
BASE_LR = {"SGD(momentum)": 0.01, "AdamW": 0.001}
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "SGD(momentum)": lambda groups: torch.optim.SGD(groups, lr=0.01, momentum=0.9, foreach=True),
    "AdamW": lambda groups: torch.optim.AdamW(groups, lr=0.001, foreach=True),
}
TARGET = 1.02


def make_model(layers: int, width: int) -> nn.Module:
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods)


def warmup_of(k: int) -> int:
    return WARMUP + 37 * k


def warmup_cosine(warmup: int, total: int = TOTAL_STEPS) -> Callable[[int], float]:
    """transformers' get_cosine_schedule_with_warmup lambda, the arithmetic of
    lrctl's Warmup(decay="cosine") (held at the end instead of rising again)."""

    def lam(step: int) -> float:
        if step < warmup:
            return 0.0 + (1.0 - 0.0) * (float(step) / float(max(1, warmup)))
        progress = min(float(step - warmup) / float(max(1, total - warmup)), 1.0)
        c = max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(0.5) * 2.0 * progress)))
        return c * (1.0 - 0.0) + 0.0

    return lam


def warmup_schedule(warmup: int) -> Warmup:
    return Warmup(warmup_steps=warmup, decay="cosine", total_steps=TOTAL_STEPS)


class Case:
    """One configuration: a model copy, its optimizer in K groups, maybe a scheduler and lrctl."""

    def __init__(self, label: str, model: nn.Module, opt_name: str, k: int, x: torch.Tensor) -> None:
        self.label, self.model, self.k, self.x = label, model, k, x
        self.ctl = None
        self.sched: LambdaLR | None = None
        params = list(model.parameters())
        per = -(-len(params) // k)
        self.buckets = [params[i:i + per] for i in range(0, len(params), per)]
        assert len(self.buckets) == k, (len(params), k)
        base = BASE_LR[opt_name]
        same_lr = label == "lrctl scheds"
        self.bases = [base if same_lr else base * (1 + j) / k for j in range(k)]
        self.opt = OPTIMIZERS[opt_name]([{"params": b, "lr": lr} for b, lr in zip(self.buckets, self.bases)])
        lambdas = [warmup_cosine(warmup_of(j)) for j in range(k)]
        if label in ("base", "adopted"):
            self.sched = LambdaLR(self.opt, lambdas)
            self.expected = lambdas
        if label == "adopted":
            self.ctl = attach(model, self.opt, scheduler=self.sched, serve=False)
        elif label.startswith("lrctl"):
            self.ctl = attach(model, self.opt, serve=False)
            names = {id(p): n for n, p in model.named_parameters()}
            if label == "lrctl bases":
                updates = (ScheduleUpdate("*", warmup_schedule(WARMUP)),)
                self.expected = [warmup_cosine(WARMUP)] * k
            else:
                updates = tuple(ScheduleUpdate(names[id(p)], warmup_schedule(warmup_of(j)))
                                for j, b in enumerate(self.buckets) for p in b)
                self.expected = lambdas
            pending, _ = self.ctl.controller.submit(ChangeRequest((), schedules=updates, reason="bench"))
            self.train_step()  # applies it, untimed
            assert pending.outcome is not None, pending.error
        self.steps = 0 if self.ctl is None else 1
        for _ in range(3):  # warm up: optimizer state, allocator
            self.train_step()
        assert len(self.opt.param_groups) == k, (label, len(self.opt.param_groups))

    def train_step(self) -> None:
        self.opt.zero_grad()
        self.model(self.x).square().mean().backward()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()

    def window(self, steps: int) -> tuple[float, float]:
        """Seconds per whole step, and per optimizer.step() inside it."""
        model, x, opt, sched = self.model, self.x, self.opt, self.sched
        self.train_step()  # one untimed step after the switch from another model
        in_step = 0.0
        start = pc()
        for _ in range(steps):
            opt.zero_grad()
            model(x).square().mean().backward()
            t0 = pc()
            opt.step()
            in_step += pc() - t0
            if sched is not None:
                sched.step()
        total = pc() - start
        self.steps += steps + 1
        return total / steps, in_step / steps

    def check_rates(self) -> None:
        """The rates for the next step are the lambdas' (a misconfigured case fails here)."""
        if self.ctl is None:
            return
        rates = self.ctl.controller.learning_rates()
        names = {id(p): n for n, p in self.model.named_parameters()}
        n = self.ctl.controller.step
        for j, bucket in enumerate(self.buckets):
            want = self.bases[j] * self.expected[j](n)
            for p in bucket:
                got = rates[names[id(p)]]
                assert got == want, (self.label, j, n, got, want)

    def time_alone(self, calls: int) -> float:
        """us per call of what the schedule costs outside the model: the hook (lrctl) or
        LambdaLR.step() (base); the adopted scheduler steps untimed before each hook call."""
        times = []
        if self.ctl is None:
            step = self.sched.step  # type: ignore[union-attr]
            for _ in range(calls):
                t0 = pc()
                step()
                times.append(pc() - t0)
        else:
            hook, opt, sched = self.ctl.controller._before_step, self.opt, self.sched
            for _ in range(calls):
                if sched is not None:
                    sched.step()
                t0 = pc()
                hook(opt, (), {})
                times.append(pc() - t0)
        return statistics.median(times) * 1e6

    def close(self) -> None:
        if self.ctl is not None:
            self.ctl.close()


LRCTL_CASES = ("lrctl bases", "lrctl scheds", "adopted")


def run(layers: int, width: int, batch: int, ks: list[int], rounds: int, steps: int, calls: int):
    cells = []
    for opt_name in OPTIMIZERS:
        for k in ks:
            torch.manual_seed(0)
            model = make_model(layers, width)
            x = torch.randn(batch, width)
            cases = {label: Case(label, copy.deepcopy(model), opt_name, k, x)
                     for label in ("base",) + LRCTL_CASES}
            cells.append((opt_name, k, cases))
    ratios = {(o, k, c): [] for o, k, _ in cells for c in LRCTL_CASES}
    extra = {key: [] for key in ratios}
    base_ms = {(o, k): [] for o, k, _ in cells}
    for r in range(rounds):
        for opt_name, k, cases in cells:
            order = LRCTL_CASES if r % 2 == 0 else LRCTL_CASES[::-1]
            base = cases["base"]
            prev_total, prev_in = base.window(steps)
            base_ms[(opt_name, k)].append(prev_total)
            for label in order:
                total, in_step = cases[label].window(steps)
                next_total, next_in = base.window(steps)
                ratios[(opt_name, k, label)].append(total / ((prev_total + next_total) / 2))
                extra[(opt_name, k, label)].append(in_step - (prev_in + next_in) / 2)
                prev_total, prev_in = next_total, next_in
    rows = []
    for opt_name, k, cases in cells:
        for case in cases.values():
            case.check_rates()
        alone = {label: case.time_alone(calls) for label, case in cases.items()}
        rows.append((opt_name, k, "base", statistics.median(base_ms[(opt_name, k)]), None, None, alone["base"]))
        for label in LRCTL_CASES:
            rs = ratios[(opt_name, k, label)]
            rows.append((opt_name, k, label, None, (statistics.median(rs), min(rs), max(rs)),
                         statistics.median(extra[(opt_name, k, label)]), alone[label]))
        for case in cases.values():
            case.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--steps", type=int, default=50, help="training steps per timed window")
    parser.add_argument("--layers", type=int, default=16, help="Linear layers (2 tensors each)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calls", type=int, default=2000, help="calls timed for the 'alone' column")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.calls = 2, 3, 20
    torch.set_num_threads(1)
    ks = [1, 8, 32]
    print(f"whole training steps, MLP {args.layers}x Linear({args.width}) ({2 * args.layers} tensors), "
          f"batch {args.batch}, foreach; torch {torch.__version__}, 1 thread; "
          f"{args.rounds} rounds x {args.steps} steps a window")
    print("ratio: whole step vs base in the same round, median [min-max]; step() +us: optimizer.step() "
          "vs base's; alone us: the hook (lrctl) or LambdaLR.step() (base) called alone")
    print(f"{'optimizer':<14} {'case':<13} {'K':>3} {'base ms':>8} {'ratio':>7} {'[min - max]':>15} "
          f"{'step() +us':>11} {'alone us':>9}  target")
    for opt_name, k, label, ms, ratio, ext, alone in run(
            args.layers, args.width, args.batch, ks, args.rounds, args.steps, args.calls):
        if ratio is None:
            print(f"{opt_name:<14} {label:<13} {k:>3} {ms * 1e3:>8.3f} {'1.000x':>7} {'':>15} "
                  f"{'':>11} {alone:>9.1f}")
            continue
        med, lo, hi = ratio
        verdict = "ok" if med <= TARGET else "MISS"
        print(f"{opt_name:<14} {label:<13} {k:>3} {'':>8} {med:>6.3f}x [{lo:.3f} - {hi:.3f}] "
              f"{ext * 1e6:>+11.1f} {alone:>9.1f}  <={TARGET} {verdict}")


if __name__ == "__main__":
    main()
