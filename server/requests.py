"""Plain data for change requests, independent of gRPC and torch."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import Enum

from lrctl.common.errors import LrctlError


class Mode(Enum):
    """How an update's value is meant."""

    ABSOLUTE = "absolute"
    SCALE = "scale"


@dataclass(frozen=True)
class Update:
    """One entry of a batch: set (or scale) the rate of what `selector` matches."""

    selector: str
    value: float
    mode: Mode = Mode.ABSOLUTE


@dataclass(frozen=True)
class ChangeRequest:
    """A batch of updates and its options, as a handler hands it to the controller."""

    updates: tuple[Update, ...]
    at_step: int | None = None
    expected_version: int | None = None
    reason: str = ""
    peer: str = "local"
    user: str = ""


@dataclass(frozen=True)
class RateChange:
    """One parameter's rate before and after a change."""

    name: str
    old_lr: float
    new_lr: float


@dataclass(frozen=True)
class Outcome:
    """What a change did (or, before it is applied, is expected to do)."""

    change_id: int
    step: int  # -1: the next step boundary, whichever that is
    version: int
    applied: bool
    changes: tuple[RateChange, ...]


@dataclass(eq=False)
class PendingChange:
    """An accepted change waiting for its step boundary.

    `ops` maps a parameter position to its (mode, value); `finished` is set once the
    change is applied, rejected at its step, or withdrawn.
    """

    change_id: int
    request: ChangeRequest
    ops: dict[int, tuple[Mode, float]]
    requested_at: float
    finished: threading.Event = field(default_factory=threading.Event)
    outcome: Outcome | None = None
    error: LrctlError | None = None

    @property
    def due(self) -> int:
        """The step before which it applies; 0 for 'as soon as possible'."""
        return 0 if self.request.at_step is None else self.request.at_step

    def finish(self, outcome: Outcome | None = None, error: LrctlError | None = None) -> None:
        self.outcome, self.error = outcome, error
        self.finished.set()
