"""Bearer tokens and roles (lrctl.server.auth) end to end.

A worker with two tokens (alice: admin, bob: reader) on a free loopback port, driven
through the raw generated stubs, LRClient and the CLI as a subprocess; the worker's
token environment (Tokens.from_env); the bind check; constant-time identification;
and the demo under tokens. Secrets are random per run and never go on a command line.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

torch = pytest.importorskip("torch")

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402

from conftest import ok, per_parameter_optimizer, rpc_error, seed_model, stepping  # noqa: E402
from lrctl.client.client import LRClient  # noqa: E402
from lrctl.client.errors import PermissionDeniedError, UnauthenticatedError  # noqa: E402
from lrctl.server import attach  # noqa: E402
from lrctl.server import auth  # noqa: E402
from lrctl.server.auth import ADMIN, READER, Token, Tokens  # noqa: E402
from lrctl.server.factory import SERVICE_NAME, check_bind  # noqa: E402
from lrctl.v1 import lrctl_pb2 as pb  # noqa: E402
from lrctl.v1 import lrctl_pb2_grpc as pb_grpc  # noqa: E402

LRCTL = [sys.executable, "-m", "lrctl.client.cli"]
RPC_TIMEOUT_S = 10
# 24 random bytes -> 32 URL-safe characters each; fresh every run.
ALICE = secrets.token_urlsafe(24)
BOB = secrets.token_urlsafe(24)
STRANGER = secrets.token_urlsafe(24)
SECRETS = (ALICE, BOB, STRANGER)
assert len({ALICE, BOB, STRANGER}) == 3 and all(len(s) == 32 for s in SECRETS)


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


ADMIN_MD, READER_MD, STRANGER_MD = bearer(ALICE), bearer(BOB), bearer(STRANGER)


@dataclass
class Worker:
    address: str
    ctl: Any
    channel: grpc.Channel
    stub: pb_grpc.LearningRateControlStub

    def reading(self) -> tuple[dict[str, float], int]:
        """(name -> rate, config version), read with the admin token."""
        reply = self.stub.GetLearningRates(pb.GetLearningRatesRequest(), timeout=RPC_TIMEOUT_S,
                                           metadata=ADMIN_MD)
        return {r.name: r.lr for r in reply.rates}, reply.version

    def changes(self) -> list[pb.ChangeRecord]:
        reply = self.stub.ListChanges(pb.ListChangesRequest(page_size=1000), timeout=RPC_TIMEOUT_S,
                                      metadata=ADMIN_MD)
        return list(reply.changes)


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    """The seed model under lrctl with tokens alice (admin) and bob (reader), stepping."""
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    tokens = Tokens([Token("alice", ADMIN, ALICE), Token("bob", READER, BOB)])
    ctl = attach(model, optimizer, address="127.0.0.1:0", tokens=tokens)
    channel = grpc.insecure_channel(ctl.address)
    try:
        with stepping(optimizer):
            yield Worker(ctl.address, ctl, channel, pb_grpc.LearningRateControlStub(channel))
    finally:
        channel.close()
        ctl.close(grace=0.5)


@pytest.fixture
def no_client_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's environment gives LRClient no token."""
    for name in ("LRCTL_TOKEN", "LRCTL_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)


def code_and_details(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    return err.code(), err.details() or ""


# Every lrctl RPC with a request that would succeed with the right token. Reads first.
def _schedule(selector: str) -> pb.ScheduleAssignment:
    return pb.ScheduleAssignment(
        selector=selector, schedule=pb.Schedule(step=pb.StepSchedule(gamma=0.5, step_size=1000))
    )


READS: dict[str, Callable[[pb_grpc.LearningRateControlStub], Any]] = {
    "ListParameters": lambda s: s.ListParameters(pb.ListParametersRequest()),
    "GetLearningRates": lambda s: s.GetLearningRates(pb.GetLearningRatesRequest()),
    "GetStatus": lambda s: s.GetStatus(pb.GetStatusRequest()),
    "ListChanges": lambda s: s.ListChanges(pb.ListChangesRequest()),
    "GetSchedules": lambda s: s.GetSchedules(pb.GetSchedulesRequest()),
    "ListPending": lambda s: s.ListPending(pb.ListPendingRequest()),
}
# (id, method name, request factory); each would change the worker (but dry_run).
WRITES = [
    ("set", "SetLearningRates", lambda: pb.SetLearningRatesRequest(
        updates=[pb.LearningRateUpdate(selector="layer1.weight", mode=pb.UPDATE_MODE_ABSOLUTE, value=0.75)],
        wait=True)),
    ("set-dry-run", "SetLearningRates", lambda: pb.SetLearningRatesRequest(
        updates=[pb.LearningRateUpdate(selector="layer1.weight", mode=pb.UPDATE_MODE_ABSOLUTE, value=0.75)],
        dry_run=True)),
    ("set-schedules", "SetSchedules", lambda: pb.SetSchedulesRequest(
        schedules=[_schedule("layer2.bias")], wait=True)),
    ("clear-schedules", "ClearSchedules", lambda: pb.ClearSchedulesRequest(
        selectors=["layer2.bias"], wait=True)),
    ("cancel-changes", "CancelChanges", lambda: pb.CancelChangesRequest(change_ids=[1, 2])),
]
ALL_CALLS = [
    *[(name, lambda s, m, call=call: call_with(s, call, m)) for name, call in READS.items()],
    *[(wid, lambda s, m, name=name, make=make: getattr(s, name)(make(), timeout=RPC_TIMEOUT_S, metadata=m))
      for wid, name, make in WRITES],
]


def call_with(stub: pb_grpc.LearningRateControlStub, call: Callable, metadata: Any) -> Any:
    """Run a READS entry with metadata and a deadline."""

    class Bound:
        def __getattr__(self, name: str) -> Callable[..., Any]:
            method = getattr(stub, name)
            return lambda request: method(request, timeout=RPC_TIMEOUT_S, metadata=metadata)

    return call(Bound())


# -- 1. the worker with two tokens: raw stub ------------------------------------------


@pytest.mark.parametrize("call", [c for _, c in ALL_CALLS], ids=[i for i, _ in ALL_CALLS])
def test_no_token_is_unauthenticated_and_says_how_to_give_one(worker: Worker, call: Callable) -> None:
    before = worker.reading()
    code, details = code_and_details(rpc_error(lambda: call(worker.stub, ())))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "requires a bearer token" in details
    assert "LRCTL_TOKEN" in details
    assert worker.reading() == before


@pytest.mark.parametrize("call", [c for _, c in ALL_CALLS], ids=[i for i, _ in ALL_CALLS])
def test_wrong_token_is_unauthenticated(worker: Worker, call: Callable) -> None:
    before = worker.reading()
    code, details = code_and_details(rpc_error(lambda: call(worker.stub, STRANGER_MD)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "not one this worker accepts" in details
    assert STRANGER not in details
    assert worker.reading() == before


@pytest.mark.parametrize("header", [
    f"Basic {ALICE}", f"Token {ALICE}", ALICE, f"Bearer{ALICE}", "Bearer ", f"Bearer {ALICE[:-1]}",
    f"Bearer {ALICE}x",
], ids=["basic", "token-scheme", "bare-secret", "no-space", "empty", "prefix", "longer"])
def test_other_schemes_and_near_misses_are_unauthenticated(worker: Worker, header: str) -> None:
    err = rpc_error(lambda: worker.stub.GetStatus(
        pb.GetStatusRequest(), timeout=RPC_TIMEOUT_S, metadata=(("authorization", header),)))
    code, details = code_and_details(err)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "not one this worker accepts" in details
    assert ALICE not in details


@pytest.mark.parametrize("name", list(READS))
def test_reader_may_call_every_read(worker: Worker, name: str) -> None:
    reply = call_with(worker.stub, READS[name], READER_MD)
    assert reply is not None
    if name == "GetLearningRates":
        assert {r.name for r in reply.rates} == {"layer1.weight", "layer1.bias", "layer2.weight", "layer2.bias"}


@pytest.mark.parametrize("wid, method, make", WRITES, ids=[w[0] for w in WRITES])
def test_reader_may_not_write_and_nothing_changes(worker: Worker, wid: str, method: str, make: Callable) -> None:
    before = worker.reading()
    schedules_before = list(worker.stub.GetSchedules(pb.GetSchedulesRequest(), timeout=RPC_TIMEOUT_S,
                                                     metadata=READER_MD).schedules)
    n_changes = len(worker.changes())
    err = rpc_error(lambda: getattr(worker.stub, method)(make(), timeout=RPC_TIMEOUT_S, metadata=READER_MD))
    code, details = code_and_details(err)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "'bob'" in details and method in details and "admin" in details
    assert BOB not in details
    assert worker.reading() == before
    assert list(worker.stub.GetSchedules(pb.GetSchedulesRequest(), timeout=RPC_TIMEOUT_S,
                                         metadata=READER_MD).schedules) == schedules_before
    assert len(worker.changes()) == n_changes


def test_admin_writes_are_recorded_with_role_and_token_name(worker: Worker) -> None:
    _, version = worker.reading()
    tag = secrets.token_hex(4)
    stub = worker.stub
    set_reply = stub.SetLearningRates(pb.SetLearningRatesRequest(
        updates=[pb.LearningRateUpdate(selector="layer1.bias", mode=pb.UPDATE_MODE_ABSOLUTE, value=0.25)],
        wait=True, reason=f"set {tag}"), timeout=RPC_TIMEOUT_S, metadata=ADMIN_MD)
    assert set_reply.applied
    dry = stub.SetLearningRates(pb.SetLearningRatesRequest(
        updates=[pb.LearningRateUpdate(selector="layer1.bias", mode=pb.UPDATE_MODE_ABSOLUTE, value=9.0)],
        dry_run=True), timeout=RPC_TIMEOUT_S, metadata=ADMIN_MD)
    assert not dry.applied
    stub.SetSchedules(pb.SetSchedulesRequest(schedules=[_schedule("layer2.weight")], wait=True,
                                             reason=f"schedule {tag}"), timeout=RPC_TIMEOUT_S, metadata=ADMIN_MD)
    stub.ClearSchedules(pb.ClearSchedulesRequest(selectors=["layer2.weight"], wait=True,
                                                 reason=f"clear {tag}"), timeout=RPC_TIMEOUT_S, metadata=ADMIN_MD)
    rates, new_version = worker.reading()
    assert rates["layer1.bias"] == 0.25
    assert new_version == version + 3
    mine = [r for r in worker.changes() if r.reason.endswith(tag)]
    assert [r.reason.split()[0] for r in mine] == ["set", "schedule", "clear"]
    assert all(r.role == "admin" and r.token_name == "alice" for r in mine), mine


# -- 1. the same through LRClient -----------------------------------------------------


def test_client_without_token_is_told_about_lrctl_token(worker: Worker, no_client_token: None) -> None:
    with LRClient(worker.address) as client:
        with pytest.raises(UnauthenticatedError, match="LRCTL_TOKEN"):
            client.status()
        with pytest.raises(UnauthenticatedError, match="LRCTL_TOKEN"):
            client.set_learning_rates({"layer1.weight": 0.5})


def test_client_with_wrong_token_is_unauthenticated(worker: Worker) -> None:
    with LRClient(worker.address, token=STRANGER) as client, \
            pytest.raises(UnauthenticatedError, match="not one this worker accepts") as info:
        client.get_learning_rates()
    assert STRANGER not in str(info.value)


def test_client_reads_its_token_from_lrctl_token(worker: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LRCTL_TOKEN_FILE", raising=False)
    monkeypatch.setenv("LRCTL_TOKEN", BOB)
    with LRClient(worker.address) as client:
        assert client.status().num_parameters >= 4
    monkeypatch.setenv("LRCTL_TOKEN", STRANGER)
    with LRClient(worker.address) as client, pytest.raises(UnauthenticatedError):
        client.status()


def test_reader_client_reads_but_cannot_write(worker: Worker) -> None:
    before = worker.reading()
    with LRClient(worker.address, token=BOB) as client:
        assert len(client.list_parameters()) >= 4
        assert set(client.get_learning_rates()) == {"layer1.weight", "layer1.bias", "layer2.weight", "layer2.bias"}
        assert client.status().state == "training"
        client.list_changes()
        assert len(client.get_schedules()) == 4
        writes = {
            "SetLearningRates": lambda: client.set_learning_rates({"layer1.weight": 0.5}),
            "SetLearningRates (dry run)": lambda: client.set_learning_rates({"layer1.weight": 0.5}, dry_run=True),
            "SetSchedules": lambda: client.set_schedules({"layer1.weight": None}),
            "ClearSchedules": lambda: client.clear_schedules("layer1.weight"),
        }
        for label, write in writes.items():
            with pytest.raises(PermissionDeniedError) as info:
                write()
            message = str(info.value)
            assert "'bob'" in message and label.split()[0] in message and "admin" in message, label
    assert worker.reading() == before


def test_admin_client_writes_and_history_names_alice(worker: Worker) -> None:
    reason = f"client {secrets.token_hex(4)}"
    with LRClient(worker.address, token=ALICE, user="pytest@auth") as client:
        result = client.set_learning_rates({"layer2.bias": 0.5}, reason=reason)
        assert result.applied
        assert client.get_learning_rates("layer2.bias") == {"layer2.bias": 0.5}
    with LRClient(worker.address, token=BOB) as reader:
        (record,) = [r for r in reader.list_changes() if r.reason == reason]
    assert (record.role, record.token_name, record.user) == ("admin", "alice", "pytest@auth")


# -- 1. health and reflection ---------------------------------------------------------


@pytest.mark.parametrize("service", ["", SERVICE_NAME])
def test_health_answers_serving_without_a_token(worker: Worker, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(worker.channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _list_services(channel: grpc.Channel, metadata: Any) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = stub.ServerReflectionInfo(iter([request]), timeout=RPC_TIMEOUT_S, metadata=metadata)
    return [s.name for reply in replies for s in reply.list_services_response.service]


def test_reflection_needs_a_reader_token(worker: Worker) -> None:
    for metadata in ((), STRANGER_MD):
        with pytest.raises(grpc.RpcError) as info:
            _list_services(worker.channel, metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for metadata in (READER_MD, ADMIN_MD):
        assert SERVICE_NAME in _list_services(worker.channel, metadata)


# -- 2. the CLI -----------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m lrctl.client.cli ARGS` with no LRCTL_* from this process, plus `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LRCTL_")}
    proc = subprocess.run([*LRCTL, *args], capture_output=True, text=True, env={**clean, **(env or {})},
                          timeout=60, check=False)
    # The secret never travels on a command line (other users can read it there).
    assert not any(s in arg for s in SECRETS for arg in proc.args), proc.args
    return proc


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lrctl: error: "), proc.stderr
    return lines[0]


@pytest.fixture
def token_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name, secret in (("admin", ALICE), ("reader", BOB), ("stranger", STRANGER)):
        files[name] = tmp_path / f"{name}.token"
        files[name].write_text(secret + "\n")  # a trailing newline, as `echo` writes
    return files


@pytest.mark.parametrize("how", ["LRCTL_TOKEN", "LRCTL_TOKEN_FILE", "--token-file"])
def test_cli_takes_the_token_from_env_file_or_option(worker: Worker, token_files: dict[str, Path], how: str) -> None:
    def run(role: str, *args: str) -> subprocess.CompletedProcess[str]:
        if how == "LRCTL_TOKEN":
            return run_cli("--address", worker.address, *args,
                           env={"LRCTL_TOKEN": token_files[role].read_text().strip()})
        if how == "LRCTL_TOKEN_FILE":
            return run_cli("--address", worker.address, *args, env={"LRCTL_TOKEN_FILE": str(token_files[role])})
        return run_cli("--address", worker.address, "--token-file", str(token_files[role]), *args)

    value = {"LRCTL_TOKEN": 0.003, "LRCTL_TOKEN_FILE": 0.004, "--token-file": 0.005}[how]
    out = ok(run("admin", "set", f"layer2.weight={value}", "--reason", f"cli {how}"))
    assert "applied at step" in out
    got = json.loads(ok(run("reader", "get", "layer2.weight", "--json")))
    assert [(r["name"], r["lr"]) for r in got] == [("layer2.weight", value)]
    assert worker.reading()[0]["layer2.weight"] == value
    denied = run("stranger", "get")
    assert denied.returncode == 5
    assert "not one this worker accepts" in one_error_line(denied)


def test_cli_token_file_option_wins_over_the_environment(worker: Worker, token_files: dict[str, Path]) -> None:
    proc = run_cli("--address", worker.address, "status", "--token-file", str(token_files["reader"]),
                   env={"LRCTL_TOKEN": STRANGER})
    assert "step:" in ok(proc)


def test_cli_without_token_exits_5_naming_lrctl_token(worker: Worker) -> None:
    proc = run_cli("--address", worker.address, "get")
    assert proc.returncode == 5
    assert "LRCTL_TOKEN" in one_error_line(proc)
    assert proc.stdout == ""


def test_cli_reader_set_exits_5_naming_admin(worker: Worker, token_files: dict[str, Path]) -> None:
    before = worker.reading()
    proc = run_cli("--address", worker.address, "set", "layer1.weight=0.5",
                   env={"LRCTL_TOKEN_FILE": str(token_files["reader"])})
    assert proc.returncode == 5
    line = one_error_line(proc)
    assert "admin" in line and "'bob'" in line and "SetLearningRates" in line
    assert worker.reading() == before


@pytest.mark.parametrize("problem", ["missing", "directory", "empty", "blank"])
@pytest.mark.parametrize("via", ["--token-file", "LRCTL_TOKEN_FILE"])
def test_cli_unreadable_or_empty_token_file_is_one_line_naming_it(
    worker: Worker, tmp_path: Path, problem: str, via: str
) -> None:
    path = tmp_path / f"{problem}.token"
    if problem == "directory":
        path.mkdir()
    elif problem == "empty":
        path.write_text("")
    elif problem == "blank":
        path.write_text("  \n\n")
    if via == "--token-file":
        proc = run_cli("--address", worker.address, "--token-file", str(path), "get")
    else:
        proc = run_cli("--address", worker.address, "get", env={"LRCTL_TOKEN_FILE": str(path)})
    assert proc.returncode not in (0, 1), proc.stderr  # 1 would be an internal error
    line = one_error_line(proc)
    assert str(path) in line
    assert "internal error" not in line
    assert proc.stdout == ""


def test_cli_history_shows_the_token_name(worker: Worker, token_files: dict[str, Path]) -> None:
    reason = f"history {secrets.token_hex(4)}"
    with LRClient(worker.address, token=ALICE, user="pytest@auth") as client:
        client.set_learning_rates({"layer1.weight": 0.02}, reason=reason)
    reader_env = {"LRCTL_TOKEN_FILE": str(token_files["reader"])}
    table = ok(run_cli("--address", worker.address, "history", env=reader_env))
    header, *rows = table.splitlines()
    assert "USER" in header
    (row,) = [r for r in rows if reason in r]
    assert "pytest@auth [alice]" in row
    records = json.loads(ok(run_cli("--address", worker.address, "history", "--json", env=reader_env)))
    (record,) = [r for r in records if r["reason"] == reason]
    assert (record["role"], record["token_name"], record["user"]) == ("admin", "alice", "pytest@auth")


# -- 3. the worker's tokens from its environment --------------------------------------


def test_from_env_without_variables_is_none() -> None:
    assert Tokens.from_env({}) is None
    assert Tokens.from_env({"LRCTL_TOKEN": ALICE, "LRCTL_ADMIN_TOKEN": ""}) is None


def test_from_env_reads_both_variables() -> None:
    tokens = Tokens.from_env({"LRCTL_ADMIN_TOKEN": ALICE, "LRCTL_READER_TOKEN": BOB})
    assert tokens is not None
    assert sorted((t.name, t.role, t.secret) for t in tokens.tokens) == [
        ("admin", ADMIN, ALICE), ("reader", READER, BOB)]
    (only,) = Tokens.from_env({"LRCTL_READER_TOKEN": BOB}).tokens
    assert (only.name, only.role, only.secret) == ("reader", READER, BOB)


def test_from_env_reads_the_file_variants(tmp_path: Path) -> None:
    admin, reader = tmp_path / "admin", tmp_path / "reader"
    admin.write_text(f"{ALICE}\n")
    reader.write_text(f"  {BOB}\r\n")
    tokens = Tokens.from_env({"LRCTL_ADMIN_TOKEN_FILE": str(admin), "LRCTL_READER_TOKEN_FILE": str(reader)})
    assert sorted((t.name, t.role, t.secret) for t in tokens.tokens) == [
        ("admin", ADMIN, ALICE), ("reader", READER, BOB)]
    mixed = Tokens.from_env({"LRCTL_ADMIN_TOKEN": ALICE, "LRCTL_READER_TOKEN_FILE": str(reader)})
    assert {t.role: t.secret for t in mixed.tokens} == {ADMIN: ALICE, READER: BOB}


@pytest.mark.parametrize("role", ["ADMIN", "READER"])
def test_from_env_refuses_a_variable_and_its_file(tmp_path: Path, role: str) -> None:
    path = tmp_path / "token"
    path.write_text(ALICE)
    with pytest.raises(ValueError, match=f"LRCTL_{role}_TOKEN or LRCTL_{role}_TOKEN_FILE, not both"):
        Tokens.from_env({f"LRCTL_{role}_TOKEN": ALICE, f"LRCTL_{role}_TOKEN_FILE": str(path)})


def test_from_env_names_an_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError) as info:
        Tokens.from_env({"LRCTL_ADMIN_TOKEN_FILE": str(missing)})
    assert "LRCTL_ADMIN_TOKEN_FILE" in str(info.value) and str(missing) in str(info.value)


@pytest.mark.parametrize("content", ["", "\n  \n"], ids=["empty", "blank"])
def test_from_env_refuses_an_empty_token_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "admin.token"
    path.write_text(content)
    with pytest.raises(ValueError, match="LRCTL_ADMIN_TOKEN_FILE"):
        Tokens.from_env({"LRCTL_ADMIN_TOKEN_FILE": str(path)})


@pytest.mark.parametrize("secret", [
    "x" * 15, "abc", "has spaces in the middle of it", f"{ALICE[:16]} {ALICE[16:]}", f"{ALICE}\tx",
], ids=["15-chars", "3-chars", "spaces", "one-space", "tab"])
@pytest.mark.parametrize("variable", ["LRCTL_ADMIN_TOKEN", "LRCTL_READER_TOKEN"])
def test_from_env_refuses_short_or_spaced_tokens(variable: str, secret: str) -> None:
    with pytest.raises(ValueError) as info:
        Tokens.from_env({variable: secret})
    message = str(info.value)
    assert "at least 16" in message and "without spaces" in message
    assert secret not in message


def test_sixteen_chars_is_enough() -> None:
    (token,) = Tokens.from_env({"LRCTL_ADMIN_TOKEN": "y" * 16}).tokens
    assert token.secret == "y" * 16


def test_from_env_refuses_equal_secrets(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="same secret"):
        Tokens.from_env({"LRCTL_ADMIN_TOKEN": ALICE, "LRCTL_READER_TOKEN": ALICE})
    path = tmp_path / "reader"
    path.write_text(ALICE + "\n")
    with pytest.raises(ValueError, match="same secret"):
        Tokens.from_env({"LRCTL_ADMIN_TOKEN": ALICE, "LRCTL_READER_TOKEN_FILE": str(path)})
    with pytest.raises(ValueError, match="same secret"):
        Tokens([Token("a", ADMIN, ALICE), Token("b", READER, ALICE)])


def test_tokens_refuse_a_bad_role_and_no_tokens() -> None:
    with pytest.raises(ValueError, match="role 'root'"):
        Token("x", "root", ALICE)
    with pytest.raises(ValueError, match="no tokens"):
        Tokens([])


def test_repr_never_shows_the_secret() -> None:
    token = Token("alice", ADMIN, ALICE)
    tokens = Tokens([token, Token("bob", READER, BOB)])
    for text in (repr(token), str(token), repr(tokens), str(tokens), f"{tokens!r}"):
        assert ALICE not in text and BOB not in text, text
    assert "alice" in repr(tokens) and "bob" in repr(tokens)


def test_attach_takes_tokens_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LRCTL_ADMIN_TOKEN_FILE", "LRCTL_READER_TOKEN", "LRCTL_READER_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LRCTL_ADMIN_TOKEN", ALICE)
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    with attach(model, optimizer, address="127.0.0.1:0") as ctl, \
            grpc.insecure_channel(ctl.address) as channel:
        stub = pb_grpc.LearningRateControlStub(channel)
        err = rpc_error(lambda: stub.GetStatus(pb.GetStatusRequest(), timeout=RPC_TIMEOUT_S))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        err = rpc_error(lambda: stub.GetStatus(pb.GetStatusRequest(), timeout=RPC_TIMEOUT_S,
                                               metadata=STRANGER_MD))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        with stepping(optimizer):
            reply = stub.SetLearningRates(pb.SetLearningRatesRequest(
                updates=[pb.LearningRateUpdate(selector="layer1.weight", mode=pb.UPDATE_MODE_ABSOLUTE,
                                               value=0.5)], wait=True),
                timeout=RPC_TIMEOUT_S, metadata=ADMIN_MD)
        assert reply.applied
        (record,) = stub.ListChanges(pb.ListChangesRequest(), timeout=RPC_TIMEOUT_S,
                                     metadata=ADMIN_MD).changes
        assert (record.role, record.token_name) == ("admin", "admin")


def test_attach_without_token_variables_stays_open(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in auth.ENV[ADMIN] + auth.ENV[READER]:
        monkeypatch.delenv(name, raising=False)
    model = seed_model()
    with attach(model, per_parameter_optimizer(model), address="127.0.0.1:0") as ctl, \
            grpc.insecure_channel(ctl.address) as channel:
        reply = pb_grpc.LearningRateControlStub(channel).GetStatus(pb.GetStatusRequest(), timeout=RPC_TIMEOUT_S)
        assert reply.num_parameters >= 4


# -- 4. binding -----------------------------------------------------------------------


@pytest.mark.parametrize("address", ["0.0.0.0:50051", "[::]:50051", "192.0.2.7:50051", "example.com:50051"])
def test_check_bind_refuses_a_reachable_address_without_tokens(
    address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError) as info:
        check_bind(address, None, False)
    message = str(info.value)
    assert "LRCTL_ADMIN_TOKEN" in message and "--insecure" in message and address in message
    assert capsys.readouterr().err == ""


def test_check_bind_with_tokens_returns_quietly(capsys: pytest.CaptureFixture[str]) -> None:
    tokens = Tokens([Token("alice", ADMIN, ALICE)])
    assert check_bind("0.0.0.0:50051", tokens, False) is None
    assert check_bind("0.0.0.0:50051", tokens, True) is None
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("address", ["127.0.0.1:50051", "localhost:50051", "[::1]:50051", "127.0.0.2:0"])
@pytest.mark.parametrize("insecure", [False, True])
def test_check_bind_lets_loopback_pass_without_tokens(
    address: str, insecure: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    assert check_bind(address, None, insecure) is None
    assert capsys.readouterr() == ("", "")


def test_check_bind_insecure_warns_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_bind("0.0.0.0:50051", None, True) is None
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("lrctl: WARNING:") and "WITHOUT authentication" in err and "0.0.0.0:50051" in err


# -- 5. constant-time identification --------------------------------------------------


@pytest.fixture
def compare_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bytes]]:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    return calls


@pytest.mark.parametrize("presented, expected", [
    (ALICE, "alice"), (BOB, "bob"), (STRANGER, None),
], ids=["first-matches", "last-matches", "none-matches"])
def test_identify_compares_against_every_token(
    compare_calls: list[tuple[bytes, bytes]], presented: str, expected: str | None
) -> None:
    tokens = Tokens([Token("alice", ADMIN, ALICE), Token("carol", READER, "c" * 32), Token("bob", READER, BOB)])
    found = tokens.identify([("lrctl-user", "me"), ("authorization", f"Bearer {presented}")])
    assert (found.name if found else None) == expected
    assert len(compare_calls) == 3
    assert sorted(known for _, known in compare_calls) == sorted(s.encode() for s in (ALICE, "c" * 32, BOB))


def test_identify_encodes_every_known_secret() -> None:
    seen: list[str] = []

    class Secretive(str):
        def encode(self, *args: Any, **kwargs: Any) -> bytes:  # called once per comparison
            seen.append(str(self))
            return str.encode(self, *args, **kwargs)

    tokens = Tokens([Token("alice", ADMIN, Secretive(ALICE)), Token("bob", READER, Secretive(BOB))])
    assert tokens.identify([("authorization", f"Bearer {ALICE}")]).name == "alice"
    assert sorted(seen) == sorted([ALICE, BOB])


def test_identify_accepts_bytes_and_refuses_other_schemes() -> None:
    tokens = Tokens([Token("alice", ADMIN, ALICE)])
    assert tokens.identify([("authorization", f"Bearer {ALICE}".encode())]).name == "alice"
    assert tokens.identify([("authorization", f"bearer {ALICE}")]).name == "alice"
    assert tokens.identify([("authorization", f"Basic {ALICE}")]) is None
    assert tokens.identify(None) is None
    assert tokens.identify([]) is None


def test_required_role() -> None:
    assert auth.required_role("/grpc.health.v1.Health/Check") is None
    assert auth.required_role("/grpc.health.v1.Health/Watch") is None
    for name in READS:
        assert auth.required_role(f"/lrctl.v1.LearningRateControl/{name}") == READER
    assert auth.required_role("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") == READER
    for _, name, _ in WRITES:
        assert auth.required_role(f"/lrctl.v1.LearningRateControl/{name}") == ADMIN
    assert auth.required_role("/lrctl.v1.LearningRateControl/SomethingNew") == ADMIN


# -- 6. the demo under tokens ---------------------------------------------------------


def test_demo_runs_with_worker_tokens_in_its_environment() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LRCTL_")}
    env = {**clean, "LRCTL_ADMIN_TOKEN": ALICE, "LRCTL_READER_TOKEN": BOB}
    proc = subprocess.run([*LRCTL, "demo"], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert not any(s in arg for s in SECRETS for arg in proc.args)
    assert proc.returncode == 0, proc.stderr
    assert "| step | layer1.weight | layer1.bias | layer2.weight | layer2.bias |" in proc.stdout
    assert "| 9 | 0.001 | 0.01 | 0.0001 | 0.1 |" in proc.stdout
    assert "every step matches the schedule exactly" in proc.stdout
    assert "all 10 optimizer steps ran with exactly the rates in the history" in proc.stdout
