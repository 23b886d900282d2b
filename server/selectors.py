"""Selectors: how a request names parameters.

Three forms, told apart by their text:
  exact name   ``layer1.weight``
  glob         ``encoder.layers.3.*``  (fnmatch syntax: ``*``, ``?``, ``[...]``)
  regex        ``re:^encoder\\.layers\\.[0-9]+\\.``  (searched in the name)

User regexes run on the third-party `regex` engine rather than `re`: `re` holds the GIL
while it backtracks, so one catastrophic pattern would freeze the training thread.
`regex` releases the GIL (concurrent=True) and takes a timeout, so a slow pattern
costs its request (INVALID_ARGUMENT), never the job. Its default syntax is `re`'s.

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
import operator
import re
import time
from array import array
from dataclasses import dataclass
from functools import lru_cache, partial
from itertools import compress, repeat
from typing import Sequence

import regex

from lrctl.client.errors import InvalidArgumentError, NotFoundError

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
_REGEX_META = frozenset(".^$*+?{}[]\\|()")
_QUANTIFIERS = frozenset("*+?{")


def quote(text: str, limit: int = 200) -> str:
    """repr(text) for an error message, cut to about `limit` characters."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"... ({len(text)} characters)"


@dataclass(frozen=True)
class Selector:
    """A parsed selector: an exact name, a glob (`re` pattern) or a user regex."""

    text: str
    glob: re.Pattern[str] | None = None
    user_regex: regex.Pattern | None = None

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
        if self.glob is not None:
            return list(compress(range(len(names)), map(self.glob.match, names)))
        assert self.user_regex is not None
        source = self.text[len(REGEX_PREFIX):]
        literal, anchored, whole = _regex_literal(source)
        if whole:  # the regex is plain text (after an optional '^'): string tests in C
            test = str.startswith if anchored else operator.contains
            return list(compress(range(len(names)), map(test, names, repeat(literal))))
        search = self.user_regex.search
        if _matches_everything(self.user_regex, source):
            return list(range(len(names)))
        fast = partial(search, timeout=_FAST_TIMEOUT_S)
        deadline = time.monotonic() + REGEX_BUDGET_S
        out: list[int] = []
        try:
            for start in range(0, len(names), _CHUNK):
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


@lru_cache(maxsize=256)
def parse_selector(text: str) -> Selector:
    """Parse one selector; raises InvalidArgumentError for an empty one or a bad regex."""
    if not text:
        raise InvalidArgumentError("empty selector: give a name, a glob or 're:REGEX'")
    if text.startswith(REGEX_PREFIX):
        source = text[len(REGEX_PREFIX):]
        if not source:
            raise InvalidArgumentError(f"empty regex in selector {quote(text)}")
        try:
            return Selector(text, user_regex=regex.compile(source))
        except (regex.error, OverflowError, RecursionError, ValueError) as exc:
            reason = quote(str(exc)).strip("'\"")
            raise InvalidArgumentError(f"malformed regex in selector {quote(text)}: {reason}") from None
    if _GLOB_CHARS.intersection(text):
        return Selector(text, glob=re.compile(fnmatch.translate(text)))
    return Selector(text)


def closest_names(name: str, names: Sequence[str], n: int = 3) -> list[str]:
    """Up to n names that look like `name`, best first (for 'did you mean')."""
    return difflib.get_close_matches(name, names, n=n, cutoff=0.6)


def not_found(selector: Selector, names: Sequence[str], what: str = "parameter") -> NotFoundError:
    """The NotFoundError for a selector that matched nothing, with suggestions."""
    if selector.is_exact:
        message = f"no {what} named {quote(selector.text)}"
        suggestions = closest_names(selector.text, names)
        if suggestions:
            message += "; did you mean " + ", ".join(repr(s) for s in suggestions) + "?"
        return NotFoundError(message)
    return NotFoundError(f"selector {quote(selector.text)} matches no {what}")


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
        self._matches = lru_cache(maxsize=256)(self._match_uncached)
        self._sorted: tuple[list[str], array] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def match(self, text: str) -> Sequence[int]:
        """Indices (model order, ascending) of the names a selector matches; may be empty."""
        return self._matches(text)

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


def _prefix_range(sorted_names: Sequence[str], prefix: str) -> tuple[int, int]:
    """[lo, hi) of the sorted names that may start with `prefix` (all that do are inside)."""
    lo = bisect.bisect_left(sorted_names, prefix)
    while prefix and ord(prefix[-1]) == 0x10FFFF:
        prefix = prefix[:-1]
    if not prefix:
        return lo, len(sorted_names)
    after = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    return lo, bisect.bisect_left(sorted_names, after, lo)
