"""gRPC and fork() do not mix: DataLoader workers started after attach use spawn.

The README tells users to pass multiprocessing_context="spawn" (or "forkserver"); this
checks that recipe really works with a live server: workers start, data flows, and the
server still answers afterwards.
"""

from __future__ import annotations

import grpc
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import seed_model
from lrctl.server import attach
from lrctl.v1 import lrctl_pb2, lrctl_pb2_grpc


def test_spawned_dataloader_workers_train_while_serving() -> None:
    model = seed_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = TensorDataset(torch.randn(32, 10), torch.randn(32, 1))
    with attach(model, opt, address="127.0.0.1:0") as ctl:
        loader = DataLoader(data, batch_size=8, num_workers=2, multiprocessing_context="spawn")
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        with grpc.insecure_channel(ctl.address) as channel:
            stub = lrctl_pb2_grpc.LearningRateControlStub(channel)
            status = stub.GetStatus(lrctl_pb2.GetStatusRequest(), timeout=10)
    assert status.step == 4
