"""Stopping a call's work once its caller has gone (cancelled, or past its deadline).

A handler gives the controller `CallCheck.check`; the controller calls it between
selectors and the selector code every ~1024 names (lrctl.server.selectors), so a
request abandoned by its client stops costing the worker CPU within milliseconds
instead of running to its end. grpc-free and torch-free, like the controller.
"""

from __future__ import annotations

import threading
import time

from lrctl.common.errors import DeadlineExceededError, LrctlError


class CallerGoneError(LrctlError):
    """The client cancelled the call; nobody reads the answer any more."""

    code = "CANCELLED"


class CallCheck:
    """Whether a call's caller still wants the answer; `check()` raises once it does not.

    Set from the event loop (`cancel`, when the call is cancelled) and read from the
    worker thread doing the call's work; `deadline` is a time.monotonic() instant.
    """

    __slots__ = ("deadline", "_error", "_lock", "fired")

    def __init__(self, deadline: float | None = None) -> None:
        self.deadline = deadline
        self._error: LrctlError | None = None
        self._lock = threading.Lock()
        self.fired = False  # check() raised at least once: the work was cut short

    def cancel(self, error: LrctlError | None = None) -> None:
        """Mark the caller gone (the first reason given wins)."""
        with self._lock:
            if self._error is None:
                self._error = error or CallerGoneError("the client cancelled the call; its work was stopped")

    @property
    def stopped(self) -> bool:
        """True once the caller is gone or its deadline has passed."""
        if self._error is None and self.deadline is not None and time.monotonic() > self.deadline:
            self.cancel(DeadlineExceededError("the call's deadline passed; its work was stopped"))
        return self._error is not None

    def check(self) -> None:
        """Raise the reason the caller is gone, if it is; else return at once."""
        if self.stopped:
            self.fired = True
            error = self._error
            assert error is not None
            raise type(error)(str(error))
