"""What WatchMetrics streams cost the training thread a step, with serving="process".

Benchmark 3c's `watch4+100rps` adds 4 streams to the 100 requests/s: while a stream is
open, the training process sends every step's event to the serving process. This
measures that per-step cost alone (no requests): thread CPU of the training thread in
`report(loss)` and lrctl's step hooks, per step, in the bench's loop (512x4 MLP at batch
32, AdamW, torch on 1 thread, a tensor loss reported every step), in windows that
alternate:

  none         no stream open
  4 streams    4 streams read by another process (bench/load_client.py) with
               WatchMetricsBatched, as LRClient.watch_metrics reads them
  msg/event    the same read with WatchMetrics: a gRPC message per event
  unbatched    WatchMetricsBatched, with the feed sending each event as it is sealed
               (its batch period set to 0: how the feed sent before it batched a fast
               job's events)

Caches are cold after the step's tensors, so a Python call there costs several times
its tight-loop figure; the figures are per step, medians over rounds, and the last
lines what the 4 streams add to `none`. Beside them, the CPU the streams cost the other
processes of the machine, per second of the window: the serving process, and the
readers' (all 4 streams are read in one process):

    python bench/bench_stream_cost.py            # ~1.5 minutes
    python bench/bench_stream_cost.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

from bench_server_load import LoadClient, make_mlp, process_cpu  # bench/, the script's directory
from bench_set_floor import attach_timed

STREAMS = 4
KINDS = {  # kind -> the readers' method, the feed batched
    "none": ("", True),
    "4 streams": ("WatchMetricsBatched", True),
    "msg/event": ("WatchMetrics", True),
    "unbatched": ("WatchMetricsBatched", False),
}


def train(model: nn.Module, optimizer: torch.optim.Optimizer, ctl: Any, steps: int) -> float:
    """`steps` steps; the training thread's CPU in report(), us a step."""
    x, y = torch.randn(32, 512), torch.randn(32, 512)
    spent = 0
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        t0 = time.thread_time_ns()
        ctl.report(loss)
        spent += time.thread_time_ns() - t0
        optimizer.step()
    return spent / steps / 1e3


def wait_until(check: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=400, help="per window")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 60-step windows")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 1, 60
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = make_mlp(512, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ctl, clock = attach_timed(model, optimizer, address="127.0.0.1:0", serving="process")
    feed = ctl._server._feed  # the training process's end of the streams (watch_feed)
    batch_s = feed._batch_s
    client = LoadClient()
    pids = (ctl._server.process.pid, client.proc.pid)
    results: dict[str, list[tuple[float, ...]]] = {k: [] for k in KINDS}
    try:
        train(model, optimizer, ctl, 50)  # warm-up
        for _ in range(args.rounds):
            for kind, (method, batched) in KINDS.items():
                if method:
                    feed._batch_s = batch_s if batched else 0.0
                    client.ask(cmd="load", address=ctl.address, rate=0, watchers=STREAMS, watch_method=method)
                    wait_until(lambda: ctl.telemetry.wake is not None, "the streams")
                train(model, optimizer, ctl, 20)
                clock.reset()
                cpu0, wall0 = [process_cpu(p) for p in pids], time.monotonic()
                report_us = train(model, optimizer, ctl, args.steps)
                wall = time.monotonic() - wall0
                others = [(process_cpu(p) - c) / wall * 1e3 for p, c in zip(pids, cpu0)]
                results[kind].append((report_us, clock.us_per_step(), *others))
                if method:
                    client.ask(cmd="stop")
                    wait_until(lambda: ctl.telemetry.wake is None, "the streams to close")
    finally:
        feed._batch_s = batch_s
        client.close()
        ctl.close()
    print(f"training thread CPU a step, us, and the other processes' CPU, ms a second (median of "
          f"{args.rounds} round(s) of {args.steps}-step windows)")
    print(f"  {'':12s} {'report()':>9s} {'step hook':>10s} {'together':>9s} {'serving':>8s} {'readers':>8s}")
    together = {}
    for kind in KINDS:
        rows = results[kind]
        together[kind] = statistics.median(r[0] + r[1] for r in rows)
        serving, readers = (statistics.median(r[k] for r in rows) for k in (2, 3))
        print(f"  {kind:12s} {statistics.median(r[0] for r in rows):9.1f} "
              f"{statistics.median(r[1] for r in rows):10.1f} {together[kind]:9.1f} {serving:8.1f} {readers:8.1f}")
    for kind in KINDS:
        if kind != "none":
            print(f"  {STREAMS} streams add, {kind:10s} {together[kind] - together['none']:7.1f} us a step")


if __name__ == "__main__":
    sys.exit(main())
