"""Writes planned in the serving process (lrctl.server.serving_writes).

The same bad writes, sent to an in-process worker and to a serving-process worker in the
same state, get the same status and message and queue nothing; dry runs are answered by
the serving process without a call to the training process, yet counted in its
lrctl_requests_total; a Set planned against version v while another writer moves the
version to v+1 before it is queued is planned again (and applied as v+1 says); waiting
Sets are acknowledged with the step that applied them; a read after a Set sees it.
"""

from __future__ import annotations

import secrets
import select
import threading
from typing import Any, Iterator

import grpc
import pytest
import torch
from torch import nn

from conftest import PATIENCE_S, absolute, in_both_modes, scale, wait_for
from lrctl.server import attach
from lrctl.server.auth import ADMIN, READER, Token, Tokens
from lrctl.server.guardrails import Guardrail, Guardrails
from lrctl.server.requests import ChangeRequest, Update
from lrctl.v1 import lrctl_pb2 as pb
from lrctl.v1 import lrctl_pb2_grpc as pb_grpc

SET = "lrctl.v1.LearningRateControl/SetLearningRates"
WRITES = ("SetLearningRates", "SetSchedules", "ClearSchedules")
ADMIN_SECRET, READER_SECRET = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
ADMIN_MD = (("authorization", f"Bearer {ADMIN_SECRET}"),)
READER_MD = (("authorization", f"Bearer {READER_SECRET}"),)


class Net(nn.Module):
    """Names to select among, a frozen parameter the optimizer holds, and one it does not."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.head = nn.Linear(4, 2)
        self.frozen = nn.Parameter(torch.zeros(3), requires_grad=False)
        self.extra = nn.Parameter(torch.zeros(2))  # not given to the optimizer


class Worker:
    """The Net under lrctl, stepped by the test itself (no training thread)."""

    def __init__(self, serving: str, tokens: bool = False) -> None:
        torch.manual_seed(0)
        self.model = Net()
        self.optimizer = torch.optim.SGD([
            {"params": [*self.model.encoder.parameters(), self.model.frozen], "lr": 0.1},
            {"params": list(self.model.head.parameters()), "lr": 0.05},
        ], lr=0.1)
        self.ctl = attach(
            self.model, self.optimizer, address="127.0.0.1:0", serving=serving,
            guardrails=Guardrails((Guardrail("head.*", max_lr=0.2),), max_factor=100.0),
            tokens=Tokens([Token("alice", ADMIN, ADMIN_SECRET), Token("bob", READER, READER_SECRET)])
            if tokens else None)
        self.metadata = ADMIN_MD if tokens else None
        self.channel = grpc.insecure_channel(self.ctl.address)
        self.stub = pb_grpc.LearningRateControlStub(self.channel)

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self.optimizer.step()  # no grads: only lrctl's step hook does anything

    def call(self, method: str, request: Any, metadata: Any = None) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=PATIENCE_S, metadata=metadata or self.metadata)
        except grpc.RpcError as exc:
            return (exc.code(), exc.details())

    def status(self) -> pb.GetStatusResponse:
        return self.stub.GetStatus(pb.GetStatusRequest(), timeout=PATIENCE_S, metadata=self.metadata)

    def forwarded_writes(self) -> int:
        """Writes the training process answered, whatever their status."""
        counts = self.ctl._server.requests.forwarded()
        return sum(n for (method, _), n in counts.items() if method.rsplit("/", 1)[1] in WRITES)

    def close(self) -> None:
        self.channel.close()
        self.ctl.close(grace=0.5)


@pytest.fixture
def both() -> Iterator[tuple[Worker, Worker]]:
    with in_both_modes(Worker) as pair:
        yield pair


@pytest.fixture
def process() -> Iterator[Worker]:
    worker = Worker("process")
    try:
        yield worker
    finally:
        worker.close()


def _set(*updates: pb.LearningRateUpdate, **kw: Any) -> tuple[str, Any]:
    return "SetLearningRates", pb.SetLearningRatesRequest(updates=updates, **kw)


def _pin(selector: str, value: float) -> pb.LearningRateUpdate:
    return pb.LearningRateUpdate(selector=selector, mode=pb.UPDATE_MODE_ABSOLUTE, value=value,
                                 target=pb.UPDATE_TARGET_PIN)


_STEP = pb.Schedule(step=pb.StepSchedule(gamma=0.5, step_size=2))
BAD = [
    _set(absolute("nope", 0.1)), _set(absolute("encodr.*", 0.1)), _set(absolute("re:(", 0.1)),
    _set(absolute("encoder.0.weight", float("nan"))), _set(absolute("encoder.0.weight", float("inf"))),
    _set(absolute("encoder.0.weight", -0.1)), _set(absolute("encoder.0.weight", -0.0)),
    _set(scale("encoder.*", 0.0)), _set(scale("encoder.*", -2.0)), _set(),
    _set(absolute("encoder.0.weight", 1e39)),  # past what a float32 parameter can take
    _set(absolute("head.weight", 0.5)),  # above the guardrail max
    _set(scale("encoder.0.bias", 1000.0)),  # past the guardrails' max_factor
    _set(_pin("head.bias", 0.9)),  # a pin above the guardrail max
    _set(absolute("frozen", 0.1)), _set(absolute("extra", 0.1)),
    _set(absolute("encoder.*", 0.1), absolute("encoder.1.weight", 0.2)),  # disagree
    _set(pb.LearningRateUpdate(selector="encoder.0.weight", mode=pb.UPDATE_MODE_UNPIN)),
    _set(pb.LearningRateUpdate(selector="encoder.0.weight", mode=99, value=0.1)),
    _set(absolute("encoder.0.weight", 0.1), at_step=-1),
    _set(absolute("encoder.0.weight", 0.1), at_step=1),  # past: the workers are at step 3
    _set(absolute("encoder.0.weight", 0.1), at_step=10**9),  # too far ahead
    _set(absolute("encoder.0.weight", 0.1), expected_version=99),
    _set(absolute("encoder.0.weight", 0.1), reason="x" * 5000),
    _set(absolute("encoder.0.weight", 0.1), max_reported_changes=-1),
    _set(absolute("nope", 0.1), dry_run=True), _set(absolute("head.weight", 0.5), dry_run=True),
    _set(absolute("encoder.0.weight", 0.1), at_step=1, dry_run=True),
    _set(absolute("encoder.0.weight", 0.1), expected_version=99, dry_run=True),
    _set(absolute("nope", 0.1), wait=True), _set(absolute("head.weight", 0.5), wait=True),
    ("SetSchedules", pb.SetSchedulesRequest()),
    ("SetSchedules", pb.SetSchedulesRequest(schedules=[pb.ScheduleAssignment(selector="nope", schedule=_STEP)])),
    ("SetSchedules", pb.SetSchedulesRequest(schedules=[pb.ScheduleAssignment(
        selector="encoder.*", schedule=pb.Schedule(step=pb.StepSchedule(gamma=0.5)))])),  # no step_size
    ("SetSchedules", pb.SetSchedulesRequest(schedules=[pb.ScheduleAssignment(
        selector="head.*", schedule=pb.Schedule(piecewise_linear=pb.PiecewiseLinearSchedule(points=[
            pb.SchedulePoint(step=0, factor=1.0), pb.SchedulePoint(step=10, factor=5.0)])))])),  # guardrail
    ("ClearSchedules", pb.ClearSchedulesRequest()),
    ("ClearSchedules", pb.ClearSchedulesRequest(selectors=["re:["])),
]


def test_bad_writes_get_the_same_status_and_message_in_both_modes_and_queue_nothing(
        both: tuple[Worker, Worker]) -> None:
    for w in both:
        w.step(3)
    versions = [w.status().version for w in both]
    forwarded = both[1].forwarded_writes()
    answers: list[list[Any]] = [[], []]
    for method, request in BAD:
        for k, w in enumerate(both):
            answers[k].append(w.call(method, request))
    for (method, request), here, there in zip(BAD, *answers):
        assert isinstance(here, tuple), f"{method} {request} was accepted in-process: {here}"
        assert here == there, f"{method} {request}: in-process {here}, serving process {there}"
    # Only what the live state refuses (at_step past or too far ahead, expected_version:
    # 5 requests) and the write to a parameter that did not require grad when the
    # snapshot was made (it might now: 1) are left to the training process to decide.
    assert both[1].forwarded_writes() - forwarded <= 6
    for w, version in zip(both, versions):
        status = w.status()
        assert (status.pending_changes, status.version) == (0, version)
    # Counted by the training process's lrctl_requests_total in both modes, as in-process.
    counts = [w.ctl._server.requests.snapshot() for w in both]
    assert {k: n for k, n in counts[0].items() if "GetStatus" not in k[0]} == \
        {k: n for k, n in counts[1].items() if "GetStatus" not in k[0]}


def test_a_reader_token_may_not_write_in_either_mode() -> None:
    with in_both_modes(lambda serving: Worker(serving, tokens=True)) as made:
        answers = [w.call(*_set(absolute("encoder.0.weight", 0.3), dry_run=dry), metadata=READER_MD)
                   for dry in (False, True) for w in made]
        assert answers[0] == answers[1] and answers[2] == answers[3]
        assert answers[0][0] == grpc.StatusCode.PERMISSION_DENIED
        # The admin's Set is recorded with its role and token in both modes.
        for w in made:
            reply = w.call(*_set(absolute("encoder.0.weight", 0.3), wait=False))
            assert not isinstance(reply, tuple)
            w.step()
            (record,) = w.ctl.controller.history(0, 10)[0]
            assert (record.role, record.token) == (ADMIN, "alice")
            assert w.status().pending_changes == 0


def test_dry_runs_are_answered_by_the_serving_process_alone(both: tuple[Worker, Worker]) -> None:
    here, there = both
    there.call(*_rates())  # the serving process has its snapshot
    before = there.forwarded_writes()
    dry = [
        _set(absolute("encoder.0.weight", 0.02), dry_run=True),
        _set(scale("encoder.*", 0.5), _pin("head.bias", 0.01), dry_run=True, max_reported_changes=2),
        _set(absolute("head.*", 0.1), at_step=5, dry_run=True),
        ("SetSchedules", pb.SetSchedulesRequest(schedules=[pb.ScheduleAssignment(selector="encoder.1.*", schedule=_STEP)], dry_run=True)),
        ("ClearSchedules", pb.ClearSchedulesRequest(selectors=["head.*"], dry_run=True)),
    ]
    for method, request in dry:
        a, b = here.call(method, request), there.call(method, request)
        assert not isinstance(a, tuple) and a == b, f"{request}: {a} vs {b}"
    assert there.forwarded_writes() == before  # not one call to the training process
    counts = there.ctl._server.requests.snapshot()  # ... and yet counted there
    assert counts.get((SET, "OK"), 0) >= 3
    assert there.status().version == 0 and there.status().pending_changes == 0


def test_parameters_frozen_or_unfrozen_after_the_snapshot_are_written_as_in_process(
        both: tuple[Worker, Worker]) -> None:
    # A job that unfreezes layers as it trains (or freezes them): the serving process's
    # snapshot, made before, must not decide which names a write may touch.
    here, there = both
    for w in both:
        w.call(*_rates())  # the serving process has its snapshot
        w.step()
        w.model.frozen.requires_grad_(True)
        w.model.encoder[0].weight.requires_grad_(False)
    # A Set that does not wait, sent before the serving process has seen the change of
    # requires_grad (it looks every second): queued there from its plan, then recorded
    # as failed at its step, naming the parameter; in-process it is refused at once.
    refused = here.call(*_set(absolute("encoder.0.weight", 0.2)))
    assert refused[0] == grpc.StatusCode.FAILED_PRECONDITION and "'encoder.0.weight'" in refused[1]
    queued = there.call(*_set(absolute("encoder.0.weight", 0.2)))
    if not isinstance(queued, tuple):  # (the serving process may have seen it: refused as here)
        for w in both:
            w.step()
        (record,) = [r for r in there.ctl.controller.history(0, 100)[0] if r.change_id == queued.change_id]
        assert record.failed
        assert "'encoder.0.weight' no longer requires grad" in record.error
    else:
        assert queued == refused
    # Changes for a later step go to the training process, which checks them live.
    later = there.status().step + 100
    for method, request in (
        _set(absolute("frozen", 0.3), at_step=later),  # unfrozen: settable now
        _set(absolute("encoder.0.weight", 0.2), at_step=later),  # frozen now: refused, naming it
        _set(scale("encoder.*", 0.5), at_step=later),  # frozen now: left out of a glob
        _set(absolute("frozen", 0.4), dry_run=True),
    ):
        a, b = here.call(method, request), there.call(method, request)
        if isinstance(a, pb.SetLearningRatesResponse):  # the change ids differ by the one above
            a.change_id = b.change_id = 0
        assert a == b, f"{request}: {a} vs {b}"
    assert isinstance(a, pb.SetLearningRatesResponse)
    for w in both:
        w.step()
    assert here.call(*_rates()) == there.call(*_rates())


def _rates(*selectors: str) -> tuple[str, Any]:
    return "GetLearningRates", pb.GetLearningRatesRequest(selectors=selectors)


def test_a_set_planned_against_an_older_version_is_planned_again(process: Worker) -> None:
    """The training process's loop is held until the planned Set is on its socket; then
    another writer's change is applied (version 0 -> 1) before the loop reads it: the
    Set is planned again against version 1, and applied as version 1 says. (A Set due
    at a given step takes the socket; one due at the next boundary that does not wait
    is queued by the serving process itself: see test_posted_writes.py.)"""
    w = process
    name = "encoder.0.weight"
    w.call(*_rates(name))  # the serving process has the snapshot of version 0
    server = w.ctl._server
    on_socket = threading.Event()

    def hold() -> None:  # on the training process's loop: nothing is read meanwhile
        readable, _, _ = select.select([server._sock], [], [], PATIENCE_S)
        assert readable
        w.ctl.controller.submit(ChangeRequest((Update(name, 0.5),)))
        w.step()  # applies the other writer's change: version 1
        on_socket.set()

    server._loop.call_soon_threadsafe(hold)
    reply = w.stub.SetLearningRates(pb.SetLearningRatesRequest(updates=[scale(name, 0.5)], at_step=1),
                                    timeout=PATIENCE_S)
    assert on_socket.is_set()
    assert reply.version == 1 and reply.change_id == 2  # planned again, against version 1
    assert [(c.old_lr, c.new_lr) for c in reply.changes] == [(0.5, 0.25)]
    w.step()
    rates = w.stub.GetLearningRates(pb.GetLearningRatesRequest(selectors=[name]), timeout=PATIENCE_S)
    assert rates.version == 2 and [r.lr for r in rates.rates] == [0.25]
    # Without another writer, a Set is queued as planned (its reply names the version
    # it was planned against).
    reply = w.stub.SetLearningRates(pb.SetLearningRatesRequest(updates=[scale(name, 2.0)]), timeout=PATIENCE_S)
    assert reply.version == 2 and [(c.old_lr, c.new_lr) for c in reply.changes] == [(0.25, 0.5)]
    w.step()
    assert w.ctl.controller.learning_rates()[name] == 0.5


def test_waiting_sets_are_acknowledged_with_the_step_that_applied_them(process: Worker) -> None:
    w = process
    w.step(2)
    w.call(*_rates())
    for ahead, selector, value in ((None, "encoder.1.weight", 0.03), (3, "head.weight", 0.04)):
        at_step = None if ahead is None else w.ctl.controller.step + ahead
        options = {} if at_step is None else {"at_step": at_step}
        future = w.stub.SetLearningRates.future(pb.SetLearningRatesRequest(
            updates=[absolute(selector, value)], wait=True, **options), timeout=PATIENCE_S)
        wait_for(lambda: w.ctl.controller.pending_count == 1, "the waiting Set queued")
        expected = w.ctl.controller.step if at_step is None else at_step
        while not future.done():
            w.step()
        reply = future.result()
        assert reply.applied and reply.step == expected
        assert [(c.name, c.new_lr) for c in reply.changes] == [(selector, value)]
        assert w.ctl.controller.learning_rates()[selector] == value


def test_a_read_after_a_set_sees_it(process: Worker) -> None:
    w = process
    name = "encoder.2.bias"
    for k in range(5):
        value = 0.01 * (k + 1)
        reply = w.stub.SetLearningRates(pb.SetLearningRatesRequest(updates=[absolute(name, value)]), timeout=PATIENCE_S)
        rates = w.stub.GetLearningRates(pb.GetLearningRatesRequest(selectors=[name]), timeout=PATIENCE_S)
        assert rates.version >= reply.version  # never older than what the Set named
        w.step()
        rates = w.stub.GetLearningRates(pb.GetLearningRatesRequest(selectors=[name]), timeout=PATIENCE_S)
        assert rates.version == reply.version + 1 and [r.lr for r in rates.rates] == [value]


def test_a_heavy_set_whose_caller_gives_up_queues_nothing(process: Worker) -> None:
    """Planned on the serving process's budget: a deadline stops it there; nothing is
    queued and the next Set is planned and applied."""
    w = process
    # Regexes that each match every name but `frozen` (a write that matches a parameter
    # frozen at the snapshot goes to the training process), new each (nothing cached):
    # seconds of work.
    heavy = pb.SetLearningRatesRequest(updates=[absolute(f"re:^(?:e|h|x).*(?:{k})?$", 0.01)
                                                for k in range(50000)])
    with pytest.raises(grpc.RpcError) as caught:
        w.stub.SetLearningRates(heavy, timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert w.status().pending_changes == 0 and w.forwarded_writes() == 0
    reply = w.stub.SetLearningRates(pb.SetLearningRatesRequest(updates=[absolute("head.bias", 0.07)]), timeout=PATIENCE_S)
    w.step()
    assert reply.change_id >= 1 and w.ctl.controller.learning_rates()["head.bias"] == 0.07


def test_a_job_with_an_adopted_torch_scheduler_forwards_its_writes_whole() -> None:
    """Its rates live in torch objects the serving process cannot read: no snapshot,
    so Sets (dry runs too) are planned by the training process, as before."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ctl = attach(model, opt, scheduler=sched, address="127.0.0.1:0", serving="process")
    try:
        with grpc.insecure_channel(ctl.address) as channel:
            stub = pb_grpc.LearningRateControlStub(channel)
            reply = stub.SetLearningRates(pb.SetLearningRatesRequest(
                updates=[absolute("weight", 0.05)], dry_run=True), timeout=PATIENCE_S)
            assert [c.new_base for c in reply.changes] == [0.05]
            with pytest.raises(grpc.RpcError) as caught:
                stub.SetLearningRates(pb.SetLearningRatesRequest(updates=[absolute("nope", 0.05)]), timeout=PATIENCE_S)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        counts = ctl._server.requests.forwarded()
        assert (counts.get((SET, "OK")), counts.get((SET, "NOT_FOUND"))) == (1, 1)
    finally:
        ctl.close(grace=0.5)


def test_once_the_controller_closes_dry_runs_say_so_in_both_modes(both: tuple[Worker, Worker]) -> None:
    request = _set(absolute("encoder.0.weight", 0.02), dry_run=True)
    for w in both:
        w.call(*_rates())
        w.ctl.controller.close()  # as LRControl.close does first, before the server stops
    answers = [w.call(*request) for w in both]
    assert answers[0] == answers[1]
    assert answers[0][0] == grpc.StatusCode.FAILED_PRECONDITION and "shutting down" in answers[0][1]
