"""Replay inside the worker: attach(..., replay="FILE") applies a recorded run's
changes at the steps they were applied at, with no client.

Everything is checked before the first step (attach raises ValueError naming the name
and value): the file reads whole (lrctl.common.replay_file), no change is due before
this run's next step, every name the run changed exists here with the same starting
base (pin, schedule), and each change's selectors match exactly the names they
matched then. Then the changes go through the controller's own queue, as a client's
would (same validation, same step boundary, recorded in the history and the audit
log), fed a window at a time from the step hook so that a long run never fills the
queue: the queue holds at most `window` replayed changes, each at most
`max_steps_ahead` steps ahead. A replayed change is recorded with peer
"replay:FILE", the recorded user, and the reason "replay of change N: <reason>".

A replayed change that fails at its step, or whose per-name result differs from the
recording (it cannot, after the checks above, unless the job itself differs), is
logged at ERROR and listed in `Replayer.report` (LRControl.replay_report).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Callable

from lrctl.common.errors import LrctlError, ResourceExhaustedError
from lrctl.common.replay_file import (
    ReplayChange,
    mismatch_message,
    names_mismatch,
    read_replay,
    start_mismatches,
    start_states,
)
from lrctl.server.controller import Controller
from lrctl.server.requests import ChangeRequest, Mode, PendingChange, ScheduleUpdate, Target, Update

log = logging.getLogger("lrctl.replay")

ENV = "LRCTL_REPLAY"
DEFAULT_WINDOW = 32


def replay_request(change: ReplayChange, peer: str) -> ChangeRequest:
    """The recorded change's request as sent, due at its recorded step."""
    return ChangeRequest(
        updates=tuple(Update(u.selector, u.value, Mode(u.mode), Target(u.target)) for u in change.updates),
        schedules=tuple(ScheduleUpdate(selector, spec) for selector, spec in change.schedules),
        at_step=change.step, reason=change.replay_reason, peer=peer, user=change.user,
    )


class Replayer:
    """Feeds a recorded run's changes to `controller` (see the module docstring).

    Raises ValueError, before anything is queued, if the file cannot be replayed on
    this run. Call `feed()` before every step (attach puts it in the step hook).
    """

    def __init__(self, controller: Controller, path: str, *, window: int = DEFAULT_WINDOW) -> None:
        if window < 1:
            raise ValueError(f"replay window must be at least 1, got {window}")
        try:
            changes = read_replay(path)
        except LrctlError as exc:
            raise ValueError(str(exc)) from None
        self.path = path
        self._controller = controller
        self._peer = f"replay:{path}"
        self._window = window
        self._check(changes)
        self._todo: deque[ReplayChange] = deque(changes)
        self._queued: deque[int] = deque()  # steps of the changes queued, in order
        self.total = len(changes)
        self.report: list[str] = []
        self.feed()

    def _check(self, changes: list[ReplayChange]) -> None:
        controller = self._controller
        if changes and changes[0].step < controller.step:
            first = changes[0]
            raise ValueError(
                f"cannot replay {self.path!r}: change {first.change_id} was applied at step "
                f"{first.step}, and this run's next step is already {controller.step}")
        rows, _, _, _ = controller.schedules([])
        current = {r.name: (r.base, r.pin, "" if r.schedule_id == 0 else r.schedule.describe())
                   for r in rows}
        mismatches = start_mismatches(start_states(changes), current)
        if mismatches:
            raise ValueError(mismatch_message(self.path, mismatches))
        for change in changes:
            try:
                names = controller.matched_names(replay_request(change, self._peer))
            except LrctlError as exc:
                raise ValueError(f"cannot replay {self.path!r}: change {change.change_id} "
                                 f"(step {change.step}): {exc}") from None
            wrong = names_mismatch(change, names)
            if wrong is not None:
                raise ValueError(f"cannot replay {self.path!r}: {wrong}")

    @property
    def remaining(self) -> int:
        """Changes not yet handed to the controller."""
        return len(self._todo)

    def feed(self) -> None:
        """Queue the next changes (called right before each step, on the training thread)."""
        todo = self._todo
        if not todo:
            return
        controller = self._controller
        step = controller.step
        queued = self._queued
        while queued and queued[0] < step:  # applied (or failed) at an earlier boundary
            queued.popleft()
        ahead = controller.queue_limits.max_steps_ahead
        while todo and len(queued) < self._window and todo[0].step - step <= ahead:
            change = todo[0]
            if change.step < step:
                # Only when the queue stayed full of others' changes until its step went by.
                self._failed(change, f"its step {change.step} went by before it could be "
                                     f"queued (the queue was full)")
                todo.popleft()
                continue
            try:
                pending, _ = controller.submit(replay_request(change, self._peer))
            except ResourceExhaustedError:
                break  # others' changes fill the queue: try again before the next step
            except LrctlError as exc:
                self._failed(change, str(exc))
                todo.popleft()
                continue
            todo.popleft()
            queued.append(change.step)
            pending.add_done_callback(self._on_done(change))

    def _failed(self, change: ReplayChange, why: str) -> None:
        text = f"replayed change {change.change_id} (step {change.step}) was not applied: {why}"
        self.report.append(text)
        log.error("lrctl: %s", text)

    def _on_done(self, change: ReplayChange) -> Callable[[PendingChange], None]:
        def done(pending: PendingChange) -> None:
            outcome = pending.outcome
            if pending.error is not None or outcome is None:
                self._failed(change, str(pending.error))
                return
            if outcome.step != change.step:
                self._differs(change, f"applied at step {outcome.step}, recorded at {change.step}")
                return
            for got, want in zip(outcome.changes, change.changes):
                if got.name != want.name or not _same(got.new_lr, want.new_lr) or not _same(
                        got.new_base, want.new_base):
                    self._differs(change, f"{want.name!r} got rate {got.new_lr!r} (base "
                                          f"{got.new_base!r}), recorded {want.new_lr!r} (base "
                                          f"{want.new_base!r})")
                    return
        return done

    def _differs(self, change: ReplayChange, why: str) -> None:
        text = f"replayed change {change.change_id} (step {change.step}) differs from the recording: {why}"
        self.report.append(text)
        log.error("lrctl: %s", text)


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))
