"""Reads answered from a snapshot in the serving process: what they cost the training process.

Two measures (bench/README.md section 3c):

1. `--per-read`: attach(serving="process") to the section 3 MLP; a client in this
   process repeats (Set *.weight to a new value, one training step: a new version,
   then a GetLearningRates of the glob "*.weight"), and the same without the Get. The
   difference of the training process's link thread CPU per round is what a read after
   a change costs the training process (its snapshot, made once for that version).
   Before the snapshot the read was forwarded and answered here (~450 us of Python).
2. `--names N`: a Controller over N one-element parameters; the snapshot's parts
   (static once, versioned per version) in bytes and in ms to make (with pickling).

    python bench/bench_snapshot_reads.py                 # both, ~1 min
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time

import grpc
import torch
from torch import nn

from lrctl.server import attach
from lrctl.server.controller import Controller
from lrctl.v1 import lrctl_pb2 as pb
from lrctl.v1 import lrctl_pb2_grpc as pb_grpc

torch.set_num_threads(1)
_TICK = os.sysconf("SC_CLK_TCK")


def _thread_cpu(native_id: int) -> float:
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def per_read(rounds: int, width: int = 512, depth: int = 4) -> None:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl = attach(model, optimizer, address="127.0.0.1:0", serving="process")
    server = ctl._server
    link = server._thread.native_id
    channel = grpc.insecure_channel(ctl.address)
    stub = pb_grpc.LearningRateControlStub(channel)
    x = torch.randn(8, width)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(x).sum().backward()
        optimizer.step()

    def run(with_get: bool, n: int, offset: int) -> float:
        start = _thread_cpu(link)
        for k in range(n):
            stub.SetLearningRates(pb.SetLearningRatesRequest(updates=[pb.LearningRateUpdate(
                selector="*.weight", mode=pb.UPDATE_MODE_ABSOLUTE, value=1e-3 + (offset + k) * 1e-7)]), timeout=10)
            step()
            if with_get:
                stub.GetLearningRates(pb.GetLearningRatesRequest(selectors=["*.weight"]), timeout=10)
        return (_thread_cpu(link) - start) / n * 1e6

    try:
        run(True, 50, 0)  # warm up
        results: dict[bool, list[float]] = {True: [], False: []}
        for r in range(4):  # alternated: the machine's load drifts
            for with_get in (False, True):
                results[with_get].append(run(with_get, rounds, 1000 * (r + 1) + (500 if with_get else 0)))
        without, with_ = sorted(results[False])[1:3], sorted(results[True])[1:3]
        a, b = sum(without) / 2, sum(with_) / 2
        print(f"training process link thread CPU per round (median pair of 4): Set+step {a:.0f} us, "
              f"Set+step+Get {b:.0f} us: the Get after a change costs {b - a:.0f} us")
        print(f"{len(ctl.controller.names)} tensors; snapshots asked for: see the serving process")
    finally:
        channel.close()
        ctl.close(grace=0.5)


def names(n: int) -> None:
    params = [(f"blocks.{i // 10}.layer{i % 10}.weight", nn.Parameter(torch.zeros(1))) for i in range(n)]
    optimizer = torch.optim.SGD([p for _, p in params], lr=0.1, momentum=0.9)
    ctl = Controller(params, optimizer)
    t = time.perf_counter()
    static = pickle.dumps(ctl.read_static(), pickle.HIGHEST_PROTOCOL)
    t_static = time.perf_counter() - t
    times = []
    for _ in range(5):
        t = time.thread_time()
        versioned = pickle.dumps(ctl.read_versioned(1), pickle.HIGHEST_PROTOCOL)
        times.append(time.thread_time() - t)
    print(f"{n} names: static part {len(static) / 1e6:.2f} MB in {t_static * 1e3:.0f} ms (once); "
          f"versioned part {len(versioned) / 1e6:.2f} MB in {sorted(times)[2] * 1e3:.1f} ms CPU (median of 5; once per version a read needs)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--names", type=int, default=100_000)
    ap.add_argument("--skip", choices=("per-read", "names"), default=None)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (CI)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.names = 5, 1000
    if args.skip != "per-read":
        per_read(args.rounds)
    if args.skip != "names":
        names(args.names)


if __name__ == "__main__":
    sys.exit(main())
