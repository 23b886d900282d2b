"""What reads of rates, schedules and parameters see, without torch, grpc or protobuf.

Two sources answer reads through the same code (lrctl.server.read_answers builds the
messages from either): the live Controller, and a ReadSnapshot of it, which the
serving process of attach(serving="process") answers from without asking the
training process. The selection rules (which names a read gets, NOT_FOUND and
FAILED_PRECONDITION with their messages) and the rows (rate at a step, factor,
schedule text) are written once, here, for both.

A snapshot is two parts. The static one (names, shapes, dtypes, devices, numel,
requires_grad, whether the optimizer holds each, their non-lr hyperparameters) is sent
once, and again when a parameter's requires_grad changed (a job that unfreezes layers;
checked every second). The versioned one is made once per config version, not per
request: the rate class of every name (an array), each class's key and limit, pins
(and the bases and schedules of pinned names: an unpinned name's base and schedule are
its class key's), physical groups, and the schedules the book added since the last one.
For 100,000 names it is ~1.3 MB and ~4 ms to make (bench/README.md section 3c).
"""

from __future__ import annotations

import math
import pickle
from array import array
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from lrctl.common.errors import FailedPreconditionError
from lrctl.server.rates import SCHEDULED, RateState, ScheduleBook, clamped_rate
from lrctl.server.selectors import NameIndex, parse_selector, quote

Check = Callable[[], None]

# ListParameters rows: ParameterView's fields, in order, as a plain tuple (cheaper to
# make 100,000 of than frozen dataclasses).
ParameterRow = tuple[
    str, tuple[int, ...], int, str, str, bool, bool, "float | None", int, Mapping[str, float]
]


@dataclass(frozen=True)
class RateRow:
    """One name's rate as GetLearningRates reports it, at one step."""

    name: str
    lr: float
    group: int
    base: float
    factor: float
    pinned: bool
    schedule: str  # one line; "" for constant


@dataclass(frozen=True)
class ScheduleRow:
    """One name's schedule as GetSchedules reports it."""

    name: str
    base: float
    pin: float | None
    schedule_id: int
    schedule: Any  # the spec (lrctl.common.schedules) or an adopted torch scheduler's group


def why_unusable(requires_grad: bool, held: bool) -> str:
    reasons = []
    if not requires_grad:
        reasons.append("does not require grad")
    if not held:
        reasons.append("is not held by the optimizer")
    return " and ".join(reasons)


class NeedsLiveGrad(Exception):
    """A write matched a parameter that did not require grad when the snapshot was made:
    whether it does now (a job that unfreezes layers as it trains) only the training
    process knows, so the write is decided there."""


class Usable:
    """Which parameters a read (or a set) may use: bulk filters (one comprehension per
    call, not a function call per name: reads of 100,000 names) and why one may not."""

    def __init__(self, held: Callable[[Sequence[int]], tuple[int, ...]],
                 with_grad: Callable[[Sequence[int]], tuple[int, ...]],
                 why: Callable[[int], str]) -> None:
        self.held, self.with_grad, self.why = held, with_grad, why


def resolve(index: NameIndex, usable: Usable, selector: str, *, for_set: bool,
            check: Check | None = None) -> tuple[int, ...]:
    """Positions the selector matches among parameters that can be read (or set);
    NotFoundError when it matches nothing, FailedPreconditionError when none is usable."""
    matched = index.match(selector, check=check)
    if not matched:
        raise index.not_found(parse_selector(selector))
    found = usable.held(matched)
    if for_set:
        found = usable.with_grad(found)
    if found:
        return found
    name, why = index.names[matched[0]], usable.why(matched[0])
    if len(matched) == 1 and parse_selector(selector).is_exact:
        raise FailedPreconditionError(f"parameter {name!r} {why}; its rate cannot be {'set' if for_set else 'read'}")
    raise FailedPreconditionError(
        f"selector {quote(selector)} matches {len(matched)} parameter(s), none of which can be "
        f"{'set' if for_set else 'read'} (e.g. {name!r} {why})"
    )


def chosen(index: NameIndex, usable: Usable, selectors: Sequence[str],
           check: Check | None = None) -> Sequence[int]:
    """What a read of `selectors` covers, ascending (every held name without selectors)."""
    if len(selectors) == 1:
        return resolve(index, usable, selectors[0], for_set=False, check=check)  # ascending, unique
    if selectors:
        return sorted({i for s in selectors for i in resolve(index, usable, s, for_set=False, check=check)})
    return usable.held(range(len(index)))


def page(positions: Sequence[int], start: int, limit: int | None) -> Sequence[int]:
    return positions[start:] if limit is None else positions[start:start + limit]


def rate_rows(
    names: Sequence[str], positions: Sequence[int], lrs: Sequence[float | None], groups: Sequence[int],
    bases: Sequence[float], schedules: Sequence[int], pinned: Sequence[bool], book: Any, step: int,
) -> list[RateRow]:
    """GetLearningRates' rows: factors and schedule texts once per distinct schedule."""
    factors = {s: (1.0 if s == 0 else book[s].factor(step)) for s in set(schedules)}
    described = {s: book.describe(s) for s in factors}
    return [
        RateRow(names[i], lr, g, b, factors[s], pin, described[s])  # type: ignore[arg-type]
        for i, lr, g, b, s, pin in zip(positions, lrs, groups, bases, schedules, pinned)
    ]


# -- the snapshot ---------------------------------------------------------------------

def is_portable(schedule: Any) -> bool:
    """A schedule the serving process can evaluate: a spec of lrctl.common.schedules
    (pure Python); an adopted torch scheduler is not."""
    return type(schedule).__module__ == "lrctl.common.schedules"


@dataclass
class StaticPart:
    """What never changes after attach, sent once."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    numels: list[int]
    dtypes: list[str]
    devices: list[str]
    requires_grad: list[bool]
    held: list[bool]
    hyper_of: list[int]  # per name: index into hypers (-1: not held)
    hypers: list[dict[str, float]]
    # What planning a write needs (lrctl.server.serving_writes): the largest rate the
    # optimizer can apply per name (inf: not held) and one every name can take, the
    # worker's guardrails and queue limits.
    max_lr: list[float] = field(default_factory=list)
    safe_lr: float = math.inf
    guardrails: Any = None  # lrctl.server.guardrails.Guardrails
    queue_limits: Any = None  # lrctl.server.queue_limits.QueueLimits


@dataclass
class VersionedPart:
    """The table at one (step, version), as the controller holds it under its lock."""

    version: int
    loads: int  # the controller's checkpoint loads: (loads, version) names one state
    step: int
    class_of: bytes  # array("q")
    classes: dict[int, tuple[tuple, float]]  # class -> (key, limit)
    pins: dict[int, float]
    pinned_base: dict[int, float]
    pinned_schedule: dict[int, int]
    groups: bytes  # array("q")
    new_schedules: list[Any]  # the book's entries from `book_start` on
    book_start: int

    def to_wire(self) -> tuple:
        """A plain tuple that marshal encodes (C speed, no pickling of the table): the
        schedules, objects, are pickled, and only when the book grew."""
        return (self.version, self.loads, self.step, self.class_of, self.classes, self.pins,
                self.pinned_base, self.pinned_schedule, self.groups,
                pickle.dumps(self.new_schedules, pickle.HIGHEST_PROTOCOL) if self.new_schedules else b"",
                self.book_start)

    @staticmethod
    def book_start_of(t: tuple) -> int:
        """The book_start of a to_wire() tuple, without decoding the rest."""
        return t[10]

    @classmethod
    def from_wire(cls, t: tuple) -> "VersionedPart":
        schedules = pickle.loads(t[9]) if t[9] else []  # from our parent, over a socketpair
        return cls(*t[:9], schedules, t[10])


class ReadSnapshot:
    """A read-only source of reads (what read_answers needs of a Controller) at one
    version; the step is given per read, so one snapshot serves every step of its
    version (schedules are evaluated here, with the same formulas)."""

    def __init__(self, static: StaticPart, index: NameIndex | None = None) -> None:
        self.static = static
        self.index = index if index is not None else NameIndex(static.names)
        self.book = ScheduleBook()
        self.version = -1
        self.loads = 0
        self.taken_at_step = 0
        self.step = 0  # the step reads are answered at (set by the server per read)
        self._class_of = array("q")
        self._classes: dict[int, tuple[tuple, float]] = {}
        self._pins: dict[int, float] = {}
        self._pinned_base: dict[int, float] = {}
        self._pinned_schedule: dict[int, int] = {}
        self._groups = array("q")
        self._state: RateState | None = None  # rate_state(), made once per version
        self._shared: dict[str, Any] = {}  # what every version shares (the write planner)

    def update(self, part: VersionedPart) -> "ReadSnapshot":
        """A new snapshot of the newer version, sharing the static part and the book
        (append-only: the old snapshot's ids stay valid)."""
        if part.book_start != len(self.book):
            raise ValueError(f"schedules from {part.book_start}, the book has {len(self.book)}")
        out = ReadSnapshot(self.static, self.index)
        out.book = self.book
        out._shared = self._shared
        for schedule in part.new_schedules:
            if self.book.intern(schedule) != len(self.book) - 1:
                raise ValueError(f"schedule {schedule!r} is in the book twice")  # ids would shift
        out.version, out.loads, out.taken_at_step = part.version, part.loads, part.step
        out._class_of = array("q")
        out._class_of.frombytes(part.class_of)
        out._groups = array("q")
        out._groups.frombytes(part.groups)
        out._classes = part.classes
        out._pins, out._pinned_base, out._pinned_schedule = part.pins, part.pinned_base, part.pinned_schedule
        return out

    def at(self, step: int) -> "ReadSnapshot":
        """This snapshot, answering at `step` (a shallow copy: readers may overlap)."""
        out = object.__new__(ReadSnapshot)
        out.__dict__.update(self.__dict__)
        out.step = step
        return out

    # -- what planning a write reads (lrctl.server.serving_writes) -------------------
    def rate_state(self) -> RateState:
        """Every name's base, schedule id and pin at this version, as the controller's
        table holds them (made once per version, when a write first needs it)."""
        if self._state is None:
            classes, class_of = self._classes, self._class_of
            keys = {c: key for c, (key, _) in classes.items()}
            base: list[float | None] = [None] * len(class_of)
            schedule = array("q", bytes(8 * len(class_of)))
            for i, c in enumerate(class_of):
                if c >= 0:
                    key = keys[c]
                    if key[0] == SCHEDULED:
                        base[i], schedule[i] = key[1], key[2]
            for i in self._pins:
                base[i], schedule[i] = self._pinned_base[i], self._pinned_schedule[i]
            self._state = RateState(base, schedule, dict(self._pins))
        return self._state

    def planner(self) -> Any:
        """The write planner over this job's names (lrctl.server.write_plan), made once."""
        found = self._shared.get("planner")
        if found is None:
            from lrctl.server.guardrails import Guardrails
            from lrctl.server.write_plan import NameLimits, WritePlanner

            s = self.static
            guardrails = s.guardrails if s.guardrails is not None else Guardrails()
            found = self._shared["planner"] = WritePlanner(
                self.index, self._usable(for_writes=True), guardrails.bind(self.index),
                NameLimits(s.max_lr, s.safe_lr), s.dtypes.__getitem__)
        return found

    # -- what read_answers asks of a source ----------------------------------------
    def _usable(self, for_writes: bool = False) -> Usable:
        s = self.static
        held, grad = s.held, s.requires_grad

        def with_grad(positions: Sequence[int]) -> tuple[int, ...]:
            found = tuple([i for i in positions if grad[i]])
            if for_writes and len(found) != len(positions):
                raise NeedsLiveGrad()
            return found
        return Usable(lambda positions: tuple([i for i in positions if held[i]]), with_grad,
                      lambda i: why_unusable(grad[i], held[i]))

    def filter(self, selector: str, *, check: Check | None = None) -> Sequence[int]:
        return self.index.filter(selector, check=check)

    def names_at(self, positions: Sequence[int]) -> Sequence[str]:
        return self.index.names_at(positions)

    def _lrs(self, positions: Sequence[int], step: int) -> list[float | None]:
        class_of, classes, book = self._class_of, self._classes, self.book
        rates: dict[int, float] = {}
        out: list[float | None] = []
        for i in positions:
            c = class_of[i]
            if c < 0:
                out.append(None)
                continue
            r = rates.get(c)
            if r is None:
                key, limit = classes[c]
                r = rates[c] = clamped_rate(key, limit, book, step)[0]
            out.append(r)
        return out

    def _base(self, i: int) -> float:
        found = self._pinned_base.get(i)
        return found if found is not None else self._classes[self._class_of[i]][0][1]

    def _schedule(self, i: int) -> int:
        found = self._pinned_schedule.get(i)
        return found if found is not None else self._classes[self._class_of[i]][0][2]

    def parameter_rows(self, positions: Sequence[int]) -> list[ParameterRow]:
        s = self.static
        lrs, groups = self._lrs(positions, self.step), self._groups
        return [
            (s.names[i], s.shapes[i], s.numels[i], s.dtypes[i], s.devices[i], s.requires_grad[i],
             lr is not None, lr, groups[i], s.hypers[s.hyper_of[i]] if lr is not None else {})
            for i, lr in zip(positions, lrs)
        ]

    def read_page(
        self, selectors: Sequence[str], start: int = 0, limit: int | None = None,
        *, check: Check | None = None,
    ) -> tuple[list[RateRow], int, int, int]:
        positions = chosen(self.index, self._usable(), selectors, check)
        total = len(positions)
        positions = page(positions, start, limit)
        step, pins = self.step, self._pins
        rows = rate_rows(
            self.index.names, positions, self._lrs(positions, step), [self._groups[i] for i in positions],
            [self._base(i) for i in positions], [self._schedule(i) for i in positions],
            [i in pins for i in positions], self.book, step)
        return rows, self.version, step, total

    def schedules(
        self, selectors: Sequence[str], start: int = 0, limit: int | None = None,
        *, check: Check | None = None,
    ) -> tuple[list[ScheduleRow], int, int, int]:
        positions = chosen(self.index, self._usable(), selectors, check)
        total = len(positions)
        names, book, pins = self.index.names, self.book, self._pins
        rows = [ScheduleRow(names[i], self._base(i), pins.get(i), self._schedule(i), book[self._schedule(i)])
                for i in page(positions, start, limit)]
        return rows, self.version, self.step, total
