"""Abuse and memory (issue 15, "Proof"): clients that try to grow everything in a
training worker, while its resident memory, health and a reader are watched.

The worker is bench/training_worker.py with extra tiny tensors (so one change can
touch thousands of names). Abuser processes (multiprocessing, spawn), each a few
threads, for --seconds:
  huge_selectors  Sets of 1000 selectors of ~4000 characters (the limit in
                  server/selectors.py) and 4096-character reasons (history, queue)
  many_names      Sets that touch every extra tensor, no wait (history entries)
  regexes         reads with thousands of distinct heavy regexes (selector cache)
  far_future      no-wait Sets 900,000 steps ahead (and some at 2**62, past the
                  horizon), small and huge (the queue)
  waiting         waiting Sets at a far step, with a 3 s deadline and without any
                  (waiting calls; the deadline-less ones are cancelled at the end)
  history         a stream of small no-wait Sets (record count)
  big_pages       ListChanges pages of 1000 records with 200000 entries, 5000-name
                  ListParameters pages, all rates
Watched from this process: the worker's VmRSS every second (before, during, after),
a health Check and a reader (GetStatus + one rate) every 0.25 s, and the step. A
safety cap (--max-rss-mb) ends the abuse early rather than exhaust a shared machine;
reaching it means the worker's bound was exceeded (a finding, reported, not hidden).

    python bench/bench_abuse.py                 # 2 minutes
    python bench/bench_abuse.py --seconds 30    # shorter
    python bench/bench_abuse.py --quick         # CI smoke (a few seconds)
Exit status 1 if the worker died (or, with --strict, if any verdict is FAIL).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from training_worker import TrainingWorker  # noqa: E402  (bench/, this script's directory)

DOCUMENTED_BOUND_MB = 256.0
SELECTOR_CHARS = 4000   # server/selectors.py: MAX_SELECTOR_CHARS = 4096
SELECTORS_PER_SET = 1000  # ~4 MB: just under grpc's default 4 MiB request limit
REASON_CHARS = 4096     # the most a reason may have
# Far ahead, but within the worker's at_step horizon (1,000,000 steps past the next):
# these do queue. BEYOND is refused (INVALID_ARGUMENT), as 2**62 used to fill the queue.
FAR = 900_000
BEYOND = 2**62
HELD_WAITING = 150  # deadline-less waiting Sets from one connection: past its quota of 100
KINDS_BY_PROCESS = [
    ("huge_selectors", "far_future", "big_pages"),
    ("many_names", "regexes", "history"),
    ("waiting", "regexes", "history"),
]


def _abuser(idx: int, kinds: tuple[str, ...], address: str, seconds: float, stop: Any, out_path: str) -> None:
    """One abuser process: a thread per kind until `seconds` pass or `stop` is set."""
    import grpc

    from lrctl.v1 import lrctl_pb2 as pb
    from lrctl.v1 import lrctl_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(address)
    stub = pb_grpc.LearningRateControlStub(channel)
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    end = time.monotonic() + seconds
    reason = "r" * REASON_CHARS
    held: list[Any] = []  # waiting calls without a deadline, cancelled at the end

    def huge_selectors(k: int) -> list[str]:
        suffix = ("weight", "bias", "1.weight", "0.bias")[k % 4]
        return ["*" * (SELECTOR_CHARS - len(suffix)) + suffix] * SELECTORS_PER_SET

    def update(selector: str, value: float) -> Any:
        return pb.LearningRateUpdate(selector=selector, mode=pb.UPDATE_MODE_ABSOLUTE, value=value)

    def one(kind: str, k: int) -> str | None:
        value = 1e-3 * (1 + k % 7)
        if kind == "huge_selectors":
            stub.SetLearningRates(pb.SetLearningRatesRequest(
                updates=[update(s, value) for s in huge_selectors(k)], reason=reason), timeout=30)
        elif kind == "many_names":
            stub.SetLearningRates(pb.SetLearningRatesRequest(updates=[update("extra.*", value)], reason=reason),
                                  timeout=30)
        elif kind == "regexes":
            selector = f"re:(?:a{{100}}){{100}}|weight|u{idx}x{k}y"
            stub.GetLearningRates(pb.GetLearningRatesRequest(selectors=[selector]), timeout=30)
        elif kind == "far_future":
            updates = [update(s, value) for s in huge_selectors(k)] if k % 2 else [update("head.*", value)]
            at_step = BEYOND if k % 4 == 3 else FAR
            stub.SetLearningRates(pb.SetLearningRatesRequest(updates=updates, at_step=at_step, reason=reason),
                                  timeout=30)
        elif kind == "waiting":
            request = pb.SetLearningRatesRequest(updates=[update("head.weight", value)], at_step=FAR, wait=True)
            if k % 2 and len(held) < HELD_WAITING:
                held.append(stub.SetLearningRates.future(request))  # no deadline: holds on
                return "HELD"
            stub.SetLearningRates(request, timeout=3)
        elif kind == "history":
            stub.SetLearningRates(pb.SetLearningRatesRequest(
                updates=[update("encoder.layers.*", value)], reason=reason[: 64 + k % 64]), timeout=30)
        elif kind == "big_pages":
            which = k % 3
            if which == 0:
                stub.ListChanges(pb.ListChangesRequest(page_size=1000, max_changes_per_record=200_000), timeout=60)
            elif which == 1:
                stub.ListParameters(pb.ListParametersRequest(page_size=5000), timeout=60)
            else:
                stub.GetLearningRates(pb.GetLearningRatesRequest(), timeout=60)

    def loop(kind: str) -> None:
        k = 0
        while time.monotonic() < end and not stop.is_set():
            try:
                code = one(kind, k) or "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            except Exception as exc:  # a client-side refusal (a message too big, ...)
                code = type(exc).__name__
            if code != "HELD":  # deadline-less waiting calls are counted when they end
                with lock:
                    counts[f"{kind} {code}"] += 1
            k += 1
            if code not in ("OK", "HELD"):
                stop.wait(0.05)  # refused: do not spin

    threads = [threading.Thread(target=loop, args=(kind,), daemon=True) for kind in kinds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    for future in held:  # still held at the end (cancelled now), or refused at once
        code = "HELD" if future.cancel() else (future.code().name if future.exception() else "OK")
        counts[f"waiting_nodeadline {code}"] += 1
    channel.close()
    Path(out_path).write_text(json.dumps(dict(counts)))


class Watch(threading.Thread):
    """Calls `probe` every `period` s; counts failures and keeps latencies."""

    def __init__(self, probe: Any, period: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.probe, self.period = probe, period
        self.ok = self.failed = 0
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            t0 = time.perf_counter()
            try:
                self.probe()
                self.ok += 1
            except Exception as exc:
                self.failed += 1
                code = getattr(exc, "code", None)
                self.errors[code().name if callable(code) else type(exc).__name__] += 1
            self.latencies.append(time.perf_counter() - t0)
            self.halt.wait(self.period)

    def summary(self) -> str:
        lat = sorted(self.latencies)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3 if lat else float("nan")
        worst = lat[-1] * 1e3 if lat else float("nan")
        errors = f" ({', '.join(f'{c} {n}' for c, n in self.errors.most_common())})" if self.errors else ""
        return f"{self.ok + self.failed} calls, {self.failed} failed{errors}; p99 {p99:.0f} ms, worst {worst:.0f} ms"


def run(seconds: float, extra_tensors: int, max_rss_mb: float, step_delay: float) -> dict[str, Any]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from lrctl.v1 import lrctl_pb2 as pb
    from lrctl.v1 import lrctl_pb2_grpc as pb_grpc

    result: dict[str, Any] = {}
    worker = TrainingWorker("--depth", "8", "--extra-tensors", str(extra_tensors), "--step-delay", str(step_delay))
    procs: list[Any] = []
    with worker, tempfile.TemporaryDirectory() as tmp:
        channel = grpc.insecure_channel(worker.address)
        stub = pb_grpc.LearningRateControlStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        try:
            status = lambda: stub.GetStatus(pb.GetStatusRequest(), timeout=5)  # noqa: E731
            step0 = status().step
            for _ in range(3):  # warm up the paths the abuse takes, then take "before"
                stub.GetLearningRates(pb.GetLearningRatesRequest(), timeout=10)
                stub.ListParameters(pb.ListParametersRequest(page_size=5000), timeout=10)
            time.sleep(1.0)
            before = worker.rss_mb()
            print(f"worker pid {worker.pid} on {worker.address}: {worker.info['num_names']} parameters "
                  f"({extra_tensors} extra tiny tensors), RSS before {before:.0f} MB; abuse for {seconds:g} s")
            health_watch = Watch(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=2))
            reader_watch = Watch(lambda: (status(), stub.GetLearningRates(
                pb.GetLearningRatesRequest(selectors=["head.weight"]), timeout=5)))
            health_watch.start()
            reader_watch.start()
            ctx = mp.get_context("spawn")
            stop = ctx.Event()
            paths = [os.path.join(tmp, f"abuser{k}.json") for k in range(len(KINDS_BY_PROCESS))]
            procs = [ctx.Process(target=_abuser, args=(k, kinds, worker.address, seconds, stop, paths[k]), daemon=True)
                     for k, kinds in enumerate(KINDS_BY_PROCESS)]
            t0 = time.monotonic()
            for p in procs:
                p.start()
            curve: list[tuple[float, float]] = []
            capped_at = None
            while any(p.is_alive() for p in procs):
                rss = worker.rss_mb()
                curve.append((time.monotonic() - t0, rss))
                if rss > max_rss_mb and capped_at is None:
                    capped_at = curve[-1][0]
                    stop.set()  # protect the machine: this already is a finding
                if not worker.alive():
                    stop.set()
                    break
                time.sleep(1.0)
            for p in procs:
                p.join(180)
            abuse_s = time.monotonic() - t0
            time.sleep(3.0)  # let cancelled and timed-out calls unwind
            after = worker.rss_mb()
            health_watch.halt.set()
            reader_watch.halt.set()
            health_watch.join(10)
            reader_watch.join(10)
            alive = worker.alive()
            step1 = status().step if alive else step0
            probe = "worker gone"
            if alive:  # can an ordinary client still change a rate?
                try:
                    stub.SetLearningRates(pb.SetLearningRatesRequest(
                        updates=[pb.LearningRateUpdate(selector="head.weight", mode=pb.UPDATE_MODE_ABSOLUTE,
                                                       value=5e-3)], wait=True), timeout=10)
                    probe = "OK"
                except grpc.RpcError as exc:
                    probe = f"{exc.code().name}: {(exc.details() or '')[:160]}"
            pending = status().pending_changes if alive else -1
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            channel.close()
        counts: Counter[str] = Counter()
        for path in paths:
            if os.path.exists(path):
                counts.update(json.loads(Path(path).read_text()))

    peak = max([before, after, *(r for _, r in curve)])
    added = peak - before
    every = max(1, len(curve) // 12)
    print(f"\nRSS (MB) at t seconds, sampled every second (every {every} s shown):")
    shown = curve[::every]
    print("  " + "  ".join(f"{t:.0f}s:{r:.0f}" for t, r in shown))
    print(f"start {before:.0f}, max {peak:.0f}, end {after:.0f} (after {abuse_s:.0f} s of abuse + 3 s); "
          f"added {added:.0f} MB vs the documented bound {DOCUMENTED_BOUND_MB:.0f} MB")
    if capped_at is not None:
        print(f"the worker passed the safety cap of {max_rss_mb:.0f} MB at t={capped_at:.0f} s: abuse stopped early")
    print("\nstatus counts per kind:")
    kinds = sorted({k.split()[0] for k in counts})
    for kind in kinds:
        print(f"  {kind:<20}" + ", ".join(f"{k.split()[1]} {n}" for k, n in sorted(counts.items(), key=lambda x: -x[1])
                                         if k.split()[0] == kind))
    print(f"\nhealth checks:  {health_watch.summary()}")
    print(f"reader:         {reader_watch.summary()}")
    print(f"training:       steps {step0} -> {step1}; changes still queued after the abuse: {pending}")
    print(f"a plain waiting Set after the abuse: {probe}")
    verdicts = {
        "memory bound": (added <= DOCUMENTED_BOUND_MB, f"added {added:.0f} MB (bound {DOCUMENTED_BOUND_MB:.0f} MB)"),
        "health responsive": (health_watch.failed == 0, f"{health_watch.failed} failed health checks"),
        "reader responsive": (reader_watch.failed == 0, f"{reader_watch.failed} failed reads"),
        "worker alive": (alive, "exit code " + str(worker.proc.returncode) if not alive else "running"),
        "training advanced": (step1 > step0, f"{step0} -> {step1}"),
        "no lockout": (probe == "OK", probe),
    }
    print()
    for name, (ok, text) in verdicts.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name:<19}{text}")
    result.update(verdicts=verdicts, alive=alive, added=added)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--extra-tensors", type=int, default=2000, help="tiny named tensors (many-name changes)")
    parser.add_argument("--max-rss-mb", type=float, default=3072.0,
                        help="stop the abuse once the worker holds this much (protects a shared machine)")
    parser.add_argument("--step-delay", type=float, default=0.01)
    parser.add_argument("--strict", action="store_true", help="exit 1 on any FAIL verdict")
    parser.add_argument("--quick", action="store_true", help="CI smoke: 4 s, 200 extra tensors")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.extra_tensors = 4.0, 200
    result = run(args.seconds, args.extra_tensors, args.max_rss_mb, args.step_delay)
    if not result["alive"]:
        return 1
    if args.strict and not all(ok for ok, _ in result["verdicts"].values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
