"""The in-memory change history: one record per applied change, in order of application.

Records carry everything an audit log needs (who, when, which step, old and new per
name), so a durable log can later be fed from the same records.
"""

from __future__ import annotations

from array import array
from collections import deque
from dataclasses import dataclass
from typing import Iterator

from lrctl.server.requests import Update


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


class History:
    """A bounded, append-only list of records; the oldest are dropped past `limit`."""

    def __init__(self, limit: int = 10_000) -> None:
        if limit < 1:
            raise ValueError(f"history limit must be at least 1, got {limit}")
        self._records: deque[Record] = deque(maxlen=limit)
        self.dropped = 0

    def append(self, record: Record) -> None:
        if len(self._records) == self._records.maxlen:
            self.dropped += 1
        self._records.append(record)

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
