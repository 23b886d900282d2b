"""Every benchmark runs in its --quick mode, so none of them rots.

No timing is asserted: numbers from a smoke run mean nothing. The check is that each
script runs to the end against the current code and prints its table.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(BENCH.glob("bench_*.py"))


def test_there_are_benchmarks() -> None:
    assert SCRIPTS, f"no bench_*.py in {BENCH}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_quick_mode_runs(script: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, f"{script.name} failed:\n{done.stdout}\n{done.stderr}"
    assert len(done.stdout.splitlines()) >= 3, done.stdout  # a header and a table
