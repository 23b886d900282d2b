"""Lockstep: the worker holds at every K-th step boundary until its one controller has
decided, or the timeout has passed (lrctl.server.lockstep, LRClient.lockstep).

Real parts: a real optimizer under lrctl served on a free loopback port, real gRPC
clients (LRClient and raw stubs), a controller in a separate process that is
SIGKILLed while the worker holds. No timing assertions: "released before the timeout"
is proven by waiting less than that timeout (a 60 s hold and a 30 s patience).
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import grpc
import pytest
import torch

from lrctl.client.client import LRClient
from lrctl.client.errors import DeadlineExceededError, FailedPreconditionError, InvalidArgumentError, PermissionDeniedError
from lrctl.server import attach
from lrctl.server.auth import ADMIN, READER, Token, Tokens
from lrctl.v1 import lrctl_pb2 as pb
from lrctl.v1 import lrctl_pb2_grpc as pb_grpc

from conftest import (
    PATIENCE_S,
    SEED_NAMES,
    Served,
    Trainer,
    group_lrs,
    ok,
    per_parameter_optimizer,
    run_cli,
    seed_model,
    train_step,
    wait_for,
)

NAME = SEED_NAMES[0]


def open_message(every: int, timeout: float) -> pb.LockstepDecision:
    return pb.LockstepDecision(open=pb.LockstepOpen(every=every, timeout_seconds=timeout))


def lockstep_status(served: Served) -> pb.LockstepStatus | None:
    reply = served.stub.GetStatus(pb.GetStatusRequest(), timeout=10)
    return reply.lockstep if reply.HasField("lockstep") else None


class RateTable:
    """The rate of every name at every step, read in a step pre-hook registered after
    lrctl's (hooks run in order: lrctl has installed the step's rates by then)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, served: Served) -> None:
        self.rows: dict[int, dict[str, float]] = {}
        controller = served.controller
        self._handle = optimizer.register_step_pre_hook(
            lambda o, a, k: self.rows.__setitem__(controller.step - 1, group_lrs(model, o)))

    def close(self) -> None:
        self._handle.remove()


def run_steps(served: Served, n: int) -> threading.Thread:
    """`n` training steps on a background thread (the worker's training loop)."""
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            served.step(n)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=loop, name="test-lockstep-training", daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def finish(thread: threading.Thread) -> None:
    thread.join(PATIENCE_S)
    assert not thread.is_alive(), "training stalled"
    assert not thread.errors, f"training raised: {thread.errors!r}"  # type: ignore[attr-defined]


@pytest.fixture
def client(served: Served) -> Iterator[LRClient]:
    with LRClient(served.ctl.address, timeout=PATIENCE_S) as c:
        yield c


def test_decided_turns_land_exactly_at_their_step(served: Served, client: LRClient) -> None:
    """Each held step gets its own rate, set with at_step = the held step, and it is in
    force from that very step, whole; the next turn reports the applied change."""
    table = RateTable(served.model, served.optimizer, served)
    every, steps = 3, 19
    sent: dict[int, int] = {}  # held step -> change id
    reports: dict[int, tuple[int, ...]] = {}
    with client.lockstep(every=every, timeout=60) as session:
        training = run_steps(served, steps)
        for turn in session:
            assert turn.step % every == 0
            assert turn.version == len(sent)  # only this controller writes
            if turn.previous is not None:
                assert not turn.previous.timed_out and not turn.previous.decided_late
                reports[turn.previous.step] = turn.previous.applied_change_ids
            if turn.step >= steps - 1:
                turn.decide()
                break
            result = client.set_learning_rates(
                {NAME: 0.001 * (turn.step + 1), SEED_NAMES[1]: 0.5 + turn.step},
                at_step=turn.step, wait=False, expected_version=turn.version,
                reason=f"lockstep {turn.step}")
            assert not result.applied and result.step == turn.step
            sent[turn.step] = result.change_id
            turn.decide()
        finish(training)
    table.close()
    assert sorted(sent) == list(range(0, steps - 1, every))
    for step in range(steps - 1):  # the last held step got no change
        held = step - step % every
        assert table.rows[step][NAME] == pytest.approx(0.001 * (held + 1), rel=1e-12), step
        assert table.rows[step][SEED_NAMES[1]] == 0.5 + held, step
    assert reports == {s: (cid,) for s, cid in sent.items()}
    records = {r.change_id: r for r in client.list_changes()}
    for step, cid in sent.items():
        assert records[cid].step == step and records[cid].at_step == step and not records[cid].failed
    wait_for(lambda: client.status().lockstep is None, "lockstep to be off")  # the close is a cancel
    assert client.status().lockstep_timeouts == 0


def test_a_controller_that_never_answers_costs_one_timeout_per_held_step(
        served: Served, client: LRClient) -> None:
    steps = 6
    with client.lockstep(every=1, timeout=0.05) as session:
        training = run_steps(served, steps)
        turns = [next(session) for _ in range(steps)]
        finish(training)
        info = client.status().lockstep
        assert info is not None and info.turns == steps and info.timeouts == steps
    assert [t.step for t in turns] == list(range(steps))
    assert all(t.previous is not None and t.previous.timed_out for t in turns[1:])
    assert served.controller.step == steps
    wait_for(lambda: client.status().lockstep is None, "lockstep to be off")  # the close is a cancel
    assert client.status().lockstep_timeouts == steps


def test_a_late_decision_is_ignored_and_its_change_refused(served: Served, client: LRClient) -> None:
    """The hold of step 0 times out; then the controller's change for step 0 is refused
    (already past: nothing applied after its caller was told), its decision is
    ignored, and the next turn says so."""
    with client.lockstep(every=2, timeout=0.05) as session:
        training = run_steps(served, 1)
        turn = next(session)
        finish(training)  # step 0 went on by itself
        with pytest.raises(InvalidArgumentError, match="at_step 0 is already past"):
            client.set_learning_rates({NAME: 0.123}, at_step=turn.step, wait=False)
        turn.decide()
        wait_for(lambda: client.status().lockstep.ignored_decisions == 1, "the late decision")
        training = run_steps(served, 2)
        second = next(session)
        second.decide()
        finish(training)
    assert second.step == 2 and second.ignored_decisions == 1
    assert second.previous is not None
    assert second.previous.step == 0 and second.previous.timed_out and second.previous.decided_late
    assert second.previous.applied_change_ids == () and second.previous.failed_change_ids == ()
    assert served.rates()[NAME] != 0.123


def test_a_failed_change_at_the_held_step_is_reported(served: Served, client: LRClient) -> None:
    """expected_version protects a decision from other writers: a change that another
    client beat to it fails at the held step, and the next turn names it as failed."""
    with client.lockstep(every=1, timeout=60) as session:
        training = run_steps(served, 2)
        turn = next(session)
        other = client.set_learning_rates({SEED_NAMES[2]: 0.7}, at_step=turn.step, wait=False)
        mine = client.set_learning_rates({NAME: 0.9}, at_step=turn.step, wait=False,
                                         expected_version=turn.version)
        turn.decide()
        second = next(session)
        second.decide()
        finish(training)
    assert second.previous.applied_change_ids == (other.change_id,)
    assert second.previous.failed_change_ids == (mine.change_id,)
    assert served.rates()[NAME] != 0.9



def test_changes_queued_for_the_held_step_are_applied_before_the_hold(served: Served, client: LRClient) -> None:
    """A job's own change queued for step S (before the controller was there) is applied
    before the hold at S: the turn's version counts it, so the controller's action with
    expected_version = turn.version is applied at S too, after it (not refused)."""
    queued = client.set_learning_rates({SEED_NAMES[2]: 0.7}, at_step=4, wait=False)
    with client.lockstep(every=2, timeout=60) as session:
        training = run_steps(served, 7)  # held: 0, 2, 4 and 6
        for turn in session:
            if turn.step < 4:
                assert turn.version == 0
                turn.decide()
                continue
            assert turn.version == 1  # the queued change is in
            assert client.get_learning_rates(SEED_NAMES[2])[SEED_NAMES[2]] == 0.7
            mine = client.set_learning_rates({SEED_NAMES[2]: 0.9, NAME: 0.3}, at_step=turn.step, wait=False,
                                             expected_version=turn.version)
            turn.decide()
            following = next(session)
            following.decide()
            break
        finish(training)
    assert following.previous.applied_change_ids == (queued.change_id, mine.change_id)
    assert following.previous.failed_change_ids == ()
    records = {r.change_id: r for r in client.list_changes()}
    assert records[queued.change_id].step == records[mine.change_id].step == 4
    assert served.rates()[SEED_NAMES[2]] == 0.9 and served.rates()[NAME] == 0.3

CONTROLLER = textwrap.dedent("""
    import sys
    from lrctl.client.client import LRClient
    client = LRClient(sys.argv[1])
    with client.lockstep(every=1, timeout=60) as session:
        # The client side is torch-free: the controller process never loads it.
        print("open", "torch" in sys.modules, flush=True)
        for turn in session:
            print("turn", turn.step, flush=True)  # ... and never decides
""")


def test_sigkilled_controller_releases_the_hold_and_lockstep_is_off(served: Served) -> None:
    trainer = Trainer(served.model, served.optimizer).start()
    proc = subprocess.Popen([sys.executable, "-c", CONTROLLER, served.ctl.address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "open False\n", proc.stderr.read() if proc.stderr else ""
        line = proc.stdout.readline()
        assert line.startswith("turn ")
        held = int(line.split()[1])
        status = wait_for(lambda: lockstep_status(served), "the lockstep status")
        assert status.held_step == held
        steps = trainer.steps
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(PATIENCE_S) == -signal.SIGKILL
        # The hold is 60 s; training resumes well within PATIENCE_S (30 s).
        trainer.wait_steps(3)
        assert trainer.steps >= steps + 3
        wait_for(lambda: lockstep_status(served) is None, "lockstep to be off")
        reply = served.stub.GetStatus(pb.GetStatusRequest(), timeout=10)
        assert reply.lockstep_timeouts == 0
        # A new controller can attach, and it is held for.
        with LRClient(served.ctl.address, timeout=PATIENCE_S) as client:
            with client.lockstep(every=1, timeout=60) as session:
                turn = next(session)
                assert turn.step > held and turn.previous is None
                result = client.set_learning_rates({NAME: 0.0123}, at_step=turn.step, wait=False)
                turn.decide()
                after = next(session)
                assert after.previous.applied_change_ids == (result.change_id,)
                after.decide()
        trainer.wait_steps(2)
        assert served.rates()[NAME] == 0.0123
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        trainer.stop()
    assert not trainer.errors


def test_a_second_controller_is_refused_naming_the_holder(served: Served, client: LRClient) -> None:
    with client.lockstep(every=1, timeout=60) as first:
        holder = lockstep_status(served).peer
        with LRClient(served.ctl.address, timeout=PATIENCE_S) as other:
            with pytest.raises(FailedPreconditionError, match="held by another controller") as caught:
                other.lockstep(every=1, timeout=1)
        assert holder in str(caught.value)
        call = served.stub.Lockstep(iter([open_message(1, 1.0)]), timeout=10)
        with pytest.raises(grpc.RpcError) as raw:
            list(call)
        assert raw.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert holder in raw.value.details()
        # The first controller still holds and decides.
        training = run_steps(served, 1)
        next(first).decide()
        finish(training)
    # Its close cancels the stream; the worker sees that a moment later (a race seen in CI).
    wait_for(lambda: lockstep_status(served) is None, "lockstep to be off")


@pytest.mark.parametrize("every, timeout, named", [
    (0, 1.0, "every 0"),
    (-3, 1.0, "every -3"),
    (1, 0.0, "timeout_seconds 0.0"),
    (1, 0.0005, "timeout_seconds 0.0005"),
    (1, 61.0, "timeout_seconds 61.0"),
    (1, -1.0, "timeout_seconds -1.0"),
    (1, math.nan, "timeout_seconds nan"),
    (1, math.inf, "timeout_seconds inf"),
])
def test_bad_open_parameters_are_invalid_argument(
        served: Served, client: LRClient, every: int, timeout: float, named: str) -> None:
    call = served.stub.Lockstep(iter([open_message(every, timeout)]), timeout=10)
    with pytest.raises(grpc.RpcError) as raw:
        list(call)
    assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in raw.value.details()
    with pytest.raises(InvalidArgumentError, match=named.split()[0]):
        client.lockstep(every=every, timeout=timeout)
    assert lockstep_status(served) is None
    served.step(2)  # training goes on, never held
    assert served.controller.step == 2


@pytest.mark.parametrize("messages, named", [
    ([pb.LockstepDecision(decided=0)], "must open lockstep"),
    ([pb.LockstepDecision()], "must open lockstep"),
    ([open_message(1, 1.0), open_message(1, 1.0)], "already open"),
    ([open_message(1, 1.0), pb.LockstepDecision(decided=5)], "decided 5 names a step that was never held"),
])
def test_protocol_errors_end_lockstep_with_invalid_argument(
        served: Served, messages: list[pb.LockstepDecision], named: str) -> None:
    call = served.stub.Lockstep(iter(messages), timeout=10)
    with pytest.raises(grpc.RpcError) as raw:
        list(call)
    assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in raw.value.details()
    assert lockstep_status(served) is None
    served.step(2)
    assert served.controller.step == 2


def test_closing_the_session_releases_a_hold_at_once(served: Served, client: LRClient) -> None:
    session = client.lockstep(every=1, timeout=60)
    training = run_steps(served, 3)
    next(session)
    session.close()
    finish(training)  # within PATIENCE_S (30 s), not the 60 s hold
    assert lockstep_status(served) is None
    assert list(session) == []


def test_closing_the_worker_releases_a_hold(client: LRClient, served: Served) -> None:
    session = client.lockstep(every=1, timeout=60)
    training = run_steps(served, 1)
    next(session)
    served.ctl.close(grace=0.5)
    finish(training)


ALICE, BOB = "alice-secret-token-0123456789", "bob-secret-token-0123456789"


@pytest.fixture
def locked() -> Iterator[tuple[Any, str]]:
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    ctl = attach(model, optimizer, address="127.0.0.1:0",
                 tokens=Tokens([Token("alice", ADMIN, ALICE), Token("bob", READER, BOB)]))
    try:
        yield (model, optimizer, ctl), ctl.address
    finally:
        ctl.close(grace=0.5)


def test_a_reader_token_is_refused_and_an_admin_is_named(locked: tuple[Any, str]) -> None:
    (model, optimizer, ctl), address = locked
    with LRClient(address, token=BOB, timeout=PATIENCE_S) as reader:
        with pytest.raises(PermissionDeniedError, match="Lockstep needs an admin token"):
            reader.lockstep(every=1, timeout=1)
        assert reader.status().lockstep is None
    with grpc.insecure_channel(address) as channel:
        call = pb_grpc.LearningRateControlStub(channel).Lockstep(iter([open_message(1, 1.0)]), timeout=10)
        with pytest.raises(grpc.RpcError) as raw:
            list(call)
        assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with LRClient(address, token=ALICE, timeout=PATIENCE_S) as admin:
        with admin.lockstep(every=1, timeout=60) as session:
            info = admin.status().lockstep
            assert info is not None and info.token_name == "alice"
            thread = threading.Thread(target=train_step, args=(model, optimizer), daemon=True)
            thread.start()
            next(session).decide()
            thread.join(PATIENCE_S)
            assert not thread.is_alive()


def test_lrctl_status_shows_the_lockstep_controller(served: Served, client: LRClient) -> None:
    def lockstep_lines() -> dict[str, str]:
        out = ok(run_cli(served.ctl.address, "status"))
        return {k: v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())
                if k.startswith("lockstep")}

    assert lockstep_lines() == {"lockstep": "-", "lockstep_timeouts": "0"}
    with client.lockstep(every=2, timeout=1.5):
        line = lockstep_lines()["lockstep"]
        assert line.startswith("every 2 step(s), timeout 1.5s, not holding, 0 turn(s), 0 timed out, "
                               "controller ipv4:127.0.0.1:"), line
        as_json = json.loads(ok(run_cli(served.ctl.address, "status", "--json")))
        assert as_json["lockstep"]["every"] == 2 and as_json["lockstep"]["held_step"] is None
        assert as_json["lockstep_timeouts"] == 0


def test_a_session_ends_when_the_worker_shuts_down(served: Served, client: LRClient) -> None:
    session = client.lockstep(every=1, timeout=60)
    training = run_steps(served, 1)
    next(session)
    served.ctl.close(grace=0.5)
    finish(training)
    with pytest.raises(StopIteration):
        next(session)


def test_a_controller_that_does_not_read_costs_at_most_a_few_turns_of_memory() -> None:
    """The stream's outbox keeps at most _LOCKSTEP_OUTBOX unsent turns: the oldest go,
    and the next turn read says how many were dropped."""
    import asyncio

    from lrctl.server.lockstep import Turn
    from lrctl.server.service import _LOCKSTEP_OUTBOX, _TurnBox

    async def scenario() -> list[pb.LockstepTurn]:
        box = _TurnBox(asyncio.get_running_loop())
        for step in range(_LOCKSTEP_OUTBOX + 5):
            box.put_threadsafe(Turn(step, 0, 0.0, 1.0, None, 0))
        box.end_threadsafe()
        await asyncio.sleep(0)  # the loop runs the puts
        out = []
        while (message := await box.get()) is not None:
            out.append(message)
        return out

    turns = asyncio.run(scenario())
    assert [t.step for t in turns] == list(range(5, _LOCKSTEP_OUTBOX + 5))
    assert [t.dropped_turns for t in turns] == [5] + [0] * (_LOCKSTEP_OUTBOX - 1)


def test_an_open_the_worker_never_answers_times_out_and_leaves_no_thread_behind() -> None:
    # A server that takes the Lockstep call and never answers it (no headers, no
    # turn): the client gives up after open_timeout, naming the address, and has ended
    # its waiting thread (a daemon thread left inside grpc can hang the process's exit).
    release = threading.Event()

    def never_answers(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        release.wait(PATIENCE_S)
        return iter(())

    handler = grpc.method_handlers_generic_handler("lrctl.v1.LearningRateControl", {
        "Lockstep": grpc.stream_stream_rpc_method_handler(never_answers)})
    server = grpc.server(ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with LRClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(DeadlineExceededError, match=rf"127\.0\.0\.1:{port}.*lockstep open within 0\.3s"):
                client.lockstep(every=1, timeout=1.0, open_timeout=0.3)
            assert not [t for t in threading.enumerate() if t.name == "lrctl-lockstep-open"]
    finally:
        release.set()
        server.stop(None)
