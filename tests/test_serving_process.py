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


def test_close_takes_the_publishing_hook_out_of_the_controller() -> None:
    """The step hook's publisher of step and version is removed at close (a bound
    method compared by identity never was)."""
    model = seed_model()
    with attach(model, per_parameter_optimizer(model), address="127.0.0.1:0", serving="process") as ctl:
        assert len(ctl.controller._after_step) == 1
    assert ctl.controller._after_step == ()


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
    # The link's end can be seen before the killed process can be reaped (the kernel
    # closes its sockets first): `alive` turns False a moment later, not at once.
    wait_for(lambda: not s.ctl._server.alive, "the serving process to be reaped")


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


# -- reads answered in the serving process -------------------------------------------

def _forwarded(s: Served, method: str) -> int:
    """Calls of `method` the training process answered (OK) so far."""
    return s.ctl._server.requests.forwarded().get((f"lrctl.v1.LearningRateControl/{method}", "OK"), 0)


def _both_served() -> tuple[Served, Served]:
    made = []
    for serving in ("inprocess", "process"):
        model = seed_model()
        optimizer = per_parameter_optimizer(model)
        made.append(Served(model, optimizer, attach(model, optimizer, address="127.0.0.1:0", serving=serving)))
    return made[0], made[1]


_READS = [
    ("GetLearningRates", pb.GetLearningRatesRequest()),
    ("GetLearningRates", pb.GetLearningRatesRequest(selectors=["*.weight"])),
    ("GetLearningRates", pb.GetLearningRatesRequest(page_size=2)),
    ("GetSchedules", pb.GetSchedulesRequest()),
    ("ListParameters", pb.ListParametersRequest()),
    ("ListParameters", pb.ListParametersRequest(view=pb.PARAMETER_VIEW_NAMES, page_size=2)),
    ("ListPending", pb.ListPendingRequest()),
]


def _same(message):
    """The answer without what differs between two jobs: when and from which port."""
    if isinstance(message, pb.ListPendingResponse):
        for change in message.changes:
            change.ClearField("requested_at")
            change.ClearField("peer")
    return message


def test_reads_from_the_serving_process_equal_the_in_process_answers() -> None:
    inproc, proc = _both_served()
    try:
        for s in (inproc, proc):
            s.stub.SetLearningRates(pb.SetLearningRatesRequest(updates=[absolute("*.weight", 0.125)]), timeout=10)
            s.step(2)
            s.stub.SetLearningRates(pb.SetLearningRatesRequest(
                updates=[absolute("*.bias", 0.5)], at_step=100), timeout=10)
        for method, request in _READS:
            want = _same(getattr(inproc.stub, method)(request, timeout=10))
            before = _forwarded(proc, method)
            first = _same(getattr(proc.stub, method)(request, timeout=10))
            again = _same(getattr(proc.stub, method)(request, timeout=10))
            assert first == want, method
            assert again == want, method
            if method != "ListPending":  # ListPending is always forwarded
                # Answered in the serving process from its snapshot (serving_reads).
                assert _forwarded(proc, method) == before, f"{method}: forwarded"
        # A step later: the kept answers carry the new step; a change: they are dropped.
        for s in (inproc, proc):
            s.step()
        for method, request in _READS[:4]:
            assert getattr(proc.stub, method)(request, timeout=10) == getattr(inproc.stub, method)(request, timeout=10)
        for s in (inproc, proc):
            s.stub.SetLearningRates(pb.SetLearningRatesRequest(updates=[absolute("*", 0.75)]), timeout=10)
            s.step()
        for method, request in _READS:
            assert _same(getattr(proc.stub, method)(request, timeout=10)) == _same(
                getattr(inproc.stub, method)(request, timeout=10)), method
        assert set(proc.rates().values()) == {0.75}
        status = [s.stub.GetStatus(pb.GetStatusRequest(), timeout=10) for s in (inproc, proc)]
        for field in ("step", "version", "num_parameters", "num_distinct_lrs", "pending_changes", "state"):
            assert getattr(status[0], field) == getattr(status[1], field), field
    finally:
        inproc.close()
        proc.close()


def test_a_waiting_set_is_read_back_at_once(process_served: Served) -> None:
    """Read-your-writes: the answer to a waiting Set names a version the serving
    process has not yet seen published; it must not answer from an older one."""
    from conftest import Trainer

    s = process_served
    trainer = Trainer(s.model, s.optimizer).start()
    try:
        for k in range(1, 21):
            value = k / 64
            s.stub.GetLearningRates(pb.GetLearningRatesRequest(), timeout=10)  # kept
            reply = s.stub.SetLearningRates(pb.SetLearningRatesRequest(
                updates=[absolute("*", value)], wait=True), timeout=PATIENCE_S)
            assert reply.applied
            got = s.stub.GetLearningRates(pb.GetLearningRatesRequest(), timeout=10)
            assert got.version >= reply.version
            assert {r.lr for r in got.rates} == {value}
    finally:
        trainer.stop()
    assert not trainer.errors


def test_rates_that_move_with_the_step_are_read_at_the_published_step(process_served: Served) -> None:
    s = process_served
    s.stub.SetSchedules(pb.SetSchedulesRequest(schedules=[pb.ScheduleAssignment(
        selector="*", schedule=pb.Schedule(step=pb.StepSchedule(gamma=0.5, step_size=1)))]), timeout=10)
    s.step()
    before = _forwarded(s, "GetLearningRates")
    first = s.stub.GetLearningRates(pb.GetLearningRatesRequest(), timeout=10)
    s.step()
    second = s.stub.GetLearningRates(pb.GetLearningRatesRequest(), timeout=10)
    assert _forwarded(s, "GetLearningRates") == before  # one snapshot, the schedule evaluated here
    assert second.step == first.step + 1
    assert [r.lr * 0.5 for r in first.rates] == [r.lr for r in second.rates]


def test_a_version_changed_between_steps_is_published(process_served: Served) -> None:
    s = process_served
    s.step()
    state = s.ctl.state_dict()
    s.stub.SetLearningRates(pb.SetLearningRatesRequest(updates=[absolute("*", 0.375)]), timeout=10)
    s.step()
    assert set(s.rates().values()) == {0.375}
    assert set(s.rates().values()) == {0.375}  # kept
    s.ctl.load_state_dict(state)  # no step: only the 0.1 s check publishes it
    wait_for(lambda: set(s.rates().values()) != {0.375}, "the restored rates to be read")
    assert s.rates() == {n: float(lr) for n, lr in group_lrs(s.model, s.optimizer).items()}


def test_closing_while_lockstep_holds_a_step_lets_the_step_finish(process_served: Served) -> None:
    import threading

    from lrctl.client.client import LRClient

    s = process_served
    errors: list[BaseException] = []

    def one_step() -> None:
        try:
            s.step()
        except BaseException as exc:  # the step must finish cleanly
            errors.append(exc)

    with LRClient(s.ctl.address, timeout=PATIENCE_S) as client:
        session = client.lockstep(every=1, timeout=60)
        training = threading.Thread(target=one_step)
        training.start()
        next(session)  # the step is held at its boundary
        s.ctl.close(grace=0.5)
        training.join(PATIENCE_S)
    assert not training.is_alive(), "training stalled"
    assert not errors
