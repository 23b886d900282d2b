"""Reads answered in the serving process (attach(serving="process")) from a snapshot.

GetLearningRates, GetSchedules and ListParameters are answered here, with the same code
as the in-process handlers (lrctl.server.read_answers over a
lrctl.server.read_model.ReadSnapshot instead of the Controller), at the step the
training process publishes in shared memory: the training process pays nothing per
read, only once per config version for the snapshot (written into the shared memory
by the thread that applied the change, for a job of a few thousand names while reads
come, else made by its link thread when a read needs it: serving_process._write_snapshot).

Consistency: a read is answered from a snapshot whose version is the published one,
and no older than the newest version a write's answer named to this process (the
`acked` rule of serving_main._Link: read-your-writes). Versions are compared as stamps
(lrctl.server.serving_wire.stamp: with the checkpoint loads, since a load may bring
back a number this run used for another state). A read that needs a newer
snapshot asks for one (one request in flight for all waiting reads) and waits for it,
bounded; past the bound, or while the job's schedules cannot be evaluated here (an
adopted torch scheduler), the read is forwarded as before. Authentication, roles and
admission ran in this process's interceptors before the handler, as for forwarded
calls; expensive reads (regexes, big pages) run on an admission budget of this
process's own threads, as the in-process server runs them on its own.

Imports neither torch nor the controller.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from typing import Callable

import grpc

from lrctl.server import serving_wire as wire
from lrctl.server.admission import Budget
from lrctl.server.cancel import CallCheck
from lrctl.server.read_answers import Reads
from lrctl.server.read_model import ReadSnapshot, VersionedPart
from lrctl.server.status import RequestCounts, failure_status, lenient_deserializer, refuse_undecodable
from lrctl.v1 import lrctl_pb2

log = logging.getLogger("lrctl.serving")
REQUESTS = {
    "/lrctl.v1.LearningRateControl/GetLearningRates": lrctl_pb2.GetLearningRatesRequest,
    "/lrctl.v1.LearningRateControl/GetSchedules": lrctl_pb2.GetSchedulesRequest,
    "/lrctl.v1.LearningRateControl/ListParameters": lrctl_pb2.ListParametersRequest,
}
# How long a read waits for a snapshot it asked for before it is forwarded instead
# (the training process makes one in ~0.1-5 ms; more means it is busy or closing).
SNAPSHOT_WAIT_S = 2.0
# How long a read waits for the published version to catch up with a snapshot that is
# newer (a Set acknowledged at a boundary whose hook has not published yet: microseconds).
_CATCH_UP_S = 0.05
_POLL_S = 0.001


class SnapshotReads:
    """This process's snapshot and the reads answered from it (on the server's loop)."""

    def __init__(self, read_shared: Callable[[], tuple[int, int]], ask: Callable[[], None],
                 written: Callable[[int], tuple | None] = lambda newer_than: None) -> None:
        self._read_shared = read_shared
        self._ask = ask  # sends the training process a request for a snapshot
        # A newer versioned part the training process wrote in the shared memory
        # unasked (serving_wire.read_snapshot), if there is one.
        self._written = written
        self.snapshot: ReadSnapshot | None = None
        self._received = 0.0
        self._base: ReadSnapshot | None = None  # holds the static part and the book
        self._reads: Reads | None = None
        self._wanted: asyncio.Future[None] | None = None
        self.off = False  # the job's schedules cannot be evaluated here: forward
        self.answered = 0  # reads answered here (tests, the bench)
        self.requests = RequestCounts()
        self.budget = Budget()
        self.asked = 0

    def received(self, static: bytes | None, versioned: tuple | None) -> int | None:
        """A snapshot frame from the training process; its version stamp (None: none)."""
        version = None
        try:
            if static is not None:
                self._base = ReadSnapshot(pickle.loads(static))  # our parent's, over a socketpair
                self._reads = Reads(self._base)
            if versioned is None:
                self.off = True
            elif self._base is not None:
                self.snapshot = self._base.update(VersionedPart.from_wire(versioned))
                self._received = time.monotonic()
                version = wire.stamp(self.snapshot.loads, self.snapshot.version)
        except Exception:  # a bug: reads go back to being forwarded, the link lives on
            log.exception("lrctl: a read snapshot could not be used; reads are forwarded from now on")
            self.off = True
        wanted, self._wanted = self._wanted, None
        if wanted is not None and not wanted.done():
            wanted.set_result(None)
        return version

    def _take_written(self, have: int) -> None:
        """Take the snapshot the training process wrote in the shared memory, if it is
        newer than `have` and follows the schedules this process has."""
        versioned = self._written(have)
        if versioned is None or self._base is None:
            return
        if VersionedPart.book_start_of(versioned) != len(self._base.book):
            return  # schedules this process has not been sent yet: ask
        self.received(None, versioned)

    async def _fresh(self) -> None:
        """Ask for a snapshot (once for every read waiting meanwhile) and wait for it."""
        if self._wanted is None:
            self._wanted = asyncio.get_running_loop().create_future()
            self.asked += 1
            self._ask()
        try:
            await asyncio.wait_for(asyncio.shield(self._wanted), SNAPSHOT_WAIT_S)
        except asyncio.TimeoutError:
            pass

    async def current(self, acked: int) -> tuple[ReadSnapshot, int] | None:
        """(a snapshot of the published version, no older than `acked`, and the step to
        answer at), or None: forward. Versions here are stamps."""
        for _ in range(2):
            step, published = self._read_shared()
            need = max(published, acked)
            snap = self.snapshot
            if snap is not None and wire.stamp(snap.loads, snap.version) < need:
                self._take_written(wire.stamp(snap.loads, snap.version))
                snap = self.snapshot
            if snap is None or wire.stamp(snap.loads, snap.version) < need:
                await self._fresh()
                if self.off:
                    return None
                step, published = self._read_shared()
                snap = self.snapshot
                if snap is None:
                    return None
            have = wire.stamp(snap.loads, snap.version)
            deadline = self._received + _CATCH_UP_S
            while have > published and time.monotonic() < deadline:
                await asyncio.sleep(_POLL_S)  # the hook that applied it publishes next
                step, published = self._read_shared()
            if have == published and have >= acked:
                return snap, max(step, snap.taken_at_step)
            if have < published:
                continue  # a newer version came meanwhile: once more
            return None
        return None

    async def answer(self, method: str, body: bytes, context: grpc.aio.ServicerContext, acked: int) -> bytes | None:
        """The answer's bytes, or None to forward the call. Errors abort the call with
        the in-process server's status and message (lrctl.server.status)."""
        if self.off:
            return None
        found = await self.current(acked)
        if found is None or self._reads is None:
            return None
        snap, step = found
        reads = self._reads.of(snap.at(step))
        request = lenient_deserializer(REQUESTS[method].FromString)(body)  # type: ignore[arg-type]
        try:
            refuse_undecodable(request, method)
            if reads.is_cheap(request):
                response = reads.answer(request)
            else:
                remaining = context.time_remaining()
                call = CallCheck(None if remaining is None else time.monotonic() + remaining)
                response = await self.budget.run(lambda: reads.answer(request, call.check), call, size=len(body))
        except Exception as exc:  # an LrctlError: its status; a bug: INTERNAL, logged
            code, message = failure_status(exc, method, self.requests)
            self.answered += 1
            await context.abort(code, message)
        self.requests.add(method, "OK")
        self.answered += 1
        return response.SerializeToString()
