"""Bounds of the controller's queue of accepted changes: how far ahead a change may be
due, how many changes and bytes the queue holds, and each connection's and token's share.

Why shares: without them one client fills the queue (1,000 no-wait Sets due at step
2^62) and everyone else gets RESOURCE_EXHAUSTED for the rest of the run. Each
connection (gRPC peer, "ipv4:127.0.0.1:53412"; "local" in process) and each token name
(when the worker has tokens) may hold only part of the queue, so others always find
room, and `lrctl pending --cancel` (CancelChanges) clears what is there.

Bytes are estimated, not measured (measured with tracemalloc, CPython 3.11): a queued
change costs ~2 KB of objects (its event, lock, request), ~90 bytes per name it
touches (a dict entry and an int), ~120 bytes per piecewise schedule point, and its
text (selectors, reason, user, peer, token name); a change that keeps the serving
process's plan (lrctl.server.planned_wire) ~43 bytes more per name, ~60 with pins. A
byte bound never refuses the first change of an empty queue (or of a connection or
token with nothing queued): a change that touches every name of a very large model
must still be possible; the queue then holds that one change, whose size the model
bounds.

Pure Python: no grpc, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from lrctl.common.errors import InvalidArgumentError, ResourceExhaustedError

MIB = 1024 * 1024
_CHANGE_BYTES = 2048
_UPDATE_BYTES = 160
_NAME_BYTES = 90
_POINT_BYTES = 128
_PLAN_BYTES = 512  # a kept plan: its object and arrays
_PLAN_NAME_BYTES = 44  # four doubles a name, measured 42.6 (as history.record_bytes counts a plan)
_PLAN_PIN_BYTES = 16  # two more with pins, measured 59.6 in all
_STRING_BYTES = 50
_CANCEL_HINT = "list them with `lrctl pending` and cancel with `lrctl pending --cancel ID`, or wait for them to apply"


@dataclass(frozen=True)
class QueueLimits:
    """The queue's bounds (attach(queue_limits=...) / Controller(queue_limits=...)).

    `max_steps_ahead`: a change's at_step may be at most this many steps past the next
    step. `max_changes` / `max_bytes`: the whole queue. `*_per_connection` and
    `*_per_token`: one gRPC connection's, and one token name's, share of it.
    """

    max_steps_ahead: int = 1_000_000
    max_changes: int = 1000
    max_bytes: int = 32 * MIB
    max_changes_per_connection: int = 100
    max_bytes_per_connection: int = 8 * MIB
    max_changes_per_token: int = 250
    max_bytes_per_token: int = 16 * MIB

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 0 or (value == 0 and name != "max_steps_ahead"):
                raise ValueError(f"QueueLimits.{name} must be a positive integer, not {value!r}")


def _text_bytes(text: str) -> int:
    # A str holds 1, 2 or 4 bytes a character; non-ASCII counts as the widest.
    return _STRING_BYTES + (len(text) if text.isascii() else 4 * len(text))


def estimate_bytes(request: Any, ops: Mapping[int, Any], plan: Any = None) -> int:
    """About how many bytes a queued change (a ChangeRequest, its per-name ops, and the
    plan it keeps, a lrctl.server.planner.PlannedChange, if any) holds."""
    size = _CHANGE_BYTES + _NAME_BYTES * len(ops)
    if plan is not None:
        per_name = _PLAN_NAME_BYTES + (_PLAN_PIN_BYTES if plan.old_pin is not None else 0)
        size += _PLAN_BYTES + per_name * len(plan.indices)
    for text in (request.reason, request.peer, request.user, request.role, request.token):
        size += _text_bytes(text)
    for update in request.updates:
        size += _UPDATE_BYTES + _text_bytes(update.selector)
    for assignment in request.schedules:
        points = getattr(assignment.schedule, "points", ())
        size += _UPDATE_BYTES * 2 + _text_bytes(assignment.selector) + _POINT_BYTES * len(points)
    return size


def check_horizon(at_step: int | None, next_step: int, limits: QueueLimits) -> None:
    """INVALID_ARGUMENT for an at_step more than max_steps_ahead past the next step."""
    if at_step is not None and at_step - next_step > limits.max_steps_ahead:
        raise InvalidArgumentError(
            f"at_step {at_step} is too far ahead: the next step is {next_step}, and a change "
            f"may be due at most {limits.max_steps_ahead} steps past it (at_step <= "
            f"{next_step + limits.max_steps_ahead}; the worker's max_steps_ahead)"
        )


def mib(size: int) -> str:
    """A byte count for messages: KiB below a MiB, else MiB."""
    return f"{size / 1024:.1f} KiB" if size < MIB else f"{size / MIB:.1f} MiB"


def _this(new: Any) -> str:
    """How a refusal names the change (made only when it refuses: check_room runs in the step hook)."""
    return f"this change (about {mib(new.size)})"


def check_room(queued: Iterable[Any], new: Any, limits: QueueLimits) -> None:
    """Raise ResourceExhaustedError if queueing `new` (a PendingChange) would pass a bound.

    `queued` are the PendingChanges already queued. The message names the quota, its
    size and how to make room.
    """
    peer, token = new.request.peer, new.request.token
    count = size = peer_count = peer_size = token_count = token_size = 0
    for p in queued:
        count += 1
        size += p.size
        if p.request.peer == peer:
            peer_count += 1
            peer_size += p.size
        if token and p.request.token == token:
            token_count += 1
            token_size += p.size
    if peer_count >= limits.max_changes_per_connection:
        raise ResourceExhaustedError(
            f"connection {peer} already has {peer_count} queued changes, its quota "
            f"(max_changes_per_connection {limits.max_changes_per_connection}); {_CANCEL_HINT}")
    if token and token_count >= limits.max_changes_per_token:
        raise ResourceExhaustedError(
            f"token {token!r} already has {token_count} queued changes, its quota "
            f"(max_changes_per_token {limits.max_changes_per_token}); {_CANCEL_HINT}")
    if count >= limits.max_changes:
        raise ResourceExhaustedError(
            f"{count} changes already wait for their step, the most the queue holds "
            f"(max_changes {limits.max_changes}); {_CANCEL_HINT}")
    if peer_count and peer_size + new.size > limits.max_bytes_per_connection:
        raise ResourceExhaustedError(
            f"{_this(new)} would take connection {peer}'s queued changes to about "
            f"{mib(peer_size + new.size)}, over its quota (max_bytes_per_connection "
            f"{mib(limits.max_bytes_per_connection)}); {_CANCEL_HINT}")
    if token_count and token_size + new.size > limits.max_bytes_per_token:
        raise ResourceExhaustedError(
            f"{_this(new)} would take token {token!r}'s queued changes to about "
            f"{mib(token_size + new.size)}, over its quota (max_bytes_per_token "
            f"{mib(limits.max_bytes_per_token)}); {_CANCEL_HINT}")
    if count and size + new.size > limits.max_bytes:
        raise ResourceExhaustedError(
            f"{_this(new)} would take the queue to about {mib(size + new.size)}, over its bound "
            f"(max_bytes {mib(limits.max_bytes)}); {_CANCEL_HINT}")
