"""What one history record holds per name, measured with tracemalloc.

    python bench/history_bytes.py [--names 100000]

Builds the record a 100k-name change leaves in the worker's history (its plan, and
the request's updates as sent: one glob, or one update per name as a client that
lists names one by one sends them), and prints the bytes per name next to the
estimate the history's byte bound uses (lrctl.server.history.record_bytes).
"""

from __future__ import annotations

import argparse
import gc
import tracemalloc
from array import array

from lrctl.server.history import Record, record_bytes
from lrctl.server.planner import plan_change
from lrctl.server.rates import RateState, ScheduleBook
from lrctl.server.requests import Mode, Update


def build(names: list[str], per_name_updates: bool) -> Record:
    n = len(names)
    state = RateState([1.0] * n, array("q", [0] * n), {})
    plan = plan_change({i: ((Mode.ABSOLUTE, 2.0), None, None) for i in range(n)}, state,
                       ScheduleBook(), 0, names, lambda i, r: None, str)
    # A new string per update, as protobuf hands them to the service.
    updates = (tuple(Update(name.encode().decode(), 2.0) for name in names)
               if per_name_updates else (Update("encoder.*", 2.0),))
    return Record(change_id=1, version=1, step=0, applied_at=0.0, requested_at=0.0, updates=updates,
                  schedules=(), plan=plan, peer="ipv4:127.0.0.1:5555", user="user@host", reason="",
                  at_step=None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--names", type=int, default=100_000)
    args = parser.parse_args()
    names = [f"encoder.layers.{i}.attention.weight" for i in range(args.names)]
    print(f"{args.names} names of ~{sum(map(len, names)) // len(names)} characters")
    for per_name in (False, True):
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        record = build(names, per_name)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        what = "one update per name" if per_name else "one glob update     "
        print(f"{what}: {held / args.names:6.1f} bytes per name measured, "
              f"{record_bytes(record) / args.names:6.1f} estimated")
        del record


if __name__ == "__main__":
    main()
