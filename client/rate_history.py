"""Rates over steps, rebuilt from a worker's history (what `lrctl plot` draws).

The history records explicit changes, not schedule ticks: each applied change names,
per parameter, the rate, base, pin and schedule before and after, at the step it took
effect (it is in force *for* that step). Between two changes a name keeps its base,
pin and schedule, so its rate at any step is the pin, else base x schedule factor(step),
computed by lrctl.common.schedules (the worker's own arithmetic).

A change records pins only when it touched pins and schedules only when it touched
schedules (as one-line descriptions; the specs are in the change's `schedules`). So each
name's timeline is a list of segments whose base is always known and whose pin and
schedule are known where a change or the worker's current state says so; the gaps are
filled by carrying a value across changes that did not touch it, both ways. A schedule
still unknown after that (set at attach, before any recorded change, and the worker
is gone) is taken as constant only when that reproduces every recorded rate of the
name; else the name is reported, not guessed. Every recorded rate is checked against
the rebuilt one. No grpc, no torch, no matplotlib.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

from lrctl.client.types import ChangeRecord, RateChange
from lrctl.common.errors import InvalidArgumentError
from lrctl.common.schedules import Constant, Schedule

_UNKNOWN = object()  # a pin or schedule no record and no current state tells
CONSTANT = Constant()


@dataclass(frozen=True)
class Unresolved:
    """A schedule whose factors are not known here (an adopted torch scheduler, or a
    description no record carries the spec of)."""

    description: str


@dataclass(frozen=True)
class CurrentState:
    """A name's base, pin and schedule as the worker reports them now (None schedule:
    adopted; `description` says which)."""

    base: float
    pin: Optional[float]
    schedule: Optional[Schedule]
    description: str = ""


@dataclass
class Segment:
    """From `start` (a step) until the next segment: the name's base, pin, schedule."""

    start: int
    base: float
    pin: object = _UNKNOWN
    schedule: object = _UNKNOWN

    def rate(self, step: int) -> float:
        """The rate at `step`; NaN where the schedule's factors are not known."""
        if self.pin is not None:
            return float(self.pin)  # type: ignore[arg-type]
        if isinstance(self.schedule, Unresolved):
            return math.nan
        assert isinstance(self.schedule, Schedule)
        return self.schedule.rate(self.base, step)

    @property
    def unknown(self) -> bool:
        return self.pin is None and isinstance(self.schedule, Unresolved)


@dataclass
class Timeline:
    """One name's segments, the steps its recorded changes took effect, and why it
    cannot be drawn ("" when it can)."""

    name: str
    segments: list[Segment]
    change_steps: list[int] = field(default_factory=list)
    problem: str = ""
    partial: str = ""  # why some steps are unknown (NaN) though others are drawn

    def rate(self, step: int) -> float:
        """The rate in force at `step` (the step's own changes included)."""
        seg = self.segments[0]
        for s in self.segments[1:]:
            if s.start > step:
                break
            seg = s
        return seg.rate(step)

    def rates(self, steps: Sequence[int]) -> list[float]:
        """rate() at each of `steps` (ascending), in one pass over the segments."""
        out, k, segs = [], 0, self.segments
        for step in steps:
            while k + 1 < len(segs) and segs[k + 1].start <= step:
                k += 1
            out.append(segs[k].rate(step))
        return out


@dataclass
class Reconstruction:
    """Every name's timeline, the steps of applied changes, and notes for the user."""

    timelines: dict[str, Timeline]
    change_steps: list[int]
    notes: list[str]


def _touches_pin(c: RateChange) -> bool:
    return c.old_pin is not None or c.new_pin is not None


def _touches_schedule(c: RateChange) -> bool:
    return bool(c.old_schedule or c.new_schedule)


def _catalog(records: Iterable[ChangeRecord], current: Mapping[str, CurrentState]) -> dict[str, Schedule]:
    """Schedule description -> spec, from every spec a record or the worker carries."""
    specs: dict[str, Schedule] = {"": CONSTANT}
    for record in records:
        for a in record.schedules:
            if a.schedule is not None:
                specs.setdefault(a.schedule.describe(), a.schedule)
    for state in current.values():
        if state.schedule is not None:
            specs.setdefault(state.schedule.describe(), state.schedule)
            if state.description:
                specs.setdefault(state.description, state.schedule)
    return specs


def reconstruct(
    records: Sequence[ChangeRecord], current: Optional[Mapping[str, CurrentState]] = None
) -> Reconstruction:
    """The timelines the applied `records` (oldest first) and the worker's `current`
    state (None when reading a file) imply. Failed records changed nothing: skipped."""
    current = current or {}
    applied = [r for r in records if not r.status]
    specs = _catalog(applied, current)
    notes: list[str] = []

    def spec(description: str) -> object:
        found = specs.get(description)
        return found if found is not None else Unresolved(description)

    events: dict[str, list[RateChange]] = {}
    steps_of: dict[str, list[int]] = {}
    truncated = 0
    for record in applied:
        if record.num_changes > len(record.changes):
            truncated += 1
        for c in record.changes:
            events.setdefault(c.name, []).append(c)
            steps_of.setdefault(c.name, []).append(record.step)
    if truncated:
        notes.append(f"{truncated} change(s) list only some of the names they changed; the "
                     "other names' rates may be off from those changes on")

    timelines: dict[str, Timeline] = {}
    # Model order when the worker tells it (its current state), else first change order.
    for name in [*current, *(n for n in events if n not in current)]:
        timelines[name] = _timeline(name, events.get(name, []), steps_of.get(name, []),
                                    current.get(name), spec)
    partial = [t for t in timelines.values() if t.partial]
    if partial:
        notes.append(f"{len(partial)} name(s) drawn only where pinned: {partial[0].name}: {partial[0].partial}"
                     + (f" (and {len(partial) - 1} more)" if len(partial) > 1 else ""))
    bad = [t for t in timelines.values() if t.problem]
    if bad:
        notes.append(f"{len(bad)} name(s) not drawn: {bad[0].name}: {bad[0].problem}"
                     + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    change_steps = sorted({r.step for r in applied})
    return Reconstruction(timelines, change_steps, notes)


def _timeline(
    name: str, changes: list[RateChange], steps: list[int], now: Optional[CurrentState], spec
) -> Timeline:
    if not changes:
        assert now is not None
        seg = Segment(0, now.base, now.pin, now.schedule if now.schedule is not None
                      else Unresolved(now.description))
        return _checked(Timeline(name, [seg]))
    segs = [Segment(0, changes[0].old_base)]
    for c, step in zip(changes, steps):
        prev = segs[-1]
        prev.base = c.old_base
        nxt = Segment(step, c.new_base)
        if _touches_pin(c):
            prev.pin, nxt.pin = c.old_pin, c.new_pin
        if _touches_schedule(c):
            prev.schedule, nxt.schedule = spec(c.old_schedule), spec(c.new_schedule)
        segs.append(nxt)
    if now is not None:
        last = segs[-1]
        last.pin = now.pin
        last.schedule = now.schedule if now.schedule is not None else Unresolved(now.description)
    # Carry pins and schedules across the changes that did not touch them, both ways.
    for attr, touched in (("pin", _touches_pin), ("schedule", _touches_schedule)):
        for i, c in enumerate(changes):  # forward: segment i+1 from i
            if not touched(c) and getattr(segs[i + 1], attr) is _UNKNOWN:
                setattr(segs[i + 1], attr, getattr(segs[i], attr))
        for i in range(len(changes) - 1, -1, -1):  # backward: segment i from i+1
            if not touched(changes[i]) and getattr(segs[i], attr) is _UNKNOWN:
                setattr(segs[i], attr, getattr(segs[i + 1], attr))
    timeline = Timeline(name, segs, list(steps))
    for s in segs:
        if s.pin is _UNKNOWN:
            s.pin = None  # pins come only from changes: none recorded, none held
    if any(s.schedule is _UNKNOWN for s in segs):
        # Set before the first recorded change; constant if that reproduces the record.
        for s in segs:
            if s.schedule is _UNKNOWN:
                s.schedule = CONSTANT
        problem = _mismatch(timeline, changes, steps)
        if problem:
            return Timeline(name, segs, list(steps),
                            "its schedule was set before the first recorded change and is "
                            "not in the history (the worker is gone)")
    return _checked(timeline, changes, steps)


def _mismatch(timeline: Timeline, changes: Sequence[RateChange], steps: Sequence[int]) -> str:
    """"" when the rebuilt rates equal every recorded old and new rate, else which not."""
    for k, (c, step) in enumerate(zip(changes, steps)):
        before, after = timeline.segments[k], timeline.segments[k + 1]
        for seg, want, which in ((before, c.old_lr, "before"), (after, c.new_lr, "after")):
            if seg.unknown:
                continue
            got = seg.rate(step)
            if got != want and not (got != got and want != want):
                return f"rebuilt rate {got!r} {which} the change at step {step} is not the recorded {want!r}"
    return ""


def _checked(timeline: Timeline, changes: Sequence[RateChange] = (), steps: Sequence[int] = ()) -> Timeline:
    unknown = [s for s in timeline.segments if s.unknown]
    if unknown:
        why = (f"it follows {unknown[0].schedule.description or 'a schedule'}, whose "  # type: ignore[union-attr]
               "factors are not in the history")
        if len(unknown) == len(timeline.segments):
            timeline.problem = why
            return timeline
        timeline.partial = why
    timeline.problem = _mismatch(timeline, changes, steps)
    return timeline


# -- selectors (the worker's three forms, matched here against the names at hand) ----


def selector_matches(selector: str, names: Iterable[str]) -> list[str]:
    """The names `selector` matches: an exact name, a glob (``*?[``) or ``re:REGEX``
    (searched). InvalidArgumentError for a bad regex."""
    if selector.startswith("re:"):
        try:
            pattern = re.compile(selector[3:])
        except re.error as exc:
            raise InvalidArgumentError(f"selector {selector!r} is not a valid regex: {exc}") from None
        return [n for n in names if pattern.search(n)]
    if any(ch in selector for ch in "*?["):
        return [n for n in names if fnmatch.fnmatchcase(n, selector)]
    return [n for n in names if n == selector]
