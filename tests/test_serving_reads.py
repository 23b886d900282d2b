"""Reads answered in the serving process from a read snapshot (lrctl.server.serving_reads).

The same reads, sent to an in-process worker and to a serving-process worker in the
same state, get the same answers (or the same status and message), and the serving
process answers them without asking the training process; a read after an
acknowledged write sees that write; reads are answered while the training process's
link and its training thread are both held.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator

import grpc
import pytest
import torch
from torch import nn

from conftest import PATIENCE_S, Trainer, absolute, in_both_modes, scale, wait_for
from lrctl.server import attach
from lrctl.v1 import lrctl_pb2 as pb
from lrctl.v1 import lrctl_pb2_grpc as pb_grpc

READS = ("GetLearningRates", "GetSchedules", "ListParameters")


class Net(nn.Module):
    """Names to select among, a frozen parameter the optimizer holds, and one it does not."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleList([nn.Linear(10 if k == 0 else 4, 4) for k in range(6)])  # the Trainer's 10 inputs
        self.head = nn.Linear(4, 2)
        self.frozen = nn.Parameter(torch.zeros(3), requires_grad=False)
        self.extra = nn.Parameter(torch.zeros(2))  # not given to the optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder:
            x = torch.tanh(layer(x))
        return self.head(x)


class Worker:
    def __init__(self, serving: str, trainer: bool = False) -> None:
        torch.manual_seed(0)
        self.model = Net()
        self.optimizer = torch.optim.SGD([
            {"params": [*self.model.encoder.parameters(), self.model.frozen], "lr": 0.1, "momentum": 0.9},
            {"params": list(self.model.head.parameters()), "lr": 0.05, "weight_decay": 0.01},
        ], lr=0.1)
        self.ctl = attach(self.model, self.optimizer, address="127.0.0.1:0", serving=serving)
        self.channel = grpc.insecure_channel(self.ctl.address)
        self.stub = pb_grpc.LearningRateControlStub(self.channel)
        self.trainer = Trainer(self.model, self.optimizer).start() if trainer else None

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self.optimizer.zero_grad(set_to_none=True)
            self.model(torch.randn(3, 10)).sum().backward()
            self.optimizer.step()

    def forwarded(self) -> int:
        """Reads the training process answered, whatever their status."""
        requests = self.ctl._server.requests
        counts = requests.forwarded() if hasattr(requests, "forwarded") else requests.snapshot()
        return sum(n for (method, _), n in counts.items() if method.rsplit("/", 1)[1] in READS)

    def rates(self) -> dict[str, float]:
        return {r.name: r.lr for r in self.stub.GetLearningRates(pb.GetLearningRatesRequest(), timeout=10).rates}

    def call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=10)
        except grpc.RpcError as exc:
            return (exc.code(), exc.details())

    def pages(self, method: str, request: Any) -> list[Any]:
        """Every page of a listing, following its tokens."""
        out = [self.call(method, request)]
        while not isinstance(out[-1], tuple) and out[-1].next_page_token and len(out) < 50:
            following = type(request)()
            following.CopyFrom(request)
            following.page_token = out[-1].next_page_token
            out.append(self.call(method, following))
        return out

    def close(self) -> None:
        if self.trainer is not None:
            self.trainer.stop()
            assert not self.trainer.errors
        self.channel.close()
        self.ctl.close(grace=0.5)


@pytest.fixture
def both() -> Iterator[tuple[Worker, Worker]]:
    with in_both_modes(Worker) as pair:
        yield pair


def _rates(*selectors: str, **kw: Any) -> tuple[str, Any]:
    return "GetLearningRates", pb.GetLearningRatesRequest(selectors=selectors, **kw)


def _schedules(*selectors: str, **kw: Any) -> tuple[str, Any]:
    return "GetSchedules", pb.GetSchedulesRequest(selectors=selectors, **kw)


def _params(**kw: Any) -> tuple[str, Any]:
    return "ListParameters", pb.ListParametersRequest(**kw)


CORPUS = [
    _rates(), _rates("encoder.0.weight"), _rates("encoder.*"), _rates("*.bias", "head.weight"),
    _rates(r"re:^encoder\.[0-2]\.bias$"), _rates("head.weight", "encoder.1.bias", "head.weight"),
    _rates("frozen"), _rates("extra"), _rates("nope"), _rates("encodr.*"), _rates("re:("),
    _rates("e*", "re:^zz"), _rates(page_size=3), _rates("encoder.*", page_size=5),
    _rates(page_size=10**9), _rates(page_size=-1), _rates(page_token="garbage"),
    _schedules(), _schedules("encoder.[1-3].*"), _schedules("head.*", page_size=1), _schedules("missing"),
    _schedules("extra"), _schedules("re:[a-"), _schedules(page_size=4), _schedules(page_token="eA=="),
    _params(), _params(filter="encoder.*"), _params(filter="re:bias$", page_size=2),
    _params(view=pb.PARAMETER_VIEW_NAMES, page_size=4), _params(view=99), _params(page_size=10**9),
    _params(page_size=-3), _params(filter="zzz"), _params(filter="re:["), _params(page_token="bad"),
    _params(filter="encoder.*", page_size=3, page_token="bad"),
]


def _same_state(workers: tuple[Worker, Worker]) -> None:
    for w in workers:
        s = w.stub
        s.SetLearningRates(pb.SetLearningRatesRequest(updates=[pb.LearningRateUpdate(
            selector="encoder.0.weight", mode=pb.UPDATE_MODE_ABSOLUTE, value=0.02,
            target=pb.UPDATE_TARGET_PIN)]), timeout=10)
        s.SetSchedules(pb.SetSchedulesRequest(schedules=[
            pb.ScheduleAssignment(selector="encoder.[1-3].*", schedule=pb.Schedule(
                step=pb.StepSchedule(gamma=0.5, step_size=2))),
            pb.ScheduleAssignment(selector="head.*", schedule=pb.Schedule(
                warmup=pb.WarmupSchedule(warmup_steps=4, total_steps=20, decay=pb.WARMUP_DECAY_COSINE))),
        ]), timeout=10)
        w.step(3)
        s.SetLearningRates(pb.SetLearningRatesRequest(updates=[absolute("head.bias", 0.5)], at_step=1000), timeout=10)
        s.SetLearningRates(pb.SetLearningRatesRequest(updates=[scale("encoder.5.*", 2.0)]), timeout=10)
        w.step(2)


def _compare(inproc: Worker, proc: Worker) -> None:
    for method, request in CORPUS:
        want = inproc.pages(method, request)
        got = proc.pages(method, request)
        assert got == want, (method, request)


def test_a_corpus_of_reads_gets_the_in_process_answers_without_the_training_process(
        both: tuple[Worker, Worker]) -> None:
    inproc, proc = both
    _same_state(both)
    before = proc.forwarded()
    _compare(inproc, proc)
    # Schedules move with the step: the same snapshot answers at the new step.
    for w in both:
        w.step(3)
    _compare(inproc, proc)
    # A change (a new version) and a pin taken off: a new snapshot.
    for w in both:
        w.stub.SetLearningRates(pb.SetLearningRatesRequest(updates=[pb.LearningRateUpdate(
            selector="encoder.0.weight", mode=pb.UPDATE_MODE_UNPIN, target=pb.UPDATE_TARGET_PIN)]), timeout=10)
        w.step()
    _compare(inproc, proc)
    assert proc.forwarded() == before, "a read reached the training process"
    # Streams refused (WatchMetrics is served in the serving process).
    for w in both:
        for request in (pb.WatchMetricsRequest(from_step=-1), pb.WatchMetricsRequest(max_changes_per_record=-2)):
            with pytest.raises(grpc.RpcError):
                next(w.stub.WatchMetrics(request, timeout=10))
    # Every call counted in lrctl_requests_total as in-process, wherever it was answered
    # (the serving process counts a refused stream right after its status went out).
    def counts_now() -> list[dict[tuple[str, str], int]]:
        return [{k: n for k, n in w.ctl._server.requests.snapshot().items() if "GetStatus" not in k[0]}
                for w in both]

    wait_for(lambda: counts_now()[0] == counts_now()[1], "the serving process's counts")
    counts = counts_now()
    assert counts[1] == counts[0]
    assert counts[1][("lrctl.v1.LearningRateControl/WatchMetrics", "INVALID_ARGUMENT")] == 2
    assert counts[1][("lrctl.v1.LearningRateControl/GetLearningRates", "OK")] > 20
    assert inproc.call("GetLearningRates", pb.GetLearningRatesRequest(selectors=["head.weight"])).step == 9


def test_a_read_after_an_acknowledged_write_sees_it_from_four_threads() -> None:
    w = Worker("process", trainer=True)
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            selector = f"encoder.{t}.*"
            for k in range(8):
                value = (t + 1) / 100 + k / 1000
                reply = w.stub.SetLearningRates(pb.SetLearningRatesRequest(
                    updates=[absolute(selector, value)], wait=True), timeout=PATIENCE_S)
                assert reply.applied
                mine = w.stub.GetLearningRates(pb.GetLearningRatesRequest(selectors=[selector]), timeout=10)
                assert mine.version >= reply.version, (mine.version, reply.version)
                assert {r.lr for r in mine.rates} == {value}
                every = w.stub.GetLearningRates(pb.GetLearningRatesRequest(), timeout=10)
                assert every.version >= reply.version
                assert {r.lr for r in every.rates if r.name.startswith(f"encoder.{t}.")} == {value}
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(PATIENCE_S * 4)
        assert not errors, errors
    finally:
        w.close()


def test_reads_are_answered_while_the_link_and_the_training_thread_are_held() -> None:
    w = Worker("process")
    released, entered_step, entered_loop = threading.Event(), threading.Event(), threading.Event()
    try:
        w.stub.SetSchedules(pb.SetSchedulesRequest(schedules=[pb.ScheduleAssignment(
            selector="*", schedule=pb.Schedule(step=pb.StepSchedule(gamma=0.5, step_size=1)))]), timeout=10)
        w.step(2)
        first = w.stub.GetLearningRates(pb.GetLearningRatesRequest(), timeout=10)  # the snapshot comes
        assert first.step == 2

        def held(*_: Any) -> None:  # after lrctl's hook: the step is counted and published
            entered_step.set()
            released.wait(PATIENCE_S)

        hook = w.optimizer.register_step_pre_hook(held)
        stepping = threading.Thread(target=w.step)
        stepping.start()
        assert entered_step.wait(PATIENCE_S)

        def hold_loop() -> None:  # the training process's link: a forwarded call waits
            entered_loop.set()
            released.wait(PATIENCE_S)

        w.ctl._server._loop.call_soon_threadsafe(hold_loop)
        assert entered_loop.wait(PATIENCE_S)
        rates = w.stub.GetLearningRates(pb.GetLearningRatesRequest(), timeout=10)
        assert rates.step == 3 and rates.version == first.version
        moving = [(r.name, r.lr * 0.5 if r.name != "frozen" else r.lr) for r in first.rates]  # frozen: no schedule
        assert [(r.name, r.lr) for r in rates.rates] == moving
        assert w.stub.GetSchedules(pb.GetSchedulesRequest(selectors=["head.*"]), timeout=10).total_size == 2
        assert len(w.stub.ListParameters(pb.ListParametersRequest(), timeout=10).parameters) == 16
        error = w.call("GetLearningRates", pb.GetLearningRatesRequest(selectors=["nope"]))
        assert error[0] == grpc.StatusCode.NOT_FOUND and "'nope'" in error[1]
        released.set()
        stepping.join(PATIENCE_S)
        hook.remove()
    finally:
        released.set()
        w.close()


def test_an_undecodable_read_gets_the_in_process_status(both: tuple[Worker, Worker]) -> None:
    answers = []
    for w in both:
        raw = w.channel.unary_unary("/lrctl.v1.LearningRateControl/GetLearningRates")
        try:
            raw(b"\x0a\xff\xff", timeout=10)
        except grpc.RpcError as exc:
            answers.append((exc.code(), exc.details()))
    assert len(answers) == 2 and answers[0] == answers[1]
    assert answers[0][0] == grpc.StatusCode.INVALID_ARGUMENT


def test_an_adopted_torch_scheduler_keeps_reads_forwarded() -> None:
    """Its rates live in a torch object: the serving process cannot evaluate them."""
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.encoder.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    ctl = attach(model, optimizer, address="127.0.0.1:0", serving="process", scheduler=scheduler)
    channel = grpc.insecure_channel(ctl.address)
    try:
        stub = pb_grpc.LearningRateControlStub(channel)
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(3, 10)).sum().backward()
            optimizer.step()
            scheduler.step()
        before = ctl._server.requests.snapshot().get(("lrctl.v1.LearningRateControl/GetLearningRates", "OK"), 0)
        reply = stub.GetLearningRates(pb.GetLearningRatesRequest(), timeout=10)
        assert {r.lr for r in reply.rates} == {0.1 * 0.5 ** 2}  # the next step's rate
        after = ctl._server.requests.snapshot().get(("lrctl.v1.LearningRateControl/GetLearningRates", "OK"), 0)
        assert after == before + 1
    finally:
        channel.close()
        ctl.close(grace=0.5)


def test_a_layer_unfrozen_while_training_shows_in_reads_in_both_modes(both: tuple[Worker, Worker]) -> None:
    """requires_grad is not part of a config version: the serving process's snapshot
    notices it changed (within a second) and answers as in-process again."""
    reads = [_params(filter="frozen"), _params(view=pb.PARAMETER_VIEW_NAMES)]
    inproc, proc = both
    before = [inproc.call(*r) for r in reads]
    assert [proc.call(*r) for r in reads] == before
    assert not before[0].parameters[0].requires_grad and not before[0].parameters[0].settable
    for w in both:
        w.model.frozen.requires_grad_(True)
        w.step()
    want = [inproc.call(*r) for r in reads]
    assert want[0].parameters[0].requires_grad and want[0].parameters[0].settable
    answered = proc.forwarded()
    deadline = time.monotonic() + PATIENCE_S
    while [proc.call(*r) for r in reads] != want:
        assert time.monotonic() < deadline, "the serving process still answers with requires_grad=False"
        time.sleep(0.05)
    assert proc.forwarded() == answered  # from the new snapshot, not forwarded
    # It takes changes now, in both modes.
    for w in both:
        reply = w.stub.SetLearningRates(pb.SetLearningRatesRequest(updates=[absolute("frozen", 0.3)]), timeout=10)
        assert [c.name for c in reply.changes] == ["frozen"]
        w.step()
        assert w.rates()["frozen"] == 0.3


def test_reads_and_planned_answers_after_a_checkpoint_load_brings_back_a_version(
        both: tuple[Worker, Worker]) -> None:
    """A checkpoint load may bring back a version number this run used for another
    state: the serving process's snapshot, kept answers and planned writes of that
    number must not be taken for the loaded state's. Checkpoint at version 1 (head
    0.07), version 2 (head 0.09) read, the checkpoint loaded (version 1), a change
    (version 2 again, head 0.11): reads and the change's answer as in-process."""
    def head(reply: Any) -> list[tuple[str, float, float]]:
        return [(c.name, c.old_lr, c.new_lr) for c in reply.changes]

    def set_head(w: Worker, value: float) -> Any:
        return w.stub.SetLearningRates(pb.SetLearningRatesRequest(
            updates=[absolute("head.*", value)], wait=False, max_reported_changes=10), timeout=10)

    answers = []
    for w in both:
        set_head(w, 0.07)
        w.step()
        checkpoint = w.optimizer.state_dict()
        set_head(w, 0.09)
        w.step()
        assert w.rates()["head.weight"] == 0.09 and w.call(*_rates("head.*")).version == 2
        w.optimizer.load_state_dict(checkpoint)
        reply = set_head(w, 0.11)  # planned against version 1: the loaded state's
        w.step()
        answers.append((head(reply), w.rates(), w.call(*_rates("head.*")), w.ctl.controller.version))
    inproc, proc = answers
    assert inproc[0] == [("head.weight", 0.07, 0.11), ("head.bias", 0.07, 0.11)]
    assert inproc[1]["head.weight"] == 0.11 and inproc[3] == 2
    assert proc == inproc


def test_reads_after_resuming_at_version_0_show_the_checkpoint_rates(both: tuple[Worker, Worker]) -> None:
    """The common resume: a checkpoint of a run without changes (version 0, its code's
    rates) loaded into a run that already served a read at its own version 0."""
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD([  # Worker's, every rate x10
        {"params": [*model.encoder.parameters(), model.frozen], "lr": 1.0, "momentum": 0.9},
        {"params": list(model.head.parameters()), "lr": 0.5, "weight_decay": 0.01},
    ], lr=1.0)
    with attach(model, optimizer, serve=False):
        model(torch.randn(3, 10)).sum().backward()
        optimizer.step()
        checkpoint = optimizer.state_dict()  # version 0
    inproc, proc = both
    cached = _rates("head.*")
    for w in both:
        assert w.rates()["head.weight"] == 0.05 and w.call(*cached).rates[0].lr == 0.05
        w.optimizer.load_state_dict(checkpoint)
    for w in both:
        assert w.ctl.controller.version == 0
        assert w.rates()["head.weight"] == 0.5 and w.call(*cached) == inproc.call(*cached)
