"""The rate table: per name a base rate, a schedule and an optional pin; names grouped
into rate classes.

The rate in force for a name at step S is its pin when it has one, else
``schedule.rate(base, S)``. Names with the same (base, schedule), or the same pin,
form one *rate class*: one rate per step, however many names share it. The apply
strategy installs class rates, so a schedule costs O(classes) per step, not O(names).

Pure Python: no torch, no grpc. The controller holds its lock around every call.
"""

from __future__ import annotations

import logging
import math
from array import array
from itertools import repeat
from typing import Any, Callable, Hashable, Iterable, Sequence

from lrctl.common.errors import ResourceExhaustedError
from lrctl.common.schedules import Constant, Schedule

log = logging.getLogger("lrctl.controller")

CONSTANT = Constant()
_PLAIN_RATE = Schedule.rate
# Schedules are never forgotten (the history refers to them by id): bound them.
MAX_SCHEDULES = 10_000
MAX_SCHEDULE_POINTS = 200_000

# A class key: (PINNED, pin, driving schedule id or 0) or (SCHEDULED, base, schedule id).
# A pinned name keeps following the momentum an adopted scheduler drives, so pins of
# names under different such schedulers are different classes.
PINNED, SCHEDULED = 0, 1
ClassKey = tuple


def rate_of(schedule: Any, base: float, pin: float | None, step: int) -> float:
    """The rate in force: the pin, else the schedule's rate for `base` at `step`."""
    if pin is not None:
        return pin
    return schedule.rate(base, step)


def clamped_rate(key: ClassKey, limit: float, book: Any, step: int) -> tuple[float, bool]:
    """A rate class's rate at `step` from its key and limit, and whether the limit cut
    it (a NaN schedule holds the base): RateTable.class_rate's formula, also what a
    read snapshot (lrctl.server.read_model) evaluates in the serving process."""
    if key[0] == PINNED:
        return key[1], False
    if key[2] == 0 and key[1] <= limit:  # id 0, constant (Constant.rate): the base, no lookup
        return key[1], False
    rate = book[key[2]].rate(key[1], step)
    if rate <= limit:  # False for NaN too
        return rate, False
    return (limit if not math.isnan(rate) else key[1]), True


class ScheduleBook:
    """Every schedule used in this run, by id; id 0 is constant. Equal specs share an id."""

    def __init__(self) -> None:
        self._schedules: list[Any] = [CONSTANT]
        self._ids: dict[Hashable, int] = {CONSTANT: 0}
        self._points = 0

    def intern(self, schedule: Any) -> int:
        """The id of `schedule`, adding it if new (ResourceExhaustedError past the bound)."""
        found = self._ids.get(schedule)
        if found is not None:
            return found
        points = len(getattr(schedule, "points", ()))
        _check_room(len(self._schedules), self._points + points)
        self._points += points
        self._ids[schedule] = len(self._schedules)
        self._schedules.append(schedule)
        return len(self._schedules) - 1

    def canonical(self, schedule: Any) -> Any:
        """The book's own instance of a spec it holds (`schedule` itself otherwise)."""
        found = self._ids.get(schedule)
        return schedule if found is None else self._schedules[found]

    def find(self, schedule: Any) -> int | None:
        """The id of `schedule` if the book holds it, else None (adds nothing)."""
        return self._ids.get(schedule)

    def scratch(self) -> "ScratchBook":
        """A book for planning that keeps nothing: a request that is refused, or a dry
        run, must not use up the room every later request shares."""
        return ScratchBook(self)

    def __getitem__(self, schedule_id: int) -> Any:
        return self._schedules[schedule_id]

    def __len__(self) -> int:
        return len(self._schedules)

    def describe(self, schedule_id: int) -> str:
        """One line for replies and the history; "" for constant."""
        return "" if schedule_id == 0 else self._schedules[schedule_id].describe()


def _check_room(schedules: int, points: int) -> None:
    if schedules >= MAX_SCHEDULES or points > MAX_SCHEDULE_POINTS:
        raise ResourceExhaustedError(
            f"this run already uses {schedules} distinct schedules ({points} piecewise points "
            f"with this one); at most {MAX_SCHEDULES} ({MAX_SCHEDULE_POINTS} points) are kept: "
            "reuse one"
        )


class ScratchBook:
    """A ScheduleBook's ids plus provisional ids for specs it does not hold yet."""

    def __init__(self, book: ScheduleBook) -> None:
        self._book = book
        self._extra: list[Any] = []
        self._extra_ids: dict[Hashable, int] = {}

    def intern(self, schedule: Any) -> int:
        found = self._book._ids.get(schedule)
        if found is None:
            found = self._extra_ids.get(schedule)
        if found is None:
            points = sum(len(getattr(s, "points", ())) for s in (*self._extra, schedule))
            _check_room(len(self._book) + len(self._extra), self._book._points + points)
            found = self._extra_ids[schedule] = len(self._book) + len(self._extra)
            self._extra.append(schedule)
        return found

    def __getitem__(self, schedule_id: int) -> Any:
        n = len(self._book)
        return self._book[schedule_id] if schedule_id < n else self._extra[schedule_id - n]


class RateState:
    """Per-name bases, schedule ids and pins: what the planner reads.

    `base[i]` is None for a parameter the optimizer does not hold.
    """

    def __init__(self, base: list[float | None], schedule: array, pins: dict[int, float]) -> None:
        self.base, self.schedule, self.pins = base, schedule, pins

    def copy(self) -> "RateState":
        return RateState(self.base.copy(), array("q", self.schedule), dict(self.pins))


class RateTable(RateState):
    """The live table and its partition into rate classes.

    A scheduled rate past what a class's parameters can take (see set_limits) is
    clamped at the step, never handed to the optimizer.
    """

    def __init__(
        self,
        base: list[float | None],
        schedule: Sequence[int],
        book: ScheduleBook,
    ) -> None:
        super().__init__(base, array("q", schedule), {})
        self.book = book
        self._limit_of: Callable[[int], float] = lambda i: math.inf
        self.class_of = array("q", [-1]) * len(base)
        self._keys: list[ClassKey | None] = []
        self._ids: dict[ClassKey, int] = {}
        self._sizes: list[int] = []
        self._limits: list[float] = []
        self._free: list[int] = []
        self.scheduled: set[int] = set()  # classes whose rate depends on the step
        # The scheduled classes by schedule id: a step evaluates each schedule's factor once.
        self._by_schedule: dict[int, list[int]] = {}
        # Classes whose schedule also drives other hyperparameters (an adopted
        # OneCycleLR cycles momentum): class -> schedule.
        self.driven: dict[int, Any] = {}
        self._clamped: set[int] = set()
        for i, b in enumerate(base):
            if b is not None:
                self._join_all((i,), self._key(i))

    def set_limits(self, limit_of: Callable[[int], float]) -> None:
        """Use `limit_of(i)`, the largest rate parameter i can take, to clamp schedules."""
        self._limit_of = limit_of
        self._limits = [math.inf] * len(self._limits)
        for i, c in enumerate(self.class_of):
            if c in self.scheduled:
                self._limits[c] = min(self._limits[c], limit_of(i))

    # -- classes -----------------------------------------------------------------
    def _key(self, i: int) -> ClassKey:
        pin = self.pins.get(i)
        sid = self.schedule[i]
        if pin is not None:
            return (PINNED, pin, sid if getattr(self.book[sid], "driven_keys", ()) else 0)
        return (SCHEDULED, self.base[i], sid)

    def _join_all(self, members: Sequence[int], key: ClassKey) -> int:
        """Put `members` (not in any class, or just left theirs) in the class of `key`."""
        c = self._ids.get(key)
        if c is None:
            c = self._free.pop() if self._free else len(self._keys)
            if c == len(self._keys):
                self._keys.append(key)
                self._sizes.append(0)
                self._limits.append(math.inf)
            else:
                self._keys[c], self._sizes[c], self._limits[c] = key, 0, math.inf
            self._ids[key] = c
            if key[0] == SCHEDULED and not self.book[key[2]].is_constant:
                self.scheduled.add(c)
                self._by_schedule.setdefault(key[2], []).append(c)
            if getattr(self.book[key[2]], "driven_keys", ()):
                self.driven[c] = self.book[key[2]]
        self._sizes[c] += len(members)
        if c in self.scheduled:  # constant and pinned rates were checked when planned
            self._limits[c] = min(self._limits[c], *map(self._limit_of, members))
        class_of = self.class_of
        for i in members:
            class_of[i] = c
        return c

    def _leave_all(self, c: int, count: int) -> None:
        """`count` members leave class c (their class_of is rewritten by the caller)."""
        self._sizes[c] -= count
        if self._sizes[c] == 0:
            key = self._keys[c]
            del self._ids[key]  # type: ignore[arg-type]
            self._keys[c] = None
            if c in self.scheduled:
                self.scheduled.discard(c)
                same = self._by_schedule[key[2]]  # type: ignore[index]
                same.remove(c)
                if not same:
                    del self._by_schedule[key[2]]  # type: ignore[index]
            self.driven.pop(c, None)
            self._clamped.discard(c)
            self._free.append(c)

    def classes(self) -> dict[int, tuple[ClassKey, float]]:
        """Every class in use: its key and the largest rate its parameters can take."""
        keys, limits = self._keys, self._limits
        return {c: (keys[c], limits[c]) for c in self._ids.values()}  # type: ignore[misc]

    def class_key(self, c: int) -> ClassKey:
        key = self._keys[c]
        assert key is not None
        return key

    # -- rates ---------------------------------------------------------------------
    def class_rate(self, c: int, step: int) -> float:
        """Class c's rate at `step`, clamped to what its parameters can take."""
        key = self.class_key(c)
        limit = self._limits[c]
        rate, clamped = clamped_rate(key, limit, self.book, step)
        if clamped and c not in self._clamped:
            self._clamped.add(c)
            log.warning(
                "lrctl: the schedule %r gives base %r the rate %r at step %d, past %g, the "
                "largest its parameters can take; holding %g", self.book.describe(key[2]),
                key[1], self.book[key[2]].rate(key[1], step), step, limit, limit)
        return rate

    def scheduled_rates(self, step: int) -> dict[int, float]:
        """The rate at `step` of every scheduled class: what the step hook installs.

        A schedule whose rate is base x factor (Schedule.rate itself) has its factor
        computed once for all its classes, with Schedule.rate's exact arithmetic; the
        others (inverse-time, one-cycle, adopted) and anything past a limit go through
        class_rate.
        """
        out: dict[int, float] = {}
        keys, limits, book = self._keys, self._limits, self.book
        for sid, classes in self._by_schedule.items():
            schedule = book[sid]
            if type(schedule).rate is not _PLAIN_RATE:
                for c in classes:
                    out[c] = self.class_rate(c, step)
                continue
            f = schedule.factor(step)
            for c in classes:
                base = keys[c][1]  # type: ignore[index]
                r = 0.0 if base == 0.0 else base * f
                out[c] = r if r <= limits[c] else self.class_rate(c, step)
        return out

    def rates(self, step: int) -> dict[int, float]:
        """Every class's rate at `step`."""
        return {c: self.class_rate(c, step) for c in self._ids.values()}

    # -- changes -------------------------------------------------------------------
    def commit(
        self,
        indices: Iterable[int],
        base: Iterable[float],
        schedule: Iterable[int] | None,
        pins: Iterable[float] | None,
    ) -> dict[int, int]:
        """Install new per-name values (NaN pin: none); returns position -> new class
        for every name whose class changed."""
        # Names move in bulk, per (old class, new key): a change on 100k names is
        # usually a few such moves, and class bookkeeping is done once for each.
        pairs: Iterable[Any] = zip(
            indices, base,
            repeat(None) if schedule is None else schedule,
            repeat(None) if pins is None else pins,
        )
        bases, schedules, pin_of, class_of, keys = self.base, self.schedule, self.pins, self.class_of, self._keys
        moves: dict[tuple[int, ClassKey], list[int]] = {}
        for i, b, s, p in pairs:
            bases[i] = b
            if s is not None:
                schedules[i] = s
            if p is not None:
                if p != p:  # NaN: no pin
                    pin_of.pop(i, None)
                else:
                    pin_of[i] = p
            key = self._key(i)
            c = class_of[i]
            if key != keys[c]:
                moves.setdefault((c, key), []).append(i)
        moved: dict[int, int] = {}
        for (c, key), members in moves.items():
            self._leave_all(c, len(members))
            moved.update(dict.fromkeys(members, self._join_all(members, key)))
        return moved
