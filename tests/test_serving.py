"""Serving under load: no lockouts, no amplification (issue 15).

Waiting calls hold no server thread (100 wait at once and all complete), are limited
by count in all, per connection and per token; expensive work runs on the admission
budget, stops when its caller gives up, and never keeps health checks or cheap reads
from answering. Real servers on loopback port 0, real optimizers; no timing asserts
(every wait is bounded by PATIENCE_S and only fails the test).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import Served, Trainer, absolute, per_parameter_optimizer, rpc_error, seed_model, wait_for
from lrctl.server import attach
from lrctl.server.auth import ADMIN, Token, Tokens
from lrctl.server.control import LRControl
from lrctl.v1 import lrctl_pb2 as pb
from lrctl.v1 import lrctl_pb2_grpc as pb_grpc

T = 10  # deadline (s) of calls that should answer at once; never asserted as a duration
FAR = 900_000  # a step no test reaches (within the default max_steps_ahead)
LARGE = 50_000  # names of the large model


def channel(address: str) -> grpc.Channel:
    """A channel with its own connection (channels to one target share one by default)."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def waiting_set(selector: str, value: float, **options: object) -> pb.SetLearningRatesRequest:
    return pb.SetLearningRatesRequest(updates=[absolute(selector, value)], wait=True, **options)


def status_of(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    return err.code(), err.details() or ""


@pytest.fixture(scope="module")
def large_named() -> list[tuple[str, torch.Tensor]]:
    """LARGE one-element parameters named blocks.{i}.weight (shared by the tests here)."""
    return [(f"blocks.{i}.weight", torch.zeros(1, requires_grad=True)) for i in range(LARGE)]


@pytest.fixture
def large(large_named: list[tuple[str, torch.Tensor]]) -> Iterator[LRControl]:
    """The large model served with a budget of one thread and a queue of two.

    In-process whatever $LRCTL_SERVING says: these tests watch the training process's
    budget object; a serving process runs reads and planned writes on its own budget
    (tests/test_serving_writes.py)."""
    opt = torch.optim.SGD([p for _, p in large_named], lr=0.1)
    ctl = attach(large_named, opt, address="127.0.0.1:0", expensive_workers=1, expensive_queued=2,
                 serving="inprocess")
    try:
        yield ctl
    finally:
        ctl.close(grace=0.5)


def heavy_request(n: int, tag: int, **options: object) -> pb.SetLearningRatesRequest:
    """A Set of n regex selectors that each scan every name (no literal prefix to narrow
    them, none cached: `tag` makes them new): minutes of work on the large model."""
    updates = [absolute(f"re:[b]locks\\.{k}\\.(?:w|x{tag})", 0.01) for k in range(n)]
    return pb.SetLearningRatesRequest(updates=updates, **options)


def test_hundred_concurrent_waiting_sets_all_complete(served: Served) -> None:
    """100 client threads on 4 connections each send a waiting Set while training is
    paused: all 100 wait at once (no thread each), then all apply with the step that
    the history records for them."""
    trainer = Trainer(served.model, served.optimizer).start()
    channels = [channel(served.ctl.address) for _ in range(4)]
    stubs = [pb_grpc.LearningRateControlStub(c) for c in channels]
    names = ["layer1.weight", "layer1.bias", "layer2.weight", "layer2.bias"]
    try:
        trainer.wait_steps(1)
        trainer.pause()

        def send(k: int) -> pb.SetLearningRatesResponse:
            return stubs[k % 4].SetLearningRates(
                waiting_set(names[k % 4], 0.001 * (k + 1), reason=f"call {k}"), timeout=120)

        with ThreadPoolExecutor(100) as pool:
            replies = [pool.submit(send, k) for k in range(100)]
            wait_for(lambda: served.stub.GetStatus(pb.GetStatusRequest(), timeout=T).pending_changes == 100,
                     "100 waiting changes queued at once")
            assert served.ctl.service.waiting.waiting == 100
            health = health_pb2_grpc.HealthStub(served.channel).Check(health_pb2.HealthCheckRequest(), timeout=T)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            trainer.resume()
            results = [r.result() for r in replies]
        assert all(r.applied for r in results)
        assert len({r.change_id for r in results}) == 100
        records = {}
        token = ""
        while True:
            page = served.stub.ListChanges(pb.ListChangesRequest(page_size=100, page_token=token), timeout=T)
            records.update({r.change_id: r for r in page.changes})
            token = page.next_page_token
            if not token:
                break
        for k, reply in enumerate(results):
            record = records[reply.change_id]
            assert (record.step, record.version, record.reason) == (reply.step, reply.version, f"call {k}")
            assert [(c.name, c.new_lr) for c in reply.changes] == [(names[k % 4], pytest.approx(0.001 * (k + 1)))]
        assert served.ctl.service.waiting.waiting == 0
    finally:
        trainer.stop()
        for c in channels:
            c.close()
    assert not trainer.errors


def test_one_connection_cannot_take_every_waiting_slot() -> None:
    """Past max_waiting_per_connection, that connection's next waiting call is refused
    naming the limit; another connection still gets one; cancelled calls free theirs."""
    model = seed_model()
    ctl = attach(model, per_parameter_optimizer(model), address="127.0.0.1:0", max_waiting_per_connection=3)
    a, b = channel(ctl.address), channel(ctl.address)
    stub_a, stub_b = pb_grpc.LearningRateControlStub(a), pb_grpc.LearningRateControlStub(b)
    futures = []
    try:
        futures = [stub_a.SetLearningRates.future(waiting_set("layer1.weight", 0.1 + k, at_step=FAR), timeout=60)
                   for k in range(3)]
        wait_for(lambda: stub_b.GetStatus(pb.GetStatusRequest(), timeout=T).pending_changes == 3, "3 waiting")
        code, details = status_of(rpc_error(lambda: stub_a.SetLearningRates(
            waiting_set("layer1.weight", 0.5, at_step=FAR), timeout=T)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "from this connection" in details and "max_waiting_per_connection 3" in details
        assert "wait=false" in details
        futures.append(stub_b.SetLearningRates.future(waiting_set("layer2.bias", 0.5, at_step=FAR), timeout=60))
        wait_for(lambda: stub_b.GetStatus(pb.GetStatusRequest(), timeout=T).pending_changes == 4,
                 "the other connection's call waiting too")
        for f in futures:
            f.cancel()
        wait_for(lambda: stub_b.GetStatus(pb.GetStatusRequest(), timeout=T).pending_changes == 0,
                 "cancelled calls withdrawn")
        wait_for(lambda: ctl.service.waiting.waiting == 0, "their slots freed")
        assert stub_a.SetLearningRates(  # a slot again
            pb.SetLearningRatesRequest(updates=[absolute("layer1.weight", 0.5)], dry_run=True, wait=True),
            timeout=T).num_changes == 1
    finally:
        for f in futures:
            f.cancel()
        a.close()
        b.close()
        ctl.close(grace=0.5)


def test_one_token_cannot_take_every_waiting_slot() -> None:
    alice, bob = "alice-" + "a" * 20, "bob-" + "b" * 20
    tokens = Tokens([Token("alice", ADMIN, alice), Token("bob", ADMIN, bob)])
    model = seed_model()
    ctl = attach(model, per_parameter_optimizer(model), address="127.0.0.1:0", tokens=tokens,
                 max_waiting_per_token=2)
    chan = grpc.insecure_channel(ctl.address)
    stub = pb_grpc.LearningRateControlStub(chan)
    md = lambda secret: (("authorization", f"Bearer {secret}"),)  # noqa: E731
    futures = []
    try:
        futures = [stub.SetLearningRates.future(waiting_set("layer1.weight", 0.1 + k, at_step=FAR),
                                                timeout=60, metadata=md(alice)) for k in range(2)]
        wait_for(lambda: stub.GetStatus(pb.GetStatusRequest(), timeout=T, metadata=md(bob)).pending_changes == 2,
                 "alice's 2 waiting")
        code, details = status_of(rpc_error(lambda: stub.SetLearningRates(
            waiting_set("layer1.weight", 0.5, at_step=FAR), timeout=T, metadata=md(alice))))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "token 'alice'" in details and "max_waiting_per_token 2" in details
        futures.append(stub.SetLearningRates.future(waiting_set("layer2.bias", 0.5, at_step=FAR),
                                                    timeout=60, metadata=md(bob)))
        wait_for(lambda: stub.GetStatus(pb.GetStatusRequest(), timeout=T, metadata=md(bob)).pending_changes == 3,
                 "bob's call waiting too")
    finally:
        for f in futures:
            f.cancel()
        chan.close()
        ctl.close(grace=0.5)


def test_abandoned_heavy_set_stops_its_work(large: LRControl) -> None:
    """A Set of 3,000 full-scan regexes over 50,000 names (minutes of work) whose client
    gives up after 1 s: its budget thread stops at the next check (the budget counts it
    as stopped, not completed), nothing is queued, and the next heavy request runs."""
    budget = large.service.budget
    with grpc.insecure_channel(large.address) as chan:
        stub = pb_grpc.LearningRateControlStub(chan)
        err = rpc_error(lambda: stub.SetLearningRates(heavy_request(3000, 1), timeout=1))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: budget.running == 0, "the budget thread free again")
        assert (budget.stopped, budget.completed) == (1, 0)
        assert stub.GetStatus(pb.GetStatusRequest(), timeout=T).pending_changes == 0
        # And by cancellation (not a deadline): the same.
        future = stub.SetLearningRates.future(heavy_request(3000, 2, dry_run=True), timeout=600)
        wait_for(lambda: budget.running == 1, "the second heavy call running")
        future.cancel()
        wait_for(lambda: budget.running == 0, "the budget thread free after the cancel")
        assert (budget.stopped, budget.completed) == (2, 0)
        reply = stub.SetLearningRates(heavy_request(3, 3, dry_run=True), timeout=60)
        assert reply.num_changes == 3 and budget.completed == 1


def test_saturated_budget_refuses_more_and_health_and_cheap_reads_answer(large: LRControl) -> None:
    """One heavy call running and two queued fill the budget (1 thread, queue of 2): a
    fourth is refused at once with 'server busy', while health checks, GetStatus and
    exact-name reads answer; cancelling the heavy calls frees the budget."""
    budget = large.service.budget
    with grpc.insecure_channel(large.address) as chan:
        stub = pb_grpc.LearningRateControlStub(chan)
        heavy = [stub.SetLearningRates.future(heavy_request(3000, 10 + k, dry_run=True), timeout=600)
                 for k in range(3)]
        try:
            wait_for(lambda: (budget.running, budget.queued) == (1, 2), "one heavy call running, two queued")
            code, details = status_of(rpc_error(lambda: stub.SetLearningRates(
                heavy_request(10, 20, dry_run=True), timeout=T)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "server busy: 1 expensive requests in progress" in details and "retry" in details
            # A pattern read is expensive too.
            code, _ = status_of(rpc_error(lambda: stub.GetLearningRates(
                pb.GetLearningRatesRequest(selectors=["blocks.1*"]), timeout=T)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED

            def probes() -> None:
                health = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                assert stub.GetStatus(pb.GetStatusRequest(), timeout=5).num_parameters == LARGE
                rates = stub.GetLearningRates(
                    pb.GetLearningRatesRequest(selectors=["blocks.7.weight", "blocks.49999.weight"]), timeout=5)
                assert [r.name for r in rates.rates] == ["blocks.7.weight", "blocks.49999.weight"]

            errors: list[BaseException] = []

            def probe_loop() -> None:
                try:
                    for _ in range(5):
                        probes()
                except BaseException as exc:  # surfaced below
                    errors.append(exc)

            threads = [threading.Thread(target=probe_loop) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors
            assert (budget.running, budget.queued) == (1, 2)  # the heavy calls were still there
        finally:
            for f in heavy:
                f.cancel()
        wait_for(lambda: (budget.running, budget.queued) == (0, 0), "the budget free after the cancels")
        assert budget.completed == 0


def test_error_mapping_wraps_sync_and_async_handlers_and_keeps_each_as_it_was() -> None:
    """The factory's interceptors wrap a synchronous handler (run on the thread pool)
    and a coroutine handler (run on the event loop) alike: each still runs where it
    would, and an lrctl error from either becomes its status code."""
    from lrctl.common.errors import FailedPreconditionError
    from lrctl.server.factory import build_server

    ran_on: dict[str, str] = {}

    def sync_handler(request: bytes, context: object) -> bytes:
        ran_on["sync"] = threading.current_thread().name
        if request == b"fail":
            raise FailedPreconditionError("sync handler refused 'fail'")
        return b"sync:" + request

    async def async_handler(request: bytes, context: object) -> bytes:
        ran_on["async"] = threading.current_thread().name
        if request == b"fail":
            raise FailedPreconditionError("async handler refused 'fail'")
        return b"async:" + request

    handlers = grpc.method_handlers_generic_handler("test.Echo", {
        "Sync": grpc.unary_unary_rpc_method_handler(sync_handler),
        "Async": grpc.unary_unary_rpc_method_handler(async_handler),
    })
    built = build_server([lambda server: server.add_generic_rpc_handlers((handlers,))], address="127.0.0.1:0")
    try:
        with grpc.insecure_channel(built.address) as chan:
            for kind in ("Sync", "Async"):
                call = chan.unary_unary(f"/test.Echo/{kind}")
                assert call(b"x", timeout=T) == f"{kind.lower()}:x".encode()
                code, details = status_of(rpc_error(lambda: call(b"fail", timeout=T)))
                assert code == grpc.StatusCode.FAILED_PRECONDITION and f"{kind.lower()} handler refused" in details
        assert ran_on["sync"].startswith("lrctl-grpc") and ran_on["async"] == built.thread.name
    finally:
        built.stop(0.5)
