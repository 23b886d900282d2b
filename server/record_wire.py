"""A change record (lrctl.server.history.Record) as plain values, and its ChangeRecord
message built from them: one mapping of a record to the wire, for every server.

`record_to_wire` is cheap (numbers, strings and array bytes; protobuf only for the
schedules a record echoes, which few have) because the training thread runs it for
every change a WatchMetrics stream carries with serving="process" (lrctl.server.
watch_feed): the serving process builds the message (`record_pb`), not the step.
Building a record's message on the training thread cost ~0.25 ms a change there,
mostly per-name objects (bench/README.md, 3c). The in-process handlers (history,
streams) build theirs through the same two functions.

Imports neither grpc nor torch (protobuf only).
"""

from __future__ import annotations

import bisect
import math
from itertools import accumulate
from typing import Any, Sequence

from lrctl.server.history import Record
from lrctl.server.planned_wire import doubles, updates_from_wire, updates_to_wire
from lrctl.server.read_answers import PAGE_BYTES
from lrctl.server.write_messages import schedules_pb, updates_pb
from lrctl.v1 import lrctl_pb2 as pb


def record_to_wire(record: Record, names: Sequence[str], limit: int) -> tuple:
    """A marshal-able tuple of `record`, with its first `limit` per-name changes
    (`names`: the job's parameter names, model order)."""
    plan = record.plan
    rows: tuple | None = None
    if plan is not None:
        k = min(limit, len(plan.indices))
        pins = None
        if plan.old_pin is not None and plan.new_pin is not None:
            pins = (plan.old_pin[:k].tobytes(), plan.new_pin[:k].tobytes())
        schedules = None
        if plan.old_schedule is not None and plan.new_schedule is not None:
            described = {s: "" if s == 0 else plan.schedules[s].describe()
                         for s in {*plan.old_schedule[:k], *plan.new_schedule[:k]}}
            schedules = ([described[s] for s in plan.old_schedule[:k]],
                         [described[s] for s in plan.new_schedule[:k]])
        rows = ([names[i] for i in plan.indices[:k]], plan.old_lr[:k].tobytes(), plan.new_lr[:k].tobytes(),
                plan.old_base[:k].tobytes(), plan.new_base[:k].tobytes(), pins, schedules)
    return (
        record.change_id, record.version, record.step, record.applied_at, record.requested_at,
        updates_to_wire(record.updates),
        pb.ChangeRecord(schedules=schedules_pb(record.schedules)).SerializeToString() if record.schedules else b"",
        rows, record.peer, record.user, record.reason, record.at_step, record.num_changes,
        record.role, record.token, record.status, record.error,
    )


def record_pb(wired: tuple, per_record: int) -> pb.ChangeRecord:
    """The ChangeRecord of record_to_wire's tuple, with at most `per_record` per-name
    changes, cut to a page (fit_record)."""
    (change_id, version, step, applied_at, requested_at, updates, schedules, rows, peer, user, reason,
     at_step, num_changes, role, token, status, error) = wired
    message = pb.ChangeRecord(
        change_id=change_id, version=version, step=step, applied_at=applied_at, requested_at=requested_at,
        updates=updates_pb(updates_from_wire(updates)),
        changes=[] if rows is None else _changes_pb(rows, per_record),
        peer=peer, user=user, reason=reason, at_step=at_step, num_changes=num_changes, role=role,
        token_name=token, status=status, error=error,
    )
    if schedules:
        message.MergeFromString(schedules)  # serialized messages merge as they concatenate
    fit_record(message)
    return message


def _changes_pb(rows: tuple, limit: int) -> list[pb.RateChange]:
    names, old_lr, new_lr, old_base, new_base, pins, schedules = rows
    k = min(limit, len(names))
    columns: list[Any] = [names[:k], *(doubles(raw)[:k] for raw in (old_lr, new_lr, old_base, new_base))]
    if pins is None:
        columns += [[None] * k, [None] * k]
    else:
        columns += [[None if math.isnan(p) else p for p in doubles(raw)[:k]] for raw in pins]
    columns += [[""] * k, [""] * k] if schedules is None else [s[:k] for s in schedules]
    return [pb.RateChange(name=n, old_lr=a, new_lr=b, old_base=c, new_base=d, old_pin=e, new_pin=f,
                          old_schedule=g, new_schedule=h)
            for n, a, b, c, d, e, f, g, h in zip(*columns)]


def _embedded_size(n: int) -> int:
    """Wire bytes of an embedded message of n bytes in a repeated field (tag + length)."""
    return n + 1 + max(1, (n.bit_length() + 6) // 7)


def fit_record(message: pb.ChangeRecord) -> None:
    """Cut a record bigger than a page alone to PAGE_BYTES: first its per-name changes,
    then the updates and schedules it echoes (num_changes still counts every name)."""
    size = message.ByteSize()
    for field in (message.changes, message.updates, message.schedules):
        if size <= PAGE_BYTES:
            return
        rows = [_embedded_size(m.ByteSize()) for m in field]
        room = PAGE_BYTES - (size - sum(rows))
        del field[bisect.bisect_right(list(accumulate(rows)), max(room, 0)):]
        size = message.ByteSize()
