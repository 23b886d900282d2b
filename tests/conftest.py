"""Shared fixtures for the worker-side tests: the seed model, a real optimizer under
lrctl, a real gRPC server on a free loopback port, and a background training loop.

Everything is real: real torch optimizers, real gRPC servers bound to 127.0.0.1:0 (the
bound port is read back, never fixed), raw generated stubs. Changes are applied in the
optimizer's step pre-hook, so a test that waits for a change needs something calling
``optimizer.step()``: either the `Trainer` below (a background loop), or the test
thread itself (`train_step`) when the exact step matters.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator

import grpc
import pytest
import torch
from torch import nn

from lrctl.server import attach
from lrctl.server.control import LRControl
from lrctl.server.demo import SEED_LRS, SeedModel
from lrctl.v1 import lrctl_pb2 as pb
from lrctl.v1 import lrctl_pb2_grpc as pb_grpc

# Two cores: keep torch from oversubscribing them with intra-op threads.
torch.set_num_threads(1)

# SEED_LRS: the seed example's initial rates (shared/seed-example.md), in model order.
SEED_NAMES = tuple(SEED_LRS)

# Generous bound for "eventually" waits; never asserted as a duration.
PATIENCE_S = 30.0


def seed_model(seed: int = 0) -> SeedModel:
    torch.manual_seed(seed)
    return SeedModel()


def per_parameter_optimizer(
    model: nn.Module,
    cls: type[torch.optim.Optimizer] = torch.optim.SGD,
    lrs: dict[str, float] | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """The seed recipe: one param group per parameter, default lr=10 that every group overrides."""
    lrs = SEED_LRS if lrs is None else lrs
    groups = [{"params": [p], "lr": lrs[n]} for n, p in model.named_parameters() if n in lrs]
    kwargs.setdefault("lr", 10.0)
    return cls(groups, **kwargs)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor | None = None) -> None:
    """One step of the seed loop (loss = output.sum()), driven by the calling thread."""
    if x is None:
        x = torch.randn(4, 10, dtype=next(model.parameters()).dtype)
    optimizer.zero_grad(set_to_none=True)
    model(x).sum().backward()
    optimizer.step()


def group_lrs(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """name -> lr of the param group that holds it, read straight from the optimizer."""
    lr_of = {id(p): float(g["lr"]) for g in optimizer.param_groups for p in g["params"]}
    return {n: lr_of[id(p)] for n, p in model.named_parameters() if id(p) in lr_of}


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = PATIENCE_S) -> Any:
    """Poll until predicate() is truthy; fail naming `what` if it never is."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


@contextlib.contextmanager
def stepping(optimizer: torch.optim.Optimizer, period_s: float = 0.005) -> Iterator[None]:
    """Call optimizer.step() on a background thread until the block ends.

    The gradients are left as they are (zero gradients keep the weights still while
    lrctl's hook still runs). Fails the test if a step raised: training must never die.
    """
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            while not stop.is_set():
                optimizer.step()
                stop.wait(period_s)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=loop, name="test-stepping", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(PATIENCE_S)
    assert not errors, f"the training loop died: {errors!r}"


class Trainer:
    """The seed training loop on a background thread, stepping every ~2 ms.

    `pause()` returns once the loop is parked between steps (no step in progress and
    none will start until `resume()`); `stop()` ends the thread. Exceptions raised by
    a step are kept in `errors` (a healthy run has none).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, period_s: float = 0.002) -> None:
        self.model = model
        self.optimizer = optimizer
        self.period_s = period_s
        self.errors: list[BaseException] = []
        self._steps = 0
        self._cond = threading.Condition()
        self._stop = False
        self._pause = False
        self._parked = False
        self._gen = torch.Generator().manual_seed(1234)
        self.thread = threading.Thread(target=self._run, name="test-trainer", daemon=True)

    @property
    def steps(self) -> int:
        """optimizer.step() calls completed by the loop."""
        with self._cond:
            return self._steps

    def start(self) -> "Trainer":
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while self._pause and not self._stop:
                        self._parked = True
                        self._cond.notify_all()
                        self._cond.wait()
                    self._parked = False
                    if self._stop:
                        return
                x = torch.randn(4, 10, generator=self._gen)
                train_step(self.model, self.optimizer, x)
                with self._cond:
                    self._steps += 1
                    self._cond.notify_all()
                time.sleep(self.period_s)
        except BaseException as exc:  # surfaced by the tests through `errors`
            self.errors.append(exc)
        finally:
            with self._cond:
                self._cond.notify_all()  # wake waiters: the loop is gone

    def wait_steps(self, n: int = 1, timeout: float = PATIENCE_S) -> int:
        """Wait until the loop has completed `n` more steps; returns the new count."""
        with self._cond:
            target = self._steps + n
            ok = self._cond.wait_for(lambda: self._steps >= target or not self.thread.is_alive(), timeout)
            if not ok or self._steps < target:
                pytest.fail(
                    f"training did not make {n} more step(s) (at {self._steps}, alive="
                    f"{self.thread.is_alive()}, errors={self.errors!r})"
                )
            return self._steps

    def pause(self, timeout: float = PATIENCE_S) -> None:
        with self._cond:
            self._pause = True
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self._parked or not self.thread.is_alive(), timeout):
                pytest.fail("the training loop did not pause")

    def resume(self) -> None:
        with self._cond:
            self._pause = False
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self.thread.join(PATIENCE_S)


class Served:
    """A seed model and optimizer under lrctl, served on a free loopback port."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctl: LRControl) -> None:
        self.model = model
        self.optimizer = optimizer
        self.ctl = ctl
        self.controller = ctl.controller
        self.channel = grpc.insecure_channel(ctl.address)
        self.stub = pb_grpc.LearningRateControlStub(self.channel)

    def step(self, n: int = 1) -> None:
        """Drive `n` optimizer steps from the calling thread."""
        for _ in range(n):
            train_step(self.model, self.optimizer)

    def rates(self) -> dict[str, float]:
        reply = self.stub.GetLearningRates(pb.GetLearningRatesRequest(), timeout=10)
        return {r.name: r.lr for r in reply.rates}

    def close(self) -> None:
        self.channel.close()
        self.ctl.close(grace=0.5)


@pytest.fixture
def served() -> Iterator[Served]:
    """Seed model + SGD (one group per parameter, seed rates) attached and served; no training."""
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    ctl = attach(model, optimizer, address="127.0.0.1:0")
    s = Served(model, optimizer, ctl)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def training(served: Served) -> Iterator[Trainer]:
    """A background loop training `served`; stopped (and checked healthy) at teardown."""
    trainer = Trainer(served.model, served.optimizer).start()
    try:
        trainer.wait_steps(1)
        yield trainer
    finally:
        trainer.stop()
    assert not trainer.errors, f"the training loop raised: {trainer.errors!r}"


def absolute(selector: str, value: float) -> pb.LearningRateUpdate:
    return pb.LearningRateUpdate(selector=selector, mode=pb.UPDATE_MODE_ABSOLUTE, value=value)


def scale(selector: str, value: float) -> pb.LearningRateUpdate:
    return pb.LearningRateUpdate(selector=selector, mode=pb.UPDATE_MODE_SCALE, value=value)


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    """Run a stub call that must fail; return its error (fails the test on success)."""
    try:
        reply = call()
    except grpc.RpcError as exc:
        return exc
    pytest.fail(f"expected an error status, got OK: {reply!r}")


LRCTL = [sys.executable, "-m", "lrctl.client.cli"]


class MetricsFollower:
    """Follows a worker's WatchMetrics stream from step 0 on a thread until the worker
    ends it: `metrics` maps step -> name -> value, `changes` the change records seen.
    The stream ending with the worker (UNAVAILABLE, CANCELLED) is normal; any other
    error is raised by join()."""

    def __init__(self, patience: float = 120.0) -> None:
        self.patience = patience
        self.metrics: dict[int, dict[str, float]] = {}
        self.changes: list[Any] = []
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def start(self, address: str) -> None:
        self.thread = threading.Thread(target=self._follow, args=(address,), daemon=True)
        self.thread.start()

    def _follow(self, address: str) -> None:
        from lrctl.client import LRClient

        try:
            with LRClient(address, timeout=30) as client:
                for event in client.watch_metrics(from_step=0, timeout=self.patience):
                    self.metrics.setdefault(event.step, {}).update(event.metrics)
                    self.changes.extend(event.changes)
        except BaseException as exc:  # the stream ends with the server; anything else is kept
            if "UNAVAILABLE" not in repr(exc) and "CANCELLED" not in repr(exc):
                self.error = exc

    def join(self) -> None:
        assert self.thread is not None
        self.thread.join(self.patience)
        assert not self.thread.is_alive(), "the watch stream did not end with the run"
        if self.error is not None:
            raise self.error


def first_line(stream: Any) -> str:
    """A pipe's first line, read byte by byte from its descriptor: communicate() reads
    the descriptor too, so what a buffered readline() kept past the line would be lost."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(stream.fileno(), 1)
        if not chunk:
            break
        data += chunk
    return data.decode()


def start_demo_worker(*extra: str) -> tuple[subprocess.Popen, str]:
    """`lrctl demo --serve` on a free loopback port: the process and its address."""
    proc = subprocess.Popen(
        [*LRCTL, "demo", "--serve", "--address", "127.0.0.1:0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    first = first_line(proc.stdout)
    match = re.search(r"on (127\.0\.0\.1:\d+)", first)
    if not match:
        proc.kill()
        pytest.fail(f"no address in {first!r}; stderr: {proc.stderr.read() if proc.stderr else ''}")
    return proc, match.group(1)


def run_cli(address: str, *args: str) -> subprocess.CompletedProcess:
    """The CLI as a subprocess against `address`."""
    return subprocess.run([*LRCTL, "--address", address, *args], capture_output=True, text=True, timeout=60)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    """stdout of a CLI run that must have succeeded quietly."""
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr}"
    assert proc.stderr == ""
    return proc.stdout


def assert_error(proc: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    """The run failed with `code` and exactly one "lrctl: error:" line naming `fragments`."""
    assert proc.returncode == code, f"exit {proc.returncode}, wanted {code}: {proc.stderr}"
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lrctl: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def table(text: str) -> list[list[str]]:
    """Rows of a human table split on runs of two or more spaces (cells may hold one)."""
    return [re.split(r"\s{2,}", line.strip()) for line in text.strip().splitlines()]


@contextlib.contextmanager
def in_both_modes(make: Callable[[str], Any]) -> Iterator[tuple[Any, Any]]:
    """Two workers made by make(serving): in-process and with a serving process (the
    same state, to compare answers); each closed (its close()) afterwards."""
    made = []
    try:
        for serving in ("inprocess", "process"):
            made.append(make(serving))
        yield made[0], made[1]
    finally:
        for worker in made:
            worker.close()
