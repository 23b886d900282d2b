"""The client and CLI work where torch cannot be imported (the base, client-only install).

A subprocess blocks every torch import with a meta-path finder, imports lrctl.client
and its CLI, and drives a real worker (served by this test process) through `main()`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from conftest import stepping  # noqa: E402

# Runs in the subprocess: argv[1] is the worker's address. Prints one JSON object.
CHILD = r"""
import contextlib, io, json, sys

class BlockTorch:
    '''Fails every import of torch, as if it were not installed, and remembers it.'''
    attempts = []

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top == "torch":
            self.attempts.append(name)
        if top in ("torch", "grpc_health"):  # the health stubs come with the worker extra too
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, BlockTorch())

import lrctl.client
import lrctl.client.client
import lrctl.client.cli
import lrctl.client.types
import lrctl.client.audit_file
from lrctl.client.cli import main

def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return {"code": code, "out": out.getvalue(), "err": err.getvalue()}

address = sys.argv[1]
result = {
    "help": run("--help"),
    "list": run("--address", address, "list", "--json"),
    "set": run("--address", address, "set", "layer1.weight=0.0625", "--reason", "no torch"),
    "get": run("--address", address, "get", "layer1.*", "--json"),
    "bad": run("--address", address, "set", "layer1.weight=-1"),
    "file": run("history", "--file", sys.argv[2]),
    "health": run("--address", address, "health"),
}
result["attempts"] = list(BlockTorch.attempts)
result["loaded"] = sorted(m for m in sys.modules if m.partition(".")[0] == "torch")
# Last: the demo verb imports the worker side, which needs torch.
result["demo"] = run("demo", "--help")
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def worker_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A real worker (Linear(10,20) "layer1", Linear(20,1) "layer2", SGD), stepping,
    with an audit log; its address and the log's path."""
    from lrctl.server import attach

    model = torch.nn.Module()
    model.layer1 = torch.nn.Linear(10, 20)
    model.layer2 = torch.nn.Linear(20, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # steps run the hooks and leave the weights be
    log = str(tmp_path_factory.mktemp("audit") / "audit.jsonl")
    ctl = attach(model, optimizer, address="127.0.0.1:0", audit_log=log)
    try:
        with stepping(optimizer):
            yield ctl.address, log
    finally:
        ctl.close()


@pytest.fixture(scope="module")
def child(worker_address: tuple[str, str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *worker_address],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_client_never_imports_torch(child: dict[str, Any]) -> None:
    assert child["attempts"] == []
    assert child["loaded"] == []


def test_help_works_without_torch(child: dict[str, Any]) -> None:
    assert child["help"]["code"] == 0
    assert "exit codes" in child["help"]["out"]


def test_list_get_set_work_without_torch(child: dict[str, Any]) -> None:
    assert child["list"]["code"] == 0, child["list"]["err"]
    names = [p["name"] for p in json.loads(child["list"]["out"])]
    assert names == ["layer1.weight", "layer1.bias", "layer2.weight", "layer2.bias"]
    assert child["set"]["code"] == 0, child["set"]["err"]
    assert child["set"]["out"].splitlines()[0] == "layer1.weight: 0.1 -> 0.0625"
    assert child["get"]["code"] == 0, child["get"]["err"]
    assert {r["name"]: r["lr"] for r in json.loads(child["get"]["out"])} == {
        "layer1.weight": 0.0625, "layer1.bias": 0.1,
    }


def test_history_file_works_without_torch(child: dict[str, Any]) -> None:
    assert child["file"]["code"] == 0, child["file"]["err"]
    assert "layer1.weight=0.0625" in child["file"]["out"] and "no torch" in child["file"]["out"]


def test_health_works_without_torch_or_health_stubs(child: dict[str, Any]) -> None:
    assert (child["health"]["code"], child["health"]["out"]) == (0, "SERVING\n"), child["health"]["err"]


def test_errors_are_one_line_without_torch(child: dict[str, Any]) -> None:
    bad = child["bad"]
    assert bad["code"] == 4 and bad["out"] == ""
    assert len(bad["err"].splitlines()) == 1 and bad["err"].startswith("lrctl: error: ")


def test_demo_explains_the_missing_extra(child: dict[str, Any]) -> None:
    demo = child["demo"]
    assert demo["code"] == 1
    assert demo["err"].strip() == (
        "lrctl: error: lrctl demo needs the worker extra: pip install 'lrctl[worker]'"
    )
