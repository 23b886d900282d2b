"""Sets the serving process queues itself (lrctl.server.posted_writes).

With serving="process", a Set that does not wait and is due at the next boundary is put
in a ring in shared memory and answered there; the step hook queues it. These tests
hold that path to the guarantees of a change queued by the training process: ids in
the order of acceptance whoever took them, the order of application, cancel, the
queue's bounds, a checkpoint load, close, the reads' snapshots, and neither process
waiting on a ring that a stopped process holds.
"""

from __future__ import annotations

import marshal
import math
import os
import subprocess
import sys
import threading
import tracemalloc
from array import array
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

import grpc
import pytest
import torch
from torch import nn

from conftest import PATIENCE_S, absolute, scale, wait_for
from lrctl.server import attach
from lrctl.server.planned_wire import Planned, planned_from_wire, planned_to_wire, without_plan
from lrctl.server.planner import PlannedChange
from lrctl.server.queue_limits import QueueLimits, estimate_bytes
from lrctl.server.requests import ChangeRequest, Mode, PendingChange, Update
from lrctl.v1 import lrctl_pb2 as pb
from lrctl.v1 import lrctl_pb2_grpc as pb_grpc

SET = "lrctl.v1.LearningRateControl/SetLearningRates"


class Worker:
    """A small model under attach(serving="process"), stepped by the test itself."""

    def __init__(self, queue_limits: QueueLimits | None = None) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.ctl = attach(self.model, self.optimizer, address="127.0.0.1:0", serving="process",
                          queue_limits=queue_limits)
        self.channel = grpc.insecure_channel(self.ctl.address)
        self.stub = pb_grpc.LearningRateControlStub(self.channel)
        self.stub.GetLearningRates(pb.GetLearningRatesRequest(), timeout=PATIENCE_S)  # a snapshot there

    def set(self, selector: str, value: float, **kw: object) -> pb.SetLearningRatesResponse:
        return self.stub.SetLearningRates(
            pb.SetLearningRatesRequest(updates=[absolute(selector, value)], **kw), timeout=PATIENCE_S)

    def forwarded_sets(self) -> int:
        """Sets the training process answered (over the link), whatever their status."""
        return sum(n for (method, _), n in self.ctl._server.requests.forwarded().items() if method == SET)

    def history(self) -> list:
        return self.ctl.controller.history(-1, 1000)[0]

    def close(self) -> None:
        self.channel.close()
        self.ctl.close(grace=0.5)


@pytest.fixture
def worker() -> Iterator[Worker]:
    w = Worker()
    try:
        yield w
    finally:
        w.close()


def test_sets_that_do_not_wait_are_queued_without_the_training_process(worker: Worker) -> None:
    w = worker
    ids = [w.set("0.weight", 0.01 * (k + 1)).change_id for k in range(3)]
    assert ids == [1, 2, 3] and w.forwarded_sets() == 0
    # The training process's own change takes the next id, after them, and a Set due
    # at a later step (over the link) the one after.
    local, _ = w.ctl.controller.submit(ChangeRequest((Update("0.bias", 0.5),)))
    later = w.set("1.weight", 0.2, at_step=w.ctl.controller.step + 5)
    assert (local.change_id, later.change_id) == (4, 5) and w.forwarded_sets() == 1
    pending = w.stub.ListPending(pb.ListPendingRequest(), timeout=PATIENCE_S)
    assert [c.change_id for c in pending.changes] == [1, 2, 3, 4, 5]
    w.optimizer.step()
    applied = [(r.change_id, r.version, r.step) for r in w.history()]
    assert applied == [(1, 1, 0), (2, 2, 0), (3, 3, 0), (4, 4, 0)]  # in the order accepted
    rates = w.ctl.controller.learning_rates()
    assert rates["0.weight"] == pytest.approx(0.03) and rates["0.bias"] == 0.5  # the last one wins
    counts = w.ctl._server.requests.snapshot()  # counted in lrctl_requests_total all the same
    assert counts[(SET, "OK")] == 4


def test_a_queued_set_is_cancelled_by_its_id_before_its_step(worker: Worker) -> None:
    w = worker
    first, second = w.set("0.weight", 0.3), w.set("0.bias", 0.4)
    answer = w.stub.CancelChanges(pb.CancelChangesRequest(change_ids=[first.change_id], reason="changed my mind"),
                                  timeout=PATIENCE_S)
    assert list(answer.cancelled) == [first.change_id]
    w.optimizer.step()
    records = {r.change_id: r for r in w.history()}
    assert records[first.change_id].failed and "changed my mind" in records[first.change_id].error
    assert not records[second.change_id].failed
    assert w.ctl.controller.learning_rates()["0.weight"] == 0.1


def test_a_full_ring_hands_sets_to_the_link_in_order() -> None:
    w = Worker()
    try:
        ids = [w.set("0.weight", 0.001 * (k + 1)).change_id for k in range(40)]
        assert ids == list(range(1, 41))
        # The ring holds 32: the 33rd took the link, and the training process, queueing
        # it, moved the ring into its queue first (so the ring had room again).
        assert w.forwarded_sets() == 1
        assert [c.change_id for c in w.stub.ListPending(pb.ListPendingRequest(), timeout=PATIENCE_S).changes] == ids
        w.optimizer.step()
        assert [r.change_id for r in w.history()] == ids
        assert w.ctl.controller.learning_rates()["0.weight"] == pytest.approx(0.04)
    finally:
        w.close()


def test_the_queue_bounds_hold_for_sets_queued_in_the_ring() -> None:
    w = Worker(QueueLimits(max_changes_per_connection=3))
    try:
        for k in range(3):
            w.set("0.weight", 0.1 + k)
        with pytest.raises(grpc.RpcError) as refused:
            w.set("0.weight", 0.5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "already has 3 queued changes" in refused.value.details()
        assert w.forwarded_sets() == 1  # the training process decided, with the exact shares
        w.optimizer.step()
        assert [r.change_id for r in w.history()] == [1, 2, 3] and not any(r.failed for r in w.history())
        w.set("0.weight", 0.7)  # room again
        w.optimizer.step()
        assert w.ctl.controller.learning_rates()["0.weight"] == 0.7
    finally:
        w.close()


def test_applied_sets_leave_room_in_the_ring_without_the_link() -> None:
    """The queue's count in the ring's header is made exact once a boundary applied
    changes (and whenever the step hook takes the ring): a steady stream, applied as it
    comes, never fills the bound there."""
    w = Worker(QueueLimits(max_changes_per_connection=3))
    try:
        for k in range(4 * 3):
            w.set("0.weight", 0.01 * (k + 1))
            if k % 2:
                w.optimizer.step()
        w.optimizer.step()
        assert w.forwarded_sets() == 0
        assert len(w.history()) == 12 and not any(r.failed for r in w.history())
        assert w.ctl.controller.learning_rates()["0.weight"] == pytest.approx(0.12)
    finally:
        w.close()


def test_changes_the_training_process_queued_leave_room_at_the_boundary_that_applies_them() -> None:
    """Changes queued in the training process (not through the ring) count in the
    ring's header until a boundary applies them; then the ring has room again."""
    w = Worker(QueueLimits(max_changes_per_connection=3))
    try:
        for value in (0.2, 0.3, 0.4):
            w.ctl.controller.submit(ChangeRequest((Update("1.weight", value),)))
        w.optimizer.step()  # the ring is empty at this boundary: the queue's count is made exact after it
        for k in range(3):
            w.set("0.weight", 0.01 * (k + 1))
        assert w.forwarded_sets() == 0
        w.optimizer.step()
        assert len(w.history()) == 6 and not any(r.failed for r in w.history())
    finally:
        w.close()


def _pin(selector: str, value: float, mode: int = pb.UPDATE_MODE_ABSOLUTE) -> pb.LearningRateUpdate:
    return pb.LearningRateUpdate(selector=selector, mode=mode, value=value, target=pb.UPDATE_TARGET_PIN)


_SETS = [  # (updates, steps after): bases, pins and both, while "1.*" follows a schedule
    ([scale("*", 0.5)], 1),
    ([_pin("0.bias", 0.02)], 1),
    ([scale("0.*", 3.0), _pin("1.weight", 0.5, pb.UPDATE_MODE_SCALE)], 2),
    ([absolute("1.bias", 0.07), _pin("0.bias", 0, pb.UPDATE_MODE_UNPIN)], 1),
    ([scale("0.weight", 2.0)], 0),  # two changes at one boundary: the second was planned
    ([scale("0.weight", 2.0)], 1),  # at the version the first one replaces
]


def test_a_change_planned_in_the_serving_process_is_applied_as_planning_it_again_would() -> None:
    """The step hook applies the serving process's plan as is only while it is what
    planning the change again would give (same version, loads and step): the same Sets
    give the same plans, rates and history as an in-process worker, which plans each
    at its boundary, and most plans are not made again."""
    def run(serving: str) -> tuple[list, int]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        ctl = attach(model, optimizer, address="127.0.0.1:0", serving=serving)
        planned = []
        plan = ctl.controller._plan
        ctl.controller._plan = lambda *a, **k: planned.append(1) or plan(*a, **k)  # a spy: counts, then plans
        channel = grpc.insecure_channel(ctl.address)
        try:
            stub = pb_grpc.LearningRateControlStub(channel)
            stub.SetSchedules(pb.SetSchedulesRequest(schedules=[pb.ScheduleAssignment(
                selector="1.*", schedule=pb.Schedule(step=pb.StepSchedule(step_size=2, gamma=0.5)))]),
                timeout=PATIENCE_S)
            optimizer.step()
            for updates, steps in _SETS:
                stub.SetLearningRates(pb.SetLearningRatesRequest(updates=updates), timeout=PATIENCE_S)
                for _ in range(steps):
                    optimizer.step()
            records = ctl.controller.history(-1, 1000)[0]
            rows = [(r.step, r.version, r.failed, list(r.plan.indices), list(r.plan.old_lr), list(r.plan.new_lr),
                     list(r.plan.old_base), list(r.plan.new_base), r.plan.old_pin and list(r.plan.old_pin),
                     r.plan.new_pin and list(r.plan.new_pin)) for r in records]
            return rows + [ctl.controller.learning_rates()], len(planned)
        finally:
            channel.close()
            ctl.close(grace=0.5)

    posted, planned_there = run("process")
    here, planned_here = run("inprocess")
    assert str(posted) == str(here)  # NaN pins compare equal as text
    assert planned_here == len(_SETS) + 1
    # Only the change that met a newer version than its plan's (and the schedule's,
    # whose new schedule ids only the training process gives) were planned again.
    assert planned_there == 2


def test_a_plan_travels_whole_and_is_used_only_for_the_state_it_was_made_for() -> None:
    ops = {2: ((Mode.SCALE, 2.0), None, None), 0: (None, (Mode.ABSOLUTE, 0.5), None)}
    plan = PlannedChange(step=7, indices=array("q", ops), old_lr=array("d", [0.1, 0.2]),
                         new_lr=array("d", [0.2, 0.5]), old_base=array("d", [0.1, 0.2]),
                         new_base=array("d", [0.2, 0.2]), old_pin=array("d", [math.nan, math.nan]),
                         new_pin=array("d", [math.nan, 0.5]), old_schedule=None, new_schedule=None,
                         schedules={})
    planned = Planned(ChangeRequest((Update("a", 1.0),)), ops, version=4, max_reported_changes=1,
                      loads=1, plan=plan)
    got = planned_from_wire(marshal.loads(marshal.dumps(planned_to_wire(planned))))
    assert got.ops == ops and str(got.plan) == str(plan)  # NaN pins compare equal as text
    assert got.plan_for(4, 1, 7) is got.plan
    assert got.plan_for(5, 1, 7) is None and got.plan_for(4, 2, 7) is None and got.plan_for(4, 1, 8) is None
    assert planned_from_wire(without_plan(planned_to_wire(planned))).plan is None
    # A plan that gives schedules provisional ids is not sent: the training process
    # gives the ids.
    scheduled = replace(plan, old_schedule=array("q", [0, 0]), new_schedule=array("q", [0, 1]))
    assert planned_from_wire(planned_to_wire(replace(planned, plan=scheduled))).plan is None


def test_a_set_whose_plan_does_not_fit_a_slot_is_queued_there_without_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(60)])  # 120 names: ~4.8 KB of plan
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = attach(model, optimizer, address="127.0.0.1:0", serving="process")
    channel = grpc.insecure_channel(ctl.address)
    try:
        stub = pb_grpc.LearningRateControlStub(channel)
        stub.SetLearningRates(pb.SetLearningRatesRequest(updates=[scale("*", 0.5)]), timeout=PATIENCE_S)
        optimizer.step()
        forwarded = sum(n for (method, _), n in ctl._server.requests.forwarded().items() if method == SET)
        assert forwarded == 0
        assert set(ctl.controller.learning_rates().values()) == {0.05}
    finally:
        channel.close()
        ctl.close(grace=0.5)


def test_a_checkpoint_load_withdraws_sets_queued_in_the_ring(worker: Worker) -> None:
    w = worker
    w.set("0.weight", 0.2)
    w.optimizer.step()
    saved = w.ctl.state_dict()  # version 1, next id 2
    w.set("0.weight", 0.3)
    w.set("0.weight", 0.4)
    queued = w.set("0.bias", 0.5)
    w.ctl.load_state_dict(saved)
    assert w.stub.ListPending(pb.ListPendingRequest(), timeout=PATIENCE_S).changes == []
    assert queued.change_id == 4
    after = w.set("0.weight", 0.6)
    assert after.change_id == 2  # the ids go on from the checkpoint's
    w.optimizer.step()
    assert w.ctl.controller.learning_rates()["0.weight"] == 0.6 and w.ctl.controller.learning_rates()["0.bias"] == 0.1


def test_close_fails_sets_queued_in_the_ring() -> None:
    w = Worker()
    queued = w.set("0.weight", 0.3)
    controller = w.ctl.controller
    w.close()
    (record,) = [r for r in controller.history(-1, 10)[0] if r.change_id == queued.change_id]
    assert record.failed and "shut down" in record.error
    assert controller.learning_rates()["0.weight"] == 0.1


_HOLD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX, 1, 0)
print("held", flush=True)
sys.stdin.readline()
"""


@contextmanager
def _ring_held_elsewhere(w: Worker) -> Iterator[None]:
    """Another process holds the ring's lock meanwhile (as a stopped process would)."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, f"/proc/{os.getpid()}/fd/{w.ctl._server._posted.fd}"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(PATIENCE_S)


def test_the_step_hook_does_not_wait_for_a_ring_another_process_holds(worker: Worker) -> None:
    # A serving process stopped while it holds the ring's lock (here: another process
    # holding it) costs a step nothing: the hook leaves the ring for the next boundary.
    w = worker
    queued = w.set("0.weight", 0.3)
    with _ring_held_elsewhere(w):
        stepped = threading.Thread(target=w.optimizer.step)
        stepped.start()
        stepped.join(PATIENCE_S)
        assert not stepped.is_alive()
        assert w.ctl.controller.learning_rates()["0.weight"] == 0.1  # not this step
    w.optimizer.step()
    (record,) = [r for r in w.history() if r.change_id == queued.change_id]
    assert record.step == 1 and w.ctl.controller.learning_rates()["0.weight"] == 0.3


def test_reads_after_each_change_need_no_snapshot_from_the_link(worker: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    # The thread that applied a change writes the new version's read snapshot into the
    # shared memory; the serving process reads it there instead of asking the link.
    w = worker
    server = w.ctl._server
    sent = server.snapshots_sent
    for k in range(5):
        w.set("0.weight", 0.01 * (k + 1))
        w.optimizer.step()
        rates = w.stub.GetLearningRates(pb.GetLearningRatesRequest(selectors=["0.weight"]), timeout=PATIENCE_S)
        assert rates.version == k + 1 and rates.rates[0].lr == pytest.approx(0.01 * (k + 1))
    assert server.snapshots_sent == sent and server.snapshots_written >= 5
    # A change that adds a schedule to the book goes through the link (the schedules
    # travel there), and so does every version of a job past the size limit.
    w.stub.SetSchedules(pb.SetSchedulesRequest(schedules=[pb.ScheduleAssignment(
        selector="1.*", schedule=pb.Schedule(step=pb.StepSchedule(step_size=2, gamma=0.5)))]), timeout=PATIENCE_S)
    w.optimizer.step()
    got = w.stub.GetSchedules(pb.GetSchedulesRequest(selectors=["1.weight"]), timeout=PATIENCE_S)
    assert got.version == 6 and server.snapshots_sent == sent + 1
    monkeypatch.setattr("lrctl.server.serving_process._HERE_NAMES", 1)
    w.set("0.bias", 0.3)
    w.optimizer.step()
    rates = w.stub.GetLearningRates(pb.GetLearningRatesRequest(selectors=["0.bias"]), timeout=PATIENCE_S)
    assert rates.version == 7 and rates.rates[0].lr == 0.3 and server.snapshots_sent == sent + 2


_FCNTL = {"x86_64": "72", "aarch64": "25"}  # the fcntl syscall's number (/proc/.../syscall)


def _blocked_in_fcntl(tid: int) -> bool:
    with open(f"/proc/self/task/{tid}/syscall") as f:
        return f.read().split()[0] == _FCNTL[os.uname().machine]


@pytest.mark.skipif(os.uname().machine not in _FCNTL, reason="reads a syscall number from /proc")
def test_the_serving_process_sends_a_set_over_the_link_while_the_ring_is_held(worker: Worker) -> None:
    # Nor does the serving process wait on a ring held by a stopped process: reads go on,
    # and a Set takes the link (whose thread waits for the lock: the training process
    # takes ids only under it).
    w = worker
    link_thread = w.ctl._server._thread
    with _ring_held_elsewhere(w):
        answer = w.stub.SetLearningRates.future(pb.SetLearningRatesRequest(updates=[absolute("0.weight", 0.3)]),
                                                timeout=PATIENCE_S)
        wait_for(lambda: _blocked_in_fcntl(link_thread.native_id), "the link thread waiting for the ring's lock")
        rates = w.stub.GetLearningRates(pb.GetLearningRatesRequest(selectors=["0.weight"]), timeout=PATIENCE_S)
        assert rates.rates[0].lr == 0.1 and not answer.done()
    assert answer.result().change_id == 1 and w.forwarded_sets() == 1
    w.optimizer.step()
    assert w.ctl.controller.learning_rates()["0.weight"] == 0.3


def test_a_plain_checkpoint_that_rebases_the_rates_is_a_new_state_for_the_serving_process(worker: Worker) -> None:
    """Loading a checkpoint saved without lrctl takes its rates as bases (resume
    "checkpoint") without a recorded change: reads and plans made in the serving process
    against the rates before it are stale, and are neither answered nor applied."""
    w = worker
    plain = torch.optim.SGD(w.model.parameters(), lr=0.4).state_dict()  # no lrctl in it
    w.optimizer.step()  # the serving process has a read snapshot of version 0 (Worker)
    w.optimizer.load_state_dict({**plain, "param_groups": [
        {**g, "params": list(range(4))} for g in plain["param_groups"]]})
    rates = w.stub.GetLearningRates(pb.GetLearningRatesRequest(selectors=["0.weight"]), timeout=PATIENCE_S)
    assert rates.rates[0].lr == 0.4
    w.stub.SetLearningRates(pb.SetLearningRatesRequest(updates=[scale("0.weight", 0.5)]), timeout=PATIENCE_S)
    w.optimizer.step()
    assert w.ctl.controller.learning_rates()["0.weight"] == 0.2
    record = w.history()[-1]
    assert (list(record.plan.old_base), list(record.plan.new_base)) == ([0.4], [0.2])


def test_the_queue_counts_the_bytes_of_the_plan_a_change_keeps(worker: Worker) -> None:
    """A queued change that keeps the serving process's plan holds it until its step:
    its estimated size, which the queue's byte bounds add up, counts the plan from above
    (measured here as the training process decodes it) and within 2x."""
    n = 20_000
    ops = dict.fromkeys(range(n), ((Mode.SCALE, 0.5), (Mode.ABSOLUTE, 0.1), None))
    nan = array("d", [math.nan]) * n
    plan = PlannedChange(step=3, indices=array("q", ops), old_lr=array("d", [0.1]) * n,
                         new_lr=array("d", [0.05]) * n, old_base=array("d", [0.1]) * n,
                         new_base=array("d", [0.05]) * n, old_pin=nan, new_pin=array("d", [0.1]) * n,
                         old_schedule=None, new_schedule=None, schedules={})
    request = ChangeRequest((Update("*", 0.5),))
    wired = marshal.loads(marshal.dumps(planned_to_wire(Planned(request, ops, 1, 1, 0, plan))))
    held = []
    for t in (wired, without_plan(wired)):
        tracemalloc.start()
        planned = planned_from_wire(t)
        held.append(tracemalloc.get_traced_memory()[0])
        tracemalloc.stop()
    plan_bytes = held[0] - held[1]
    kept = PendingChange(1, planned.request, planned.ops, 0.0, planned=planned_from_wire(wired))
    bare = PendingChange(1, planned.request, planned.ops, 0.0, planned=planned)
    assert plan_bytes <= kept.size - bare.size <= 2 * plan_bytes
    # A Set the serving process queued in the ring is counted so there too.
    w = worker
    w.stub.SetLearningRates(pb.SetLearningRatesRequest(updates=[_pin("*", 0.3)]), timeout=PATIENCE_S)
    queued = w.ctl.controller.queued()[0]
    assert queued.planned.plan is not None
    assert queued.size == estimate_bytes(queued.request, queued.ops, queued.planned.plan) > estimate_bytes(
        queued.request, queued.ops)
