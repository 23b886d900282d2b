"""Reading a worker's audit log (lrctl.server.audit) after the worker is gone.

The log is JSON lines, one per recorded change (format in the README, "Audit log and
history"); rotation keeps PATH.1 (newest) .. PATH.N beside PATH. `read_audit_log`
yields the records of all of them, oldest first, as the ChangeRecord objects that
`LRClient.iter_changes` yields, so `lrctl history --file` prints the same table.
A line a crash cut short is reported (a note) and skipped, never fatal. No torch,
no grpc (only the client's plain types).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Optional

from lrctl.client.errors import LrctlError
from lrctl.client.types import ChangeRecord, RateChange, ScheduleAssignment, Update
from lrctl.common import audit_format
from lrctl.common.schedules import schedule_from_dict


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
    for name, number, raw in audit_format.iter_lines(path):
        record = _parse(raw)
        if record is not None:
            yield record
        else:
            note(audit_format.torn_note(name, number, raw) + "; skipped")


def _parse(raw: bytes) -> Optional[ChangeRecord]:
    data = audit_format.parse(raw)
    if data is None:
        return None  # cut short: even if it parses, the writer never finished it
    try:
        return record_from_line(data)
    except (ValueError, KeyError, TypeError, LrctlError):
        return None


def record_line(record: ChangeRecord, run_id: str) -> str:
    """`record` as one audit-log line (the worker's own format), for `lrctl history
    --export`. Pins are written when an update targeted them and schedules when the
    request assigned any: what the worker's writer calls "touched"."""
    pins = any(u.target == "pin" for u in record.updates)
    schedules = bool(record.schedules)
    fields = audit_format.head(
        run_id=run_id, change_id=record.change_id, version=record.version, step=record.step,
        status=record.status, error=record.error, applied_at=record.applied_at,
        requested_at=record.requested_at, at_step=record.at_step, user=record.user,
        role=record.role, token=record.token_name, peer=record.peer, reason=record.reason,
        updates=[audit_format.update_dict(u.selector, u.mode, u.value, u.target) for u in record.updates],
        schedules=[audit_format.assignment_dict(a.selector, None if a.schedule is None else a.schedule.to_dict())
                   for a in record.schedules],
        num_changes=record.num_changes,
    )
    changes = [
        audit_format.change_dict(
            c.name, (c.old_lr, c.new_lr), (c.old_base, c.new_base),
            (c.old_pin, c.new_pin) if pins else None,
            (c.old_schedule, c.new_schedule) if schedules else None)
        for c in record.changes
    ]
    return audit_format.line(fields, changes)
