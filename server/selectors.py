"""Selectors: how a request names parameters.

Three forms, told apart by their text:
  exact name   ``layer1.weight``
  glob         ``encoder.layers.3.*``  (fnmatch syntax: ``*``, ``?``, ``[...]``)
  regex        ``re:^encoder\\.layers\\.[0-9]+\\.``  (``re.search`` on the name)
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from lrctl.client.errors import InvalidArgumentError, NotFoundError

REGEX_PREFIX = "re:"
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Selector:
    """A parsed selector; `pattern` is None for an exact name."""

    text: str
    pattern: re.Pattern[str] | None

    @property
    def is_exact(self) -> bool:
        return self.pattern is None

    def matches(self, name: str) -> bool:
        if self.pattern is None:
            return name == self.text
        return self.pattern.search(name) is not None


@lru_cache(maxsize=256)
def parse_selector(text: str) -> Selector:
    """Parse one selector; raises InvalidArgumentError for an empty one or a bad regex."""
    if not text:
        raise InvalidArgumentError("empty selector: give a name, a glob or 're:REGEX'")
    if text.startswith(REGEX_PREFIX):
        source = text[len(REGEX_PREFIX):]
        if not source:
            raise InvalidArgumentError(f"empty regex in selector {text!r}")
        try:
            return Selector(text, re.compile(source))
        except re.error as exc:
            raise InvalidArgumentError(f"malformed regex in selector {text!r}: {exc}") from None
    if _GLOB_CHARS.intersection(text):
        return Selector(text, re.compile(fnmatch.translate(text)))
    return Selector(text, None)


def closest_names(name: str, names: Sequence[str], n: int = 3) -> list[str]:
    """Up to n names that look like `name`, best first (for 'did you mean')."""
    return difflib.get_close_matches(name, names, n=n, cutoff=0.6)


def not_found(selector: Selector, names: Sequence[str], what: str = "parameter") -> NotFoundError:
    """The NotFoundError for a selector that matched nothing, with suggestions."""
    if selector.is_exact:
        message = f"no {what} named {selector.text!r}"
        suggestions = closest_names(selector.text, names)
        if suggestions:
            message += "; did you mean " + ", ".join(repr(s) for s in suggestions) + "?"
        return NotFoundError(message)
    return NotFoundError(f"selector {selector.text!r} matches no {what}")


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
        if selector.pattern is None:
            i = self.position.get(text)
            return () if i is None else (i,)
        search = selector.pattern.search
        return tuple(i for i, name in enumerate(self.names) if search(name))
