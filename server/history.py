"""The in-memory change history: one record per applied change, in order of application.

Records carry everything an audit log needs (who, when, which step, old and new per
name), so a durable log can later be fed from the same records.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Iterator, overload

from lrctl.server.requests import RateChange, Update


class RateChanges(Sequence[RateChange]):
    """Per-name changes that become RateChange objects only when read.

    Behaves like the tuple of RateChange it stands for (len, index, slice, iterate,
    equality with such a tuple). A change on 100,000 names would otherwise build
    100,000 objects inside the step hook, though a reply reports at most
    max_reported_changes of them.
    """

    __slots__ = ("_names", "_indices", "_old", "_new")

    def __init__(
        self, names: Sequence[str], indices: Sequence[int], old: Sequence[float], new: Sequence[float]
    ) -> None:
        self._names, self._indices, self._old, self._new = names, indices, old, new

    def __len__(self) -> int:
        return len(self._indices)

    @overload
    def __getitem__(self, k: int) -> RateChange: ...
    @overload
    def __getitem__(self, k: slice) -> tuple[RateChange, ...]: ...
    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, slice):
            return tuple(self[j] for j in range(*k.indices(len(self))))
        return RateChange(self._names[self._indices[k]], self._old[k], self._new[k])

    def __iter__(self) -> Iterator[RateChange]:
        names = map(self._names.__getitem__, self._indices)
        return map(RateChange, names, self._old, self._new)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (RateChanges, tuple)):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self))


@dataclass(frozen=True)
class Record:
    """One applied change. Per-name values are kept in compact arrays, model order."""

    change_id: int
    version: int
    step: int
    applied_at: float
    requested_at: float
    updates: tuple[Update, ...]
    indices: array  # array('q'): parameter positions in model order
    old: array  # array('d')
    new: array  # array('d')
    peer: str
    user: str
    reason: str
    at_step: int | None

    @property
    def num_changes(self) -> int:
        return len(self.indices)


def _entries(record: Record) -> int:
    """What a record weighs against the bound: its per-name changes, and the updates
    of its request, kept as they were sent (a batch may list 100k names one by one)."""
    return record.num_changes + len(record.updates)


class History:
    """A bounded, append-only list of records, oldest dropped first.

    Two bounds: `limit` records, and `max_entries` per-name changes in all (24 bytes
    each), so that frequent changes on a 100k-parameter model cannot hold gigabytes.
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
