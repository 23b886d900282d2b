"""Selectors: how a request names parameters.

Three forms, told apart by their text:
  exact name   ``layer1.weight``
  glob         ``encoder.layers.3.*``  (fnmatch syntax: ``*``, ``?``, ``[...]``)
  regex        ``re:^encoder\\.layers\\.[0-9]+\\.``  (searched in the name)

User regexes run on the third-party `regex` engine rather than `re`: `re` holds the GIL
while it backtracks, so one catastrophic pattern would freeze the training thread.
`regex` releases the GIL (concurrent=True) and takes a timeout, so a slow match
costs its request (INVALID_ARGUMENT), never the job. Its default syntax is `re`'s.
Compiling is not covered by that timeout (it holds the GIL, and `regex` expands nested
counted repeats at compile time: ``(?:a{1000}){1000}`` took 0.4 s and 250 MB), so it is
bounded before it starts: a selector has at most MAX_SELECTOR_CHARS characters (globs
too: fnmatch + `re` compile time grows with the text), and a regex's counted repeats are
capped (MAX_REPEAT_BOUND each, MAX_REPEAT_PRODUCT together, MAX_REPEAT_EXPANSION for
the text they repeat). Within those caps the worst selector compiles in tens of ms and a
few tens of MB, once (parsed selectors are cached, bounded in bytes: SELECTOR_CACHE_BYTES).

Scale (bench/bench_scale.py, 100,000 names): a glob or regex that starts with a literal
prefix (``encoder.layers.3.*``, ``re:^encoder\\.layers\\.3\\.``) is only tried on the
names that start with that prefix, found by bisection in a sorted copy of the names.
Other patterns scan every name through C-level ``map`` calls, in chunks (see _CHUNK
for how regexes keep both the GIL and their time budget in check). Resolved selectors
are cached compactly (a ``range`` when the matches are contiguous, else an ``array``).
"""

from __future__ import annotations

import bisect
import difflib
import fnmatch
import math
import operator
import re
import time
from array import array
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache, partial
from itertools import compress, repeat
from typing import Callable, Sequence

import regex

from lrctl.common.errors import InvalidArgumentError, NotFoundError
from lrctl.server.bounded_cache import BoundedCache

try:  # compiling a pattern without going through `re`'s cache of 512 patterns
    from re._compiler import compile as _compile_uncached  # Python 3.11+
except ImportError:  # pragma: no cover (Python 3.10)
    from sre_compile import compile as _compile_uncached  # type: ignore[no-redef]

REGEX_PREFIX = "re:"
_GLOB_CHARS = frozenset("*?[")
# Time one regex selector may spend matching all names before it is refused.
REGEX_BUDGET_S = 1.0
# Regex matching runs in chunks of names through C-level `map`, holding the GIL, each
# name with a short timeout: a chunk holds the GIL for at most _CHUNK * _FAST_TIMEOUT_S.
# Releasing the GIL for every name (concurrent=True) made 100k names take ~1 s on a
# busy machine: each release handed the GIL to the training thread for up to the
# switch interval. A chunk with a name that needs longer is matched again the careful
# way: concurrent=True, each name with what is left of the budget.
_CHUNK = 256
_FAST_TIMEOUT_S = 1e-4
# Caps checked before anything is compiled (measured on this machine, regex 2026.11.19;
# parameter names are far shorter than any of them):
# - MAX_SELECTOR_CHARS: the worst 4096-character selectors compile in ~55 ms (glob
#   ``*a*a...``, regex ``(?:a|b)(?:a|b)...``); an 800 KB glob took 13.7 s.
# - Counted repeats {m} {m,} {m,n} {,n} (upper bound; m for {m,}), found by a textual scan
#   that may over-count (in classes, comments): each at most MAX_REPEAT_BOUND, their product
#   at most MAX_REPEAT_PRODUCT. The allowed worst nesting, ``(?:a{100}){100}``, compiles in
#   ~3 ms and ~3 MB; ``(?:a{1000}){1000}`` took 0.4 s and 250 MB, ``(?:a{3000}){3000}`` 2.6 GB.
# - The product alone does not bound the cost: ``(?:[ab]...800 classes...){1000}`` passes
#   it and took 0.8 s and 200 MB (2 GB with one more {10}). So MAX_REPEAT_EXPANSION bounds
#   the repeated text too: each character (a class or escape counts 1) times the bounds of
#   the repeats around it, summed. ~200 bytes and ~0.3 us of compiling per unit: at the
#   cap, ~4 MB and ~6 ms (``(?:a{100}){100}`` is ~10,300).
MAX_SELECTOR_CHARS = 4096
# The caches of parsed selectors (module-wide) and of resolved matches (per NameIndex)
# are bounded by an estimate of their bytes as well as by count: 300 distinct heavy
# regexes, ~3 MB compiled each, grew a worker by 1 GB under a count bound alone
# (bench/bench_selector_cache.py). Resident bytes per unit of _expansion() measured
# 20-300 for `regex` 2026.11.19 (counted repeats are the most), so a compiled regex
# is estimated at 400 a unit; a glob compiled by `re` at up to ~50 bytes a character.
SELECTOR_CACHE_BYTES = 16 * 1024 * 1024
MATCH_CACHE_BYTES = 16 * 1024 * 1024
_CACHE_ENTRIES = 1024
_REGEX_UNIT_BYTES = 400
_GLOB_CHAR_BYTES = 64
_ENTRY_BYTES = 1024
MAX_REPEAT_BOUND = 1000
MAX_REPEAT_PRODUCT = 10_000
MAX_REPEAT_EXPANSION = 20_000
_COUNTED_REPEAT = re.compile(r"\{(\d*)(,?)(\d*)\}")
# Above this many names, "did you mean" compares the typo only with its neighbours in
# sorted order (forwards and backwards spelled), not with every name: difflib over
# 100,000 names took ~20 s of worker CPU.
_SUGGEST_ALL = 2000
_SUGGEST_WINDOW = 50
_REGEX_META = frozenset(".^$*+?{}[]\\|()")
# A call whose caller has gone stops matching: its check runs every _CHECK_EVERY names.
# It travels in a context variable so that the selector cache stays keyed by text alone.
_CHECK_EVERY = 1024
_CHECK: ContextVar[Callable[[], None] | None] = ContextVar("lrctl_selector_check", default=None)
_QUANTIFIERS = frozenset("*+?{")


def quote(text: str, limit: int = 200) -> str:
    r"""`text` in quotes for an error message, cut to about `limit` characters.

    Unprintable characters are escaped (a message stays one line), backslashes are not:
    repr() would show the selector re:a\.b as 're:a\\.b', which is not what was typed.
    """
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return f"'{shown}'" + (f"... ({len(text)} characters)" if len(text) > limit else "")


@dataclass(frozen=True)
class Selector:
    """A parsed selector: an exact name, a glob (`re` pattern) or a user regex."""

    text: str
    glob: re.Pattern[str] | None = None
    user_regex: regex.Pattern | None = None
    size: int = 0  # estimated bytes it holds, for the cache's bound

    def __post_init__(self) -> None:
        if not self.size:
            text = self.text
            if self.user_regex is not None:
                source = text[len(REGEX_PREFIX):]
                compiled = _REGEX_UNIT_BYTES * max(_expansion(source), len(source))
            else:
                compiled = _GLOB_CHAR_BYTES * len(text) if self.glob is not None else 0
            object.__setattr__(self, "size", _ENTRY_BYTES + 4 * len(text) + compiled)

    @property
    def is_exact(self) -> bool:
        return self.glob is None and self.user_regex is None

    @property
    def literal_prefix(self) -> str:
        """A prefix that every name this (non-exact) selector matches starts with ('' if none known)."""
        if self.glob is not None:
            stops = [k for k in map(self.text.find, "*?[") if k >= 0]
            return self.text[: min(stops)] if stops else self.text
        assert self.user_regex is not None
        literal, anchored, _ = _regex_literal(self.text[len(REGEX_PREFIX):])
        return literal if anchored else ""

    def select(self, names: Sequence[str]) -> list[int]:
        """Indices of the names this (non-exact) selector matches."""
        check = _CHECK.get()
        if self.glob is not None:
            return _scan(names, self.glob.match, check)
        assert self.user_regex is not None
        source = self.text[len(REGEX_PREFIX):]
        literal, anchored, whole = _regex_literal(source)
        if whole:  # the regex is plain text (after an optional '^'): string tests in C
            test = str.startswith if anchored else operator.contains
            return _scan(names, test, check, repeat(literal))
        search = self.user_regex.search
        if _matches_everything(self.user_regex, source):
            return list(range(len(names)))
        fast = partial(search, timeout=_FAST_TIMEOUT_S)
        deadline = time.monotonic() + REGEX_BUDGET_S
        out: list[int] = []
        try:
            for start in range(0, len(names), _CHUNK):
                if check is not None and start % _CHECK_EVERY == 0:
                    check()
                part = names[start : start + _CHUNK]
                try:
                    hits = list(map(fast, part))
                except TimeoutError:
                    # A name needs longer: the careful way, where a timeout refuses the selector.
                    hits = [
                        search(name, timeout=max(deadline - time.monotonic(), 1e-3), concurrent=True)
                        for name in part
                    ]
                out.extend(compress(range(start, start + len(part)), hits))
        except TimeoutError:
            raise InvalidArgumentError(
                f"regex in selector {quote(self.text)} takes too long to match "
                f"{len(names)} names (over {REGEX_BUDGET_S:g} s); simplify it"
            ) from None
        return out


def _scan(
    names: Sequence[str], test: Callable[..., object], check: Callable[[], None] | None, *more: object
) -> list[int]:
    """Indices of the names that pass test(name, *next(more)) (C-level map), calling
    `check` between chunks of names. `more` are endless iterators (itertools.repeat)."""
    if check is None:
        return list(compress(range(len(names)), map(test, names, *more)))  # type: ignore[call-overload]
    out: list[int] = []
    for start in range(0, len(names), _CHECK_EVERY):
        check()
        part = names[start : start + _CHECK_EVERY]
        out.extend(compress(range(start, start + len(part)), map(test, part, *more)))  # type: ignore[call-overload]
    return out


@lru_cache(maxsize=256)
def _regex_literal(source: str) -> tuple[str, bool, bool]:
    """(text, anchored, whole): the literal text a regex starts with, after an optional
    '^' (anchored), and whether that text is the whole regex; ('', False, False) when unsure.

    Conservative: only plain characters and escaped punctuation, none followed by a
    quantifier, and no alternation or inline flags anywhere in the regex. A whole
    literal matches exactly the names that contain it (start with it, when anchored).
    """
    if "|" in source or "(?" in source:
        return "", False, False
    anchored = source.startswith("^")
    out: list[str] = []
    k = 1 if anchored else 0
    while k < len(source):
        c = source[k]
        if c == "\\":
            nxt = source[k + 1 : k + 2]
            if not nxt or nxt.isalnum() or not nxt.isascii():
                break
            literal, k = nxt, k + 2
        elif c in _REGEX_META:
            break
        else:
            literal, k = c, k + 1
        if k < len(source) and source[k] in _QUANTIFIERS:
            return "".join(out), anchored, False  # the character is optional or repeated
        out.append(literal)
    return "".join(out), anchored, k == len(source)


_CLASS_ESCAPES = frozenset("dDwWsS")


def _matches_everything(pattern: regex.Pattern, source: str) -> bool:
    """True when `pattern` finds a match in every string (``re:.*``).

    Without assertions (anchors, lookaround, word boundaries, backreferences, verbs),
    what a pattern can match at the end of any string is what it can match in "": so
    if it matches "", `search` succeeds at the latest at the end of every name.
    """
    if "^" in source or "$" in source or "(?" in source or "(*" in source:
        return False
    k = source.find("\\")
    while k >= 0:
        escaped = source[k + 1 : k + 2]
        if escaped.isalnum() and escaped not in _CLASS_ESCAPES:
            return False  # \b \A \Z \1 \N{...} \p{...} ...: not a plain character class
        k = source.find("\\", k + 2)
    try:
        return pattern.search("", timeout=_FAST_TIMEOUT_S) is not None
    except TimeoutError:
        return False


def _compact(positions: list[int]) -> Sequence[int]:
    """Sorted positions, stored small: a range when contiguous, else an array."""
    if positions and positions[-1] - positions[0] == len(positions) - 1:
        return range(positions[0], positions[-1] + 1)
    return array("q", positions)


def _repeat_bound(match: re.Match[str]) -> int | None:
    """Upper bound of a counted repeat ``{m}``/``{m,}``/``{m,n}``/``{,n}`` (m for ``{m,}``);
    None when the braces are not a counted repeat (``{}``, ``{,}``: literal text)."""
    low, comma, high = match.groups()
    if not low and not high:
        return None
    return int(high) if high else int(low)


def _check_repeats(text: str, source: str) -> None:
    """Refuse a regex whose counted repeats would make compiling it slow or big.

    Textual and conservative: braces inside classes or comments count too, and sibling
    repeats multiply as if nested; that only makes the check stricter.
    """
    bounds = []
    for match in _COUNTED_REPEAT.finditer(source):
        j = match.start()
        while j and source[j - 1] == "\\":
            j -= 1
        bound = _repeat_bound(match)
        if bound is not None and (match.start() - j) % 2 == 0:  # not after an escaping '\\'
            bounds.append(bound)
    if not bounds:
        return
    if max(bounds) > MAX_REPEAT_BOUND:
        raise InvalidArgumentError(
            f"regex in selector {quote(text)} has a counted repeat of {max(bounds)}; at most "
            f"{MAX_REPEAT_BOUND} (compiling expands counted repeats)"
        )
    product = math.prod(max(bound, 1) for bound in bounds)  # <= 1000 ** 1366: computable
    if product > MAX_REPEAT_PRODUCT:
        raise InvalidArgumentError(
            f"regex in selector {quote(text)}: counted repeats multiply to {product}; at most "
            f"{MAX_REPEAT_PRODUCT} (compiling expands counted repeats)"
        )
    if product > 1:
        expansion = _expansion(source)
        if expansion > MAX_REPEAT_EXPANSION:
            raise InvalidArgumentError(
                f"regex in selector {quote(text)}: counted repeats expand it to about {expansion} "
                f"elements; at most {MAX_REPEAT_EXPANSION} (repeat less, or a shorter part)"
            )


def _expansion(source: str) -> int:
    """About how many elements compiling `source` makes once counted repeats are expanded:
    every character (a class or an escape counts as one) times the upper bounds of the
    counted repeats around it. Over-counts rather than under-counts."""
    levels: list[list[int]] = [[]]  # per open group: the sizes of its items so far
    k, n = 0, len(source)
    while k < n:
        c = source[k]
        if c == "\\":
            levels[-1].append(1)
            k += 2
        elif c == "[":  # a class: one element; ends at the first ']' past a leading '^' / ']'
            j = k + 1
            if source[j : j + 1] == "^":
                j += 1
            if source[j : j + 1] == "]":
                j += 1
            while j < n and source[j] != "]":
                j += 2 if source[j] == "\\" else 1
            levels[-1].append(1)
            k = j + 1
        elif c == "(":
            levels.append([])
            k += 1
        elif c == ")":
            inner = levels.pop() if len(levels) > 1 else []
            levels[-1].append(sum(inner) + 1)
            k += 1
        elif c == "{":
            match = _COUNTED_REPEAT.match(source, k)
            bound = _repeat_bound(match) if match else None
            if bound is None or not levels[-1]:
                levels[-1].append(1)
                k += 1
            else:
                levels[-1][-1] *= max(bound, 1)
                k = match.end()
        else:
            levels[-1].append(1)
            k += 1
    return sum(sum(items) for items in levels)


SELECTOR_CACHE: BoundedCache[Selector] = BoundedCache(SELECTOR_CACHE_BYTES, _CACHE_ENTRIES)


def parse_selector(text: str) -> Selector:
    """Parse one selector; raises InvalidArgumentError for an empty or too long one, or a bad regex.

    Parsed globs and regexes are cached (SELECTOR_CACHE, bounded in bytes)."""
    selector = SELECTOR_CACHE.get(text)
    if selector is None:
        selector = _parse_selector(text)
        if not selector.is_exact:  # an exact name costs nothing to parse again
            SELECTOR_CACHE.put(text, selector, selector.size)
    return selector


def _parse_selector(text: str) -> Selector:
    if not text:
        raise InvalidArgumentError("empty selector: give a name, a glob or 're:REGEX'")
    if len(text) > MAX_SELECTOR_CHARS:
        raise InvalidArgumentError(
            f"selector {quote(text)} is {len(text)} characters long; at most {MAX_SELECTOR_CHARS}"
        )
    if text.startswith(REGEX_PREFIX):
        source = text[len(REGEX_PREFIX):]
        if not source:
            raise InvalidArgumentError(f"empty regex in selector {quote(text)}")
        _check_repeats(text, source)
        try:
            # cache_pattern=False: regex's own cache (500 patterns) keeps none of them.
            return Selector(text, user_regex=regex.compile(source, cache_pattern=False))
        except (regex.error, OverflowError, RecursionError, ValueError, MemoryError) as exc:
            reason = quote(str(exc)).strip("'\"")
            raise InvalidArgumentError(f"malformed regex in selector {quote(text)}: {reason}") from None
    if _GLOB_CHARS.intersection(text):
        # Compiled without `re`'s own cache: it keeps 512 patterns, ~0.2 MB each at worst.
        return Selector(text, glob=_compile_uncached(fnmatch.translate(text), 0))
    return Selector(text)


class NameIndex:
    """The model's parameter names in model order, with fast selector resolution.

    Names never change after attach, so resolved selectors are cached, and a sorted copy
    of the names (built on first need) narrows a pattern with a literal prefix to the
    names that start with it.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names: tuple[str, ...] = tuple(names)
        self.position: dict[str, int] = {name: i for i, name in enumerate(self.names)}
        if len(self.position) != len(self.names):
            raise ValueError("parameter names must be unique")
        self._matches: BoundedCache[Sequence[int]] = BoundedCache(MATCH_CACHE_BYTES, _CACHE_ENTRIES)
        self._sorted: tuple[list[str], array] | None = None
        self._reversed: list[str] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def filter(self, selector: str, *, check: Callable[[], None] | None = None) -> Sequence[int]:
        """Positions a ListParameters filter matches: every name for "", else match()."""
        return range(len(self.names)) if not selector else self.match(selector, check=check)

    def names_at(self, positions: Sequence[int]) -> Sequence[str]:
        """The names at the given positions (a slice for a contiguous range)."""
        if isinstance(positions, range) and positions.step == 1:
            return self.names[positions.start:positions.stop]
        return [self.names[i] for i in positions]

    def match(self, text: str, *, check: Callable[[], None] | None = None) -> Sequence[int]:
        """Indices (model order, ascending) of the names a selector matches; may be empty.

        `check` is called every ~1024 names while a pattern is matched, and raises to
        stop the work of a call whose caller has gone (nothing is cached then).
        """
        if check is None:
            return self._match(text)
        token = _CHECK.set(check)
        try:
            return self._match(text)
        finally:
            _CHECK.reset(token)

    def _match(self, text: str) -> Sequence[int]:
        if (text and len(text) <= MAX_SELECTOR_CHARS and not text.startswith(REGEX_PREFIX)
                and not _GLOB_CHARS.intersection(text)):
            # An exact name: a dict lookup, not cached (a batch of 50,000 names would
            # push every costly pattern out of the cache).
            i = self.position.get(text)
            return () if i is None else (i,)
        hit = self._matches.get(text)
        if hit is None:
            hit = self._match_uncached(text)
            # A range is a few dozen bytes; an array 8 a position.
            held = 64 if isinstance(hit, (range, tuple)) else 64 + hit.itemsize * len(hit)
            self._matches.put(text, hit, _ENTRY_BYTES + 4 * len(text) + held)
        return hit

    def _match_uncached(self, text: str) -> Sequence[int]:
        selector = parse_selector(text)
        if selector.is_exact:
            i = self.position.get(text)
            return () if i is None else (i,)
        prefix = selector.literal_prefix
        if prefix:
            sorted_names, positions = self._sorted_index()
            lo, hi = _prefix_range(sorted_names, prefix)
            if hi - lo < len(self.names):
                hits = selector.select(sorted_names[lo:hi])
                return _compact(sorted(positions[lo + j] for j in hits))
        return _compact(selector.select(self.names))

    def _sorted_index(self) -> tuple[list[str], array]:
        if self._sorted is None:  # a race builds it twice, harmlessly
            order = sorted(range(len(self.names)), key=self.names.__getitem__)
            self._sorted = ([self.names[i] for i in order], array("q", order))
        return self._sorted

    def _sorted_reversed(self) -> list[str]:
        """Every name spelled backwards, sorted: names sharing an end sit together."""
        if self._reversed is None:  # a race builds it twice, harmlessly
            self._reversed = sorted(name[::-1] for name in self.names)
        return self._reversed

    def not_found(self, selector: Selector, what: str = "parameter") -> NotFoundError:
        """The NotFoundError for a selector that matched nothing, with suggestions."""
        if selector.is_exact:
            message = f"no {what} named {quote(selector.text)}"
            suggestions = self.closest_names(selector.text)
            if suggestions:
                message += "; did you mean " + ", ".join(repr(s) for s in suggestions) + "?"
            return NotFoundError(message)
        message = f"selector {quote(selector.text)} matches no {what}"
        near = self._names_near_prefix(selector.literal_prefix)
        if near:
            start, examples = near
            message += f"; names that start with {quote(start)}: " + ", ".join(map(quote, examples))
        return NotFoundError(message)

    def closest_names(self, name: str, n: int = 3) -> list[str]:
        """Up to n names that look like `name`, best first (for 'did you mean').

        Up to _SUGGEST_ALL names, every name is compared. Above, only the names next to
        `name` in sorted order (sharing its longest prefix) and in sorted order of the
        reversed names (sharing its longest suffix), _SUGGEST_WINDOW on each side: a typo
        keeps either the start or the end of the name it misspells.
        """
        if len(self.names) <= _SUGGEST_ALL:
            return difflib.get_close_matches(name, self.names, n=n, cutoff=0.6)
        candidates: dict[str, None] = {}
        for ordered, key, flip in (
            (self._sorted_index()[0], name, False),
            (self._sorted_reversed(), name[::-1], True),
        ):
            at = bisect.bisect_left(ordered, key)
            for found in ordered[max(at - _SUGGEST_WINDOW, 0) : at + _SUGGEST_WINDOW]:
                candidates[found[::-1] if flip else found] = None
        return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)

    def _names_near_prefix(self, prefix: str, n: int = 3) -> tuple[str, list[str]] | None:
        """The longest start of `prefix` that some names share, and n of them (a pattern
        that matched nothing usually went wrong after the part it spelled right)."""
        if not prefix or not self.names:
            return None
        ordered = self._sorted_index()[0]
        for cut in range(len(prefix), 0, -1):
            start = prefix[:cut]
            at = bisect.bisect_left(ordered, start)
            if at < len(ordered) and ordered[at].startswith(start):
                return start, [name for name in ordered[at:at + n] if name.startswith(start)]
        return None


def _prefix_range(sorted_names: Sequence[str], prefix: str) -> tuple[int, int]:
    """[lo, hi) of the sorted names that may start with `prefix` (all that do are inside)."""
    lo = bisect.bisect_left(sorted_names, prefix)
    while prefix and ord(prefix[-1]) == 0x10FFFF:
        prefix = prefix[:-1]
    if not prefix:
        return lo, len(sorted_names)
    after = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    return lo, bisect.bisect_left(sorted_names, after, lo)
