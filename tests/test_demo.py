"""`lrctl demo` end to end: real worker, real client subprocess, real gRPC on loopback."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import LRCTL, run_cli, start_demo_worker  # noqa: E402

SEED_DOC = Path(__file__).resolve().parents[2] / "shared" / "seed-example.md"

# The seed example's table (shared/seed-example.md), digit for digit.
EXPECTED = """\
| step | layer1.weight | layer1.bias | layer2.weight | layer2.bias |
|---|---|---|---|---|
| 0 | 0.01 | 0.1 | 0.001 | 1.0 |
| 1 | 0.005 | 0.05 | 0.0005 | 0.5 |
| 2 | 0.0033333333333333335 | 0.03333333333333333 | 0.0003333333333333333 | 0.3333333333333333 |
| 3 | 0.0025 | 0.025 | 0.00025 | 0.25 |
| 4 | 0.002 | 0.02 | 0.0002 | 0.2 |
| 5 | 0.0016666666666666668 | 0.016666666666666666 | 0.00016666666666666666 | 0.16666666666666666 |
| 6 | 0.0014285714285714286 | 0.014285714285714287 | 0.00014285714285714287 | 0.14285714285714285 |
| 7 | 0.00125 | 0.0125 | 0.000125 | 0.125 |
| 8 | 0.0011111111111111111 | 0.011111111111111112 | 0.00011111111111111112 | 0.1111111111111111 |
| 9 | 0.001 | 0.01 | 0.0001 | 0.1 |"""


def _table_rows(text: str) -> list[str]:
    """The header and data rows of the step table in a Markdown text."""
    rows = (line.strip() for line in text.splitlines())
    return [row for row in rows if re.match(r"\| (step|\d+) \|", row)]


def test_demo_prints_the_seed_table_exactly() -> None:
    done = subprocess.run([*LRCTL, "demo"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert EXPECTED in done.stdout
    assert "every step matches the schedule exactly" in done.stdout
    assert "all 10 optimizer steps ran with exactly the rates in the history" in done.stdout


@pytest.mark.skipif(not SEED_DOC.exists(), reason="shared/seed-example.md is not beside the checkout")
def test_expected_table_is_the_seed_documents() -> None:
    assert _table_rows(SEED_DOC.read_text()) == _table_rows(EXPECTED)


@pytest.mark.parametrize("model", ["seed", "mlp"])
def test_serve_runs_until_sigterm_and_shuts_down_cleanly(model: str) -> None:
    proc, address = start_demo_worker("--model", model, "--step-delay", "0.01")
    try:
        listed = run_cli(address, "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert '"name"' in listed.stdout
        if model == "mlp":
            assert "encoder.layers.3.weight" in listed.stdout
            done = run_cli(address, "set", "encoder.layers.3.*=0.0005", "--reason", "test")
            assert done.returncode == 0, done.stderr
            assert "applied at step" in done.stdout
            frozen = run_cli(address, "set", "encoder.norm.weight=0.1")
            assert frozen.returncode == 4 and "does not require grad" in frozen.stderr
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # stuck: its threads' stacks, for the report
            proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the worker did not stop within 30 s of SIGTERM; stdout:\n{out}\nstderr:\n{err}")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped by signal; shutting down" in out
    assert "Traceback" not in err
    # The port is released: nothing answers there any more.
    gone = run_cli(address, "--timeout", "2", "status")
    assert gone.returncode == 3


def test_serve_stops_after_the_step_count() -> None:
    proc, _ = start_demo_worker("--steps", "30", "--step-delay", "0")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "reached 30 steps; shutting down" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "-1"], "must not be negative"),
        (["--step-delay", "nan"], "--step-delay must be a finite number"),
        (["--model", "mlp"], "--model needs --serve"),
        (["--model", "nope", "--serve"], "invalid choice: 'nope'"),
        (["--ser"], "unrecognized arguments: --ser"),
        (["--serve", "--address", "0.0.0.0:0"], "refusing to listen on 0.0.0.0:0"),
        (["--serve", "--address", "nonsense"], "port missing in address 'nonsense'"),
    ],
)
def test_demo_bad_arguments_get_one_line_and_nonzero_exit(args: list[str], message: str) -> None:
    done = subprocess.run([*LRCTL, "demo", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("lrctl: error: "), done.stderr
    assert message in done.stderr


def test_serve_listens_where_the_cli_looks() -> None:
    """`lrctl demo --serve` and `lrctl status` share the default: $LRCTL_ADDRESS."""
    with socket.socket() as s:  # a port that is free now (the worker reports its own)
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "LRCTL_ADDRESS": address}
    proc = subprocess.Popen([*LRCTL, "demo", "--serve", "--step-delay", "0.01"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert f"on {address}" in proc.stdout.readline()
        status = subprocess.run([*LRCTL, "status"], env=env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.mark.parametrize("bound, expected", [
    ("0.0.0.0:50051", "127.0.0.1:50051"),
    ("[::]:6000", "[::1]:6000"),
    ("127.0.0.1:41234", "127.0.0.1:41234"),
    ("gpu-host:50051", "gpu-host:50051"),
    ("10.1.2.3:50051", "10.1.2.3:50051"),
    ("unix:/run/lrctl/worker.sock", "unix:/run/lrctl/worker.sock"),
])
def test_the_try_line_names_an_address_a_client_can_connect_to(bound: str, expected: str) -> None:
    # Binding a wildcard address is not done in tests: the formatting is checked directly.
    from lrctl.server.demo import client_address

    assert client_address(bound) == expected


def test_the_try_line_of_a_loopback_worker() -> None:
    proc, address = start_demo_worker()
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"try:  lrctl --address {address} list"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
