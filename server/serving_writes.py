"""Writes planned in the serving process (attach(serving="process")) from the read snapshot.

SetLearningRates, SetSchedules and ClearSchedules are resolved, checked and planned
here, with the very code the training process runs in-process (lrctl.server.write_plan,
lrctl.server.write_messages), against the snapshot of the published config version
(lrctl.server.serving_reads: the same snapshot reads use, no older than a write this
process acknowledged). Then:
  - a bad request (message, selector, value, guardrails, a rate the optimizer cannot
    take) is answered here, with the in-process server's status and message;
  - a dry run is answered here;
  - a valid change that does not wait and is due at the next boundary is queued here,
    in shared memory, and answered from this plan (lrctl.server.posted_writes; the
    step hook takes it into the controller's queue), while the queue's bounds leave
    room for it. The plan goes with it (planned_wire.Planned.plan): the step hook
    applies it as is where planning again would give the same (same config version,
    checkpoint loads and step; no schedule touched), and plans again otherwise;
  - any other valid change is handed to the training process pre-planned (its request,
    its ops per position, the version it was planned against:
    lrctl.server.planned_wire's compact tuple), which only makes the live-state checks
    and queues it while its version is still that one, and plans it again itself
    otherwise (Controller.submit(planned=...)); one that does not wait is answered here
    from this plan and the change id the training process gave it.
Whatever cannot be decided here is forwarded whole, as before: a change the live-state
checks would refuse against the published step and version (the training process
decides, and says so in its own words), a change that matches a parameter which did
not require grad when the snapshot was made (it may since: a job that unfreezes layers),
an undecodable request, a job whose snapshot is off (an adopted torch scheduler), a
snapshot that does not come in time.

Requests answered here are counted in the training process's lrctl_requests_total
(through the reads' counts: lrctl.server.serving_wire.count_answered). Authentication
and roles ran in this process's interceptors before the handler, as for every call.

Imports neither torch nor the controller.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable

import grpc

from lrctl.common.errors import LrctlError
from lrctl.server.cancel import CallCheck
from lrctl.server.planned_wire import Planned, planned_to_wire
from lrctl.server.queue_limits import QueueLimits
from lrctl.server.read_answers import cheap_selectors
from lrctl.server.read_model import NeedsLiveGrad
from lrctl.server.serving_reads import SnapshotReads
from lrctl.server.status import failure_status, lenient_deserializer
from lrctl.server.write_messages import change_request, check_message, reply, user_of
from lrctl.server.write_plan import check_acceptable
from lrctl.v1 import lrctl_pb2

REQUESTS = {
    "/lrctl.v1.LearningRateControl/SetLearningRates": lrctl_pb2.SetLearningRatesRequest,
    "/lrctl.v1.LearningRateControl/SetSchedules": lrctl_pb2.SetSchedulesRequest,
    "/lrctl.v1.LearningRateControl/ClearSchedules": lrctl_pb2.ClearSchedulesRequest,
}


class Forward(Exception):
    """Not decided here: the call goes to the training process whole."""


class HandOver:
    """A valid change, planned: its compact form for the training process, what to
    reply once it has a change id (a call that does not wait), and what the queue's
    bounds need of it (lrctl.server.posted_writes)."""

    def __init__(self, wire: tuple, planned: Planned, outcome: Any, limits: QueueLimits) -> None:
        self.wire, self.planned, self.outcome, self.limits = wire, planned, outcome, limits

    def reply(self, change_id: int) -> bytes:
        outcome = replace(self.outcome, change_id=change_id)
        return reply(self.planned.max_reported_changes, outcome).SerializeToString()


class SnapshotWrites:
    """The writes of this serving process (on the server's loop)."""

    def __init__(self, reads: SnapshotReads, tokens: Any, closing: Callable[[], bool] = lambda: False) -> None:
        self._reads, self._tokens, self._closing = reads, tokens, closing

    def _identity(self, metadata: Any) -> dict[str, str]:
        if self._tokens is None:
            return {}
        token = self._tokens.identify(metadata)
        return {} if token is None else {"role": token.role, "token": token.name}

    async def answer(self, method: str, body: bytes, context: grpc.aio.ServicerContext,
                     acked: int) -> bytes | HandOver | None:
        """The reply's bytes (answered here), a HandOver, or None: forward the call. A
        bad request aborts the call with the in-process server's status and message."""
        reads = self._reads
        if reads.off:
            return None
        request = lenient_deserializer(REQUESTS[method].FromString)(body)  # type: ignore[arg-type]
        if not isinstance(request, REQUESTS[method]):
            return None  # undecodable: the training process words it
        found = await reads.current(acked)
        if found is None:
            return None
        snap, step = found
        metadata = context.invocation_metadata()
        identity, peer, user = self._identity(metadata), context.peer(), user_of(metadata)

        def plan(check: Callable[[], None] | None) -> bytes | HandOver:
            check_message(request)
            change = change_request(request, identity, peer, user)
            planner = snap.planner()
            ops = planner.resolve_batch(change, check)
            try:
                check_acceptable(change, closed=self._closing(), step=step, version=snap.version,
                                 limits=snap.static.queue_limits)
            except LrctlError:
                raise Forward() from None  # against the live state: the training process decides
            expected = planner.expected_plan(change, ops, snap.rate_state(), snap.book, step)
            outcome = planner.outcome_of(0, change, expected, snap.version)
            if request.dry_run:
                return reply(request.max_reported_changes, outcome).SerializeToString()
            planned = Planned(change, ops, snap.version, request.max_reported_changes, snap.loads, expected)
            return HandOver(planned_to_wire(planned), planned, outcome, snap.static.queue_limits)

        try:
            if self._cheap(request, len(snap.index)):
                result = plan(None)
            else:
                remaining = context.time_remaining()
                call = CallCheck(None if remaining is None else time.monotonic() + remaining)
                result = await reads.budget.run(lambda: plan(call.check), call, size=len(body))
        except (Forward, NeedsLiveGrad):
            return None
        except Exception as exc:  # an LrctlError: its status; a bug: INTERNAL, logged
            code, message = failure_status(exc, method, reads.requests)  # counted there
            await context.abort(code, message)
        if isinstance(result, HandOver):
            return result
        reads.requests.add(method, "OK")
        return result

    @staticmethod
    def _cheap(request: Any, names: int) -> bool:
        if not isinstance(request, lrctl_pb2.SetLearningRatesRequest) or request.schedules:
            return False
        return cheap_selectors([u.selector for u in request.updates], names)
