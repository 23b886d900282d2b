"""The LearningRateControl gRPC service: thin handlers over the controller.

Handlers validate message-level input, translate messages to controller calls and
back, and never touch the optimizer themselves.

They are coroutines on the server's event loop (lrctl.server.factory). Cheap calls
(GetStatus, reads of a few exact names or of a small model, a names page) are answered
on the loop itself: no thread hop. Everything else (writes, dry runs, pattern selectors,
big pages, history) runs on the admission budget's threads (lrctl.server.admission),
which bound it and keep it from delaying health checks and cheap reads. A waiting Set
holds no thread: it awaits its change's done-callback. Work whose caller has gone
(cancelled, or past its deadline) stops at the next check (lrctl.server.cancel).
The synchronous methods (list_parameters, get_learning_rates, ...) are the handlers'
bodies, callable without a server.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections import deque
from typing import Any, AsyncIterator, Callable, Iterable, TypeVar

import grpc

from lrctl.common.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    LrctlError,
)
from lrctl.server.admission import (
    DEFAULT_EXPENSIVE_QUEUED,
    DEFAULT_EXPENSIVE_WORKERS,
    DEFAULT_MAX_WAITING,
    DEFAULT_MAX_WAITING_PER_CONNECTION,
    DEFAULT_MAX_WAITING_PER_TOKEN,
    Budget,
    WaitingQuota,
)
from lrctl.server.auth import Tokens
from lrctl.server.cancel import CallCheck, CallerGoneError
from lrctl.server.controller import Check, Controller, PendingView
from lrctl.server.history import Record
from lrctl.server.lockstep import LockstepGate, Turn
from lrctl.server.read_answers import (
    PAGE_BYTES,
    _NAME_ROW_BYTES,
    Reads,
    cheap_selectors,
    decode_token,
    encode_token,
    rows_fitting,
    checked_page_size,
)
from lrctl.server.telemetry import Event
from lrctl.server.subscribers import (
    DEFAULT_REPORTED_CHANGES, MAX_ENTRIES_PER_CHANGE_PAGE, changes_per_record, runs,
)
from lrctl.server.watch import WatchHub, WatchLimits
from lrctl.server.requests import ChangeRequest, Outcome, PendingChange
from lrctl.server.write_plan import MAX_REASON_CHARS
from lrctl.server.planned_wire import Planned
from lrctl.server.record_wire import record_pb, record_to_wire
from lrctl.server.write_messages import (
    check_message,
    change_request,
    reply as _reply,
    schedules_pb as _schedules_pb,
    updates_pb as _updates_pb,
    user_of,
    waits,
)
from lrctl.v1 import lrctl_pb2 as pb
from lrctl.v1 import lrctl_pb2_grpc as pb_grpc

try:
    from importlib.metadata import version as _dist_version

    SERVER_VERSION = _dist_version("lrctl")
except Exception:  # running from a source tree that is not installed
    SERVER_VERSION = "unknown"

DEFAULT_CHANGE_PAGE, MAX_CHANGE_PAGE = 100, 1000
DEFAULT_PENDING_PAGE, MAX_PENDING_PAGE = 100, 1000
# A ListChanges page's caps (MAX_ENTRIES_PER_CHANGE_PAGE, DEFAULT_REPORTED_CHANGES) are in
# lrctl.server.subscribers, the page and row byte caps in lrctl.server.read_answers.
# A waiting Set gives up this long before the client's deadline, so that the client
# reads our "withdrawn, not applied" answer rather than its own deadline error.
_WAIT_MARGIN_S = 0.1
# A waiting Set's reply with more per-name entries than this is built off the loop.
_BIG_REPLY = 2000
# Encoded MetricsEvents kept for the streams that still have to send them.
_WIRE_CACHE = 256
# A change planned in the serving process is queued on the loop up to this many names
# (its estimate of bytes is a pass over them), on the budget's threads past it.
_CHEAP_PLANNED = 4096

T = TypeVar("T")

_STATES = {
    "waiting_for_first_step": pb.TRAINING_STATE_WAITING_FOR_FIRST_STEP,
    "training": pb.TRAINING_STATE_TRAINING,
    "closing": pb.TRAINING_STATE_CLOSING,
}


def _wake(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _pending_pb(view: PendingView) -> pb.PendingChangeInfo:
    """A queued change's wire form; one bigger than a page on its own lists only the
    updates and schedules that fit (num_names still counts every name)."""
    r = view.request
    message = pb.PendingChangeInfo(
        change_id=view.change_id, at_step=r.at_step, requested_at=view.requested_at,
        peer=r.peer, user=r.user, role=r.role, token_name=r.token, reason=r.reason,
        waiting=view.waiting, num_names=view.num_names, expected_version=r.expected_version,
    )
    room = PAGE_BYTES - message.ByteSize()
    updates, schedules = _updates_pb(r.updates), _schedules_pb(r.schedules)
    cut = rows_fitting((m.ByteSize() + _NAME_ROW_BYTES for m in [*updates, *schedules]), room)
    if cut is not None:
        schedules = schedules[:max(cut - len(updates), 0)]
        updates = updates[:cut]
    message.updates.extend(updates)
    message.schedules.extend(schedules)
    return message


# Sent as response headers once the worker has accepted a Lockstep open.
LOCKSTEP_METADATA = ("lrctl-lockstep", "open")
# Unsent turns a Lockstep stream keeps; past it the oldest is dropped (and counted):
# a controller that does not read must not make the worker hold more.
_LOCKSTEP_OUTBOX = 16


class _TurnBox:
    """Turns from the training thread to a Lockstep stream's handler (event loop),
    bounded: the oldest unsent turn goes first."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._turns: deque[Turn] = deque()
        self._ready = asyncio.Event()
        self._dropped = 0
        self._ended = False

    def put_threadsafe(self, turn: Turn) -> None:
        """Called on the training thread: never blocks (raises if the loop is closed)."""
        self._loop.call_soon_threadsafe(self._put, turn)

    def _put(self, turn: Turn) -> None:
        if len(self._turns) >= _LOCKSTEP_OUTBOX:
            self._turns.popleft()
            self._dropped += 1
        self._turns.append(turn)
        self._ready.set()

    def end_threadsafe(self) -> None:
        """The gate closed (the worker is shutting down): get() returns None once the
        turns already sent are out."""
        self._loop.call_soon_threadsafe(self._end)

    def _end(self) -> None:
        self._ended = True
        self._ready.set()

    async def get(self) -> pb.LockstepTurn | None:
        while not self._turns:
            if self._ended:
                return None
            self._ready.clear()
            await self._ready.wait()
        turn = self._turns.popleft()
        dropped, self._dropped = self._dropped, 0
        return _turn_pb(turn, dropped)


def _turn_pb(turn: Turn, dropped: int) -> pb.LockstepTurn:
    message = pb.LockstepTurn(step=turn.step, version=turn.version, wall_time=turn.wall_time,
                              timeout_seconds=turn.timeout, ignored_decisions=turn.ignored_decisions,
                              dropped_turns=dropped)
    p = turn.previous
    if p is not None:
        message.previous.CopyFrom(pb.LockstepOutcome(
            step=p.step, timed_out=p.timed_out, decided_late=p.decided_late,
            applied_change_ids=p.applied, failed_change_ids=p.failed))
    return message


async def _decisions(requests: Any, gate: LockstepGate) -> None:
    """Hand a Lockstep stream's decisions to its gate until the client ends its side."""
    async for message in requests:
        kind = message.WhichOneof("kind")
        if kind == "decided":
            gate.decide(message.decided)
        elif kind == "open":
            raise InvalidArgumentError("lockstep is already open on this stream; send only decisions now")
        else:
            raise InvalidArgumentError("a LockstepDecision must set decided (or open, first)")


def _event_stats_pb(event: Event) -> list[pb.ParameterStats]:
    return [pb.ParameterStats(name=unit, values=values) for unit, values in (event.stats() or {}).items()]


def _user(context: grpc.ServicerContext) -> str:
    return user_of(context.invocation_metadata())


class LearningRateControlService(pb_grpc.LearningRateControlServicer):
    """gRPC handlers for one controller."""

    def __init__(
        self,
        controller: Controller,
        max_waiting: int = DEFAULT_MAX_WAITING,
        tokens: Tokens | None = None,
        *,
        max_waiting_per_connection: int = DEFAULT_MAX_WAITING_PER_CONNECTION,
        max_waiting_per_token: int = DEFAULT_MAX_WAITING_PER_TOKEN,
        expensive_workers: int = DEFAULT_EXPENSIVE_WORKERS,
        expensive_queued: int = DEFAULT_EXPENSIVE_QUEUED,
        watch_limits: WatchLimits | None = None,
    ) -> None:
        """`max_waiting*`: how many calls may wait for their change to apply, in all, per
        connection and per token; `expensive_*`: the admission budget (threads for
        expensive calls, and how many more may wait for one). See lrctl.server.admission.
        `watch_limits`: WatchMetrics streams and their queues (lrctl.server.watch)."""
        self._controller = controller
        self._tokens = tokens  # checked by the interceptor; here only to record who changed what
        self.waiting = WaitingQuota(max_waiting, max_waiting_per_connection, max_waiting_per_token)
        self.budget = Budget(expensive_workers, expensive_queued)
        self.reads = Reads(controller)  # the three reads' answers (also the serving process's)
        self.watchers = WatchHub(controller.telemetry, watch_limits)
        self._wire: collections.OrderedDict[tuple[int, bool, int], pb.MetricsEvent] = collections.OrderedDict()

    def close(self) -> None:
        """Free the budget's threads (once their current work ends)."""
        self.budget.shutdown()

    async def _expensive(
        self, request: Any, context: grpc.aio.ServicerContext, work: Callable[[Check], T]
    ) -> T:
        """work(check) on the budget's threads, stopped when the caller goes."""
        remaining = context.time_remaining()
        call = CallCheck(None if remaining is None else time.monotonic() + remaining)
        return await self.budget.run(lambda: work(call.check), call, size=request.ByteSize())

    # -- reads -----------------------------------------------------------------------
    async def ListParameters(self, request: pb.ListParametersRequest, context: grpc.aio.ServicerContext) -> pb.ListParametersResponse:
        return await self._read(request, context)

    async def GetLearningRates(self, request: pb.GetLearningRatesRequest, context: grpc.aio.ServicerContext) -> pb.GetLearningRatesResponse:
        return await self._read(request, context)

    async def GetSchedules(self, request: pb.GetSchedulesRequest, context: grpc.aio.ServicerContext) -> pb.GetSchedulesResponse:
        return await self._read(request, context)

    async def _read(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        reads = self.reads
        if reads.is_cheap(request):
            return reads.answer(request)
        return await self._expensive(request, context, lambda check: reads.answer(request, check))

    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.GetStatusResponse:
        return self.get_status(request)

    async def ListChanges(self, request: pb.ListChangesRequest, context: grpc.aio.ServicerContext) -> pb.ListChangesResponse:
        return await self._expensive(request, context, lambda check: self.list_changes(request))

    async def ListPending(self, request: pb.ListPendingRequest, context: grpc.aio.ServicerContext) -> pb.ListPendingResponse:
        return await self._expensive(request, context, lambda check: self.list_pending(request))

    async def CancelChanges(self, request: pb.CancelChangesRequest, context: grpc.aio.ServicerContext) -> pb.CancelChangesResponse:
        # On the loop, not the budget: a flood of expensive calls must not keep an
        # admin from taking changes out (it is a few dict operations under the lock).
        return self.cancel_changes(request, self._who(context))

    async def WatchMetrics(self, request: pb.WatchMetricsRequest, context: grpc.aio.ServicerContext) -> Any:
        async for batch in self._watch(request, context):
            for message in batch:
                yield message

    async def WatchMetricsBatched(self, request: pb.WatchMetricsRequest, context: grpc.aio.ServicerContext) -> Any:
        async for batch in self._watch(request, context):
            for run in runs(batch, pb.MetricsEvent.ByteSize):
                yield pb.MetricsEvents(events=run)

    async def _watch(self, request: pb.WatchMetricsRequest,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[list[pb.MetricsEvent]]:
        """A watch call's events, in the batches its subscriber's queue hands over."""
        # The loop only copies references into queues; a stream's reader pays for its
        # own encoding here, never the training thread. (With serving="process" the
        # serving process serves the streams: lrctl.server.watch_feed.)
        per_record = changes_per_record(request.max_changes_per_record)
        sub = self.watchers.subscribe(
            context.peer(), self._identity(context).get("token", ""),
            from_step=request.from_step if request.HasField("from_step") else None,
            changes_only=request.changes_only, include_stats=request.include_stats)
        try:
            while True:
                batch = await sub.next_batch()
                if not batch:
                    return  # the worker closed: the stream ends
                yield [self._event_pb(event, dropped, request.include_stats, per_record)
                       for event, dropped in batch]
        finally:
            self.watchers.unsubscribe(sub)

    def _event_pb(self, event: Event, dropped: int, include_stats: bool, per_record: int) -> pb.MetricsEvent:
        """The wire form of an event, made once per (stats or not, per_record) and shared
        by every stream that wants it that way; a copy only to say what a stream lost."""
        key = (event.seq, include_stats and event.has_stats, per_record)
        cache = self._wire
        message = cache.get(key)
        if message is None:
            message = self._event_base_pb(event)
            message.changes.extend(self._event_changes_pb(event, per_record))
            if key[1]:
                message.stats.extend(_event_stats_pb(event))
            cache[key] = message
            if len(cache) > _WIRE_CACHE:  # only events in flight: the ring holds the rest
                cache.popitem(last=False)
        if dropped:
            copy = pb.MetricsEvent()
            copy.CopyFrom(message)
            copy.dropped = dropped
            return copy
        return message

    @staticmethod
    def _event_base_pb(event: Event) -> pb.MetricsEvent:
        return pb.MetricsEvent(step=event.step, time=event.time, version=event.version,
                               metrics=event.metrics())

    def _event_changes_pb(self, event: Event, per_record: int) -> list[pb.ChangeRecord]:
        return [self._record_pb(record, per_record) for record in event.changes]

    def event_extras(self, event: Event, per_records: Iterable[int], stats: bool) -> tuple[tuple, bytes]:
        """What the feed carries of an event beside its numbers (lrctl.server.watch_feed):
        its change records as plain values (lrctl.server.record_wire, with as many
        per-name changes as the most any stream asked for; the serving process builds
        their messages) and its statistics (b"" unless `stats`), a serialized MetricsEvent.
        Serialized messages concatenate as they merge, so a stream's message is the
        event's step, time, version and metrics + its records + (statistics) + (dropped)."""
        limit = max(per_records, default=DEFAULT_REPORTED_CHANGES)
        names = self._controller.index.names
        changes = tuple(record_to_wire(record, names, limit) for record in event.changes)
        extra = (pb.MetricsEvent(stats=_event_stats_pb(event)).SerializeToString()
                 if stats and event.has_stats else b"")
        return changes, extra

    def list_parameters(self, request: pb.ListParametersRequest, check: Check | None = None) -> pb.ListParametersResponse:
        return self.reads.list_parameters(request, check)

    def get_learning_rates(self, request: pb.GetLearningRatesRequest, check: Check | None = None) -> pb.GetLearningRatesResponse:
        return self.reads.get_learning_rates(request, check)

    def get_schedules(self, request: pb.GetSchedulesRequest, check: Check | None = None) -> pb.GetSchedulesResponse:
        return self.reads.get_schedules(request, check)

    # -- writes ----------------------------------------------------------------------
    async def SetLearningRates(self, request: pb.SetLearningRatesRequest, context: grpc.aio.ServicerContext) -> pb.SetLearningRatesResponse:
        return await self._change(request, context)

    async def SetSchedules(self, request: pb.SetSchedulesRequest, context: grpc.aio.ServicerContext) -> pb.SetLearningRatesResponse:
        return await self._change(request, context)

    async def ClearSchedules(self, request: pb.ClearSchedulesRequest, context: grpc.aio.ServicerContext) -> pb.SetLearningRatesResponse:
        return await self._change(request, context)

    async def _change(
        self,
        request: pb.SetLearningRatesRequest | pb.SetSchedulesRequest | pb.ClearSchedulesRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.SetLearningRatesResponse:
        """Submit one batch of rate and schedule changes with the request's options."""
        check_message(request)
        identity, peer, user = self._identity(context), context.peer(), _user(context)
        reply = await self._submit(
            lambda: change_request(request, identity, peer, user), context, peer=peer,
            token=identity.get("token", ""), dry_run=request.dry_run, waiting=waits(request),
            limit=request.max_reported_changes, cheap=self._cheap_change(request), size=request.ByteSize())
        assert not isinstance(reply, int)
        return reply

    async def submit_planned(
        self, planned: Planned, context: grpc.aio.ServicerContext, size: int
    ) -> int | pb.SetLearningRatesResponse:
        """A change the serving process resolved, checked and planned against config
        version `planned.version` (lrctl.server.serving_writes): queued as planned while
        the version is still that one, else planned again here. The answer of a call
        that does not wait is then only the change id (the serving process replies from
        its own plan); otherwise the reply, as for any Set."""
        r = planned.request
        return await self._submit(
            lambda: r, context, peer=r.peer, token=r.token, dry_run=False, waiting=r.wait,
            limit=planned.max_reported_changes, cheap=len(planned.ops) <= _CHEAP_PLANNED, size=size,
            planned=planned)

    async def _submit(
        self, make: Callable[[], ChangeRequest], context: grpc.aio.ServicerContext, *, peer: str,
        token: str, dry_run: bool, waiting: bool, limit: int, cheap: bool, size: int,
        planned: Planned | None = None,
    ) -> int | pb.SetLearningRatesResponse:
        """Preview or submit the change `make()` builds, and wait for it if asked.

        Validation and submit (up to ~40 ms for 100k names) run on the budget's threads
        unless `cheap`; a waiting call then awaits its change without a thread. A change
        whose caller has gone is withdrawn (under the controller's lock) and never applied
        after its caller was told it failed; one already applied is answered as it is.
        """
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining - _WAIT_MARGIN_S
        call = CallCheck(deadline)
        if waiting:
            self.waiting.acquire(peer, token)
        try:
            def work() -> tuple[PendingChange | None, int | pb.SetLearningRatesResponse | None]:
                change = make()
                if dry_run:
                    return None, _reply(limit, self._controller.preview(change, check=call.check))
                pending, outcome = self._controller.submit(
                    change, deadline=deadline if waiting else None, check=call.check, planned=planned
                )
                try:
                    call.check()  # its caller left while it was being queued
                except LrctlError as gone:
                    if self._controller.withdraw(pending, gone):
                        raise
                if waiting:
                    return pending, None
                return pending, pending.change_id if outcome is None else _reply(limit, outcome)

            def abandoned(result: tuple[PendingChange | None, Any]) -> None:
                if result[0] is not None:
                    self._controller.withdraw(result[0], CallerGoneError(
                        f"change {result[0].change_id} withdrawn: its caller cancelled the call"))

            if cheap:
                pending, reply = work()
            else:
                pending, reply = await self.budget.run(work, call, size=size, on_abandoned=abandoned)
            if reply is not None:
                return reply
            assert pending is not None
            outcome = await self._wait(pending, context)
            if min(len(outcome.changes), limit or DEFAULT_REPORTED_CHANGES) > _BIG_REPLY:
                return await asyncio.get_running_loop().run_in_executor(None, _reply, limit, outcome)
            return _reply(limit, outcome)
        finally:
            if waiting:
                self.waiting.release(peer, token)

    def _cheap_change(
        self, request: pb.SetLearningRatesRequest | pb.SetSchedulesRequest | pb.ClearSchedulesRequest
    ) -> bool:
        if not isinstance(request, pb.SetLearningRatesRequest) or request.schedules:
            return False
        return cheap_selectors([u.selector for u in request.updates], len(self._controller.index))

    def _identity(self, context: grpc.ServicerContext) -> dict[str, str]:
        """The role and token name a change is recorded with (empty without tokens)."""
        if self._tokens is None:
            return {}
        token = self._tokens.identify(context.invocation_metadata())
        return {} if token is None else {"role": token.role, "token": token.name}

    def _who(self, context: grpc.ServicerContext) -> str:
        """'alice@host (token 'alice', ipv4:127.0.0.1:53412)': who a message says did it."""
        token = self._identity(context).get("token")
        where = f"token {token!r}, {context.peer()}" if token else context.peer()
        return f"{_user(context) or 'an unnamed client'} ({where})"

    async def _wait(self, pending: PendingChange, context: grpc.aio.ServicerContext) -> Outcome:
        """Await the change's step boundary; withdraw it if the caller gives up first."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        pending.add_done_callback(lambda _: loop.call_soon_threadsafe(_wake, done))
        remaining = context.time_remaining()
        try:
            await asyncio.wait_for(
                asyncio.shield(done), None if remaining is None else max(remaining - _WAIT_MARGIN_S, 0.0)
            )
        except asyncio.TimeoutError:
            error = self._not_applied_in_time(pending)
            if self._controller.withdraw(pending, error):
                raise error from None
            # Too late to withdraw: it was applied (or dropped) under the lock; its
            # callback is on its way.
            await done
        except asyncio.CancelledError:  # the client cancelled, or the server is stopping
            self._controller.withdraw(pending, CallerGoneError(
                f"change {pending.change_id} withdrawn: its caller cancelled the call"))
            raise
        if pending.error is not None:
            raise pending.error
        assert pending.outcome is not None
        return pending.outcome

    def _not_applied_in_time(self, pending: PendingChange) -> DeadlineExceededError:
        status = self._controller.status()
        last = status.seconds_since_last_step
        due = pending.request.at_step
        return DeadlineExceededError(
            f"change {pending.change_id} was withdrawn and NOT applied: its step boundary did "
            f"not come before the deadline (next step {status.step}"
            + ("" if due is None else f", due at step {due}")
            + ("; no step yet" if last is None else f"; last step {last:.1f}s ago")
            + "). Use a longer timeout, or do not wait"
        )

    # -- lockstep --------------------------------------------------------------------
    async def Lockstep(self, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        """One controller's lockstep (lrctl.server.lockstep): open, then turns out and
        decisions in until either side ends; the gate is closed (a hold released, lockstep
        off) however the stream ends: the client's end, an error, a cancelled call."""
        opening = await anext(aiter(requests), None)
        if opening is None:
            return  # the client ended its side without opening
        if opening.WhichOneof("kind") != "open":
            raise InvalidArgumentError("the first LockstepDecision must open lockstep (set open: every, timeout_seconds)")
        outbox = _TurnBox(asyncio.get_running_loop())
        gate = LockstepGate(opening.open.every, opening.open.timeout_seconds, outbox.put_threadsafe,
                            peer=context.peer(), token=self._identity(context).get("token", ""),
                            on_close=outbox.end_threadsafe)
        self._controller.attach_lockstep(gate)
        reader: asyncio.Future[None] | None = None
        try:
            await context.send_initial_metadata((LOCKSTEP_METADATA,))
            reader = asyncio.ensure_future(_decisions(requests, gate))
            while True:
                turn = asyncio.ensure_future(outbox.get())
                await asyncio.wait((reader, turn), return_when=asyncio.FIRST_COMPLETED)
                if reader.done():
                    turn.cancel()
                    reader.result()  # a bad decision raises here
                    return
                message = turn.result()
                if message is None:
                    return  # the worker closed lockstep (it is shutting down): the stream ends OK
                yield message
        finally:
            self._controller.detach_lockstep(gate)
            if reader is not None:
                reader.cancel()

    def get_status(self, request: pb.GetStatusRequest | None = None) -> pb.GetStatusResponse:
        s = self._controller.status()
        gate = self._controller.lockstep_status()
        lockstep = None if gate is None else pb.LockstepStatus(
            peer=gate.peer, token_name=gate.token, every=gate.every, timeout_seconds=gate.timeout,
            held_step=gate.held_step, turns=gate.turns, timeouts=gate.timeouts,
            ignored_decisions=gate.ignored_decisions)
        return pb.GetStatusResponse(
            step=s.step,
            version=s.version,
            optimizer=s.optimizer,
            num_parameters=s.num_parameters,
            num_settable=s.num_settable,
            num_distinct_lrs=s.num_distinct_lrs,
            num_param_groups=s.num_param_groups,
            state=_STATES[s.state],
            uptime_seconds=s.uptime_seconds,
            seconds_since_last_step=s.seconds_since_last_step,
            pending_changes=s.pending_changes,
            server_version=SERVER_VERSION,
            run_id=s.run_id,
            guardrails=[pb.Guardrail(selector=g.selector, min_lr=g.min_lr, max_lr=g.max_lr)
                        for g in s.guardrails],
            max_factor=s.max_factor,
            lockstep=lockstep,
            lockstep_timeouts=self._controller.lockstep_timeouts,
            oldest_event_step=self._controller.telemetry.oldest_step(),
            watchers=len(self.watchers),
        )

    def list_changes(self, request: pb.ListChangesRequest) -> pb.ListChangesResponse:
        size = checked_page_size(request.page_size, DEFAULT_CHANGE_PAGE, MAX_CHANGE_PAGE)
        if request.max_changes_per_record < 0:
            raise InvalidArgumentError(
                f"max_changes_per_record {request.max_changes_per_record} is negative"
            )
        per_record = min(request.max_changes_per_record or DEFAULT_REPORTED_CHANGES,
                         MAX_ENTRIES_PER_CHANGE_PAGE)
        # The token names the last record sent by its sequence number (several records
        # can share a version: failed ones carry the version in force).
        after_seq = decode_token(request.page_token, "records", "")[0]
        page = self._controller.history_page(request.after_version, after_seq, size)
        records, more = page.records, page.more
        used = 0
        for k, record in enumerate(records):  # a page ends early rather than grow huge
            used += min(record.num_changes, per_record) + len(record.updates)
            if k and used > MAX_ENTRIES_PER_CHANGE_PAGE:
                records, more = records[:k], True
                break
        messages: list[pb.ChangeRecord] = []
        used = 0
        for record in records:  # ... and fits a client with gRPC's default 4 MiB limit
            message = self._record_pb(record, per_record)
            size = message.ByteSize()
            if messages and used + size > PAGE_BYTES:
                records, more = records[:len(messages)], True
                break
            messages.append(message)
            used += size
        return pb.ListChangesResponse(
            changes=messages,
            next_page_token=encode_token("records", records[-1].seq, "") if more else "",
            dropped=page.dropped,
            oldest_version=page.oldest_version,
            gap=page.gap,
        )

    def list_pending(self, request: pb.ListPendingRequest) -> pb.ListPendingResponse:
        size = checked_page_size(request.page_size, DEFAULT_PENDING_PAGE, MAX_PENDING_PAGE)
        # The token is the last change id listed: the queue moves between pages.
        after, _ = decode_token(request.page_token, "pending", "")
        queued = self._controller.pending()
        page = [v for v in queued if v.change_id > after][:size + 1]
        more = len(page) > size
        response = pb.ListPendingResponse(total_size=len(queued))
        used = 0
        for k, view in enumerate(page[:size]):
            message = _pending_pb(view)
            used += message.ByteSize() + _NAME_ROW_BYTES
            if k and used > PAGE_BYTES:
                more = True
                break
            response.changes.append(message)
        if more:
            response.next_page_token = encode_token("pending", response.changes[-1].change_id, "")
        return response

    def cancel_changes(self, request: pb.CancelChangesRequest, who: str) -> pb.CancelChangesResponse:
        if not request.change_ids:
            raise InvalidArgumentError("no change_ids: give the ids of queued changes (ListPending)")
        if len(request.reason) > MAX_REASON_CHARS:
            raise InvalidArgumentError(
                f"reason of {len(request.reason)} characters is too long (at most {MAX_REASON_CHARS})")
        cancelled, not_found = self._controller.cancel(request.change_ids, by=who, reason=request.reason)
        return pb.CancelChangesResponse(cancelled=cancelled, not_found=not_found)

    def _record_pb(self, record: Record, per_record: int) -> pb.ChangeRecord:
        """A record's message with at most `per_record` per-name changes, cut to a page."""
        return record_pb(record_to_wire(record, self._controller.index.names, per_record), per_record)
