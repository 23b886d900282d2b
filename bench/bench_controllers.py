"""The controller table (issue 14): tasks x starts x controllers x seeds.

For each task, the starting peak rates are 0.1x, 1x and 10x of the swept best
(`best_peak_lr` in bench/results/schedule_TASK.json, from sweep_schedule.py). At each
start, every example controller (examples/controllers/) drives a real worker
(bench/task_worker.py) from step 0 with the same constants (no per-start or per-task
tuning), and the fixed schedule is the sweep's own run at that rate (its cache,
bench/results/runs/, run here if missing). A controller run is:

    task_worker --task T --peak-lr START --seed S --stats-every STATS --start-file F
    python examples/controllers/C.py --address ADDR --start-file F --every K [--lockstep-timeout T]

The worker waits for F (the controller creates it once subscribed); the controller
exits 0 when the worker ends. Each run is cached as
bench/results/controllers/TASK/steps-N/CONTROLLER_lr-LR_seed-S.json and never run
again. Reported per (task, start, controller): mean final val loss over the seeds,
its ratio to the swept best (the fixed schedule at 1x), PASS when within 2%, and the
training speed with the controller (stats, stream, lockstep holds and changes) over
the fixed schedule's at the same start (steps/s ratio; >1 means slower with it).

    python bench/bench_controllers.py                              # everything (hours on 2 busy cores)
    python bench/bench_controllers.py --tasks digits --jobs 2
    python bench/bench_controllers.py --tasks digits --seeds 100 --controllers hypergradient   # tuning seeds
    python bench/bench_controllers.py --quick      # smoke: digits, 40 steps, 1x, seed 0, in a temp dir
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from sweep_schedule import Runs, loss_of, lr_key, run_one  # noqa: E402
from tasks import TASKS, get_task  # noqa: E402

WORKER = BENCH / "task_worker.py"
EXAMPLES = BENCH.parent / "examples" / "controllers"
CONTROLLERS = ("plateau", "layerwise_dog", "hypergradient", "ratio_warmup")
# Examples that are not in the default table (run them with --controllers NAME).
EXPERIMENTS = ("probe_warmup",)
STARTS = (0.1, 1.0, 10.0)
PASS_RATIO = 1.02
# Every controller decides every EVERY steps with lockstep (a hold of at most
# LOCKSTEP_TIMEOUT s per decision, so a change lands at the step it was decided for),
# and the worker computes every statistic every STATS_EVERY steps.
EVERY = {"chargpt": 5, "digits": 10}
STATS_EVERY = 1
LOCKSTEP_TIMEOUT = 2.0


def ctl_path(root: Path, task: str, steps: int, controller: str, lr: float, seed: int) -> Path:
    return root / "controllers" / task / f"steps-{steps}" / f"{controller}_lr-{lr_key(lr)}_seed-{seed}.json"


def run_controlled(task: str, steps: int, lr: float, seed: int, controller: str, every: int,
                   lockstep: float | None, timeout: float) -> dict[str, Any]:
    """One worker driven by one example controller, both to the end."""
    with tempfile.TemporaryDirectory(prefix="lrctl-ctl-") as tmp:
        start_file = os.path.join(tmp, "go")
        worker = subprocess.Popen(
            [sys.executable, str(WORKER), "--task", task, "--steps", str(steps), "--peak-lr", lr_key(lr),
             "--seed", str(seed), "--stats-every", str(STATS_EVERY), "--start-file", start_file,
             "--start-timeout", "120"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, stdin=subprocess.DEVNULL)
        ctl = None
        started = time.perf_counter()
        try:
            serving = json.loads(worker.stdout.readline())
            cmd = [sys.executable, str(EXAMPLES / f"{controller}.py"), "--address", serving["address"],
                   "--start-file", start_file, "--every", str(every)]
            if lockstep:
                cmd += ["--lockstep-timeout", str(lockstep)]
            log = open(os.path.join(tmp, "ctl.log"), "w+")
            ctl = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL)
            out, _ = worker.communicate(timeout=timeout)
            code = ctl.wait(timeout=60)
            log.seek(0)
            lines = log.read().splitlines()
        finally:
            for proc in (worker, ctl):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
        results = [json.loads(line) for line in out.splitlines() if '"event": "result"' in line]
        if not results:
            raise RuntimeError(f"{task} {controller} lr {lr} seed {seed}: no result; controller said: {lines[-5:]}")
        result = results[-1]
        result.pop("rates", None)  # per-step rates are in the sweep's runs; keep these files small
        result.update(controller=controller, every=every, lockstep_timeout=lockstep, stats_every=STATS_EVERY,
                      steps_asked=steps, peak_lr=float(lr_key(lr)), controller_exit=code,
                      controller_lines=len(lines), controller_tail=lines[-3:], controller_log=lines,
                      process_s=round(time.perf_counter() - started, 2),
                      finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=sorted(TASKS), choices=sorted(TASKS))
    parser.add_argument("--controllers", nargs="+", default=list(CONTROLLERS), choices=CONTROLLERS + EXPERIMENTS)
    parser.add_argument("--starts", nargs="+", type=float, default=list(STARTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="default: the task's budget")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--no-lockstep", action="store_true", help="controllers decide from the stream only")
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per run, seconds")
    parser.add_argument("--dry-run", action="store_true", help="print the table from the cache; run nothing")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: digits, 40 steps, seed 0, start 1x, each controller, in a temp dir")
    args = parser.parse_args(argv)
    if args.quick:
        tmp = tempfile.mkdtemp(prefix="lrctl-bench-ctl-")
        args.tasks, args.starts, args.seeds, args.steps, args.results = ["digits"], [1.0], [0], 40, Path(tmp)
    runs = Runs(args.results)

    plan: list[tuple[str, Any]] = []
    rows = []
    for name in args.tasks:
        task = get_task(name)
        steps = args.steps or task.steps
        summary_path = args.results / f"schedule_{name}.json"
        best = json.loads(summary_path.read_text())["best_peak_lr"] if summary_path.exists() else task.center_lr
        for start in args.starts:
            lr = float(lr_key(best * start))
            for seed in args.seeds:
                if runs.get(name, steps, lr, seed) is None:
                    plan.append(("schedule", (name, steps, lr, seed)))
                for c in args.controllers:
                    if not ctl_path(args.results, name, steps, c, lr, seed).exists():
                        plan.append((c, (name, steps, lr, seed)))
            rows.append((name, steps, best, start, lr))
    if not args.dry_run and plan:
        print(f"{len(plan)} run(s) to do, {args.jobs} at a time", file=sys.stderr, flush=True)
        with futures.ThreadPoolExecutor(args.jobs) as pool:
            jobs = {}
            for kind, (name, steps, lr, seed) in plan:
                if kind == "schedule":
                    jobs[pool.submit(run_one, name, steps, lr, seed, args.timeout)] = (kind, name, steps, lr, seed)
                else:
                    lock = None if args.no_lockstep else LOCKSTEP_TIMEOUT
                    jobs[pool.submit(run_controlled, name, steps, lr, seed, kind, EVERY[name], lock,
                                     args.timeout)] = (kind, name, steps, lr, seed)
            for done in futures.as_completed(jobs):
                kind, name, steps, lr, seed = jobs[done]
                try:
                    result = done.result()
                except Exception as exc:  # one failed run is reported, the table goes on
                    print(f"FAILED {kind} {name} lr {lr} seed {seed}: {exc}", file=sys.stderr, flush=True)
                    continue
                if kind == "schedule":
                    runs.put(result)
                else:
                    path = ctl_path(args.results, name, steps, kind, lr, seed)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    # The controller's decision lines beside the result (for reading, not the table).
                    path.with_suffix(".log").write_text("\n".join(result.pop("controller_log")) + "\n")
                    path.write_text(json.dumps(result) + "\n")
                print(f"done {kind} {name} lr {lr} seed {seed}: val {result.get('final_val_loss')}",
                      file=sys.stderr, flush=True)
    print(table(args, runs, rows))
    if args.quick:
        shutil.rmtree(args.results, ignore_errors=True)
    return 0


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values and all(math.isfinite(v) for v in values) else math.inf


def table(args: argparse.Namespace, runs: Runs, rows: list[tuple[str, int, float, float, float]]) -> str:
    out = ["| task | start | peak lr | controller | seeds | mean final val loss | / swept best | within 2% | steps/s vs fixed |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, steps, best, start, lr in rows:
        ref = [runs.get(name, steps, float(lr_key(best)), s) for s in args.seeds]
        ref_loss = _mean([loss_of(r) for r in ref if r]) if all(ref) else math.nan
        fixed = [runs.get(name, steps, lr, s) for s in args.seeds]
        fixed = [r for r in fixed if r]
        fixed_speed = _mean([r["steps_per_s"] for r in fixed if r.get("steps_per_s")]) if fixed else math.nan
        entries = [("fixed schedule", fixed)]
        for c in args.controllers:
            found = [ctl_path(args.results, name, steps, c, lr, s) for s in args.seeds]
            entries.append((c, [json.loads(p.read_text()) for p in found if p.exists()]))
        for label, results in entries:
            if not results:
                out.append(f"| {name} | {start:g}x | {lr:g} | {label} | 0 | (not run) | | | |")
                continue
            loss = _mean([loss_of(r) for r in results])
            ratio = loss / ref_loss if math.isfinite(loss) and ref_loss == ref_loss else math.nan
            ok = "PASS" if ratio <= PASS_RATIO else "fail"
            if any(r.get("controller_exit", 0) != 0 for r in results):
                ok = "fail (a controller exited non-zero)"  # a crashed controller did not drive that run
            speed = _mean([r["steps_per_s"] for r in results if r.get("steps_per_s")])
            slow = fixed_speed / speed if label != "fixed schedule" and speed and fixed_speed == fixed_speed else 1.0
            seeds = ",".join(str(r["seed"]) for r in results)
            out.append(f"| {name} | {start:g}x | {lr:g} | {label} | {seeds} | {loss:.4f} | {ratio:.3f} | {ok} | "
                       f"{'' if label == 'fixed schedule' else f'{slow:.2f}x'} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
