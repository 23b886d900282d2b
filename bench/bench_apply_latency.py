"""Benchmark 6: from a Set request to the step at which it applied, in steps and in ms.

The worker (this process) trains a small MLP on its main thread with lrctl attached and
served on 127.0.0.1:0; every step is padded with sleep to `--period` (50 ms). A step
pre-hook registered before lrctl's records when each step boundary begins (time.monotonic,
which is CLOCK_MONOTONIC and so comparable across processes on Linux). A client in a
separate process (LRClient) sends `--sets` Sets with wait=true at random moments (a
random pause of 0 to 2.5 periods before each) and records when it sent each and when
the acknowledgement came back, with the step the worker says it applied at.

For each Set:
  late (vs send)    applied step - the first step boundary after the client sent it
  late (vs accept)  applied step - the first step boundary after the worker had queued
                    it (the end of Controller.submit, recorded in the worker)
  to boundary       send -> the boundary it applied at (ms)
  ack after         that boundary -> the client has the acknowledgement (ms)
Target: every change lands on the next step boundary (0 steps late vs accept; vs send,
1 step only when sent within the request's own transit time before a boundary), and
the ms to the acknowledgement is about the time to that boundary.

    python bench/bench_apply_latency.py            # 40 Sets, ~10 s
    python bench/bench_apply_latency.py --quick    # a smoke run (CI): 8 Sets
    python bench/bench_apply_latency.py --serving process   # attach(serving="process")
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any

from submit_timing import record_submits


# -- the client process (no torch) -----------------------------------------------------
def _client_main(address: str, sets: int, period: float, seed: int) -> None:
    from lrctl.client.client import LRClient

    rnd = random.Random(seed)
    out: list[dict[str, Any]] = []
    with LRClient(address, timeout=30) as client:
        client.wait_until_ready(30)
        while client.status().step < 3:  # training has begun
            time.sleep(period / 4)
        for k in range(sets):
            time.sleep(rnd.uniform(0, 2.5 * period))
            value = 1e-3 * (1 + k % 7)
            sent = time.monotonic()
            result = client.set_learning_rates({"*": value}, wait=True, reason=f"bench {k}")
            acked = time.monotonic()
            out.append({"sent": sent, "acked": acked, "step": result.step, "applied": result.applied})
    print(json.dumps(out))


# -- the worker (this process) ---------------------------------------------------------
def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def run(args: argparse.Namespace) -> tuple[list[dict], list[float], list[tuple[float, float]], list[float]]:
    import torch
    from torch import nn

    from lrctl.server import attach

    torch.manual_seed(0)
    torch.set_num_threads(1)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(args.width, args.width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(args.width, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    boundaries: list[float] = []  # boundaries[k]: when step k's pre-hooks began
    opt.register_step_pre_hook(lambda *a: boundaries.append(time.monotonic()))
    ctl = attach(model, opt, address="127.0.0.1:0", serving=args.serving)

    submits = record_submits(ctl.controller)

    cmd = [sys.executable, os.path.abspath(__file__), "--client", ctl.address, "--sets", str(args.sets),
           "--period", str(args.period), "--seed", str(args.seed)]
    client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    x, y = torch.randn(64, args.width), torch.randn(64, 1)
    work: list[float] = []
    try:
        while client.poll() is None:
            start = time.monotonic()
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            work.append(time.monotonic() - start)
            time.sleep(max(0.0, args.period - (time.monotonic() - start)))
        stdout, stderr = client.communicate()
    finally:
        if client.poll() is None:
            client.kill()
        ctl.close()
    if client.returncode != 0:
        sys.stderr.write(stderr)
        raise SystemExit(f"client process failed with exit code {client.returncode}")
    return json.loads(stdout.strip().splitlines()[-1]), boundaries, submits, work


def report(sets: list[dict], boundaries: list[float], submits: list[tuple[float, float]],
           work: list[float], args: argparse.Namespace) -> None:
    rows = []
    for s, (_, accepted) in zip(sets, submits):
        step = s["step"]
        next_after_send = bisect.bisect_right(boundaries, s["sent"])
        next_after_accept = bisect.bisect_right(boundaries, accepted)
        rows.append({
            "late_send": step - next_after_send,
            "late_accept": step - next_after_accept,
            "total": (s["acked"] - s["sent"]) * 1e3,
            "to_boundary": (boundaries[step] - s["sent"]) * 1e3,
            "ack_after": (s["acked"] - boundaries[step]) * 1e3,
            "accept": (accepted - s["sent"]) * 1e3,
            "margin": (boundaries[next_after_send] - s["sent"]) * 1e3,
            "applied": s["applied"],
        })
    gaps = [b - a for a, b in zip(boundaries, boundaries[1:])]
    print(f"bench_apply_latency: {len(rows)} Sets (wait=true) from a separate process at random "
          f"moments; steps of {statistics.median(gaps) * 1e3:.1f} ms median "
          f"({statistics.median(work) * 1e3:.1f} ms of work, sleep-padded to {args.period * 1e3:g} ms), "
          f"{os.cpu_count()} cpu(s)")
    print(f"\n{'ms':<44} {'p50':>7} {'p99':>7} {'max':>7} {'mean':>7}")
    for key, label in [("total", "send -> acknowledged (client)"),
                       ("to_boundary", "send -> the boundary it applied at"),
                       ("ack_after", "that boundary -> acknowledged"),
                       ("accept", "send -> queued by the worker (submit done)")]:
        v = [r[key] for r in rows]
        print(f"{label:<44} {_percentile(v, 50):7.1f} {_percentile(v, 99):7.1f} {max(v):7.1f} "
              f"{statistics.mean(v):7.1f}")
    print(f"\n{'steps late':<44} {'0':>7} {'1':>7} {'2+':>7}")
    for key, label in [("late_accept", "vs the first boundary after it was queued"),
                       ("late_send", "vs the first boundary after it was sent")]:
        v = [r[key] for r in rows]
        print(f"{label:<44} {v.count(0):7d} {v.count(1):7d} {sum(x >= 2 for x in v):7d}"
              + ("" if min(v) >= 0 else f"   (early: {sum(x < 0 for x in v)}!)"))
    late = [r for r in rows if r["late_send"] > 0]
    if late:
        print(f"  sent within {max(r['margin'] for r in late):.1f} ms before a boundary: "
              f"{len(late)} Set(s) took the next one (the request's own transit and checks "
              f"take ~{statistics.median(r['accept'] for r in rows):.1f} ms)")
    ok = all(r["late_accept"] == 0 and r["applied"] for r in rows)
    print(f"\ntarget: every change on the next boundary after it was queued: {'MET' if ok else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (CI): 8 Sets")
    parser.add_argument("--sets", type=int, default=40)
    parser.add_argument("--period", type=float, default=0.05, help="step period in seconds (sleep-padded)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=256, help="the MLP's width (64 for ~1.5 ms steps)")
    parser.add_argument("--serving", choices=("inprocess", "process"), default="inprocess",
                        help="attach(serving=...): the in-process server or a serving process")
    parser.add_argument("--client", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        _client_main(args.client, args.sets, args.period, args.seed)
        return
    if args.quick:
        args.sets = 8
    sets, boundaries, submits, work = run(args)
    report(sets, boundaries, submits, work, args)


if __name__ == "__main__":
    main()
