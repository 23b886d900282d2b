"""The durable audit log, failed-change records, dropped-history reports, the history's
byte bound, and SIGTERM/SIGKILL of a worker process.

Real parts only: real optimizers under lrctl, real gRPC on 127.0.0.1 port 0, the CLI
and demo worker as subprocesses, real files (fsync included); no timing assertions.
"""

from __future__ import annotations

import dataclasses

import gc
import json
import os
import re
import signal
import subprocess
import sys
import threading
import tracemalloc
from array import array
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from conftest import (
    PATIENCE_S,
    Served,
    absolute,
    per_parameter_optimizer,
    rpc_error,
    seed_model,
    wait_for,
)
from lrctl.client.client import LRClient
from lrctl.client.errors import FailedPreconditionError
from lrctl.server import attach
from lrctl.server.history import History, Record, record_bytes
from lrctl.server.planner import plan_change
from lrctl.server.rates import RateState, ScheduleBook
from lrctl.server.requests import ChangeRequest, Mode, Update
from lrctl.v1 import lrctl_pb2 as pb

LRCTL = [sys.executable, "-m", "lrctl.client.cli"]
T = 30


def lines(path: Path) -> list[dict[str, Any]]:
    """The complete records of an audit log file (each line must parse)."""
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "the log ends with a cut line"
    return [json.loads(line) for line in text.splitlines()]


def cli(*args: str, address: str | None = None) -> subprocess.CompletedProcess[str]:
    prefix = ["--address", address] if address else []
    return subprocess.run([*LRCTL, *prefix, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def audited(tmp_path: Path) -> Iterator[Served]:
    """The seed model served with an audit log at tmp_path/audit.jsonl; no training."""
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    ctl = attach(model, optimizer, address="127.0.0.1:0", audit_log=tmp_path / "audit.jsonl")
    served = Served(model, optimizer, ctl)
    try:
        yield served
    finally:
        served.close()


def set_request(*updates: pb.LearningRateUpdate, **options: Any) -> pb.SetLearningRatesRequest:
    return pb.SetLearningRatesRequest(updates=list(updates), **options)


# -- durability -------------------------------------------------------------------


def test_a_waiting_set_is_answered_after_its_line_is_in_the_file(audited: Served, tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    for k in range(5):
        future = audited.stub.SetLearningRates.future(
            set_request(absolute("layer1.bias", 0.5 + k), wait=True, reason=f"r{k}"), timeout=T)
        wait_for(lambda: audited.controller.pending_count == 1, "the change to be queued")
        audited.step()
        reply = future.result()
        # Read right after the reply: the record was written and fsynced before it.
        last = lines(log)[-1]
        assert (last["change_id"], last["version"], last["step"]) == (reply.change_id, reply.version, reply.step)
        assert last["status"] == "" and last["reason"] == f"r{k}"
        assert last["changes"] == [{"name": "layer1.bias", "lr": [0.1 if k == 0 else 0.5 + k - 1, 0.5 + k],
                                    "base": [0.1 if k == 0 else 0.5 + k - 1, 0.5 + k]}]
        assert last["updates"] == [{"selector": "layer1.bias", "mode": "absolute", "value": 0.5 + k,
                                    "target": "base"}]
        assert last["run_id"] == audited.controller.run_id and last["peer"].startswith("ipv")
    assert [r["version"] for r in lines(log)] == [1, 2, 3, 4, 5]


def test_attach_reads_the_audit_log_path_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "env.jsonl"
    monkeypatch.setenv("LRCTL_AUDIT_LOG", str(path))
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    with attach(model, optimizer, serve=False) as ctl:
        pending, _ = ctl.controller.submit(ChangeRequest((Update("layer2.bias", 0.75),)))
        optimizer.step()
        assert pending.finished.wait(PATIENCE_S) and pending.outcome is not None
    assert [(r["version"], r["changes"][0]["lr"]) for r in lines(path)] == [(1, [1.0, 0.75])]


def test_a_disk_that_fails_gets_data_loss_saying_the_change_was_applied() -> None:
    """/dev/full accepts the open and fails every write: the change stands (it is in the
    optimizer), and its waiting caller is told exactly that."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    ctl = attach(model, optimizer, address="127.0.0.1:0", audit_log="/dev/full")
    served = Served(model, optimizer, ctl)
    try:
        future = served.stub.SetLearningRates.future(
            set_request(absolute("layer1.weight", 0.25), wait=True), timeout=T)
        wait_for(lambda: served.controller.pending_count == 1, "the change to be queued")
        served.step()
        err = rpc_error(future.result)
        assert err.code() == grpc.StatusCode.DATA_LOSS
        assert "WAS applied at step 0" in err.details() and "/dev/full" in err.details()
        assert served.rates()["layer1.weight"] == 0.25
        served.step(2)  # training goes on
        # The CLI: one line, exit 1.
        wait_cli = subprocess.Popen([*LRCTL, "--address", ctl.address, "set", "layer1.bias=0.5"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: served.controller.pending_count == 1, "the CLI's change to be queued")
        served.step()
        out, errtext = wait_cli.communicate(timeout=120)
        assert wait_cli.returncode == 1, errtext
        assert errtext.count("\n") == 1 and "WAS applied at step 3" in errtext
    finally:
        served.close()


def test_the_log_rotates_by_size_and_lrctl_history_reads_the_rotated_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    # Every line is longer than 300 bytes: each record starts a new file; 2 are kept.
    with attach(model, optimizer, serve=False, audit_log=path, audit_max_bytes=300, audit_keep=2) as ctl:
        for k in range(6):
            pending, _ = ctl.controller.submit(ChangeRequest((Update("layer1.bias", 0.5 + k),), reason=f"r{k}"))
            optimizer.step()
            assert pending.finished.wait(PATIENCE_S) and pending.outcome is not None
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert [r["version"] for r in lines(tmp_path / "audit.jsonl.2")] == [4]
    assert [r["version"] for r in lines(tmp_path / "audit.jsonl.1")] == [5]
    assert [r["version"] for r in lines(path)] == [6]
    done = cli("history", "--file", str(path), "--json")
    assert done.returncode == 0 and done.stderr == ""
    assert [(r["version"], r["reason"]) for r in json.loads(done.stdout)] == [(4, "r3"), (5, "r4"), (6, "r5")]


def test_history_file_reports_a_torn_last_line_and_a_restart_keeps_it_apart(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    model = seed_model()
    optimizer = per_parameter_optimizer(model)

    def run(value: float) -> None:
        with attach(model, optimizer, serve=False, audit_log=path) as ctl:
            pending, _ = ctl.controller.submit(ChangeRequest((Update("layer2.weight", value),), reason="\x1b[2Jclear"))
            optimizer.step()
            assert pending.finished.wait(PATIENCE_S)

    run(0.5)
    whole = path.read_bytes()
    with open(path, "ab") as f:  # a crash in the middle of the next line
        f.write(whole[: len(whole) // 2])
    done = cli("history", "--file", str(path))
    assert done.returncode == 0, done.stderr
    assert "layer2.weight=0.5" in done.stdout and "applied" in done.stdout
    assert "\x1b" not in done.stdout and "\\x1b[2Jclear" in done.stdout  # escaped, not sent raw
    assert done.stderr.count("\n") == 1
    assert re.match(r"lrctl: note: the last line of .*audit\.jsonl \(line 2\) is incomplete", done.stderr)
    # A worker that starts again on the same file keeps the cut line on a line of its own.
    run(0.25)
    done = cli("history", "--file", str(path), "--json")
    assert done.returncode == 0
    assert [r["updates"][0]["value"] for r in json.loads(done.stdout)] == [0.5, 0.25]
    assert "line 2 of" in done.stderr and "not a complete record" in done.stderr
    # No log at all: one line, exit 2 (a local file, like --token-file).
    done = cli("history", "--file", str(tmp_path / "missing.jsonl"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "no audit log" in done.stderr


# -- failed changes are recorded ----------------------------------------------------


def test_a_no_wait_change_refused_at_its_step_is_recorded_as_failed(audited: Served, tmp_path: Path) -> None:
    """expected_version 0 held at submit but not at its at_step: a failed record, with
    the version in force, in ListChanges, the CLI and the audit log."""
    late = audited.stub.SetLearningRates(
        set_request(absolute("layer1.weight", 0.3), expected_version=0, at_step=2, reason="late"), timeout=T)
    first = audited.stub.SetLearningRates(set_request(absolute("layer1.weight", 0.2)), timeout=T)
    audited.step(3)
    assert audited.rates()["layer1.weight"] == 0.2
    records = list(audited.stub.ListChanges(pb.ListChangesRequest(), timeout=T).changes)
    assert [(r.change_id, r.version, r.step, r.status) for r in records] == [
        (first.change_id, 1, 0, ""), (late.change_id, 1, 2, "FAILED_PRECONDITION")]
    failed = records[1]
    assert "expected_version 0" in failed.error and failed.num_changes == 0 and not failed.changes
    assert failed.at_step == 2 and failed.reason == "late"
    # after_version=1 returns what was recorded after the change that made version 1.
    reply = audited.stub.ListChanges(pb.ListChangesRequest(after_version=1), timeout=T)
    assert [r.change_id for r in reply.changes] == [late.change_id] and not reply.gap
    # The CLI shows it distinctly.
    done = cli("history", address=audited.ctl.address)
    assert done.returncode == 0
    header, applied, refused = done.stdout.splitlines()
    assert "STATUS" in header and "ERROR" in header
    assert " applied " in applied and "FAILED_PRECONDITION" in refused and "expected_version 0" in refused
    assert audited.ctl.audit is not None and audited.ctl.audit.flush(PATIENCE_S)
    logged = lines(tmp_path / "audit.jsonl")
    assert [(r["change_id"], r["version"], r["status"]) for r in logged] == [
        (first.change_id, 1, ""), (late.change_id, 1, "FAILED_PRECONDITION")]
    assert "expected_version 0" in logged[1]["error"] and logged[1]["changes"] == []


def test_paging_over_records_that_share_a_version(audited: Served) -> None:
    ids = []
    for k in range(4):  # four at_step changes that will all fail against version 1
        ids.append(audited.stub.SetLearningRates(
            set_request(absolute("layer2.bias", 0.1 * (k + 1)), expected_version=0, at_step=1), timeout=T).change_id)
    audited.stub.SetLearningRates(set_request(absolute("layer1.bias", 0.5)), timeout=T)
    audited.step(2)
    seen, token = [], ""
    while True:
        reply = audited.stub.ListChanges(pb.ListChangesRequest(page_size=2, page_token=token), timeout=T)
        seen += [(r.change_id, r.version, r.status) for r in reply.changes]
        token = reply.next_page_token
        if not token:
            break
    assert [s for _, _, s in seen] == [""] + ["FAILED_PRECONDITION"] * 4
    assert [c for c, _, _ in seen[1:]] == ids and {v for _, v, _ in seen} == {1}
    page = audited.stub.ListChanges(pb.ListChangesRequest(after_version=1, page_size=3), timeout=T)
    rest = audited.stub.ListChanges(
        pb.ListChangesRequest(after_version=1, page_size=3, page_token=page.next_page_token), timeout=T)
    assert [r.change_id for r in [*page.changes, *rest.changes]] == ids


def test_close_records_the_changes_it_drops_as_failed(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    ctl = attach(model, optimizer, address="127.0.0.1:0", audit_log=path)
    with LRClient(ctl.address, timeout=T) as client:
        queued = [client.set_learning_rates({"layer1.bias": 0.5 + k}, at_step=100 + k, wait=False)
                  for k in range(3)]
    ctl.close(grace=1)
    records, _, _ = ctl.controller.history(0, 10)
    assert [(r.change_id, r.status) for r in records] == [(q.change_id, "FAILED_PRECONDITION") for q in queued]
    assert all("shut down at step 0" in r.error and "not applied" in r.error for r in records)
    assert [(r["change_id"], r["status"], r["at_step"]) for r in lines(path)] == [
        (q.change_id, "FAILED_PRECONDITION", 100 + k) for k, q in enumerate(queued)]


def test_a_waiting_change_withdrawn_by_its_caller_is_not_recorded(audited: Served) -> None:
    with LRClient(audited.ctl.address) as client:
        with pytest.raises(Exception):
            client.set_learning_rates({"layer1.bias": 0.5}, timeout=0.5)  # nobody steps
    wait_for(lambda: audited.controller.pending_count == 0, "the change to be withdrawn")
    audited.step()
    assert list(audited.stub.ListChanges(pb.ListChangesRequest(), timeout=T).changes) == []


# -- dropped history is reported ----------------------------------------------------


def test_dropped_history_is_reported_by_the_client_and_the_cli() -> None:
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    ctl = attach(model, optimizer, address="127.0.0.1:0", history_limit=3)
    try:
        with LRClient(ctl.address, timeout=T) as client:
            for k in range(6):
                client.set_learning_rates({"layer1.bias": 0.5 + k}, wait=False)
                optimizer.step()
            wait_for(lambda: ctl.controller.version == 6, "six changes")
            everything = client.list_changes()
            assert [r.version for r in everything] == [4, 5, 6]
            assert (everything.gap, everything.dropped, everything.oldest_version) == (True, 3, 4)
            after_one = client.list_changes(after_version=1)
            assert [r.version for r in after_one] == [4, 5, 6] and after_one.gap
            after_three = client.list_changes(after_version=3)
            assert [r.version for r in after_three] == [4, 5, 6] and not after_three.gap
            it = client.iter_changes(after_version=2, page_size=1)
            assert [r.version for r in it] == [4, 5, 6] and it.gap and it.dropped == 3
        done = cli("history", address=ctl.address)
        assert done.returncode == 0
        assert done.stderr == (
            "lrctl: note: 3 older change(s) were dropped from the worker's history (it keeps "
            "the last 3); the first shown is version 4\n")
        assert cli("history", "--limit", "2", address=ctl.address).stderr == ""
    finally:
        ctl.close(grace=0.5)


# -- the history's byte bound ---------------------------------------------------------


def test_huge_selectors_and_reasons_cannot_grow_the_history_past_its_byte_bound() -> None:
    bound = 1 << 20
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    ctl = attach(model, optimizer, serve=False, history_max_bytes=bound)
    try:
        huge = "re:^layer1\\.bias$|" + "q" * 4000  # a 4 KiB selector that matches one name
        for k in range(60):
            request = ChangeRequest(tuple(Update(huge, 0.5 + k) for _ in range(20)), reason="r" * 4096)
            pending, _ = ctl.controller.submit(request)
            optimizer.step()
            assert pending.outcome is not None
            history = ctl.controller._history
            assert history.bytes <= bound
        assert history.dropped > 0 and len(history) < 60
        # Each record weighs what it holds: 20 selectors of 4 KiB and a 4 KiB reason.
        assert len(history) <= bound // (21 * 4096)
    finally:
        ctl.close()


def _record(n: int, per_name_updates: bool) -> Record:
    names = [f"encoder.layers.{i}.attention.weight" for i in range(n)]
    state = RateState([1.0] * n, array("q", [0] * n), {})
    plan = plan_change({i: ((Mode.ABSOLUTE, 2.0), None, None) for i in range(n)}, state, ScheduleBook(),
                       0, names, lambda i, r: None, str)
    # Selectors as the wire delivers them: a new string per update.
    updates = tuple(Update("".join(["encoder.layers.", str(i), ".attention.weight"]), 2.0)
                    for i in range(n)) if per_name_updates else (Update("encoder.*", 2.0),)
    return Record(change_id=1, version=1, step=0, applied_at=0.0, requested_at=0.0, updates=updates,
                  schedules=(), plan=plan, peer="ipv4:127.0.0.1:5555", user="u@h", reason="x" * 100,
                  at_step=None)


@pytest.mark.parametrize("per_name_updates", [False, True])
def test_a_records_estimated_size_covers_what_it_holds(per_name_updates: bool) -> None:
    """record_bytes (the history's bound) is at least what tracemalloc sees a record
    hold, for a 20k-name record sent as one glob or as 20k single-name updates."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        record = _record(20_000, per_name_updates)
        gc.collect()  # what the planning left in cycles is not the record's
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert record_bytes(record) >= held
    assert record_bytes(record) <= 2 * held + 4096  # an estimate, not a guess: within 2x
    history = History(limit=100, max_bytes=3 * record_bytes(record))
    for _ in range(5):
        history.append(dataclasses.replace(record))  # a history numbers the records it is given
    assert len(history) == 3 and history.bytes <= 3 * record_bytes(record)


# -- worker processes: SIGTERM and SIGKILL ------------------------------------------


def _start_worker(log: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [*LRCTL, "demo", "--serve", "--address", "127.0.0.1:0", "--audit-log", str(log),
         "--step-delay", "0.01", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    match = re.search(r"on (127\.0\.0\.1:\d+)", first)
    if match is None:
        proc.kill()
        pytest.fail(f"the worker did not start: {first!r} {proc.communicate(timeout=30)}")
    return proc, match.group(1)


def test_sigterm_answers_waiting_calls_flushes_the_log_and_exits_0(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    proc, address = _start_worker(log)
    try:
        with LRClient(address, timeout=T) as client:
            acked = [client.set_learning_rates({"layer1.bias": 0.5 + k}, reason=f"a{k}") for k in range(3)]
            outcome: dict[str, Any] = {}

            def wait_far() -> None:
                try:
                    outcome["result"] = client.set_learning_rates({"layer2.bias": 0.125}, at_step=100_000)
                except Exception as exc:
                    outcome["error"] = exc

            waiter = threading.Thread(target=wait_far)
            waiter.start()
            wait_for(lambda: client.status().pending_changes == 1, "the waiting change to be queued")
            proc.send_signal(signal.SIGTERM)
            waiter.join(PATIENCE_S)
            assert proc.wait(PATIENCE_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.communicate(timeout=30)
    assert "stopped by signal" in out and "Traceback" not in err
    error = outcome.get("error")
    assert isinstance(error, FailedPreconditionError), outcome
    assert "shut down" in str(error) and "was not applied" in str(error)
    logged = lines(log)  # ends with a complete line
    assert [(r["change_id"], r["version"], r["status"]) for r in logged[:3]] == [
        (a.change_id, a.version, "") for a in acked]
    assert logged[3]["status"] == "FAILED_PRECONDITION" and logged[3]["at_step"] == 100_000
    assert len(logged) == 4


def test_sigkill_mid_stream_loses_no_acknowledged_change(tmp_path: Path) -> None:
    """Waiting Sets stream in; the worker is killed (SIGKILL) in the middle: every change
    whose client got its answer is in the log, with the values the answer gave."""
    log = tmp_path / "audit.jsonl"
    proc, address = _start_worker(log)
    acked: list[Any] = []
    try:
        with LRClient(address, timeout=T) as client:
            stop = threading.Event()

            def stream() -> None:
                k = 0
                while not stop.is_set():
                    try:
                        acked.append(client.set_learning_rates({"layer1.weight": 1e-3 * (k + 1)}))
                    except Exception:
                        return  # the worker is gone
                    k += 1

            streamer = threading.Thread(target=stream)
            streamer.start()
            wait_for(lambda: len(acked) >= 20, "20 acknowledged changes")
            proc.kill()
            proc.wait(PATIENCE_S)
            stop.set()
            streamer.join(PATIENCE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
    assert len(acked) >= 20
    text = log.read_text()
    complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
    logged = {r["change_id"]: r for r in map(json.loads, complete.splitlines())}
    for result in acked:
        record = logged[result.change_id]
        assert (record["version"], record["step"]) == (result.version, result.step)
        assert record["changes"][0]["lr"] == [result.changes[0].old_lr, result.changes[0].new_lr]


def test_failed_records_survive_a_checkpoint() -> None:
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    with attach(model, optimizer, serve=False, history_limit=3) as ctl:
        late, _ = ctl.controller.submit(ChangeRequest((Update("layer1.bias", 0.3),), expected_version=0, at_step=1))
        for k in range(3):
            ctl.controller.submit(ChangeRequest((Update("layer1.weight", 0.5 + k),)))
            optimizer.step()
        saved = ctl.state_dict()
        before = [(r.change_id, r.version, r.status) for r in ctl.controller.history(0, 10)[0]]
    # Four records (v1, the refused one at v1, v2, v3); the limit keeps the last three.
    assert [s for _, _, s in before] == ["FAILED_PRECONDITION", "", ""] and late.error is not None
    model2 = seed_model()
    optimizer2 = per_parameter_optimizer(model2)
    with attach(model2, optimizer2, serve=False) as ctl2:
        ctl2.load_state_dict(saved)
        page = ctl2.controller.history_page(0, 0, 10)
        assert [(r.change_id, r.version, r.status) for r in page.records] == before
        assert page.records[0].error == late.error.args[0]
        assert page.dropped == 1 and page.gap and page.oldest_version == 2
        assert not ctl2.controller.history_page(1, 0, 10).gap
