"""Telemetry: the metrics a training job reports, one event per step, in a bounded ring.

The training thread fills events (``LRControl.report``, the step hooks, the change
records of each step, the per-parameter statistics of lrctl.server.param_stats); the
serving side reads them (lrctl.server.watch fans them out to WatchMetrics subscribers).

An event is *open* while the training thread may still add to it, and *sealed* (put in
the ring and published) once the job has moved past its step: when something arrives
for a later step (a report, the step hook of the next step) or when lrctl closes. So a
subscriber sees the event of step S at the boundary of step S+1, with everything
reported for S, whether ``report()`` came before or after ``optimizer.step()``.

Cost on the training thread: a report is a dict update under an uncontended lock;
tensors are kept detached, never converted there (``.item()`` would wait for the
device). They become floats lazily: when a subscriber reads the event (on the serving
thread), or when more than `raw_window` sealed events hold tensors, the older half of
them at once (one read per device, by when the device finished that work long ago).
Sealing wakes the serving side at most once until it has run (and not at all without
subscribers).

Pure Python plus torch; no grpc.
"""

from __future__ import annotations

import numbers
import threading
import time
from collections import deque
from typing import Any, Callable, Mapping

import torch

from lrctl.server.history import Record

MAX_METRIC_NAME = 64
MAX_METRICS_PER_REPORT = 64
MAX_METRICS_PER_EVENT = 128
DEFAULT_RING_EVENTS = 4096
DEFAULT_RING_BYTES = 32 * 1024 * 1024
DEFAULT_RAW_WINDOW = 64
# Bytes an event holds besides its parts (object, dicts), a metric (key, value,
# dict slot; a tensor's Python object), measured roughly with tracemalloc; from above.
_EVENT_BYTES = 400
_METRIC_BYTES = 160
_REF_BYTES = 8


def check_metric_name(name: Any) -> str:
    """`name` if it is a usable metric name, else ValueError naming it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"metric name {name!r} must be a non-empty string")
    if len(name) > MAX_METRIC_NAME:
        raise ValueError(f"metric name {name[:80]!r} is {len(name)} characters long; at most {MAX_METRIC_NAME}")
    if not name.isprintable() or any(c.isspace() for c in name):
        raise ValueError(f"metric name {name!r} has a space or a character that is not printable")
    return name


def check_metric_value(name: str, value: Any) -> float | torch.Tensor:
    """A float, or a detached 0-dim tensor (converted later); ValueError naming `name`
    for anything else. NaN and inf are values like any other."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"metric {name!r}: a tensor value must be 0-dimensional (a scalar), "
                             f"not of shape {tuple(value.shape)}")
        if value.is_complex():
            raise ValueError(f"metric {name!r}: a complex tensor is not a scalar metric")
        return value.detach()
    if isinstance(value, numbers.Real):
        return float(value)
    raise ValueError(f"metric {name!r}: {type(value).__name__} {value!r:.60} is not a number "
                     "(float, int, bool or a 0-dim tensor)")


def reportable(key: Any, value: Any) -> Any:
    """`value` as a trainer integration may report it under `key` (a one-element tensor
    as a detached 0-dim one), or None when the pair is no scalar metric (strings, lists,
    bools, a name lrctl refuses): trainers log such things beside their numbers, and
    those are skipped rather than refused."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return None
        value = value.detach().reshape(())
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        check_metric_name(key)
    except ValueError:
        return None
    return value


# Names that passed check_metric_name: a job reports the same few every step, and on
# the training thread, right after backward, even a character loop costs ~10 us (cold
# caches). Bounded: a job that invents names forever checks the new ones each time.
_KNOWN_NAMES: set[str] = set()
_KNOWN_NAMES_MAX = 1024


def check_metrics(scalars: Mapping[str, Any]) -> dict[str, float | torch.Tensor]:
    """Validate one report's scalars (names, values, how many)."""
    if len(scalars) > MAX_METRICS_PER_REPORT:
        raise ValueError(f"{len(scalars)} metrics in one report; at most {MAX_METRICS_PER_REPORT}")
    known = _KNOWN_NAMES
    out: dict[str, float | torch.Tensor] = {}
    for name, value in scalars.items():
        if type(name) is not str or name not in known:  # not str: may equal a known one
            check_metric_name(name)
            if len(known) < _KNOWN_NAMES_MAX:
                known.add(name)
        out[name] = check_metric_value(name, value)
    return out


def _as_float(value: float | torch.Tensor) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else value


class Event:
    """What happened at one step: reported metrics, applied or failed change records,
    the config version after the step boundary, per-parameter statistics if due.

    `seq` numbers events in order of sealing (the ring's and subscribers' cursor).
    Read `metrics()` and `stats()` for plain floats (they convert tensors once)."""

    __slots__ = ("seq", "step", "time", "version", "_metrics", "_stats", "changes", "size", "lazy")

    def __init__(self, step: int, version: int) -> None:
        self.seq = 0
        self.step = step
        self.time = time.time()
        self.version = version
        self._metrics: dict[str, Any] = {}
        self._stats: Any = None  # a ParameterStats (lazy) or a dict, or None
        self.changes: list[Record] = []
        self.size = _EVENT_BYTES
        self.lazy = False  # holds tensors (metrics or statistics) not converted yet

    def metrics(self) -> dict[str, float]:
        """name -> value (tensors converted now, once)."""
        current = self._metrics
        if self.lazy and any(isinstance(v, torch.Tensor) for v in current.values()):
            current = {k: _as_float(v) for k, v in current.items()}
            self._metrics = current  # one assignment: a reader on another thread sees either
        return current

    def stats(self) -> dict[str, dict[str, float]] | None:
        """unit (name or group) -> statistic -> value, or None when none were due."""
        current = self._stats
        if current is not None and not isinstance(current, dict):
            current = current.resolve()
            self._stats = current
        return current

    @property
    def has_stats(self) -> bool:
        return self._stats is not None

    def on_device(self, stats: bool) -> bool:
        """True if converting its metrics (and its statistics, if `stats`) would read a
        tensor off a device that is not the CPU, i.e. wait for that device."""
        if not self.lazy:
            return False
        if any(isinstance(v, torch.Tensor) and not v.is_cpu for v in self._metrics.values()):
            return True
        current = self._stats
        return stats and current is not None and not isinstance(current, dict) and current.on_device()


def _resolve_all(events: list[Event]) -> None:
    """Convert the events' tensors to floats (the device has finished by now): one
    stack and read per device and dtype for all of them."""
    metrics = [(e, e._metrics) for e in events if e.lazy]
    tensors = [v for _, m in metrics for v in m.values() if isinstance(v, torch.Tensor)]
    values = iter(_floats(tensors))
    for event, current in metrics:
        # From the dict read above: a reader that converted it meanwhile got the same.
        if any(isinstance(v, torch.Tensor) for v in current.values()):
            event._metrics = {k: next(values) if isinstance(v, torch.Tensor) else v for k, v in current.items()}
        event.stats()
        event.lazy = False


def _floats(tensors: list[torch.Tensor]) -> list[float]:
    """0-dim tensors as floats, in order."""
    if len(tensors) <= 1:
        return [_as_float(t) for t in tensors]
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    out = [0.0] * len(tensors)
    for positions in groups.values():
        for i, value in zip(positions, torch.stack([tensors[i] for i in positions]).tolist()):
            out[i] = float(value)
    return out


class Telemetry:
    """The ring of sealed events and the open one (see the module docstring).

    Bounds: `max_events` events and `max_bytes` of them (estimated, from above; the
    newest is always kept). `raw_window`: how many sealed events may keep unconverted
    tensors (the newest ones: past it, the older half is converted at once). `wake`,
    when set, is called (from the training thread) once after events were sealed and
    not again until the serving side calls `woken()`.
    """

    def __init__(self, max_events: int = DEFAULT_RING_EVENTS, max_bytes: int = DEFAULT_RING_BYTES,
                 raw_window: int = DEFAULT_RAW_WINDOW) -> None:
        if max_events < 1 or max_bytes < 1 or raw_window < 0:
            raise ValueError(f"bad telemetry bounds: max_events={max_events}, max_bytes={max_bytes}, "
                             f"raw_window={raw_window}")
        self.max_events, self.max_bytes, self.raw_window = max_events, max_bytes, raw_window
        self._lock = threading.Lock()
        self._ring: deque[Event] = deque()
        self._raw: deque[Event] = deque()  # sealed events that may hold tensors, oldest first
        self.bytes = 0
        self.dropped = 0  # events that left the ring
        self._open: Event | None = None
        self._next_seq = 1
        self._version = 0
        self.closed = False
        self.wake: Callable[[], None] | None = None
        self._wake_pending = False
        self._sealed = False  # sealed since the last wake
        self.last_metrics: dict[str, Any] = {}  # the newest value of each metric (Prometheus)

    # -- the training thread ---------------------------------------------------------
    def report(self, step: int, metrics: dict[str, float | torch.Tensor]) -> None:
        """Add validated metrics to the event of `step` (later values of a name win).
        `metrics` is the telemetry's from now on (check_metrics made it): the step's
        first report keeps it as the event's, without a copy."""
        with self._lock:
            event = self._open
            if event is None or event.step != step:
                event = self._event_for(step)
            current = event._metrics
            if current:
                merged = {**current, **metrics}
                added = [k for k in metrics if k not in current]
            else:
                merged = added = metrics  # type: ignore[assignment]
            if len(merged) > MAX_METRICS_PER_EVENT:
                raise ValueError(f"step {step} would have {len(merged)} metrics; at most "
                                 f"{MAX_METRICS_PER_EVENT} a step")
            event.size += _METRIC_BYTES * len(added) + sum(map(len, added))
            event._metrics = merged
            if not event.lazy:
                for v in metrics.values():
                    if isinstance(v, torch.Tensor):
                        event.lazy = True
                        break
            self._done(event)
            last = self.last_metrics
            if len(last) + len(metrics) <= MAX_METRICS_PER_EVENT or last.keys() >= metrics.keys():
                last.update(metrics)
            else:  # bounded: a job that invents names forever
                for k, v in metrics.items():
                    if k in last or len(last) < MAX_METRICS_PER_EVENT:
                        last[k] = v
        if self.wake is not None:
            self._maybe_wake()

    def step(self, step: int, version: int) -> None:
        """The step hook of `step`: earlier events are sealed; this step's is open."""
        # Every step comes here: kept to a few attribute reads when nothing is new.
        with self._lock:
            self._version = version
            event = self._open
            if event is None or event.step != step:
                event = self._event_for(step)
                self._done(event)
            event.version = version
        if self.wake is not None:
            self._maybe_wake()

    def add_stats(self, step: int, stats: Any, size: int) -> None:
        """Attach per-parameter statistics (a lazy object with resolve()) to `step`."""
        with self._lock:
            event = self._event_for(step)
            event._stats = stats
            event.lazy = True
            event.size += size
            self._done(event)
        self._maybe_wake()

    def add_change(self, record: Record) -> None:
        """A change record (applied, or failed) of record.step, as History.append
        returned it (its size counted there); from any thread."""
        with self._lock:
            self._version = max(self._version, record.version)
            event = self._event_for(record.step)
            event.changes.append(record)
            event.version = max(event.version, record.version)
            event.size += _REF_BYTES + record.size
            self._done(event)
        self._maybe_wake()

    def seal_open(self) -> None:
        """A checkpoint load: seal the open event, so that the loaded step's events start
        afresh. (A load to an earlier step would otherwise make every later step's event a
        late one, twice, and leave the open one to take reports of two timelines.)"""
        with self._lock:
            self._seal_open()
        self._maybe_wake()

    def close(self) -> None:
        """Seal the open event; the stream ends after it."""
        with self._lock:
            self._seal_open()
            self.closed = True
            self._wake_pending = False
        self._maybe_wake(force=True)

    # -- internals (lock held) ---------------------------------------------------------
    def _event_for(self, step: int) -> Event:
        event = self._open
        if event is not None and event.step == step:
            return event
        if event is not None and step < event.step:
            # Something for a step already passed (e.g. an explicit step= after a later
            # one): an event of its own, sealed by the caller (_done) once filled.
            return Event(step, self._version)
        if event is not None:
            self._seal(event)
        self._open = event = Event(step, self._version)
        return event

    def _seal_open(self) -> None:
        if self._open is not None:
            self._seal(self._open)
            self._open = None

    def _done(self, event: Event) -> None:
        """Seal a late event (not the open one) once its caller has filled it."""
        if event is not self._open:
            self._seal(event)

    def _seal(self, event: Event) -> None:
        event.seq = self._next_seq
        self._next_seq += 1
        ring = self._ring
        ring.append(event)
        self.bytes += event.size
        while len(ring) > 1 and (len(ring) > self.max_events or self.bytes > self.max_bytes):
            self.bytes -= ring.popleft().size
            self.dropped += 1
        if event.lazy:
            raw = self._raw
            raw.append(event)
            if len(raw) > self.raw_window:
                # Half the window at once: a job reporting a tensor loss pays one read of
                # the device per raw_window/2 steps, not one .item() per step (~15 us on
                # the training thread right after backward, with cold caches).
                keep = self.raw_window // 2
                _resolve_all([raw.popleft() for _ in range(len(raw) - keep)])
        self._sealed = True

    def _maybe_wake(self, force: bool = False) -> None:
        wake = self.wake
        if wake is None or (self._wake_pending and not force):
            return
        if not force and not self._sealed:
            return
        self._sealed = False
        self._wake_pending = True
        try:
            wake()
        except RuntimeError:  # the serving loop is closed: nobody listens any more
            self.wake = None

    # -- the serving side --------------------------------------------------------------
    def woken(self) -> None:
        """The serving side has run: the next sealing wakes it again."""
        self._wake_pending = False

    def after(self, seq: int) -> tuple[list[Event], int]:
        """Sealed events with seq > `seq`, oldest first, and how many such were dropped."""
        with self._lock:
            ring = self._ring
            if not ring:
                return [], max(0, self._next_seq - 1 - seq)
            first = ring[0].seq
            start = max(0, seq + 1 - first)
            missed = max(0, first - seq - 1)
            return [ring[j] for j in range(start, len(ring))], missed

    def from_step(self, step: int) -> tuple[list[Event], int] | None:
        """Sealed events from the first with a step >= `step` on, and the seq before
        them; None if events of that step may have left the ring already."""
        with self._lock:
            ring = self._ring
            if self.dropped and ring and step < ring[0].step:
                return None
            for j, event in enumerate(ring):
                if event.step >= step:
                    return [ring[k] for k in range(j, len(ring))], event.seq - 1
            return [], self._next_seq - 1

    @property
    def last_seq(self) -> int:
        with self._lock:
            return self._next_seq - 1

    def oldest_step(self) -> int | None:
        with self._lock:
            return self._ring[0].step if self._ring else None

    def newest_step(self) -> int | None:
        with self._lock:
            if self._open is not None:
                return self._open.step
            return self._ring[-1].step if self._ring else None

    def last_values(self) -> dict[str, float]:
        """The newest value of each reported metric (a read converts tensors once)."""
        with self._lock:
            values = dict(self.last_metrics)
        return {k: _as_float(v) for k, v in values.items()}
