"""The CLI's argument parser: errors are one line, raised as UsageError (exit 2).

Its own module so that `lrctl demo` (lrctl.server.demo) parses its options the same way,
and so that there is one UsageError class even when cli.py runs as __main__.
"""

from __future__ import annotations

import argparse
from typing import Any, NoReturn


class UsageError(Exception):
    """A command line the CLI cannot run; exit 2 with one line."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, raised instead of exiting."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No silent abbreviations: "--addr" must not keep meaning "--address" once an
        # option "--addr-file" exists.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block; the CLI promises one line per error.
        verb = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        raise UsageError(f"{verb}: {message}" if verb else message)
