"""Clients that are not lrctl's: a call through server reflection alone
(examples/reflection_call.py, no stubs, no lrctl code), grpcurl when it is installed, and
the Node.js client of examples/node (npm ci into a temporary folder, then a real demo worker).

The worker runs with an admin token: each client must send it, and is refused without it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import LRCTL, start_demo_worker

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "node-and-reflection-0123456789"
SERVICE = "lrctl.v1.LearningRateControl"


@pytest.fixture(scope="module")
def worker():
    """`lrctl demo --serve` with an admin token, on a free loopback port."""
    old = os.environ.get("LRCTL_ADMIN_TOKEN")
    os.environ["LRCTL_ADMIN_TOKEN"] = TOKEN  # start_demo_worker passes the environment on
    try:
        proc, address = start_demo_worker()
    finally:
        if old is None:
            del os.environ["LRCTL_ADMIN_TOKEN"]
        else:
            os.environ["LRCTL_ADMIN_TOKEN"] = old
    try:
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert proc.returncode == 0


def get_lr(address: str, name: str) -> float:
    proc = subprocess.run([*LRCTL, "--address", address, "get", name, "--json"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "LRCTL_TOKEN": TOKEN})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)[0]["lr"]


def reflection_call(tmp_path: Path, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    """examples/reflection_call.py with an `lrctl` package on the path that cannot be
    imported: the call must work from reflection alone."""
    shim = tmp_path / "shim" / "lrctl"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "__init__.py").write_text("raise ImportError('lrctl is not for this script')\n")
    env = {k: v for k, v in os.environ.items() if k != "LRCTL_TOKEN"}
    env["PYTHONPATH"] = str(shim.parent)
    if token:
        env["LRCTL_TOKEN"] = token
    return subprocess.run([sys.executable, str(ROOT / "examples" / "reflection_call.py"), *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_reflection_alone_lists_describes_and_calls(worker, tmp_path):
    refused = reflection_call(tmp_path, worker, "list", token=None)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr

    listed = reflection_call(tmp_path, worker, "list")
    assert listed.returncode == 0, listed.stderr
    assert SERVICE in listed.stdout.split() and "grpc.health.v1.Health" in listed.stdout.split()

    described = reflection_call(tmp_path, worker, "describe", SERVICE)
    assert described.returncode == 0, described.stderr
    assert ("rpc SetLearningRates(lrctl.v1.SetLearningRatesRequest) returns "
            "(lrctl.v1.SetLearningRatesResponse)") in described.stdout

    params = reflection_call(tmp_path, worker, "call", f"{SERVICE}/ListParameters", '{"filter": "layer1.*"}')
    assert params.returncode == 0, params.stderr
    assert [p["name"] for p in json.loads(params.stdout)["parameters"]] == ["layer1.weight", "layer1.bias"]

    body = '{"updates": [{"selector": "layer1.bias", "mode": "UPDATE_MODE_ABSOLUTE", "value": 0.0625}], "wait": true}'
    applied = reflection_call(tmp_path, worker, "call", f"{SERVICE}/SetLearningRates", body)
    assert applied.returncode == 0, applied.stderr
    assert json.loads(applied.stdout)["applied"] is True
    assert get_lr(worker, "layer1.bias") == 0.0625

    bad = reflection_call(tmp_path, worker, "call", f"{SERVICE}/SetLearningRates",
                          '{"updates": [{"selector": "nope", "mode": "UPDATE_MODE_ABSOLUTE", "value": 1}]}')
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr and "nope" in bad.stderr


def _grpcurl() -> str | None:
    found = shutil.which("grpcurl") or shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    return found


@pytest.mark.skipif(_grpcurl() is None, reason="grpcurl is not installed (README: 'Other languages and "
                    "generic clients' says how it was run here)")
def test_grpcurl_commands_of_the_readme(worker):
    grpcurl = [_grpcurl(), "-plaintext", "-H", f"authorization: Bearer {TOKEN}"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*grpcurl, *args], capture_output=True, text=True, timeout=60)

    assert SERVICE in run(worker, "list").stdout.split()
    assert "rpc SetLearningRates" in run(worker, "describe", SERVICE).stdout
    reply = run("-d", '{"filter": "layer2.*"}', worker, f"{SERVICE}/ListParameters")
    assert reply.returncode == 0, reply.stderr
    assert [p["name"] for p in json.loads(reply.stdout)["parameters"]] == ["layer2.weight", "layer2.bias"]
    body = '{"updates": [{"selector": "layer2.weight", "mode": "UPDATE_MODE_ABSOLUTE", "value": 0.125}], "wait": true}'
    reply = run("-d", body, worker, f"{SERVICE}/SetLearningRates")
    assert reply.returncode == 0, reply.stderr
    assert get_lr(worker, "layer2.weight") == 0.125
    refused = subprocess.run([grpcurl[0], "-plaintext", worker, f"{SERVICE}/GetStatus"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr


NODE, NPM = shutil.which("node"), shutil.which("npm")


@pytest.mark.skipif(NODE is None or NPM is None, reason="node and npm are not installed")
def test_node_client(worker, tmp_path):
    # npm ci in a copy: node_modules never lands in the repo; the download cache is kept
    # across runs (offline after the first).
    app = tmp_path / "node"
    app.mkdir()
    for name in ("package.json", "package-lock.json", "client.js"):
        shutil.copy(ROOT / "examples" / "node" / name, app / name)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lrctl-tests" / "npm"
    env = {**os.environ, "npm_config_cache": str(cache), "npm_config_update_notifier": "false"}
    started = time.monotonic()
    npm = subprocess.run([NPM, "ci", "--prefer-offline", "--no-audit", "--no-fund"], cwd=app,
                         capture_output=True, text=True, timeout=300, env=env)
    assert npm.returncode == 0, npm.stderr
    env["LRCTL_PROTO"] = str(ROOT / "protos" / "lrctl" / "v1" / "lrctl.proto")

    refused = subprocess.run([NODE, "client.js", worker], cwd=app, capture_output=True, text=True,
                             timeout=60, env=env)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr

    env["LRCTL_TOKEN"] = TOKEN
    proc = subprocess.run([NODE, "client.js", worker, "layer2.bias", "0.375"], cwd=app,
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines[:4]] == ["layer1.weight", "layer1.bias", "layer2.weight",
                                                           "layer2.bias"]
    assert lines[4].startswith("set layer2.bias=0.375: applied=true at step ")
    assert lines[5].startswith("read back layer2.bias=0.375 ")
    assert get_lr(worker, "layer2.bias") == 0.375

    bad = subprocess.run([NODE, "client.js", worker, "layer2.bias", "-1"], cwd=app,
                         capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "-1" in bad.stderr
    assert get_lr(worker, "layer2.bias") == 0.375  # nothing half-applied
    print(f"npm ci + node client: {time.monotonic() - started:.1f} s")
