"""Writing a controller: subscribe, decide every K steps, act, with conflicts surfaced.

A controller is a `decide(window) -> Action | None` callable (a function, or an object
with ``__call__``) run by `ControlLoop`:

- **subscribe**: one WatchMetrics stream (with per-parameter statistics when
  `stats=True`), opened at the worker's current step so no event falls between the
  start and the first decision; `start_file` is created once subscribed (bench's
  task_worker waits for it before step 0);
- **decide** every `every` steps on the events since the previous decision (a
  `Window`), or, with `lockstep_timeout`, on each lockstep turn: the worker holds at
  every `every`-th step until the decision is in or the timeout has passed, so a
  change lands exactly at the held step (a dead or slow controller costs at most one
  timeout per held step, never the job: the primitive guarantees it);
- **act**: the returned `Action` (bases, pins, scales, schedules) is sent as ONE change
  with ``expected_version`` = the config version the decision was based on. When
  another writer changed the configuration meanwhile, the change is refused whole and
  the controller is told: `on_conflict` ("retry", the default: re-read the version
  and call decide again with ``window.conflict`` set; "resend": send the same action
  again against the fresh version, for a decide that keeps state and must not be
  called twice for one window; "stop": end the loop, raising `ConflictError`; or a
  callable ``(window, error) -> bool``, True to decide again);
- **cadence**: a decision may set ``window.every`` to decide every N steps from then
  on (for example every step during a warmup, then every K); with lockstep the loop
  releases the next held step at once (it tells how that decision's change ended),
  then ends its lockstep and opens it again with the new cadence, so the worker runs
  free for at most the steps until the next N-th;
- events the stream lost because this process read too slowly are counted in
  ``window.dropped`` (and in the decision's log line);
- the worker going away (training ended, lrctl closed, the process died) ends `run()`
  cleanly with a `LoopSummary`; refused actions that are not conflicts (a reader
  token: PermissionDeniedError) are raised, nothing half-applied.

grpcio and protobuf only (no torch), like the rest of lrctl.client.
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn, Optional, Union

from lrctl.client.client import LRClient
from lrctl.client.lockstep import LockstepSession
from lrctl.client.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    LrctlError,
    UnavailableError,
)
from lrctl.client.types import MetricsEvent, ScheduleAssignment, Turn, Update
from lrctl.common.schedules import Schedule

__all__ = ["Action", "Window", "ControlLoop", "LoopSummary", "ConflictError", "Job", "read_job", "run_controller",
           "add_controller_arguments", "run_from_args", "exit_process", "BlowUpGuard"]

REOPEN_S = 5.0  # a cadence change: how long the worker may take to end our previous lockstep
READER_JOIN_S = 5.0  # the metrics reader, after its stream is cancelled
ConflictPolicy = Union[str, Callable[["Window", FailedPreconditionError], bool]]
_DONE = object()  # the metrics reader's end marker


class ConflictError(FailedPreconditionError):
    """The controller's change met another writer's (expected_version did not match)
    and its policy was to stop."""


@dataclass
class Action:
    """What a decision changes, sent as one batch (applied whole at one step or not at all).

    Build it with the helpers, which chain: ``Action("why").set_bases({...}).pin({...})``.
    """

    reason: str = ""
    updates: list[Update] = field(default_factory=list)
    schedules: list[ScheduleAssignment] = field(default_factory=list)

    def set_bases(self, bases: Mapping[str, float]) -> Action:
        """Set each selector's base rate (the rate in force is base x schedule factor)."""
        self.updates += [Update(s, float(v)) for s, v in bases.items()]
        return self

    def scale(self, selector: str, factor: float) -> Action:
        """Multiply the bases `selector` matches by `factor` (the schedule stays)."""
        self.updates.append(Update(selector, float(factor), "scale"))
        return self

    def pin(self, pins: Mapping[str, float]) -> Action:
        """Pin names at exact rates, whatever their schedule."""
        self.updates += [Update(s, float(v), "absolute", "pin") for s, v in pins.items()]
        return self

    def unpin(self, *selectors: str) -> Action:
        """Remove pins: those names follow base x schedule again."""
        self.updates += [Update(s, 0.0, "unpin", "pin") for s in selectors]
        return self

    def schedule(self, selector: str, schedule: Optional[Schedule]) -> Action:
        """Give `selector` a schedule (None: constant)."""
        self.schedules.append(ScheduleAssignment(selector, schedule))
        return self

    def __bool__(self) -> bool:
        return bool(self.updates or self.schedules)


@dataclass
class Window:
    """What a decision sees: the events since the previous decision.

    `step`: where an action lands (lockstep: the held step, exactly; otherwise the next
    step boundary after the newest event, approximately). `version`: the config version
    the action is checked against (expected_version). `dropped`: events lost since the
    previous decision. `conflict`: set when deciding again after a conflict (the
    worker's message). `turn`: the lockstep turn, if any. `every`: the loop's cadence;
    a decision that sets it changes how often the loop decides from now on.
    """

    step: int
    version: int
    events: list[MetricsEvent]
    dropped: int = 0
    conflict: Optional[str] = None
    turn: Optional[Turn] = None
    client: Optional[LRClient] = field(default=None, repr=False)
    every: int = 0

    def values(self, metric: str) -> list[float]:
        """The reported `metric` of each event that has it, oldest first."""
        return [e.metrics[metric] for e in self.events if metric in e.metrics]

    def mean(self, metric: str) -> float:
        """The mean of `metric` over the window (NaN if absent; NaN/inf propagate)."""
        vals = self.values(metric)
        return sum(vals) / len(vals) if vals else math.nan

    def stats(self) -> list[tuple[int, dict[str, dict[str, float]]]]:
        """(step, name -> statistic -> value) of each event carrying statistics."""
        return [(e.step, e.stats) for e in self.events if e.stats]

    def latest_stats(self) -> dict[str, dict[str, float]]:
        """The newest statistics in the window ({} if none)."""
        found = self.stats()
        return found[-1][1] if found else {}


class BlowUpGuard:
    """Spots a blow-up in a window's mean loss: not finite, or more than `jump` x the
    first loss above the best window so far (an absolute margin: late losses are small
    and noisy). After one, recovery is judged from the blow-up's own loss, so the
    windows of the way back down do not count as more blow-ups."""

    def __init__(self, jump: float = 0.25, metric: str = "loss") -> None:
        self.jump, self.metric = jump, metric
        self.first_loss = math.nan  # set by the controller if it saw the loss earlier
        self.best_window = math.inf

    def check(self, window: Window) -> Optional[str]:
        """A one-line reason when `window` is a blow-up, else None (no loss: None)."""
        losses = window.values(self.metric)
        if not losses:
            return None
        if self.first_loss != self.first_loss:
            self.first_loss = losses[0]
        loss = sum(losses) / len(losses)
        if not math.isfinite(loss) or loss > self.best_window + self.jump * abs(self.first_loss):
            why = f"{self.metric} {loss:.4g} vs best {self.best_window:.4g}: blow-up"
            if math.isfinite(loss):
                self.best_window = loss
            return why
        self.best_window = min(self.best_window, loss)
        return None


@dataclass
class LoopSummary:
    """How a run ended: decisions made, actions applied, conflicts met, events dropped."""

    decisions: int = 0
    actions: int = 0
    conflicts: int = 0
    late: int = 0
    dropped: int = 0
    last_step: int = -1
    ended: str = ""


def _is_conflict(exc: LrctlError) -> bool:
    return isinstance(exc, FailedPreconditionError) and "expected_version" in str(exc)


def _is_gone(exc: LrctlError) -> bool:
    """The worker went away or is shutting down (a call in flight when its server
    stopped comes back CANCELLED): the loop ends, it is not an error."""
    return isinstance(exc, UnavailableError) or getattr(exc, "code", None) == "CANCELLED" or (
        isinstance(exc, FailedPreconditionError) and "shutting down" in str(exc))


class ControlLoop:
    """Runs `decide` against the worker `client` talks to (see the module docstring).

    `every`: decide every K steps (and, with `lockstep_timeout`, hold every K-th step
    for at most that many seconds). `stats`: subscribe with per-parameter statistics
    (the worker computes them only if attached with ``stats_every``). `log`: called with
    one line per decision (default: stderr). `name` prefixes each change's reason.
    """

    def __init__(self, client: LRClient, decide: Callable[[Window], Optional[Action]], *,
                 every: int = 10, stats: bool = False, lockstep_timeout: Optional[float] = None,
                 start_file: Optional[str] = None, on_conflict: ConflictPolicy = "retry",
                 max_retries: int = 3, name: str = "controller",
                 log: Optional[Callable[[str], None]] = None) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InvalidArgumentError(f"every {every!r} must be a whole number >= 1")
        if lockstep_timeout is not None and not (0 < lockstep_timeout <= 60):
            raise InvalidArgumentError(f"lockstep_timeout {lockstep_timeout!r} must be in (0, 60] seconds")
        if not (on_conflict in ("retry", "resend", "stop") or callable(on_conflict)):
            raise InvalidArgumentError(f"on_conflict {on_conflict!r}: 'retry', 'resend', 'stop' or a callable")
        self.client, self.decide = client, decide
        self.every, self.stats, self.lockstep_timeout = every, stats, lockstep_timeout
        self.start_file, self.on_conflict, self.max_retries = start_file, on_conflict, max_retries
        self.name = name
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.summary = LoopSummary()
        self._version = 0
        self._mine: set[int] = set()  # ids of this loop's changes still to be confirmed (lockstep)
        # Lockstep: the stream's events not yet in a window, the newest step seen, its end.
        self._events: list[MetricsEvent] = []
        self._newest, self._stream_done = -1, False
        self._carried_conflict: Optional[str] = None  # across a cadence change
        self._reader: Optional[threading.Thread] = None  # lockstep: the metrics stream's reader

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> LoopSummary:
        """Run until the worker goes away; returns the summary. Raises ConflictError
        (policy "stop") and errors that are not the worker ending (e.g. PermissionDeniedError)."""
        try:
            start = self.client.status()
        except UnavailableError as exc:
            self.summary.ended = f"worker unreachable: {exc}"
            return self.summary
        self._version = start.version
        stream = self.client.watch_metrics(from_step=start.step, stats=self.stats)
        try:
            if self.lockstep_timeout is None:
                self._touch_start_file()
                self._run_polling(stream)
            else:
                self._run_lockstep(stream)
        finally:
            stream.close()
            # The cancel ends the reader: wait for it, so that no thread of ours is left
            # inside grpc when the caller closes the channel or the process exits (at
            # exit Python stops daemon threads wherever they are, a call's lock held).
            if self._reader is not None:
                self._reader.join(READER_JOIN_S)
        return self.summary

    def _touch_start_file(self) -> None:
        if self.start_file:
            with open(self.start_file, "a", encoding="utf-8"):
                pass

    def _run_polling(self, stream: Iterable[MetricsEvent]) -> None:
        events: list[MetricsEvent] = []
        dropped = 0
        next_at: Optional[int] = None
        try:
            for event in stream:
                events.append(event)
                dropped += event.dropped
                self._version = max(self._version, event.version)
                if next_at is None:
                    next_at = event.step - event.step % self.every + self.every - 1
                if event.step >= next_at:
                    window = Window(step=event.step + 1, version=self._version, events=events,
                                    dropped=dropped, client=self.client, every=self.every)
                    events, dropped = [], 0
                    go_on = self._decide_and_act(window, at_step=None)
                    self._set_every(window.every)
                    next_at = event.step + self.every
                    if not go_on:
                        return
        except LrctlError as exc:
            if not _is_gone(exc):
                raise
            self.summary.ended = f"worker gone: {exc}"
            return
        self.summary.ended = "worker ended the stream"

    def _run_lockstep(self, stream: Iterable[MetricsEvent]) -> None:
        inbox: queue.Queue[Any] = queue.Queue()

        def read() -> None:
            try:
                for event in stream:
                    inbox.put(event)
            except LrctlError:
                pass  # the worker went away: the turn stream says so too
            finally:
                inbox.put(_DONE)

        self._reader = threading.Thread(target=read, name="lrctl-controller-metrics", daemon=True)
        self._reader.start()
        self._events, self._newest, self._stream_done = [], -1, False
        try:
            outcome = self._lockstep_session(inbox, reopening=False)
            while outcome == "cadence":
                outcome = self._lockstep_session(inbox, reopening=True)
        except LrctlError as exc:
            if not _is_gone(exc):
                raise
            self.summary.ended = f"worker gone: {exc}"
            return
        if outcome == "ended":
            self.summary.ended = "worker ended lockstep"

    def _lockstep_session(self, inbox: queue.Queue[Any], reopening: bool) -> str:
        """Lockstep at the current cadence until a decision changes it ("cadence": open
        it again; what the stream brings meanwhile waits in `inbox`), a decision stops
        the loop ("stop") or the worker ends lockstep ("ended")."""
        switching = False
        with self._open_lockstep(reopening) as session:
            self._touch_start_file()
            for turn in session:
                conflict = self._turn_outcome(turn)
                if switching:
                    # This turn only tells how the decision that changed the cadence
                    # ended (the next session cannot): released at once, its outcome
                    # goes to the next decision.
                    turn.decide()
                    self._carried_conflict = conflict
                    return "cadence"
                conflict, self._carried_conflict = conflict or self._carried_conflict, None
                # The event of step S-1 is sealed at the boundary of S, after this
                # hold: wait (briefly) for S-2, so the window is the whole past.
                deadline = time.monotonic() + self.lockstep_timeout / 4
                while True:
                    wait = self._newest < turn.step - 2 and not self._stream_done
                    try:
                        item = inbox.get(timeout=max(0.0, deadline - time.monotonic()) if wait else 0.0)
                    except queue.Empty:
                        break
                    if item is _DONE:
                        self._stream_done = True
                        continue
                    self._events.append(item)
                    self._newest = item.step
                events, self._events = self._events, []
                dropped = sum(e.dropped for e in events) + turn.dropped_turns
                self._version = turn.version
                window = Window(step=turn.step, version=turn.version, events=events, dropped=dropped,
                                conflict=conflict, turn=turn, client=self.client, every=self.every)
                try:
                    go_on = self._decide_and_act(window, at_step=turn.step)
                finally:
                    turn.decide()
                if not go_on:
                    return "stop"
                if self._set_every(window.every):
                    if not self._mine:  # nothing of ours to confirm at the next turn
                        return "cadence"
                    switching = True
        return "ended"

    def _open_lockstep(self, reopening: bool) -> LockstepSession:
        """Open lockstep at the current cadence. Reopening, the worker may not have seen
        our previous session end yet (its stream's cancel is on the way): a refusal for
        "held by another controller" is tried again for up to REOPEN_S."""
        deadline = time.monotonic() + (REOPEN_S if reopening else 0.0)
        while True:
            try:
                return self.client.lockstep(every=self.every, timeout=self.lockstep_timeout)
            except FailedPreconditionError as exc:
                if "held by another controller" not in str(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(0.01)

    def _set_every(self, every: int) -> bool:
        """A decision's new cadence (Window.every); True if it changed."""
        if every == self.every:
            return False
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InvalidArgumentError(f"window.every {every!r} must be a whole number >= 1")
        self.log(f"{self.name}: deciding every {every} step(s) from now on (was {self.every})")
        self.every = every
        return True

    def _turn_outcome(self, turn: Turn) -> Optional[str]:
        """A change of ours that failed at the previous held step (another writer got
        there first at that very step): told to the next decision."""
        previous = turn.previous
        if previous is None:
            return None
        failed = self._mine.intersection(previous.failed_change_ids)
        self._mine.clear()
        if previous.timed_out:
            self.summary.late += 1
        if failed:
            self.summary.conflicts += 1
            return f"change(s) {sorted(failed)} failed at step {previous.step} (another writer changed the configuration)"
        return None

    # -- one decision -------------------------------------------------------------------
    def _decide_and_act(self, window: Window, at_step: Optional[int]) -> bool:
        """Decide, act, handle a conflict per the policy. False: stop the loop."""
        self.summary.dropped += window.dropped
        self.summary.last_step = window.step
        action: Optional[Action] = None
        for attempt in range(self.max_retries + 1):
            if action is None or self.on_conflict != "resend":
                self.summary.decisions += 1
                action = self.decide(window)
            lost = f" (lost {window.dropped} event(s))" if window.dropped else ""
            if not action:
                self.log(f"{self.name}: step {window.step} v{window.version}: no change{lost}")
                return True
            try:
                result = self.client.set_learning_rates(
                    action.updates, schedules=action.schedules, at_step=at_step,
                    wait=at_step is None, expected_version=window.version,
                    reason=f"{self.name}: {action.reason}"[:1000])
            except LrctlError as exc:
                if _is_gone(exc):
                    raise
                if isinstance(exc, DeadlineExceededError):  # withdrawn unless applied: read back
                    self.log(f"{self.name}: step {window.step}: no answer in time: {exc}")
                    return True
                if isinstance(exc, InvalidArgumentError) and "already past" in str(exc):
                    self.summary.late += 1  # the hold ended (timeout) before we acted
                    self.log(f"{self.name}: step {window.step}: too late, the hold had ended; not applied")
                    return True
                if not _is_conflict(exc):
                    raise
                self.summary.conflicts += 1
                self.log(f"{self.name}: step {window.step}: conflict: {exc}")
                if not self._retry(window, exc):  # type: ignore[arg-type]
                    return False
                window.version = self.client.status().version
                window.conflict = str(exc)
                continue
            self.summary.actions += 1
            if at_step is None:
                self._version = max(self._version, result.version)
            else:
                self._mine.add(result.change_id)
            self.log(f"{self.name}: step {window.step} v{window.version}: {action.reason}{lost}")
            return True
        self.log(f"{self.name}: step {window.step}: gave up after {self.max_retries} conflicts in a row")
        return True

    def _retry(self, window: Window, exc: FailedPreconditionError) -> bool:
        policy = self.on_conflict
        if policy in ("retry", "resend"):
            return True
        if policy == "stop":
            raise ConflictError(str(exc)) from None
        return bool(policy(window, exc))  # type: ignore[operator]


def run_controller(client: LRClient, decide: Callable[[Window], Optional[Action]], **options: Any) -> LoopSummary:
    """``ControlLoop(client, decide, **options).run()``."""
    return ControlLoop(client, decide, **options).run()


# -- the example controllers' common command line --------------------------------------

def add_controller_arguments(parser: argparse.ArgumentParser, every: int = 10) -> None:
    """--address, --token, --start-file, --every, --lockstep-timeout."""
    parser.add_argument("--address", default=None, help="the worker (default $LRCTL_ADDRESS or 127.0.0.1:50051)")
    parser.add_argument("--token", default=None,
                        help="bearer token (default $LRCTL_TOKEN; prefer the variable: arguments are visible to other users)")
    parser.add_argument("--start-file", default=None, help="create this file once subscribed (task_worker waits for it)")
    parser.add_argument("--every", type=int, default=every, help=f"decide every K steps (default {every})")
    parser.add_argument("--lockstep-timeout", type=float, default=None, metavar="S",
                        help="hold the worker at each decision step, at most S seconds (default: no lockstep)")


def run_from_args(prog: str, args: argparse.Namespace, decide: Callable[[Window], Optional[Action]],
                  setup: Optional[Callable[[LRClient], None]] = None, stats: bool = True,
                  on_conflict: ConflictPolicy = "retry") -> int:
    """Run an example controller from its parsed arguments: exit 0 when the worker ends,
    1 with one line on stderr for an error."""
    try:
        with LRClient(args.address, token=args.token) as client:
            client.wait_until_ready(30.0)
            if setup is not None:
                setup(client)
            summary = run_controller(client, decide, every=args.every, stats=stats,
                                     lockstep_timeout=args.lockstep_timeout, start_file=args.start_file,
                                     name=prog, on_conflict=on_conflict)
    except LrctlError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the start file
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    print(f"{prog}: done: {summary.decisions} decisions, {summary.actions} changes, "
          f"{summary.conflicts} conflicts, {summary.dropped} events lost ({summary.ended})",
          file=sys.stderr, flush=True)
    return 0


def exit_process(code: int) -> NoReturn:
    """End a controller's process with `code` once its output is flushed, without the
    interpreter's finalization or C-level exit: an example controller hung there after
    its "done" line, twice in about ten CI runs (not reproduced; grpc's daemon threads
    inside calls at exit are the likely cause)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass
class Job:
    """What a controller needs to know of the job once, at start (`read_job`).

    `names`: the settable names, in model order; `numel`, `base`, `schedule` (None:
    constant) and `hyperparameters` (momentum, betas, weight_decay... as the optimizer
    holds them) per name; `optimizer`: its class name; `step`, `version` at reading.
    """

    names: list[str]
    numel: dict[str, int]
    base: dict[str, float]
    schedule: dict[str, Optional[Schedule]]
    hyperparameters: dict[str, dict[str, float]]
    optimizer: str
    step: int
    version: int

    def momentum(self, name: str) -> float:
        """The fraction of past updates carried into the next: SGD's momentum, Adam's
        beta1 (0 when the optimizer has neither)."""
        hp = self.hyperparameters.get(name, {})
        return float(hp.get("momentum", hp.get("betas.0", hp.get("beta1", 0.0))))

    @property
    def adaptive(self) -> bool:
        """Adam-like (a per-coordinate normalized update) rather than SGD-like."""
        return "adam" in self.optimizer.lower() or "rmsprop" in self.optimizer.lower()


def read_job(client: LRClient) -> Job:
    """The job's names, sizes, bases, schedules and optimizer (three reads)."""
    status = client.status()
    params = [p for p in client.list_parameters() if p.settable]
    schedules = {s.name: s for s in client.get_schedules()}
    return Job(names=[p.name for p in params], numel={p.name: p.numel for p in params},
               base={p.name: schedules[p.name].base for p in params if p.name in schedules},
               schedule={p.name: schedules[p.name].schedule for p in params if p.name in schedules},
               hyperparameters={p.name: dict(p.hyperparameters) for p in params},
               optimizer=status.optimizer, step=status.step, version=status.version)
