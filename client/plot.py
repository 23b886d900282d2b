"""`lrctl plot OUT.png`: the learning rate per name (or per selector) and the loss, over steps.

The rates are rebuilt from the history (lrctl.client.rate_history): from a running
worker (its history, current bases, pins and schedules, and step) or from an audit log
/ exported history file (`--file`, rotated files too). The loss comes from `--metrics
FILE`, NDJSON lines ``{"step": int, "metrics": {"loss": float, ...}}`` (what
`lrctl watch --json` writes), or else from a running worker's ring of recent events
(what the job passed to ``LRControl.report``). matplotlib is imported here only, lazily.

What is drawn:
- names whose rates are equal at every drawn step share one line ("NAME +k same"), so a
  model of many names with a few rate classes stays a few lines;
- `--select SEL`: one line per selector when all its names share their rates; when they
  do not, one line per distinct series ("SEL: NAME +k"), never a mean that no parameter
  had;
- at most `--top N` lines (the most changed first, then by name), with a note on the
  figure and on stderr naming how many were left out;
- a dotted vertical line at each step where a change took effect.
`--csv FILE` writes exactly the points drawn: ``kind,series,step,value`` rows.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from lrctl.client.rate_history import CurrentState, Reconstruction, reconstruct, selector_matches
from lrctl.client.usage import UsageError

MATPLOTLIB_MISSING = "lrctl plot needs matplotlib: pip install 'lrctl[plot]'"
MAX_POINTS = 4000  # steps evaluated per line; change steps are always among them
_READ_ATTEMPTS = 3
MAX_CHANGES_PER_RECORD = 200_000  # the most ListChanges sends per record


@dataclass
class Series:
    """One drawn line: its label, the names it stands for, its values, its changes."""

    label: str
    names: list[str]
    values: list[float]
    changes: int


@dataclass
class PlotData:
    """Everything drawn (and written by --csv)."""

    title: str
    steps: list[int]
    series: list[Series]
    loss: list[tuple[int, float]]
    loss_name: str
    change_steps: list[int]
    notes: list[str]

    @property
    def loss_window(self) -> int:
        """Points in the running mean drawn over a noisy loss (1: none)."""
        return max(1, len(self.loss) // 60)

    def smoothed_loss(self) -> list[tuple[int, float]]:
        """The running mean of the last `loss_window` points, at each point's step."""
        k, total, out = self.loss_window, 0.0, []
        for i, (step, value) in enumerate(self.loss):
            total += value - (self.loss[i - k][1] if i >= k else 0.0)
            out.append((step, total / min(i + 1, k)))
        return out


# -- sources -------------------------------------------------------------------------


def from_worker(client: Any) -> tuple[Reconstruction, int, str]:
    """The reconstruction, the worker's next step, and a title, read from a running worker.

    The current state and the history are read between two status calls and read
    again when a change landed meanwhile, so both describe the same version.
    """
    for _ in range(_READ_ATTEMPTS):
        before = client.status()
        current = {s.name: CurrentState(s.base, s.pin, s.schedule,
                                        f"the adopted torch scheduler {s.adopted}" if s.adopted else s.description)
                   for s in client.get_schedules()}
        # Every name of each change (the worker's default lists the first 1000).
        changes = client.iter_changes(max_changes_per_record=MAX_CHANGES_PER_RECORD)
        records = list(changes)
        after = client.status()
        if after.version == before.version:
            break
    recon = reconstruct(records, current)
    if changes.gap:
        recon.notes.append(f"{changes.dropped} older change(s) were dropped from the worker's "
                           "history: the rates before the first one held are drawn as that "
                           "change found them")
    title = f"{after.optimizer} run {after.run_id[:8]}" if after.run_id else after.optimizer
    return recon, after.step, title


def metrics_from_worker(client: Any, key: str, note: Callable[[str], None],
                        wait: float = 5.0) -> list[tuple[int, float]]:
    """(step, value) of metric `key` from the events a running worker still keeps.

    Reads WatchMetrics from the oldest kept step up to the last step the worker had
    finished when asked (the newest, still open to reports, is left out); a worker that is not stepping (held, or paused) ends the read after `wait`
    seconds with what came. The worker sends a new stream at most one queue of events
    (lrctl.server.watch), so a long ring arrives as its newest part: the note says so.
    """
    from lrctl.client.errors import DeadlineExceededError, OutOfRangeError

    status = client.status()
    if status.oldest_event_step is None:
        return []
    # Step status.step - 1 may still take reports (its event is sealed when the job
    # moves on); the one before it is sealed.
    target = status.step - 2
    points: list[tuple[int, float]] = []
    dropped = 0
    try:
        with client.watch_metrics(from_step=status.oldest_event_step, timeout=wait) as stream:
            for event in stream:
                dropped += event.dropped
                value = event.metrics.get(key)
                if value is not None:
                    points.append((event.step, value))
                if event.step >= target:
                    break
    except (DeadlineExceededError, OutOfRangeError):
        pass  # not stepping, or the ring moved on meanwhile: what came is what there is
    if dropped:
        note(f"the worker sent {key} for its newest steps only ({dropped} older event(s) of its "
             "ring did not fit one stream); `lrctl watch --json > metrics.ndjson` while it trains "
             "keeps every step for --metrics")
    return points


def from_file(path: str, note: Callable[[str], None]) -> tuple[Reconstruction, int, str]:
    """The reconstruction from an audit log / exported history file (and its rotated
    files); the end step is a little past the last change."""
    from lrctl.client.audit_file import read_audit_log
    from lrctl.common.errors import LrctlError

    try:
        records = list(read_audit_log(path, note))
    except LrctlError as err:
        raise UsageError(f"plot: {err}") from None
    applied = [r for r in records if not r.status]
    if not applied:
        raise UsageError(f"plot: no applied change in {path!r}: nothing to draw")
    recon = reconstruct(applied)
    last = applied[-1].step
    end = last + max(1, (last - applied[0].step) // 10) + 1
    return recon, end, os.path.basename(path)


# -- what to draw --------------------------------------------------------------------


def step_grid(first: int, end: int, change_steps: Sequence[int], max_points: int = MAX_POINTS) -> list[int]:
    """Steps first..end-1, thinned to about `max_points`, always holding each change step
    and the step before it (so every jump is drawn where it happened)."""
    if end <= first:
        return [first]
    stride = max(1, math.ceil((end - first) / max_points))
    steps = set(range(first, end, stride))
    steps.add(end - 1)
    for s in change_steps:
        steps.update(x for x in (s - 1, s) if first <= x < end)
    return sorted(steps)


def build_series(recon: Reconstruction, steps: Sequence[int], selectors: Sequence[str], top: int) -> tuple[list[Series], list[str]]:
    """The lines to draw and notes on what was left out."""
    notes = []
    drawable = {n: t for n, t in recon.timelines.items() if not t.problem}
    if not drawable and not selectors:
        why = recon.notes[-1] if recon.notes else "the history names no parameter"
        raise UsageError(f"plot: no rate can be drawn: {why}")
    # Names with the same segments share one computed list: a model of 100k names with
    # a few rate classes costs a few evaluations per step, not 100k.
    by_signature: dict[tuple, list[float]] = {}
    values = {}
    for n, t in drawable.items():
        sig = tuple((seg.start, seg.base, seg.pin, seg.schedule) for seg in t.segments)
        found = by_signature.get(sig)
        if found is None:
            found = by_signature[sig] = t.rates(steps)
        values[n] = found
    changes = {n: len(t.change_steps) for n, t in drawable.items()}
    series: list[Series] = []
    if selectors:
        known = list(recon.timelines)
        for sel in selectors:
            try:
                names = selector_matches(sel, known)
            except Exception as exc:  # a bad regex: its message names it
                raise UsageError(f"plot: {exc}") from None
            if not names:
                raise UsageError(f"plot: selector {sel!r} matches no parameter in the history")
            hidden = [n for n in names if n not in drawable]
            names = [n for n in names if n in drawable]
            if not names:
                first = recon.timelines[hidden[0]]
                raise UsageError(f"plot: selector {sel!r}: nothing to draw: {first.name}: {first.problem}"
                                 + (f" (and {len(hidden) - 1} more)" if len(hidden) > 1 else ""))
            classes = _classes(names, values)
            for members in classes:
                label = sel if len(classes) == 1 else f"{sel}: {_label(members)}"
                series.append(Series(label, members, values[members[0]],
                                     max(changes[m] for m in members)))
            if len(classes) > 1:
                notes.append(f"'{sel}' matches names with {len(classes)} different rate "
                             "series: drawn one line each")
    else:
        for members in _classes(list(drawable), values):
            series.append(Series(_label(members), members, values[members[0]],
                                 max(changes[m] for m in members)))
    if len(series) > top:
        kept = sorted(series, key=lambda s: (-s.changes, s.label))[:top]
        notes.append(f"showing {top} of {len(series)} lines (the most changed); "
                     "use --select or --top for others")
        order = {id(s): i for i, s in enumerate(series)}
        series = sorted(kept, key=lambda s: order[id(s)])
    return series, notes


def _classes(names: Sequence[str], values: dict[str, list[float]]) -> list[list[str]]:
    """Names grouped by identical series, in first-seen order."""
    by_list: dict[int, list[str]] = {}  # shared lists first: cheap
    for n in names:
        by_list.setdefault(id(values[n]), []).append(n)
    groups: dict[tuple[float, ...], list[str]] = {}
    for members in by_list.values():
        groups.setdefault(tuple(values[members[0]]), []).extend(members)
    position = {n: i for i, n in enumerate(names)}
    return [sorted(g, key=position.__getitem__) for g in groups.values()]


def _label(members: Sequence[str]) -> str:
    return members[0] if len(members) == 1 else f"{members[0]} (and {len(members) - 1} more)"


def read_metrics(path: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of metric `key` from NDJSON lines {"step": int, "metrics": {...}};
    lines without it are skipped. UsageError when the file cannot be read or has none."""
    points = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                    step, value = data["step"], data["metrics"].get(key)
                except (ValueError, KeyError, TypeError, AttributeError):
                    raise UsageError(f"plot: line {number} of {path!r} is not "
                                     '{"step": N, "metrics": {...}}') from None
                if value is None or isinstance(step, bool) or not isinstance(step, int):
                    continue
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    points.append((step, float(value)))
    except OSError as exc:
        raise UsageError(f"plot: cannot read the metrics file {path!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"plot: the metrics file {path!r} is not text") from None
    if not points:
        raise UsageError(f"plot: no {key!r} metric in {path!r}")
    return sorted(points)


# -- output --------------------------------------------------------------------------


def write_csv(path: str, data: PlotData) -> None:
    """Every point drawn: kind (lr or the metric's name), series, step, value."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(("kind", "series", "step", "value"))
        for s in data.series:
            # NaN: a step whose rate is not known (not drawn either)
            w.writerows(("lr", s.label, step, repr(v)) for step, v in zip(data.steps, s.values) if v == v)
        w.writerows((data.loss_name, data.loss_name, step, repr(v)) for step, v in data.loss)
        if data.loss_window > 1:
            label = f"{data.loss_name} (mean of {data.loss_window})"
            w.writerows((data.loss_name, label, step, repr(v)) for step, v in data.smoothed_loss())


def draw(path: str, data: PlotData, log_scale: bool = True, dpi: int = 100) -> None:
    """Write the PNG: rates on top (log y by default), the loss below when given."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, whatever the user's default backend
    import matplotlib.pyplot as plt

    rows = 2 if data.loss else 1
    fig, axes = plt.subplots(rows, 1, sharex=True, squeeze=False, figsize=(12, 4.2 + 2.6 * (rows - 1)),
                             gridspec_kw={"height_ratios": [3, 2][:rows]})
    ax = axes[0][0]
    for s in data.series:
        ax.plot(data.steps, s.values, label=s.label, linewidth=1.6, drawstyle="steps-post")
    if log_scale:
        ax.set_yscale("log", nonpositive="mask")
    ax.set_ylabel("learning rate" + (" (log scale)" if log_scale else ""))
    ax.grid(True, which="major", alpha=0.3)
    for i, step in enumerate(data.change_steps):
        for a in (row[0] for row in axes):
            a.axvline(step, color="0.45", linestyle=":", linewidth=0.9,
                      label="change applied" if (i == 0 and a is ax) else None)
    # Outside the axes, on the right: it never hides a line, however long the labels.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", borderaxespad=0.0)
    ax.set_title(f"Learning rates: {data.title}", fontsize="medium")
    if data.notes:
        text = "\n".join(textwrap.fill(f"note: {n}", 150) for n in data.notes)
        ax.annotate(text, (0, 1), xycoords="axes fraction", xytext=(0, 22), textcoords="offset points",
                    va="bottom", fontsize="small", color="0.3")
    if data.loss:
        lx = axes[1][0]
        faint = data.loss_window > 1  # many noisy points: faint, with their running mean on top
        lx.plot([p[0] for p in data.loss], [p[1] for p in data.loss], color="tab:red",
                linewidth=0.8 if faint else 1.2, alpha=0.3 if faint else 1.0, label=data.loss_name)
        if faint:
            mean = data.smoothed_loss()
            lx.plot([p[0] for p in mean], [p[1] for p in mean], color="tab:red", linewidth=1.6,
                    label=f"mean of {data.loss_window}")
        lx.set_ylabel(data.loss_name)
        lx.grid(True, alpha=0.3)
        lx.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", borderaxespad=0.0)
    axes[-1][0].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def matplotlib_missing() -> bool:
    """True when matplotlib cannot be imported (checked before any reading)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return True
    return False


def run(args: argparse.Namespace, client: Optional[Any], note: Callable[[str], None]) -> int:
    """lrctl plot: read, rebuild, draw; `client` None means --file."""
    loss = read_metrics(args.metrics, args.metric) if args.metrics else []
    if client is None:
        recon, end, title = from_file(args.file, note)
    else:
        recon, end, title = from_worker(client)
        if not recon.timelines:
            raise UsageError("plot: the worker reports no parameter")
        if not args.metrics:
            loss = metrics_from_worker(client, args.metric, note)
    first = args.from_step if args.from_step is not None else 0
    if args.to_step is not None:
        end = args.to_step + 1
    if loss and client is None and args.to_step is None:
        end = max(end, loss[-1][0] + 1)
    if end <= first:
        raise UsageError(f"plot: nothing between step {first} and step {end - 1}")
    steps = step_grid(first, end, recon.change_steps)
    series, notes = build_series(recon, steps, args.select or (), args.top)
    loss = [p for p in loss if first <= p[0] < end]
    changes = [s for s in recon.change_steps if first <= s < end]
    if not args.linear and any(v <= 0 for s in series for v in s.values):  # NaN: False
        notes.append("rates of 0 are not drawn on a log axis (--linear draws them)")
    data = PlotData(title, steps, series, loss, args.metric, changes, notes)
    for text in [*recon.notes, *notes]:
        note(text)
    if args.csv:
        try:
            write_csv(args.csv, data)
        except OSError as exc:
            raise UsageError(f"plot: cannot write {args.csv!r}: {exc.strerror}") from None
    try:
        draw(args.out, data, log_scale=not args.linear, dpi=args.dpi)
    except OSError as exc:
        raise UsageError(f"plot: cannot write {args.out!r}: {exc.strerror}") from None
    print(f"wrote {args.out}: {len(series)} line(s), steps {steps[0]}..{steps[-1]}, "
          f"{len(changes)} change step(s)" + (f", {len(loss)} {args.metric} point(s)" if loss else ""))
    return 0
