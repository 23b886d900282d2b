"""Python CPU the training process spends per forwarded call with serving="process".

A small model is attached with a serving process; a client in this process calls it
(GetStatus, a dry-run Set, a Set that does not wait, a waiting Set) while a trainer
thread steps every 0.5 ms. What is measured is the CPU time of the training process's
forwarding thread (its event loop: frame decode, the handlers, the reply), per call:
the median and the smallest of the rounds' means. The client's own gRPC work runs on
other threads and is not counted. Compare two trees by running it under each
(bench/README.md section 3c):

    python bench/forwarded_call_cost.py
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time

import grpc
import torch
from torch import nn

from lrctl.server import attach
from lrctl.v1 import lrctl_pb2 as pb
from lrctl.v1 import lrctl_pb2_grpc as pb_grpc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per round and kind")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(8)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl = attach(model, optimizer, address="127.0.0.1:0", serving="process")
    loop = ctl._server._loop  # the forwarding thread's event loop
    channel = grpc.insecure_channel(ctl.address)
    stub = pb_grpc.LearningRateControlStub(channel)
    stop = threading.Event()

    def trainer() -> None:  # applies the queued Sets
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        while not stop.is_set():
            optimizer.step()
            time.sleep(0.0005)

    async def cpu() -> int:
        return time.thread_time_ns()

    def loop_cpu() -> int:
        return asyncio.run_coroutine_threadsafe(cpu(), loop).result()

    def update(selector: str, value: float) -> pb.LearningRateUpdate:
        return pb.LearningRateUpdate(selector=selector, value=value, mode=pb.UPDATE_MODE_ABSOLUTE)

    kinds = {
        "GetStatus": (stub.GetStatus, pb.GetStatusRequest()),
        "Set dry-run": (stub.SetLearningRates,
                        pb.SetLearningRatesRequest(updates=[update("0.weight", 0.01)], dry_run=True)),
        "Set no-wait": (stub.SetLearningRates,
                        pb.SetLearningRatesRequest(updates=[update("1.weight", 0.02)], wait=False)),
        "Set wait": (stub.SetLearningRates,
                     pb.SetLearningRatesRequest(updates=[update("2.weight", 0.03)], wait=True)),
    }
    thread = threading.Thread(target=trainer, daemon=True)
    thread.start()
    results: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        for call, request in kinds.values():
            for _ in range(50):
                call(request)
        for _ in range(args.rounds):
            for kind, (call, request) in kinds.items():
                start = loop_cpu()
                for _ in range(args.calls):
                    try:
                        call(request)
                    except grpc.RpcError:  # the queue's per-connection quota: let steps drain it
                        time.sleep(0.005)
                results[kind].append((loop_cpu() - start) / args.calls / 1000)
    finally:
        stop.set()
        thread.join()
        channel.close()
        ctl.close(0.5)
    for kind, values in results.items():
        print(f"{kind:12s} median {statistics.median(values):6.0f} us  min {min(values):6.0f} us per call")


if __name__ == "__main__":
    main()
