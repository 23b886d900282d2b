"""Load and reconciliation, small: bench/bench_reconcile.py's own run and checks with 2
client processes x 100 mixed requests against a training worker process.

Every acknowledged write is in the history exactly once with the values its reply gave
(a change that failed at its step as a failed record that changed nothing),
no rejected write appears, versions have no gaps, replaying the history gives the final
rates, training advanced, and each expected_version race has exactly one winner. No
timing is asserted (the run's figures are printed, not checked).
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import bench_reconcile  # noqa: E402


def test_two_processes_reconcile() -> None:
    lines: list[str] = []
    ok = bench_reconcile.run(processes=2, requests=100, race_every=25, window_s=None, out=lines.append)
    report = "\n".join(lines)
    print(report)
    assert ok, report
    verdicts = [line.split()[0] for line in lines if line.startswith(("PASS ", "FAIL "))]
    assert verdicts == ["PASS"] * 10, report
