"""A least-recently-used cache bounded by an estimate of the bytes it holds, not only
by its number of entries: what one entry costs can differ by a factor of 10,000 (a
compiled heavy regex takes megabytes, an exact name a few hundred bytes), so a count
alone bounds nothing. Thread-safe; values are computed by the caller, outside the lock
(two threads may compute the same value; the second put just replaces it).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, Hashable, Optional, TypeVar

V = TypeVar("V")


class BoundedCache(Generic[V]):
    """key -> value, each with its estimated size; the least recently used go first once
    the sizes add up to more than `max_bytes` or there are more than `max_entries`.
    A value bigger than `max_bytes` on its own is not kept."""

    def __init__(self, max_bytes: int, max_entries: int) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.bytes = 0  # the sum of the sizes held: the cache's own accounting
        self._data: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Optional[V]:
        """The value for `key` (now the most recently used), or None."""
        with self._lock:
            hit = self._data.get(key)
            if hit is None:
                return None
            self._data.move_to_end(key)
            return hit[0]

    def put(self, key: Hashable, value: V, size: int) -> None:
        """Keep `value` under `key`, evicting the least recently used as needed."""
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            if size > self.max_bytes:
                return
            self._data[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes or len(self._data) > self.max_entries:
                _, (_, evicted) = self._data.popitem(last=False)
                self.bytes -= evicted

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._data)
