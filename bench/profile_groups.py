"""Where torch's optimizer.step() spends its time per extra param group (the gap of 1d).

The model of bench_step.py (256 blocks of Linear + LayerNorm: 1024 tensors). For
SGD(momentum) and AdamW, foreach=True, it steps an optimizer with 1 param group and one
with --groups groups (by layer, distinct rates, as lrctl's coalescing makes them),
interleaved round by round, twice per round: once bare (the measured cost) and once
with timers around torch's stages (the attribution). Each row is the extra time in one
stage per extra group, exclusive of the stages below it:

    torch._foreach_* / torch.tensor / C._group_tensors   the C++ calls themselves
    Optimizer._group_tensors_by_device_and_dtype         its Python (a no_grad decorator)
    _multi_tensor_sgd / _multi_tensor_adam               their own Python lines
    sgd() / adam()                                       the functional's own Python
    SGD._init_group / Adam._init_group                   gathering the group's lists
    SGD.step / Adam.step, per-group lines                what is left of step()

The timers' own cost (measured on a no-op) is taken off the stage that calls them;
"sum of rows" vs "measured bare" shows how well the rows add up.

    python bench/profile_groups.py              # the full run, ~30 s (~50 s at width 128)
    python bench/profile_groups.py --width 128  # wider tensors, same count
    python bench/profile_groups.py --quick      # a smoke run, numbers not meaningful
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import statistics
import time
from typing import Callable, Iterator

import torch
from torch.optim.optimizer import Optimizer

from bench_step import make_model

pc = time.perf_counter

# (label, optimizer class, factory, module of its functional, functional, multi-tensor impl)
OPTIMIZERS = [
    ("SGD(momentum)", torch.optim.SGD,
     lambda groups: torch.optim.SGD(groups, lr=0.01, momentum=0.9, foreach=True),
     "torch.optim.sgd", "sgd", "_multi_tensor_sgd"),
    ("AdamW", torch.optim.Adam,  # AdamW is Adam with decoupled weight decay
     lambda groups: torch.optim.AdamW(groups, lr=0.001, foreach=True),
     "torch.optim.adam", "adam", "_multi_tensor_adam"),
]


def build(factory: Callable, blocks: int, width: int, n_groups: int) -> torch.optim.Optimizer:
    torch.manual_seed(0)
    params = list(make_model(blocks, width).parameters())
    per = -(-len(params) // n_groups)
    groups = [{"params": params[i:i + per], "lr": 1e-3 * (1 + i // per)} for i in range(0, len(params), per)]
    opt = factory(groups)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()  # create the state
    return opt


class Timers:
    """Wraps callables so each call adds its duration to acc[label] and 1 to calls[label]."""

    def __init__(self) -> None:
        self.acc: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter[str] = collections.Counter()

    def wrap(self, fn: Callable, label: str) -> Callable:
        acc, calls = self.acc, self.calls

        def timed(*args, **kwargs):
            t0 = pc()
            out = fn(*args, **kwargs)
            acc[label] += pc() - t0
            calls[label] += 1
            return out

        return timed

    def reset(self) -> None:
        self.acc.clear()
        self.calls.clear()


@contextlib.contextmanager
def patched(patches: list[tuple[object, str, object]]) -> Iterator[None]:
    saved = [(owner, name, owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name))
             for owner, name, _ in patches]
    try:
        for owner, name, new in patches:
            setattr(owner, name, new)
        yield
    finally:
        for owner, name, old in saved:
            setattr(owner, name, old)


def wrapper_overhead(timers: Timers, n: int = 20000) -> float:
    """Seconds a timed() wrapper adds per call, beyond what it measures inside."""
    def noop(*args, **kwargs):
        return None
    timed = timers.wrap(noop, "noop")
    samples = []
    for _ in range(5):
        t0 = pc()
        for _ in range(n):
            noop(1, 2, 3, a=1, b=2)
        bare = pc() - t0
        t0 = pc()
        for _ in range(n):
            timed(1, 2, 3, a=1, b=2)
        samples.append((pc() - t0 - bare) / n)
    timers.reset()
    return statistics.median(samples)


def profile(label: str, opt_cls: type, factory: Callable, mod_name: str, functional: str,
            multi: str, blocks: int, width: int, n_groups: int, rounds: int, steps: int) -> None:
    mod = importlib.import_module(mod_name)
    timers = Timers()
    w = timers.wrap
    # stage labels; parent -> children (for exclusive times)
    F_INIT = f"{opt_cls.__name__}._init_group"
    F_FUNC = f"{functional}() own Python"
    F_MULTI = f"{multi} own Python"
    F_GROUP = "Optimizer._group_tensors_by_device_and_dtype (no_grad wrapper)"
    C_GROUP = "torch._C._group_tensors_by_device_and_dtype"
    C_TENSOR = "torch.tensor"
    foreach = sorted(n for n in dir(torch) if n.startswith("_foreach_"))
    patches = [
        (opt_cls, "_init_group", w(opt_cls.__dict__["_init_group"], F_INIT)),
        (mod, functional, w(getattr(mod, functional), F_FUNC)),
        (mod, multi, w(getattr(mod, multi), F_MULTI)),
        (Optimizer, "_group_tensors_by_device_and_dtype",
         staticmethod(w(Optimizer._group_tensors_by_device_and_dtype, F_GROUP))),
        (torch._C, "_group_tensors_by_device_and_dtype", w(torch._C._group_tensors_by_device_and_dtype, C_GROUP)),
        (torch, "tensor", w(torch.tensor, C_TENSOR)),
    ] + [(torch, n, w(getattr(torch, n), f"torch.{n}")) for n in foreach]
    children = {
        "step": [F_INIT, F_FUNC],
        F_FUNC: [F_MULTI],
        F_MULTI: [F_GROUP, C_TENSOR] + [f"torch.{n}" for n in foreach],
        F_GROUP: [C_GROUP],
    }
    overhead = wrapper_overhead(timers)

    opts = {g: build(factory, blocks, width, g) for g in (1, n_groups)}
    bare: dict[int, list[float]] = {g: [] for g in opts}
    inst: dict[int, dict[str, list[float]]] = {g: collections.defaultdict(list) for g in opts}
    calls: dict[int, dict[str, float]] = {}
    for _ in range(rounds):
        for g, opt in opts.items():
            t0 = pc()
            for _ in range(steps):
                opt.step()
            bare[g].append((pc() - t0) / steps)
            timers.reset()
            with patched(patches):
                t0 = pc()
                for _ in range(steps):
                    opt.step()
                total = pc() - t0
            inst[g]["step"].append(total / steps)
            for k in set(timers.acc) | {lbl for kids in children.values() for lbl in kids}:
                inst[g][k].append(timers.acc.get(k, 0.0) / steps)
            calls[g] = {k: v / steps for k, v in timers.calls.items()}

    def exclusive(g: int) -> dict[str, float]:
        med = {k: statistics.median(v) for k, v in inst[g].items()}
        out = dict(med)
        for parent, kids in children.items():
            n_kid_calls = sum(calls[g].get(k, 0.0) for k in kids)
            out[parent] = med[parent] - sum(med[k] for k in kids) - n_kid_calls * overhead
        return out

    ex1, exg = exclusive(1), exclusive(n_groups)
    b1, bg = statistics.median(bare[1]), statistics.median(bare[n_groups])
    extra = n_groups - 1
    print(f"{label}, foreach=True, {4 * blocks} tensors (width {width}): 1 group {b1 * 1e3:.3f} ms, "
          f"{n_groups} groups {bg * 1e3:.3f} ms ({bg / b1:.2f}x): {(bg - b1) / extra * 1e6:.1f} us per extra group")
    print(f"  {'stage (exclusive)':<62} {'calls/grp':>9} {'us/grp':>7}")
    rows = []
    for k in ex1:
        d = (exg[k] - ex1[k]) / extra * 1e6
        c = (calls[n_groups].get(k, 0.0) - calls[1].get(k, 0.0)) / extra
        if k == "step":
            k = f"{opt_cls.__name__}.step, per-group lines (and the rest)"
        if abs(d) >= 0.05 or c:
            rows.append((d, c, k))
    for d, c, k in sorted(rows, reverse=True):
        print(f"  {k:<62} {f'{c:.1f}' if c else '':>9} {d:>7.1f}")
    s = sum(d for d, _, _ in rows)
    measured = (bg - b1) / extra * 1e6
    print(f"  {'sum of rows':<62} {'':>9} {s:>7.1f}")
    print(f"  {'measured bare (no timers)':<62} {'':>9} {measured:>7.1f}")
    print(f"  (timer cost taken off per timed call: {overhead * 1e6:.2f} us; "
          f"the rows overshoot the bare figure by {s - measured:.1f} us)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--blocks", type=int, default=256, help="blocks of 4 tensors (default 256: 1024 tensors)")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--groups", type=int, default=32, help="param groups to compare with 1")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed sample")
    args = parser.parse_args()
    if args.quick:
        args.blocks, args.groups, args.rounds, args.steps = 16, 8, 2, 2
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; median of {args.rounds} rounds x {args.steps} steps")
    for spec in OPTIMIZERS:
        profile(*spec, args.blocks, args.width, args.groups, args.rounds, args.steps)


if __name__ == "__main__":
    main()
