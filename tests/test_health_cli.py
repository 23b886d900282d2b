"""`lrctl health`: the standard gRPC health check from the CLI, as a probe or a
container's HEALTHCHECK uses it (SERVING exit 0, NOT_SERVING 1, unreachable 3)."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from conftest import LRCTL, PATIENCE_S, Served, per_parameter_optimizer, run_cli, seed_model, stepping
from lrctl.client import health
from lrctl.server import attach
from lrctl.server.auth import ADMIN, Token, Tokens


def _one_line(result: subprocess.CompletedProcess) -> str:
    out = result.stdout + result.stderr
    assert out.count("\n") == 1, out
    return out.strip()


def test_a_running_worker_is_serving(served: Served) -> None:
    result = run_cli(served.ctl.address, "health")
    assert (result.returncode, result.stdout, result.stderr) == (0, "SERVING\n", "")
    result = run_cli(served.ctl.address, "health", "--service", "lrctl.v1.LearningRateControl")
    assert (result.returncode, result.stdout) == (0, "SERVING\n")


def test_an_unknown_service_is_named(served: Served) -> None:
    result = run_cli(served.ctl.address, "health", "--service", "no.such.Service")
    assert result.returncode == 4
    assert _one_line(result) == "lrctl: error: health: the worker has no service named 'no.such.Service'"


def test_not_serving_exits_1() -> None:
    # In-process whatever $LRCTL_SERVING says: the test sets the real server's health
    # servicer as shutdown sets it, which lives in this process only in that mode.
    ctl = attach(*_seed(), address="127.0.0.1:0", serving="inprocess")
    try:
        built = ctl._server
        asyncio.run_coroutine_threadsafe(
            built.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING), built.loop).result()
        result = run_cli(ctl.address, "health")
        assert (result.returncode, _one_line(result)) == (1, "NOT_SERVING")
    finally:
        ctl.close(grace=0.5)


def _seed() -> tuple:
    model = seed_model()
    return model, per_parameter_optimizer(model)


def test_a_stopped_worker_is_unreachable_exit_3() -> None:
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    ctl = attach(model, optimizer, address="127.0.0.1:0")
    address = ctl.address
    assert run_cli(address, "health").returncode == 0
    ctl.close(grace=0.5)
    result = run_cli(address, "health")
    assert result.returncode == 3
    line = _one_line(result)
    assert line.startswith(f"unreachable: cannot reach lrctl worker at {address}"), line


def test_health_needs_no_token() -> None:
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    secret = secrets.token_urlsafe()
    with attach(model, optimizer, address="127.0.0.1:0", tokens=Tokens([Token("alice", ADMIN, secret)])) as ctl:
        assert run_cli(ctl.address, "health").stdout == "SERVING\n"
        assert run_cli(ctl.address, "status").returncode == 5  # the rest still needs one


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (a socket path has at most 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="lrctl-", dir="/tmp") as directory:
        yield Path(directory)


def test_wait_on_a_unix_socket_until_the_worker_serves(short_dir: Path) -> None:
    address = f"unix:{short_dir / 'worker.sock'}"
    # Started before the worker exists: it retries until SERVING.
    probe = subprocess.Popen([*LRCTL, "--address", address, "health", "--wait", str(PATIENCE_S)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        model = seed_model()
        optimizer = per_parameter_optimizer(model)
        with attach(model, optimizer, address=address) as ctl, stepping(optimizer):
            out, err = probe.communicate(timeout=60)
            assert (probe.returncode, out, err) == (0, "SERVING\n", "")
            assert run_cli(ctl.address, "health").stdout == "SERVING\n"
        result = run_cli(address, "health")
        assert result.returncode == 3 and result.stdout.startswith("unreachable: "), result
    finally:
        if probe.poll() is None:
            probe.kill()


def test_bad_wait_is_a_usage_error() -> None:
    result = run_cli("127.0.0.1:1", "health", "--wait", "-1")
    assert result.returncode == 2 and "-1" in _one_line(result)


@pytest.mark.parametrize("service", ["", "lrctl.v1.LearningRateControl", "é" * 200])
def test_hand_written_messages_match_the_health_stubs(service: str) -> None:
    assert health.encode_request(service) == health_pb2.HealthCheckRequest(service=service).SerializeToString()
    for status, name in health.STATUS_NAMES.items():
        reply = health_pb2.HealthCheckResponse(status=status).SerializeToString()
        assert health.decode_status(reply) == name
    with pytest.raises(ValueError):
        health.decode_status(b"\x08")
