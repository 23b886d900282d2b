"""The LearningRateControl service over real gRPC, with the raw generated stubs.

Each test gets its own worker on a free loopback port (`served` in conftest). Tests
that need exact steps drive optimizer.step() from the test thread; tests that wait for
a change use the background `training` loop.
"""

from __future__ import annotations

import base64
import socket
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version as dist_version

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from torch import nn

from conftest import (
    SEED_LRS,
    SEED_NAMES,
    Served,
    Trainer,
    absolute,
    per_parameter_optimizer,
    rpc_error,
    scale,
    seed_model,
    wait_for,
)
from lrctl.client.client import LRClient
from lrctl.client.errors import AbortedError
from lrctl.server import attach
from lrctl.server.requests import ChangeRequest, Update
from lrctl.server.record_wire import fit_record
from lrctl.server.service import PAGE_BYTES, LearningRateControlService
from lrctl.v1 import lrctl_pb2 as pb
from lrctl.v1 import lrctl_pb2_grpc as pb_grpc

T = 10  # per-call deadline (s) for calls that should answer at once


def set_request(*updates: pb.LearningRateUpdate, **options) -> pb.SetLearningRatesRequest:
    return pb.SetLearningRatesRequest(updates=list(updates), **options)


def list_names(served: Served, **request) -> list[str]:
    reply = served.stub.ListParameters(pb.ListParametersRequest(**request), timeout=T)
    return [p.name for p in reply.parameters]


def history(served: Served, **request) -> list[pb.ChangeRecord]:
    return list(served.stub.ListChanges(pb.ListChangesRequest(**request), timeout=T).changes)


def assert_status(error: grpc.RpcError, code: grpc.StatusCode, *fragments: str) -> None:
    assert error.code() == code, f"{error.code()}: {error.details()}"
    for fragment in fragments:
        assert fragment in error.details(), f"{fragment!r} not in {error.details()!r}"


# -- ListParameters ------------------------------------------------------------------------


def test_list_parameters_describes_each_parameter(served: Served) -> None:
    reply = served.stub.ListParameters(pb.ListParametersRequest(), timeout=T)
    assert [p.name for p in reply.parameters] == list(SEED_NAMES)
    assert reply.total_size == 4 and reply.next_page_token == ""
    first = reply.parameters[0]
    assert list(first.shape) == [20, 10] and first.numel == 200
    assert (first.dtype, first.device) == ("float32", "cpu")
    assert first.requires_grad and first.in_optimizer and first.settable
    assert first.HasField("lr") and first.lr == 0.01
    assert first.hyperparameters["momentum"] == 0.0
    assert {p.name: p.lr for p in reply.parameters} == SEED_LRS
    assert sorted(p.group for p in reply.parameters) == [0, 1, 2, 3]


@pytest.mark.parametrize("page_size", [1, 3])
def test_list_parameters_pages_chain(served: Served, page_size: int) -> None:
    names, token, pages = [], "", 0
    while True:
        reply = served.stub.ListParameters(
            pb.ListParametersRequest(page_size=page_size, page_token=token), timeout=T
        )
        assert reply.total_size == 4
        assert len(reply.parameters) <= page_size
        names += [p.name for p in reply.parameters]
        pages += 1
        token = reply.next_page_token
        if not token:
            break
    assert names == list(SEED_NAMES)
    assert pages == -(-4 // page_size)


@pytest.mark.parametrize(
    "filter, expected",
    [
        ("layer1.*", ["layer1.weight", "layer1.bias"]),
        ("re:bias$", ["layer1.bias", "layer2.bias"]),
        ("layer2.weight", ["layer2.weight"]),
        ("encoder.*", []),  # a filter that matches nothing lists nothing (not an error)
    ],
)
def test_list_parameters_filter(served: Served, filter: str, expected: list[str]) -> None:
    reply = served.stub.ListParameters(pb.ListParametersRequest(filter=filter), timeout=T)
    assert [p.name for p in reply.parameters] == expected
    assert reply.total_size == len(expected)


def test_list_parameters_filtered_pages(served: Served) -> None:
    first = served.stub.ListParameters(pb.ListParametersRequest(filter="*.bias", page_size=1), timeout=T)
    assert [p.name for p in first.parameters] == ["layer1.bias"] and first.total_size == 2
    second = served.stub.ListParameters(
        pb.ListParametersRequest(filter="*.bias", page_size=1, page_token=first.next_page_token), timeout=T
    )
    assert [p.name for p in second.parameters] == ["layer2.bias"] and second.next_page_token == ""


@pytest.mark.parametrize("filter", ["re:layer(", "re:a{99999999999}"])
def test_list_parameters_bad_filter_is_invalid_argument(served: Served, filter: str) -> None:
    err = rpc_error(lambda: served.stub.ListParameters(pb.ListParametersRequest(filter=filter), timeout=T))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, filter)


def test_page_token_from_another_filter_is_rejected(served: Served) -> None:
    token = served.stub.ListParameters(pb.ListParametersRequest(page_size=1), timeout=T).next_page_token
    assert token
    err = rpc_error(
        lambda: served.stub.ListParameters(
            pb.ListParametersRequest(filter="layer1.*", page_size=1, page_token=token), timeout=T
        )
    )
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, token)


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "%%%not-base64%%%",
        base64.urlsafe_b64encode(b"params:-5:00000000").decode(),
        base64.urlsafe_b64encode(b"changes:1:00000000").decode(),  # another listing's token
        base64.urlsafe_b64encode(b"\xff\xfe\xfd").decode(),
        "\u00e9t\u00e9",
    ],
)
def test_garbage_page_token_is_rejected(served: Served, token: str) -> None:
    err = rpc_error(lambda: served.stub.ListParameters(pb.ListParametersRequest(page_token=token), timeout=T))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "page_token")


@pytest.mark.parametrize("filter", ["", "*.bias", "re:^layer2", "encoder.*"])
def test_names_view_pages_match_the_full_view(served: Served, filter: str) -> None:
    names, token, pages = [], "", 0
    while True:
        reply = served.stub.ListParameters(
            pb.ListParametersRequest(filter=filter, page_size=1, page_token=token,
                                     view=pb.PARAMETER_VIEW_NAMES),
            timeout=T,
        )
        assert len(reply.parameters) == 0 and len(reply.names) <= 1
        names += reply.names
        pages += 1
        token = reply.next_page_token
        if not token:
            break
    full = list_names(served, filter=filter, view=pb.PARAMETER_VIEW_FULL)
    assert names == full == list_names(served, filter=filter)  # FULL is the default
    assert reply.total_size == len(full) and pages == max(1, len(full))


def test_page_tokens_carry_over_between_views(served: Served) -> None:
    first = served.stub.ListParameters(
        pb.ListParametersRequest(page_size=2, view=pb.PARAMETER_VIEW_NAMES), timeout=T
    )
    rest = served.stub.ListParameters(pb.ListParametersRequest(page_token=first.next_page_token), timeout=T)
    assert (*first.names, *(p.name for p in rest.parameters)) == SEED_NAMES


@pytest.mark.parametrize("view", [3, 99, -1])
def test_unknown_view_is_invalid_argument(served: Served, view: int) -> None:
    err = rpc_error(lambda: served.stub.ListParameters(pb.ListParametersRequest(view=view), timeout=T))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, f"view {view}", "PARAMETER_VIEW_NAMES")


def test_negative_page_size_is_rejected(served: Served) -> None:
    err = rpc_error(lambda: served.stub.ListParameters(pb.ListParametersRequest(page_size=-3), timeout=T))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "page_size -3")


class ManyLinears(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(n))


def test_a_history_page_of_big_records_ends_early() -> None:
    """101 records of 1000 names, each listed as its own update (2000 entries a record,
    ~80 KB): all of them at once would be ~8 MB, so pages end at PAGE_BYTES (a client
    with gRPC's default 4 MiB limit reads them all) and the next page has the rest."""
    model = ManyLinears(500)  # 1000 parameters
    names = [n for n, _ in model.named_parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = attach(model, opt, address="127.0.0.1:0", serve=False)
    try:
        for k in range(101):
            batch = tuple(Update(name, 0.01 * (1 + k % 2)) for name in names)
            ctl.controller.submit(ChangeRequest(updates=batch))
            opt.step()
        service = LearningRateControlService(ctl.controller)
        versions, token, pages = [], "", 0
        while True:
            reply = service.list_changes(pb.ListChangesRequest(page_size=1000, max_changes_per_record=1000,
                                                               page_token=token))
            pages += 1
            assert reply.ByteSize() <= 4 * 1024 * 1024
            assert all(len(r.changes) == 1000 and len(r.updates) == 1000 for r in reply.changes)
            versions += [r.version for r in reply.changes]
            token = reply.next_page_token
            if not token:
                break
        assert versions == list(range(1, 102)) and pages >= 3
    finally:
        ctl.close()


def test_a_record_bigger_than_a_page_is_cut_to_fit() -> None:
    """One record of 100,000 long names: its per-name list is cut so the page fits;
    num_changes still counts every name."""
    record = pb.ChangeRecord(version=1, num_changes=100_000, changes=[
        pb.RateChange(name=f"encoder.layers.{i}.attention.output.dense.weight", old_lr=0.1, new_lr=0.2,
                      old_base=0.1, new_base=0.2) for i in range(100_000)])
    assert record.ByteSize() > PAGE_BYTES
    fit_record(record)
    assert 0 < len(record.changes) < 100_000 and record.num_changes == 100_000
    assert record.ByteSize() <= PAGE_BYTES


def test_large_model_paginates_with_default_and_max_page_sizes() -> None:
    model = ManyLinears(1250)  # 2500 parameters
    names = [n for n, _ in model.named_parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = attach(model, opt, address="127.0.0.1:0")
    try:
        with grpc.insecure_channel(ctl.address) as channel:
            stub = pb_grpc.LearningRateControlStub(channel)
            for page_size, expected_pages in ((0, [1000, 1000, 500]), (1000, [1000, 1000, 500]), (100_000, [2500])):
                got, token, sizes = [], "", []
                while True:
                    reply = stub.ListParameters(
                        pb.ListParametersRequest(page_size=page_size, page_token=token), timeout=30
                    )
                    assert reply.total_size == 2500
                    sizes.append(len(reply.parameters))
                    got += [p.name for p in reply.parameters]
                    token = reply.next_page_token
                    if not token:
                        break
                assert sizes == expected_pages, page_size
                assert got == names
            reply = stub.ListParameters(pb.ListParametersRequest(filter=r"re:^blocks\.12[0-9][0-9]\.bias$"), timeout=30)
            assert [p.name for p in reply.parameters] == [f"blocks.{k}.bias" for k in range(1200, 1250)]
    finally:
        ctl.close(grace=0.5)


def test_max_page_size_is_capped_at_5000() -> None:
    model = ManyLinears(3000)  # 6000 parameters
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = attach(model, opt, address="127.0.0.1:0")
    try:
        with grpc.insecure_channel(ctl.address) as channel:
            stub = pb_grpc.LearningRateControlStub(channel)
            reply = stub.ListParameters(pb.ListParametersRequest(page_size=2**31 - 1), timeout=30)
            assert len(reply.parameters) == 5000 and reply.total_size == 6000 and reply.next_page_token
            rest = stub.ListParameters(
                pb.ListParametersRequest(page_size=5000, page_token=reply.next_page_token), timeout=30
            )
            assert len(rest.parameters) == 1000 and rest.next_page_token == ""
    finally:
        ctl.close(grace=0.5)


# -- GetLearningRates ----------------------------------------------------------------------


def test_get_learning_rates_all(served: Served) -> None:
    reply = served.stub.GetLearningRates(pb.GetLearningRatesRequest(), timeout=T)
    assert [(r.name, r.lr) for r in reply.rates] == list(SEED_LRS.items())
    assert (reply.version, reply.step) == (0, 0)


def test_get_learning_rates_by_selectors_in_model_order(served: Served) -> None:
    reply = served.stub.GetLearningRates(
        pb.GetLearningRatesRequest(selectors=["layer2.bias", "re:^layer1", "layer1.bias"]), timeout=T
    )
    assert [r.name for r in reply.rates] == ["layer1.weight", "layer1.bias", "layer2.bias"]
    assert [r.lr for r in reply.rates] == [0.01, 0.1, 1.0]


def test_get_learning_rates_unknown_selector_is_not_found(served: Served) -> None:
    err = rpc_error(
        lambda: served.stub.GetLearningRates(pb.GetLearningRatesRequest(selectors=["layer1.wieght"]), timeout=T)
    )
    assert_status(err, grpc.StatusCode.NOT_FOUND, "layer1.wieght", "layer1.weight")


def get_page(served: Served, **request) -> pb.GetLearningRatesResponse:
    return served.stub.GetLearningRates(pb.GetLearningRatesRequest(**request), timeout=T)


@pytest.mark.parametrize("selectors", [[], ["layer2.bias", "re:^layer1"]])
@pytest.mark.parametrize("page_size", [1, 2, 3, 50_000, 10**9])
def test_get_learning_rates_pages_chain(served: Served, selectors: list[str], page_size: int) -> None:
    whole = get_page(served, selectors=selectors)
    assert whole.next_page_token == "" and whole.total_size == len(whole.rates)
    rates, token, pages = [], "", 0
    while True:
        reply = get_page(served, selectors=selectors, page_size=page_size, page_token=token)
        assert len(reply.rates) <= page_size and reply.total_size == len(whole.rates)
        assert (reply.version, reply.step) == (whole.version, whole.step)
        rates += reply.rates
        pages += 1
        token = reply.next_page_token
        if not token:
            break
    assert rates == list(whole.rates) and pages == -(-len(whole.rates) // page_size)


def test_a_change_between_pages_aborts_the_reading(served: Served) -> None:
    first = get_page(served, page_size=2)
    served.stub.SetLearningRates(set_request(scale("layer2.*", 2.0)), timeout=T)
    served.step()  # applies the change: version 0 -> 1
    err = rpc_error(lambda: get_page(served, page_size=2, page_token=first.next_page_token))
    assert_status(err, grpc.StatusCode.ABORTED, "version 0 -> 1", "first page")
    # Read again from the first page: every page is at the new version.
    again = get_page(served, page_size=2)
    rest = get_page(served, page_size=2, page_token=again.next_page_token)
    assert again.version == rest.version == 1
    # Steps alone (no change applied) do not disturb a reading.
    served.step(2)
    assert get_page(served, page_size=2, page_token=rest.next_page_token).version == 1


class InterruptingClient(LRClient):
    """An LRClient that lets a change land right before each of its next `n` later pages."""

    def __init__(self, served: Served, n: int) -> None:
        super().__init__(served.ctl.address, timeout=T)
        self.served, self.interruptions = served, n

    def _call(self, method, request, timeout):  # type: ignore[no-untyped-def]
        if isinstance(request, pb.GetLearningRatesRequest) and request.page_token and self.interruptions:
            self.interruptions -= 1
            self.served.stub.SetLearningRates(set_request(scale("layer2.bias", 2.0)), timeout=T)
            self.served.step()
        return super()._call(method, request, timeout)


def test_client_reads_pages_again_after_a_change(served: Served) -> None:
    with InterruptingClient(served, n=2) as client:
        reading = client.read_learning_rates(page_size=3)
    assert reading.version == 2 and dict((r.name, r.lr) for r in reading.rates)["layer2.bias"] == 4.0
    with InterruptingClient(served, n=3) as client, pytest.raises(AbortedError, match="version 4 -> 5"):
        client.read_learning_rates(page_size=3)


@pytest.mark.parametrize(
    "request_",
    [
        dict(page_size=-1),
        dict(page_token="garbage"),
        dict(page_token=base64.urlsafe_b64encode(b"rates:1:00000000").decode()),  # no version
        dict(page_token=base64.urlsafe_b64encode(b"params:1:00000000").decode()),  # ListParameters'
    ],
    ids=["negative page_size", "garbage token", "token without version", "another listing's token"],
)
def test_get_learning_rates_bad_pages_are_invalid_argument(served: Served, request_: dict) -> None:
    err = rpc_error(lambda: get_page(served, **request_))
    fragment = "page_size -1" if "page_size" in request_ else "page_token"
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, fragment)


def test_get_page_token_is_bound_to_its_selectors(served: Served) -> None:
    token = get_page(served, page_size=1).next_page_token
    err = rpc_error(lambda: get_page(served, selectors=["layer1.*"], page_size=1, page_token=token))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, token)


# -- SetLearningRates ------------------------------------------------------------------------


def test_wait_true_returns_applied_with_step_version_and_old_new(served: Served, training: Trainer) -> None:
    reply = served.stub.SetLearningRates(
        set_request(absolute("layer1.*", 0.05), wait=True, reason="probe"), timeout=30
    )
    assert reply.applied
    assert reply.version == 1 and reply.step >= 1 and reply.change_id >= 1
    assert [(c.name, c.old_lr, c.new_lr) for c in reply.changes] == [
        ("layer1.weight", 0.01, 0.05),
        ("layer1.bias", 0.1, 0.05),
    ]
    assert reply.num_changes == 2
    assert served.rates()["layer1.weight"] == 0.05
    (record,) = history(served)
    assert (record.change_id, record.version, record.step) == (reply.change_id, 1, reply.step)


def test_waiting_sets_past_the_limit_are_refused_and_reads_still_answer() -> None:
    """Past max_waiting (6 here) waiting calls, another is refused naming the limit, and
    reads and health checks still answer (an orchestrator's probe must not fail)."""
    model = seed_model()
    ctl = attach(model, per_parameter_optimizer(model), address="127.0.0.1:0", max_waiting=6)
    served = Served(model, ctl.controller.optimizer, ctl)
    far = 10_000
    waiting_call = lambda k: served.stub.SetLearningRates(  # noqa: E731
        set_request(absolute("layer1.weight", 0.1 + k), at_step=far, wait=True), timeout=4
    )
    try:
        with ThreadPoolExecutor(6) as pool:
            waits = [pool.submit(rpc_error, lambda k=k: waiting_call(k)) for k in range(6)]
            wait_for(lambda: served.stub.GetStatus(pb.GetStatusRequest(), timeout=T).pending_changes == 6,
                     what="six waiting changes")
            err = rpc_error(lambda: waiting_call(7))
            assert_status(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "6 calls already wait", "max_waiting 6",
                          "wait=false")
            health = health_pb2_grpc.HealthStub(served.channel).Check(health_pb2.HealthCheckRequest(), timeout=T)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert served.stub.SetLearningRates(  # not waiting: accepted
                set_request(absolute("layer2.bias", 0.5), at_step=far), timeout=T
            ).change_id > 0
            for w in waits:  # each times out and is withdrawn
                assert w.result().code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert served.stub.GetStatus(pb.GetStatusRequest(), timeout=T).pending_changes == 1
        # The slots are free again.
        err = rpc_error(lambda: served.stub.SetLearningRates(
            set_request(absolute("layer1.weight", 0.3), at_step=far, wait=True), timeout=1))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        served.close()


def test_wait_false_accepts_then_applies(served: Served) -> None:
    reply = served.stub.SetLearningRates(set_request(scale("layer2.*", 2.0)), timeout=T)
    assert not reply.applied
    assert (reply.step, reply.version) == (-1, 0)
    assert reply.change_id >= 1
    assert [(c.name, c.old_lr, c.new_lr) for c in reply.changes] == [
        ("layer2.weight", 0.001, 0.002),
        ("layer2.bias", 1.0, 2.0),
    ]
    assert history(served) == []
    assert served.stub.GetStatus(pb.GetStatusRequest(), timeout=T).pending_changes == 1
    served.step()
    (record,) = history(served)
    assert (record.change_id, record.version, record.step) == (reply.change_id, 1, 0)
    assert served.rates()["layer2.bias"] == 2.0


def test_wait_false_change_shows_up_in_history_while_training(served: Served, training: Trainer) -> None:
    reply = served.stub.SetLearningRates(set_request(absolute("layer2.bias", 0.5)), timeout=T)
    assert not reply.applied
    records = wait_for(lambda: history(served), "the change to be applied")
    assert records[0].change_id == reply.change_id
    assert served.rates()["layer2.bias"] == 0.5


def test_dry_run_changes_nothing(served: Served) -> None:
    served.step()
    reply = served.stub.SetLearningRates(set_request(absolute("*", 0.3), dry_run=True, wait=True), timeout=T)
    assert not reply.applied and reply.change_id == 0 and reply.version == 0
    assert [c.new_lr for c in reply.changes] == [0.3] * 4
    served.step(2)
    assert served.rates() == SEED_LRS
    status = served.stub.GetStatus(pb.GetStatusRequest(), timeout=T)
    assert (status.version, status.pending_changes) == (0, 0)
    assert history(served) == []


def test_dry_run_reports_errors_like_a_real_set(served: Served) -> None:
    err = rpc_error(lambda: served.stub.SetLearningRates(set_request(absolute("*", -1.0), dry_run=True), timeout=T))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "-1.0")


def test_at_step_in_the_future_applies_exactly_at_that_step(served: Served) -> None:
    served.step(2)
    reply = served.stub.SetLearningRates(set_request(absolute("layer1.weight", 0.07), at_step=5), timeout=T)
    assert (reply.applied, reply.step) == (False, 5)
    served.step(3)  # steps 2, 3, 4
    assert served.rates()["layer1.weight"] == 0.01
    assert history(served) == []
    served.step()  # step 5
    assert served.rates()["layer1.weight"] == 0.07
    (record,) = history(served)
    assert (record.step, record.at_step) == (5, 5)


def test_at_step_in_the_past_is_invalid_argument(served: Served) -> None:
    served.step(3)
    err = rpc_error(
        lambda: served.stub.SetLearningRates(set_request(absolute("layer1.weight", 0.07), at_step=1), timeout=T)
    )
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "at_step 1")


def test_waiting_set_times_out_and_is_withdrawn(served: Served, training: Trainer) -> None:
    training.pause()
    before = served.rates()
    err = rpc_error(
        lambda: served.stub.SetLearningRates(set_request(absolute("layer1.*", 0.9), wait=True), timeout=0.6)
    )
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, f"{err.code()}: {err.details()}"
    wait_for(lambda: served.controller.pending_count == 0, "the change to be withdrawn")
    training.resume()
    training.wait_steps(20)
    assert served.rates() == before
    assert history(served) == []
    assert served.stub.GetStatus(pb.GetStatusRequest(), timeout=T).version == 0


def test_waiting_set_answers_its_own_deadline_error_naming_the_change(served: Served) -> None:
    """No step comes at all: the worker answers DEADLINE_EXCEEDED itself, saying NOT applied."""
    err = rpc_error(lambda: served.stub.SetLearningRates(set_request(absolute("layer1.*", 0.9), wait=True), timeout=1.5))
    assert_status(err, grpc.StatusCode.DEADLINE_EXCEEDED, "NOT applied")
    served.step(2)
    assert served.rates() == SEED_LRS


@pytest.mark.parametrize("mode, fragment", [(pb.UPDATE_MODE_UNSPECIFIED, "UPDATE_MODE_UNSPECIFIED"), (7, "7")])
def test_update_without_a_valid_mode_is_invalid_argument(served: Served, mode: int, fragment: str) -> None:
    update = pb.LearningRateUpdate(selector="layer1.weight", mode=mode, value=0.1)
    err = rpc_error(lambda: served.stub.SetLearningRates(set_request(update), timeout=T))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, fragment, "layer1.weight")


def test_expected_version_mismatch_is_failed_precondition(served: Served) -> None:
    err = rpc_error(
        lambda: served.stub.SetLearningRates(
            set_request(absolute("layer1.weight", 0.2), expected_version=9), timeout=T
        )
    )
    assert_status(err, grpc.StatusCode.FAILED_PRECONDITION, "expected_version 9")


def test_expected_version_mismatch_at_apply_fails_the_waiting_call(served: Served) -> None:
    """Two controllers both read version 0; the second one's change is refused at the step."""
    first = served.stub.SetLearningRates(set_request(absolute("layer1.weight", 0.2), expected_version=0), timeout=T)
    second = served.stub.SetLearningRates.future(
        set_request(absolute("layer1.weight", 0.3), expected_version=0, wait=True), timeout=30
    )
    wait_for(lambda: served.controller.pending_count == 2, "both changes to be pending")
    served.step()
    err = rpc_error(second.result)
    assert_status(err, grpc.StatusCode.FAILED_PRECONDITION, "expected_version 0")
    assert served.rates()["layer1.weight"] == 0.2
    # The refused one is in the history as failed, at the version in force (1).
    assert [(r.change_id, r.version, r.status) for r in history(served)] == [
        (first.change_id, 1, ""), (first.change_id + 1, 1, "FAILED_PRECONDITION")]


BAD_SETS = [
    # (updates, options, code, fragments naming the bad value)
    ([absolute("layer1.weight", float("nan"))], {}, grpc.StatusCode.INVALID_ARGUMENT, ["nan", "layer1.weight"]),
    ([absolute("layer1.weight", float("inf"))], {}, grpc.StatusCode.INVALID_ARGUMENT, ["inf"]),
    ([absolute("layer1.weight", float("-inf"))], {}, grpc.StatusCode.INVALID_ARGUMENT, ["-inf"]),
    ([absolute("layer1.weight", -0.25)], {}, grpc.StatusCode.INVALID_ARGUMENT, ["-0.25"]),
    ([scale("layer1.weight", 0.0)], {}, grpc.StatusCode.INVALID_ARGUMENT, ["0.0"]),
    ([scale("layer1.weight", -3.0)], {}, grpc.StatusCode.INVALID_ARGUMENT, ["-3.0"]),
    ([absolute("re:layer(", 0.1)], {}, grpc.StatusCode.INVALID_ARGUMENT, ["re:layer("]),
    ([absolute("", 0.1)], {}, grpc.StatusCode.INVALID_ARGUMENT, ["empty selector"]),
    # Regexes that make re.compile raise something other than re.error.
    ([absolute("re:a{99999999999}", 0.1)], {}, grpc.StatusCode.INVALID_ARGUMENT, ["a{99999999999}"]),
    ([absolute("re:" + "(" * 1500, 0.1)], {}, grpc.StatusCode.INVALID_ARGUMENT, ["re:((("]),
    ([], {}, grpc.StatusCode.INVALID_ARGUMENT, ["empty batch"]),
    (
        [absolute("layer1.*", 0.1), absolute("*.bias", 0.2)],
        {},
        grpc.StatusCode.INVALID_ARGUMENT,
        ["layer1.bias", "0.1", "0.2"],
    ),
    ([absolute("layer1.weight", 0.1)], {"at_step": -4}, grpc.StatusCode.INVALID_ARGUMENT, ["at_step -4"]),
    (
        [absolute("layer1.weight", 0.1)],
        {"max_reported_changes": -1},
        grpc.StatusCode.INVALID_ARGUMENT,
        ["max_reported_changes -1"],
    ),
    ([absolute("encoder.*", 0.1)], {}, grpc.StatusCode.NOT_FOUND, ["encoder.*"]),
    ([absolute("layer1.wieght", 0.1)], {}, grpc.StatusCode.NOT_FOUND, ["layer1.wieght", "layer1.weight"]),
    ([absolute("layer1.weight", 0.1)], {"expected_version": 3}, grpc.StatusCode.FAILED_PRECONDITION, ["3"]),
]


@pytest.mark.parametrize(
    "updates, options, code, fragments", BAD_SETS, ids=[f"{b[2].name}-{b[3][0][:20]}" for b in BAD_SETS]
)
def test_bad_set_gets_its_status_and_names_the_value(served: Served, updates, options, code, fragments) -> None:
    err = rpc_error(lambda: served.stub.SetLearningRates(set_request(*updates, **options), timeout=T))
    assert_status(err, code, *fragments)
    served.step()
    assert served.rates() == SEED_LRS


def test_unsettable_parameters_over_grpc() -> None:
    model = seed_model()
    model.layer2.bias.requires_grad_(False)
    opt = per_parameter_optimizer(model, lrs={"layer1.weight": 0.01, "layer2.weight": 0.001, "layer2.bias": 1.0})
    ctl = attach(model, opt, address="127.0.0.1:0")
    served = Served(model, opt, ctl)
    try:
        params = {p.name: p for p in served.stub.ListParameters(pb.ListParametersRequest(), timeout=T).parameters}
        assert (params["layer1.bias"].in_optimizer, params["layer1.bias"].settable) == (False, False)
        assert not params["layer1.bias"].HasField("lr") and params["layer1.bias"].group == -1
        assert (params["layer2.bias"].in_optimizer, params["layer2.bias"].settable) == (True, False)
        assert params["layer2.bias"].lr == 1.0
        for name, why in (("layer1.bias", "not held by the optimizer"), ("layer2.bias", "does not require grad")):
            err = rpc_error(lambda: served.stub.SetLearningRates(set_request(absolute(name, 0.5)), timeout=T))
            assert_status(err, grpc.StatusCode.FAILED_PRECONDITION, name, why)
        status = served.stub.GetStatus(pb.GetStatusRequest(), timeout=T)
        assert (status.num_parameters, status.num_settable) == (4, 2)
    finally:
        served.close()


def test_max_reported_changes_truncates_but_counts_all(served: Served) -> None:
    reply = served.stub.SetLearningRates(set_request(scale("*", 0.5), max_reported_changes=2), timeout=T)
    assert [c.name for c in reply.changes] == ["layer1.weight", "layer1.bias"]
    assert reply.num_changes == 4
    served.step()
    (record,) = history(served, max_changes_per_record=1)
    assert [c.name for c in record.changes] == ["layer1.weight"]
    assert record.num_changes == 4
    (record,) = history(served)
    assert [(c.name, c.old_lr, c.new_lr) for c in record.changes] == [
        (n, lr, 0.5 * lr) for n, lr in SEED_LRS.items()
    ]


# -- GetStatus -----------------------------------------------------------------------------------


def test_run_id_tells_one_worker_run_from_another(served: Served) -> None:
    run_id = served.stub.GetStatus(pb.GetStatusRequest(), timeout=T).run_id
    assert len(run_id) == 32 and int(run_id, 16) >= 0
    served.step()
    assert served.stub.GetStatus(pb.GetStatusRequest(), timeout=T).run_id == run_id
    model = seed_model()
    with attach(model, per_parameter_optimizer(model), address="127.0.0.1:0") as other:
        with grpc.insecure_channel(other.address) as channel:
            again = pb_grpc.LearningRateControlStub(channel).GetStatus(pb.GetStatusRequest(), timeout=T)
    assert again.version == 0 and again.run_id != run_id


def test_get_status_fields(served: Served) -> None:
    status = served.stub.GetStatus(pb.GetStatusRequest(), timeout=T)
    assert status.step == 0 and status.version == 0
    assert status.optimizer == "torch.optim.sgd.SGD"
    assert (status.num_parameters, status.num_settable) == (4, 4)
    assert (status.num_distinct_lrs, status.num_param_groups) == (4, 4)
    assert status.state == pb.TRAINING_STATE_WAITING_FOR_FIRST_STEP
    assert not status.HasField("seconds_since_last_step")
    assert status.uptime_seconds >= 0
    assert status.pending_changes == 0
    assert status.server_version == dist_version("lrctl")

    served.stub.SetLearningRates(set_request(absolute("layer1.*", 0.5), at_step=3), timeout=T)
    served.step(2)
    status = served.stub.GetStatus(pb.GetStatusRequest(), timeout=T)
    assert (status.step, status.version, status.pending_changes) == (2, 0, 1)
    assert status.state == pb.TRAINING_STATE_TRAINING
    assert status.HasField("seconds_since_last_step") and status.seconds_since_last_step >= 0
    served.step(2)
    status = served.stub.GetStatus(pb.GetStatusRequest(), timeout=T)
    assert (status.step, status.version, status.pending_changes) == (4, 1, 0)
    assert (status.num_distinct_lrs, status.num_param_groups) == (3, 3)


# -- ListChanges -----------------------------------------------------------------------------------


def _apply_five(served: Served) -> None:
    for k in range(5):
        served.stub.SetLearningRates(
            set_request(absolute("layer1.weight", 0.1 * (k + 1)), reason=f"change {k}"),
            timeout=T,
            metadata=(("lrctl-user", f"user{k}@host"),),
        )
        served.step()


def test_list_changes_records_reason_user_and_peer(served: Served) -> None:
    _apply_five(served)
    records = history(served)
    assert [r.version for r in records] == [1, 2, 3, 4, 5]
    assert [r.step for r in records] == [0, 1, 2, 3, 4]
    assert [r.reason for r in records] == [f"change {k}" for k in range(5)]
    assert [r.user for r in records] == [f"user{k}@host" for k in range(5)]
    assert all("127.0.0.1" in r.peer for r in records), [r.peer for r in records]
    r = records[2]
    assert list(r.updates) == [absolute("layer1.weight", 0.1 * 3)]
    assert [(c.name, c.old_lr, c.new_lr) for c in r.changes] == [("layer1.weight", 0.1 * 2, 0.1 * 3)]
    assert r.requested_at <= r.applied_at and r.num_changes == 1 and not r.HasField("at_step")


def test_list_changes_pagination_and_after_version(served: Served) -> None:
    _apply_five(served)
    versions, token, sizes = [], "", []
    while True:
        reply = served.stub.ListChanges(pb.ListChangesRequest(page_size=2, page_token=token), timeout=T)
        sizes.append(len(reply.changes))
        versions += [r.version for r in reply.changes]
        token = reply.next_page_token
        if not token:
            break
    assert versions == [1, 2, 3, 4, 5] and sizes == [2, 2, 1]
    assert [r.version for r in history(served, after_version=3)] == [4, 5]
    assert history(served, after_version=5) == []
    reply = served.stub.ListChanges(pb.ListChangesRequest(after_version=1, page_size=3), timeout=T)
    assert [r.version for r in reply.changes] == [2, 3, 4] and reply.next_page_token
    reply = served.stub.ListChanges(pb.ListChangesRequest(after_version=1, page_size=3, page_token=reply.next_page_token), timeout=T)
    assert [r.version for r in reply.changes] == [5] and reply.next_page_token == ""
    assert reply.dropped == 0


def test_list_changes_bad_requests(served: Served) -> None:
    for request, fragment in (
        (pb.ListChangesRequest(page_size=-1), "page_size -1"),
        (pb.ListChangesRequest(page_token="nope"), "page_token"),
        (pb.ListChangesRequest(max_changes_per_record=-2), "max_changes_per_record -2"),
    ):
        err = rpc_error(lambda: served.stub.ListChanges(request, timeout=T))
        assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, fragment)


def test_bounded_history_reports_dropped_over_grpc() -> None:
    model = seed_model()
    opt = per_parameter_optimizer(model)
    ctl = attach(model, opt, address="127.0.0.1:0", history_limit=2)
    served = Served(model, opt, ctl)
    try:
        _apply_five(served)
        reply = served.stub.ListChanges(pb.ListChangesRequest(), timeout=T)
        assert [r.version for r in reply.changes] == [4, 5]
        assert reply.dropped == 3
    finally:
        served.close()


# -- health, reflection, binding and shutdown ------------------------------------------------------


def test_health_service_answers_serving(served: Served) -> None:
    health = health_pb2_grpc.HealthStub(served.channel)
    for service in ("", "lrctl.v1.LearningRateControl"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=T)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(served: Served) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="lrctl.v1.LearningRateControl"),
    ]
    replies = list(stub.ServerReflectionInfo(iter(requests), timeout=T))
    services = {s.name for s in replies[0].list_services_response.service}
    assert "lrctl.v1.LearningRateControl" in services
    assert "grpc.health.v1.Health" in services
    assert replies[1].file_descriptor_response.file_descriptor_proto  # the .proto is served


def test_non_loopback_address_needs_insecure() -> None:
    model = seed_model()
    opt = per_parameter_optimizer(model)
    with pytest.raises(ValueError) as info:
        attach(model, opt, address="0.0.0.0:0")
    assert "0.0.0.0:0" in str(info.value) and "insecure" in str(info.value)
    # The failed attach left no step hook behind: stepping works and nothing is counted.
    assert len(opt._optimizer_step_pre_hooks) == 0
    opt.step()


def test_non_loopback_address_with_insecure_warns(capfd: pytest.CaptureFixture[str]) -> None:
    model = seed_model()
    opt = per_parameter_optimizer(model)
    ctl = attach(model, opt, address="0.0.0.0:0", insecure=True)
    try:
        assert ctl.port > 0
        assert "WARNING" in capfd.readouterr().err
        with grpc.insecure_channel(f"127.0.0.1:{ctl.port}") as channel:
            reply = pb_grpc.LearningRateControlStub(channel).GetStatus(pb.GetStatusRequest(), timeout=T)
            assert reply.num_parameters == 4
    finally:
        ctl.close(grace=0.5)


def test_binding_a_port_in_use_raises_oserror(served: Served) -> None:
    model = seed_model()
    opt = per_parameter_optimizer(model)
    with pytest.raises(OSError) as info:
        attach(model, opt, address=served.ctl.address)
    assert served.ctl.address in str(info.value)
    assert len(opt._optimizer_step_pre_hooks) == 0


def test_binding_a_port_held_by_another_socket_raises_oserror() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        model = seed_model()
        opt = per_parameter_optimizer(model)
        with pytest.raises(OSError, match="cannot listen on"):
            attach(model, opt, address=address)


def test_bad_address_is_a_value_error() -> None:
    model = seed_model()
    opt = per_parameter_optimizer(model)
    with pytest.raises(ValueError, match="nonsense"):
        attach(model, opt, address="nonsense")


def test_after_close_the_port_is_unavailable() -> None:
    model = seed_model()
    opt = per_parameter_optimizer(model)
    ctl = attach(model, opt, address="127.0.0.1:0")
    address = ctl.address
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.LearningRateControlStub(channel)
        assert stub.GetStatus(pb.GetStatusRequest(), timeout=T).num_parameters == 4
        ctl.close(grace=0.5)
        ctl.close()  # idempotent
    with grpc.insecure_channel(address) as channel:
        err = rpc_error(lambda: pb_grpc.LearningRateControlStub(channel).GetStatus(pb.GetStatusRequest(), timeout=2))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
    # The optimizer keeps its rates and steps without lrctl.
    assert len(opt._optimizer_step_pre_hooks) == 0
    opt.step()


def test_close_fails_a_waiting_set(served: Served) -> None:
    future = served.stub.SetLearningRates.future(set_request(absolute("layer1.weight", 0.5), wait=True), timeout=30)
    wait_for(lambda: served.controller.pending_count == 1, "the change to be pending")
    served.ctl.close(grace=5)
    err = rpc_error(future.result)
    assert_status(err, grpc.StatusCode.FAILED_PRECONDITION, "shut down", "not applied")
    served.step()
    assert served.controller.learning_rates()["layer1.weight"] == 0.01


def test_concurrent_waiting_sets_all_apply(served: Served, training: Trainer) -> None:
    def one(k: int) -> pb.SetLearningRatesResponse:
        return served.stub.SetLearningRates(
            set_request(absolute(SEED_NAMES[k % 4], 0.001 * (k + 1)), wait=True), timeout=30
        )

    with ThreadPoolExecutor(6) as pool:  # 6: the most waiting calls a worker takes at once
        replies = list(pool.map(one, range(16)))
    assert all(r.applied for r in replies)
    assert sorted(r.version for r in replies) == list(range(1, 17))
    records = history(served)
    assert [r.version for r in records] == list(range(1, 17))
    by_id = {r.change_id: r for r in records}
    for reply in replies:
        assert by_id[reply.change_id].step == reply.step
        assert by_id[reply.change_id].version == reply.version
