"""`lrctl watch` and `lrctl history --follow`: live output from a WatchMetrics stream.

Imported only when one of these verbs runs (the CLI's start-up time matters).
Ctrl-C ends either quietly with exit 0; a worker that goes away (the stream breaks, or
ends because the worker closed) is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from lrctl.client.client import LRClient
from lrctl.client.errors import UnavailableError
from lrctl.client.types import ChangeRecord, MetricsEvent

WORKER_CLOSED = "the worker closed the stream: it stopped (training ended or lrctl was closed)"


def _fmt_value(value: float) -> str:
    return f"{value:.6g}"


def _event_line(event: MetricsEvent, fmt_change: Callable[[ChangeRecord], str]) -> str:
    parts = [f"step {event.step}", f"v{event.version}"]
    parts += [f"{k}={_fmt_value(v)}" for k, v in sorted(event.metrics.items())]
    lines = ["  ".join(parts)]
    if event.dropped:
        lines.insert(0, f"(lost {event.dropped} event(s) here: this reader was too slow)")
    for name, values in sorted(event.stats.items()):
        lines.append(f"  {name}: " + " ".join(f"{k}={_fmt_value(v)}" for k, v in sorted(values.items())))
    lines += [f"  change {fmt_change(r)}" for r in event.changes]
    return "\n".join(lines)


def _emit(text: str) -> None:
    print(text, flush=True)  # live: a pipe must see each event as it comes


def cmd_watch(client: LRClient, args: argparse.Namespace, fmt_change: Callable[[ChangeRecord], str]) -> int:
    """lrctl watch: one line per step (NDJSON with --json) until Ctrl-C."""
    stream = client.watch_metrics(from_step=args.from_step, stats=args.stats, changes_only=args.changes)
    try:
        for event in stream:
            if args.json:
                _emit(json.dumps(event.to_dict()))
            else:
                _emit(_event_line(event, fmt_change))
    except KeyboardInterrupt:
        stream.close()
        return 0
    raise UnavailableError(WORKER_CLOSED)


def cmd_history_follow(
    client: LRClient, args: argparse.Namespace, print_table: Callable[[list[ChangeRecord]], None],
    row: Callable[[ChangeRecord], str], as_json: Callable[[ChangeRecord], dict[str, Any]],
) -> int:
    """lrctl history --follow: the table, then each new record as it is recorded.

    The stream is opened (from the worker's current step) before the history is read,
    so no record falls between the two; records are told apart by change id. When the
    stream says it lost events, the history is read again from the last version shown.
    """
    start = client.status().step
    stream = client.watch_metrics(from_step=start, changes_only=True)
    seen: set[int] = set()
    last_version = 0

    def show(records: list[ChangeRecord], table: bool = False) -> None:
        nonlocal last_version
        fresh = [r for r in records if r.change_id not in seen]
        seen.update(r.change_id for r in fresh)
        for r in fresh:
            last_version = max(last_version, r.version)
        if table:
            print_table(fresh if args.limit is None else fresh[-args.limit:])
            sys.stdout.flush()
            return
        for r in fresh:
            _emit(json.dumps(as_json(r)) if args.json else row(r))

    try:
        show(list(client.iter_changes()), table=not args.json)
        for event in stream:
            if event.dropped:  # catch up from the history: nothing is lost
                show(list(client.iter_changes(after_version=max(0, last_version - 1))))
            show(event.changes)
    except KeyboardInterrupt:
        stream.close()
        return 0
    raise UnavailableError(WORKER_CLOSED)
