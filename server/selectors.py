"""Selectors: how a request names parameters.

Three forms, told apart by their text:
  exact name   ``layer1.weight``
  glob         ``encoder.layers.3.*``  (fnmatch syntax: ``*``, ``?``, ``[...]``)
  regex        ``re:^encoder\\.layers\\.[0-9]+\\.``  (searched in the name)

User regexes run on the third-party `regex` engine rather than `re`: `re` holds the GIL
while it backtracks, so one catastrophic pattern would freeze the training thread.
`regex` releases the GIL (concurrent=True) and takes a timeout, so a slow pattern
costs its request (INVALID_ARGUMENT), never the job. Its default syntax is `re`'s.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import regex

from lrctl.client.errors import InvalidArgumentError, NotFoundError

REGEX_PREFIX = "re:"
_GLOB_CHARS = frozenset("*?[")
# Time one regex selector may spend matching all names before it is refused.
REGEX_BUDGET_S = 1.0


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

    def select(self, names: Sequence[str]) -> list[int]:
        """Indices of the names this (non-exact) selector matches."""
        if self.glob is not None:
            match = self.glob.match
            return [i for i, name in enumerate(names) if match(name)]
        assert self.user_regex is not None
        search = self.user_regex.search
        deadline = time.monotonic() + REGEX_BUDGET_S
        out = []
        try:
            for i, name in enumerate(names):
                if search(name, timeout=max(deadline - time.monotonic(), 1e-3), concurrent=True):
                    out.append(i)
        except TimeoutError:
            raise InvalidArgumentError(
                f"regex in selector {quote(self.text)} takes too long to match "
                f"{len(names)} names (over {REGEX_BUDGET_S:g} s); simplify it"
            ) from None
        return out


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

    Names never change after attach, so resolved selectors are cached.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names: tuple[str, ...] = tuple(names)
        self.position: dict[str, int] = {name: i for i, name in enumerate(self.names)}
        if len(self.position) != len(self.names):
            raise ValueError("parameter names must be unique")
        self._matches = lru_cache(maxsize=64)(self._match_uncached)

    def __len__(self) -> int:
        return len(self.names)

    def match(self, text: str) -> tuple[int, ...]:
        """Indices (model order) of the names a selector matches; may be empty."""
        return self._matches(text)

    def _match_uncached(self, text: str) -> tuple[int, ...]:
        selector = parse_selector(text)
        if selector.is_exact:
            i = self.position.get(text)
            return () if i is None else (i,)
        return tuple(selector.select(self.names))
