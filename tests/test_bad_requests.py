"""Invariants 1 and 2 under fire: bad requests cost the request, never the job.

A worker trains on a background thread while clients send every kind of bad request
(bad values, bad selectors, conflicting batches, stale steps and versions, unknown
modes, garbage bytes, huge selectors, huge batches with one bad entry, cancelled and
abandoned waits). Each must get a non-OK status, the training loop must keep stepping,
and the rates, version and history must be exactly as before.

The tests named after Interactive Training's failures show each of them absent here:
it acknowledged a change before applying it, applied it two steps late, accepted NaN
and negative rates, and stopped its loop on a malformed request.
"""

from __future__ import annotations

import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import grpc
import pytest

from conftest import SEED_LRS, SEED_NAMES, Served, Trainer, absolute, group_lrs, rpc_error, scale, wait_for
from lrctl.v1 import lrctl_pb2 as pb
from lrctl.v1 import lrctl_pb2_grpc as pb_grpc

T = 10
FAR = 900_000  # a step no test reaches (within max_steps_ahead): changes due then can only be withdrawn
SET_METHOD = "/lrctl.v1.LearningRateControl/SetLearningRates"


def set_request(*updates: pb.LearningRateUpdate, **options) -> pb.SetLearningRatesRequest:
    return pb.SetLearningRatesRequest(updates=list(updates), **options)


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def worker_state(served: Served) -> tuple:
    """What no bad request may change: rates (as served and as the optimizer has them),
    version and history."""
    reply = served.stub.GetLearningRates(pb.GetLearningRatesRequest(), timeout=T)
    changes = served.stub.ListChanges(pb.ListChangesRequest(), timeout=T)
    return (
        [(r.name, r.lr) for r in reply.rates],
        group_lrs(served.model, served.optimizer),
        reply.version,
        [c.change_id for c in changes.changes],
    )


def garbage_payloads() -> list[bytes]:
    """Bytes that are not a valid SetLearningRatesRequest (or parse to an invalid one)."""
    rng = random.Random(2024)
    fixed = [
        b"\xff" * 11,  # truncated varint
        b"\x0a\x05abc",  # length prefix beyond the end
        b"\x0a\x03\x0a\x01\xff",  # invalid UTF-8 in a string field
        b"garbage!",
        b"\x0a\x80\x80\x80\x80\x10",  # absurd length
        b"\x0f",  # wire type 7 does not exist
        b"",  # parses as an empty request: empty batch
        b"\x10\x01",  # dry_run only: empty batch
        b"\x0a\x02\x10\x01",  # one update, no selector, mode absolute
    ]
    return fixed + [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64))) for _ in range(16)]


def bad_calls(served: Served, step_now: int) -> list[tuple[str, Callable[[], grpc.StatusCode]]]:
    stub = served.stub
    raw = served.channel.unary_unary(SET_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)

    def s(*updates, **options):
        return lambda: code_of(lambda: stub.SetLearningRates(set_request(*updates, **options), timeout=T))

    huge_batch = [absolute(SEED_NAMES[k % 4], 0.5) for k in range(3000)] + [absolute("layer2.bias", math.nan)]
    huge_agreeing_then_conflict = [absolute("*", 0.25) for _ in range(2000)] + [absolute("layer1.bias", 0.3)]

    def cancelled_wait() -> grpc.StatusCode:
        future = stub.SetLearningRates.future(set_request(absolute("layer1.weight", 0.5), wait=True, at_step=FAR), timeout=30)
        time.sleep(0.01)
        future.cancel()
        return code_of(future.result) if not future.cancelled() else grpc.StatusCode.CANCELLED

    def expired_wait() -> grpc.StatusCode:
        return code_of(
            lambda: stub.SetLearningRates(set_request(scale("*", 3.0), wait=True, at_step=FAR), timeout=0.2)
        )

    def dropped_client() -> grpc.StatusCode:
        channel = grpc.insecure_channel(served.ctl.address)
        future = pb_grpc.LearningRateControlStub(channel).SetLearningRates.future(
            set_request(absolute("layer2.*", 0.5), wait=True, at_step=FAR), timeout=30
        )
        time.sleep(0.02)
        channel.close()
        return code_of(future.result)

    calls = [
        ("nan", s(absolute("layer1.weight", math.nan))),
        ("inf", s(absolute("layer1.weight", math.inf))),
        ("-inf", s(absolute("layer1.*", -math.inf))),
        ("negative", s(absolute("layer2.bias", -1e-3))),
        ("scale nan", s(scale("layer2.bias", math.nan))),
        ("scale 0", s(scale("*", 0.0))),
        ("scale negative", s(scale("*", -1.0))),
        ("bad regex", s(absolute("re:[unclosed", 0.1))),
        ("empty regex", s(absolute("re:", 0.1))),
        ("empty selector", s(absolute("", 0.1))),
        ("matches nothing", s(absolute("decoder.*", 0.1))),
        ("unknown name", s(absolute("layer9.weight", 0.1))),
        ("empty batch", s()),
        ("disagree", s(absolute("layer1.*", 0.1), scale("layer1.bias", 2.0))),
        ("at_step past", s(absolute("layer1.weight", 0.1), at_step=max(0, step_now - 1))),
        ("at_step negative", s(absolute("layer1.weight", 0.1), at_step=-1)),
        ("expected_version", s(absolute("layer1.weight", 0.1), expected_version=10**6)),
        ("mode unspecified", s(pb.LearningRateUpdate(selector="layer1.weight", value=0.1))),
        ("mode unknown", s(pb.LearningRateUpdate(selector="layer1.weight", mode=99, value=0.1))),
        ("negative max_reported", s(absolute("layer1.weight", 0.1), max_reported_changes=-5)),
        ("dry run nan", s(absolute("layer1.weight", math.nan), dry_run=True)),
        ("wait nan", s(absolute("layer1.weight", math.nan), wait=True)),
        ("huge batch one nan", s(*huge_batch, wait=True)),
        ("huge batch one conflict", s(*huge_agreeing_then_conflict)),
        ("huge exact name", s(absolute("x" * 3000, 0.1))),
        ("huge glob", s(absolute("layer*" + "?" * 2000, 0.1))),
        ("huge regex", s(absolute("re:" + "(" * 2000, 0.1))),
        ("cancelled wait", cancelled_wait),
        ("expired wait", expired_wait),
        ("dropped client", dropped_client),
        (
            "list bad token",
            lambda: code_of(lambda: stub.ListParameters(pb.ListParametersRequest(page_token="zz"), timeout=T)),
        ),
        (
            "list negative page",
            lambda: code_of(lambda: stub.ListParameters(pb.ListParametersRequest(page_size=-1), timeout=T)),
        ),
        (
            "list unknown view",
            lambda: code_of(lambda: stub.ListParameters(pb.ListParametersRequest(view=7), timeout=T)),
        ),
        (
            "changes bad token",
            lambda: code_of(lambda: stub.ListChanges(pb.ListChangesRequest(page_token="!!"), timeout=T)),
        ),
        (
            "get unknown",
            lambda: code_of(
                lambda: stub.GetLearningRates(pb.GetLearningRatesRequest(selectors=["layer1.wieght"]), timeout=T)
            ),
        ),
        (
            "get bad page token",
            lambda: code_of(lambda: stub.GetLearningRates(pb.GetLearningRatesRequest(page_token="zz"), timeout=T)),
        ),
        (
            "get negative page",
            lambda: code_of(lambda: stub.GetLearningRates(pb.GetLearningRatesRequest(page_size=-2), timeout=T)),
        ),
        (
            "get bad regex",
            lambda: code_of(lambda: stub.GetLearningRates(pb.GetLearningRatesRequest(selectors=["re:*"]), timeout=T)),
        ),
    ]
    for k, payload in enumerate(garbage_payloads()):
        calls.append((f"garbage {k}: {payload[:12]!r}", lambda payload=payload: code_of(lambda: raw(payload, timeout=T))))
    return calls


def test_a_stream_of_bad_requests_costs_only_the_requests(served: Served, training: Trainer) -> None:
    before = worker_state(served)
    assert before[0] == list(SEED_LRS.items()) and before[2] == 0
    kinds = bad_calls(served, training.steps)
    stream = [kinds[k % len(kinds)] for k in range(max(200, 3 * len(kinds)))]
    random.Random(7).shuffle(stream)

    steps_seen = [training.steps]
    results: list[tuple[str, grpc.StatusCode]] = []
    with ThreadPoolExecutor(4, thread_name_prefix="bad-client") as pool:
        for start in range(0, len(stream), 50):
            chunk = stream[start:start + 50]
            codes = list(pool.map(lambda kc: kc[1](), chunk))
            results += [(name, code) for (name, _), code in zip(chunk, codes)]
            # Training keeps going through the barrage.
            assert training.thread.is_alive(), training.errors
            steps_seen.append(training.wait_steps(3))

    accepted = [name for name, code in results if code == grpc.StatusCode.OK]
    assert not accepted, f"bad requests answered OK: {sorted(set(accepted))}"
    assert len(results) >= 200
    assert steps_seen == sorted(set(steps_seen)), steps_seen  # strictly increasing

    # Withdrawn waits leave nothing pending; nothing was applied.
    wait_for(lambda: served.controller.pending_count == 0, "cancelled and expired waits to be withdrawn")
    training.wait_steps(10)
    assert training.thread.is_alive() and not training.errors
    assert worker_state(served) == before
    status = served.stub.GetStatus(pb.GetStatusRequest(), timeout=T)
    assert (status.version, status.pending_changes, status.state) == (0, 0, pb.TRAINING_STATE_TRAINING)

    # And the worker still does its job afterwards.
    reply = served.stub.SetLearningRates(set_request(absolute("layer1.weight", 0.02), wait=True), timeout=30)
    assert reply.applied and reply.version == 1
    assert served.rates()["layer1.weight"] == 0.02


def test_each_bad_request_kind_gets_an_error_status(served: Served, training: Trainer) -> None:
    """The same kinds one by one, so a regression names the kind that broke."""
    codes = {name: call() for name, call in bad_calls(served, training.steps)}
    assert {n: c for n, c in codes.items() if c == grpc.StatusCode.OK} == {}
    expected = {
        "nan": grpc.StatusCode.INVALID_ARGUMENT,
        "negative": grpc.StatusCode.INVALID_ARGUMENT,
        "scale 0": grpc.StatusCode.INVALID_ARGUMENT,
        "bad regex": grpc.StatusCode.INVALID_ARGUMENT,
        "matches nothing": grpc.StatusCode.NOT_FOUND,
        "unknown name": grpc.StatusCode.NOT_FOUND,
        "empty batch": grpc.StatusCode.INVALID_ARGUMENT,
        "disagree": grpc.StatusCode.INVALID_ARGUMENT,
        "at_step past": grpc.StatusCode.INVALID_ARGUMENT,
        "expected_version": grpc.StatusCode.FAILED_PRECONDITION,
        "mode unspecified": grpc.StatusCode.INVALID_ARGUMENT,
        "huge batch one nan": grpc.StatusCode.INVALID_ARGUMENT,
        "huge batch one conflict": grpc.StatusCode.INVALID_ARGUMENT,
        "huge exact name": grpc.StatusCode.NOT_FOUND,
        "huge regex": grpc.StatusCode.INVALID_ARGUMENT,
        "cancelled wait": grpc.StatusCode.CANCELLED,
        "expired wait": grpc.StatusCode.DEADLINE_EXCEEDED,
        "get unknown": grpc.StatusCode.NOT_FOUND,
    }
    assert {n: codes[n] for n in expected} == expected
    wait_for(lambda: served.controller.pending_count == 0, "waits to be withdrawn")
    training.wait_steps(5)
    assert served.rates() == SEED_LRS


# -- Interactive Training's failures, shown absent ------------------------------------------------


class InStepRates:
    """Registered after lrctl's hook: the rates each optimizer step actually ran with."""

    def __init__(self, served: Served) -> None:
        self.seen: list[dict[str, float]] = []
        served.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: self.seen.append(group_lrs(served.model, served.optimizer))
        )


def test_ack_names_the_step_it_applied_at(served: Served) -> None:
    probe = InStepRates(served)
    served.step(3)
    future = served.stub.SetLearningRates.future(set_request(absolute("layer2.*", 0.125), wait=True), timeout=30)
    wait_for(lambda: served.controller.pending_count == 1, "the change to be pending")
    served.step(2)
    reply = future.result()
    assert reply.applied and reply.step == 3
    # The step the ack names is the first step that ran with the new rates.
    assert [s["layer2.weight"] for s in probe.seen] == [0.001, 0.001, 0.001, 0.125, 0.125]
    (record,) = served.stub.ListChanges(pb.ListChangesRequest(), timeout=T).changes
    assert record.step == reply.step and record.version == reply.version


def test_wait_true_acks_only_after_the_change_is_applied(served: Served) -> None:
    served.step()
    future = served.stub.SetLearningRates.future(set_request(absolute("layer1.bias", 0.5), wait=True), timeout=30)
    wait_for(lambda: served.controller.pending_count == 1, "the change to be pending")
    # Accepted but no step boundary yet: no acknowledgement, nothing applied.
    assert not future.done()
    assert served.rates()["layer1.bias"] == 0.1
    assert group_lrs(served.model, served.optimizer)["layer1.bias"] == 0.1
    served.step()
    reply = future.result()
    assert reply.applied and reply.step == 1
    assert served.rates()["layer1.bias"] == 0.5


def test_wait_false_never_claims_applied(served: Served) -> None:
    reply = served.stub.SetLearningRates(set_request(absolute("layer1.bias", 0.5)), timeout=T)
    assert reply.applied is False and reply.step == -1
    assert served.rates()["layer1.bias"] == 0.1


def test_change_lands_on_the_next_step_boundary(served: Served) -> None:
    probe = InStepRates(served)
    served.step(4)
    reply = served.stub.SetLearningRates(set_request(scale("*", 0.5)), timeout=T)
    assert not reply.applied
    served.step()  # the very next step runs with the new rates, not one or two later
    assert probe.seen[4] == {n: lr * 0.5 for n, lr in SEED_LRS.items()}
    assert probe.seen[3] == SEED_LRS
    (record,) = served.stub.ListChanges(pb.ListChangesRequest(), timeout=T).changes
    assert record.step == 4


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -0.01, -1e-300])
def test_nan_inf_and_negative_rates_are_refused(served: Served, training: Trainer, value: float) -> None:
    err = rpc_error(lambda: served.stub.SetLearningRates(set_request(absolute("layer1.weight", value), wait=True), timeout=T))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert repr(value) in err.details(), err.details()
    training.wait_steps(3)
    assert served.rates() == SEED_LRS


def test_zero_rate_is_accepted(served: Served, training: Trainer) -> None:
    reply = served.stub.SetLearningRates(set_request(absolute("layer1.weight", 0.0), wait=True), timeout=30)
    assert reply.applied and served.rates()["layer1.weight"] == 0.0


def test_malformed_bytes_do_not_stop_the_training_loop(served: Served, training: Trainer) -> None:
    raw = served.channel.unary_unary(SET_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    for payload in garbage_payloads():
        assert code_of(lambda: raw(payload, timeout=T)) != grpc.StatusCode.OK, payload
        training.wait_steps(1)
    assert training.thread.is_alive() and not training.errors
    assert served.rates() == SEED_LRS


# -- dropped clients, crashes and costly input ---------------------------------------------------


def test_dropped_client_withdraws_its_waiting_change(served: Served) -> None:
    channel = grpc.insecure_channel(served.ctl.address)
    future = pb_grpc.LearningRateControlStub(channel).SetLearningRates.future(
        set_request(absolute("layer1.weight", 0.5), wait=True), timeout=30
    )
    wait_for(lambda: served.controller.pending_count == 1, "the change to be pending")
    channel.close()
    assert code_of(future.result) == grpc.StatusCode.CANCELLED
    wait_for(lambda: served.controller.pending_count == 0, "the abandoned change to be withdrawn")
    served.step(2)
    assert served.rates() == SEED_LRS
    assert list(served.stub.ListChanges(pb.ListChangesRequest(), timeout=T).changes) == []


def test_crashing_handler_costs_only_the_request(
    served: Served, training: Trainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(served.controller, "status", boom)
    err = rpc_error(lambda: served.stub.GetStatus(pb.GetStatusRequest(), timeout=T))
    assert err.code() == grpc.StatusCode.INTERNAL and "simulated bug" in err.details()
    training.wait_steps(5)
    monkeypatch.undo()
    assert served.stub.GetStatus(pb.GetStatusRequest(), timeout=T).step >= 5


class _FailOnce:
    """Wraps the controller's apply strategy; its first move() raises after a half-done
    edit: the groups already changed (all of the move, or only part of it) and the
    strategy did not undo it, so only the controller's rollback can."""

    def __init__(self, inner, part: str) -> None:
        self.inner = inner
        self.part = part
        self.failed = False

    def move(self, moved, rates):
        if not self.failed:
            self.failed = True
            if self.part == "half":  # some parameters moved, the others not
                moved = dict(list(moved.items())[: max(1, len(moved) // 2)])
                rates = {c: r for c, r in rates.items() if c in set(moved.values())}
            self.inner.move(moved, rates)  # half done: the groups already changed...
            raise RuntimeError("simulated failure while applying")
        return self.inner.move(moved, rates)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def group_layout(optimizer) -> list[tuple]:
    """Each param group as the optimizer has it, in order: its parameters (by identity),
    its rate and its other hyperparameters."""
    return [
        (
            [id(p) for p in g["params"]],
            list(g["param_names"]),
            float(g["lr"]),
            {k: v for k, v in g.items() if k not in ("params", "param_names", "lr")},
        )
        for g in optimizer.param_groups
    ]


@pytest.mark.parametrize("part", ["all", "half"])
def test_crash_while_applying_costs_only_the_change(served: Served, training: Trainer, part: str) -> None:
    controller = served.controller
    before = group_layout(served.optimizer)
    controller._strategy = _FailOnce(controller._strategy, part)
    err = rpc_error(
        lambda: served.stub.SetLearningRates(set_request(absolute("layer1.*", 0.5), wait=True), timeout=30)
    )
    assert controller._strategy.failed
    assert err.code() == grpc.StatusCode.INTERNAL and "simulated failure" in err.details()
    training.wait_steps(5)
    assert training.thread.is_alive() and not training.errors
    # Rolled back: rates as served and as the optimizer has them, the same groups in
    # the same order with the same hyperparameters.
    assert served.rates() == SEED_LRS
    assert group_lrs(served.model, served.optimizer) == SEED_LRS
    assert group_layout(served.optimizer) == before
    status = served.stub.GetStatus(pb.GetStatusRequest(), timeout=T)
    assert (status.version, status.num_param_groups) == (0, len(before))
    # Recorded as failed (INTERNAL), at version 0: it changed nothing.
    (failed,) = served.stub.ListChanges(pb.ListChangesRequest(), timeout=T).changes
    assert (failed.version, failed.status, failed.num_changes) == (0, "INTERNAL", 0)
    assert "simulated failure" in failed.error
    reply = served.stub.SetLearningRates(set_request(absolute("layer1.*", 0.5), wait=True), timeout=30)
    assert reply.applied and reply.version == 1
    assert group_lrs(served.model, served.optimizer) == {**SEED_LRS, "layer1.weight": 0.5, "layer1.bias": 0.5}
    assert served.rates() == group_lrs(served.model, served.optimizer)


def test_rate_too_large_for_float32_is_refused_and_training_survives(served: Served, training: Trainer) -> None:
    """1e39 is a finite double but beyond float32: torch raises inside optimizer.step()
    ("value cannot be converted to type float without overflow"), so accepting it would
    kill the user's training loop at the next step."""
    code = code_of(lambda: served.stub.SetLearningRates(set_request(absolute("layer1.weight", 1e39)), timeout=T))
    survived = True
    try:
        training.wait_steps(5, timeout=10)
    except pytest.fail.Exception:
        survived = False
    errors, training.errors[:] = list(training.errors), []  # reported here, not again at teardown
    assert code == grpc.StatusCode.INVALID_ARGUMENT and survived and not errors, (
        f"Set layer1.weight=1e39 answered {code}; training loop alive={training.thread.is_alive()}, "
        f"errors={errors!r}"
    )


def test_huge_selector_gets_its_own_status_not_a_transport_error(served: Served, training: Trainer) -> None:
    """The error message must name the bad value, but a message carrying a 1 MB selector
    exceeds gRPC's metadata limit and the client sees RESOURCE_EXHAUSTED ("received
    metadata size exceeds hard limit") instead of the worker's status."""
    selector = "no.such.parameter." + "x" * 1_000_000
    err = rpc_error(lambda: served.stub.SetLearningRates(set_request(absolute(selector, 0.1)), timeout=30))
    assert err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), (
        f"{err.code()}: {err.details()[:200]}"
    )
    assert "no.such.parameter.xxx" in err.details()
    assert len(err.details()) < 4096
    training.wait_steps(3)
    assert served.rates() == SEED_LRS


def test_pathological_regex_selector_does_not_stall_training(served: Served, training: Trainer) -> None:
    """A catastrophic-backtracking regex runs inside CPython's `re`, which holds the GIL:
    while it runs, the training thread cannot step. Matching `^(.*.*)*x$` against the
    seed's names takes seconds. The worker must refuse such a selector, or bound its
    cost, rather than freeze the job.

    Progress is the assertion, not a duration: if the call took long enough for dozens
    of training steps (0.5 s at ~2-5 ms per step), training must have made at least
    10 steps meanwhile."""
    steps_before = training.steps
    started = time.monotonic()
    err = rpc_error(
        lambda: served.stub.SetLearningRates(set_request(absolute("re:^(.*.*)*x$", 0.1)), timeout=120)
    )
    took = time.monotonic() - started
    steps_during = training.steps - steps_before
    assert err.code() != grpc.StatusCode.OK
    if took > 0.5:
        assert steps_during >= 10, (
            f"training made {steps_during} step(s) while the worker spent {took:.1f}s on the "
            f"selector (answered {err.code()}: {err.details()[:120]})"
        )
    training.wait_steps(3)
    assert served.rates() == SEED_LRS


@pytest.mark.parametrize(("method", "raw"), [
    # a selector that is not UTF-8 (updates[0].selector = b"\xff")
    ("SetLearningRates", b"\x0a\x03\x0a\x01\xff"),
    ("GetLearningRates", b"\x0a\x02\xc3\x28"),
    ("GetStatus", b"\xff\xff\xff"),  # not protobuf at all
    ("ListParameters", b"\x0a\x05ab"),  # a length past the end
])
def test_undecodable_requests_are_invalid_arguments(served: Served, method: str, raw: bytes) -> None:
    """Bytes that do not decode are the client's fault (INVALID_ARGUMENT naming the
    method), not lrctl's (grpc would answer INTERNAL), and cost nothing else."""
    call = served.channel.unary_unary(f"/lrctl.v1.LearningRateControl/{method}",
                                      request_serializer=lambda b: b, response_deserializer=lambda b: b)
    err = rpc_error(lambda: call(raw, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert method in err.details() and "could not be decoded" in err.details()
    served.step(2)
    assert served.rates() == SEED_LRS
