"""Where a forwarded Set's cost lands in the training process (serving="process").

The training loop of bench_server_load.py (the MLP, AdamW, torch on 1 thread) runs
under attach(serving="process") in alternating windows: idle, then the load client's
mixed stream (bench/load_client.py: 100 requests/s, 40 of them Sets, half of which
regroup). For each window it measures, per step, the training thread's CPU time and
its time off a CPU (waiting for the GIL or a core) in three phases: forward + backward,
lrctl's step hook (where queued changes are applied), and the optimizer's own step.
The loaded windows' figures minus the idle ones' say where a Set's cost lands; the
link thread's (this process's serving thread) user and system CPU per request say
what it spends beside.

    python bench/bench_set_cost.py                 # ~2 minutes
    python bench/bench_set_cost.py --batch 32      # bench_server_load's default step (~7-9 ms)
    python bench/bench_set_cost.py --profile       # one loaded window under cProfile (thread CPU)
    python bench/bench_set_cost.py --quick         # a smoke run (CI), numbers not meaningful

--profile prints, for one loaded window, where the optimizer's step spends its CPU in
lrctl's code (the step hook and what it calls) and where the link thread spends its
own, both as cProfile's cumulative thread CPU (inflated by the profiler, so read the
shares, not the microseconds).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import threading
import time
from typing import Any, Callable

import torch
from torch import nn

from bench_server_load import LoadClient, make_mlp  # bench/, the script's directory
from lrctl.server import attach

PHASES = ("fb", "hook", "opt")


def _thread_cpu(native_id: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one thread of this process, from /proc (Linux)."""
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=160, help="160: a ~17 ms step here")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=8.0, help="per window")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (CI)")
    parser.add_argument("--profile", action="store_true", help="one loaded window under cProfile")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.width, args.seconds, args.rounds = 8, 64, 1.0, 1
    torch.set_num_threads(1)
    model = make_mlp(args.width, args.depth)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ctl = attach(model, optimizer, address="127.0.0.1:0", serving="process")
    link = next(t for t in threading.enumerate() if t.name == "lrctl-serve")
    batches = [(torch.randn(args.batch, args.width), torch.randn(args.batch, args.width)) for _ in range(4)]
    wall, cpu = time.perf_counter_ns, time.thread_time_ns
    mark = [0, 0]
    # Registered after attach's: runs right after lrctl's hook, as the optimizer's own step begins.
    optimizer.register_step_pre_hook(lambda *_: mark.__setitem__(slice(0, 2), [wall(), cpu()]))

    step_profile = cProfile.Profile(time.thread_time)

    def window(seconds: float, profiled: bool = False) -> tuple[dict[str, tuple[float, float]], int]:
        """Per phase, (CPU us, off-CPU us) per step, and the steps taken."""
        sums = {p: [0, 0] for p in PHASES}
        steps, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            x, y = batches[steps % len(batches)]
            w0, c0 = wall(), cpu()
            optimizer.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(x), y).backward()
            w1, c1 = wall(), cpu()
            if profiled:
                step_profile.enable()
            optimizer.step()
            if profiled:
                step_profile.disable()
            w3, c3 = wall(), cpu()
            w2, c2 = mark
            for phase, (dw, dc) in zip(PHASES, ((w1 - w0, c1 - c0), (w2 - w1, c2 - c1), (w3 - w2, c3 - c2))):
                sums[phase][0] += dc
                sums[phase][1] += dw - dc
            steps += 1
        return {p: (c / steps / 1e3, off / steps / 1e3) for p, (c, off) in sums.items()}, steps

    client = LoadClient()
    rows: list[dict[str, float]] = []
    try:
        window(0.2 if args.quick else 2.0)  # warm-up
        if args.profile:
            _profile(ctl, client, args, lambda: window(args.seconds, profiled=True), step_profile)
            return
        for _ in range(args.rounds):
            idle, idle_steps = window(args.seconds)
            client.ask(cmd="load", address=ctl.address, rate=args.rate, mix="mixed", watchers=0)
            link0 = _thread_cpu(link.native_id)
            loaded, loaded_steps = window(args.seconds)
            link1 = _thread_cpu(link.native_id)
            stats = client.ask(cmd="stop")
            sent = sum(stats["sent"].values())
            sets = stats["sent"].get("set", 0) + stats["sent"].get("set-regroup", 0)
            row = {"step_ms": sum(c + o for c, o in idle.values()) / 1e3,
                   "sets_per_step": sets / loaded_steps,
                   "link_user_us": (link1[0] - link0[0]) * 1e6 / max(sets, 1),
                   "link_sys_us": (link1[1] - link0[1]) * 1e6 / max(sets, 1),
                   "requests": sent}
            for p in PHASES:
                row[f"{p}_cpu"] = loaded[p][0] - idle[p][0]
                row[f"{p}_off"] = loaded[p][1] - idle[p][1]
            rows.append(row)
            print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
    finally:
        client.close()
        ctl.close()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"\nMLP width {args.width}, depth {args.depth}, batch {args.batch}: idle step "
          f"{med['step_ms']:.2f} ms; {args.rate:g} requests/s, {med['sets_per_step']:.2f} Sets a step "
          f"(medians of {args.rounds} rounds)")
    print("the training thread's extra us a step under load, per phase: CPU / off a CPU (GIL or core)")
    for p in PHASES:
        print(f"  {p:5} {med[f'{p}_cpu']:+7.0f} / {med[f'{p}_off']:+7.0f}")
    per_set = {p: med[f"{p}_cpu"] / med["sets_per_step"] for p in PHASES}
    print(f"per Set: the hook's CPU {per_set['hook']:.0f} us; the link thread's CPU "
          f"{med['link_user_us']:.0f} us user + {med['link_sys_us']:.0f} us system (10 ms ticks: coarse)")


def _profile(ctl: Any, client: LoadClient, args: argparse.Namespace, loaded: Callable[[], Any],
             step_profile: cProfile.Profile) -> None:
    """One loaded window with the optimizer's step and the link thread under cProfile."""
    loop = ctl._server._loop  # the link thread's event loop (ServingProcess)
    link_profile = cProfile.Profile(time.thread_time)
    client.ask(cmd="load", address=ctl.address, rate=args.rate, mix="mixed", watchers=0)
    loop.call_soon_threadsafe(link_profile.enable)
    _, steps = loaded()
    done = threading.Event()
    loop.call_soon_threadsafe(lambda: (link_profile.disable(), done.set()))
    done.wait(5)
    stats = client.ask(cmd="stop")
    print(f"{steps} steps, {sum(stats['sent'].values())} requests; the optimizer's step, lrctl's part:")
    pstats.Stats(step_profile).sort_stats("cumulative").print_stats(r"lrctl|/server/", 25)
    print("the link thread:")
    pstats.Stats(link_profile).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
