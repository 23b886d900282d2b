"""Replay inside the worker: attach(..., replay="FILE") applies a recorded run's
changes at the steps they were applied at, with no client.

Everything is checked before the first step (attach raises ValueError naming the name
and value): the file reads whole (lrctl.common.replay_file), every name the run
changed exists here with the same base (pin, schedule) as the recorded run had at this
run's next step (at step 0: its start), and each change's selectors match exactly the
names they matched then. Then the changes go through the controller's own queue, as a
client's would (same validation, same step boundary, recorded in the history and the
audit log), fed a window at a time from the step hook so that a long run never fills
the queue: the queue holds at most `window` replayed changes, each at most
`max_steps_ahead` steps ahead. A replayed change is recorded with peer
"replay:FILE", the recorded user, and the reason "replay of change N: <reason>".

A job resumed from a checkpoint (of the recorded run, or of its replay) replays from
its step: the changes before it are in its state (checked name by name), the ones its
checkpoint brought back queued are taken as queued (a replay's by their reason, the
recorded run's own by their ids), the rest are fed. A checkpoint
loaded after attach does the same from the loaded step (lrctl.server.resume calls
before_load/after_load): the changes queued before it are withdrawn by the load, and
a state that differs from the recording there stops the replay (in `report`).

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
    replayed_change_id,
    start_mismatches,
    start_states,
)
from lrctl.server.controller import Controller
from lrctl.server.requests import ChangeRequest, Mode, PendingChange, ScheduleUpdate, Target, Update

log = logging.getLogger("lrctl.replay")

ENV = "LRCTL_REPLAY"
DEFAULT_WINDOW = 32
_PEER_PREFIX = "replay:"  # a replayed change's peer: "replay:FILE"


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
    this run. Call `feed()` before every step (attach puts it in the step hook), and
    `before_load()` / `after_load()` around a checkpoint load (lrctl.server.resume).
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
        self._peer = f"{_PEER_PREFIX}{path}"
        self._window = window
        self._changes = changes
        self._todo: deque[ReplayChange] = deque()
        self._queued: deque[int] = deque()  # steps of the changes queued, in order
        # Bumped by a checkpoint load: what a change queued before it says is not news.
        self._generation = 0
        self.total = len(changes)
        self.report: list[str] = []
        self._start(self._check(controller.step))
        self.feed()

    def _check(self, step: int) -> list[ReplayChange]:
        """The changes still to replay from `step` on; ValueError if this run's state
        there is not the recorded run's (nothing queued)."""
        controller, changes = self._controller, self._changes
        rows, _, _, _ = controller.schedules([])
        current = {r.name: (r.base, r.pin, "" if r.schedule_id == 0 else r.schedule.describe())
                   for r in rows}
        mismatches = start_mismatches(start_states(changes, step), current)
        if mismatches:
            message = mismatch_message(self.path, mismatches)
            if changes and changes[0].step < step:
                message += (f" (this run is at step {step}: the changes before it must be in its "
                            "state, as in a job resumed from a checkpoint of the recorded run or "
                            "of its replay)")
            raise ValueError(message)
        later = [c for c in changes if c.step >= step]
        for change in later:
            try:
                names = controller.matched_names(replay_request(change, self._peer))
            except LrctlError as exc:
                raise ValueError(f"cannot replay {self.path!r}: change {change.change_id} "
                                 f"(step {change.step}): {exc}") from None
            wrong = names_mismatch(change, names)
            if wrong is not None:
                raise ValueError(f"cannot replay {self.path!r}: {wrong}")
        return later

    def _start(self, later: list[ReplayChange]) -> None:
        """Replay `later` from here: the ones a checkpoint brought back queued are taken as
        queued, the rest fed from the file. Those are a replay's own (by their reason) or,
        in a checkpoint of the recorded run itself (its lineage), the recorded changes
        themselves (by their ids), each for its recorded step."""
        recorded = {c.change_id: c for c in later}
        own_run = bool(later) and later[0].run_id in self._controller.lineage
        taken: dict[int, ReplayChange] = {}
        for pending in self._controller.queued():
            request = pending.request
            if request.peer.startswith(_PEER_PREFIX):
                cid = replayed_change_id(request.reason)
                change = None if cid is None else recorded.get(cid)
            else:
                change = recorded.get(pending.change_id) if own_run else None
            if change is not None and change.step == request.at_step and change.change_id not in taken:
                taken[change.change_id] = change
                pending.add_done_callback(self._on_done(change))
        self._queued = deque(sorted(c.step for c in taken.values()))
        self._todo = deque(c for c in later if c.change_id not in taken)

    def before_load(self) -> None:
        """A checkpoint is about to replace the controller's state: the changes queued
        so far are withdrawn by it (lrctl.server.controller_state), not failures."""
        self._generation += 1

    def after_load(self) -> None:
        """Go on from the loaded step. A state that is not the recorded run's there stops
        the replay (logged at ERROR, in `report`): nothing more of it is queued."""
        try:
            later = self._check(self._controller.step)
        except ValueError as exc:
            self._todo.clear()
            self._queued.clear()
            self.report.append(f"replay stopped after a checkpoint load: {exc}")
            log.error("lrctl: replay stopped after a checkpoint load: %s", exc)
            return
        self._start(later)

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
        generation = self._generation

        def done(pending: PendingChange) -> None:
            if generation != self._generation:
                return  # withdrawn by a checkpoint load: replayed from the loaded step on
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
