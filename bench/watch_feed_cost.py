"""Python CPU the training process spends per step on WatchMetrics streams.

A small model is attached (the serving mode from $LRCTL_SERVING, as attach reads it),
W streams read every event on threads of this process, and the loop reports a loss
tensor and steps every ~1 ms. What is measured, per step, is the CPU time of the
serving event loop's thread in the training process (in-process: the server's loop;
with serving="process": the link's thread, which sends an event only when its tensors
are on a device) and of the training thread itself (with serving="process" it sends
each event on the feed; compare with --watchers 0 for the feed's share):

    for w in 0 1 4; do LRCTL_SERVING=process python bench/watch_feed_cost.py --watchers $w; done
"""

from __future__ import annotations

import argparse
import asyncio
import os
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
    parser.add_argument("--watchers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    model = nn.Linear(64, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    ctl = attach(model, optimizer, address="127.0.0.1:0")
    server = ctl._server
    loop = server._loop if hasattr(server, "_loop") else server.loop
    channel = grpc.insecure_channel(ctl.address)
    stub = pb_grpc.LearningRateControlStub(channel)
    streams = [stub.WatchMetrics(pb.WatchMetricsRequest()) for _ in range(args.watchers)]
    counts = [0] * args.watchers

    def read(k: int) -> None:
        try:
            for _ in streams[k]:
                counts[k] += 1
        except grpc.RpcError:  # cancelled at the end
            pass

    readers = [threading.Thread(target=read, args=(k,), daemon=True) for k in range(args.watchers)]
    for thread in readers:
        thread.start()
    while len(ctl.service.watchers) < args.watchers:
        time.sleep(0.01)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    async def cpu() -> int:
        return time.thread_time_ns()

    def loop_cpu() -> int:
        return asyncio.run_coroutine_threadsafe(cpu(), loop).result()

    start, own = loop_cpu(), time.thread_time_ns()
    for i in range(args.steps):
        ctl.report(torch.tensor(float(i)))
        optimizer.step()
        time.sleep(0.001)
    own = time.thread_time_ns() - own
    used = loop_cpu() - start
    for stream in streams:
        stream.cancel()
    for thread in readers:
        thread.join()
    channel.close()
    ctl.close(0.5)
    print(f"serving {os.environ.get('LRCTL_SERVING') or 'inprocess'}, {args.watchers} streams: "
          f"{used / args.steps / 1000:.0f} us of the serving loop's CPU and "
          f"{own / args.steps / 1000:.0f} us of the training thread's per step "
          f"(events read per stream: {counts})")


if __name__ == "__main__":
    main()
