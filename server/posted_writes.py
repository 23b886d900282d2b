"""Writes the serving process queues itself (attach(serving="process")): no trip
through the training process per Set.

A Set that does not wait, due at the next step boundary, planned in the serving process
(lrctl.server.serving_writes), used to be handed to the training process's link thread,
which queued it and answered the change id: a wakeup and ~0.5 ms of that process's
Python per Set, paid by the training thread as waiting for the GIL
(bench/README.md, 3c). Now the serving process puts it in a ring in shared memory,
takes its change id from a counter there, and answers at once; the step hook moves
what the ring holds into the controller's queue at the next boundary (one comparison a
step when it is empty), where it is applied as any queued change.

The shared memory is a memfd of its own (POSTED_BYTES): a header of eight 8-byte
fields (the header also counts the estimated bytes the ring holds), then SLOTS slots
of SLOT bytes, each a change: (change id, requested_at, estimated bytes, body
length) and the body (planned_wire.planned_to_wire's tuple, marshal-encoded). Both
processes change the header only under a POSIX record lock (lockf) on its first byte:
one process at a time (threads of one process are kept apart by the controller's lock,
which the training process always holds first).

What keeps every guarantee of a queued change:
  - ids: the counter in the header is the controller's own while a ring is attached;
    the training process takes an id only under the lock and after moving what the
    ring holds into its queue, so ids follow the order changes were accepted in, and
    so does the queue;
  - the queue's bounds: the training process keeps its queue's count and bytes in the
    header, never lower than they are when a change is counted against them (made
    exact when it takes the ring, queues a change itself, or applied changes at a
    boundary while the lock was free; the step hook's take counts the queue as it will
    be past its boundary, whose changes nothing can queue before: one lock a Set), and the
    serving process queues here only while the ring, the queue and this change fit
    under the smallest of the bounds (every change here could be one connection's);
    otherwise the change takes the link, where Controller.submit applies the exact
    shares;
  - a checkpoint load and close: both move the ring into the queue under the lock
    (where the load withdraws, and close fails, what is queued) and set `loads` or
    `closed` there, so a change planned before the load, or sent after close, is
    never queued here;
  - neither side waits long for the lock held by a process stopped while it holds it:
    the step hook tries for up to TAKE_WAIT_S, then leaves the ring for the next
    boundary; the serving process, then sends the Set over the link.

Imports neither grpc nor torch.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from lrctl.server.queue_limits import QueueLimits

HEADER = struct.Struct("<qqqqqqqq")  # next id, head, tail, loads, closed, queued, queued bytes, ring bytes
SLOT_HEAD = struct.Struct("<qdqI")  # change id, requested_at (time.time), estimated bytes, body length
SLOTS = 32
SLOT = 4096
BODY_MAX = SLOT - SLOT_HEAD.size  # the longest body a slot holds
POSTED_BYTES = HEADER.size + SLOTS * SLOT
TAKE_WAIT_S = 0.002
_NEXT, _HEAD, _TAIL, _LOADS, _CLOSED, _QUEUED, _QUEUED_BYTES, _RING_BYTES = range(8)
_EMPTY_HEAD_TAIL = struct.Struct("<qq")


class PostedRing:
    """Either end of the ring: the memfd `fd` mapped."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = mmap.mmap(fd, POSTED_BYTES)

    @classmethod
    def create(cls) -> "PostedRing":
        """A new ring (the training process), closed until the controller opens it
        (Controller.attach_posted: the counter is then the controller's)."""
        fd = os.memfd_create("lrctl-posted")  # close-on-exec: only pass_fds hands it on
        os.ftruncate(fd, POSTED_BYTES)
        ring = cls(fd)
        HEADER.pack_into(ring.buffer, 0, 0, 0, 0, 0, 1, 0, 0, 0)
        return ring

    def close(self) -> None:
        self.buffer.close()
        os.close(self.fd)

    # -- the lock ------------------------------------------------------------------
    def locked(self) -> Any:
        """A context manager: the header's fields (a list) under the lock, written back
        as the block leaves (whatever it raises: what was taken stays taken)."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0)
        return self._held()

    def try_locked(self, wait_s: float) -> Optional[Any]:
        """locked(), if the lock comes within `wait_s`; else None."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    return None
                time.sleep(0.00005)
                continue
            return self._held()

    def take_now(self, queued: int, queued_bytes: int, *, ring_stays: bool = True
                 ) -> Optional[list[tuple[int, float, int, bytes]]]:
        """take() if the lock is free at once (the step hook's common case, in one
        lock and unlock); else None, and the caller tries try_locked."""
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        except OSError:
            return None
        try:
            header = list(HEADER.unpack_from(self.buffer, 0))
            taken = self.take(header, queued, queued_bytes, ring_stays=ring_stays)
            HEADER.pack_into(self.buffer, 0, *header)
            return taken
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)

    @contextmanager
    def _held(self) -> Iterator[list[int]]:
        try:
            header = list(HEADER.unpack_from(self.buffer, 0))
            before = header[:]
            try:
                yield header
            finally:
                if header != before:
                    HEADER.pack_into(self.buffer, 0, *header)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)

    # -- the training process ----------------------------------------------------------
    def waiting(self) -> bool:
        """Whether changes wait in the ring (no lock: a peek; the step hook's test)."""
        head, tail = _EMPTY_HEAD_TAIL.unpack_from(self.buffer, 8)
        return head != tail

    def take(self, header: list[int], queued: int, queued_bytes: int, *,
             ring_stays: bool = True) -> list[tuple[int, float, int, bytes]]:
        """Under the lock: what the ring holds, oldest first, as (change id,
        requested_at, estimated bytes, body); the ring is then empty. The header's
        queue is then the caller's (`queued` changes of `queued_bytes`) and, unless
        the caller applies it before it queues anything else (`ring_stays` False: the
        step hook), what the ring held: the caller queues it, after the lock if it likes
        (the count is never lower than the queue when the next change is counted)."""
        out = []
        buffer = self.buffer
        for k in range(header[_HEAD], header[_TAIL]):
            at = HEADER.size + (k % SLOTS) * SLOT
            change_id, requested_at, size, n = SLOT_HEAD.unpack_from(buffer, at)
            start = at + SLOT_HEAD.size
            out.append((change_id, requested_at, size, buffer[start:start + n]))  # a slice of an mmap: bytes
        header[_QUEUED] = queued + len(out) if ring_stays else queued
        header[_QUEUED_BYTES] = queued_bytes + header[_RING_BYTES] if ring_stays else queued_bytes
        header[_HEAD] = header[_TAIL]
        header[_RING_BYTES] = 0
        return out

    @staticmethod
    def claim(header: list[int]) -> int:
        """Under the lock: the next change id."""
        change_id = header[_NEXT]
        header[_NEXT] = change_id + 1
        return change_id

    @staticmethod
    def next_id(header: list[int]) -> int:
        return header[_NEXT]

    @staticmethod
    def set_next_id(header: list[int], value: int) -> None:
        header[_NEXT] = value

    @staticmethod
    def set_queue(header: list[int], changes: int, size: int) -> None:
        """Under the lock: the controller's queue now (count, estimated bytes)."""
        header[_QUEUED], header[_QUEUED_BYTES] = changes, size

    @staticmethod
    def set_loads(header: list[int], loads: int) -> None:
        header[_LOADS] = loads

    @staticmethod
    def set_closed(header: list[int], closed: bool = True) -> None:
        header[_CLOSED] = int(closed)

    # -- the serving process -----------------------------------------------------------
    def post(self, body: bytes, *, loads: int, size: int, limits: QueueLimits) -> Optional[int]:
        """Queue a planned change (its marshal-encoded wire tuple) planned after `loads`
        checkpoint loads, of about `size` bytes: its change id, or None when it must
        take the link (see the module's docstring)."""
        if len(body) > BODY_MAX:
            return None
        held = self.try_locked(TAKE_WAIT_S)  # a training process stopped holding it: the link
        if held is None:
            return None
        with held as header:
            ring = header[_TAIL] - header[_HEAD]
            if header[_CLOSED] or header[_LOADS] != loads or ring >= SLOTS:
                return None
            most = min(limits.max_changes, limits.max_changes_per_connection, limits.max_changes_per_token)
            most_bytes = min(limits.max_bytes, limits.max_bytes_per_connection, limits.max_bytes_per_token)
            if (header[_QUEUED] + ring + 1 > most
                    or header[_QUEUED_BYTES] + header[_RING_BYTES] + size > most_bytes):
                return None
            change_id = self.claim(header)
            at = HEADER.size + (header[_TAIL] % SLOTS) * SLOT
            SLOT_HEAD.pack_into(self.buffer, at, change_id, time.time(), size, len(body))
            start = at + SLOT_HEAD.size
            self.buffer[start:start + len(body)] = body
            header[_TAIL] += 1
            header[_RING_BYTES] += size
            return change_id
