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

  base (A/A)      a second copy of base: the noise floor of the method

Each case is paired with a base of its own (built the same way, so every model trains
the same number of steps), and each round times every pair in windows of --steps
steps, A B in even rounds and B A in odd ones. Reported per case: the median over
rounds of the window ratio case / base, and its min-max, by wall clock and by this
thread's CPU time; the extra us of optimizer.step() (where lrctl's hook runs) over
base's; and, after the rounds, the schedule's work per step timed alone (base:
LambdaLR.step(); lrctl: the hook, Controller._before_step, called directly; adopted:
both), with `est`, the ratio that work alone predicts. Every schedule runs for 10^6
steps, so every rate moves on every step. Denormals are flushed (see main). Target:
<= 1.02x.

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
        c = max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
        return c * (1.0 - 0.0) + 0.0

    return lam


def warmup_schedule(warmup: int) -> Warmup:
    return Warmup(warmup_steps=warmup, decay="cosine", total_steps=TOTAL_STEPS)


class Case:
    """One configuration: a model copy, its optimizer in K groups, maybe a scheduler and lrctl."""

    def __init__(self, label: str, model: nn.Module, opt_name: str, k: int,
                 x: torch.Tensor, y: torch.Tensor) -> None:
        self.label, self.model, self.k, self.x, self.y = label, model, k, x, y
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
        (self.model(self.x) - self.y).square().mean().backward()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()

    def window(self, steps: int) -> tuple[float, float, float]:
        """Seconds per whole step (wall, and this thread's CPU time), and per
        optimizer.step() inside it (wall)."""
        model, x, y, opt, sched = self.model, self.x, self.y, self.opt, self.sched
        self.train_step()  # one untimed step after the switch from another model
        in_step = 0.0
        cpu = time.thread_time()
        start = pc()
        for _ in range(steps):
            opt.zero_grad()
            (model(x) - y).square().mean().backward()
            t0 = pc()
            opt.step()
            in_step += pc() - t0
            if sched is not None:
                sched.step()
        total = pc() - start
        cpu = time.thread_time() - cpu
        self.steps += steps + 1
        return total / steps, cpu / steps, in_step / steps

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
        """us per step of the schedule's work outside the model, each call timed alone:
        LambdaLR.step() (base), the hook (lrctl), or both (adopted), every rate moving."""
        sched = self.sched.step if self.sched is not None else None
        hook = self.ctl.controller._before_step if self.ctl is not None else None
        opt, times = self.opt, []
        for _ in range(calls):
            t0 = pc()
            if sched is not None:
                sched()
            if hook is not None:
                hook(opt, (), {})
            times.append(pc() - t0)
        return statistics.median(times) * 1e6

    def close(self) -> None:
        if self.ctl is not None:
            self.ctl.close()


LRCTL_CASES = ("lrctl bases", "lrctl scheds", "adopted")
CONTROL = "base (A/A)"  # a second plain-torch copy against its own base: the noise floor


def run(layers: int, width: int, batch: int, ks: list[int], rounds: int, steps: int, calls: int):
    """Each case is timed against a base of its own (same construction), so every model
    trains the same number of steps; a round times each pair A B, the next B A."""
    cells = []
    for opt_name in OPTIMIZERS:
        for k in ks:
            torch.manual_seed(0)
            model = make_model(layers, width)
            x, y = torch.randn(batch, width), torch.randn(batch, width)
            pairs = {label: (Case("base", copy.deepcopy(model), opt_name, k, x, y),
                             Case("base" if label == CONTROL else label, copy.deepcopy(model), opt_name, k, x, y))
                     for label in (CONTROL,) + LRCTL_CASES}
            cells.append((opt_name, k, pairs))
    labels = (CONTROL,) + LRCTL_CASES
    keys = [(o, k, c) for o, k, _ in cells for c in labels]
    wall: dict = {key: [] for key in keys}
    cpu: dict = {key: [] for key in keys}
    extra: dict = {key: [] for key in keys}
    base_wall: dict = {(o, k): [] for o, k, _ in cells}
    for r in range(rounds):
        for opt_name, k, pairs in cells:
            for label in (labels if r % 2 == 0 else labels[::-1]):
                base, case = pairs[label]
                if r % 2 == 0:
                    b, mine = base.window(steps), case.window(steps)
                else:
                    mine, b = case.window(steps), base.window(steps)
                key = (opt_name, k, label)
                wall[key].append(mine[0] / b[0])
                cpu[key].append(mine[1] / b[1])
                extra[key].append(mine[2] - b[2])
                base_wall[(opt_name, k)].append(b[0])
    rows = []
    for opt_name, k, pairs in cells:
        for pair in pairs.values():
            for case in pair:
                case.check_rates()
        alone = {label: pairs[label][1].time_alone(calls) for label in labels}
        base_s = statistics.median(base_wall[(opt_name, k)])
        rows.append((opt_name, k, "base", base_s, None, None, None, alone[CONTROL], None))
        for label in labels:
            key = (opt_name, k, label)
            spread = [(statistics.median(v), min(v), max(v)) for v in (wall[key], cpu[key])]
            estimate = 1 + (alone[label] - alone[CONTROL]) * 1e-6 / base_s
            rows.append((opt_name, k, label, None, spread[0], spread[1],
                         statistics.median(extra[key]), alone[label], estimate))
        for pair in pairs.values():
            for case in pair:
                case.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--rounds", type=int, default=151)
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed window")
    parser.add_argument("--layers", type=int, default=16, help="Linear layers (2 tensors each)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calls", type=int, default=2000, help="calls timed for the 'alone' column")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.calls = 2, 3, 20
    torch.set_num_threads(1)
    # Optimizer state of dead units decays into subnormal floats within ~1000 steps, and
    # subnormal arithmetic is slow on x86: without this, a case's step time drifts with
    # how far it has trained (base trains 4x as many steps), not with lrctl.
    if not torch.set_flush_denormal(True):
        print("warning: this CPU cannot flush denormals; long runs may drift")
    ks = [1, 8, 32]
    print(f"whole training steps, MLP {args.layers}x Linear({args.width}) ({2 * args.layers} tensors), "
          f"batch {args.batch}, foreach; torch {torch.__version__}, 1 thread; "
          f"{args.rounds} rounds x {args.steps} steps a window")
    print("ratios vs base in the same round, median [min-max] over rounds: wall clock, and this thread's "
          "CPU time; step() +us: optimizer.step() (with lrctl's hook) minus base's; sched us: the "
          "schedule's work per step timed alone (base: LambdaLR.step, lrctl: the hook, adopted: both); "
          "est: 1 + (sched us - base's) / base step")
    print(f"{'optimizer':<14} {'case':<13} {'K':>3} {'wall':>7} {'[min - max]':>15} {'cpu':>7} "
          f"{'[min - max]':>15} {'step() +us':>10} {'sched us':>8} {'est':>6}  target")
    for opt_name, k, label, base_s, w, c, ext, alone, est in run(
            args.layers, args.width, args.batch, ks, args.rounds, args.steps, args.calls):
        if w is None:
            print(f"{opt_name:<14} {label:<13} {k:>3} {base_s * 1e3:>5.3f}ms {'':>15} {'':>7} {'':>15} "
                  f"{'':>10} {alone:>8.1f}")
            continue
        verdict = "ok" if w[0] <= TARGET and c[0] <= TARGET else "MISS"
        if label == CONTROL:
            verdict = "(noise floor)"
        print(f"{opt_name:<14} {label:<13} {k:>3} {w[0]:>6.3f}x [{w[1]:.3f} - {w[2]:.3f}] {c[0]:>6.3f}x "
              f"[{c[1]:.3f} - {c[2]:.3f}] {ext * 1e6:>+10.1f} {alone:>8.1f} {est:>5.3f}x  {'' if label == CONTROL else f'<={TARGET} '}{verdict}")


if __name__ == "__main__":
    main()
