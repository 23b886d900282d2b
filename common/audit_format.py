"""The audit log's JSON-lines format, in one place for every writer and reader.

Writers: the worker's audit log (lrctl.server.audit, from its in-memory records) and
`lrctl history --export` (lrctl.client.export, from records read over gRPC). Readers:
`lrctl history --file` (lrctl.client.audit_file) and replay (lrctl.common.replay_file).
The format is in the README ("Audit log and history"): one JSON object a line, the
request as sent in the head, then `changes`, old -> new per name, with `pin` only when
the change touched pins and `schedule` only when it touched schedules.

Pure Python: no torch, no grpc.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from typing import Any, Optional

from lrctl.common.errors import InvalidArgumentError

FORMAT = 1


def number(value: Optional[float]) -> Optional[float]:
    """A pin as the line holds it: None for "no pin" (NaN in memory)."""
    return None if value is None or math.isnan(value) else value


def update_dict(selector: str, mode: str, value: float, target: str) -> dict[str, Any]:
    """One update of the request as sent (mode absolute|scale|unpin, target base|pin)."""
    return {"selector": selector, "mode": mode, "value": value, "target": target}


def assignment_dict(selector: str, schedule: Optional[dict[str, Any]]) -> dict[str, Any]:
    """One schedule assignment as sent; `schedule` is Schedule.to_dict() (None clears)."""
    return {"selector": selector, "schedule": schedule}


def head(*, run_id: str, change_id: int, version: int, step: int, status: str, error: str,
         applied_at: float, requested_at: float, at_step: Optional[int], user: str, role: str,
         token: str, peer: str, reason: str, updates: list[dict[str, Any]],
         schedules: list[dict[str, Any]], num_changes: int) -> dict[str, Any]:
    """A line's fields other than its per-name entries, in the line's order."""
    return {
        "format": FORMAT, "run_id": run_id, "change_id": change_id, "version": version,
        "step": step, "status": status, "error": error, "applied_at": applied_at,
        "requested_at": requested_at, "at_step": at_step, "user": user, "role": role,
        "token": token, "peer": peer, "reason": reason, "updates": updates,
        "schedules": schedules, "num_changes": num_changes,
    }


def change_dict(name: str, lr: tuple[float, float], base: tuple[float, float],
                pin: Optional[tuple[Optional[float], Optional[float]]] = None,
                schedule: Optional[tuple[str, str]] = None) -> dict[str, Any]:
    """One name's entry of `changes`: [old, new] of each part (pin, schedule when touched)."""
    entry: dict[str, Any] = {"name": name, "lr": list(lr), "base": list(base)}
    if pin is not None:
        entry["pin"] = [number(pin[0]), number(pin[1])]
    if schedule is not None:
        entry["schedule"] = list(schedule)
    return entry


def line_start(fields: dict[str, Any]) -> str:
    """The line up to its first per-name entry; entries follow, comma-separated, then LINE_END."""
    return json.dumps(fields)[:-1] + ', "changes": ['


LINE_END = "]}\n"


def line(fields: dict[str, Any], changes: list[dict[str, Any]]) -> str:
    """A whole line (small records; the worker's writer streams big ones in chunks)."""
    return line_start(fields) + ",".join(map(json.dumps, changes)) + LINE_END


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


def iter_lines(path: str) -> Iterator[tuple[str, int, bytes]]:
    """(file, line number, raw line) of PATH.N .. PATH.1 and PATH, oldest first, blank
    lines left out; InvalidArgumentError if there is no log or a file cannot be read."""
    for name in audit_files(path):
        try:
            f = open(name, "rb")
        except OSError as exc:
            raise InvalidArgumentError(f"cannot read the audit log {name!r}: {exc.strerror}") from None
        with f:
            for number_, raw in enumerate(f, 1):
                if raw.strip():
                    yield name, number_, raw


def parse(raw: bytes) -> Optional[dict[str, Any]]:
    """A raw line's object; None when it is cut short (no newline: the writer never
    finished it) or is not a JSON object."""
    if not raw.endswith(b"\n"):
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def torn_note(name: str, number_: int, raw: bytes) -> str:
    """What to say of a line that `parse` (or a record reader) could not use."""
    if not raw.endswith(b"\n"):  # only a file's last line can lack one
        return (f"the last line of {name} (line {number_}) is incomplete: the worker "
                "stopped while writing it")
    return f"line {number_} of {name} is not a complete record (cut short by a crash?)"
