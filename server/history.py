"""The in-memory change history: one record per applied change, in order of
application, and one per accepted change that failed at its step.

Records carry everything the audit log (lrctl.server.audit) writes: who, when, which
step, old and new per name.
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

    @property
    def columns(self) -> tuple[Sequence[str], PlannedChange, Callable[[int], str]]:
        """(names, plan, describe schedule id): for writers that read the arrays at once."""
        return self._names, self._plan, self._describe

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


# Slotted, not frozen (as PlannedChange, ChangeRequest, Update, Planned): the step hook
# makes one per change, and a frozen dataclass's __init__ costs a call per field, ~4x
# (bench/README.md 3c, "Fewer objects per Set"). Nothing changes a record once appended.
@dataclass(slots=True)
class Record:
    """One change of the history: applied (its plan: per-name values in compact
    arrays, model order), or accepted and then failed at its step (`status` names the
    gRPC status it failed with, `error` says why; no plan, and `version` is the config
    version in force when it failed)."""

    change_id: int
    version: int
    step: int
    applied_at: float  # for a failed record: when it failed
    requested_at: float
    updates: tuple[Update, ...]
    schedules: tuple[ScheduleUpdate, ...]
    plan: PlannedChange | None
    peer: str
    user: str
    reason: str
    at_step: int | None
    role: str = ""
    token: str = ""
    status: str = ""  # "" applied; else e.g. "FAILED_PRECONDITION"
    error: str = ""
    seq: int = 0  # the history's own sequence number (History.append sets it)
    size: int = 0  # record_bytes, once (History.append sets it; the stream's bound reads it)

    @property
    def num_changes(self) -> int:
        return 0 if self.plan is None else len(self.plan.indices)

    @property
    def failed(self) -> bool:
        return bool(self.status)

    def follows(self, version: int) -> bool:
        """True if this record came after the change that made `version` (a failed
        record carries the version in force, so it follows that version's change)."""
        return self.version > version or (self.version == version and self.failed)


# What a record holds in memory, measured with tracemalloc
# (python bench/history_bytes.py): 40 bytes per name of its plan (an int64 position
# and four doubles; 44 counted), 16 more each for pins and schedules; an Update or ScheduleUpdate
# object ~112 bytes plus its selector string (49 + its length); a string 49 + its
# length (up to 4 bytes per character beyond ASCII); a record's fixed part ~1 KiB.
_RECORD_BYTES = 1024
_UPDATE_BYTES = 112
_STR_BYTES = 49
_ENTRY_BYTES = 44  # 40, and room for arrays that over-allocate as they grow
_EXTRA_ENTRY_BYTES = 16


def _texts_bytes(texts: tuple[str, ...]) -> int:
    # One join, not a call per string (the step hook measures every record it makes):
    # all counted as wide when any is, which stays an estimate from above.
    text = "".join(texts)
    return _STR_BYTES * len(texts) + len(text) * (1 if text.isascii() else 4)


def record_bytes(record: Record) -> int:
    """An estimate (from above) of the memory `record` holds, for the history's byte bound."""
    size = _RECORD_BYTES + _texts_bytes((record.reason, record.user, record.peer, record.role,
                                         record.token, record.error))
    entries = (*record.updates, *record.schedules)
    if entries:
        # Schedule specs are the book's own copies (their points are counted there).
        size += _UPDATE_BYTES * len(entries) + _texts_bytes(tuple([u.selector for u in entries]))
    if record.failed:  # its schedules were never interned: their points are its own
        size += 72 * sum(len(getattr(u.schedule, "points", ())) for u in record.schedules)
    plan = record.plan
    if plan is not None:
        per_name = _ENTRY_BYTES
        per_name += _EXTRA_ENTRY_BYTES if plan.old_pin is not None else 0
        per_name += _EXTRA_ENTRY_BYTES if plan.old_schedule is not None else 0
        size += per_name * len(plan.indices)
    return size


DEFAULT_HISTORY_LIMIT = 10_000
DEFAULT_HISTORY_MAX_BYTES = 64 * 1024 * 1024


class History:
    """A bounded, append-only list of records, oldest dropped first.

    Two bounds: `limit` records, and `max_bytes` of memory in all (record_bytes: the
    per-name values, the updates as sent, selectors, reasons, users, peers), so that
    neither frequent changes on a 100k-parameter model nor huge selectors or reasons
    can hold gigabytes. The newest record is always kept. Records are numbered
    (`seq`) in order of recording; page tokens name a record by it.
    """

    def __init__(self, limit: int = DEFAULT_HISTORY_LIMIT,
                 max_bytes: int = DEFAULT_HISTORY_MAX_BYTES,
                 counts: dict[str, int] | None = None) -> None:
        if limit < 1 or max_bytes < 1:
            raise ValueError(f"history bounds must be at least 1, got {limit}, {max_bytes}")
        self._records: deque[Record] = deque()
        self._limit, self._max_bytes = limit, max_bytes
        self.bytes = 0
        self.dropped = 0
        self._next_seq = 1
        # The newest dropped record's (version, failed, seq): what a reading that
        # starts before it has missed. seq -1: dropped in an earlier run.
        self.last_dropped: tuple[int, bool, int] | None = None
        # Records appended by this process, by status ("OK": applied), never dropped:
        # the counters of lrctl_changes_total (lrctl.server.metrics). A history
        # rebuilt on resume passes the old one's dict on.
        self.counts: dict[str, int] = {} if counts is None else counts

    def append(self, record: Record, *, count: bool = True) -> Record:
        """Add `record` (numbered and measured here: a new record, not yet shared) and
        drop the oldest past the bounds; returns it.

        `count` False: a record restored from a checkpoint, not one this process made."""
        # Numbered and measured in place, before anyone else holds it: a copy
        # (dataclasses.replace) costs three times its making, in the step hook.
        record.seq = self._next_seq
        record.size = record_bytes(record)
        if count:
            status = record.status or "OK"
            self.counts[status] = self.counts.get(status, 0) + 1
        self._next_seq += 1
        self._records.append(record)
        self.bytes += record.size
        while len(self._records) > 1 and (
            len(self._records) > self._limit or self.bytes > self._max_bytes
        ):
            old = self._records.popleft()
            self.bytes -= old.size
            self.dropped += 1
            self.last_dropped = (old.version, old.failed, old.seq)
        return record

    def __len__(self) -> int:
        return len(self._records)

    @property
    def oldest_version(self) -> int:
        """Version of the oldest applied record held; 0 if none."""
        return next((r.version for r in self._records if not r.failed), 0)

    def _start(self, version: int, seq: int) -> int:
        """Index of the first record that follows `version` and has a seq above `seq`."""
        records = self._records
        lo, hi = 0, len(records)
        while lo < hi:  # records are ordered by (version, applied before failed), and by seq
            mid = (lo + hi) // 2
            if records[mid].follows(version):
                hi = mid
            else:
                lo = mid + 1
        if records and seq > 0:
            lo = max(lo, seq - records[0].seq + 1)  # seqs are consecutive
        return lo

    def after(self, version: int, seq: int = 0) -> Iterator[Record]:
        """Records after the change that made `version` (and after record `seq`), oldest first."""
        records = self._records
        start = self._start(version, seq)
        return (records[j] for j in range(start, len(records)))

    def at_step(self, step: int) -> list[Record]:
        """The records of `step` (applied or failed there), oldest first. Steps never
        decrease along the history, so this reads the tail back to an earlier step."""
        found = []
        for record in reversed(self._records):
            if record.step < step:
                break
            if record.step == step:
                found.append(record)
        found.reverse()
        return found

    def gap(self, version: int, seq: int = 0) -> bool:
        """True if a record that a reading after (`version`, `seq`) would start with was dropped."""
        if self.last_dropped is None:
            return False
        d_version, d_failed, d_seq = self.last_dropped
        if seq > 0 and d_seq >= 0:
            return d_seq > seq
        return d_version > version or (d_version == version and d_failed)
