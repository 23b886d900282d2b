"""A training worker in its own process, for the load, abuse and long-run benchmarks.

Run as a script, it trains a small model under lrctl (attach, 127.0.0.1 port 0) until
SIGTERM/SIGINT or its stdin closes, and prints one JSON line when it serves
({"address", "pid", "names"}) and one when it stops ({"steps"}). Imported, it gives
`TrainingWorker`, which starts that process, reads its address, samples its resident
memory (/proc/PID/status VmRSS) and always ends it (SIGTERM, then SIGKILL).

    python bench/training_worker.py --depth 8 --step-delay 0.002 --history-limit 50000
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (VmRSS), 0.0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class TrainingWorker:
    """`python training_worker.py ARGS` as a context manager; `.address`, `.rss_mb()`."""

    def __init__(self, *args: str, start_timeout: float = 120.0) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
        )
        self.info: dict[str, Any] = {}
        self.final: dict[str, Any] = {}
        try:
            line = self._readline(start_timeout)
            self.info = json.loads(line)
        except BaseException:
            self.kill()
            raise
        self.address: str = self.info["address"]
        self.names: list[str] = self.info["names"]
        self.pid = self.proc.pid

    def _readline(self, timeout: float) -> str:
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not box or not box[0]:
            raise RuntimeError(f"the training worker did not start: {self.stderr_tail()}")
        return box[0]

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr_tail(self, chars: int = 3000) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read()[-chars:]

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait (SIGKILL after `timeout`); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                out, _ = self.proc.communicate(timeout=timeout)
                lines = [l for l in out.splitlines() if l.startswith("{")]
                if lines:
                    self.final = json.loads(lines[-1])
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> "TrainingWorker":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.kill()
            self._stderr.close()


def _job(depth: int, width: int, extra: int):
    import torch
    from torch import nn

    from lrctl.server.demo import DemoMLP

    torch.manual_seed(0)
    model = DemoMLP(width=width, depth=depth)
    model.encoder.norm.requires_grad_(False)  # frozen: listed, not settable
    if extra:  # many small named tensors: changes and history records with many names
        model.extra = nn.ParameterList(nn.Parameter(torch.zeros(2)) for _ in range(extra))
    held = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(held, lr=1e-3, momentum=0.9)
    x = torch.randn(32, width)
    target = torch.sin(x.sum(dim=1, keepdim=True))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()

    return model, optimizer, step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=8, help="encoder layers (2 names each)")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--extra-tensors", type=int, default=0, help="extra tiny named tensors")
    parser.add_argument("--step-delay", type=float, default=0.002, help="seconds between steps")
    parser.add_argument("--history-limit", type=int, default=10_000, help="attach(history_limit=)")
    args = parser.parse_args(argv)

    import torch

    from lrctl.server import attach

    torch.set_num_threads(1)
    model, optimizer, step = _job(args.depth, args.width, args.extra_tensors)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # The parent going away closes our stdin: stop then too (no orphan worker).
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    steps = 0
    with attach(model, optimizer, address="127.0.0.1:0", history_limit=args.history_limit) as ctl:
        names = [n for n, _ in model.named_parameters()]
        print(json.dumps({"address": ctl.address, "pid": os.getpid(), "num_names": len(names),
                          "names": names if len(names) <= 1000 else names[:1000]}), flush=True)
        while not stop.is_set():
            step()
            steps += 1
            if args.step_delay > 0:
                stop.wait(args.step_delay)
    print(json.dumps({"steps": steps}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
