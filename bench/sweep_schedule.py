"""The baseline of the controller table: sweep the warmup + cosine peak rate per task.

For each task: the peak rate on a log grid (`--points` values, a factor 10^(1/3)
apart, centred on the task's center_lr), `--seeds` seeds each, every run a real lrctl
worker (`bench/task_worker.py`), `--jobs` at a time. The best peak is the lowest mean
final validation loss; then the same fixed schedule runs at 0.1x and 10x of the best
(with 7 points these are on the grid when the best is the centre). A diverged run
counts as an infinite loss.

Every run is cached as one JSON file, bench/results/runs/TASK/steps-N/lr-LR_seed-S.json
(LR printed to 3 significant digits), and is never run again: a sweep that was
stopped resumes where it was, and a later controller table reuses these runs as its
baseline. The summary per task goes to bench/results/schedule_TASK.json, and a table
to stdout.

    python bench/sweep_schedule.py                       # both tasks, 7 x 3 seeds, + ends
    python bench/sweep_schedule.py --tasks digits --seeds 1
    python bench/sweep_schedule.py --steps 20 --points 3 --seeds 1 --results /tmp/r   # smoke
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from tasks import TASKS, get_task  # noqa: E402

WORKER = BENCH / "task_worker.py"
STEP_EXPONENT = 1.0 / 3.0  # grid points a factor 10^(1/3) = 2.15 apart


def lr_key(lr: float) -> str:
    """The canonical spelling of a rate: 3 significant digits (the cache key)."""
    return f"{lr:.3g}"


def grid(center: float, points: int) -> list[float]:
    """`points` rates, a factor 10^(1/3) apart, centred on `center` (3 significant digits)."""
    half = (points - 1) / 2
    return [float(lr_key(center * 10 ** ((k - half) * STEP_EXPONENT))) for k in range(points)]


class Runs:
    """The cache of single runs: one JSON file per (task, steps, lr, seed)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, task: str, steps: int, lr: float, seed: int) -> Path:
        return self.root / "runs" / task / f"steps-{steps}" / f"lr-{lr_key(lr)}_seed-{seed}.json"

    def get(self, task: str, steps: int, lr: float, seed: int) -> dict[str, Any] | None:
        path = self.path(task, steps, lr, seed)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:  # a torn file from a killed sweep: run it again
            return None

    def put(self, result: dict[str, Any]) -> None:
        path = self.path(result["task"], result["steps_asked"], result["peak_lr"], result["seed"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result) + "\n")
        os.replace(tmp, path)  # atomic: a killed sweep leaves no half-written result


def run_one(task: str, steps: int, lr: float, seed: int, timeout: float) -> dict[str, Any]:
    """One task_worker process to the end; its result line plus how long the process took."""
    cmd = [sys.executable, str(WORKER), "--task", task, "--steps", str(steps),
           "--peak-lr", lr_key(lr), "--seed", str(seed)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    results = [json.loads(line) for line in done.stdout.splitlines()
               if line.startswith("{") and '"event": "result"' in line]
    if done.returncode != 0 or not results:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed (exit {done.returncode}): {done.stderr[-1500:]}")
    result = results[-1]
    result.update(steps_asked=steps, peak_lr=float(lr_key(lr)), process_s=round(elapsed, 2),
                  finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return result


def loss_of(result: dict[str, Any]) -> float:
    value = result.get("final_val_loss")
    return math.inf if value is None or result.get("diverged") else float(value)


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    losses = [loss_of(r) for r in results]
    finite = all(math.isfinite(x) for x in losses)
    return {
        "seeds": [r["seed"] for r in results],
        "final_val_loss": [None if not math.isfinite(x) else x for x in losses],
        "mean": statistics.fmean(losses) if finite else None,
        "std": statistics.stdev(losses) if finite and len(losses) > 1 else (0.0 if finite else None),
        "diverged": sum(not math.isfinite(x) for x in losses),
        "train_loss": [r.get("train_loss") for r in results],
        "wall_s": [r.get("wall_s") for r in results],
        "process_s": [r.get("process_s") for r in results],
    }


def _mean_key(summary: dict[str, Any]) -> float:
    return math.inf if summary["mean"] is None else summary["mean"]


class Sweep:
    def __init__(self, runs: Runs, jobs: int, timeout: float) -> None:
        self.runs, self.jobs, self.timeout = runs, jobs, timeout
        self.ran = self.cached = 0

    def results(self, task: str, steps: int, lrs: list[float], seeds: list[int]) -> dict[float, list[dict]]:
        """Every (lr, seed) run: from the cache, else run (`jobs` at once) and cached."""
        found: dict[tuple[float, int], dict] = {}
        todo = []
        for lr in lrs:
            for seed in seeds:
                hit = self.runs.get(task, steps, lr, seed)
                if hit is not None:
                    found[(lr, seed)] = hit
                    self.cached += 1
                else:
                    todo.append((lr, seed))
        with futures.ThreadPoolExecutor(max_workers=self.jobs) as pool:
            running = {pool.submit(run_one, task, steps, lr, seed, self.timeout): (lr, seed) for lr, seed in todo}
            for future in futures.as_completed(running):
                lr, seed = running[future]
                result = future.result()
                self.runs.put(result)
                found[(lr, seed)] = result
                self.ran += 1
                print(f"  ran {task} lr {lr_key(lr)} seed {seed}: val {result['final_val_loss']} "
                      f"({result['wall_s']} s training, {result['process_s']} s process)", file=sys.stderr,
                      flush=True)
        return {lr: [found[(lr, s)] for s in seeds] for lr in lrs}

    def task(self, name: str, steps: int, points: int, seeds: list[int]) -> dict[str, Any]:
        task = get_task(name)
        lrs = grid(task.center_lr, points)
        by_lr = self.results(name, steps, lrs, seeds)
        rows = {lr_key(lr): summarize(by_lr[lr]) for lr in lrs}
        best = min(lrs, key=lambda lr: _mean_key(rows[lr_key(lr)]))
        ends = {"0.1x": float(lr_key(best * 0.1)), "10x": float(lr_key(best * 10))}
        end_runs = self.results(name, steps, list(ends.values()), seeds)
        return {
            "task": name, "steps": steps, "warmup_steps": task.warmup_steps_for(steps),
            "schedule": task.schedule(steps).to_dict(), "seeds": seeds,
            "grid": [{"peak_lr": lr, **rows[lr_key(lr)]} for lr in lrs],
            "best_peak_lr": best, "best": rows[lr_key(best)],
            "ends": {label: {"peak_lr": lr, **summarize(end_runs[lr])} for label, lr in ends.items()},
        }


def _fmt(value: float | None, digits: int = 4) -> str:
    return "diverged" if value is None else f"{value:.{digits}f}"


def table(summary: dict[str, Any]) -> str:
    lines = [f"{summary['task']}: {summary['steps']} steps (warmup {summary['warmup_steps']}, cosine to 0.1x), "
             f"seeds {summary['seeds']}", "",
             f"  {'peak lr':>9}  {'mean val':>9}  {'std':>7}  {'per seed':<32}  {'s/run':>6}"]
    best_mean = summary["best"]["mean"]

    def row(label: str, entry: dict[str, Any], mark: str = "") -> str:
        per_seed = " ".join(_fmt(x) for x in entry["final_val_loss"])
        walls = [w for w in entry["process_s"] if w is not None]
        rel = ""
        if entry["mean"] is not None and best_mean:
            rel = f"  {100 * (entry['mean'] / best_mean - 1):+.1f}% vs best"
        return (f"  {lr_key(entry['peak_lr']):>9}  {_fmt(entry['mean']):>9}  "
                f"{_fmt(entry['std'], 4) if entry['std'] is not None else '-':>7}  {per_seed:<32}  "
                f"{statistics.fmean(walls) if walls else math.nan:6.1f}{mark}{label}{rel}")

    for entry in summary["grid"]:
        lines.append(row("", entry, "  <- best" if entry["peak_lr"] == summary["best_peak_lr"] else ""))
    lines.append("")
    lines.append("  fixed schedule at 0.1x / 1x / 10x of the best peak:")
    lines.append(row("  0.1x", summary["ends"]["0.1x"]))
    lines.append(row("  1x", {"peak_lr": summary["best_peak_lr"], **summary["best"]}))
    lines.append(row("  10x", summary["ends"]["10x"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=sorted(TASKS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--points", type=int, default=7, help="grid points (default 7)")
    parser.add_argument("--steps", type=int, default=None, help="override every task's budget (smoke runs)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default 2: this machine's cores)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before one run is given up")
    parser.add_argument("--results", type=Path, default=BENCH / "results", help="default bench/results")
    args = parser.parse_args(argv)
    for flag in ("seeds", "points", "jobs"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} {getattr(args, flag)} must be at least 1")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps {args.steps} must be at least 1")

    sweep = Sweep(Runs(args.results), args.jobs, args.timeout)
    started = time.perf_counter()
    seeds = list(range(args.seeds))
    for name in args.tasks:
        steps = get_task(name).steps if args.steps is None else args.steps
        task_started = time.perf_counter()
        summary = sweep.task(name, steps, args.points, seeds)
        summary["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(), "jobs": args.jobs,
                              "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        args.results.mkdir(parents=True, exist_ok=True)
        suffix = "" if args.steps is None else f"_steps-{steps}"
        out = args.results / f"schedule_{name}{suffix}.json"
        out.write_text(json.dumps(summary, indent=1) + "\n")
        print(table(summary))
        print(f"  ({time.perf_counter() - task_started:.0f} s for this task; summary in {out})\n", flush=True)
    print(f"{sweep.ran} run(s) ran, {sweep.cached} from the cache, in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
