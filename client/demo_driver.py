"""The client half of `lrctl demo`: schedules the seed's inverse-time decay over gRPC.

Runs as its own process with no torch. It reads the worker's initial rates, schedules
``rate = initial / (step + 1)`` for every step with at_step, waits for the worker to
train, then prints the table read back from the worker's change history and checks it
against the schedule it sent.
"""

from __future__ import annotations

import argparse
import sys
import time

from lrctl.client.client import LRClient
from lrctl.client.errors import LrctlError


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, the format of the seed example's."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def run(address: str, steps: int) -> int:
    with LRClient(address, timeout=10) as client:
        client.wait_until_ready(10)
        initial = client.get_learning_rates()
        names = list(initial)
        print(f"client: the worker holds {', '.join(names)}", flush=True)
        schedule = {step: {n: lr / (step + 1) for n, lr in initial.items()} for step in range(steps)}
        for step, rates in schedule.items():
            client.set_learning_rates(
                rates, at_step=step, wait=False, reason=f"inverse-time decay, step {step}"
            )
        print(f"client: scheduled {steps} changes with at_step 0..{steps - 1}", flush=True)
        deadline = time.monotonic() + 60
        while client.status().step < steps:
            if time.monotonic() > deadline:
                print("client: the worker did not reach the last step in 60 s", file=sys.stderr)
                return 1
            time.sleep(0.02)
        applied = {r.step: {c.name: c.new_lr for c in r.changes} for r in client.list_changes()}
    rows = [[str(step)] + [repr(applied.get(step, {}).get(n)) for n in names] for step in range(steps)]
    print("client: learning rates applied at each step, read back from the worker's history:")
    print(_table(["step", *names], rows))
    if applied != schedule:
        print("client: the history does not match the schedule that was sent", file=sys.stderr)
        return 1
    print("client: every step matches the schedule exactly")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lrctl.client.demo_driver")
    parser.add_argument("--address", required=True)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        return run(args.address, args.steps)
    except LrctlError as exc:
        print(f"client: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
