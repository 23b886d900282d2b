"""The frames between the training process and its serving process (serving="process").

Imports neither grpc nor torch: both ends use it. One socketpair carries everything;
a frame is a 4-byte big-endian length and a `marshal`-encoded tuple (C-speed, and both
ends are the same interpreter: the serving process is started with sys.executable).
The first tuple element says what the frame is:

serving -> training
  ("S", id, method, metadata, peer, remaining s or -1.0, request bytes or None)
        a call starts (None: a request stream follows as "m" frames, then "h")
  ("m", id, request bytes)      a message of a call's request stream
  ("h", id)                     the client ended its request stream
  ("C", id)                     the client went away (cancelled, or its deadline passed)
  ("R", host, port, address) / ("F", kind, message)   started / could not start (once)
  ("N", 0)                      send a read snapshot (lrctl.server.serving_reads)
  ("W", id, from_step or None, changes_only, include_stats, per_record, *config)
                                a WatchMetrics stream opens: turn the feed on with `config`
                                (as "w") and send the stream's start ("B", or "E": refused)
  ("w", streams, any wants stats, per-record limits)   the streams changed (0: feed off)
  ("D", id, method, peer, remaining s or -1.0, planned)   a write planned here
                                (lrctl.server.serving_writes; `planned` is
                                lrctl.server.planned_wire.planned_to_wire's tuple): queue it
                                if the version is still the planned one, else plan it again
training -> serving
  ("H", id, metadata)           the call's initial metadata (Lockstep)
  ("M", id, response bytes)     a message of a call's response stream
  ("A", id, change id)           a planned write that does not wait was queued as planned
  ("E", id, code, details, response bytes or None, version)   the call ends with status
                                `code`; `version` >= 0: a CACHEABLE read's answer, valid
                                while the published version is this one (see below)
  ("Q", grace s)                stop serving: drain for `grace` s, then exit
  ("P", static or None, versioned or None)   a read snapshot: the pickled static part
                                (the first time, and again when a parameter's
                                requires_grad changed) and the versioned part as a plain
                                tuple (lrctl.server.read_model); versioned None: reads cannot
                                be answered from a snapshot in this job (forward them)
  ("B", id, cursor seq, dropped, events, ended)   a stream's start (lrctl.server.watch_feed)
The very first frame, training -> serving, is the pickled configuration (address,
tokens, TLS): it goes over the socket, never through argv or the environment.

The feed, a second socketpair, carries the telemetry events for WatchMetrics, training
-> serving, in frames of the same form (lrctl.server.watch_feed), once for all streams:
  (seq, step, time, version, {metric: value}, has stats, size,
   {per_record: change records bytes}, statistics bytes)   an event (also in "B")
  (next seq,)                   the telemetry closed: the streams end after the events

Besides the socket, the training process publishes its step counter and config version
in a few bytes of shared memory (a memfd), written by a step pre-hook that runs after
lrctl's own: the serving process answers a repeated read from the answer it kept, for
as long as the version it was computed at is the one in force (and no schedule moves
rates with the step), with the step brought up to date, without the training process.
The serving process writes there too: counters of the calls it answered itself
(count_answered), which the training process adds to lrctl_requests_total. Past
those, the training process writes each new version's read snapshot (write_snapshot)
for the serving process to take without asking. A second memfd holds the changes the
serving process queued itself, and the change id counter (lrctl.server.posted_writes).
"""

from __future__ import annotations

import asyncio
import marshal
import socket
import struct
import zlib
from typing import Any

LEN = struct.Struct("!I")
# A frame carries one request or one response: gRPC's own limits keep those small,
# and a frame past this is a bug or a corrupt stream (the link ends).
MAX_FRAME = 256 * 1024 * 1024
NO_DEADLINE_S = 1e7  # grpc reports "no deadline" as ~infinite time left

STARTED, FAILED = "R", "F"
CALL, REQUEST, HALF_CLOSE, CANCEL = "S", "m", "h", "C"
INITIAL_METADATA, RESPONSE, END, QUIT = "H", "M", "E", "Q"
SNAPSHOT_WANTED, SNAPSHOT = "N", "P"
WATCH, WATCH_CONFIG, WATCH_START = "W", "w", "B"
PLANNED, ACCEPTED = "D", "A"
WATCH_METHOD = "/lrctl.v1.LearningRateControl/WatchMetrics"
WATCH_BATCHED_METHOD = "/lrctl.v1.LearningRateControl/WatchMetricsBatched"


def pack(frame: tuple[Any, ...]) -> bytes:
    body = marshal.dumps(frame)
    return LEN.pack(len(body)) + body


def pack_raw(body: bytes) -> bytes:
    return LEN.pack(len(body)) + body


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """n bytes from a blocking socket, or None at end of stream."""
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_raw_blocking(sock: socket.socket) -> bytes | None:
    """One frame's body read with blocking calls, never a byte past it (the socket is
    handed to asyncio afterwards); None at end of stream."""
    head = recv_exact(sock, LEN.size)
    if head is None:
        return None
    (n,) = LEN.unpack(head)
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes")
    return recv_exact(sock, n)


async def read_frame(reader: asyncio.StreamReader) -> tuple[Any, ...] | None:
    """The next frame, or None at end of stream."""
    try:
        head = await reader.readexactly(LEN.size)
        (n,) = LEN.unpack(head)
        if n > MAX_FRAME:
            return None
        return marshal.loads(await reader.readexactly(n))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


# -- the published step and version (shared memory, written by the training process) --
# Each value carries a check word computed from it, and a reader takes only what
# matches its check. Not a sequence counter around the writes: on a CPU that may make
# stores visible out of order (aarch64), another process can see the counter's last
# store before the data's, and Python has no memory barrier to put between them. A
# check holds on any CPU. One writer at a time (a lock in the training process). The
# version published is a stamp (below).
# The step is written to two slots in turn, then the index of the one written: a
# reader takes the indexed slot, or the other one (the value before) while the
# indexed one does not match its check yet. So a reader never waits for a writer, not
# even one the OS stopped half-way through a write for a time slice (with one slot,
# a reader spun that long), nor one killed there (its last whole value stays).
# The check is the hash of the (step, stamp) tuple: of ints, the same in every process
# of this interpreter whatever PYTHONHASHSEED, and cheaper on the training thread,
# every step, than a CRC (zlib's code and tables, cold after backward: +8 us).
SHARED = struct.Struct("<qqq")  # step, version stamp, check
SHARED_SLOTS = (8, 32)  # the two slots' offsets; the index of the last written is at 0
_VERSION_LENGTH = struct.Struct("<qq")
# A read snapshot's versioned part, written by the training process itself (see
# write_snapshot) from SNAPSHOT_AT on: the rest of the shared memory.
SNAPSHOT_AT = 4096
SNAPSHOT_HEAD = struct.Struct("<qqI")  # version stamp, body length, CRC-32 of both and the body
_Q = struct.Struct("<q")
SHARED_BYTES = SNAPSHOT_AT + 512 * 1024
# How often a reader of the step reads again when neither slot matches its check
# before it gives up: only damaged memory leaves both so.
_TRIES = 1000
# The reads whose answers the serving process may keep for the version they were
# computed at (their rates do not depend on the step when no schedule is in force), and
# whether the answer carries a `step` field to bring up to date. (A parameter's
# requires_grad can change without a new version: the training process then sends a
# snapshot with a new static part, which empties the kept answers too.)
CACHEABLE = {
    "/lrctl.v1.LearningRateControl/GetLearningRates": True,
    "/lrctl.v1.LearningRateControl/GetSchedules": True,
    "/lrctl.v1.LearningRateControl/ListParameters": False,
}
WRITES = ("/lrctl.v1.LearningRateControl/SetLearningRates",
          "/lrctl.v1.LearningRateControl/SetSchedules",
          "/lrctl.v1.LearningRateControl/ClearSchedules")


# The methods the serving process may answer itself: snapshot reads
# (lrctl.server.serving_reads), writes planned or refused there
# (lrctl.server.serving_writes), and the WatchMetrics streams (they live there).
ANSWERED = (*WRITES, *CACHEABLE, WATCH_METHOD, WATCH_BATCHED_METHOD)
# Calls of ANSWERED that the serving process answered itself, by method and status
# code: counters at COUNTS_AT, written by the serving process only (one writer at a
# time), read by the training process for lrctl_requests_total. (A frame per call would
# cost the training process a wakeup of its loop, ~50 us, for a call it never saw.)
COUNTS_AT = 64
# gRPC status codes by their value.
CODE_NAMES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
              "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
              "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
              "UNAUTHENTICATED")
_COUNTER = struct.Struct("<q")
assert COUNTS_AT + len(ANSWERED) * len(CODE_NAMES) * _COUNTER.size <= SNAPSHOT_AT


def _counter_at(method: str, code: str) -> int:
    return COUNTS_AT + (ANSWERED.index(method) * len(CODE_NAMES) + CODE_NAMES.index(code)) * 8


def count_answered(buffer: Any, method: str, code: str) -> None:
    """One more call of `method` (one of ANSWERED) answered with `code` (a status name)."""
    at = _counter_at(method, code)
    _COUNTER.pack_into(buffer, at, _COUNTER.unpack_from(buffer, at)[0] + 1)


def read_answered(buffer: Any) -> dict[tuple[str, str], int]:
    """(method without its leading "/", code name) -> calls, as RequestCounts keys them."""
    out = {}
    for method in ANSWERED:
        for code in CODE_NAMES:
            n = _COUNTER.unpack_from(buffer, _counter_at(method, code))[0]
            if n:
                out[(method.lstrip("/"), code)] = n
    return out


_LOADS_SHIFT = 40  # versions stay far below 2**40


def stamp(loads: int, version: int) -> int:
    """A config version as the two processes compare it: the controller's checkpoint
    loads in the high bits. A load may bring back a number this run used for another
    state (the checkpoint's version), so a number alone names one state only between
    two loads; a stamp names one for the whole run, and only grows."""
    return (loads << _LOADS_SHIFT) | version


def stamp_loads(value: int) -> int:
    """The loads of a stamp."""
    return value >> _LOADS_SHIFT


class TornError(RuntimeError):
    """The published step never matched its check in either slot: the shared memory
    was damaged."""


def read_shared(buffer: Any) -> tuple[int, int]:
    """(step, version stamp) as last published (or the value before, while the last is
    not wholly visible yet); TornError if neither can be read."""
    for _ in range(_TRIES):
        last = _Q.unpack_from(buffer, 0)[0]
        for slot in (last, 1 - last) if last in (0, 1) else ():
            step, version, check = SHARED.unpack_from(buffer, SHARED_SLOTS[slot])
            if hash((step, version)) == check:
                return step, version
    raise TornError("the training process's published step could not be read (its shared memory is damaged)")


# The controller is closing (no change is accepted): set once, by the training process.
CLOSING_AT = 56
assert SHARED_SLOTS[1] + SHARED.size <= CLOSING_AT and CLOSING_AT + _Q.size <= COUNTS_AT


def set_closing(buffer: Any) -> None:
    _Q.pack_into(buffer, CLOSING_AT, 1)


def read_closing(buffer: Any) -> bool:
    return _Q.unpack_from(buffer, CLOSING_AT)[0] != 0


def write_shared(buffer: Any, step: int, version: int) -> None:
    """Publish (step, version stamp) for read_shared (the step hook, every step)."""
    slot = 1 - _Q.unpack_from(buffer, 0)[0]  # the one a reader is not sent to
    SHARED.pack_into(buffer, SHARED_SLOTS[slot], step, version, hash((step, version)))
    _Q.pack_into(buffer, 0, slot)


def _snapshot_check(version: int, body: bytes) -> int:
    return zlib.crc32(body, zlib.crc32(_VERSION_LENGTH.pack(version, len(body))))


def write_snapshot(buffer: Any, version: int, versioned: tuple) -> bool:
    """Put a read snapshot's versioned part (read_model.VersionedPart.to_wire()) of
    version stamp `version` where the serving process finds it without asking (with
    a check, as the step's; one writer at a time); False if it does not fit."""
    body = marshal.dumps(versioned)
    start = SNAPSHOT_AT + SNAPSHOT_HEAD.size
    if start + len(body) > len(buffer):
        return False
    buffer[start:start + len(body)] = body
    SNAPSHOT_HEAD.pack_into(buffer, SNAPSHOT_AT, version, len(body), _snapshot_check(version, body))
    return True


def read_snapshot(buffer: Any, newer_than: int) -> tuple | None:
    """The versioned part written by write_snapshot, if its version stamp is newer than
    `newer_than`; else None (also when it does not match its check: the serving
    process then asks for the snapshot over the link)."""
    start = SNAPSHOT_AT + SNAPSHOT_HEAD.size
    limit = len(buffer) - start
    for _ in range(100):  # a writer stopped half-way: ask instead
        version, n, check = SNAPSHOT_HEAD.unpack_from(buffer, SNAPSHOT_AT)
        if version <= newer_than or n <= 0:  # n 0: none written yet
            return None
        body = bytes(buffer[start:start + min(n, limit)])
        if _snapshot_check(version, body) == check:
            return marshal.loads(body)
    return None


class FrameProtocol(asyncio.Protocol):
    """Frames from a stream socket, handed to `on_frame` as they complete (several per
    wakeup when they come together: less Python per frame than a StreamReader);
    `on_end` once the stream ends. `send` writes one frame."""

    def __init__(self, on_frame: Any, on_end: Any) -> None:
        self._on_frame, self._on_end = on_frame, on_end
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def send(self, frame: tuple[Any, ...]) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(pack(frame))

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        pos, end = 0, len(buffer)
        while end - pos >= LEN.size:
            (n,) = LEN.unpack_from(buffer, pos)
            if n > MAX_FRAME:  # a corrupt stream: end the link
                if self.transport is not None:
                    self.transport.close()
                else:  # read by hand (lrctl.server.feed_reader)
                    self._on_end()
                return
            if end - pos - LEN.size < n:
                break
            start = pos + LEN.size
            frame = marshal.loads(buffer[start:start + n])
            pos = start + n
            self._on_frame(frame)
        del buffer[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_end()
