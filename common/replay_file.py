"""Reading a run's changes back for replay, and checking a new run against them.

A replay file is an audit log (lrctl.server.audit) or an export (`lrctl history
--export`): one JSON line per recorded change. Replay re-sends each APPLIED change's
request as it was sent (its updates and schedule assignments, the same selectors,
modes and values) for the step it was applied at; failed records are left out (they
changed nothing). Given the same starting state, the same requests at the same steps
make the same per-name values, bit for bit (a pin scaled by 0.5 is 0.5 x the same
double). So the checks here make sure the state is the same where it matters: every
name the run changed exists, and each name's base (and pin and schedule, where the
record shows them) where the replay starts is what the new run has: before the first
change that touched it, or, for a job resumed from a checkpoint at step S, its value
at S (after the last change before S, or before the first from S on).

Both replays use this module: the worker's own (attach(replay=...),
lrctl.server.replay) and `lrctl replay FILE` against a running worker
(lrctl.client.replay). Pure Python: no torch, no grpc.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from lrctl.common import audit_format
from lrctl.common.errors import InvalidArgumentError, LrctlError
from lrctl.common.schedules import Schedule, schedule_from_dict

# The longest reason a worker takes (lrctl.server.write_plan.MAX_REASON_CHARS).
_MAX_REASON = 4096
# Mismatches named in one message (the count says how many more).
_SHOWN = 3


@dataclass(frozen=True)
class ReplayUpdate:
    """An update as sent: mode "absolute" | "scale" | "unpin", target "base" | "pin"."""

    selector: str
    value: float
    mode: str
    target: str


@dataclass(frozen=True)
class NameChange:
    """One name's recorded entry: old and new; pin and schedule None when untouched."""

    name: str
    old_lr: float
    new_lr: float
    old_base: float
    new_base: float
    pin: Optional[tuple[Optional[float], Optional[float]]]
    schedule: Optional[tuple[str, str]]


@dataclass(frozen=True)
class ReplayChange:
    """One applied change to send again at `step`."""

    change_id: int
    step: int
    run_id: str
    user: str
    reason: str
    updates: tuple[ReplayUpdate, ...]
    schedules: tuple[tuple[str, Optional[Schedule]], ...]  # (selector, spec; None clears)
    num_changes: int
    changes: tuple[NameChange, ...]  # all num_changes of them (a file holds them all)

    @property
    def replay_reason(self) -> str:
        """The reason the replayed change is recorded with: its origin, then its own reason."""
        prefix = f"replay of change {self.change_id}"
        if not self.reason:
            return prefix
        return f"{prefix}: {self.reason}"[:_MAX_REASON]


_REPLAY_REASON = re.compile(r"replay of change (\d+)(?::|$)")


def replayed_change_id(reason: str) -> Optional[int]:
    """The recorded change id a replay_reason names; None for any other reason."""
    match = _REPLAY_REASON.match(reason)
    return None if match is None else int(match[1])


def _bad(path: str, name: str, number: int, why: str) -> InvalidArgumentError:
    where = f"line {number} of {name}" if name == path else f"line {number} of {name} (rotated from {path})"
    return InvalidArgumentError(f"replay file {path!r}: {where} {why}")


def _pair(value: Any, what: str) -> tuple[Any, Any]:
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"{what} is not an [old, new] pair")
    return value[0], value[1]


def _change(data: dict[str, Any]) -> ReplayChange:
    updates = tuple(
        ReplayUpdate(str(u["selector"]), float(u["value"]), str(u["mode"]), str(u["target"]))
        for u in data["updates"])
    schedules = []
    for a in data["schedules"]:
        spec = a["schedule"]
        if spec is not None and spec.get("kind") == "adopted":
            raise ValueError(f"assigns an adopted torch scheduler to {a['selector']!r}, which "
                             "cannot be sent again")
        schedules.append((str(a["selector"]), None if spec is None else schedule_from_dict(spec)))
    changes = []
    for c in data["changes"]:
        old_lr, new_lr = _pair(c["lr"], "lr")
        old_base, new_base = _pair(c["base"], "base")
        pin = _pair(c["pin"], "pin") if "pin" in c else None
        schedule = _pair(c["schedule"], "schedule") if "schedule" in c else None
        changes.append(NameChange(str(c["name"]), float(old_lr), float(new_lr), float(old_base),
                                  float(new_base), pin, schedule))
    return ReplayChange(
        change_id=int(data["change_id"]), step=int(data["step"]), run_id=str(data["run_id"]),
        user=str(data["user"]), reason=str(data["reason"]), updates=updates,
        schedules=tuple(schedules), num_changes=int(data["num_changes"]), changes=tuple(changes))


def read_replay(path: str) -> list[ReplayChange]:
    """The applied changes of the run in `path` (and its rotated files), in order.

    InvalidArgumentError naming the file and line for a line cut short or not a
    record (a replay with a change missing would not be the same run), a change that
    cannot be sent again, a file holding several runs, or changes out of step order.
    """
    changes: list[ReplayChange] = []
    runs: dict[str, None] = {}
    for name, number, raw in audit_format.iter_lines(path):
        data = audit_format.parse(raw)
        if data is None:
            why = ("is cut short (the worker stopped while writing it)" if not raw.endswith(b"\n")
                   else "is not a JSON object (cut short by a crash?)")
            raise _bad(path, name, number, why)
        if data.get("format") != audit_format.FORMAT:
            raise _bad(path, name, number, f"has format {data.get('format')!r}; this lrctl reads "
                                            f"format {audit_format.FORMAT}")
        try:
            if data["status"]:
                continue  # failed at its step: it changed nothing
            if data.get("role") == "schedule":
                continue  # a metric-fed schedule's own move: the replayed run's schedule makes it
            change = _change(data)
        except (KeyError, TypeError, ValueError, AttributeError, LrctlError) as exc:
            why = f"lacks field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise _bad(path, name, number, f"is not a replayable record: {why}") from None
        if len(change.changes) != change.num_changes:
            raise _bad(path, name, number, f"lists {len(change.changes)} of the {change.num_changes} "
                                            f"names change {change.change_id} touched")
        if changes and change.step < changes[-1].step:
            raise _bad(path, name, number, f"has change {change.change_id} at step {change.step}, "
                                            f"before the step {changes[-1].step} of the line above it")
        runs.setdefault(change.run_id)
        changes.append(change)
    if len(runs) > 1:
        raise InvalidArgumentError(
            f"replay file {path!r} holds changes of {len(runs)} runs ({', '.join(runs)}); export "
            "the run to replay with `lrctl history --export FILE`")
    return changes


_UNSET = object()


@dataclass(frozen=True)
class StartState:
    """A name's recorded values where a replay starts: before the first recorded change
    at or after that step that touched it, or (`after`) after the last one before it
    (pin and schedule where a record shows them; _UNSET where none does)."""

    change_id: int
    step: int
    base: float
    pin: Any = _UNSET
    schedule: Any = _UNSET
    after: bool = False


def start_states(changes: Sequence[ReplayChange], step: int = 0) -> dict[str, StartState]:
    """Per name the run touched: its recorded values at the boundary of `step`, where a
    replay that starts there (a job resumed from a checkpoint) takes over. `changes` in
    the order they were applied."""
    at: dict[str, dict[str, Any]] = {}
    for change in changes:
        later = change.step >= step
        for c in change.changes:
            state = at.get(c.name)
            # A pin or schedule an earlier record showed, still in force.
            known = {} if state is None else {k: state[k] for k in ("pin", "schedule") if k in state}
            if later and (state is None or state["after"]):
                # Its first touch from `step` on: its old values are the ones at `step`.
                state = at[c.name] = {"change_id": change.change_id, "step": change.step,
                                      "base": c.old_base, "after": False, **known}
            elif not later:  # before `step`: the values it left (the last such change wins)
                state = at[c.name] = {"change_id": change.change_id, "step": change.step,
                                      "base": c.new_base, "after": True, **known}
                if c.pin is not None:
                    state["pin"] = c.pin[1]
                if c.schedule is not None:
                    state["schedule"] = c.schedule[1]
                continue
            if c.pin is not None:
                state.setdefault("pin", c.pin[0])
            if c.schedule is not None:
                state.setdefault("schedule", c.schedule[0])
    return {name: StartState(**state) for name, state in at.items()}


def _same(a: Optional[float], b: Optional[float]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a == b or (math.isnan(a) and math.isnan(b))


def start_mismatches(
    expected: Mapping[str, StartState], current: Mapping[str, tuple[float, Optional[float], str]],
) -> list[str]:
    """What differs between the recorded starting values and `current` (name -> base,
    pin, schedule description, of every name the new run holds), one phrase each."""
    out = []
    for name, want in expected.items():
        have = current.get(name)
        if have is None:
            out.append(f"{name!r} (changed by change {want.change_id}) is not a parameter this "
                       "run's optimizer holds")
            continue
        base, pin, schedule = have
        when = f"{'after' if want.after else 'before'} change {want.change_id}"
        if not _same(base, want.base):
            out.append(f"{name!r} starts with base rate {base!r}, the recorded run had "
                       f"{want.base!r} {when}")
        if want.pin is not _UNSET and not _same(pin, want.pin):
            out.append(f"{name!r} starts {'unpinned' if pin is None else f'pinned at {pin!r}'}, the "
                       f"recorded run had {'no pin' if want.pin is None else f'a pin at {want.pin!r}'} "
                       f"{when}")
        if want.schedule is not _UNSET and schedule != want.schedule:
            out.append(f"{name!r} starts with schedule {schedule or 'constant'!r}, the recorded run "
                       f"had {want.schedule or 'constant'!r} {when}")
    return out


def mismatch_message(path: str, mismatches: Sequence[str]) -> str:
    """One line: the first few mismatches and how many more."""
    more = f" (and {len(mismatches) - _SHOWN} more)" if len(mismatches) > _SHOWN else ""
    return (f"cannot replay {path!r} on this run: " + "; ".join(mismatches[:_SHOWN]) + more)


def names_mismatch(change: ReplayChange, names: Sequence[str]) -> Optional[str]:
    """How the names the change's selectors match in this run differ from the recorded
    ones (None: the same names)."""
    recorded = [c.name for c in change.changes]
    if list(names) == recorded:
        return None
    have, want = set(names), set(recorded)
    extra = [n for n in names if n not in want]
    missing = [n for n in recorded if n not in have]
    parts = []
    if extra:
        parts.append(f"also matches {extra[0]!r}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    if missing:
        parts.append(f"does not match {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if not parts:
        parts.append("matches the recorded names in another order")
    return (f"change {change.change_id} (step {change.step}) touched {len(recorded)} name(s) in the "
            f"recorded run; here it {' and '.join(parts)}")
