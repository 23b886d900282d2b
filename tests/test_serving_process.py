"""attach(serving="process"): the serving process, its lifecycle, and answers equal to
the in-process server's.

The rest of the service's tests run in this mode too with LRCTL_SERVING=process (see
the README's "Serving"); these are what only this mode has: a second process whose
life is tied to the training process's, and that imports no torch.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap

import grpc
import pytest

from conftest import (
    PATIENCE_S,
    Served,
    absolute,
    group_lrs,
    per_parameter_optimizer,
    rpc_error,
    seed_model,
    wait_for,
)
from lrctl.server import attach
from lrctl.v1 import lrctl_pb2 as pb


def _gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie nobody reaped counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.fixture
def process_served() -> Served:
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    ctl = attach(model, optimizer, address="127.0.0.1:0", serving="process")
    s = Served(model, optimizer, ctl)
    try:
        yield s
    finally:
        s.close()


def test_bad_serving_mode_is_refused_before_anything_is_touched() -> None:
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    before = group_lrs(model, optimizer)
    with pytest.raises(ValueError, match="'threads'"):
        attach(model, optimizer, address="127.0.0.1:0", serving="threads")
    assert group_lrs(model, optimizer) == before
    assert not optimizer._optimizer_step_pre_hooks


def test_environment_selects_the_serving_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LRCTL_SERVING", "process")
    model = seed_model()
    with attach(model, per_parameter_optimizer(model), address="127.0.0.1:0") as ctl:
        assert ctl._server.alive
        pid = ctl._server.process.pid
        assert pid != os.getpid()
    assert _gone(pid)


def test_the_serving_process_imports_no_torch(process_served: Served) -> None:
    pid = process_served.ctl._server.process.pid
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read()
    assert "libtorch" not in maps
    assert "_pywrap_grpc" in maps or "cygrpc" in maps  # it does serve gRPC


def test_a_bind_refused_in_the_serving_process_raises_in_attach() -> None:
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    with pytest.raises(ValueError, match="refusing to listen on 0.0.0.0:0"):
        attach(model, optimizer, address="0.0.0.0:0", serving="process")
    assert not optimizer._optimizer_step_pre_hooks


def test_changes_errors_and_streams_go_through(process_served: Served) -> None:
    s = process_served
    error = rpc_error(lambda: s.stub.SetLearningRates(
        pb.SetLearningRatesRequest(updates=[absolute("nope", 0.5)]), timeout=10))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in error.details()
    reply = s.stub.SetLearningRates(pb.SetLearningRatesRequest(updates=[absolute("*", 0.25)]), timeout=10)
    assert not reply.applied
    s.step()
    assert set(group_lrs(s.model, s.optimizer).values()) == {0.25}
    assert set(s.rates().values()) == {0.25}
    stream = s.stub.WatchMetrics(pb.WatchMetricsRequest(from_step=0), timeout=PATIENCE_S)
    s.step()  # a step's event is complete (and sent) once the next step begins
    first = next(stream)
    assert first.step == 0 and first.changes[0].change_id == reply.change_id
    stream.cancel()


def test_a_dead_serving_process_is_noticed_and_training_goes_on(
        process_served: Served, caplog: pytest.LogCaptureFixture) -> None:
    s = process_served
    s.step()
    with caplog.at_level(logging.ERROR, logger="lrctl.server"):
        s.ctl._server.process.kill()
        wait_for(lambda: "serving process exited" in caplog.text, "the training process to notice")
    s.step(3)  # never hangs
    assert s.ctl.step == 4
    assert not s.ctl._server.alive


_WORKER = textwrap.dedent("""
    import sys, time, torch
    from lrctl.server import attach
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = attach(model, opt, address="127.0.0.1:0", serving="process")
    print(ctl._server.process.pid, ctl.address, flush=True)
    while True:
        time.sleep(1)
""")


def test_the_serving_process_dies_with_the_training_process() -> None:
    worker = subprocess.Popen([sys.executable, "-c", _WORKER], stdout=subprocess.PIPE, text=True)
    try:
        pid, address = worker.stdout.readline().split()
        with grpc.insecure_channel(address) as channel:
            from lrctl.v1 import lrctl_pb2_grpc as pb_grpc
            assert pb_grpc.LearningRateControlStub(channel).GetStatus(pb.GetStatusRequest(), timeout=PATIENCE_S).step == 0
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        wait_for(lambda: _gone(int(pid)), "the serving process to exit")
    finally:
        worker.kill()
        worker.wait()
