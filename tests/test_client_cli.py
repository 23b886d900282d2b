"""The lrctl CLI and LRClient against a real worker that trains in a background thread.

One worker per module: the seed example's model (layer1 = Linear(10, 20), layer2 =
Linear(20, 1), plain SGD with one rate per parameter) plus a frozen module that the
optimizer does not hold. A thread calls optimizer.step() every ~5 ms, so waiting sets
return quickly. Every test starts from the seed's initial rates.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

torch = pytest.importorskip("torch")

from conftest import assert_error, ok, stepping, table  # noqa: E402
from lrctl.client.client import LRClient, default_user  # noqa: E402
from lrctl.client.errors import (  # noqa: E402
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from lrctl.client.types import ChangeRecord, ParameterInfo, SetResult, Status, Update  # noqa: E402

INITIAL = {"layer1.weight": 0.01, "layer1.bias": 0.1, "layer2.weight": 0.001, "layer2.bias": 1.0}
ALL_NAMES = [*INITIAL, "frozen.weight", "frozen.bias"]
STEP_INTERVAL_S = 0.005


@dataclass
class Worker:
    """A running worker: its address and the objects the test process holds."""

    address: str
    ctl: Any
    optimizer: Any


def _build_model() -> tuple[Any, Any]:
    model = torch.nn.Module()
    model.layer1 = torch.nn.Linear(10, 20)
    model.layer2 = torch.nn.Linear(20, 1)
    model.frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    held = [model.layer1.weight, model.layer1.bias, model.layer2.weight, model.layer2.bias]
    optimizer = torch.optim.SGD(
        [{"params": [p], "lr": lr} for p, lr in zip(held, INITIAL.values())], lr=10.0
    )
    for p in held:
        # Zero gradients: steps run the hooks (all lrctl needs) but leave the weights be.
        p.grad = torch.zeros_like(p)
    return model, optimizer


def _wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    from lrctl.server import attach

    model, optimizer = _build_model()
    ctl = attach(model, optimizer, address="127.0.0.1:0")
    try:
        with stepping(optimizer, STEP_INTERVAL_S):
            with LRClient(ctl.address) as client:
                _wait_for(lambda: client.status().state == "training", what="the first step")
            yield Worker(ctl.address, ctl, optimizer)
    finally:
        ctl.close()


@pytest.fixture
def client(worker: Worker) -> Iterator[LRClient]:
    """A client on the worker, after putting the seed's initial rates back."""
    with LRClient(worker.address, user="pytest@lrctl") as c:
        c.set_learning_rates(INITIAL, reason="test reset")
        yield c


def run_cli(*args: str, address: str | None = None, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m lrctl.client.cli [--address A] [--timeout T] ARGS` and capture it."""
    argv = [sys.executable, "-m", "lrctl.client.cli"]
    if address is not None:
        argv += ["--address", address]
    if timeout is not None:
        argv += ["--timeout", str(timeout)]
    env = {k: v for k, v in os.environ.items() if k not in ("LRCTL_ADDRESS", "LRCTL_DEBUG")}
    return subprocess.run(argv + list(args), capture_output=True, text=True, env=env, timeout=60)


def ok_json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(proc))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- help and usage ------------------------------------------------------------------


def test_help_names_verbs_and_exit_codes() -> None:
    out = ok(run_cli("--help"))
    for verb in ("list", "get", "set", "scale", "status", "history", "demo"):
        assert verb in out
    assert "exit codes" in out and "LRCTL_ADDRESS" in out


@pytest.mark.parametrize(
    "args, fragment",
    [
        ((), "VERB"),
        (("set",), "set"),
        (("list", "--bogus"), "--bogus"),
        (("scale", "layer1.*", "two"), "two"),
        (("history", "--limit", "0"), "--limit"),
        # Numbers the wire cannot carry are usage errors, not "internal error"s.
        (("history", "--limit", "99999999999999999999999"), "99999999999999999999999"),
        (("set", "layer1.weight=0.1", "--at-step", str(2**63)), str(2**63)),
        (("set", "layer1.weight=0.1", "--expected-version", str(-(2**63) - 1)), str(-(2**63) - 1)),
        (("--timeout", "1e10", "status"), "1e10"),
        (("--timeout", "nan", "status"), "nan"),
        # No silent abbreviations of options.
        (("list", "--js"), "--js"),
        (("set", "layer1.weight=0.1", "--dry"), "--dry"),
    ],
)
def test_usage_errors_exit_2(args: tuple[str, ...], fragment: str) -> None:
    assert_error(run_cli(*args, address="127.0.0.1:1"), 2, fragment)


# -- reading -------------------------------------------------------------------------


def test_list_table(client: LRClient, worker: Worker) -> None:
    rows = table(ok(run_cli("list", address=worker.address)))
    assert rows[0] == ["NAME", "SHAPE", "DTYPE", "LR", "GROUP", "NOTE"]
    by_name = {row[0]: row for row in rows[1:]}
    assert list(by_name) == ALL_NAMES
    assert by_name["layer1.weight"][1:4] == ["20x10", "float32", "0.01"]
    assert by_name["layer2.bias"][1:4] == ["1", "float32", "1.0"]
    assert by_name["frozen.weight"][3:] == ["-", "-", "frozen, not in optimizer"]
    assert len(by_name["layer1.weight"]) == 5  # no NOTE for an ordinary parameter


def test_list_json(client: LRClient, worker: Worker) -> None:
    params = {p["name"]: p for p in ok_json(run_cli("list", "--json", address=worker.address))}
    assert list(params) == ALL_NAMES
    w = params["layer1.weight"]
    assert (w["shape"], w["numel"], w["dtype"], w["lr"]) == ([20, 10], 200, "float32", 0.01)
    assert w["requires_grad"] and w["in_optimizer"] and w["settable"]
    assert isinstance(w["group"], int) and w["group"] >= 0
    assert "momentum" in w["hyperparameters"]
    f = params["frozen.weight"]
    assert (f["lr"], f["group"], f["settable"], f["requires_grad"], f["in_optimizer"]) == (
        None, -1, False, False, False,
    )


def test_list_filters(client: LRClient, worker: Worker) -> None:
    names = lambda proc: [p["name"] for p in ok_json(proc)]  # noqa: E731
    assert names(run_cli("list", "layer2.*", "--json", address=worker.address)) == [
        "layer2.weight", "layer2.bias",
    ]
    assert names(run_cli("list", r"re:\.bias$", "--json", address=worker.address)) == [
        "layer1.bias", "layer2.bias", "frozen.bias",
    ]
    # A list filter that matches nothing is an empty answer, not an error.
    assert ok_json(run_cli("list", "nothing*", "--json", address=worker.address)) == []
    assert "no parameter matches" in ok(run_cli("list", "nothing*", address=worker.address))


def test_global_options_work_after_the_verb_too(client: LRClient, worker: Worker) -> None:
    assert "step:" in ok(run_cli("status", "--address", worker.address, "--timeout", "5"))
    names = ok(run_cli("list", "--names", "--timeout", "5", "--address", worker.address))
    assert names.splitlines() == ALL_NAMES  # "5" is the timeout, not a pattern
    # After the verb wins over before it.
    assert "step:" in ok(run_cli("status", "--address", worker.address, address="127.0.0.1:1"))


def test_list_names(client: LRClient, worker: Worker) -> None:
    assert ok(run_cli("list", "--names", address=worker.address)).splitlines() == ALL_NAMES
    assert ok_json(run_cli("list", "--names", "--json", r"re:\.bias$", address=worker.address)) == [
        "layer1.bias", "layer2.bias", "frozen.bias",
    ]
    # Nothing matched: stdout stays an (empty) list of names, the note goes to stderr.
    proc = run_cli("list", "--names", "nothing*", address=worker.address)
    assert proc.returncode == 0 and proc.stdout == "" and "no parameter matches" in proc.stderr


def test_get_glob_regex_and_all(client: LRClient, worker: Worker) -> None:
    got = ok_json(run_cli("get", "layer1.*", "--json", address=worker.address))
    assert [(r["name"], r["lr"]) for r in got] == [("layer1.weight", 0.01), ("layer1.bias", 0.1)]
    assert all(isinstance(r["group"], int) for r in got)
    got = ok_json(run_cli("get", r"re:^layer2\.", "--json", address=worker.address))
    assert {r["name"]: r["lr"] for r in got} == {"layer2.weight": 0.001, "layer2.bias": 1.0}
    got = ok_json(run_cli("get", "--json", address=worker.address))
    assert {r["name"]: r["lr"] for r in got} == INITIAL  # every held parameter, model order
    rows = table(ok(run_cli("get", "layer1.bias", "layer2.weight", address=worker.address)))
    assert rows[0] == ["NAME", "LR", "GROUP"]
    assert [row[:2] for row in rows[1:]] == [["layer1.bias", "0.1"], ["layer2.weight", "0.001"]]


def test_status(client: LRClient, worker: Worker) -> None:
    status = ok_json(run_cli("status", "--json", address=worker.address))
    assert status["state"] == "training"
    assert status["optimizer"].endswith("SGD")
    assert (status["num_parameters"], status["num_settable"]) == (6, 4)
    assert status["step"] > 0 and status["version"] > 0
    assert status["seconds_since_last_step"] is not None
    assert status["pending_changes"] == 0
    lines = dict(
        line.split(":", 1) for line in ok(run_cli("status", address=worker.address)).splitlines()
    )
    assert lines["state"].strip() == "training"
    assert lines["optimizer"].strip() == status["optimizer"]


# -- changing ------------------------------------------------------------------------


def test_set_applies_and_reads_back_exactly(client: LRClient, worker: Worker) -> None:
    out = ok(run_cli("set", "layer1.weight=0.0123456789", "layer2.*=3e-07", address=worker.address))
    lines = out.splitlines()
    assert lines[:3] == [
        "layer1.weight: 0.01 -> 0.0123456789",
        "layer2.weight: 0.001 -> 3e-07",
        "layer2.bias: 1.0 -> 3e-07",
    ]
    assert re.fullmatch(r"applied at step \d+ \(version \d+\)", lines[3])
    got = ok_json(run_cli("get", "layer1.weight", "layer2.*", "--json", address=worker.address))
    assert {r["name"]: r["lr"] for r in got} == {
        "layer1.weight": 0.0123456789, "layer2.weight": 3e-07, "layer2.bias": 3e-07,
    }
    assert client.get_learning_rates()["layer1.bias"] == 0.1  # untouched


def test_set_json(client: LRClient, worker: Worker) -> None:
    result = ok_json(run_cli("set", "layer1.bias=0.25", "--json", address=worker.address))
    assert result["applied"] is True and result["dry_run"] is False
    assert result["changes"] == [{"name": "layer1.bias", "old_lr": 0.1, "new_lr": 0.25, "old_base": 0.1,
                                   "new_base": 0.25, "old_pin": None, "new_pin": None,
                                   "old_schedule": "", "new_schedule": ""}]
    assert result["change_id"] > 0 and result["num_changes"] == 1
    assert result["version"] == client.status().version


def test_zero_rate_is_accepted(client: LRClient, worker: Worker) -> None:
    # The proto allows 0 for an absolute rate ("0 freezes the parameter").
    ok(run_cli("set", "layer1.weight=0", address=worker.address))
    assert client.get_learning_rates("layer1.weight") == {"layer1.weight": 0.0}


def test_scale(client: LRClient, worker: Worker) -> None:
    out = ok(run_cli("scale", "layer2.*", "0.5", address=worker.address))
    assert out.splitlines()[:2] == ["layer2.weight: 0.001 -> 0.0005", "layer2.bias: 1.0 -> 0.5"]
    assert client.get_learning_rates("layer2.*") == {"layer2.weight": 0.001 * 0.5, "layer2.bias": 0.5}


def test_dry_run_changes_nothing(client: LRClient, worker: Worker) -> None:
    before = client.read_learning_rates()
    out = ok(run_cli("set", "layer1.weight=0.7", "--dry-run", address=worker.address))
    assert out.splitlines() == ["layer1.weight: 0.01 -> 0.7", "dry run: nothing changed"]
    out = ok(run_cli("scale", "layer1.*", "3", "--dry-run", address=worker.address))
    assert out.splitlines()[-1] == "dry run: nothing changed"
    after = client.read_learning_rates()
    assert (after.rates, after.version) == (before.rates, before.version)


def test_at_step_without_wait_applies_at_exactly_that_step(client: LRClient, worker: Worker) -> None:
    # ~400 steps of 5 ms: time enough to start the CLI, short enough to wait for.
    target = client.status().step + 400
    reason = f"scheduled for {target}"
    out = ok(run_cli("set", "layer1.bias=0.03", "--at-step", str(target), "--no-wait",
                     "--reason", reason, address=worker.address))
    assert out.splitlines() == ["layer1.bias: 0.1 -> 0.03", f"accepted, due at step {target}"]
    assert client.get_learning_rates("layer1.bias") == {"layer1.bias": 0.1}  # not yet

    def applied() -> dict[str, Any] | None:
        records = ok_json(run_cli("history", "--json", "--limit", "3", address=worker.address))
        return next((r for r in records if r["reason"] == reason), None)

    record = _wait_for(applied, timeout=20, what=f"the change due at step {target}")
    assert (record["step"], record["at_step"]) == (target, target)
    assert [{k: c[k] for k in ("name", "old_lr", "new_lr", "old_base", "new_base")} for c in record["changes"]] == [
        {"name": "layer1.bias", "old_lr": 0.1, "new_lr": 0.03, "old_base": 0.1, "new_base": 0.03}]
    assert client.get_learning_rates("layer1.bias") == {"layer1.bias": 0.03}


def test_history_shows_who_what_and_why(client: LRClient, worker: Worker) -> None:
    ok(run_cli("set", "layer1.weight=0.005", "--reason", "plateau: halve it", address=worker.address))
    rows = table(ok(run_cli("history", address=worker.address)))
    assert rows[0] == ["CHANGE", "STEP", "VERSION", "WHEN", "STATUS", "USER", "UPDATES", "REASON"]
    last = rows[-1]
    assert last[4:] == ["applied", default_user(), "layer1.weight=0.005", "plateau: halve it"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", last[3])

    ok(run_cli("scale", "layer2.*", "2", address=worker.address))
    (record,) = ok_json(run_cli("history", "--json", "--limit", "1", address=worker.address))
    assert record["updates"] == [{"selector": "layer2.*", "value": 2.0, "mode": "scale", "target": "base"}]
    assert [{k: c[k] for k in ("name", "old_lr", "new_lr", "old_base", "new_base", "new_pin")}
            for c in record["changes"]] == [
        {"name": "layer2.weight", "old_lr": 0.001, "new_lr": 0.002, "old_base": 0.001, "new_base": 0.002,
         "new_pin": None},
        {"name": "layer2.bias", "old_lr": 1.0, "new_lr": 2.0, "old_base": 1.0, "new_base": 2.0, "new_pin": None},
    ]
    assert record["user"] == default_user() and record["peer"]
    assert record["applied_at"] >= record["requested_at"] > 0
    human = table(ok(run_cli("history", "--limit", "1", address=worker.address)))
    assert len(human) == 2 and human[1][4:7] == ["applied", default_user(), "layer2.* x2.0"]


# -- errors: one line, the right exit code, nothing changed -----------------------------


BAD_REQUESTS = [
    # (CLI arguments, exit code, fragments the error line must contain)
    (("set", "layer1.weight=nan"), 4, ("nan",)),
    (("set", "layer1.weight=inf"), 4, ("inf",)),
    (("set", "layer1.weight=-1"), 4, ("-1",)),
    (("scale", "layer1.*", "0"), 4, ("0",)),
    (("scale", "layer1.*", "-2"), 4, ("-2",)),
    (("set", "re:[=0.1"), 4, ("re:[",)),
    (("set", "layer1.weigth=0.1"), 4, ("layer1.weigth", "layer1.weight")),
    (("get", "layer1.weigth"), 4, ("layer1.weigth", "layer1.weight")),
    (("set", "nothing*=0.1"), 4, ("nothing*",)),
    (("set", "layer1.weight=0.1", "layer1.*=0.2"), 4, ("layer1.weight", "layer1.*")),
    (("set", "frozen.weight=0.1"), 4, ("frozen.weight",)),
    (("set", "layer1.weight=0.5", "--at-step", "0"), 4, ("past",)),
    (("set", "layer1.weight=0.5", "--expected-version", "999999"), 4, ("999999",)),
    (("set", "layer1.weight"), 2, ("layer1.weight",)),
    (("set", "layer1.weight=abc"), 2, ("abc",)),
    (("set", "layer1.weight=0.2", "=0.3"), 2, ("=0.3",)),
]


@pytest.mark.parametrize(
    "args, code, fragments", BAD_REQUESTS, ids=[" ".join(args) for args, _, _ in BAD_REQUESTS]
)
def test_bad_requests_fail_cleanly_and_change_nothing(
    client: LRClient, worker: Worker, args: tuple[str, ...], code: int, fragments: tuple[str, ...]
) -> None:
    before = client.read_learning_rates()
    assert_error(run_cli(*args, address=worker.address), code, *fragments)
    after = client.read_learning_rates()
    assert (after.rates, after.version) == (before.rates, before.version)


def test_waiting_set_times_out_and_is_withdrawn(client: LRClient, worker: Worker) -> None:
    before = client.read_learning_rates()
    far = client.status().step + 500_000  # within the worker's max_steps_ahead
    proc = run_cli("set", "layer1.weight=0.5", "--at-step", str(far), address=worker.address,
                   timeout=1)
    assert "withdrawn" in assert_error(proc, 6)
    _wait_for(lambda: client.status().pending_changes == 0, what="the withdrawal")
    after = client.read_learning_rates()
    assert (after.rates, after.version) == (before.rates, before.version)


def test_interrupted_waiting_set_says_what_became_of_the_change(client: LRClient, worker: Worker) -> None:
    before = client.read_learning_rates()
    far = client.status().step + 500_000  # within the worker's max_steps_ahead
    env = {k: v for k, v in os.environ.items() if k not in ("LRCTL_ADDRESS", "LRCTL_DEBUG")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lrctl.client.cli", "--address", worker.address, "--timeout", "60",
         "set", "layer1.weight=0.5", "--at-step", str(far)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    _wait_for(lambda: client.status().pending_changes == 1, what="the change to be queued")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and out == ""
    assert err.splitlines() == [
        "lrctl: error: interrupted: the change is withdrawn unless it was already applied; "
        "`lrctl history` tells"
    ]
    _wait_for(lambda: client.status().pending_changes == 0, what="the withdrawal")
    after = client.read_learning_rates()
    assert (after.rates, after.version) == (before.rates, before.version)


def test_unreachable_worker_exits_3() -> None:
    address = f"127.0.0.1:{free_port()}"
    line = assert_error(run_cli("list", address=address, timeout=5), 3, address)
    assert "is a worker running?" in line and "LRCTL_ADDRESS" in line


# -- the library ---------------------------------------------------------------------


def test_client_pages_and_typed_results(client: LRClient) -> None:
    params = client.list_parameters(page_size=1)  # six pages, followed by token
    assert [p.name for p in params] == ALL_NAMES
    assert all(isinstance(p, ParameterInfo) for p in params)
    assert params[0].shape == (20, 10) and params[0].lr == 0.01
    assert client.list_parameters("layer1.*", page_size=1) == params[:2]
    assert client.list_parameters("none*") == []
    assert client.list_names(page_size=1) == ALL_NAMES
    assert client.list_names("layer1.*") == ["layer1.weight", "layer1.bias"]
    assert client.list_names("none*") == []
    whole = client.read_learning_rates()
    paged = client.read_learning_rates(page_size=1)  # the worker trains: steps differ
    assert (paged.rates, paged.version) == (whole.rates, whole.version)
    assert client.read_learning_rates("layer1.*", page_size=1).rates == whole.rates[:2]
    status = client.status()
    assert isinstance(status, Status) and status.state == "training"
    assert status.num_param_groups >= 1


def test_client_rejects_values_the_wire_cannot_carry(client: LRClient) -> None:
    with pytest.raises(InvalidArgumentError, match="page_size 2147483648"):
        client.read_learning_rates(page_size=2**31)
    with pytest.raises(InvalidArgumentError, match="at_step 18446744073709551616"):
        client.set_learning_rates({"layer1.weight": 0.1}, at_step=2**64)
    with pytest.raises(InvalidArgumentError, match="page_size 1.5"):
        client.list_names(page_size=1.5)  # type: ignore[arg-type]


def test_a_server_that_is_not_lrctl_is_named_as_such() -> None:
    health_only = grpc.server(ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), health_only)
    port = health_only.add_insecure_port("127.0.0.1:0")
    health_only.start()
    try:
        line = assert_error(run_cli("status", address=f"127.0.0.1:{port}"), 4)
        assert f"the server at 127.0.0.1:{port} does not serve this lrctl call" in line
        assert "is it an lrctl worker" in line
    finally:
        health_only.stop(0)


def test_client_set_scale_and_history(worker: Worker, client: LRClient) -> None:
    start = client.status().version
    with LRClient(worker.address, user="alice@test") as alice:
        result = alice.set_learning_rates([Update("layer1.*", 0.5), Update("layer2.bias", 4.0, "scale")],
                                          reason="by alice")
        assert isinstance(result, SetResult) and result.applied
        assert [(c.name, c.new_lr) for c in result.changes] == [
            ("layer1.weight", 0.5), ("layer1.bias", 0.5), ("layer2.bias", 4.0),
        ]
        scaled = alice.scale_learning_rates("layer1.weight", 0.5)
        assert scaled.changes[0].new_lr == 0.25 and scaled.version == result.version + 1
    assert client.get_learning_rates("layer1.*", "layer2.bias") == {
        "layer1.weight": 0.25, "layer1.bias": 0.5, "layer2.bias": 4.0,
    }
    records = client.list_changes(after_version=start, page_size=1)
    assert [r.version for r in records] == [start + 1, start + 2]
    assert all(isinstance(r, ChangeRecord) and r.user == "alice@test" for r in records)
    assert records[0].reason == "by alice" and records[0].num_changes == 3
    assert records[0].updates[1] == Update("layer2.bias", 4.0, "scale")
    assert client.list_changes(after_version=start + 2) == []


def test_client_errors_are_lrctl_errors(worker: Worker, client: LRClient) -> None:
    with pytest.raises(NotFoundError, match="layer1.weight"):
        client.get_learning_rates("layer1.weigth")
    with pytest.raises(InvalidArgumentError, match="nan"):
        client.set_learning_rates({"layer1.weight": float("nan")})
    version = client.status().version
    client.set_learning_rates({"layer1.weight": 0.02}, expected_version=version)
    with pytest.raises(FailedPreconditionError, match=str(version)):
        client.set_learning_rates({"layer1.weight": 0.03}, expected_version=version)
    far = client.status().step + 500_000  # within the worker's max_steps_ahead
    with pytest.raises(DeadlineExceededError, match="withdrawn"):
        client.set_learning_rates({"layer1.weight": 0.04}, at_step=far, timeout=0.5)
    assert client.get_learning_rates("layer1.weight") == {"layer1.weight": 0.02}
    with pytest.raises(ValueError):
        Update("layer1.weight", 1.0, "multiply")  # type: ignore[arg-type]


def test_client_unreachable() -> None:
    address = f"127.0.0.1:{free_port()}"
    with LRClient(address, timeout=5) as c:
        with pytest.raises(UnavailableError, match=re.escape(address)) as info:
            c.status()
        assert info.value.__cause__ is None and info.value.__suppress_context__
        with pytest.raises(UnavailableError, match=re.escape(address)):
            c.wait_until_ready(timeout=0.2)


def test_client_address_from_environment(monkeypatch: pytest.MonkeyPatch, worker: Worker) -> None:
    monkeypatch.setenv("LRCTL_ADDRESS", worker.address)
    with LRClient() as c:
        c.wait_until_ready(timeout=5)
        assert c.address == worker.address and c.status().state == "training"
