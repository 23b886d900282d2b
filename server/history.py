"""The in-memory change history: one record per applied change, in order of application.

Records carry everything an audit log needs (who, when, which step, old and new per
name), so a durable log can later be fed from the same records.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Iterator, overload

from lrctl.server.planner import PlannedChange
from lrctl.server.requests import RateChange, ScheduleUpdate, Update


class RateChanges(Sequence[RateChange]):
    """Per-name changes of a plan that become RateChange objects only when read.

    Behaves like the tuple of RateChange it stands for (len, index, slice, iterate,
    equality with such a tuple). A change on 100,000 names would otherwise build
    100,000 objects inside the step hook, though a reply reports at most
    max_reported_changes of them.
    """

    __slots__ = ("_names", "_plan", "_describe")

    def __init__(
        self, names: Sequence[str], plan: PlannedChange, describe: Callable[[int], str]
    ) -> None:
        self._names, self._plan, self._describe = names, plan, describe

    def __len__(self) -> int:
        return len(self._plan.indices)

    @overload
    def __getitem__(self, k: int) -> RateChange: ...
    @overload
    def __getitem__(self, k: slice) -> tuple[RateChange, ...]: ...
    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, slice):
            return tuple(self[j] for j in range(*k.indices(len(self))))
        plan = self._plan
        if k < 0:
            k += len(plan.indices)
        old_pin = new_pin = None
        if plan.old_pin is not None and plan.new_pin is not None:
            old_pin, new_pin = _pin(plan.old_pin[k]), _pin(plan.new_pin[k])
        old_schedule = new_schedule = ""
        if plan.old_schedule is not None and plan.new_schedule is not None:
            old_schedule = self._describe(plan.old_schedule[k])
            new_schedule = self._describe(plan.new_schedule[k])
        return RateChange(
            self._names[plan.indices[k]], plan.old_lr[k], plan.new_lr[k],
            plan.old_base[k], plan.new_base[k], old_pin, new_pin, old_schedule, new_schedule,
        )

    def __iter__(self) -> Iterator[RateChange]:
        return (self[k] for k in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (RateChanges, tuple)):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self))


def _pin(value: float) -> float | None:
    return None if math.isnan(value) else value


@dataclass(frozen=True)
class Record:
    """One applied change: its plan (per-name values in compact arrays, model order)."""

    change_id: int
    version: int
    step: int
    applied_at: float
    requested_at: float
    updates: tuple[Update, ...]
    schedules: tuple[ScheduleUpdate, ...]
    plan: PlannedChange
    peer: str
    user: str
    reason: str
    at_step: int | None
    role: str = ""
    token: str = ""

    @property
    def num_changes(self) -> int:
        return len(self.plan.indices)


def _entries(record: Record) -> int:
    """What a record weighs against the bound: its per-name changes, and the updates
    of its request, kept as they were sent (a batch may list 100k names one by one)."""
    return record.num_changes + len(record.updates) + len(record.schedules)


class History:
    """A bounded, append-only list of records, oldest dropped first.

    Two bounds: `limit` records, and `max_entries` per-name changes in all (40 bytes
    each, more with pins or schedules), so that frequent changes on a 100k-parameter model cannot hold gigabytes.
    The newest record is always kept.
    """

    def __init__(self, limit: int = 10_000, max_entries: int = 10_000_000) -> None:
        if limit < 1 or max_entries < 1:
            raise ValueError(f"history bounds must be at least 1, got {limit}, {max_entries}")
        self._records: deque[Record] = deque()
        self._limit, self._max_entries = limit, max_entries
        self._entries = 0
        self.dropped = 0

    def append(self, record: Record) -> None:
        self._records.append(record)
        self._entries += _entries(record)
        while len(self._records) > 1 and (
            len(self._records) > self._limit or self._entries > self._max_entries
        ):
            self._entries -= _entries(self._records.popleft())
            self.dropped += 1

    def __len__(self) -> int:
        return len(self._records)

    def after(self, version: int) -> Iterator[Record]:
        """Records with a version greater than `version`, oldest first."""
        records = self._records
        if not records or records[-1].version <= version:
            return iter(())
        # Versions are consecutive, so the start position is arithmetic.
        start = max(0, version - records[0].version + 1)
        return (records[j] for j in range(start, len(records)))
