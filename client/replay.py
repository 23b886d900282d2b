"""`lrctl replay FILE`: send a recorded run's changes to a running worker, each for
the step it was applied at.

Checked before anything is sent (lrctl.common.replay_file): the file reads whole,
the worker is not past the first change's step, and every name the recorded run
changed is held by the worker with the same starting base (pin, schedule). Then each
applied change goes out as it was sent (its updates and schedule assignments), with
at_step = its recorded step, no-wait, and the reason "replay of change N: <reason>";
at most `window` of them wait in the worker's queue at once (its per-connection share
is 100), the next one sent as the worker's step passes the earlier ones. Each answer
is checked against the recording (the number of names it touches, and their names).
While the window is full the replay holds the worker with lockstep (every step waits
for it, at most HOLD_S), so a free-running worker cannot outrun it; while another
lockstep controller is attached it follows the worker's step by polling instead. A
mismatch, or the worker outrunning that polling, stops it: the replayed changes still
queued are cancelled (none of them applies later), and the error says how many were
applied. With `wait`, it returns once the last change's step has passed and the
history shows every replayed change applied.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

from lrctl.client.client import LRClient
from lrctl.client.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    LrctlError,
    ResourceExhaustedError,
)
from lrctl.client.lockstep import LockstepSession
from lrctl.client.types import ScheduleAssignment, SetResult, Update
from lrctl.common.replay_file import (
    ReplayChange,
    mismatch_message,
    names_mismatch,
    read_replay,
    start_mismatches,
    start_states,
)

DEFAULT_WINDOW = 32
# How often the worker's step is read while the window is full (a status call), when
# this client cannot hold the worker.
POLL_S = 0.05
# The longest the worker waits at a held step for the replay (a replay that dies
# releases it at once: its lockstep stream ends).
HOLD_S = 5.0


@dataclass(frozen=True)
class ReplayResult:
    """What a replay sent (and, when it waited, saw applied)."""

    path: str
    run_id: str  # of the recorded run
    sent: int
    change_ids: list[int]  # in the worker, in the order sent
    first_step: Optional[int]
    last_step: Optional[int]
    applied: bool  # True once the history shows every one applied (wait=True)


def load(path: str) -> list[ReplayChange]:
    """The file's applied changes; InvalidArgumentError naming a bad line."""
    return read_replay(path)


def replay(client: LRClient, path: str, *, window: int = DEFAULT_WINDOW, wait: bool = True,
           max_reported_changes: int = 0,
           sleep: Callable[[float], None] = time.sleep) -> ReplayResult:
    """Replay `path` on the worker behind `client` (see the module docstring).

    Raises FailedPreconditionError for a worker this run cannot be replayed on (a name
    it lacks, another starting rate, a step already past, a selector matching other
    names), InvalidArgumentError for a bad file, and what the worker answers.
    """
    if window < 1:
        raise InvalidArgumentError(f"replay window must be at least 1, got {window}")
    changes = load(path)
    run_id = changes[0].run_id if changes else ""
    if not changes:
        return ReplayResult(path, run_id, 0, [], None, None, True)
    status = client.status()
    first = changes[0]
    if first.step < status.step:
        raise FailedPreconditionError(
            f"cannot replay {path!r}: change {first.change_id} was applied at step {first.step} "
            f"and the worker is already at step {status.step}; replay in the job instead "
            "(attach(replay=FILE) or LRCTL_REPLAY=FILE), from its start or from a checkpoint's step")
    current = {r.name: (r.base, r.pin, r.description) for r in client.get_schedules()}
    mismatches = start_mismatches(start_states(changes), current)
    if mismatches:
        raise FailedPreconditionError(mismatch_message(path, mismatches))
    start_version = status.version
    sent: list[tuple[int, int]] = []  # (worker change id, step)
    queued: deque[tuple[int, int]] = deque()
    step = status.step
    follow = _Steps(client, sleep)
    try:
        for change in changes:
            while True:
                while queued and queued[0][1] < step:
                    queued.popleft()  # its step has passed: applied (or failed)
                if len(queued) < window:
                    if change.step < step:
                        raise FailedPreconditionError(
                            f"the worker reached step {step} before change {change.change_id} (step "
                            f"{change.step}) could be sent; replay stopped")
                    try:
                        result = _send(client, change, max_reported_changes)
                    except ResourceExhaustedError:
                        pass  # the worker's queue is full: wait for steps to pass
                    except LrctlError as exc:
                        exc.args = (f"change {change.change_id} (step {change.step}): {exc}; "
                                    "replay stopped",)
                        raise
                    else:
                        break
                step = follow.next_step()
            sent.append((result.change_id, change.step))
            queued.append((result.change_id, change.step))
            wrong = _check_answer(change, result.num_changes, [c.name for c in result.changes])
            if wrong is not None:
                raise FailedPreconditionError(f"cannot replay {path!r}: {wrong}; replay stopped")
    except LrctlError as exc:
        _stop(client, sent, exc)
        raise
    except BaseException:  # Ctrl-C: leave nothing queued that was meant as part of a whole
        _cancel_quietly(client, [cid for cid, _ in sent])
        raise
    finally:  # after a stop's cancels: the worker stays held while they are made
        follow.release()
    ids = [cid for cid, _ in sent]
    applied = False
    if wait:
        last = changes[-1].step
        while client.status().step <= last:
            sleep(POLL_S)
        _check_applied(client, start_version, ids)
        applied = True
    return ReplayResult(path, run_id, len(sent), ids, first.step, changes[-1].step, applied)


class _Steps:
    """The worker's next step while the replay's window is full: from lockstep turns
    (the worker holds at each step until the replay has sent what it can) when this
    client may hold it, else from status polls."""

    def __init__(self, client: LRClient, sleep: Callable[[float], None]) -> None:
        self._client, self._sleep = client, sleep
        self._session: Optional[LockstepSession] = None
        self._turn = None
        self._tried = False

    def next_step(self) -> int:
        """Release the step held now (if any) and return the next one the worker is at."""
        if not self._tried:
            self._tried = True
            try:
                self._session = self._client.lockstep(every=1, timeout=HOLD_S)
            except LrctlError:  # another lockstep controller is attached: poll
                self._session = None
        self._release_turn()
        if self._session is not None:
            try:
                # At the hold of step S the changes due at S are applied already.
                self._turn = next(self._session)
                return self._turn.step
            except (StopIteration, LrctlError):  # the worker ended lockstep: poll
                self._session = None
        self._sleep(POLL_S)
        return self._client.status().step

    def release(self) -> None:
        """Let the worker run free again."""
        self._release_turn()
        if self._session is not None:
            self._session.close()
            self._session = None

    def _release_turn(self) -> None:
        """Decided: the step held now (if any) goes on."""
        if self._turn is not None:
            self._turn.decide()
            self._turn = None


def _send(client: LRClient, change: ReplayChange, max_reported_changes: int) -> SetResult:
    updates = [Update(u.selector, u.value, u.mode, u.target) for u in change.updates]  # type: ignore[arg-type]
    assignments = [ScheduleAssignment(selector, spec) for selector, spec in change.schedules]
    return client.set_learning_rates(
        updates, schedules=assignments, at_step=change.step, wait=False,
        reason=change.replay_reason, max_reported_changes=max_reported_changes)


def _check_answer(change: ReplayChange, num_changes: int, names: list[str]) -> Optional[str]:
    """The worker's expected outcome must touch the recorded names."""
    if num_changes != change.num_changes:
        return (f"change {change.change_id} (step {change.step}) touched {change.num_changes} "
                f"name(s) in the recorded run, {num_changes} on this worker")
    recorded = [c.name for c in change.changes[:len(names)]]
    if names != recorded:
        # The reply lists only the first names: compare what it lists.
        return names_mismatch(change, names + [c.name for c in change.changes[len(names):]])
    return None


def _stop(client: LRClient, sent: list[tuple[int, int]], error: LrctlError) -> None:
    """Cancel the replayed changes still queued; add to `error` what was applied."""
    cancelled = _cancel_quietly(client, [cid for cid, _ in sent])
    applied = len(sent) - len(cancelled)
    if sent:
        error.args = (f"{error} ({applied} replayed change(s) were applied or sent to apply, "
                      f"{len(cancelled)} queued one(s) cancelled)",)


def _cancel_quietly(client: LRClient, ids: list[int]) -> list[int]:
    if not ids:
        return []
    try:
        return client.cancel_changes(ids, reason="replay stopped").cancelled
    except LrctlError:
        return []


def _check_applied(client: LRClient, start_version: int, ids: list[int]) -> None:
    """The history must show each replayed change applied (not failed at its step)."""
    wanted = set(ids)
    seen: dict[int, object] = {}
    for record in client.iter_changes(after_version=start_version, max_changes_per_record=1):
        if record.change_id in wanted:
            seen[record.change_id] = record
    for cid in ids:
        record = seen.get(cid)
        if record is None:
            raise FailedPreconditionError(
                f"replayed change {cid} is not in the worker's history (dropped from it?)")
        if record.failed:  # type: ignore[attr-defined]
            raise FailedPreconditionError(
                f"replayed change {cid} failed at step {record.step}: {record.error}")  # type: ignore[attr-defined]
