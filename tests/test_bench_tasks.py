"""The controller benchmark tasks (bench/tasks, bench/task_worker.py) run as real workers.

Each task trains a few steps in its own process behind the start barrier; a real client
queues a base change for a known step before the barrier opens, and the per-step rates
in the result prove that it reached the optimizer at exactly that step, on top of the
worker's own warmup + cosine. A bad change is refused and changes nothing. The sweep's
cache is exercised on a tiny run. No timing is asserted.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from lrctl.client.client import LRClient
from lrctl.client.errors import InvalidArgumentError, NotFoundError
from lrctl.common.schedules import schedule_from_dict

BENCH = Path(__file__).resolve().parents[1] / "bench"
WORKER = BENCH / "task_worker.py"
PATIENCE_S = 240.0  # process start (torch, grpc, sklearn) on a loaded 2-core machine


class Worker:
    """bench/task_worker.py in a subprocess: the serving line, then the result line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(WORKER), *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def line(self) -> dict[str, Any]:
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(PATIENCE_S)
        assert box and box[0], f"no line from the task worker; stderr: {''.join(self.stderr)[-3000:]}"
        return json.loads(box[0])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(PATIENCE_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.mark.parametrize("task,steps,change_at", [("chargpt", 12, 5), ("digits", 60, 20)])
def test_task_runs_as_a_worker_and_a_client_change_reaches_it(tmp_path: Path, task: str, steps: int,
                                                              change_at: int) -> None:
    start = tmp_path / "go"
    worker = Worker("--task", task, "--steps", str(steps), "--seed", "1", "--eval-every", "5",
                    "--start-file", str(start), "--start-timeout", str(PATIENCE_S), "--hold-at-end", "600")
    try:
        info = worker.line()
        assert info["event"] == "serving" and info["task"] == task and info["steps"] == steps
        host, port = info["address"].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        name = info["rate_name"]
        assert name in info["names"]
        schedule = schedule_from_dict(info["schedule"])
        new_base = info["peak_lr"] * 0.5
        with LRClient(info["address"], timeout=60) as client:
            # Bad changes are refused and queue nothing.
            with pytest.raises(NotFoundError, match="no_such_weight"):
                client.set_learning_rates({"no_such_weight": 0.1}, at_step=change_at, wait=False)
            with pytest.raises(InvalidArgumentError, match="-1"):
                client.set_learning_rates({name: -1.0}, at_step=change_at, wait=False)
            client.set_learning_rates({name: new_base}, at_step=change_at, wait=False,
                                      reason="test: halve the base")
            start.touch()  # the start barrier: training begins
            result = worker.line()
            status = client.status()
            rates = client.get_learning_rates(name)
            schedules = {s.name: s for s in client.get_schedules(name)}
    finally:
        code = worker.stop()
    assert code == 0, "".join(worker.stderr)[-3000:]

    assert result["event"] == "result" and result["task"] == task
    assert result["steps"] == steps and not result["stopped_early"] and not result["diverged"]
    assert math.isfinite(result["final_val_loss"]) and math.isfinite(result["train_loss"])
    assert result["wall_s"] > 0 and result["val_curve"][-1][0] == steps
    assert result["version"] == 2  # the worker's schedule (step 0) and the client's change
    assert status.step == steps and status.version == 2
    per_step = result["rates"]
    assert len(per_step) == steps
    for step, rate in enumerate(per_step):
        base = new_base if step >= change_at else info["peak_lr"]
        assert rate == pytest.approx(base * schedule.factor(step), rel=1e-5), step
    assert rates[name] == pytest.approx(new_base * schedule.factor(steps), rel=1e-9)
    assert schedules[name].schedule == schedule and schedules[name].base == pytest.approx(new_base)


def test_task_worker_refuses_bad_arguments() -> None:
    for args, word in ((["--task", "nope"], "nope"), (["--task", "digits", "--peak-lr", "-1"], "-1"),
                       (["--task", "digits", "--peak-lr", "nan"], "nan"), (["--task", "digits", "--steps", "0"], "0"),
                       (["--task", "digits", "--address", "0.0.0.0:0"], "0.0.0.0:0")):
        done = subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True,
                              timeout=PATIENCE_S, stdin=subprocess.DEVNULL)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stdout == ""
        error = [line for line in done.stderr.splitlines() if "error" in line]
        assert len(error) == 1 and word in error[0], (args, done.stderr)
        assert "Traceback" not in done.stderr


def test_sweep_caches_each_run(tmp_path: Path) -> None:
    cmd = [sys.executable, str(BENCH / "sweep_schedule.py"), "--tasks", "digits", "--steps", "3",
           "--points", "1", "--seeds", "1", "--results", str(tmp_path)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=PATIENCE_S * 2)
    assert first.returncode == 0, first.stderr
    assert "3 run(s) ran, 0 from the cache" in first.stdout  # the grid point, 0.1x, 10x
    summary = json.loads((tmp_path / "schedule_digits_steps-3.json").read_text())
    assert summary["best_peak_lr"] == 0.1 and set(summary["ends"]) == {"0.1x", "10x"}
    runs = sorted(p.name for p in (tmp_path / "runs" / "digits" / "steps-3").iterdir())
    assert runs == ["lr-0.01_seed-0.json", "lr-0.1_seed-0.json", "lr-1_seed-0.json"]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=PATIENCE_S)
    assert again.returncode == 0, again.stderr
    assert "0 run(s) ran, 3 from the cache" in again.stdout
