"""Long run (issue 15, "Proof"): one change per step for --seconds at the history's
bound, and the worker's resident memory over time.

The worker is bench/training_worker.py (a 20-parameter MLP, a step every 5 ms, the
history at its default bound of 10,000 records). One client sends waiting Sets back to
back (each answers at the next step boundary, so about one change per step), rotating
over names, values and a 100-character reason. The worker's VmRSS is sampled every
--sample seconds. Once the history holds its bound (the version passed it), memory
should be flat: the report gives the curve, the slope over the last half of the run
after the bound (least squares, MB/min) and its spread.

    python bench/bench_longrun.py                   # 10 minutes
    python bench/bench_longrun.py --seconds 60      # smoke
    python bench/bench_longrun.py --quick           # CI smoke (a few seconds)
Exit status 1 if the worker died or a change failed (or, with --strict, memory was not
flat after the bound).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from training_worker import TrainingWorker  # noqa: E402  (bench/, this script's directory)

# "Flat": the last half's slope is within FLAT_MB_PER_MIN, or it moved less than
# FLAT_SPREAD_MB in all (a short window's slope is allocator noise).
FLAT_MB_PER_MIN = 1.0
FLAT_SPREAD_MB = 1.0


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB), in MB per minute."""
    n = len(points)
    if n < 2:
        return float("nan")
    mt = sum(t for t, _ in points) / n
    mr = sum(r for _, r in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return 60.0 * sum((t - mt) * (r - mr) for t, r in points) / var if var else float("nan")


def run(seconds: float, sample_s: float, step_delay: float, history_limit: int, strict: bool) -> int:
    import grpc

    from lrctl.v1 import lrctl_pb2 as pb
    from lrctl.v1 import lrctl_pb2_grpc as pb_grpc

    worker = TrainingWorker("--depth", "8", "--step-delay", str(step_delay), "--history-limit", str(history_limit))
    with worker:
        channel = grpc.insecure_channel(worker.address)
        stub = pb_grpc.LearningRateControlStub(channel)
        names = [n for n in worker.names if not n.startswith("encoder.norm")]
        errors: list[str] = []
        applied = [0]
        halt = threading.Event()

        def changer() -> None:
            k = 0
            while not halt.is_set():
                request = pb.SetLearningRatesRequest(
                    updates=[pb.LearningRateUpdate(selector=names[k % len(names)], mode=pb.UPDATE_MODE_ABSOLUTE,
                                                   value=1e-3 * (1 + k % 97))],
                    wait=True, reason=f"longrun change {k:08d} " + "x" * 80)
                try:
                    stub.SetLearningRates(request, timeout=30)
                    applied[0] += 1
                except grpc.RpcError as exc:
                    errors.append(f"{exc.code().name}: {exc.details()}")
                    if len(errors) > 100:
                        return
                k += 1

        try:
            start_rss = worker.rss_mb()
            print(f"worker pid {worker.pid} on {worker.address}: {len(worker.names)} parameters, step delay "
                  f"{step_delay * 1e3:g} ms, history bound {history_limit} records; {seconds:g} s, "
                  f"RSS every {sample_s:g} s")
            thread = threading.Thread(target=changer, daemon=True)
            t0 = time.monotonic()
            thread.start()
            curve: list[tuple[float, float, int, int]] = []  # (t, MB, version, step)
            next_sample = t0
            while time.monotonic() - t0 < seconds and worker.alive() and thread.is_alive():
                status = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
                curve.append((time.monotonic() - t0, worker.rss_mb(), status.version, status.step))
                next_sample += sample_s
                halt.wait(max(0.0, min(next_sample, t0 + seconds) - time.monotonic()))
            halt.set()
            thread.join(60)
            status = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
            curve.append((time.monotonic() - t0, worker.rss_mb(), status.version, status.step))
            alive = worker.alive()
        finally:
            halt.set()
            channel.close()

    print(f"\n{'t (s)':>7} {'RSS MB':>8} {'version':>8} {'step':>8}  history")
    for t, rss, version, step in curve:
        print(f"{t:>7.0f} {rss:>8.1f} {version:>8} {step:>8}  {'at bound' if version >= history_limit else 'filling'}")
    elapsed = curve[-1][0]
    print(f"\n{applied[0]} changes applied in {elapsed:.0f} s ({applied[0] / elapsed:.0f}/s) over "
          f"{curve[-1][3] - curve[0][3]} steps; {len(errors)} failed" + (f" (first: {errors[0]})" if errors else ""))
    print(f"RSS start {start_rss:.0f} MB, max {max(r for _, r, _, _ in curve):.0f} MB, end {curve[-1][1]:.0f} MB")
    bounded = [(t, r) for t, r, v, _ in curve if v >= history_limit]
    flat = None
    if len(bounded) >= 4:
        half = bounded[len(bounded) // 2:]
        slope = _slope(half)
        spread = max(r for _, r in half) - min(r for _, r in half)
        flat = abs(slope) <= FLAT_MB_PER_MIN or spread <= FLAT_SPREAD_MB
        print(f"after the bound (reached at t={bounded[0][0]:.0f} s): last half {half[0][0]:.0f}-{half[-1][0]:.0f} s "
              f"slope {slope:+.2f} MB/min, spread {spread:.1f} MB -> {'FLAT' if flat else 'NOT FLAT'}")
    else:
        print(f"the history bound ({history_limit}) was reached in {len(bounded)} sample(s): too few to judge "
              "flatness; run longer")
    ok = alive and not errors
    print(f"\n{'PASS' if alive else 'FAIL'}  worker alive\n{'PASS' if not errors else 'FAIL'}  every change applied")
    if flat is not None:
        print(f"{'PASS' if flat else 'FAIL'}  flat after the bound")
    return 0 if ok and (not strict or flat) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--step-delay", type=float, default=0.005)
    parser.add_argument("--history-limit", type=int, default=10_000, help="the worker's bound (attach's default)")
    parser.add_argument("--strict", action="store_true", help="exit 1 unless flat after the bound")
    parser.add_argument("--quick", action="store_true", help="CI smoke: 5 s, a sample a second, a bound of 100")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.sample, args.history_limit = 5.0, 1.0, 100
    return run(args.seconds, args.sample, args.step_delay, args.history_limit, args.strict)


if __name__ == "__main__":
    sys.exit(main())
