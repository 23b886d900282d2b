"""What a remote Set costs the training thread, against the floor of any Python design.

Benchmark 3c's target needs lrctl's own code on the training thread under ~1.5% of a
step with the streams on; at 40 Sets/s most of it is the step hook applying Sets. This
measures that cost per Set, and beside it, in the same process and loop, the least a
Set applied at a step boundary in Python could cost: decode a body of the ring's size
(marshal), write each param group's lr, append a record to a bounded history, and
publish a snapshot in shared memory. Both are thread CPU of the training thread around
the step pre-hooks, in the bench's loop (the 512x4 MLP at batch 32, AdamW, torch on 1
thread): there, with caches cold after the step's tensors, a Python call costs several
times its tight-loop figure, so a path's cost follows the number of calls it makes.

  floor   a pre-hook applies the minimal Set every other step; the same hook with
          nothing to apply gives its baseline
  lrctl   attach(serving="process") and bench/load_client.py's mixed stream at
          100 requests/s (40 Sets/s, half of them regroup); lrctl's idle hook gives its
          baseline; Sets counted by the config version

Windows alternate floor / lrctl-idle / lrctl-loaded, `--rounds` times; the figure is
the median per Set, and the last line their ratio:

    python bench/bench_set_floor.py              # ~2 minutes
    python bench/bench_set_floor.py --quick      # a smoke run
"""

from __future__ import annotations

import argparse
import collections
import marshal
import mmap
import statistics
import sys
import time
from typing import Any, Callable

import torch

from bench_server_load import LoadClient, make_mlp  # bench/, the script's directory
from lrctl.server import attach


class HookClock:
    """Thread CPU between two pre-hooks registered around whatever runs between them."""

    def __init__(self, optimizer: torch.optim.Optimizer, between: Callable[[], Any]) -> None:
        self.total_ns = 0
        self.calls = 0
        self._mark = 0
        optimizer.register_step_pre_hook(self._start)
        between()
        optimizer.register_step_pre_hook(self._stop)

    def _start(self, *_: Any) -> None:
        self._mark = time.thread_time_ns()

    def _stop(self, *_: Any) -> None:
        self.total_ns += time.thread_time_ns() - self._mark
        self.calls += 1

    def reset(self) -> None:
        self.total_ns = self.calls = 0

    def us_per_step(self) -> float:
        return self.total_ns / max(self.calls, 1) / 1e3


def attach_timed(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any) -> tuple[Any, HookClock]:
    """attach(model, optimizer, **kwargs) between the two pre-hooks of a HookClock, which
    then times lrctl's step hooks."""
    holder: dict[str, Any] = {}
    clock = HookClock(optimizer, lambda: holder.update(ctl=attach(model, optimizer, **kwargs)))
    return holder["ctl"], clock


class MinimalSets:
    """The floor: every other step, one Set of the ring's size, applied in Python."""

    def __init__(self) -> None:
        self.on = False
        self.applied = 0
        self._steps = 0
        self._history: collections.deque = collections.deque(maxlen=10_000)
        self._shared = mmap.mmap(-1, 1 << 16)
        updates = (("*", 1e-4, "absolute", "base"),)
        self._body = marshal.dumps((updates, b"", (), None, None, "bench load", "ipv4:127.0.0.1:5555",
                                    "", "", "", False, 7, 1, bytes(144), b"", ((("absolute", 1e-4), None, None),),
                                    0, (3, bytes(144), bytes(144), bytes(144), bytes(144), None)))

    def hook(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        self._steps += 1
        if not self.on or self._steps % 2:
            return
        wired = marshal.loads(self._body)
        lr = wired[0][0][1] * (1 + self._steps % 3)
        groups = optimizer.param_groups
        for group in groups:
            group["lr"] = lr
        self.applied += 1
        self._history.append((self.applied, self._steps, time.time(), wired))
        body = marshal.dumps((self.applied, self._steps, [lr] * len(groups)))
        self._shared[0:len(body)] = body


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seconds: float) -> None:
    x = torch.randn(32, 512)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=6.0, help="per window")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 1.5 s windows")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 1, 1.5
    torch.set_num_threads(1)
    torch.manual_seed(0)

    floor_model = make_mlp(512, 4)
    floor_opt = torch.optim.AdamW(floor_model.parameters(), lr=1e-4)
    minimal = MinimalSets()
    floor_clock = HookClock(floor_opt, lambda: floor_opt.register_step_pre_hook(minimal.hook))

    model = make_mlp(512, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ctl, clock = attach_timed(model, optimizer, address="127.0.0.1:0", serving="process")
    client = LoadClient()
    floor_per_set, lrctl_per_set = [], []
    floor_idle = 0.0
    try:
        train(model, optimizer, 1.0)  # warm-up
        train(floor_model, floor_opt, 1.0)
        for _ in range(args.rounds):
            for on in (False, True):
                minimal.on, minimal.applied = on, 0
                floor_clock.reset()
                train(floor_model, floor_opt, args.seconds)
                if on:
                    sets = max(minimal.applied, 1)
                    floor_per_set.append((floor_clock.us_per_step() - floor_idle) * floor_clock.calls / sets)
                else:
                    floor_idle = floor_clock.us_per_step()
            clock.reset()
            train(model, optimizer, args.seconds)
            lrctl_idle = clock.us_per_step()
            client.ask(cmd="load", address=ctl.address, rate=100.0, seconds=None, mix="mixed")
            train(model, optimizer, 0.5)
            version = ctl.controller.version
            clock.reset()
            train(model, optimizer, args.seconds)
            sets = max(ctl.controller.version - version, 1)
            client.ask(cmd="stop")
            lrctl_per_set.append((clock.us_per_step() - lrctl_idle) * clock.calls / sets)
    finally:
        client.close()
        ctl.close()
    floor, ours = statistics.median(floor_per_set), statistics.median(lrctl_per_set)
    print("per Set applied at a step boundary, training thread CPU (median of "
          f"{args.rounds} round(s) of {args.seconds:g} s windows)")
    print(f"  floor (minimal Python Set)   {floor:7.1f} us   rounds: {', '.join(f'{v:.0f}' for v in floor_per_set)}")
    print(f"  lrctl (serving=\"process\")    {ours:7.1f} us   rounds: {', '.join(f'{v:.0f}' for v in lrctl_per_set)}")
    print(f"  lrctl / floor                {ours / floor if floor > 0 else float('inf'):7.1f}x")


if __name__ == "__main__":
    sys.exit(main())
