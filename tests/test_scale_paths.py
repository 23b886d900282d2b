"""The fast paths added for 100,000-parameter models (bench/bench_scale.py) give the
same answers as the plain per-name code they replace, and a change refused at submit
is never queued (it used to stay pending and could apply later)."""

from __future__ import annotations

import fnmatch
import random
import re
from array import array

import pytest
import regex
import torch

from lrctl.client.errors import InvalidArgumentError
from lrctl.server.controller import Controller
from lrctl.server.history import RateChanges
from lrctl.server.planner import plan_change
from lrctl.server.rates import RateState, ScheduleBook
from lrctl.server.requests import ChangeRequest, Mode, RateChange, Update
from lrctl.server.selectors import NameIndex, _matches_everything, _regex_literal


def _names(seed: int = 0, n: int = 1500) -> list[str]:
    rnd = random.Random(seed)
    parts = ["a", "ab", "enc", "encoder", "layers", "0", "1", "10", "weight", "bias", "x.y",
             "\u00e9", "_", "-", "a*b", "[", "]", "\U0010ffff", "\n", ""]
    names = sorted({".".join(rnd.choice(parts) for _ in range(rnd.randint(1, 4))) for _ in range(n)})
    rnd.shuffle(names)
    return names


def _plain(names: list[str], text: str) -> tuple[int, ...]:
    """The per-name resolution the fast paths replace."""
    if text.startswith("re:"):
        pattern = regex.compile(text[3:])
        return tuple(i for i, name in enumerate(names) if pattern.search(name))
    if set("*?[") & set(text):
        glob = re.compile(fnmatch.translate(text))
        return tuple(i for i, name in enumerate(names) if glob.match(name))
    return (names.index(text),) if text in names else ()


def _selectors(names: list[str], seed: int = 1) -> list[str]:
    rnd = random.Random(seed)
    out = []
    for _ in range(600):
        base = rnd.choice(names)[: rnd.randint(0, 10)]
        out.append(base + rnd.choice(["*", "?*", "[ab]*", "*.weight", "?", "[!a]*", "*["]))
    tokens = ["^", "a", "b", "\\.", ".", "*", "+", "?", "{1,2}", "[0-9]", "|", "(?i)", "e", "n",
              "\\d", "(", ")", "$", "\\-", "\\\u00e9", "x*", ".*", "(a|)", "[^a]*", "\\b", "\\w*"]
    for _ in range(1200):
        text = rnd.choice(["^", ""]) + rnd.choice(names)[: rnd.randint(0, 8)].replace(".", "\\.")
        text += "".join(rnd.choice(tokens) for _ in range(rnd.randint(0, 3)))
        try:
            regex.compile(text)
        except Exception:
            continue
        if text:
            out.append("re:" + text)
    return out


def test_fast_selector_paths_match_the_plain_scan() -> None:
    names = _names()
    index = NameIndex(names)
    for text in _selectors(names):
        assert tuple(index.match(text)) == _plain(names, text), text


def test_the_shortcuts_are_exercised() -> None:
    names = _names()
    regexes = [t[3:] for t in _selectors(names) if t.startswith("re:")]
    assert sum(_regex_literal(r)[2] for r in regexes) > 50  # whole literals
    assert sum(bool(_regex_literal(r)[0]) and _regex_literal(r)[1] for r in regexes) > 50
    assert sum(_matches_everything(regex.compile(r), r) for r in regexes) > 5


@pytest.mark.parametrize(
    "source, expected",
    [
        ("^blocks\\.", ("blocks.", True, True)),
        ("attn", ("attn", False, True)),
        ("^ab?c", ("a", True, False)),
        ("^a|b", ("", False, False)),
        ("^(?i)ab", ("", False, False)),
        ("^a\\db", ("a", True, False)),
        ("ab$", ("ab", False, False)),
    ],
)
def test_regex_literal(source: str, expected: tuple[str, bool, bool]) -> None:
    assert _regex_literal(source) == expected


@pytest.mark.parametrize("source", [".*", "x*", "(a|)", "[b]*?", "\\w*\\d*"])
def test_patterns_that_match_everything(source: str) -> None:
    pattern = regex.compile(source)
    assert _matches_everything(pattern, source)
    assert all(pattern.search(n) for n in _names(2, 200))


@pytest.mark.parametrize("source", ["^.*", ".*$", "\\b.*", "(?=a).*", "a*b", "(a)\\1*", "(*FAIL)"])
def test_patterns_with_assertions_are_not_assumed_to_match_everything(source: str) -> None:
    assert not _matches_everything(regex.compile(source), source)


def test_rate_changes_behave_like_the_tuple() -> None:
    names = ("a", "b", "c")
    state, book = RateState([0.1, 0.5, 0.2], array("q", [0, 0, 0]), {}), ScheduleBook()
    plan = plan_change(
        # "a": set the base to 0.3; "c": pin it at 0.4 (its base stays 0.2).
        {0: ((Mode.ABSOLUTE, 0.3), None, None), 2: (None, (Mode.ABSOLUTE, 0.4), None)},
        state, book, 0, names, lambda indices, rates: None, str,
    )
    changes = RateChanges(names, plan, book.describe)
    expected = (
        RateChange("a", 0.1, 0.3, 0.1, 0.3, None, None),
        RateChange("c", 0.2, 0.4, 0.2, 0.2, None, 0.4),
    )
    assert changes == expected and tuple(changes) == expected and len(changes) == 2
    assert changes[1] == expected[1] and changes[-1] == expected[-1]
    assert changes[:1] == expected[:1] and changes[5:] == ()
    assert hash(changes) == hash(expected) and repr(changes) == repr(expected)


def test_a_change_refused_at_submit_is_not_queued() -> None:
    """It used to stay pending: with at_step it was applied later, once the rate had
    dropped, although its client had been told INVALID_ARGUMENT."""
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))
    p.grad = torch.zeros_like(p)
    optimizer = torch.optim.SGD([p], lr=40000.0)
    controller = Controller([("p", p)], optimizer)
    with pytest.raises(InvalidArgumentError, match="would become 80000.0"):
        controller.submit(ChangeRequest((Update("p", 2.0, Mode.SCALE),), at_step=3))
    assert controller.pending_count == 0
    controller.submit(ChangeRequest((Update("p", 1.0),)))
    for _ in range(5):
        optimizer.step()
    assert controller.learning_rates() == {"p": 1.0}
    records = controller.history(0, 10)[0]
    assert [r.plan.new_lr.tolist() for r in records] == [[1.0]]
    assert [c.new_lr for r in records for c in controller.rate_changes(r, 10)] == [1.0]
