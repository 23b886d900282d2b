"""The `lrctl` command line: a small layer on LRClient.

Exit codes (also shown by `lrctl --help`):

    0    ok
    1    internal or unexpected error (a bug; the worker's INTERNAL/UNKNOWN too)
    2    usage error (bad option, malformed NAME=VALUE)
    3    cannot connect to the worker (UNAVAILABLE)
    4    request rejected (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, and any
         other gRPC status not listed here)
    5    not authorized (UNAUTHENTICATED, PERMISSION_DENIED)
    6    timed out (DEADLINE_EXCEEDED; a waiting set was withdrawn, not applied)
    lrctl health: 0 SERVING, 1 NOT_SERVING (or another non-serving status), 3 unreachable
    130  interrupted (Ctrl-C)
    141  output pipe closed (e.g. `lrctl list | head`)

Every error is one line on stderr, "lrctl: error: <message>", never a traceback
(set LRCTL_DEBUG=1 to get the traceback of an unexpected error).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any, Optional

if not os.environ.get("LRCTL_DEBUG"):
    # grpc's C core logs each failed TLS handshake on stderr at INFO level, beside the
    # CLI's one line saying what to fix. It reads this when grpc is imported, which is
    # why lrctl.client imports lazily and this comes before the imports below.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from lrctl.client.client import ADDRESS_ENV, LRClient, default_address, read_token_file
from lrctl.client.errors import LrctlError, NotFoundError, TLSError, UnavailableError
from lrctl.client.types import (
    ChangeRecord,
    LearningRate,
    ParameterInfo,
    PendingChange,
    RateChange,
    ScheduleAssignment,
    SetResult,
    Status,
    Update,
)
from lrctl.common.schedules import KINDS, parse_schedule
from lrctl.client.usage import OneLineParser, UsageError

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_REJECTED = 4
EXIT_UNAUTHORIZED = 5
EXIT_TIMEOUT = 6
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

_EXIT_BY_CODE: dict[str, int] = {  # keyed by status name (LrctlError.code)
    "UNAVAILABLE": EXIT_UNAVAILABLE,
    "UNAUTHENTICATED": EXIT_UNAUTHORIZED,
    "PERMISSION_DENIED": EXIT_UNAUTHORIZED,
    "DEADLINE_EXCEEDED": EXIT_TIMEOUT,
    "INTERNAL": EXIT_INTERNAL,
    "UNKNOWN": EXIT_INTERNAL,
    "DATA_LOSS": EXIT_INTERNAL,  # applied, but not in the audit log: the message says so
}

EXIT_CODES_HELP = """\
exit codes:
  0    ok
  1    internal or unexpected error
  2    usage error
  3    cannot connect to the worker (UNAVAILABLE)
  4    request rejected (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ...)
  5    not authorized (UNAUTHENTICATED, PERMISSION_DENIED)
  6    timed out (DEADLINE_EXCEEDED: a waiting set was withdrawn, not applied)
  130  interrupted
  lrctl health: 0 SERVING, 1 NOT_SERVING, 3 unreachable

environment:
  LRCTL_ADDRESS     worker address when --address is not given (default 127.0.0.1:50051)
  LRCTL_TOKEN       the worker's bearer token (or LRCTL_TOKEN_FILE: a file holding it)
  LRCTL_TLS_CA, LRCTL_TLS_CERT, LRCTL_TLS_KEY, LRCTL_TLS_SERVER_NAME
                    defaults of --tls-ca, --tls-cert, --tls-key, --tls-server-name
"""

SCHEDULE_KINDS_HELP = """\
kinds and their KEY=VALUE options (rate = base x factor(step)):
  constant
  warmup        warmup_steps=N [decay=constant|linear|cosine total_steps=N
                start_factor=F final_factor=F num_cycles=F]
  step          gamma=F step_size=N | milestones=N,N,...
  exponential   gamma=F
  inverse_time  [gamma=F]                 rate = base / (1 + gamma x step)
  one_cycle     total_steps=N [pct_start=F div_factor=F final_div_factor=F
                anneal=cos|linear three_phase=true]   base is the peak rate
  piecewise_linear points=STEP:FACTOR,STEP:FACTOR,...

example: lrctl schedule set 'encoder.*' warmup warmup_steps=100 decay=cosine total_steps=10000
"""

_DEMO_MISSING = "lrctl demo needs the worker extra: pip install 'lrctl[worker]'"
# Top-level modules that only the worker extra installs (see pyproject.toml).
_WORKER_EXTRA_MODULES = frozenset({"torch", "numpy", "regex", "grpc_health", "grpc_reflection"})


# -- output helpers ------------------------------------------------------------------


def _printable(text: str) -> str:
    """`text` with control characters (ESC, BEL, CR, C1 codes, ...) shown as escapes:
    selectors, reasons and user names come from any client, and must not drive the
    terminal of whoever reads them."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces, with a header row."""
    cells = [list(map(str, headers))] + [[_printable(str(c)) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)
    return "\n".join(lines)


def _print_json(value: Any) -> None:
    if isinstance(value, list):
        # One element a line: readable, greppable, and json's C encoder does the work
        # (indent= would use the pure-Python one: 17 s for 100k parameters, not 2 s).
        print("[\n" + ",\n".join("  " + json.dumps(v) for v in value) + "\n]" if value else "[]")
    else:
        print(json.dumps(value, indent=2))


def _fmt_lr(lr: Optional[float]) -> str:
    # repr() gives the shortest string that reads back as the same double.
    return "-" if lr is None else repr(lr)


def _fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) if shape else "()"


def _param_note(p: ParameterInfo) -> str:
    notes = []
    if not p.requires_grad:
        notes.append("frozen")
    if not p.in_optimizer:
        notes.append("not in optimizer")
    return ", ".join(notes)


def _fmt_when(timestamp: float) -> str:
    if timestamp <= 0:
        return "-"
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fmt_update(u: Update) -> str:
    pin = "pin " if u.target == "pin" else ""
    if u.mode == "unpin":
        return f"unpin {u.selector}"
    if u.mode != "scale":
        return f"{pin}{u.selector}={u.value!r}"
    # "layer2.**0.5" or "re:a\.*0.5" would read as part of the pattern; " x" cannot.
    return f"{pin}{u.selector} x{u.value!r}"


def _fmt_assignment(a: ScheduleAssignment) -> str:
    return f"schedule {a.selector}: {a.schedule.describe() if a.schedule is not None else 'constant'}"


def _one_line(text: str) -> str:
    return _printable(" ".join(text.split()))


# -- verbs ---------------------------------------------------------------------------


def cmd_list(client: LRClient, args: argparse.Namespace) -> int:
    """lrctl list: every parameter (matching PATTERN) with its rate and group."""
    if args.names:
        return _list_names(client, args)
    params = client.list_parameters(args.pattern)
    if args.json:
        # vars(), not asdict(): asdict deep-copies every field (10x slower on 100k).
        _print_json([vars(p) for p in params])
    elif not params and args.pattern:
        print(f"no parameter matches {args.pattern!r}")
    else:
        rows = (
            (p.name, _fmt_shape(p.shape), p.dtype, _fmt_lr(p.lr),
             p.group if p.group >= 0 else "-", _param_note(p))
            for p in params
        )
        print(format_table(("NAME", "SHAPE", "DTYPE", "LR", "GROUP", "NOTE"), rows))
    return EXIT_OK


def _list_names(client: LRClient, args: argparse.Namespace) -> int:
    """lrctl list --names: names only, printed page by page as they arrive."""
    if args.json:
        _print_json(client.list_names(args.pattern))
        return EXIT_OK
    found = False
    for name in client.iter_names(args.pattern):
        print(name)
        found = True
    if not found and args.pattern:
        # stderr: stdout stays a plain list of names for scripts.
        print(f"no parameter matches {args.pattern!r}", file=sys.stderr)
    return EXIT_OK


def _rate_note(r: LearningRate) -> str:
    if r.pinned:
        return "pinned"
    return r.schedule


def cmd_get(client: LRClient, args: argparse.Namespace) -> int:
    """lrctl get: the rate of each parameter the selectors match (pin, else base x factor)."""
    reading = client.read_learning_rates(*args.selectors)
    rates = reading.rates
    if args.json:
        extra = {"step": reading.step, "version": reading.version}
        _print_json([{**dataclasses.asdict(r), **extra} for r in rates])
        return EXIT_OK
    if any(r.schedule or r.pinned or r.base != r.lr for r in rates):
        rows = ((r.name, repr(r.lr), repr(r.base), repr(r.factor), r.group, _rate_note(r)) for r in rates)
        print(format_table(("NAME", "LR", "BASE", "FACTOR", "GROUP", "NOTE"), rows))
    else:  # no schedule, no pin: rate = base, and the short table says all
        print(format_table(("NAME", "LR", "GROUP"), ((r.name, repr(r.lr), r.group) for r in rates)))
    return EXIT_OK


def parse_assignment(arg: str) -> Update:
    """NAME_OR_PATTERN=VALUE as an absolute Update; UsageError naming `arg` if malformed."""
    # The last "=" splits: a regex selector may itself contain "=".
    selector, sep, text = arg.rpartition("=")
    if not sep:
        raise UsageError(f"set: expected NAME=VALUE, got {arg!r}")
    if not selector:
        raise UsageError(f"set: missing parameter name in {arg!r}")
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"set: {text!r} in {arg!r} is not a number") from None
    # NaN, inf and negatives parse; the worker judges them so every client gets one rule.
    return Update(selector, value)


def _set_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        dry_run=args.dry_run,
        at_step=args.at_step,
        wait=not args.no_wait,
        reason=args.reason,
        expected_version=args.expected_version,
    )


def _fmt_change(c: RateChange) -> str:
    """`name: old -> new`, and what made it when that is more than the base."""
    line = f"{c.name}: {c.old_lr!r} -> {c.new_lr!r}"
    notes = []
    plain = not c.old_schedule and not c.new_schedule and c.old_pin is None and c.new_pin is None
    if c.old_base != c.new_base and not (plain and c.old_base == c.old_lr and c.new_base == c.new_lr):
        notes.append(f"base {c.old_base!r} -> {c.new_base!r}")
    if c.old_pin != c.new_pin:
        notes.append("unpinned" if c.new_pin is None else f"pinned at {c.new_pin!r}")
    elif c.new_pin is not None:
        notes.append(f"pinned at {c.new_pin!r}")
    if c.old_schedule != c.new_schedule:
        notes.append(f"schedule {c.old_schedule or 'constant'} -> {c.new_schedule or 'constant'}")
    return f"{line} ({'; '.join(notes)})" if notes else line


def _print_set_result(result: SetResult, args: argparse.Namespace) -> None:
    if args.json:
        _print_json({"dry_run": args.dry_run, **dataclasses.asdict(result)})
        return
    for c in result.changes:
        print(_printable(_fmt_change(c)))
    if result.num_changes > len(result.changes):
        print(f"... and {result.num_changes - len(result.changes)} more")
    if args.dry_run:
        print("dry run: nothing changed")
    elif result.applied:
        print(f"applied at step {result.step} (version {result.version})")
    elif result.step >= 0:
        print(f"accepted, due at step {result.step}")
    else:
        print("accepted, due at the next step")


def cmd_set(client: LRClient, args: argparse.Namespace) -> int:
    """lrctl set: change base rates (or pins), one batch applied whole at one step."""
    updates = [parse_assignment(a) for a in args.assignments]
    if args.pin:
        updates = [dataclasses.replace(u, target="pin") for u in updates]
    _print_set_result(client.set_learning_rates(updates, **_set_options(args)), args)
    return EXIT_OK


def cmd_scale(client: LRClient, args: argparse.Namespace) -> int:
    """lrctl scale: multiply the base rates PATTERN matches by FACTOR (--pin: pin at
    FACTOR x the rate in force)."""
    update = Update(args.pattern, args.factor, "scale", "pin" if args.pin else "base")
    _print_set_result(client.set_learning_rates([update], **_set_options(args)), args)
    return EXIT_OK


def cmd_unpin(client: LRClient, args: argparse.Namespace) -> int:
    """lrctl unpin: the names follow base x schedule again."""
    _print_set_result(client.unpin(*args.selectors, **_set_options(args)), args)
    return EXIT_OK


def _schedule_options(words: Sequence[str]) -> dict[str, str]:
    options = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise UsageError(f"schedule set: expected KEY=VALUE, got {word!r}")
        options[key] = value
    return options


def cmd_schedule_set(client: LRClient, args: argparse.Namespace) -> int:
    """lrctl schedule set: give what SELECTOR matches a built-in schedule."""
    options = _schedule_options(args.options)
    if args.start_step is not None:
        options["start_step"] = str(args.start_step)
    try:
        schedule = parse_schedule(args.kind, options)
    except LrctlError as err:  # checked here too: a typo needs no round trip
        raise UsageError(f"schedule set: {err}") from None
    result = client.set_schedules({args.selector: schedule}, **_set_options(args))
    _print_set_result(result, args)
    return EXIT_OK


def cmd_schedule_clear(client: LRClient, args: argparse.Namespace) -> int:
    """lrctl schedule clear: back to constant (rate = base)."""
    _print_set_result(client.clear_schedules(*args.selectors, **_set_options(args)), args)
    return EXIT_OK


def cmd_schedule_show(client: LRClient, args: argparse.Namespace) -> int:
    """lrctl schedule show: each name's base, pin and schedule."""
    rows = client.get_schedules(*args.selectors)
    if args.json:
        _print_json([
            {"name": r.name, "base": r.base, "pin": r.pin, "description": r.description,
             "schedule": r.schedule.to_dict() if r.schedule is not None else None,
             "adopted": r.adopted or None}
            for r in rows
        ])
        return EXIT_OK
    table = ((r.name, repr(r.base), "-" if r.pin is None else repr(r.pin), r.description or "constant")
             for r in rows)
    print(format_table(("NAME", "BASE", "PIN", "SCHEDULE"), table))
    return EXIT_OK


def _status_lines(status: Status) -> list[tuple[str, Any]]:
    fields = dataclasses.asdict(status)
    since = fields["seconds_since_last_step"]
    fields["uptime_seconds"] = f"{status.uptime_seconds:.1f}"
    fields["seconds_since_last_step"] = "-" if since is None else f"{since:.3f}"
    # One rule per line below "guardrails:", in the form the worker's --guardrail takes.
    fields["guardrails"] = (
        "".join(f"\n  {_one_line(g.selector)}={_bound(g.min_lr)}..{_bound(g.max_lr)}" for g in status.guardrails)
        or "-"
    )
    fields["max_factor"] = "-" if status.max_factor is None else repr(status.max_factor)
    ls = status.lockstep
    fields["lockstep"] = "-" if ls is None else (
        f"every {ls.every} step(s), timeout {ls.timeout:g}s, "
        + ("not holding" if ls.held_step is None else f"holding at step {ls.held_step}")
        + f", {ls.turns} turn(s), {ls.timeouts} timed out, controller {ls.peer}"
        + (f" (token {ls.token_name!r})" if ls.token_name else ""))
    fields["oldest_event_step"] = "-" if status.oldest_event_step is None else status.oldest_event_step
    return list(fields.items())


def _bound(value: Optional[float]) -> str:
    return "" if value is None else repr(value)


def cmd_status(client: LRClient, args: argparse.Namespace) -> int:
    """lrctl status: the worker's step, version, optimizer and grouping."""
    status = client.status()
    if args.json:
        _print_json(dataclasses.asdict(status))
    else:
        lines = _status_lines(status)
        width = max(len(key) for key, _ in lines) + 1
        for key, value in lines:
            text = f"{key + ':':<{width}} {value}"
            print("\n".join(line.rstrip() for line in text.splitlines()))
    return EXIT_OK


def _history_row(r: ChangeRecord, errors: bool) -> tuple[Any, ...]:
    updates = ", ".join([*map(_fmt_update, r.updates), *map(_fmt_assignment, r.schedules)])
    who = f"{r.user} [{r.token_name}]" if r.token_name else r.user
    row = (r.change_id, r.step, r.version, _fmt_when(r.applied_at), r.status or "applied", who,
           updates, _one_line(r.reason))
    return (*row, _one_line(r.error)) if errors else row


def _record_json(r: ChangeRecord | PendingChange) -> dict[str, Any]:
    # Schedules by to_dict(): asdict() would drop their kind (a class attribute).
    schedules = [{"selector": a.selector, "schedule": None if a.schedule is None else a.schedule.to_dict()}
                 for a in r.schedules]
    return {**dataclasses.asdict(dataclasses.replace(r, schedules=[])), "schedules": schedules}


def _print_history(records: Sequence[ChangeRecord], args: argparse.Namespace) -> None:
    if args.json:
        _print_json([_record_json(r) for r in records])
        return
    errors = any(r.failed for r in records)
    headers = ("CHANGE", "STEP", "VERSION", "WHEN", "STATUS", "USER", "UPDATES", "REASON")
    headers += ("ERROR",) if errors else ()
    print(format_table(headers, (_history_row(r, errors) for r in records)))


def _note(text: str) -> None:
    print(f"lrctl: note: {_one_line(text)}", file=sys.stderr)


def cmd_history(client: LRClient, args: argparse.Namespace) -> int:
    """lrctl history: recorded changes (applied, and failed at their step), oldest first
    (the last --limit N); with --follow, then new ones as they are recorded."""
    if args.follow:
        from lrctl.client.watching import cmd_history_follow  # only this verb needs it

        def table(records: list[ChangeRecord]) -> None:
            _print_history(records, args)

        def row(r: ChangeRecord) -> str:
            return "  ".join(_printable(str(c)) for c in _history_row(r, bool(r.error)))

        return cmd_history_follow(client, args, table, row, _record_json)
    changes = client.iter_changes()
    # A bounded deque keeps only the newest N while paging through the whole history.
    shown: collections.deque[ChangeRecord] = collections.deque(maxlen=args.limit)
    held = 0
    for record in changes:
        shown.append(record)
        held += 1
    records = list(shown)
    if changes.gap and records and len(records) == held:
        # Only when what is shown starts right after records that are gone.
        _note(f"{changes.dropped} older change(s) were dropped from the worker's history (it "
              f"keeps the last {held}); the first shown is version {records[0].version}")
    _print_history(records, args)
    return EXIT_OK


def cmd_history_export(client: LRClient, args: argparse.Namespace) -> int:
    """lrctl history --export FILE: every record the worker holds, as an audit log file."""
    from lrctl.client.export import export_history  # only this verb needs it

    result = export_history(client, args.export, partial=args.partial)
    if args.json:
        _print_json(dataclasses.asdict(result))
        return EXIT_OK
    if result.dropped:
        _note(f"the worker's history had dropped its {result.dropped} oldest change(s): the "
              "export starts after them (--partial)")
    if result.truncated:
        _note(f"{result.truncated} record(s) list fewer names than they touched (--partial)")
    steps = "" if result.first_step is None else f", steps {result.first_step}..{result.last_step}"
    print(f"exported {result.records} record(s) of run {result.run_id} to {_printable(result.path)} "
          f"({result.applied} applied{steps}; {result.failed} failed, not replayed)")
    return EXIT_OK


def cmd_replay(client: LRClient, args: argparse.Namespace) -> int:
    """lrctl replay FILE: send a recorded run's applied changes for their recorded steps."""
    from lrctl.client.replay import load, replay  # only this verb needs it

    try:
        load(args.replay_file)  # a bad file is a usage error, before any call
    except LrctlError as err:
        raise UsageError(str(err)) from None
    result = replay(client, args.replay_file, window=args.window, wait=not args.no_wait)
    if args.json:
        _print_json(dataclasses.asdict(result))
    elif not result.sent:
        print(f"nothing to replay: {_printable(result.path)} holds no applied change")
    else:
        what = "applied" if result.applied else "queued"
        print(f"replayed {result.sent} change(s) of run {result.run_id}: {what} at their recorded "
              f"steps {result.first_step}..{result.last_step} (changes "
              f"{result.change_ids[0]}..{result.change_ids[-1]})")
    return EXIT_OK


def cmd_watch(client: LRClient, args: argparse.Namespace) -> int:
    """lrctl watch: the job's events as they happen."""
    from lrctl.client.watching import cmd_watch as watch  # only this verb needs it

    def change(r: ChangeRecord) -> str:
        updates = ", ".join([*map(_fmt_update, r.updates), *map(_fmt_assignment, r.schedules)])
        return _printable(f"{r.change_id} {r.status or 'applied'} v{r.version}: {updates}"
                          + (f" ({_one_line(r.error)})" if r.error else ""))

    return watch(client, args, change)


def cmd_history_file(args: argparse.Namespace) -> int:
    """lrctl history --file PATH: the same table, from an audit log (no worker needed)."""
    from lrctl.client.audit_file import read_audit_log  # only this verb needs it

    records = list(collections.deque(read_audit_log(args.file, _note), maxlen=args.limit))
    _print_history(records, args)
    return EXIT_OK


def _fmt_age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


def _pending_row(p: PendingChange, now: float) -> tuple[Any, ...]:
    updates = ", ".join([*map(_fmt_update, p.updates), *map(_fmt_assignment, p.schedules)])
    who = f"{p.user} [{p.token_name}]" if p.token_name else p.user
    return (p.change_id, "next" if p.at_step is None else p.at_step, _fmt_age(now - p.requested_at),
            who, p.peer, "yes" if p.waiting else "no", p.num_names, updates, _one_line(p.reason))


def cmd_pending(client: LRClient, args: argparse.Namespace) -> int:
    """lrctl pending: the accepted changes still waiting for their step; --cancel ID...
    takes them out (they are never applied)."""
    if args.cancel:
        return _cancel(client, args)
    queued = client.list_pending()
    if args.json:
        _print_json([_record_json(p) for p in queued])
    elif not queued:
        print("no queued changes")
    else:
        now = time.time()
        headers = ("CHANGE", "AT_STEP", "AGE", "USER", "PEER", "WAIT", "NAMES", "UPDATES", "REASON")
        print(format_table(headers, (_pending_row(p, now) for p in queued)))
    return EXIT_OK


def _cancel(client: LRClient, args: argparse.Namespace) -> int:
    result = client.cancel_changes(args.cancel, reason=args.reason)
    if args.json:
        _print_json(dataclasses.asdict(result))
    else:
        for change_id in result.cancelled:
            print(f"cancelled change {change_id}: it will not be applied")
    if result.not_found:
        ids = ", ".join(map(str, result.not_found))
        return _error(f"no queued change with id {ids} (unknown, already applied, withdrawn or "
                      "cancelled; `lrctl history` lists applied changes)", EXIT_REJECTED)
    return EXIT_OK


EXIT_NOT_SERVING = 1  # lrctl health: the worker answers but is not serving
HEALTH_RETRY_S = 0.5


def cmd_health(client: LRClient, args: argparse.Namespace) -> int:
    """lrctl health: the standard gRPC health check, one line ("SERVING", "NOT_SERVING",
    "unreachable: ..."); exit 0, 1 or 3. --wait retries until SERVING or the time is up.
    A container's HEALTHCHECK and any probe can run it: it needs no token."""
    deadline = time.monotonic() + args.wait
    while True:
        try:
            status = client.health(args.service)
            line, code = status, EXIT_OK if status == "SERVING" else EXIT_NOT_SERVING
        except UnavailableError as err:  # TLSError too: its message says what to fix
            line, code = f"unreachable: {_one_line(str(err))}", EXIT_UNAVAILABLE
        except NotFoundError:  # the health protocol's answer for a service it does not know
            return _error(f"health: the worker has no service named {args.service!r}", EXIT_REJECTED)
        if code == EXIT_OK or time.monotonic() >= deadline:
            print(line)
            return code
        time.sleep(min(HEALTH_RETRY_S, max(deadline - time.monotonic(), 0.0)))


def cmd_plot(client: Optional[LRClient], args: argparse.Namespace) -> int:
    """lrctl plot OUT.png: rates (and the loss) over steps; the code is in lrctl.client.plot
    (imported here only: it is the one verb that needs matplotlib)."""
    from lrctl.client.plot import MATPLOTLIB_MISSING, matplotlib_missing, run

    if matplotlib_missing():  # an extra not installed, as for `lrctl demo`
        return _error(MATPLOTLIB_MISSING, EXIT_INTERNAL)
    return run(args, client, _note)


def run_demo(demo_args: list[str]) -> int:
    """lrctl demo: hand over to the worker's demo (needs the worker extra, i.e. torch)."""
    try:
        from lrctl.server.demo import main as demo_main  # imports torch: keep it lazy
    except ImportError as exc:
        # Only a missing worker dependency means "install the extra"; any other
        # ImportError is a bug and is reported as such.
        if (exc.name or "").partition(".")[0] not in _WORKER_EXTRA_MODULES:
            raise
        print(f"lrctl: error: {_DEMO_MISSING}", file=sys.stderr)
        return EXIT_INTERNAL
    return int(demo_main(demo_args) or 0)


# -- argument parsing ----------------------------------------------------------------


# A longer deadline overflows gRPC's clock (1e10 s fails at once); 115 days is plenty.
MAX_TIMEOUT_S = 1e7
INT64_MAX = 2**63 - 1


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds above 0 and at most {MAX_TIMEOUT_S:g}: {text!r}"
        )
    return value


def _wait_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"must be a number of seconds from 0 to {MAX_TIMEOUT_S:g}: {text!r}")
    return value


def _int64(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise argparse.ArgumentTypeError(f"out of range (a 64-bit integer): {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    value = _int64(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _positive_int(text: str) -> int:
    value = _int64(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _add_change_options(p: argparse.ArgumentParser) -> None:
    """The options of every verb that changes something (set, scale, unpin, schedule set/clear)."""
    p.add_argument("--dry-run", action="store_true", help="validate and show; change nothing")
    p.add_argument("--at-step", type=_int64, metavar="N", help="apply right before step N")
    p.add_argument("--no-wait", action="store_true",
                   help="return once accepted instead of once applied")
    p.add_argument("--reason", default="", metavar="TEXT", help="recorded in the history")
    p.add_argument("--expected-version", type=_int64, metavar="V",
                   help="apply only if the config version is still V")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


_TLS_FLAGS = (
    ("--tls-ca", "PEM", "use TLS, trusting the CA that signed the worker's certificate (default: $LRCTL_TLS_CA)"),
    ("--tls-cert", "PEM", "this client's certificate, for mutual TLS (with --tls-key; default: $LRCTL_TLS_CERT)"),
    ("--tls-key", "PEM", "this client's private key (with --tls-cert; default: $LRCTL_TLS_KEY)"),
    ("--tls-server-name", "NAME",
     "the name to check in the worker's certificate, e.g. when connecting by IP (default: $LRCTL_TLS_SERVER_NAME)"),
)


def build_parser() -> argparse.ArgumentParser:
    """The lrctl argument parser."""
    parser = OneLineParser(
        prog="lrctl",
        description="Steer a running PyTorch job's per-parameter learning rates.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # The global options, accepted before the verb and after it ("lrctl status
    # --address X"); after it they default to nothing, so they only override.
    common = OneLineParser(add_help=False)
    for target, defaults in ((parser, True), (common, False)):
        target.add_argument(
            "--address", default=default_address() if defaults else argparse.SUPPRESS,
            help=f"worker host:port or unix:/path (default: ${ADDRESS_ENV} or 127.0.0.1:50051)")
        target.add_argument(
            "--timeout", type=_timeout, default=10.0 if defaults else argparse.SUPPRESS,
            metavar="SECONDS", help="deadline of each call; a waiting set waits this long (default 10)")
        target.add_argument(
            "--token-file", default=None if defaults else argparse.SUPPRESS, metavar="PATH",
            help="file holding the worker's bearer token (default: $LRCTL_TOKEN, else $LRCTL_TOKEN_FILE)")
        for flag, metavar, text in _TLS_FLAGS:
            target.add_argument(flag, default=None if defaults else argparse.SUPPRESS, metavar=metavar, help=text)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser("list", parents=[common], help="list parameters with their rates and groups")
    p.add_argument("pattern", nargs="?", default="", metavar="PATTERN",
                   help="exact name, glob or re:REGEX (default: all)")
    p.add_argument("--names", action="store_true",
                   help="print only the names, one a line (fast for very large models)")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.set_defaults(func=cmd_list)

    p = verbs.add_parser("get", parents=[common], help="read learning rates")
    p.add_argument("selectors", nargs="*", metavar="NAME|PATTERN",
                   help="exact names, globs or re:REGEX (default: every held parameter)")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.set_defaults(func=cmd_get)

    p = verbs.add_parser("set", parents=[common],
                         help="set base rates, or pin rates (one batch, applied at one step)")
    p.add_argument("assignments", nargs="+", metavar="NAME_OR_PATTERN=VALUE")
    p.add_argument("--pin", action="store_true",
                   help="pin at exactly VALUE whatever the schedule (until `lrctl unpin`)")
    _add_change_options(p)
    p.set_defaults(func=cmd_set)

    p = verbs.add_parser("scale", parents=[common], help="multiply base rates by a factor")
    p.add_argument("pattern", metavar="PATTERN")
    p.add_argument("factor", type=float, metavar="FACTOR")
    p.add_argument("--pin", action="store_true", help="pin at FACTOR x the rate in force instead")
    _add_change_options(p)
    p.set_defaults(func=cmd_scale)

    p = verbs.add_parser("unpin", parents=[common], help="remove pins: follow base x schedule again")
    p.add_argument("selectors", nargs="+", metavar="NAME|PATTERN")
    _add_change_options(p)
    p.set_defaults(func=cmd_unpin)

    p = verbs.add_parser("schedule", parents=[common], help="set, clear or show schedules")
    schedule_verbs = p.add_subparsers(dest="schedule_verb", metavar="ACTION", required=True)
    q = schedule_verbs.add_parser(
        "set", parents=[common], help="give names a built-in schedule",
        epilog=SCHEDULE_KINDS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("selector", metavar="NAME|PATTERN")
    q.add_argument("kind", metavar="KIND", help=", ".join(KINDS))
    q.add_argument("options", nargs="*", metavar="KEY=VALUE")
    q.add_argument("--start-step", type=_int64, metavar="N",
                   help="the schedule's step 0 is optimizer step N (default 0: the job's step)")
    _add_change_options(q)
    q.set_defaults(func=cmd_schedule_set)
    q = schedule_verbs.add_parser("clear", parents=[common], help="back to constant (rate = base)")
    q.add_argument("selectors", nargs="+", metavar="NAME|PATTERN")
    _add_change_options(q)
    q.set_defaults(func=cmd_schedule_clear)
    q = schedule_verbs.add_parser("show", parents=[common], help="base, pin and schedule per name")
    q.add_argument("selectors", nargs="*", metavar="NAME|PATTERN")
    q.add_argument("--json", action="store_true", help="print a JSON array")
    q.set_defaults(func=cmd_schedule_show)

    p = verbs.add_parser("status", parents=[common], help="the worker's step, version and optimizer")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=cmd_status)

    p = verbs.add_parser("history", parents=[common],
                         help="recorded changes (applied, and failed at their step), oldest first")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="only the last N changes")
    p.add_argument("--file", metavar="PATH",
                   help="read a worker's audit log (and its rotated PATH.1, PATH.2, ...) instead "
                        "of asking the worker; works after the worker is gone")
    p.add_argument("--export", metavar="FILE",
                   help="write every record the worker holds to FILE in the audit log's format "
                        "(for `lrctl history --file` and `lrctl replay`)")
    p.add_argument("--partial", action="store_true",
                   help="with --export: write what the worker holds even when its history "
                        "dropped older changes")
    p.add_argument("--json", action="store_true",
                   help="print a JSON array (with --follow: one JSON object a line)")
    p.add_argument("--follow", "-f", action="store_true",
                   help="then print each new record as it is recorded, until Ctrl-C")
    p.set_defaults(func=cmd_history)

    p = verbs.add_parser("replay", parents=[common],
                         help="apply a recorded run's changes (an --export or audit log file) "
                              "at their recorded steps")
    p.add_argument("replay_file", metavar="FILE",
                   help="a `lrctl history --export` file or a worker's audit log")
    p.add_argument("--window", type=_positive_int, default=32, metavar="N",
                   help="at most N replayed changes wait in the worker's queue at once (default 32)")
    p.add_argument("--no-wait", action="store_true",
                   help="return once every change is queued, not once applied")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_replay)

    p = verbs.add_parser("watch", parents=[common],
                         help="the job's events as they happen: step, reported metrics, changes")
    p.add_argument("--json", action="store_true",
                   help='one JSON object a line: {"step", "time", "version", "metrics", "dropped", '
                        'and "stats", "changes" when present}')
    p.add_argument("--from-step", type=_nonnegative_int, default=None, metavar="N",
                   help="start at step N if the worker still keeps it (default: from now)")
    p.add_argument("--stats", action="store_true",
                   help="include per-parameter statistics (attach(stats_every=...))")
    p.add_argument("--changes", action="store_true", help="only steps with change records")
    p.set_defaults(func=cmd_watch)

    p = verbs.add_parser("pending", parents=[common],
                         help="changes accepted but not applied yet; --cancel to take them out")
    p.add_argument("--cancel", type=_int64, nargs="+", metavar="ID",
                   help="cancel these queued changes (by CHANGE id): they are never applied")
    p.add_argument("--reason", default="", metavar="TEXT",
                   help="with --cancel: why (told to a caller waiting for the change)")
    p.add_argument("--json", action="store_true", help="print a JSON array (with --cancel: an object)")
    p.set_defaults(func=cmd_pending)

    p = verbs.add_parser("health", parents=[common],
                         help="standard gRPC health check: SERVING (exit 0), NOT_SERVING (1), unreachable (3)")
    p.add_argument("--service", default="", metavar="NAME",
                   help="check one service, e.g. lrctl.v1.LearningRateControl (default: the server)")
    p.add_argument("--wait", type=_wait_seconds, default=0.0, metavar="SECONDS",
                   help="retry until SERVING or SECONDS have passed (default 0: ask once)")
    p.set_defaults(func=cmd_health)

    p = verbs.add_parser("plot", parents=[common],
                         help="PNG of the rates per name or selector (and the loss) over steps "
                              "(needs lrctl[plot])")
    p.add_argument("out", metavar="OUT.png", help="the PNG to write")
    p.add_argument("--file", metavar="PATH",
                   help="read an audit log / exported history (and PATH.1, PATH.2, ...) "
                        "instead of asking the worker")
    p.add_argument("--select", action="append", metavar="SEL",
                   help="draw what SEL matches (exact, glob, re:REGEX) as one line; repeatable")
    p.add_argument("--metrics", metavar="FILE",
                   help='the loss from NDJSON lines {"step": N, "metrics": {"loss": X}} '
                        "(what `lrctl watch --json` writes); default with a running worker: the "
                        "steps it still keeps of what the job reported")
    p.add_argument("--metric", default="loss", metavar="KEY", help="the metric drawn (default loss)")
    p.add_argument("--csv", metavar="FILE", help="also write the exact points drawn, as CSV")
    p.add_argument("--top", type=_positive_int, default=8, metavar="N",
                   help="at most N lines (default 8), the most changed first")
    p.add_argument("--from-step", type=_int64, metavar="N", help="first step drawn (default 0)")
    p.add_argument("--to-step", type=_int64, metavar="N",
                   help="last step drawn (default: the worker's last step, or a little past "
                        "the file's last change)")
    p.add_argument("--linear", action="store_true", help="linear y axis (default: log)")
    p.add_argument("--dpi", type=_positive_int, default=100, metavar="N",
                   help="pixels per inch (default 100: 1200 pixels wide)")
    p.set_defaults(func=cmd_plot)

    # The demo parses its own arguments: this parser must not know any option (so
    # "-h" and "--steps" pass through), which a prefix that never occurs achieves.
    verbs.add_parser("demo", help="run a demo worker (needs lrctl[worker])", add_help=False,
                     prefix_chars="\0")
    return parser


def _error(message: str, code: int) -> int:
    print(f"lrctl: error: {_one_line(message)}", file=sys.stderr)
    return code


def _exit_code(err: LrctlError) -> int:
    return _EXIT_BY_CODE.get(err.code, EXIT_REJECTED)


def _run(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    try:
        # parse_known_args lets `demo` take everything after it, in order, untouched.
        args, rest = parser.parse_known_args(argv)
        if args.verb == "demo":
            return run_demo(rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    except UsageError as err:
        return _error(str(err), EXIT_USAGE)
    except SystemExit as done:  # --help and friends
        return done.code if isinstance(done.code, int) else EXIT_OK

    try:
        if args.verb == "history" and (args.export is not None or args.partial):
            if args.file or args.limit is not None or args.follow:
                raise UsageError("history: --export writes every record the worker holds; "
                                 "it takes neither --file, --limit nor --follow")
            if args.export is None:
                raise UsageError("history: --partial goes with --export FILE")
            if not args.export:
                raise UsageError("history: --export needs a file name")
            args.func = cmd_history_export
        if getattr(args, "file", None):
            if getattr(args, "follow", False):
                raise UsageError("--follow reads a live worker; it does not go with --file")
            try:
                return cmd_history_file(args) if args.verb == "history" else args.func(None, args)
            except LrctlError as err:  # a local file, not a worker's answer
                raise UsageError(str(err)) from None
        try:
            token = read_token_file(args.token_file) if args.token_file else None
            client = LRClient(args.address, timeout=args.timeout, token=token, tls_ca=args.tls_ca,
                              tls_cert=args.tls_cert, tls_key=args.tls_key,
                              tls_server_name=args.tls_server_name)
        except LrctlError as err:  # the address or a local file, not the worker's answer
            raise UsageError(str(err)) from None
        with client:
            return args.func(client, args)
    except KeyboardInterrupt:
        changing = args.verb in ("set", "scale", "unpin") or getattr(args, "schedule_verb", "") in ("set", "clear")
        if changing and not args.no_wait and not args.dry_run:
            # The call is cancelled; the worker withdraws the change unless a step
            # boundary came first. Only the history can tell which.
            return _error("interrupted: the change is withdrawn unless it was already applied; "
                          "`lrctl history` tells", EXIT_INTERRUPTED)
        return _error("interrupted", EXIT_INTERRUPTED)
    except UsageError as err:
        return _error(str(err), EXIT_USAGE)
    except TLSError as err:  # its message says what to fix
        return _error(str(err), EXIT_UNAVAILABLE)
    except UnavailableError as err:
        hint = "is a worker running? set --address or LRCTL_ADDRESS"
        return _error(f"{err}; {hint}", EXIT_UNAVAILABLE)
    except LrctlError as err:
        return _error(str(err) or err.code, _exit_code(err))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run lrctl with `argv` (default sys.argv[1:]); returns the exit code."""
    try:
        return _run(argv)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`); silence the flush at interpreter exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as exc:  # the last line of defence: no tracebacks for users
        if os.environ.get("LRCTL_DEBUG"):
            raise
        return _error(f"internal error: {type(exc).__name__}: {exc}", EXIT_INTERNAL)


if __name__ == "__main__":
    sys.exit(main())
