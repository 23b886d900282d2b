"""Benchmark 4: request latency while training runs, against a bare gRPC echo.

The training loop (bench_server_load's MLP, AdamW, torch on 1 thread, ~20 ms a step)
runs on the main thread with lrctl attached. A separate client process
(bench/load_client.py, grpc and the stubs only) times blocking calls, paced at
`--rate` calls per second, in rounds of four in a shuffled order:
  echo   grpc.health.v1.Health/Check, which the server factory registers: the bare
         echo, a Python handler on the same server, measured the same way
  get    GetLearningRates of every parameter
  set    SetLearningRates (wait=false) of every parameter (same value every time)
  list   ListParameters, one page of the default size
Each sample starts a fresh channel, discards `--warmup` rounds, then keeps `--count`
rounds; samples of the server kinds are interleaved, and every kind's latencies are
pooled over the samples. The table gives p50 and p99, and each as a ratio to the
echo's (target: p99 <= 1.5x the echo's p99).

    python bench/bench_latency.py            # the full run (~2 minutes)
    python bench/bench_latency.py --quick    # a smoke run (CI), numbers not meaningful
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server_load import KINDS, LoadClient, MachineLoad, make_mlp, percentile  # noqa: E402

CALLS = ("echo", "get", "set", "list")
TARGET_P99 = 1.5


def sample(base: nn.Module, batches: list, kind: str, client: LoadClient, args: argparse.Namespace, seed: int) -> tuple[dict[str, list[float]], dict[str, int], list[float]]:
    """Attach a fresh copy, train on this thread while the client times its calls."""
    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ctl = KINDS[kind](model, opt)
    done = threading.Event()
    result: dict[str, Any] = {}

    def ask() -> None:
        try:
            result.update(client.ask(cmd="latency", address=ctl.address, rate=args.rate,
                                     count=args.count, warmup=args.warmup, seed=seed))
        except BaseException as exc:
            result["error"] = exc
        finally:
            done.set()

    steps: list[float] = []
    asker = threading.Thread(target=ask, name="bench-ask")
    try:
        asker.start()
        k = 0
        while not done.is_set():
            x, y = batches[k % len(batches)]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            steps.append(time.perf_counter() - t0)
            k += 1
        asker.join()
    finally:
        ctl.close(grace=0.5)
    if "error" in result:
        raise RuntimeError(f"latency client failed: {result['error']}")
    return result["latency_us"], result["errors"], steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (CI)")
    parser.add_argument("--rounds", type=int, default=6, help="samples per server kind")
    parser.add_argument("--count", type=int, default=250, help="timed rounds of 4 calls per sample")
    parser.add_argument("--warmup", type=int, default=10, help="untimed rounds per sample")
    parser.add_argument("--rate", type=float, default=100.0, help="calls per second")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="sys.setswitchinterval for the whole run (default: Python's, 0.005 s)")
    parser.add_argument("--kinds", default="attach", help=f"comma-separated, of {sorted(KINDS)}")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown server kind(s) {sorted(unknown)}; choose from {sorted(KINDS)}")
    if args.quick:
        args.rounds, args.count, args.warmup = 1, 10, 2
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    torch.manual_seed(0)
    base = make_mlp(args.width, args.depth)
    batches = [(torch.randn(args.batch, args.width), torch.randn(args.batch, args.width)) for _ in range(4)]
    print(f"request latency while training (MLP width {args.width}, depth {args.depth}, batch "
          f"{args.batch}, AdamW, torch {torch.__version__} on 1 thread, {os.cpu_count()} cores); "
          f"client in a separate process, {args.rate:g} calls/s, {args.rounds} samples x "
          f"{args.count} rounds of {len(CALLS)} calls per server kind; GIL switch interval "
          f"{sys.getswitchinterval() * 1e3:g} ms")
    latencies = {k: {c: [] for c in CALLS} for k in kinds}
    errors = {k: {c: 0 for c in CALLS} for k in kinds}
    steps = {k: [] for k in kinds}
    machine = MachineLoad()
    client = LoadClient()
    try:
        for r in range(args.rounds):
            for kind in kinds:
                lat, errs, st = sample(base, batches, kind, client, args, seed=r)
                for c in CALLS:
                    latencies[kind][c] += lat[c]
                    errors[kind][c] += errs.get(c, 0)
                steps[kind] += st
    finally:
        client.close()
    print(f"{'server':<8} {'call':<5} {'p50 us':>8} {'p99 us':>8} {'p50/echo':>9} {'p99/echo':>9} "
          f"{'n':>6} {'errors':>6} {'target':>12}")
    for kind in kinds:
        echo50 = percentile(latencies[kind]["echo"], 0.50)
        echo99 = percentile(latencies[kind]["echo"], 0.99)
        for c in CALLS:
            v = latencies[kind][c]
            if not v:
                print(f"{kind:<8} {c:<5} (no successful call; {errors[kind][c]} errors)")
                continue
            p50, p99 = percentile(v, 0.50), percentile(v, 0.99)
            verdict = "" if c == "echo" else f"<={TARGET_P99:g} " + ("ok" if p99 / echo99 <= TARGET_P99 else "MISS")
            print(f"{kind:<8} {c:<5} {p50:>8.0f} {p99:>8.0f} {p50 / echo50:>8.2f}x {p99 / echo99:>8.2f}x "
                  f"{len(v):>6} {errors[kind][c]:>6} {verdict:>12}")
        print(f"{kind:<8} (training: {len(steps[kind])} steps, median {statistics.median(steps[kind]) * 1e3:.1f} ms)")
    print(f"other processes kept {machine.others_cores():.2f} of {os.cpu_count()} cores busy on average "
          "during the run (above ~0.1 the figures are noisy: run it on a quiet machine)")


if __name__ == "__main__":
    main()
