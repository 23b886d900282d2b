"""Reading a worker's audit log (lrctl.server.audit) after the worker is gone.

The log is JSON lines, one per recorded change (format in the README, "Audit log and
history"); rotation keeps PATH.1 (newest) .. PATH.N beside PATH. `read_audit_log`
yields the records of all of them, oldest first, as the ChangeRecord objects that
`LRClient.iter_changes` yields, so `lrctl history --file` prints the same table.
A line a crash cut short is reported (a note) and skipped, never fatal. No torch,
no grpc (only the client's plain types).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any, Optional

from lrctl.client.errors import InvalidArgumentError, LrctlError
from lrctl.client.types import ChangeRecord, RateChange, ScheduleAssignment, Update
from lrctl.common.schedules import schedule_from_dict


def audit_files(path: str) -> list[str]:
    """PATH's rotated files and PATH itself, oldest first (those that exist)."""
    rotated = []
    k = 1
    while os.path.exists(f"{path}.{k}"):
        rotated.append(f"{path}.{k}")
        k += 1
    files = [*reversed(rotated), *([path] if os.path.exists(path) else [])]
    if not files:
        raise InvalidArgumentError(f"no audit log at {path!r} (nor rotated files {path}.1, ...)")
    return files


def _pair(value: Any) -> tuple[Any, Any]:
    return (value[0], value[1]) if value else (None, None)


def _change(entry: dict[str, Any]) -> RateChange:
    old_lr, new_lr = _pair(entry.get("lr"))
    old_base, new_base = _pair(entry.get("base"))
    old_pin, new_pin = _pair(entry.get("pin"))
    old_schedule, new_schedule = _pair(entry.get("schedule"))
    return RateChange(entry["name"], old_lr, new_lr, old_base, new_base, old_pin, new_pin,
                      old_schedule or "", new_schedule or "")


def _assignment(entry: dict[str, Any]) -> ScheduleAssignment:
    spec = entry.get("schedule")
    if spec is None or spec.get("kind") == "adopted":
        return ScheduleAssignment(entry["selector"], None)
    schedule = schedule_from_dict(spec)
    return ScheduleAssignment(entry["selector"], None if schedule.is_constant and not schedule.start_step else schedule)


def record_from_line(data: dict[str, Any]) -> ChangeRecord:
    """A ChangeRecord from one parsed audit line."""
    return ChangeRecord(
        change_id=int(data["change_id"]),
        version=int(data["version"]),
        step=int(data["step"]),
        applied_at=float(data["applied_at"]),
        requested_at=float(data["requested_at"]),
        updates=[Update(u["selector"], u["value"], u["mode"], u["target"]) for u in data["updates"]],
        changes=[_change(c) for c in data["changes"]],
        peer=data["peer"],
        user=data["user"],
        reason=data["reason"],
        at_step=data["at_step"],
        num_changes=int(data["num_changes"]),
        schedules=[_assignment(a) for a in data["schedules"]],
        role=data["role"],
        token_name=data["token"],
        status=data["status"],
        error=data["error"],
    )


def read_audit_log(path: str, note: Callable[[str], None]) -> Iterator[ChangeRecord]:
    """Every record of the log at `path` and its rotated files, oldest first.

    `note` is told of each line skipped: a last line cut short by a crash, or a line
    that is not a record. InvalidArgumentError if there is no log at `path`.
    """
    for name in audit_files(path):
        try:
            f = open(name, "rb")
        except OSError as exc:
            raise InvalidArgumentError(f"cannot read the audit log {name!r}: {exc.strerror}") from None
        with f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                record = _parse(raw)
                if record is not None:
                    yield record
                elif not raw.endswith(b"\n"):  # only a file's last line can lack one
                    note(f"the last line of {name} (line {number}) is incomplete: the worker "
                         "stopped while writing it; skipped")
                else:
                    note(f"line {number} of {name} is not a complete record (cut short by a "
                         "crash?); skipped")


def _parse(raw: bytes) -> Optional[ChangeRecord]:
    if not raw.endswith(b"\n"):
        return None  # cut short: even if it parses, the writer never finished it
    try:
        return record_from_line(json.loads(raw))
    except (ValueError, KeyError, TypeError, LrctlError):
        return None
