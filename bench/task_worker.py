"""Run one benchmark task (chargpt or digits) as a real lrctl worker.

The job attaches lrctl (127.0.0.1, port 0 unless `--address`) and gives every name
lrctl's own warmup + cosine schedule through lrctl (a change queued for step 0, in the
history as `task_worker`), so an external controller reads and changes rates and
schedule like any client. Tokens, TLS, guardrails and the audit log come from the usual
LRCTL_* environment variables (attach's defaults).

stdout carries exactly two JSON lines:
  1. {"event": "serving", "address", "pid", "task", "seed", "peak_lr", "steps", "names",
     "rate_name", "schedule", "token", "start_file"} once the server is up;
  2. {"event": "result", "final_val_loss", "train_loss", "steps", "wall_s", "val_curve",
     "rate_name", "rates" (its rate at every step), ...} once training ends.
Progress goes to stderr.

`--start-file PATH`: a start barrier. Training waits before step 0 until PATH exists
(a controller creates it once it is connected), at most `--start-timeout` seconds,
after which it starts anyway: a controller that never comes does not stall the job.
`--hold-at-end SECONDS`: keep serving after the result line (a controller reads the
final history), until SIGTERM/SIGINT or the time is up. SIGTERM during training stops it
at the next step; the result then says `"stopped_early": true`.

    python bench/task_worker.py --task digits --peak-lr 0.3 --seed 1
    python bench/task_worker.py --task chargpt --start-file /tmp/go --hold-at-end 30
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `tasks` beside this script

from tasks import TASKS, get_task  # noqa: E402


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds >= 0")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--peak-lr", type=_positive_float, default=None,
                        help="peak of the warmup + cosine schedule (default: the task's center_lr)")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    parser.add_argument("--steps", type=_positive_int, default=None, help="default: the task's budget")
    parser.add_argument("--eval-every", type=_positive_int, default=None,
                        help="validation every N steps (default: the task's); always at the end")
    parser.add_argument("--address", default="127.0.0.1:0", help="where lrctl listens (default 127.0.0.1:0)")
    parser.add_argument("--start-file", default=None, help="wait for this file before step 0")
    parser.add_argument("--start-timeout", type=_seconds, default=60.0,
                        help="start anyway after this many seconds without the start file (default 60)")
    parser.add_argument("--stats-every", type=_positive_int, default=None,
                        help="per-parameter statistics (all of them) every K steps for WatchMetrics "
                             "(default: none; a controller run passes its --every)")
    parser.add_argument("--hold-at-end", type=_seconds, default=0.0,
                        help="keep serving this many seconds after the result (default 0)")
    return parser.parse_args(argv)


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _finite(value: float) -> float | None:
    """JSON has no NaN/inf: a diverged loss is null (and `diverged` says so)."""
    return value if math.isfinite(value) else None


class _RateProbe:
    """The rate the optimizer used for one parameter, read from its param group after a
    step (lrctl may regroup, so the group is found again each time: a handful of groups)."""

    def __init__(self, optimizer: Any, param: Any) -> None:
        self.optimizer, self.param = optimizer, param

    def __call__(self) -> float:
        for group in self.optimizer.param_groups:
            if any(p is self.param for p in group["params"]):
                return float(group["lr"])
        return math.nan


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    task = get_task(args.task)
    peak_lr = task.center_lr if args.peak_lr is None else args.peak_lr
    steps = task.steps if args.steps is None else args.steps
    eval_every = task.eval_every if args.eval_every is None else args.eval_every

    import torch

    from lrctl.server import attach
    from lrctl.server.param_stats import STATS
    from lrctl.server.requests import ChangeRequest, ScheduleUpdate

    torch.set_num_threads(1)
    job = task.build(args.seed, peak_lr)
    schedule = task.schedule(steps)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    try:
        stats = {} if args.stats_every is None else {"stats_every": args.stats_every, "stats": STATS}
        ctl = attach(job.model, job.optimizer, address=args.address, **stats)
    except Exception as exc:  # a bad --address, a busy port, a bad LRCTL_* variable: one line
        print(f"task_worker: error: {exc}", file=sys.stderr)
        return 2
    with ctl:
        names = list(ctl.controller.names)
        # The schedule goes through lrctl like any client's change (history, version),
        # so a controller sees it with `GetSchedules` and can replace it.
        ctl.controller.submit(ChangeRequest(
            updates=(), schedules=(ScheduleUpdate("*", schedule),), at_step=0,
            reason=f"{task.name}: warmup + cosine, peak {peak_lr:g}", user="task_worker"))
        _emit("serving", address=ctl.address, pid=os.getpid(), task=task.name, seed=args.seed,
              peak_lr=peak_lr, steps=steps, names=names, rate_name=task.rate_name,
              schedule=schedule.to_dict(), token=_has_tokens(),
              start_file=args.start_file)

        if args.start_file:
            deadline = time.monotonic() + args.start_timeout
            while not os.path.exists(args.start_file) and time.monotonic() < deadline and not stop.is_set():
                stop.wait(0.02)
            if not os.path.exists(args.start_file):
                print(f"task_worker: no start file after {args.start_timeout:g} s; starting", file=sys.stderr)

        probe = _RateProbe(job.optimizer, dict(job.model.named_parameters())[task.rate_name])
        losses: list[torch.Tensor] = []
        rates: list[float] = []
        val_curve: list[list[Any]] = []
        started = time.perf_counter()
        done = 0
        for step in range(steps):
            if stop.is_set():
                break
            loss = job.train_step()
            losses.append(loss)
            # The step's loss, for WatchMetrics (a detached tensor: no sync here).
            ctl.report(loss, step=ctl.step - 1)
            rates.append(probe())
            done = step + 1
            if done % eval_every == 0 and done < steps:
                val = job.evaluate()
                val_curve.append([done, _finite(val)])
                print(f"task_worker: {task.name} step {done}/{steps} val {val:.4f}", file=sys.stderr, flush=True)
        final_val = job.evaluate()
        val_curve.append([done, _finite(final_val)])
        wall = time.perf_counter() - started
        tail = [float(x) for x in losses[-50:]]
        train_loss = sum(tail) / len(tail) if tail else math.nan
        extra = {"val_accuracy": job.accuracy} if hasattr(job, "accuracy") else {}
        _emit("result", task=task.name, seed=args.seed, peak_lr=peak_lr, steps=done,
              final_val_loss=_finite(final_val), train_loss=_finite(train_loss),
              diverged=not (math.isfinite(final_val) and math.isfinite(train_loss)),
              stopped_early=done < steps, wall_s=round(wall, 3),
              steps_per_s=round(done / wall, 2) if wall > 0 else None, stats_every=args.stats_every,
              version=ctl.controller.version, val_curve=val_curve, rate_name=task.rate_name,
              rates=[float(f"{r:.6g}") for r in rates], **extra)
        if args.hold_at_end > 0:
            stop.wait(args.hold_at_end)
    return 0


def _has_tokens() -> bool:
    from lrctl.server.auth import Tokens

    return Tokens.from_env() is not None


if __name__ == "__main__":
    sys.exit(main())
