"""The durable audit log: one JSON line per recorded change, on disk before its ack.

Every change the history records (applied, or accepted and failed at its step) is
appended to a file as one JSON line, flushed and fsynced BEFORE the client that waits
for it hears the answer, and WITHOUT the training thread waiting for the disk:

- the step hook (Controller._apply, training thread, under the controller's lock)
  only puts the record on a queue (`submit`, a few microseconds) and goes on;
- a writer thread takes whatever has queued up, writes each record as it comes
  (per-name entries in chunks, so a 100k-name record never becomes one giant string),
  flushes, fsyncs once for the whole batch, and only then finishes each change
  (PendingChange.finish), which releases a waiting Set's reply.

If the disk fails, the change still stands (it is in the optimizer): its waiting
caller gets DATA_LOSS saying it WAS applied at step S but could not be logged, and
the worker logs it at ERROR. Rotation by size: past `max_bytes` the file becomes
PATH.1 (PATH.1 becomes PATH.2, ... up to PATH.`keep`), a new PATH starts, and the
directory is fsynced. The line format is lrctl.common.audit_format (and the
README, "Audit log and history"); lrctl.client.audit_file reads it. Pure Python:
no torch, no grpc.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from dataclasses import dataclass
from typing import IO, Any, Sequence

from lrctl.common import audit_format
from lrctl.common.errors import DataLossError, LrctlError
from lrctl.server.history import RateChanges, Record
from lrctl.server.requests import Outcome, PendingChange

log = logging.getLogger("lrctl.audit")

ENV = "LRCTL_AUDIT_LOG"
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_KEEP = 5
FORMAT = audit_format.FORMAT
# Per-name entries are written this many at a time: the writer's memory stays
# bounded by one chunk, whatever the record's size.
_CHUNK = 2048
# At most this many records per fsync: a burst still gets its acks in bounded time.
_MAX_BATCH = 1024


@dataclass
class _Entry:
    record: Record | None  # None: a flush marker (nothing to write)
    pending: PendingChange | None
    outcome: Outcome | None
    error: LrctlError | None
    changes: RateChanges | None
    flushed: threading.Event | None = None  # a flush marker's: set once what came before is on disk


_STOP = object()


def _head(record: Record, run_id: str) -> dict[str, Any]:
    """The line's fields other than its per-name entries (small: the request as sent)."""
    return audit_format.head(
        run_id=run_id, change_id=record.change_id, version=record.version, step=record.step,
        status=record.status, error=record.error, applied_at=record.applied_at,
        requested_at=record.requested_at, at_step=record.at_step, user=record.user,
        role=record.role, token=record.token, peer=record.peer, reason=record.reason,
        updates=[audit_format.update_dict(u.selector, u.mode.value, u.value, u.target.value)
                 for u in record.updates],
        schedules=[audit_format.assignment_dict(u.selector, _schedule_dict(u.schedule))
                   for u in record.schedules],
        num_changes=record.num_changes,
    )


def _schedule_dict(schedule: Any) -> Any:
    if schedule is None:
        return None
    try:
        return schedule.to_dict()
    except Exception:  # an adopted torch scheduler has no portable form
        return {"kind": "adopted", "description": schedule.describe()}


def _entry_lines(changes: RateChanges, start: int, stop: int) -> str:
    """Per-name entries [start, stop) as JSON objects joined by commas."""
    names, plan, describe = changes.columns
    pins = plan.old_pin is not None and plan.new_pin is not None
    schedules = plan.old_schedule is not None and plan.new_schedule is not None
    dumps, entry = json.dumps, audit_format.change_dict
    parts = []
    for k in range(start, stop):
        parts.append(dumps(entry(
            names[plan.indices[k]], (plan.old_lr[k], plan.new_lr[k]),
            (plan.old_base[k], plan.new_base[k]),
            (plan.old_pin[k], plan.new_pin[k]) if pins else None,  # type: ignore[index]
            (describe(plan.old_schedule[k]), describe(plan.new_schedule[k])) if schedules else None,  # type: ignore[index]
        )))
    return ",".join(parts)


class AuditLog:
    """An append-only JSON-lines file fed by the controller (see the module docstring).

    `path` is created if missing and appended to if it exists (a restarted worker
    goes on in the same file; `run_id` tells runs apart). `max_bytes` (> 0) starts a
    new file past that size, keeping `keep` rotated files PATH.1 (newest) .. PATH.keep.
    """

    def __init__(self, path: str | os.PathLike[str], *, run_id: str = "",
                 max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP) -> None:
        if max_bytes < 1:
            raise ValueError(f"audit_max_bytes must be at least 1, got {max_bytes}")
        if keep < 0:
            raise ValueError(f"audit_keep must not be negative, got {keep}")
        self.path = os.fspath(path)
        self.run_id = run_id
        self._max_bytes, self._keep = max_bytes, keep
        self._file: IO[bytes] | None = None
        self._size = 0
        self._open()  # a path that cannot be opened fails attach, not the first change
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._close_lock = threading.Lock()
        self.failures = 0  # batches that could not be written
        self._thread = threading.Thread(target=self._run, name="lrctl-audit", daemon=True)
        self._thread.start()

    # -- the step hook's side: hand over, never wait --------------------------------
    def submit(self, record: Record, pending: PendingChange | None, outcome: Outcome | None,
               error: LrctlError | None, changes: RateChanges | None) -> None:
        """Queue a record; `pending` is finished (with `outcome` or `error`) once it is on disk."""
        if self._closed:
            # Only a step that raced close(): say so, and do not keep its caller waiting.
            log.error("lrctl: AUDIT LOG CLOSED: change %d (%s) was not logged",
                      record.change_id, record.status or "applied")
            if pending is not None:
                pending.finish(outcome=outcome, error=error)
            return
        self._queue.put(_Entry(record, pending, outcome, error, changes))

    # -- the writer thread ------------------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while len(batch) < _MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in batch)
            entries = [item for item in batch if item is not _STOP]
            if entries:
                self._write(entries)
        self._close_file()

    def _write(self, entries: Sequence[_Entry]) -> None:
        failure: BaseException | None = None
        try:
            if self._file is None:
                self._open()
            for entry in entries:
                if entry.record is None:
                    continue
                if self._size >= self._max_bytes:
                    self._rotate()
                self._write_record(entry)
            self._sync()
        except Exception as exc:  # OSError mostly; nothing here may kill the writer
            failure = exc
            self.failures += 1
            log.error("lrctl: AUDIT LOG WRITE FAILED (%s): %s; %d change(s) are applied (or "
                      "failed) but not durably logged: %s", self.path, exc, len(entries),
                      ", ".join(str(e.record.change_id) for e in entries if e.record is not None))
            self._close_file()  # the next batch opens it again
        for entry in entries:
            self._finish(entry, failure)

    def _finish(self, entry: _Entry, failure: BaseException | None) -> None:
        pending = entry.pending
        if entry.flushed is not None:
            entry.flushed.set()
        if pending is None:
            return
        if failure is None or entry.record is None:
            pending.finish(outcome=entry.outcome, error=entry.error)
        elif entry.error is None:
            record = entry.record
            pending.finish(error=DataLossError(
                f"change {record.change_id} WAS applied at step {record.step} (version "
                f"{record.version}) but could not be written to the audit log {self.path}: "
                f"{failure}"))
        else:
            pending.finish(error=type(entry.error)(
                f"{entry.error} (and its record could not be written to the audit log "
                f"{self.path}: {failure})"))

    def _write_record(self, entry: _Entry) -> None:
        assert self._file is not None and entry.record is not None
        start = audit_format.line_start(_head(entry.record, self.run_id))
        changes = entry.changes
        if changes is None or not len(changes):
            data = (start + audit_format.LINE_END).encode()
            self._file.write(data)
            self._size += len(data)
            return
        first = start.encode()
        self._file.write(first)
        self._size += len(first)
        n = len(changes)
        for start in range(0, n, _CHUNK):
            chunk = (("," if start else "") + _entry_lines(changes, start, min(n, start + _CHUNK))).encode()
            self._file.write(chunk)
            self._size += len(chunk)
        end = audit_format.LINE_END.encode()
        self._file.write(end)
        self._size += len(end)

    # -- the file -------------------------------------------------------------------
    def _open(self) -> None:
        f = open(self.path, "ab")
        try:
            size = f.seek(0, os.SEEK_END)
            if size and not self._ends_with_newline():
                # A crash cut the last line: keep it apart from the next one (the reader
                # reports it as incomplete).
                f.write(b"\n")
                size += 1
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            f.close()
            raise
        self._file, self._size = f, size

    def _ends_with_newline(self) -> bool:
        try:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                return f.read(1) == b"\n"
        except OSError:
            return True  # not seekable (a device): nothing to repair

    def _sync(self) -> None:
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())

    def _rotate(self) -> None:
        """PATH -> PATH.1 -> ... -> PATH.keep (the oldest goes), a new PATH, the directory synced."""
        self._sync()
        self._close_file()
        if self._keep == 0:
            os.remove(self.path)
        else:
            for k in range(self._keep - 1, 0, -1):
                older = f"{self.path}.{k}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{k + 1}")
            os.replace(self.path, f"{self.path}.1")
        self._open()
        directory = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def _close_file(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError as exc:
                log.error("lrctl: closing the audit log %s failed: %s", self.path, exc)

    # -- lifecycle ------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is on disk; False on timeout."""
        if self._closed:
            return True
        done = threading.Event()
        self._queue.put(_Entry(None, None, None, None, None, flushed=done))
        return done.wait(timeout)

    def close(self, timeout: float | None = 30.0) -> None:
        """Write and fsync what is queued, then stop the writer and close the file."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("lrctl: the audit log writer did not finish within %ss (%s)", timeout, self.path)
