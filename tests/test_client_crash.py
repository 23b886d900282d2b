"""Clients that die or freeze mid-wait: the worker is unaffected and a withdrawn change
never appears.

Each client is a real subprocess using LRClient: it reads the worker's step, prints
"sent ..." and sends a waiting Set due a few thousand steps later. The test then
SIGKILLs it (the connection closes, grpc.aio cancels the handler, the service withdraws
the change under the controller's lock) or SIGSTOPs it past its deadline (the worker
withdraws at the deadline on its own; the frozen client hears DeadlineExceeded once it
resumes). Afterwards training is driven past the change's step: the change is in
neither the queue nor the history, the rates are untouched, no waiting slot is left
taken, health is SERVING and a fresh client still reads and writes.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lrctl.client import LRClient
from lrctl.server import attach
from lrctl.server.control import LRControl
from lrctl.server.factory import SERVICE_NAME
from conftest import PATIENCE_S, Trainer, group_lrs, per_parameter_optimizer, seed_model, wait_for

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs POSIX signals")

# Far enough ahead that training (~3 ms a step) cannot reach it while a client starts,
# sends and is killed or stopped past its deadline; the test then drives the steps
# past it itself (~50 us each).
AT_STEP_AHEAD = 10_000

# argv: address, timeout, threads, reason prefix, steps ahead. Each thread has its
# own LRClient (own channel) and sends one waiting Set; the output says how it ended.
CLIENT = r"""
import sys, threading
from lrctl.client import LRClient

address, timeout, threads, prefix = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ahead = int(sys.argv[5])
lock = threading.Lock()

def say(line):
    with lock:
        print(line, flush=True)

def victim(k):
    client = LRClient(address, timeout=timeout)
    at_step = client.status().step + ahead
    say(f"sent {k} {at_step}")
    try:
        result = client.set_learning_rates(
            {"layer1.weight": 0.5}, at_step=at_step, reason=f"{prefix}-{k}")
    except Exception as exc:
        say(f"error {k} {type(exc).__name__}: {exc}")
    else:
        say(f"applied {k} {result.change_id}")

workers = [threading.Thread(target=victim, args=(k,)) for k in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
"""


class Worker:
    """The seed model under lrctl, served on a free port, trained on a background thread."""

    def __init__(self) -> None:
        self.model = seed_model()
        self.optimizer = per_parameter_optimizer(self.model)
        self.ctl: LRControl = attach(self.model, self.optimizer, address="127.0.0.1:0")
        self.trainer = Trainer(self.model, self.optimizer, period_s=0.003).start()
        self.trainer.wait_steps(1)

    def pending_reasons(self, prefix: str) -> list[str]:
        return [v.request.reason for v in self.ctl.controller.pending() if v.request.reason.startswith(prefix)]

    def history_reasons(self, prefix: str) -> list[str]:
        page = self.ctl.controller.history_page(0, 0, 1_000_000)
        return [r.reason for r in page.records if r.reason.startswith(prefix)]

    def run_past(self, at_step: int) -> None:
        """Drive optimizer steps until lrctl's step is past `at_step` (the background
        loop paused meanwhile: one thread steps at a time), then let it train on."""
        self.trainer.pause()
        try:
            self.optimizer.zero_grad(set_to_none=True)  # the hook runs; weights stay
            while self.ctl.step <= at_step + 1:
                self.optimizer.step()
        finally:
            self.trainer.resume()
        self.trainer.wait_steps(5)

    def close(self) -> None:
        self.trainer.stop()
        self.ctl.close(grace=0.5)
        assert not self.trainer.errors, f"the training loop raised: {self.trainer.errors!r}"


@pytest.fixture
def worker(caplog: pytest.LogCaptureFixture) -> Iterator[Worker]:
    w = Worker()
    try:
        yield w
    finally:
        w.close()
    # A vanished caller is routine: nothing logged as an error (lrctl, grpc, asyncio's
    # "exception never retrieved").
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, "the worker logged errors:\n" + "\n".join(r.getMessage() for r in errors)


class Client:
    """A client subprocess (CLIENT) whose stdout lines are collected on a thread."""

    def __init__(self, address: str, *, timeout: float, threads: int, prefix: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT, address, str(timeout), str(threads), prefix, str(AT_STEP_AHEAD)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def sent(self) -> list[str]:
        return [line for line in self.lines if line.startswith("sent ")]

    def at_steps(self) -> list[int]:
        return [int(line.split()[2]) for line in self.sent()]

    def finish(self) -> tuple[int, list[str], str]:
        """Wait for the process to end; (exit code, stdout lines, stderr)."""
        code = self.proc.wait(PATIENCE_S)
        self._reader.join(PATIENCE_S)
        assert self.proc.stderr is not None
        return code, list(self.lines), self.proc.stderr.read()

    def kill(self) -> None:
        """SIGKILL if still running (after SIGCONT, should it be stopped); reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(PATIENCE_S)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _stopped(pid: int) -> bool:
    """Whether the process is in the stopped state (Linux /proc; True elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except FileNotFoundError:
        return False


def _assert_healthy(w: Worker, before_step: int) -> None:
    """Training advanced, health says SERVING, and a fresh client writes and reads."""
    assert w.ctl.step > before_step
    assert not w.trainer.errors
    with grpc.insecure_channel(w.ctl.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=PATIENCE_S)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with LRClient(w.ctl.address, timeout=PATIENCE_S) as client:
        result = client.set_learning_rates({"layer2.bias": 0.75}, reason="after-the-crash")
        assert result.applied
        assert client.get_learning_rates("layer2.bias") == {"layer2.bias": 0.75}
        assert [c.reason for c in client.list_changes()][-1:] == ["after-the-crash"]
    assert group_lrs(w.model, w.optimizer)["layer2.bias"] == 0.75


def _assert_withdrawn(w: Worker, prefix: str, at_step: int, rates_before: dict[str, float]) -> None:
    """Nothing of `prefix` queued, waiting or recorded, even once training passed at_step."""
    wait_for(lambda: not w.pending_reasons(prefix), f"the {prefix} changes to be withdrawn")
    wait_for(lambda: w.ctl.service.waiting.waiting == 0, "every waiting slot to be freed")
    w.run_past(at_step)
    assert w.pending_reasons(prefix) == []
    assert w.history_reasons(prefix) == []
    with LRClient(w.ctl.address, timeout=PATIENCE_S) as client:
        assert [c.reason for c in client.list_changes() if c.reason.startswith(prefix)] == []
        assert client.list_pending() == []
    assert group_lrs(w.model, w.optimizer) == rates_before
    assert w.ctl.service.waiting.waiting == 0


def test_sigkill_mid_wait_withdraws_the_change(worker: Worker) -> None:
    rates_before = group_lrs(worker.model, worker.optimizer)
    step_before = worker.ctl.step
    client = Client(worker.ctl.address, timeout=600, threads=1, prefix="crash-victim-kill")
    try:
        wait_for(client.sent, "the client to send its waiting Set")
        wait_for(lambda: worker.pending_reasons("crash-victim-kill") == ["crash-victim-kill-0"],
                 "the victim's change to be queued")
        wait_for(lambda: worker.ctl.service.waiting.waiting == 1, "the victim's call to wait")
        (at_step,) = client.at_steps()
        assert worker.ctl.step < at_step  # still mid-wait: due far ahead
        client.proc.kill()
        assert client.proc.wait(PATIENCE_S) == -signal.SIGKILL
        _assert_withdrawn(worker, "crash-victim-kill", at_step, rates_before)
    finally:
        client.kill()
    assert not [line for line in client.lines if not line.startswith("sent ")]  # it never heard back
    _assert_healthy(worker, step_before)


def test_sigstop_past_deadline_withdraws_at_the_deadline(worker: Worker) -> None:
    rates_before = group_lrs(worker.model, worker.optimizer)
    step_before = worker.ctl.step
    timeout = 4.0
    client = Client(worker.ctl.address, timeout=timeout, threads=1, prefix="crash-victim-stop")
    try:
        wait_for(client.sent, "the client to send its waiting Set")
        sent_at = time.monotonic()
        wait_for(lambda: worker.pending_reasons("crash-victim-stop"), "the victim's change to be queued")
        client.proc.send_signal(signal.SIGSTOP)
        wait_for(lambda: _stopped(client.proc.pid), "the client to be stopped")
        (at_step,) = client.at_steps()
        # The worker withdraws at the deadline by itself, the client frozen meanwhile.
        wait_for(lambda: not worker.pending_reasons("crash-victim-stop"),
                 "the worker to withdraw the change at its deadline")
        wait_for(lambda: worker.ctl.service.waiting.waiting == 0, "the waiting slot to be freed")
        # Frozen past its own deadline too (a bounded wait, not a timing assertion).
        wait_for(lambda: time.monotonic() > sent_at + timeout + 0.5, "the client's deadline to pass")
        assert _stopped(client.proc.pid) and client.proc.poll() is None
        assert worker.ctl.step < at_step
        client.proc.send_signal(signal.SIGCONT)
        code, lines, stderr = client.finish()
        assert code == 0, stderr
        (outcome,) = [line for line in lines if not line.startswith("sent ")]
        # Its own deadline fires first once it runs again (the worker's answer, sent
        # while it was frozen, says the same: withdrawn, not applied).
        assert outcome.startswith("error 0 DeadlineExceededError: "), outcome
        _assert_withdrawn(worker, "crash-victim-stop", at_step, rates_before)
    finally:
        client.kill()
    _assert_healthy(worker, step_before)


def test_twenty_clients_killed_at_once_leave_nothing_behind(worker: Worker) -> None:
    rates_before = group_lrs(worker.model, worker.optimizer)
    step_before = worker.ctl.step
    # 4 processes x 5 threads: several connections, several callers on each.
    clients = [
        Client(worker.ctl.address, timeout=600, threads=5, prefix=f"crash-victim-many{p}")
        for p in range(4)
    ]
    try:
        wait_for(lambda: all(len(c.sent()) == 5 for c in clients), "every thread to send its waiting Set")
        wait_for(lambda: len(worker.pending_reasons("crash-victim-many")) == 20,
                 "the 20 victims' changes to be queued")
        wait_for(lambda: worker.ctl.service.waiting.waiting == 20, "the 20 calls to wait")
        at_step = max(s for c in clients for s in c.at_steps())
        assert worker.ctl.step < min(s for c in clients for s in c.at_steps())
        for c in clients:
            c.proc.kill()
        for c in clients:
            assert c.proc.wait(PATIENCE_S) == -signal.SIGKILL
        _assert_withdrawn(worker, "crash-victim-many", at_step, rates_before)
    finally:
        for c in clients:
            c.kill()
    _assert_healthy(worker, step_before)
