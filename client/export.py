"""`lrctl history --export FILE`: a worker's history as an audit-log file.

Every record the worker holds (applied changes, and accepted changes that failed at
their step) in the audit log's line format (lrctl.common.audit_format), so that
`lrctl history --file FILE` reads it and `lrctl replay FILE` / attach(replay=FILE)
replay it. The file is written whole or not at all (a temporary file renamed over
FILE). An export that would miss something is refused unless `partial` is given: the
worker's bounded history dropped its oldest records, or a record touched more names
than the worker sends per record.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

from lrctl.client.audit_file import record_line
from lrctl.client.client import LRClient
from lrctl.client.errors import FailedPreconditionError, InvalidArgumentError

# The most per-name entries the worker sends for one record (ListChangesRequest).
MAX_CHANGES_PER_RECORD = 200_000


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    path: str
    run_id: str
    records: int
    applied: int
    failed: int
    first_step: int | None
    last_step: int | None
    dropped: int  # records the worker's history had dropped (only with partial=True)
    truncated: int  # records written with fewer names than they touched (partial=True)


def export_history(client: LRClient, path: str, *, partial: bool = False) -> ExportResult:
    """Write the worker's history to `path` (see the module docstring).

    FailedPreconditionError when the export would be partial and `partial` is False
    (nothing is written then); InvalidArgumentError when `path` cannot be written.
    """
    run_id = client.status().run_id
    changes = client.iter_changes(max_changes_per_record=MAX_CHANGES_PER_RECORD)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".lrctl-export-", dir=directory)
    except OSError as exc:
        raise InvalidArgumentError(f"cannot write {path!r}: {exc.strerror}") from None
    records = applied = truncated = 0
    first = last = None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            for record in changes:
                if changes.dropped and not partial:
                    raise FailedPreconditionError(
                        f"the worker's history dropped its {changes.dropped} oldest change(s) (it "
                        "keeps attach(history_limit=...) records); an export would start at version "
                        f"{changes.oldest_version} and a replay would miss them. Export from the "
                        "worker's audit log instead (`lrctl history --file LOG`), or pass "
                        "--partial to write what it holds")
                if len(record.changes) < record.num_changes:
                    if not partial:
                        raise FailedPreconditionError(
                            f"change {record.change_id} touched {record.num_changes} names, more "
                            f"than the {MAX_CHANGES_PER_RECORD} a worker sends per record; use the "
                            "worker's audit log, or pass --partial to write it cut short")
                    truncated += 1
                f.write(record_line(record, run_id))
                records += 1
                if not record.failed:
                    applied += 1
                    first = record.step if first is None else first
                    last = record.step
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise InvalidArgumentError(f"cannot write {path!r}: {exc.strerror}") from None
    except BaseException:
        _remove(tmp)
        raise
    return ExportResult(os.fspath(path), run_id, records, applied, records - applied, first, last,
                        changes.dropped, truncated)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
