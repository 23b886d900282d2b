"""Metrics in (LRControl.report, per-parameter statistics) and out (WatchMetrics, the
client's watch_metrics, `lrctl watch`, `lrctl history --follow`).

Real workers on 127.0.0.1:0, real optimizers, the CLI as a subprocess. The training
thread is the test thread wherever the exact step matters.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import grpc
import pytest
import torch
from torch import nn

from lrctl.client import LRClient
from lrctl.client.errors import InvalidArgumentError, OutOfRangeError
from lrctl.server import attach
from lrctl.server.auth import ADMIN, READER, Token, Tokens
from lrctl.server.param_stats import STATS
from lrctl.server.telemetry import Event, Telemetry
from lrctl.server.subscribers import BATCH_BYTES, Subscriber, runs
from lrctl.server.watch import WatchLimits
from lrctl.v1 import lrctl_pb2 as pb
from lrctl.v1 import lrctl_pb2_grpc as pb_grpc
from conftest import LRCTL, PATIENCE_S, absolute, rpc_error, wait_for


def _tiny() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, ctl=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    optimizer.zero_grad()
    loss = model(torch.randn(5, 3)).pow(2).sum()
    loss.backward()
    if ctl is not None:
        ctl.report(loss)
    optimizer.step()
    return loss


@pytest.fixture(params=["inprocess", "process"])
def serving(request, monkeypatch):  # type: ignore[no-untyped-def]
    """Each WatchMetrics test runs in both serving modes: the streams served in this
    process, and in a serving process fed by this one (lrctl.server.watch_feed)."""
    monkeypatch.setenv("LRCTL_SERVING", request.param)
    return request.param


@pytest.fixture
def job(serving):  # type: ignore[no-untyped-def]
    model, optimizer = _tiny()
    ctl = attach(model, optimizer, address="127.0.0.1:0", events=64)
    channel = grpc.insecure_channel(ctl.address)
    try:
        yield model, optimizer, ctl, pb_grpc.LearningRateControlStub(channel)
    finally:
        channel.close()
        ctl.close(grace=0.5)


# -- metrics in ----------------------------------------------------------------------


def test_report_keeps_tensors_detached_until_read_and_nan_is_data() -> None:
    model, optimizer = _tiny()
    with attach(model, optimizer, serve=False) as ctl:
        losses = []
        for _ in range(3):
            losses.append(_step(model, optimizer))
            ctl.report(losses[-1], step=ctl.step - 1, inf=math.inf, nan=float("nan"), flag=True, n=3)
        ctl.report(torch.tensor(2.5), step=ctl.step)  # opens the next event: seals step 2
        events, missed = ctl.telemetry.after(0)
        assert missed == 0 and [e.step for e in events] == [0, 1, 2]
        raw = events[0]._metrics["loss"]
        assert isinstance(raw, torch.Tensor) and not raw.requires_grad  # not converted yet
        for event, loss in zip(events, losses):
            m = event.metrics()
            assert m["loss"] == loss.item() and m["inf"] == math.inf and math.isnan(m["nan"])
            assert m["flag"] == 1.0 and m["n"] == 3.0
        assert isinstance(events[0]._metrics["loss"], float)  # converted once, on read


def test_events_leaving_the_raw_window_are_converted() -> None:
    model, optimizer = _tiny()
    with attach(model, optimizer, serve=False) as ctl:
        ctl.telemetry.raw_window = 2
        for _ in range(6):
            _step(model, optimizer, ctl)
        events, _ = ctl.telemetry.after(0)
        assert all(isinstance(v, float) for e in events[:-2] for v in e._metrics.values())
        assert isinstance(events[-1]._metrics["loss"], torch.Tensor)


def test_tensors_are_converted_in_batches_of_any_dtype_to_the_values_item_reads() -> None:
    """Past the raw window, the older half is converted at once (one stack per device
    and dtype): the values are those .item() reads, and at most raw_window events hold
    tensors."""
    telemetry = Telemetry(raw_window=4)
    reported = []
    for step in range(11):
        metrics = {"loss": torch.tensor(step / 3), "f64": torch.tensor(step / 7, dtype=torch.float64),
                   "flag": torch.tensor(step % 2 == 0), "n": torch.tensor(step), "plain": step * 0.5}
        reported.append({k: float(v.item()) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()})
        telemetry.report(step, metrics)
        held = sum(1 for e in telemetry.after(0)[0]
                   if any(isinstance(v, torch.Tensor) for v in e._metrics.values()))
        assert held <= telemetry.raw_window
    events, _ = telemetry.after(0)
    assert [e.step for e in events] == list(range(10))  # step 10's is still open
    converted = [e for e in events if all(isinstance(v, float) for v in e._metrics.values())]
    assert len(converted) >= len(events) - telemetry.raw_window
    for event in events:
        assert event.metrics() == reported[event.step]


@pytest.mark.parametrize("kwargs, fragment", [
    ({"bad name": 1.0}, "'bad name'"),
    ({"x" * 65: 1.0}, "65 characters"),
    ({"ok": "1.0"}, "'ok'"),
    ({"vec": torch.ones(2)}, "shape (2,)"),
    ({"step_": 1.0, "cplx": torch.tensor(1j)}, "'cplx'"),
])
def test_report_refuses_bad_names_and_values_whole(kwargs, fragment) -> None:  # type: ignore[no-untyped-def]
    model, optimizer = _tiny()
    with attach(model, optimizer, serve=False) as ctl:
        with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            ctl.report(1.0, **kwargs)
        with pytest.raises(ValueError, match="loss' given twice"):
            ctl.report(1.0, loss=2.0)
        with pytest.raises(ValueError, match="step -1"):
            ctl.report(1.0, step=-1)
        with pytest.raises(ValueError, match="at most 64"):
            ctl.report(**{f"m{i}": i for i in range(65)})
        _step(model, optimizer)
        ctl.report(step=5)  # seals what came before
        events, _ = ctl.telemetry.after(0)
        assert all(e.metrics() == {} for e in events)  # nothing of a refused report was kept


# -- per-parameter statistics --------------------------------------------------------


def test_stats_match_a_hand_computation_per_name_and_per_group() -> None:
    model, optimizer = _tiny()
    params = list(model.parameters())
    with attach(model, optimizer, serve=False, stats_every=2, stats=STATS,
                stats_groups={"first": "0.*", "both": ["0.*", "1.*"]}) as ctl:
        initial = [p.detach().clone() for p in params]
        expected: dict[int, dict[str, float]] = {}
        grad_sq = max_dist = 0.0
        previous = None
        for step in range(5):
            optimizer.zero_grad()
            model(torch.randn(5, 3)).pow(2).sum().backward()
            grad = torch.cat([p.grad.flatten() for p in params[:2]])
            before = torch.cat([p.detach().flatten() for p in params[:2]])
            optimizer.step()
            after = torch.cat([p.detach().flatten() for p in params[:2]])
            update = after - before
            grad_sq += float(grad.norm() ** 2)
            max_dist = max(max_dist, float((after - torch.cat([t.flatten() for t in initial[:2]])).norm()))
            expected[step] = {
                "grad_norm": float(grad.norm()), "param_norm": float(after.norm()),
                "update_ratio": float(update.norm() / before.norm()), "grad_sq_sum": grad_sq,
                "max_dist": max_dist, "update_dot": math.nan if previous is None else float(update @ previous),
                "descent_cos": math.nan if previous is None else float(
                    -(grad @ previous) / (grad.norm() * previous.norm())),
            }
            previous = update
        ctl.report(step=ctl.step)  # seals step 4
        events = [e for e in ctl.telemetry.after(0)[0] if e.has_stats]
        assert [e.step for e in events] == [0, 2, 4]
        for event in events:
            got = event.stats()["first"]
            assert list(got) == list(STATS)
            for stat, want in expected[event.step].items():
                if math.isnan(want):
                    assert math.isnan(got[stat])
                else:
                    assert got[stat] == pytest.approx(want, rel=1e-5, abs=1e-7), stat
            assert set(event.stats()) == {"first", "both"}
    # Per name: one unit per parameter, its own gradient norm.
    model, optimizer = _tiny()
    with attach(model, optimizer, serve=False, stats_every=1, stats=("grad_norm",)) as ctl:
        _step(model, optimizer)
        norms = {n: float(p.grad.norm()) for n, p in model.named_parameters()}
        ctl.report(step=ctl.step)
        (event,) = ctl.telemetry.after(0)[0]
        assert {n: v["grad_norm"] for n, v in event.stats().items()} == pytest.approx(norms)


def test_stats_options_are_checked_before_anything_is_touched() -> None:
    model, optimizer = _tiny()
    for kwargs, fragment in (
        ({"stats_every": 0}, "stats_every 0"),
        ({"stats_every": 1, "stats": ("grad_norm", "curvature")}, "'curvature'"),
        ({"stats_every": 1, "stats_groups": {"g": "nothing.*"}}, "stats_groups['g']"),
        ({"stats_every": 1, "stats_groups": {"bad label": "0.*"}}, "'bad label'"),
    ):
        with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            attach(model, optimizer, serve=False, **kwargs)
        assert not optimizer._optimizer_step_pre_hooks  # nothing left attached


# -- WatchMetrics --------------------------------------------------------------------


def test_watch_from_a_kept_step_and_a_gone_one(job) -> None:  # type: ignore[no-untyped-def]
    model, optimizer, ctl, stub = job
    for _ in range(100):  # the ring keeps 64 events
        _step(model, optimizer, ctl)
    stream = stub.WatchMetrics(pb.WatchMetricsRequest(from_step=90), timeout=PATIENCE_S)
    first = [next(stream) for _ in range(9)]  # steps 90..98 are sealed; 99 is still open
    assert [e.step for e in first] == list(range(90, 99))
    assert all("loss" in e.metrics and e.dropped == 0 for e in first)
    _step(model, optimizer, ctl)
    assert next(stream).step == 99
    stream.cancel()
    error = rpc_error(lambda: next(stub.WatchMetrics(pb.WatchMetricsRequest(from_step=3), timeout=PATIENCE_S)))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "from_step 3 is gone" in error.details() and "oldest step" in error.details()
    oldest = stub.GetStatus(pb.GetStatusRequest()).oldest_event_step
    assert f"is {oldest} " in error.details()
    with LRClient(ctl.address) as client, pytest.raises(OutOfRangeError, match="from_step 3"):
        next(client.watch_metrics(from_step=3))
    _step(model, optimizer, ctl)  # training goes on


def test_watch_carries_changes_and_version_and_changes_only(job) -> None:  # type: ignore[no-untyped-def]
    model, optimizer, ctl, stub = job
    _step(model, optimizer, ctl)
    with LRClient(ctl.address) as client:
        everything = client.watch_metrics()
        changes = client.watch_metrics(changes_only=True)
        wait_for(lambda: client.status().watchers == 2, "two watchers")
        stub.SetLearningRates(pb.SetLearningRatesRequest(updates=[absolute("0.weight", 0.5)], wait=False))
        for _ in range(3):
            _step(model, optimizer, ctl)
        # Step 0's event was still open when they subscribed ("from now": the next
        # event sealed); step 3's is open until the job moves past it.
        seen = [next(everything) for _ in range(3)]
        assert [e.step for e in seen] == [0, 1, 2]
        assert [len(e.changes) for e in seen] == [0, 1, 0]
        record = seen[1].changes[0]
        assert (record.version, record.step, record.changes[0].new_lr) == (1, 1, 0.5)
        assert [e.version for e in seen] == [0, 1, 1]
        only = next(changes)
        assert only.step == 1 and only.changes[0].change_id == record.change_id
        everything.close()
        changes.close()
        wait_for(lambda: client.status().watchers == 0, "the closed streams to be forgotten")


def test_a_checkpoint_load_to_an_earlier_step_starts_its_events_afresh(job) -> None:  # type: ignore[no-untyped-def]
    """A job that loads an earlier checkpoint (a rollback, PBT's exploit): the stream
    gets each step once on each side of the load, with the values reported there; the
    event open at the load is sealed with its own values, not merged with later ones."""
    model, optimizer, ctl, stub = job
    checkpoint = None
    for k in range(8):
        if k == 4:
            checkpoint = optimizer.state_dict()  # at step 4
        ctl.report(float(k))
        _step(model, optimizer)
    optimizer.load_state_dict(checkpoint)
    assert ctl.step == 4
    for k in range(3):
        ctl.report(100.0 + k)
        _step(model, optimizer)
    ctl.report(200.0)  # step 7's, after the load
    _step(model, optimizer)
    stream = stub.WatchMetrics(pb.WatchMetricsRequest(from_step=0), timeout=PATIENCE_S)
    seen = []
    for event in stream:
        seen.append((event.step, event.metrics["loss"]))
        if len(seen) == 11:
            break
    stream.cancel()
    assert seen == [*((k, float(k)) for k in range(8)), (4, 100.0), (5, 101.0), (6, 102.0)]


def test_bad_watch_requests_and_the_watcher_caps(serving) -> None:  # type: ignore[no-untyped-def]
    model, optimizer = _tiny()
    limits = WatchLimits(max_watchers=3, max_watchers_per_connection=2)
    with attach(model, optimizer, address="127.0.0.1:0", watch_limits=limits) as ctl:
        channel = grpc.insecure_channel(ctl.address)
        stub = pb_grpc.LearningRateControlStub(channel)
        for request, fragment in ((pb.WatchMetricsRequest(from_step=-4), "from_step -4"),
                                  (pb.WatchMetricsRequest(max_changes_per_record=-1), "max_changes_per_record -1")):
            error = rpc_error(lambda: next(stub.WatchMetrics(request, timeout=PATIENCE_S)))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in error.details()
        with LRClient(ctl.address) as client, pytest.raises(InvalidArgumentError, match="from_step -4"):
            next(client.watch_metrics(from_step=-4))
        open_ = [stub.WatchMetrics(pb.WatchMetricsRequest(), timeout=PATIENCE_S) for _ in range(2)]
        wait_for(lambda: len(ctl.service.watchers) == 2, "two watchers")
        error = rpc_error(lambda: next(stub.WatchMetrics(pb.WatchMetricsRequest(), timeout=PATIENCE_S)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_watchers_per_connection 2" in error.details()
        other = grpc.insecure_channel(ctl.address, options=[("grpc.use_local_subchannel_pool", 1)])
        third = pb_grpc.LearningRateControlStub(other).WatchMetrics(pb.WatchMetricsRequest(), timeout=PATIENCE_S)
        wait_for(lambda: len(ctl.service.watchers) == 3, "a third watcher")
        error = rpc_error(lambda: next(pb_grpc.LearningRateControlStub(other).WatchMetrics(
            pb.WatchMetricsRequest(), timeout=PATIENCE_S)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_watchers 3" in error.details()
        _step(model, optimizer, ctl)  # training goes on
        for call in (*open_, third):
            call.cancel()
        wait_for(lambda: len(ctl.service.watchers) == 0, "cancelled watchers to be forgotten")
        other.close()
        channel.close()


def test_watch_needs_only_the_reader_role(serving) -> None:  # type: ignore[no-untyped-def]
    model, optimizer = _tiny()
    tokens = Tokens([Token("alice", ADMIN, "a" * 32), Token("bob", READER, "b" * 32)])
    with attach(model, optimizer, address="127.0.0.1:0", tokens=tokens) as ctl:
        with LRClient(ctl.address, token="b" * 32) as client:
            stream = client.watch_metrics()
            wait_for(lambda: client.status().watchers == 1, "the reader's watcher")
            _step(model, optimizer, ctl)
            _step(model, optimizer, ctl)
            assert next(stream).step == 0
            stream.close()


def _events(stream, batched: bool) -> Iterator[pb.MetricsEvent]:  # type: ignore[no-untyped-def]
    """The events of a WatchMetrics or a WatchMetricsBatched stream, one by one."""
    for message in stream:
        yield from (message.events if batched else (message,))


@pytest.mark.parametrize("method", ["WatchMetrics", "WatchMetricsBatched"])
def test_a_slow_subscriber_loses_the_oldest_and_is_told_how_many(serving, method) -> None:  # type: ignore[no-untyped-def]
    """A stream that is never read while training runs on: training is not held up,
    the stream's queue drops its oldest events, and each event it then gets says how
    many were lost right before it (the gap in steps)."""
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    limits = WatchLimits(queue_events=8, queue_bytes=1 << 20)
    with attach(model, optimizer, address="127.0.0.1:0", events=100_000, events_max_bytes=1 << 30,
                watch_limits=limits) as ctl:
        channel = grpc.insecure_channel(ctl.address)
        stream = getattr(pb_grpc.LearningRateControlStub(channel), method)(
            pb.WatchMetricsRequest(), timeout=10 * PATIENCE_S)
        wait_for(lambda: len(ctl.service.watchers) == 1, "the watcher")
        # In-process, the stream's state is here; with a serving process it is there,
        # and the client's own count (told, per gap) is what is checked.
        (sub,) = ctl.service.watchers if serving == "inprocess" else (None,)
        # Big events (~10 KB: 128 long-named metrics) fill the transport's buffers, so
        # that the queue behind them overflows while nobody reads.
        names = [f"metric_{i:03d}_" + "x" * 50 for i in range(128)]
        steps = 3000
        for step in range(steps):
            ctl.report(step=step, **{n: float(step) for n in names[:64]})
            ctl.report(step=step, **{n: float(step) for n in names[64:]})
            optimizer.step()
        if sub is not None:
            wait_for(lambda: sub.lost > 0, "the slow stream to lose events")
        ctl.report(step=steps)  # seals the last step
        received, told, previous = 0, 0, -1
        for event in _events(stream, method == "WatchMetricsBatched"):
            assert event.step - previous - 1 == event.dropped, (previous, event.step, event.dropped)
            told += event.dropped
            received += 1
            previous = event.step
            if event.step == steps - 1:
                break
        stream.cancel()
        assert told > 0 and received + told == steps
        assert sub is None or told == sub.lost
        channel.close()


def test_a_vanished_subscriber_is_cleaned_up(job, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, optimizer, ctl, stub = job
    script = textwrap.dedent(f"""
        from lrctl.client import LRClient
        stream = LRClient({ctl.address!r}).watch_metrics()
        print("watching", flush=True)
        for event in stream:
            pass
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "watching"
        wait_for(lambda: len(ctl.service.watchers) == 1, "the subprocess's watcher")
        proc.kill()
        proc.wait(PATIENCE_S)
        for _ in range(5):
            _step(model, optimizer, ctl)  # training goes on
        wait_for(lambda: len(ctl.service.watchers) == 0, "the killed watcher to be cleaned up")
        assert ctl.telemetry.wake is None  # nobody to wake: the training thread wakes no one
    finally:
        if proc.poll() is None:
            proc.kill()


def test_four_subscribers_see_the_same_events(serving) -> None:  # type: ignore[no-untyped-def]
    """Four streams, one of them from a kept step and one asking for statistics: each
    gets the same events (statistics only where asked), none lost."""
    model, optimizer = _tiny()
    with attach(model, optimizer, address="127.0.0.1:0", stats_every=1, stats=("grad_norm",)) as ctl:
        channel = grpc.insecure_channel(ctl.address)
        stub = pb_grpc.LearningRateControlStub(channel)
        for _ in range(2):
            _step(model, optimizer, ctl)  # steps 0, 1 (1 still open)
        requests = [pb.WatchMetricsRequest(), pb.WatchMetricsRequest(), pb.WatchMetricsRequest(include_stats=True),
                    pb.WatchMetricsRequest(from_step=1)]
        streams = [stub.WatchMetrics(r, timeout=PATIENCE_S) for r in requests]
        wait_for(lambda: len(ctl.service.watchers) == 4, "four watchers")
        stub.SetLearningRates(pb.SetLearningRatesRequest(updates=[absolute("0.weight", 0.5)], wait=False))
        for _ in range(6):
            _step(model, optimizer, ctl)  # seals steps 1..6
        seen = [[next(stream) for _ in range(6)] for stream in streams]
        for stream in streams:
            stream.cancel()
        assert [e.step for e in seen[0]] == list(range(1, 7))
        assert seen[0] == seen[1] == seen[3]  # the from_step one joined the live part without a gap
        assert all(e.stats and e.dropped == 0 for e in seen[2])
        for e in seen[2]:
            e.ClearField("stats")
        assert seen[2] == seen[0] and not any(e.stats for e in seen[0])
        assert sum(len(e.changes) for e in seen[0]) == 1
        wait_for(lambda: len(ctl.service.watchers) == 0, "the cancelled streams to be forgotten")
        assert ctl.telemetry.wake is None
        _step(model, optimizer, ctl)  # training goes on
        channel.close()


def test_batched_streams_carry_the_same_events_several_to_a_message(serving) -> None:  # type: ignore[no-untyped-def]
    """WatchMetricsBatched beside WatchMetrics: the same events, in order; with a
    serving process a fast job's events come several to a message. A reader that falls
    behind by megabytes gets them back in messages of at most BATCH_BYTES (+ one event)."""
    model, optimizer = _tiny()
    padding = [{f"metric_{k:03d}_" + "x" * 50: float(k) for k in range(h, h + 63)} for h in (0, 63)]  # ~10 KB
    with attach(model, optimizer, address="127.0.0.1:0", stats_every=1, stats=("grad_norm",)) as ctl:
        channel = grpc.insecure_channel(ctl.address)
        stub = pb_grpc.LearningRateControlStub(channel)
        single = stub.WatchMetrics(pb.WatchMetricsRequest(include_stats=True), timeout=PATIENCE_S)
        batched = stub.WatchMetricsBatched(pb.WatchMetricsRequest(include_stats=True), timeout=PATIENCE_S)
        wait_for(lambda: len(ctl.service.watchers) == 2, "two watchers")
        stub.SetLearningRates(pb.SetLearningRatesRequest(updates=[absolute("0.weight", 0.5)], wait=False))
        for _ in range(400):  # ~4 MB, read only afterwards
            _step(model, optimizer, ctl)
            ctl.report(**padding[0])
            ctl.report(**padding[1])
        _step(model, optimizer, ctl)  # seals step 400
        last = ctl.step - 2
        singles = _read_until(single, last)
        messages, events = [], []
        for message in batched:
            messages.append(message)
            events.extend(message.events)
            if events[-1].step >= last:
                break
        single.cancel()
        batched.cancel()
        assert events == singles and sum(e.dropped for e in events) == 0
        assert [e.step for e in events] == list(range(events[0].step, last + 1))
        assert sum(len(e.changes) for e in events) == 1 and all(e.stats for e in events)
        largest = max(e.ByteSize() for e in events)
        assert all(m.events and (len(m.events) == 1 or m.ByteSize() <= BATCH_BYTES + largest) for m in messages)
        if serving == "process":
            assert max(len(m.events) for m in messages) > 1
        channel.close()


def test_runs_split_by_bytes_in_order() -> None:
    assert list(runs([], len)) == []
    assert list(runs([b"ab", b"cd", b"e"], len, limit=4)) == [[b"ab", b"cd"], [b"e"]]
    assert list(runs([b"abcdef", b"a", b"bcdefgh", b"c"], len, limit=4)) == [[b"abcdef"], [b"a"], [b"bcdefgh"], [b"c"]]
    assert list(runs([b"a"] * 5, len, limit=2)) == [[b"a", b"a"]] * 2 + [[b"a"]]


def test_the_client_reads_a_worker_without_the_batched_method() -> None:
    """An older worker (WatchMetrics only, here a bare gRPC server of lrctl's messages):
    LRClient.watch_metrics falls back to it, once, and reads every event."""

    def watch(request: pb.WatchMetricsRequest, context: grpc.ServicerContext) -> Iterator[pb.MetricsEvent]:
        yield from (pb.MetricsEvent(step=s, version=1, metrics={"loss": 1.0 / (s + 1)}) for s in range(3))

    server = grpc.server(ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("lrctl.v1.LearningRateControl", {
        "WatchMetrics": grpc.unary_stream_rpc_method_handler(
            watch, request_deserializer=pb.WatchMetricsRequest.FromString,
            response_serializer=pb.MetricsEvent.SerializeToString)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with LRClient(f"127.0.0.1:{port}") as client:
            events = list(client.watch_metrics(timeout=PATIENCE_S))
        assert [(e.step, e.metrics["loss"]) for e in events] == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    finally:
        server.stop(None)


def test_the_training_process_sends_each_event_once_whatever_the_streams(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With a serving process: nothing is sent while nobody watches; then each event
    once for all four streams, by the training thread itself (no wakeup of a loop per
    event; what this fast job sealed last before it paused, by the loop's timer);
    statistics encoded only while a stream asks for them."""
    monkeypatch.setenv("LRCTL_SERVING", "process")
    model, optimizer = _tiny()
    with attach(model, optimizer, address="127.0.0.1:0", stats_every=1, stats=("grad_norm",)) as ctl:
        feed = ctl._server._feed
        sent: list[tuple] = []
        threads: set[str] = set()
        encode = feed._event

        def counting(*args: Any) -> tuple:
            event = encode(*args)
            sent.append(event)
            threads.add(threading.current_thread().name)
            return event

        feed._event = counting
        for _ in range(3):
            _step(model, optimizer, ctl)
        assert sent == [] and ctl.telemetry.wake is None  # nobody watches: nothing at all
        channel = grpc.insecure_channel(ctl.address)
        stub = pb_grpc.LearningRateControlStub(channel)
        streams = [stub.WatchMetrics(pb.WatchMetricsRequest(include_stats=k == 0), timeout=PATIENCE_S)
                   for k in range(4)]
        wait_for(lambda: len(ctl.service.watchers) == 4, "four watchers")
        sent.clear(), threads.clear()
        frames = feed.frames
        for _ in range(10):
            _step(model, optimizer, ctl)
        seen = [[next(stream) for _ in range(10)] for stream in streams]
        assert [e.step for e in seen[1]] == list(range(2, 12))  # step 2 was still open
        seqs = [event[0] for event in sent]
        assert len(seqs) == len(set(seqs)) == feed.frames - frames == 10
        assert threading.current_thread().name in threads and len(threads) <= 2
        assert all(event[8] for event in sent)  # statistics: one stream asks
        assert all(e.stats for e in seen[0]) and not any(e.stats for e in seen[1])
        streams[0].cancel()
        wait_for(lambda: len(ctl.service.watchers) == 3, "the statistics stream to be forgotten")
        before = len(sent)
        for _ in range(3):
            _step(model, optimizer, ctl)
        assert [next(streams[1]).step for _ in range(3)] == [12, 13, 14]
        later = sent[before:]
        assert later and not any(event[8] for event in later)  # nobody asks: none encoded
        for stream in streams[1:]:
            stream.cancel()
        wait_for(lambda: ctl.telemetry.wake is None, "the feed to stop")
        channel.close()


def test_a_fast_job_sends_its_events_in_batches_and_a_pause_holds_none_back(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With a serving process, a job stepping faster than the feed's batch period sends
    several events a send; when it pauses, the events it sealed last still reach the
    stream (the loop's timer sends them), each step once, in order."""
    monkeypatch.setenv("LRCTL_SERVING", "process")
    model, optimizer = _tiny()
    with attach(model, optimizer, address="127.0.0.1:0") as ctl:
        feed = ctl._server._feed
        channel, stream = _watch_one(ctl)
        first = ctl.step
        for _ in range(40):  # ~1 ms steps: many within one batch period
            _step(model, optimizer, ctl)
        seen = _read_until(stream, ctl.step - 2)  # the last sealed event: sent while paused
        _each_step_once(seen, first, ctl.step - 2)
        assert not any(e.dropped for e in seen)
        assert feed.frames >= 39 and feed.sends < feed.frames / 2
        channel.close()


def test_a_job_that_keeps_stepping_sends_its_own_events_not_the_loop(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A job stepping every ~30 ms (within the batch period, sending every other step):
    the loop's timer for paused jobs leaves its events to the training thread (each send
    the loop made would take the GIL from training), and sends only the last ones once
    the job stops."""
    monkeypatch.setenv("LRCTL_SERVING", "process")
    model, optimizer = _tiny()
    with attach(model, optimizer, address="127.0.0.1:0") as ctl:
        feed = ctl._server._feed
        by_thread: dict[str, int] = {}
        write = feed._write

        def counting(frame: bytes, events: int = 0) -> bool:
            name = threading.current_thread().name
            by_thread[name] = by_thread.get(name, 0) + events
            return write(frame, events)

        feed._write = counting
        channel, stream = _watch_one(ctl)
        first = ctl.step
        for _ in range(40):
            _step(model, optimizer, ctl)
            time.sleep(0.03)
        seen = _read_until(stream, ctl.step - 2)
        _each_step_once(seen, first, ctl.step - 2)
        ours = by_thread.get(threading.current_thread().name, 0)
        assert ours >= 30 and sum(by_thread.values()) - ours <= 10, by_thread
        channel.close()


def test_with_a_lockstep_controller_each_event_is_sent_as_it_is_sealed(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A lockstep controller may wait for each step's event: while one is attached, the
    feed sends every event at once, whatever the job's pace."""
    monkeypatch.setenv("LRCTL_SERVING", "process")
    model, optimizer = _tiny()
    with attach(model, optimizer, address="127.0.0.1:0") as ctl, LRClient(ctl.address) as client:
        feed = ctl._server._feed
        channel, stream = _watch_one(ctl)
        _step(model, optimizer, ctl)  # past step 0, which every=1e9 would hold at
        with client.lockstep(every=1_000_000_000, timeout=1.0):  # attached, never holds here
            wait_for(lambda: ctl.controller.lockstep_attached, "lockstep")
            _step(model, optimizer, ctl)
            sends = feed.sends
            for k in range(1, 21):
                _step(model, optimizer, ctl)
                assert feed.sends == sends + k and feed._cursor == ctl.telemetry.last_seq
        assert _read_until(stream, ctl.step - 2)[-1].step == ctl.step - 2
        channel.close()


def _watch_one(ctl) -> tuple[grpc.Channel, Any]:  # type: ignore[no-untyped-def]
    """A channel and one WatchMetrics stream (from now) on `ctl`, once the worker counts it."""
    channel = grpc.insecure_channel(ctl.address)
    stream = pb_grpc.LearningRateControlStub(channel).WatchMetrics(pb.WatchMetricsRequest(), timeout=PATIENCE_S)
    wait_for(lambda: len(ctl.service.watchers) == 1, "the watcher")
    return channel, stream


def _read_until(stream, step: int) -> list[pb.MetricsEvent]:  # type: ignore[no-untyped-def]
    seen = []
    for event in stream:
        seen.append(event)
        if event.step >= step:
            return seen
    raise AssertionError(f"the stream ended before step {step}: {[e.step for e in seen]}")


def _each_step_once(seen: list[pb.MetricsEvent], first: int, last: int) -> None:
    """Every step from `first` to `last` was received once or counted as dropped."""
    steps = [e.step for e in seen]
    assert steps == sorted(set(steps)) and steps[0] >= first and steps[-1] == last
    assert len(steps) + sum(e.dropped for e in seen) == last - first + 1


def test_a_serving_process_that_falls_behind_costs_training_nothing(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The serving process stopped (SIGSTOP) while a stream is open: the feed's socket
    fills, training goes on (the send never blocks), events wait in the ring; resumed,
    the stream gets what the ring kept and counts the rest as dropped."""
    monkeypatch.setenv("LRCTL_SERVING", "process")
    monkeypatch.setattr("lrctl.server.serving_process._FEED_BUFFER", 4096)  # the kernel's least
    model, optimizer = _tiny()
    padding = {f"metric_{k:02d}": float(k) for k in range(40)}  # ~1 KB an event
    with attach(model, optimizer, address="127.0.0.1:0", events=64) as ctl:
        channel, stream = _watch_one(ctl)
        _step(model, optimizer, ctl)
        _step(model, optimizer, ctl)
        first = next(stream).step
        feed, pid = ctl._server._feed, ctl._server.process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            for _ in range(300):
                _step(model, optimizer, ctl)
                ctl.report(**padding)
            assert feed._tail  # the socket took part of a frame and waits for room
        finally:
            os.kill(pid, signal.SIGCONT)
        _step(model, optimizer, ctl)  # seals the last padded step
        last = ctl.step - 2
        seen = _read_until(stream, last)
        _each_step_once(seen, first + 1, last)
        assert sum(e.dropped for e in seen) >= 300 - 64 - 50  # the ring kept 64; the socket some
        _step(model, optimizer, ctl)
        assert next(stream).step == last + 1 and not feed._tail  # live again
        channel.close()


def test_events_on_a_device_are_sent_by_the_loop_in_order(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An event whose tensors are on a device (forced here: no GPU) is not read on the
    training thread; the loop thread sends it and what follows until it has caught up,
    and the stream still gets every step once, in order."""
    monkeypatch.setenv("LRCTL_SERVING", "process")
    monkeypatch.setattr(Event, "on_device", lambda self, stats: self.step % 3 == 0)
    model, optimizer = _tiny()
    with attach(model, optimizer, address="127.0.0.1:0") as ctl:
        feed = ctl._server._feed
        feed._batch_s = 0.0  # each event as it is sealed: the training thread meets each
        threads: list[str] = []
        encode = feed._event

        def noting(*args: Any) -> tuple:
            threads.append(threading.current_thread().name)
            return encode(*args)

        feed._event = noting
        channel, stream = _watch_one(ctl)
        first = ctl.step
        for _ in range(60):
            _step(model, optimizer, ctl)
        seen = _read_until(stream, ctl.step - 2)
        _each_step_once(seen, first, ctl.step - 2)
        assert not any(e.dropped for e in seen)
        assert threading.current_thread().name in threads and len(set(threads)) == 2
        channel.close()


def test_streams_opened_while_training_runs_get_each_step_once(serving) -> None:  # type: ignore[no-untyped-def]
    """Streams open (from now, and from a kept step) while another thread trains without
    pause: each sees every step from its start once, nothing dropped (the start and the
    live events join by seq, whichever comes first)."""
    model, optimizer = _tiny()
    with attach(model, optimizer, address="127.0.0.1:0") as ctl:
        if serving == "process":  # a start that comes late: the feed's events go first
            feed = ctl._server._feed
            send = feed._send

            def late(frame: tuple) -> None:
                if frame[0] == "B":
                    time.sleep(0.02)
                send(frame)

            feed._send = late
        stop = threading.Event()

        def train() -> None:
            while not stop.is_set():
                _step(model, optimizer, ctl)
                time.sleep(0.0005)

        trainer = threading.Thread(target=train, daemon=True)
        channel = grpc.insecure_channel(ctl.address)
        stub = pb_grpc.LearningRateControlStub(channel)
        trainer.start()
        try:
            for k in range(6):
                wait_for(lambda: ctl.step > 20 * (k + 1), "training to go on")
                from_step = ctl.step - 10 if k % 2 else None
                request = pb.WatchMetricsRequest() if from_step is None else pb.WatchMetricsRequest(from_step=from_step)
                stream = stub.WatchMetrics(request, timeout=PATIENCE_S)
                seen = [next(stream) for _ in range(30)]
                stream.cancel()
                steps = [e.step for e in seen]
                assert steps == list(range(steps[0], steps[0] + 30)), steps
                assert from_step is None or steps[0] == from_step
                assert not any(e.dropped for e in seen)
        finally:
            stop.set()
            trainer.join()
        channel.close()


def test_a_late_start_keeps_at_most_a_queue_of_bytes_and_counts_the_rest_dropped() -> None:
    """serving=process: while a new stream's start is on its way (held for 200 steps of
    60 metrics each, ~10 KB an event, against a queue of 64 KiB), the stream loses the
    oldest events, counts them as dropped on its first event, and goes on with every
    step. (The early buffer's own bound is the next test's.)"""
    model, optimizer = _tiny()
    limits = WatchLimits(queue_bytes=64 * 1024)
    with attach(model, optimizer, address="127.0.0.1:0", serving="process", watch_limits=limits) as ctl:
        feed = ctl._server._feed
        feed._batch_s = 0.0  # all 200 events reach the serving process before the start
        send, asked = feed._send, threading.Event()
        wide_until = ctl.step + 200

        def late(frame: tuple) -> None:  # on the link's thread: the start waits for 200 steps
            if frame[0] == "B":
                asked.set()
                wait_for(lambda: ctl.step >= wide_until, "200 steps before the start goes out")
            send(frame)

        feed._send = late
        channel = grpc.insecure_channel(ctl.address)
        stream = pb_grpc.LearningRateControlStub(channel).WatchMetrics(pb.WatchMetricsRequest(), timeout=PATIENCE_S)
        seen: list[pb.MetricsEvent] = []

        def read() -> None:
            try:
                for event in stream:
                    seen.append(event)
            except grpc.RpcError:  # cancelled at the end
                pass

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert asked.wait(PATIENCE_S)
        wide = {f"m{i:03d}": float(i) for i in range(60)}  # ~10 KB an event, as estimated
        while ctl.step < wide_until:
            _step(model, optimizer)
            ctl.report(**wide, step=ctl.step - 1)
        for _ in range(40):  # small events now: the stream's queue holds them all
            _step(model, optimizer, ctl)
            time.sleep(0.002)
        wait_for(lambda: len(seen) >= 30, "the stream to go on")
        stream.cancel()
        reader.join(PATIENCE_S)
        channel.close()
    kept = 64 * 1024 // (60 * (160 + 4))  # events the buffer's bytes hold, about
    assert seen[0].dropped >= 200 - 2 * kept
    assert seen[0].step >= wide_until - 2 * kept
    steps = [e.step for e in seen]
    assert steps == list(range(steps[0], steps[0] + len(steps)))
    assert not any(e.dropped for e in seen[1:])


def test_the_feed_events_kept_for_a_starting_stream_are_bounded_in_bytes() -> None:
    """The serving process keeps a starting stream's feed events until its start comes,
    within the stream's queue bounds, bytes included: 200 events of ~10 KB against 64 KiB
    keep the newest few, the rest counted as lost."""
    from lrctl.server.serving_main import _Watch

    limits = WatchLimits(queue_bytes=64 * 1024)
    watch = _Watch(None, limits, None)  # type: ignore[arg-type]  # feed() needs no link
    sub = Subscriber("peer", "", min_step=None, changes_only=False, include_stats=False,
                     cursor=0, limits=limits)
    watch.keep_early(sub)  # as a stream does while its start is on the way
    early = watch._early[sub]
    for seq in range(1, 201):
        watch.feed((seq, seq, 0.0, 1, {}, False, 10_000, {}, b""))
    kept = early.queued()
    assert sum(e.size for e in kept) <= 64 * 1024 and len(kept) == 64 * 1024 // 10_000
    assert [e.seq for e in kept] == list(range(201 - len(kept), 201)) and early.lost == 200 - len(kept)


# -- CLI -----------------------------------------------------------------------------


def _interrupt(proc: subprocess.Popen) -> tuple[str, str]:
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=PATIENCE_S)
    return out, err


def test_cli_watch_json_lines_parse_and_ctrl_c_exits_0(job) -> None:  # type: ignore[no-untyped-def]
    model, optimizer, ctl, stub = job
    proc = subprocess.Popen([*LRCTL, "--address", ctl.address, "watch", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(ctl.service.watchers) == 1, "lrctl watch to subscribe")
        stub.SetLearningRates(pb.SetLearningRatesRequest(updates=[absolute("1.bias", 0.25)], wait=False))
        for _ in range(4):
            _step(model, optimizer, ctl)
        lines = [proc.stdout.readline() for _ in range(3)]  # type: ignore[union-attr]
    finally:
        out, err = _interrupt(proc)
    assert proc.returncode == 0 and err == ""
    events = [json.loads(line) for line in lines + out.splitlines()]
    first = events[0]
    assert set(first) == {"step", "time", "version", "metrics", "changes", "dropped"}
    assert isinstance(first["step"], int) and isinstance(first["time"], float)
    assert first["version"] == 1 and first["dropped"] == 0 and isinstance(first["metrics"]["loss"], float)
    assert first["changes"][0]["changes"][0]["new_lr"] == 0.25
    assert set(events[1]) == {"step", "time", "version", "metrics", "dropped"}
    assert [e["step"] for e in events[:3]] == [first["step"], first["step"] + 1, first["step"] + 2]


def test_cli_watch_with_stats_and_from_step_and_its_errors(serving) -> None:  # type: ignore[no-untyped-def]
    model, optimizer = _tiny()
    with attach(model, optimizer, address="127.0.0.1:0", stats_every=1, stats=("grad_norm",)) as ctl:
        for _ in range(3):
            _step(model, optimizer, ctl)
        proc = subprocess.Popen([*LRCTL, "--address", ctl.address, "watch", "--stats", "--from-step", "1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = [proc.stdout.readline() for _ in range(4)]  # type: ignore[union-attr]
        out, err = _interrupt(proc)
        assert proc.returncode == 0 and err == ""
        assert lines[0].startswith("step 1  v0  loss=")
        assert lines[1].startswith("  0.bias: grad_norm=")
        gone = subprocess.run([*LRCTL, "--address", ctl.address, "watch", "--from-step", "-2"],
                              capture_output=True, text=True, timeout=60)
        assert gone.returncode == 2 and "negative" in gone.stderr
        # The worker goes away under a running watch: one line, non-zero.
        proc = subprocess.Popen([*LRCTL, "--address", ctl.address, "watch"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: len(ctl.service.watchers) == 1, "lrctl watch to subscribe")
    out, err = proc.communicate(timeout=PATIENCE_S)
    assert proc.returncode == 3, err
    assert len(err.splitlines()) == 1 and err.startswith("lrctl: error: ") and "Traceback" not in err


def test_cli_history_follow_sees_a_change_made_while_it_runs(job) -> None:  # type: ignore[no-untyped-def]
    model, optimizer, ctl, stub = job
    stub.SetLearningRates(pb.SetLearningRatesRequest(updates=[absolute("0.bias", 0.125)], wait=False))
    _step(model, optimizer, ctl)
    proc = subprocess.Popen([*LRCTL, "--address", ctl.address, "history", "--follow"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        header = proc.stdout.readline()  # type: ignore[union-attr]
        assert header.split()[:3] == ["CHANGE", "STEP", "VERSION"]
        assert "0.bias=0.125" in proc.stdout.readline()  # type: ignore[union-attr]
        stub.SetLearningRates(pb.SetLearningRatesRequest(updates=[absolute("1.weight", 0.375)],
                                                         reason="live", wait=False))
        _step(model, optimizer, ctl)
        _step(model, optimizer, ctl)
        row = proc.stdout.readline()  # type: ignore[union-attr]
    finally:
        out, err = _interrupt(proc)
    assert proc.returncode == 0 and err == "", err
    assert row.split()[:3] == ["2", "1", "2"] and "1.weight=0.375" in row and "live" in row


def test_prometheus_shows_the_last_reported_scalars() -> None:
    import urllib.request

    model, optimizer = _tiny()
    with attach(model, optimizer, serve=False, metrics_address="127.0.0.1:0") as ctl:
        ctl.report(torch.tensor(1.5), acc=0.25)
        ctl.report(2.5, nan=float("nan"))
        with urllib.request.urlopen(f"http://{ctl.metrics_address}/metrics", timeout=PATIENCE_S) as reply:
            text = reply.read().decode()
    assert 'lrctl_reported{metric="loss"} 2.5' in text
    assert 'lrctl_reported{metric="acc"} 0.25' in text
    assert 'lrctl_reported{metric="nan"} NaN' in text


def test_a_report_for_a_step_already_passed_is_an_event_of_its_own() -> None:
    model, optimizer = _tiny()
    with attach(model, optimizer, serve=False, events=4) as ctl:
        for _ in range(3):
            _step(model, optimizer, ctl)  # steps 0, 1, 2 (2 still open)
        ctl.report(7.0, step=0)
        newest = ctl.telemetry.after(0)[0][-1]
        assert (newest.step, newest.metrics()) == (0, {"loss": 7.0})
        for _ in range(10):
            _step(model, optimizer, ctl)
        telemetry = ctl.telemetry
        events, _ = telemetry.after(0)
        assert len(events) == 4 and telemetry.bytes == sum(e.size for e in events)
        assert [e.step for e in events] == [8, 9, 10, 11]
