"""The controller's state as plain data keyed by name: export, check, import.

A mixin of Controller (lrctl.server.controller): it reads and writes the controller's
table, book, history and queue under its lock. lrctl.server.state converts the pieces;
lrctl.server.resume decides when (the optimizer's state-dict hooks). Pure Python.
"""

from __future__ import annotations

import logging
import math
from array import array
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from lrctl.common.errors import AbortedError, InvalidArgumentError
from lrctl.server import state
from lrctl.server.checkpoint import listing
from lrctl.server.history import History, Record
from lrctl.server.rates import CONSTANT, ScheduleBook
from lrctl.server.requests import ChangeRequest, PendingChange

log = logging.getLogger("lrctl.controller")

RESUME_POLICIES = ("checkpoint", "code")
_NEVER = math.inf  # as lrctl.server.controller's: no change waits


@dataclass(frozen=True)
class ParsedState:
    """A checked export_state() dict, read against this model (Controller.parse_state)."""

    step: int
    version: int
    next_change_id: int
    lineage: tuple[str, ...]
    rates: list[tuple[int, float, Any, float]]  # (position, base, schedule spec, pin or NaN)
    specs: Mapping[int, Any]  # saved schedule id -> spec (None: unresolvable)
    records: list[Record]
    dropped: int
    pending: list[PendingChange]
    report: list[str]


def _with_real_ids(record: Record, book: ScheduleBook) -> Record:
    """`record` with its plan's schedule ids (provisional, from a scratch book) made real."""
    plan = record.plan
    if plan is None or plan.old_schedule is None or plan.new_schedule is None:
        return record
    real = {sid: book.intern(spec) for sid, spec in plan.schedules.items()}
    real[0] = 0
    return replace(record, plan=replace(
        plan,
        old_schedule=array("q", [real[s] for s in plan.old_schedule]),
        new_schedule=array("q", [real[s] for s in plan.new_schedule]),
        schedules={real[s]: spec for s, spec in plan.schedules.items()},
    ))


class ControllerState:
    """export_state / import_state of Controller (see the module docstring)."""

    if TYPE_CHECKING:  # the Controller attributes these methods use
        _lock: Any
        _table: Any
        _book: ScheduleBook
        _history: History
        _history_limit: int
        _history_max_bytes: int
        _pending: list[PendingChange]
        _next_due: float
        _step: int
        _version: int
        loads: int
        _next_change_id: int
        _posted: Any
        _installed: dict[int, float]
        _after_step: tuple[Any, ...]
        telemetry: Any
        _strategy: Any
        index: Any
        run_id: str
        lineage: tuple[str, ...]

        def _commit(self, indices: Any, bases: Any, schedules: Any, pins: Any, step: int) -> None: ...
        def _reinstall(self) -> None: ...
        def _fail(self, pending: PendingChange, step: int, error: Any) -> None: ...
        def _take_posted(self, wait: bool = True) -> None: ...
        def _peek_change_id(self) -> int: ...
        def _ring_emptied(self, ring: Any) -> Any: ...

    def export_state(self) -> dict[str, Any]:
        """This controller's state as plain data keyed by name (lrctl.server.state):
        bases, pins and schedules, step, version, lineage, the history tail and the
        changes still waiting for their step."""
        names, table, book = self.index.names, self._table, self._book
        with self._lock:
            self._take_posted()
            held = [i for i, b in enumerate(table.base) if b is not None]
            tail: list[Record] = []
            entries = 0
            kept = list(self._history.after(-1))
            for record in reversed(kept):
                entries += record.num_changes
                if len(tail) >= state.MAX_SAVED_RECORDS or (tail and entries > state.MAX_SAVED_ENTRIES):
                    break
                tail.append(record)
            tail.reverse()
            dropped = self._history.dropped + len(kept) - len(tail)
            return {
                "format": state.FORMAT,
                "run_id": self.run_id,
                "lineage": [*self.lineage, self.run_id],
                "step": self._step,
                "version": self._version,
                "next_change_id": self._peek_change_id(),
                "schedules": [[sid, state.schedule_to_state(book[sid])] for sid in range(1, len(book))],
                "rates": {
                    "names": [names[i] for i in held],
                    "base": [table.base[i] for i in held],
                    "schedule": [table.schedule[i] for i in held],
                    "pin": [table.pins.get(i) for i in held],
                },
                "history": [state.record_to_state(r, names, int) for r in tail],
                "history_dropped": dropped,
                "pending": [
                    {
                        "change_id": p.change_id, "requested_at": p.requested_at,
                        "updates": state.updates_to_state(p.request.updates),
                        "schedules": state.schedule_updates_to_state(p.request.schedules),
                        "at_step": p.request.at_step, "expected_version": p.request.expected_version,
                        "reason": p.request.reason, "peer": p.request.peer, "user": p.request.user,
                        "role": p.request.role, "token": p.request.token,
                        "ops": state.ops_to_state(p.ops, names),
                    }
                    for p in self._pending
                ],
            }

    def import_state(
        self, saved: Mapping[str, Any], *, policy: str = "checkpoint", adopted: Sequence[Any] = ()
    ) -> list[str]:
        """Resume from export_state() of an earlier run; returns what did not match.

        policy "checkpoint": the saved bases, pins and schedules win (as torch's own
        load_state_dict restores group rates); "code": the rates this run was attached
        with stay. Either way the step, version, history, lineage and waiting changes
        are restored. `adopted` are this run's adopted scheduler groups, by index.
        Names the model lost or gained are reported, never fatal. A state that is not
        whole is refused (InvalidArgumentError) before anything changes.
        """
        return self.apply_state(self.parse_state(saved, adopted=adopted), policy=policy)

    def parse_state(self, saved: Any, *, adopted: Sequence[Any] = ()) -> "ParsedState":
        """Check and read an export_state() dict against this model; changes nothing."""
        saved = state.check_format(saved)
        position = {name: i for i, name in enumerate(self.index.names)}
        try:
            return self._parse_state(saved, position, adopted)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InvalidArgumentError(f"the lrctl state is malformed or incomplete: {exc!r}") from None

    def _parse_state(
        self, saved: Mapping[str, Any], position: Mapping[str, int], adopted: Sequence[Any]
    ) -> "ParsedState":
        report: list[str] = []
        specs: dict[int, Any] = {0: CONSTANT}
        for sid, data in saved["schedules"]:
            specs[int(sid)] = state.schedule_from_state(data, adopted)
        if any(spec is None for spec in specs.values()):
            report.append("the checkpoint has adopted torch schedulers this run did not pass to "
                          "attach(scheduler=...); their names keep this run's schedules")
        rates = saved["rates"]
        columns = [rates[k] for k in ("names", "base", "schedule", "pin")]
        if len({len(c) for c in columns}) != 1:
            raise ValueError("the rates' columns differ in length")
        unknown = [n for n in rates["names"] if n not in position]
        if unknown:
            report.append(f"{len(unknown)} name(s) of the checkpoint are not in the model: "
                          + listing(unknown))
        known = set(rates["names"])
        new = [n for i, n in enumerate(self.index.names) if self._table.base[i] is not None and n not in known]
        if new:
            report.append(f"{len(new)} name(s) are not in the checkpoint and keep this run's "
                          "rates: " + listing(new))
        picked = [
            (position[n], float(b), specs[int(sid)], math.nan if p is None else float(p))
            for n, b, sid, p in zip(*columns)
            if n in position and self._table.base[position[n]] is not None and specs[int(sid)] is not None
        ]
        with self._lock:
            book = self._book.scratch()
            ids = {int(sid): book.intern(spec) for sid, spec in specs.items() if spec is not None}
        schedule_id = lambda sid: ids.get(int(sid), 0)  # noqa: E731 (unresolvable: constant)
        records = [state.record_from_state(data, position, schedule_id, lambda s: book[s], adopted)
                   for data in saved["history"]]
        pending = []
        for data in saved["pending"]:
            ops = state.ops_from_state(data["ops"], position, adopted)
            if not ops:
                report.append(f"change {data['change_id']} waited for step {data['at_step']} but "
                              "touches no name of this model; dropped")
                continue
            request = ChangeRequest(
                updates=state.updates_from_state(data["updates"]),
                schedules=state.schedule_updates_from_state(data["schedules"], adopted),
                at_step=None if data["at_step"] is None else int(data["at_step"]),
                expected_version=None if data["expected_version"] is None else int(data["expected_version"]),
                reason=str(data["reason"]), peer=str(data["peer"]), user=str(data["user"]),
                role=str(data.get("role", "")), token=str(data.get("token", "")),
            )
            pending.append(PendingChange(int(data["change_id"]), request, ops, float(data["requested_at"])))
        return ParsedState(
            step=int(saved["step"]), version=int(saved["version"]),
            next_change_id=int(saved["next_change_id"]), lineage=tuple(map(str, saved["lineage"])),
            rates=picked, specs=specs, records=records, dropped=int(saved["history_dropped"]),
            pending=pending, report=report,
        )

    def apply_state(self, parsed: "ParsedState", *, policy: str = "checkpoint") -> list[str]:
        """Install a parse_state() result (see import_state).

        Changes this run queued before the load are withdrawn, never applied: they were
        checked against a state (step, version, rates) the load replaces, their steps
        may have gone by, and their ids would collide with the checkpoint's. Each is
        recorded as failed (ABORTED, naming the load: the audit log has it) and a
        waiting caller is told at once. The checkpoint's own waiting changes take
        their place."""
        if policy not in RESUME_POLICIES:
            raise ValueError(f"resume policy {policy!r} is not one of {', '.join(RESUME_POLICIES)}")
        with self._lock:
            ring = self._posted
            if ring is not None:
                # What the serving process queued goes with the rest; changes planned
                # before the load are not queued there again, and the ids go on from
                # the checkpoint's.
                with self._ring_emptied(ring) as header:
                    ring.set_loads(header, self.loads + 1)
                    ring.set_next_id(header, parsed.next_change_id)
                    ring.set_queue(header, len(parsed.pending), sum(p.size for p in parsed.pending))
            withdrawn, self._pending = self._pending, []
            self._next_due = _NEVER
            for pending in withdrawn:
                self._fail(pending, self._step, AbortedError(
                    f"change {pending.change_id} was withdrawn, NOT applied: the job loaded a "
                    f"checkpoint (step {parsed.step}, version {parsed.version}) before its step; "
                    "send it again"))
            book = self._book
            if policy == "checkpoint" and parsed.rates:
                indices, bases, specs, pins = map(list, zip(*parsed.rates))
                self._commit(indices, bases, [book.intern(s) for s in specs], pins, parsed.step)
            self.loads += 1  # before the version: see Controller.loads_and_version
            self._step, self._version = parsed.step, parsed.version
            self._next_change_id = parsed.next_change_id
            self.lineage = parsed.lineage
            self._reinstall()
            self._history = History(self._history_limit, self._history_max_bytes,
                                    self._history.counts)
            for record in parsed.records:
                self._history.append(_with_real_ids(record, book), count=False)
            self._history.dropped += parsed.dropped
            if self._history.last_dropped is not None:
                pass
            elif parsed.dropped and parsed.records:
                # Dropped in an earlier run: what came before the first record kept.
                first = parsed.records[0]
                self._history.last_dropped = (first.version - (0 if first.failed else 1), False, -1)
            elif parsed.dropped:
                self._history.last_dropped = (parsed.version, False, -1)
            for pending in parsed.pending:
                self._pending.append(pending)
                self._next_due = min(self._next_due, pending.due)
        self.telemetry.seal_open()  # the events of the loaded steps are new ones
        for after in self._after_step:  # the new state is published before the load returns
            after()
        for pending in withdrawn:
            log.warning("lrctl: change %d withdrawn, not applied: the job loaded a checkpoint "
                        "before its step", pending.change_id)
        for line in parsed.report:
            log.warning("lrctl: resuming: %s", line)
        log.info("lrctl: resumed at step %d, version %d (%s's rates win)", self._step, self._version,
                 "the checkpoint" if policy == "checkpoint" else "the code")
        return list(parsed.report)

