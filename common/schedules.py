"""lrctl's built-in learning-rate schedules: a factor of the optimizer step.

A name's rate in force at optimizer step ``step`` (0-based) is
``schedule.rate(base, step)``, where ``base`` is the name's base rate. Every schedule
is a frozen, hashable, keyword-only dataclass whose fields are plain numbers, strings
and tuples, so that equal specs hash equal (the worker interns them) and travel as
``to_dict()`` / ``schedule_from_dict()`` JSON.

Where a well-known scheduler exists, the arithmetic is copied from it operation for
operation so that the rates are the same floats, not merely close ones:
Hugging Face transformers' warmup lambdas (`Warmup`), torch's StepLR / MultiStepLR /
ExponentialLR closed forms (`StepDecay`, `Exponential`) and torch's OneCycleLR
(`OneCycle`). Past the end of a finite schedule the rate holds its last value
(transformers' cosine would rise again, torch's OneCycleLR raises).

`factor` and `rate` never raise for an int step >= 0: an overflow gives ``math.inf``
and the worker clamps it. This module imports neither torch nor grpc.
"""

# No `from __future__ import annotations`: validation and CLI parsing dispatch on the
# real field types (`dataclasses.fields(...).type`), which must not be strings.

import bisect
import math
from dataclasses import MISSING, dataclass, fields
from typing import Any, Callable, ClassVar, Mapping, NoReturn

from lrctl.common.errors import InvalidArgumentError

__all__ = [
    "KINDS",
    "Constant",
    "Exponential",
    "InverseTime",
    "OneCycle",
    "PiecewiseLinear",
    "Schedule",
    "StepDecay",
    "Warmup",
    "parse_schedule",
    "schedule_from_dict",
]

MAX_INT = 2**62
MAX_POINTS = 10_000

Steps = tuple[int, ...]
Points = tuple[tuple[int, float], ...]


def _fail(kind: str, message: str) -> NoReturn:
    raise InvalidArgumentError(f"{kind}: {message}")


def _check_int(kind: str, name: str, value: Any) -> int:
    # bool is an int subclass; True as a step count is a caller's mistake, not a 1.
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(kind, f"{name} must be an integer, got {value!r}")
    if value < 0:
        _fail(kind, f"{name} {value} is negative")
    if value > MAX_INT:
        _fail(kind, f"{name} {value} is larger than 2**62")
    return int(value)


def _check_float(kind: str, name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        _fail(kind, f"{name} must be a number, got {value!r}")
    try:
        # Stored as float so that 1 and 1.0 give the same spec; + 0.0 folds -0.0 into 0.0.
        number = float(value) + 0.0
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        _fail(kind, f"{name} {value!r} is not a finite number")
    return number


def _check_steps(kind: str, name: str, value: Any) -> Steps:
    if not isinstance(value, (tuple, list)):
        _fail(kind, f"{name} must be a sequence of integers, got {value!r}")
    if len(value) > MAX_POINTS:
        _fail(kind, f"{name} has {len(value)} entries, more than {MAX_POINTS}")
    return tuple(_check_int(kind, f"{name}[{i}]", v) for i, v in enumerate(value))


def _check_points(kind: str, name: str, value: Any) -> Points:
    if not isinstance(value, (tuple, list)):
        _fail(kind, f"{name} must be a sequence of [step, factor] pairs, got {value!r}")
    if len(value) > MAX_POINTS:
        _fail(kind, f"{name} has {len(value)} points, more than {MAX_POINTS}")
    points = []
    for i, point in enumerate(value):
        if not isinstance(point, (tuple, list)) or len(point) != 2:
            _fail(kind, f"{name}[{i}] must be a [step, factor] pair, got {point!r}")
        points.append(
            (_check_int(kind, f"{name}[{i}] step", point[0]), _check_float(kind, f"{name}[{i}] factor", point[1]))
        )
    return tuple(points)


def _check_str(kind: str, name: str, value: Any) -> str:
    if not isinstance(value, str):
        _fail(kind, f"{name} must be a string, got {value!r}")
    return value


def _check_bool(kind: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(kind, f"{name} must be true or false, got {value!r}")
    return value


_CHECKS: dict[Any, Callable[[str, str, Any], Any]] = {
    int: _check_int,
    float: _check_float,
    str: _check_str,
    bool: _check_bool,
    Steps: _check_steps,
    Points: _check_points,
}


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple) else value


def _power(gamma: float, k: int) -> float:
    """gamma ** k as torch computes it, with inf where Python raises OverflowError."""
    try:
        return gamma**k
    except OverflowError:
        return math.inf


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """Base of every schedule: a multiplier of the base rate as a function of the step.

    The schedule's own step is ``s = max(0, step - start_step)``: before its start a
    schedule stays at its step-0 value.
    """

    kind: ClassVar[str]
    start_step: int = 0

    def __post_init__(self) -> None:
        if type(self) is Schedule:
            raise TypeError("Schedule is abstract: use one of lrctl.common.schedules.KINDS")
        for f in fields(self):
            # Normalise in place (lists to tuples, ints to floats): equal specs, equal hashes.
            object.__setattr__(self, f.name, _CHECKS[f.type](self.kind, f.name, getattr(self, f.name)))
        self._validate()

    def _validate(self) -> None:
        """Rules between fields; per-field types and ranges are checked already."""

    def _step(self, step: int) -> int:
        # Clamped above so that float(s) and friends cannot overflow on absurd steps;
        # every schedule has long reached its limit by 2**62. Comparisons, not
        # min/max: this runs in the training step's hook.
        s = step - self.start_step
        return 0 if s < 0 else (s if s < MAX_INT else MAX_INT)

    def factor(self, step: int) -> float:
        """The multiplier of the base rate at optimizer step `step`."""
        raise NotImplementedError

    def peak_factor(self) -> float:
        """The largest factor at any step (math.inf when it grows without bound).

        What guardrails bound: a name's base x this is the highest rate the schedule
        can give it. Exact for every built-in kind (a schedule before its start holds
        its step-0 factor, which is counted).
        """
        raise NotImplementedError

    def rate(self, base: float, step: int) -> float:
        """The rate in force at `step` for base rate `base`."""
        if base == 0.0:
            return 0.0  # not 0 * inf = nan once a growing schedule overflows
        return base * self.factor(step)

    @property
    def is_constant(self) -> bool:
        """True when the factor never changes (only for `Constant`)."""
        return False

    def describe(self) -> str:
        """One short human line."""
        text = self._describe()
        return f"{text}, from step {self.start_step}" if self.start_step else text

    def _describe(self) -> str:
        return self.kind

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form: ``{"kind": ..., <every field>}``; tuples become lists."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):
            out[f.name] = _jsonable(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Schedule":
        """The schedule `to_dict` gave (see `schedule_from_dict`)."""
        schedule = schedule_from_dict(d)
        if cls is not Schedule and not isinstance(schedule, cls):
            raise InvalidArgumentError(f"expected a {cls.kind} schedule, got kind {schedule.kind!r}")
        return schedule


@dataclass(frozen=True, kw_only=True)
class Constant(Schedule):
    """Factor 1.0 at every step."""

    kind: ClassVar[str] = "constant"

    def factor(self, step: int) -> float:
        return 1.0

    def rate(self, base: float, step: int) -> float:
        return base

    def peak_factor(self) -> float:
        return 1.0

    @property
    def is_constant(self) -> bool:
        return True


WARMUP_DECAYS = ("constant", "linear", "cosine")


@dataclass(frozen=True, kw_only=True)
class Warmup(Schedule):
    """Linear warmup from `start_factor` to 1.0, then constant, linear or cosine decay.

    With start_factor = final_factor = 0 the factors equal transformers'
    get_{constant,linear,cosine}_schedule_with_warmup bit for bit, and with
    final_factor = f get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=f)
    (cosine is held at its end value past total_steps instead of rising again).
    """

    kind: ClassVar[str] = "warmup"
    warmup_steps: int
    total_steps: int = 0
    decay: str = "constant"
    start_factor: float = 0.0
    final_factor: float = 0.0
    num_cycles: float = 0.5

    def _validate(self) -> None:
        if self.decay not in WARMUP_DECAYS:
            _fail(self.kind, f"decay {self.decay!r} is not one of {', '.join(WARMUP_DECAYS)}")
        for name in ("start_factor", "final_factor", "num_cycles"):
            if getattr(self, name) < 0.0:
                _fail(self.kind, f"{name} {getattr(self, name)!r} is negative")
        if not math.isfinite(math.pi * self.num_cycles * 2.0):
            _fail(self.kind, f"num_cycles {self.num_cycles!r} is too large")
        if self.decay == "constant":
            # Options that would be silently ignored are refused: `total_steps=1000`
            # without `decay=` almost certainly meant a decay.
            for name, default in (("total_steps", 0), ("final_factor", 0.0), ("num_cycles", 0.5)):
                if getattr(self, name) != default:
                    _fail(self.kind, f"{name} {getattr(self, name)!r} has no effect with decay constant "
                          "(set decay=linear or decay=cosine)")
            return
        if self.decay == "linear" and self.num_cycles != 0.5:
            _fail(self.kind, f"num_cycles {self.num_cycles!r} has no effect with decay linear")
        if self.total_steps < self.warmup_steps:
            _fail(self.kind, f"total_steps {self.total_steps} is less than warmup_steps {self.warmup_steps}")
        if self.total_steps == self.warmup_steps:
            _fail(self.kind, f"total_steps {self.total_steps} equals warmup_steps {self.warmup_steps}: "
                  f"{self.decay} decay needs total_steps > warmup_steps")

    def factor(self, step: int) -> float:
        s = self._step(step)
        if s < self.warmup_steps:
            return self.start_factor + (1.0 - self.start_factor) * (float(s) / float(max(1, self.warmup_steps)))
        if self.decay == "linear":
            lin = max(0.0, float(self.total_steps - s) / float(max(1, self.total_steps - self.warmup_steps)))
            return lin * (1.0 - self.final_factor) + self.final_factor
        if self.decay == "cosine":
            progress = float(s - self.warmup_steps) / float(max(1, self.total_steps - self.warmup_steps))
            progress = min(progress, 1.0)
            c = max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(self.num_cycles) * 2.0 * progress)))
            return c * (1.0 - self.final_factor) + self.final_factor
        return 1.0

    def peak_factor(self) -> float:
        # The ramp spans [start_factor, 1) (only with warmup steps); the decays go from 1
        # to final_factor (cosine with num_cycles > 0.5 stays between them).
        peak = max(1.0, self.start_factor) if self.warmup_steps > 0 else 1.0
        return peak if self.decay == "constant" else max(peak, self.final_factor)

    def _describe(self) -> str:
        text = f"warmup {self.warmup_steps} steps (from {self.start_factor}) then "
        if self.decay == "constant":
            return text + "constant"
        text += f"{self.decay} to {self.final_factor} at step {self.total_steps}"
        return text + (f" ({self.num_cycles} cycles)" if self.num_cycles != 0.5 else "")


@dataclass(frozen=True, kw_only=True)
class StepDecay(Schedule):
    """Factor gamma ** k: k = s // step_size, or the number of milestones <= s.

    Equal to torch's StepLR / MultiStepLR closed form (``base_lr * gamma ** k``).
    """

    kind: ClassVar[str] = "step"
    gamma: float
    step_size: int = 0
    milestones: Steps = ()

    def _validate(self) -> None:
        if self.gamma <= 0.0:
            _fail(self.kind, f"gamma {self.gamma!r} is not positive")
        if (self.step_size > 0) == bool(self.milestones):
            _fail(self.kind, f"give exactly one of step_size > 0 or milestones, got step_size "
                  f"{self.step_size} and milestones {list(self.milestones)}")
        for a, b in zip(self.milestones, self.milestones[1:]):
            if b <= a:
                _fail(self.kind, f"milestones {list(self.milestones)} are not strictly increasing ({a} then {b})")

    def factor(self, step: int) -> float:
        s = self._step(step)
        k = s // self.step_size if self.step_size else bisect.bisect_right(self.milestones, s)
        return _power(self.gamma, k)

    def peak_factor(self) -> float:
        if self.gamma <= 1.0:
            return 1.0
        return math.inf if self.step_size else _power(self.gamma, len(self.milestones))

    def _describe(self) -> str:
        if self.step_size:
            return f"x{self.gamma} every {self.step_size} steps"
        return f"x{self.gamma} at steps {', '.join(map(str, self.milestones))}"


@dataclass(frozen=True, kw_only=True)
class Exponential(Schedule):
    """Factor gamma ** s (torch's ExponentialLR closed form)."""

    kind: ClassVar[str] = "exponential"
    gamma: float

    def _validate(self) -> None:
        if self.gamma <= 0.0:
            _fail(self.kind, f"gamma {self.gamma!r} is not positive")

    def factor(self, step: int) -> float:
        return _power(self.gamma, self._step(step))

    def peak_factor(self) -> float:
        return 1.0 if self.gamma <= 1.0 else math.inf

    def _describe(self) -> str:
        return f"x{self.gamma} per step"


@dataclass(frozen=True, kw_only=True)
class InverseTime(Schedule):
    """Rate base / (1 + gamma * s); with gamma 1.0 the seed example's base / (i + 1)."""

    kind: ClassVar[str] = "inverse_time"
    gamma: float = 1.0

    def _validate(self) -> None:
        if self.gamma < 0.0:
            _fail(self.kind, f"gamma {self.gamma!r} is negative")

    def factor(self, step: int) -> float:
        return 1.0 / (1.0 + self.gamma * self._step(step))

    def peak_factor(self) -> float:
        return 1.0  # gamma >= 0: the factor only falls

    def rate(self, base: float, step: int) -> float:
        # One division, not base * (1 / ...): the seed table's digits depend on it.
        return base / (1.0 + self.gamma * self._step(step))

    def _describe(self) -> str:
        return f"1 / (1 + {self.gamma} * step)"


ONE_CYCLE_ANNEALS = ("cos", "linear")


@dataclass(frozen=True, kw_only=True)
class OneCycle(Schedule):
    """torch's OneCycleLR with `base` as its max_lr, the same floats at every step.

    Past total_steps - 1 the rate holds its last value (torch raises, or extrapolates
    at exactly total_steps).
    """

    kind: ClassVar[str] = "one_cycle"
    total_steps: int
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    anneal: str = "cos"
    three_phase: bool = False

    def _validate(self) -> None:
        if self.total_steps < 2:
            _fail(self.kind, f"total_steps {self.total_steps} is less than 2")
        if not 0.0 < self.pct_start < 1.0:
            _fail(self.kind, f"pct_start {self.pct_start!r} is not between 0 and 1")
        for name in ("div_factor", "final_div_factor"):
            if getattr(self, name) <= 0.0:
                _fail(self.kind, f"{name} {getattr(self, name)!r} is not positive")
        if self.anneal not in ONE_CYCLE_ANNEALS:
            _fail(self.kind, f"anneal {self.anneal!r} is not one of {', '.join(ONE_CYCLE_ANNEALS)}")
        if self._phase_ends()[0] == 0.0:
            # The first phase spans zero steps: torch divides 0 by 0 at step 0.
            _fail(self.kind, f"pct_start {self.pct_start!r} x total_steps {self.total_steps} is exactly one "
                  "step of warm-up, which torch's OneCycleLR cannot compute; change pct_start")

    def _phase_ends(self) -> tuple[float, ...]:
        # Exactly torch's expressions, including the float/int mix of the last one.
        first = float(self.pct_start * self.total_steps) - 1
        if self.three_phase:
            return (first, float(2 * self.pct_start * self.total_steps) - 2, self.total_steps - 1)
        return (first, self.total_steps - 1)

    def rate(self, base: float, step: int) -> float:
        initial_lr = base / self.div_factor
        min_lr = initial_lr / self.final_div_factor
        if self.three_phase:
            lrs = ((initial_lr, base), (base, initial_lr), (initial_lr, min_lr))
        else:
            lrs = ((initial_lr, base), (base, min_lr))
        step_num = min(self._step(step), self.total_steps - 1)
        ends = self._phase_ends()
        start_step = 0.0
        for i, end_step in enumerate(ends):
            if step_num <= end_step or i == len(ends) - 1:
                # A zero-length phase is refused (first) or unreachable (later); guard anyway.
                pct = (step_num - start_step) / (end_step - start_step) if end_step != start_step else 1.0
                start, end = lrs[i]
                if self.anneal == "cos":
                    cos_out = math.cos(math.pi * pct) + 1
                    return end + (start - end) / 2.0 * cos_out
                return (end - start) * pct + start
            start_step = end_step
        raise AssertionError("unreachable: the last phase always matches")

    def factor(self, step: int) -> float:
        return self.rate(1.0, step)

    def peak_factor(self) -> float:
        # The phases move between base/div, base and base/(div x final_div): with a
        # div_factor (or their product) below 1, the start or the end is the peak.
        return max(1.0, 1.0 / self.div_factor, 1.0 / (self.div_factor * self.final_div_factor))

    def _describe(self) -> str:
        phases = "three-phase " if self.three_phase else ""
        return (f"{phases}one cycle over {self.total_steps} steps ({self.anneal}): base/{self.div_factor} "
                f"up to base by {self.pct_start:.0%}, then down to base/{self.div_factor * self.final_div_factor}")


@dataclass(frozen=True, kw_only=True)
class PiecewiseLinear(Schedule):
    """Linear interpolation between (step, factor) points; flat before the first, after the last."""

    kind: ClassVar[str] = "piecewise_linear"
    points: Points

    def _validate(self) -> None:
        if not self.points:
            _fail(self.kind, "points is empty: give at least one step:factor point")
        for i, (s, f) in enumerate(self.points):
            if f < 0.0:
                _fail(self.kind, f"points[{i}] factor {f!r} is negative")
            if i and s <= self.points[i - 1][0]:
                _fail(self.kind, f"points[{i}] step {s} is not after the previous step {self.points[i - 1][0]}")

    def factor(self, step: int) -> float:
        s = self._step(step)
        i = bisect.bisect_right(self.points, s, key=lambda p: p[0])
        if i == 0:
            return self.points[0][1]
        if i == len(self.points):
            return self.points[-1][1]
        (s0, f0), (s1, f1) = self.points[i - 1], self.points[i]
        return f0 + (f1 - f0) * ((s - s0) / (s1 - s0))

    def peak_factor(self) -> float:
        return max(f for _, f in self.points)

    def _describe(self) -> str:
        shown = [f"{s}:{f}" for s, f in self.points]
        if len(shown) > 4:
            shown = shown[:3] + ["...", shown[-1]]
        return f"piecewise linear through {len(self.points)} points {', '.join(shown)}"


KINDS: dict[str, type[Schedule]] = {
    cls.kind: cls for cls in (Constant, Warmup, StepDecay, Exponential, InverseTime, OneCycle, PiecewiseLinear)
}


def _kind_class(kind: Any) -> type[Schedule]:
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise InvalidArgumentError(f"unknown schedule kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return cls


def _build(cls: type[Schedule], values: dict[str, Any]) -> Schedule:
    """cls(**values), with unknown and missing fields as InvalidArgumentError, not TypeError."""
    known = {f.name: f for f in fields(cls)}
    for name in values:
        if name not in known:
            raise InvalidArgumentError(
                f"{cls.kind}: unknown option {name!r}; valid options: {', '.join(known)}"
            )
    for name, f in known.items():
        if name not in values and f.default is MISSING and f.default_factory is MISSING:
            raise InvalidArgumentError(f"{cls.kind}: missing required option {name}")
    return cls(**values)


def schedule_from_dict(d: Mapping[str, Any]) -> Schedule:
    """The schedule whose `to_dict()` is `d`; InvalidArgumentError names a bad kind or field."""
    if not isinstance(d, Mapping):
        raise InvalidArgumentError(f"a schedule must be a mapping with a 'kind', got {d!r}")
    if "kind" not in d:
        raise InvalidArgumentError(f"schedule {dict(d)!r} has no 'kind'; known kinds: {', '.join(KINDS)}")
    values = dict(d)
    cls = _kind_class(values.pop("kind"))
    return _build(cls, values)


# -- CLI text ------------------------------------------------------------------------

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ValueError("not true or false")


def _split(text: str) -> list[str]:
    return [] if not text.strip() else [item.strip() for item in text.split(",")]


def _parse_steps(text: str) -> Steps:
    return tuple(int(item) for item in _split(text))


def _parse_points(text: str) -> Points:
    points = []
    for item in _split(text):
        step, sep, factor = item.partition(":")
        if not sep:
            raise ValueError(f"{item!r} is not step:factor")
        points.append((int(step), float(factor)))
    return tuple(points)


# Per field type: the text parser and how a bad value is described.
_PARSERS: dict[Any, tuple[Callable[[str], Any], str]] = {
    int: (int, "an integer"),
    float: (float, "a number"),
    str: (str.strip, "a string"),
    bool: (_parse_bool, "true or false"),
    Steps: (_parse_steps, "a comma-separated list of integers, e.g. 30,80"),
    Points: (_parse_points, "a comma-separated list of step:factor points, e.g. 0:0.0,100:1.0,1000:0.1"),
}


def parse_schedule(kind: str, options: Mapping[str, str]) -> Schedule:
    """Build a schedule from CLI text: ``parse_schedule("warmup", {"warmup_steps": "100"})``.

    Each value is parsed as its field's type; an unknown kind or option, a value that
    does not parse, or one that fails validation raises InvalidArgumentError naming it.
    Values that are not strings are passed through to validation as they are.
    """
    cls = _kind_class(kind.strip() if isinstance(kind, str) else kind)
    types = {f.name: f.type for f in fields(cls)}
    values: dict[str, Any] = {}
    for name, text in options.items():
        if name not in types:
            raise InvalidArgumentError(
                f"{cls.kind}: unknown option {name!r}; valid options: {', '.join(types)}"
            )
        if not isinstance(text, str):
            values[name] = text
            continue
        parse, what = _PARSERS[types[name]]
        try:
            values[name] = parse(text)
        except ValueError:
            raise InvalidArgumentError(f"{cls.kind}: {name} {text!r} is not {what}") from None
    return _build(cls, values)
