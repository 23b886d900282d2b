"""Guardrails: bounds on the learning rates that changes may set, fixed by the worker.

A worker (its owner, not its clients) sets per-selector minimum and maximum rates and
an optional maximum factor per change. A change that would break one is refused whole,
before anything is applied, and again at its step boundary (a change queued for a
later step is checked against the state it meets there).

What is checked, for every name a change touches (its settings after the change):
  - a pinned name: the pin (its rate in force) within [min, max];
  - otherwise: the base within [min, max], and base x the schedule's peak factor (the
    highest rate the schedule can give it, Schedule.peak_factor) at most max; for an
    adopted torch scheduler, whose future is unknown, the rate in force at the due
    step. A schedule may take the rate below min: warmups and decays start or end
    near 0 by design, and min guards the base they scale;
  - max_factor: the rate in force at the due step just after the change is within a
    factor of max_factor of the rate just before it (both ways). A change to or from
    a rate of 0 (freezing, unfreezing) is no factor: only [min, max] apply to it. A
    name whose old rate is outside its bounds (the job started there) may move back
    inside by any factor, so that no guardrail locks a name out of its own bounds.
Names a change does not touch are not checked, nor are schedule ticks (not changes).
max_factor guards against one mistyped change, not a sequence of them: [min, max]
are the hard bounds.

A name matched by several rules gets the tightest bounds (the largest min, the
smallest max); rules that leave a name no rate at all fail at attach. Bounds are
resolved once per name at attach (names never change), so a check is a pass over the
names a change touches, with no selector matching.

The compact text form (``--guardrail`` and $LRCTL_GUARDRAILS): ``SELECTOR=MIN..MAX``,
either bound may be left out (``head.*=..0.1``, ``encoder.*=1e-5..``); several rules
are joined with ';' in $LRCTL_GUARDRAILS. The selector is everything before the last
'=', so exact names, globs and ``re:`` regexes all work; spaces around the parts
are ignored. $LRCTL_MAX_FACTOR gives the factor.

Pure Python: no torch, no grpc.
"""

from __future__ import annotations

import logging
import math
import os
from array import array
from operator import truediv
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from lrctl.common.errors import FailedPreconditionError, LrctlError
from lrctl.server.selectors import NameIndex, parse_selector, quote

log = logging.getLogger("lrctl.controller")

GUARDRAILS_ENV = "LRCTL_GUARDRAILS"
MAX_FACTOR_ENV = "LRCTL_MAX_FACTOR"
# Bounds and factors are compared with this relative slack: 0.001 x 10 is
# 0.010000000000000002, and "scale by 10" under max_factor 10 must pass.
_SLACK = 1e-12


def _check_number(what: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} {value!r} is not a number")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} {value!r} is not a finite number")
    return value


@dataclass(frozen=True)
class Guardrail:
    """Rates of the names `selector` matches stay within [min_lr, max_lr] (None: no bound)."""

    selector: str
    min_lr: float | None = None
    max_lr: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.selector, str):
            raise ValueError(f"guardrail selector {self.selector!r} is not a string")
        try:
            parse_selector(self.selector)
        except LrctlError as exc:
            raise ValueError(f"guardrail {quote(self.selector)}: {exc}") from None
        where = f"guardrail {quote(self.selector)}"
        low = _check_number(f"{where}: min_lr", self.min_lr)
        high = _check_number(f"{where}: max_lr", self.max_lr)
        object.__setattr__(self, "min_lr", low)
        object.__setattr__(self, "max_lr", high)
        if low is None and high is None:
            raise ValueError(f"{where} has neither min_lr nor max_lr: give one or both")
        for name, value in (("min_lr", low), ("max_lr", high)):
            if value is not None and math.copysign(1.0, value) < 0:
                raise ValueError(f"{where}: {name} {value!r} is negative")
        if low is not None and high is not None and low > high:
            raise ValueError(f"{where}: min_lr {low!r} is above max_lr {high!r}")

    @classmethod
    def parse(cls, text: str) -> "Guardrail":
        """One rule from ``SELECTOR=MIN..MAX`` (either bound may be empty)."""
        selector, eq, bounds = text.rpartition("=")
        selector = selector.strip()  # "a=..1; b=..2": spaces around parts are layout
        if not eq or not selector:
            raise ValueError(f"guardrail {quote(text)} is not SELECTOR=MIN..MAX "
                             "(e.g. 'encoder.*=1e-5..1e-2' or 'head.*=..0.1')")
        low, dots, high = bounds.partition("..")
        if not dots:
            raise ValueError(f"guardrail {quote(text)}: bounds {quote(bounds)} are not MIN..MAX "
                             "(leave a side empty for no bound: '..0.1', '1e-5..')")

        def number(part: str, name: str) -> float | None:
            part = part.strip()
            if not part:
                return None
            try:
                return float(part)
            except ValueError:
                raise ValueError(f"guardrail {quote(text)}: {name} {quote(part)} is not a number") from None

        return cls(selector, number(low, "min"), number(high, "max"))

    def text(self) -> str:
        """The compact form, as `parse` reads it."""
        low = "" if self.min_lr is None else repr(self.min_lr)
        high = "" if self.max_lr is None else repr(self.max_lr)
        return f"{self.selector}={low}..{high}"


@dataclass(frozen=True)
class Guardrails:
    """The worker's guardrails: rules (several may match a name; all apply) and max_factor."""

    rules: tuple[Guardrail, ...] = ()
    max_factor: float | None = None

    def __post_init__(self) -> None:
        rules = tuple(self.rules)
        for rule in rules:
            if not isinstance(rule, Guardrail):
                raise ValueError(f"guardrail rules must be Guardrail objects, got {rule!r}")
        object.__setattr__(self, "rules", rules)
        factor = _check_number("max_factor", self.max_factor)
        # 1 would refuse every change of a rate (not a guardrail but a lock: give no
        # admin token instead); below 1 means nothing.
        if factor is not None and not factor > 1.0:
            raise ValueError(f"max_factor {factor!r} must be above 1")
        object.__setattr__(self, "max_factor", factor)

    def __bool__(self) -> bool:
        return bool(self.rules) or self.max_factor is not None

    @classmethod
    def parse(cls, text: str = "", max_factor: str | float | None = None) -> "Guardrails":
        """Rules from ``SEL=MIN..MAX;SEL=MIN..MAX`` (empty parts are skipped) and a factor."""
        rules = tuple(Guardrail.parse(part) for part in text.split(";") if part.strip())
        if isinstance(max_factor, str):
            try:
                max_factor = float(max_factor) if max_factor.strip() else None
            except ValueError:
                raise ValueError(f"max_factor {quote(max_factor)} is not a number") from None
        return cls(rules, max_factor)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Guardrails":
        """From $LRCTL_GUARDRAILS and $LRCTL_MAX_FACTOR (empty Guardrails when unset)."""
        env = os.environ if environ is None else environ
        try:
            return cls.parse(env.get(GUARDRAILS_ENV, ""), env.get(MAX_FACTOR_ENV))
        except ValueError as exc:
            raise ValueError(f"${GUARDRAILS_ENV} / ${MAX_FACTOR_ENV}: {exc}") from None

    def bind(self, index: NameIndex) -> "BoundGuardrails":
        """Each name's tightest bounds; ValueError for a rule that matches no name, or
        rules that leave a name no rate."""
        n = len(index)
        low, high = array("d", [0.0]) * n, array("d", [math.inf]) * n
        low_rule, high_rule = array("q", [-1]) * n, array("q", [-1]) * n
        for k, rule in enumerate(self.rules):
            try:
                matched = index.match(rule.selector)
            except LrctlError as exc:
                raise ValueError(f"guardrail {quote(rule.selector)}: {exc}") from None
            if not matched:
                raise ValueError(f"guardrail {quote(rule.selector)}: "
                                 f"{index.not_found(parse_selector(rule.selector))}")
            for i in matched:
                if rule.min_lr is not None and (low_rule[i] < 0 or rule.min_lr > low[i]):
                    low[i], low_rule[i] = rule.min_lr, k
                if rule.max_lr is not None and (high_rule[i] < 0 or rule.max_lr < high[i]):
                    high[i], high_rule[i] = rule.max_lr, k
        bad = next((i for i in range(n) if low[i] > high[i]), None)
        if bad is not None:
            a, b = self.rules[low_rule[bad]], self.rules[high_rule[bad]]
            raise ValueError(
                f"guardrails {quote(a.selector)} (min {a.min_lr!r}) and {quote(b.selector)} "
                f"(max {b.max_lr!r}) leave {index.names[bad]!r} no rate"
            )
        return BoundGuardrails(self, index.names, low, high, low_rule, high_rule)


@dataclass(frozen=True)
class NameSettings:
    """A touched name after a change, as the check reads it (parallel sequences,
    position j for the j-th touched name)."""

    indices: Sequence[int]
    old_lr: Sequence[float]  # rate in force at the due step before the change
    new_lr: Sequence[float]  # ... and after it
    new_base: Sequence[float]
    pinned: Sequence[bool]  # pinned after the change
    schedule: Sequence[int]  # the schedule id each name follows after the change
    specs: Mapping[int, Any]  # id -> spec, for every id in `schedule`


@dataclass(frozen=True)
class BoundGuardrails:
    """Guardrails resolved to per-name bounds (model order)."""

    guardrails: Guardrails
    names: Sequence[str]
    low: array  # 'd': 0.0 where no rule gives a min
    high: array  # 'd': inf where no rule gives a max
    low_rule: array  # 'q': index of the rule that gives the min, -1 for none
    high_rule: array
    bounded: bool = field(init=False)
    # The largest min and the smallest max of all names: values between them are
    # inside every name's bounds (a uniform rule needs no per-name look at all).
    common_low: float = field(init=False)
    common_high: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bounded", any(k >= 0 for k in self.low_rule)
                           or any(k >= 0 for k in self.high_rule))
        object.__setattr__(self, "common_low", max(self.low, default=0.0))
        object.__setattr__(self, "common_high", min(self.high, default=math.inf))

    @property
    def active(self) -> bool:
        """Whether any change can be refused."""
        return self.bounded or self.guardrails.max_factor is not None

    def check(self, step: int, settings: Callable[[], NameSettings]) -> None:
        """Raise FailedPreconditionError naming the first name a change would take
        outside its guardrails (settings is called only when there is something to check)."""
        if not self.active:
            return
        s = settings()
        message = self._bounds_violation(s) if self.bounded else None
        if message is None and self.guardrails.max_factor is not None:
            message = self._factor_violation(s, step)
        if message is not None:
            # Not INVALID_ARGUMENT: the request is valid lrctl input that a worker without
            # guardrails (or, for the factor, another current rate) would take; this
            # worker's configuration and state refuse it.
            raise FailedPreconditionError(message)

    def _bounds_violation(self, s: NameSettings) -> str | None:
        low, high = self.low, self.high
        peaks: dict[int, float | None] = {}
        for sid, spec in s.specs.items():
            fn = getattr(spec, "peak_factor", None)  # an adopted torch scheduler has none
            peaks[sid] = None if fn is None else fn()
        # This runs in the step hook for changes that are due: one plain comprehension
        # finds the few names worth a closer look (100k names: ~15 ms, not ~140).
        pinned = s.pinned
        values = (s.new_base if not any(pinned)
                  else [lr if p else b for lr, b, p in zip(s.new_lr, s.new_base, pinned)])
        if values and self.common_low <= min(values) and max(values) <= self.common_high:
            suspects = []
        else:
            suspects = [j for j, (i, v) in enumerate(zip(s.indices, values)) if v < low[i] or v > high[i]]
        rising = {sid for sid, p in peaks.items() if p is None or p > 1.0}
        if rising:  # a schedule that can lift the rate above the base: those names too
            suspects += [j for j, sid in enumerate(s.schedule) if sid in rising]
            suspects = sorted(set(suspects))
        for j in suspects:
            i = s.indices[j]
            lo, hi = low[i], high[i]
            if s.pinned[j]:
                rate = s.new_lr[j]
                if rate < lo * (1 - _SLACK):
                    return self._below(i, f"pin {rate!r}", lo)
                if rate > hi * (1 + _SLACK):
                    return self._above(i, f"pin {rate!r}", hi)
                continue
            base = s.new_base[j]
            if base < lo * (1 - _SLACK):
                return self._below(i, f"base {base!r}", lo)
            if hi == math.inf:
                continue
            if base > hi * (1 + _SLACK):
                return self._above(i, f"base {base!r}", hi)
            p = peaks[s.schedule[j]]
            if p is None:  # an adopted torch scheduler: only its current rate is known
                if s.new_lr[j] > hi * (1 + _SLACK):
                    return self._above(i, f"rate {s.new_lr[j]!r} (base {base!r} under an adopted scheduler)", hi)
            elif base and base * p > hi * (1 + _SLACK):
                return self._above(i, f"base {base!r} x schedule peak factor {p!r} = {base * p!r}", hi)
        return None

    def _factor_violation(self, s: NameSettings, step: int) -> str | None:
        top = self.guardrails.max_factor * (1 + _SLACK)  # type: ignore[operator]
        low, high = self.low, self.high
        old_lr, new_lr = s.old_lr, s.new_lr
        if old_lr and 0.0 not in old_lr and 0.0 not in new_lr:  # C-level passes first
            ratios = list(map(truediv, new_lr, old_lr))
            if max(ratios) <= top and min(ratios) * top >= 1.0:
                return None
        suspects = [j for j, (old, new) in enumerate(zip(old_lr, new_lr))
                    if old != new and old and new and (new > old * top or old > new * top)]
        for j in suspects:
            i, old, new = s.indices[j], s.old_lr[j], s.new_lr[j]
            ratio = new / old if new > old else old / new
            if ratio > top and low[i] <= old <= high[i]:
                return (f"{self.names[i]}: rate {old!r} -> {new!r} at step {step} is a factor of "
                        f"{ratio:.6g}, above the guardrail max_factor {self.guardrails.max_factor!r}")
        return None

    def _rule(self, k: int) -> str:
        return quote(self.guardrails.rules[k].selector)

    def _above(self, i: int, what: str, bound: float) -> str:
        return f"{self.names[i]}: {what} is above the guardrail max {bound!r} of {self._rule(self.high_rule[i])}"

    def _below(self, i: int, what: str, bound: float) -> str:
        return f"{self.names[i]}: {what} is below the guardrail min {bound!r} of {self._rule(self.low_rule[i])}"

    def outside(self, rates: Mapping[int, float]) -> list[int]:
        """Positions whose rate (position -> rate) is outside their bounds."""
        low, high = self.low, self.high
        return [i for i, r in rates.items() if r < low[i] * (1 - _SLACK) or r > high[i] * (1 + _SLACK)]
