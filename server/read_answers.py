"""GetLearningRates, GetSchedules and ListParameters answers, from a read source.

One place builds these messages (paging, page tokens, byte caps, selectors, errors)
for both servers: the in-process handlers (lrctl.server.service) read the live
Controller, and the serving process of attach(serving="process")
(lrctl.server.serving_main) reads a ReadSnapshot of it (lrctl.server.read_model).
So an answer from either is the same bytes for the same state.

Imports neither grpc nor torch (protobuf only): errors are lrctl.common.errors, mapped
to status codes at the edges.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import zlib
from itertools import accumulate
from typing import Any, Callable, Iterable, Mapping, Sequence

from lrctl.common.errors import AbortedError, InvalidArgumentError
from lrctl.common.schedule_messages import schedule_to_pb
from lrctl.server.selectors import REGEX_PREFIX
from lrctl.v1 import lrctl_pb2 as pb

Check = Callable[[], None]

DEFAULT_PARAMETER_PAGE, MAX_PARAMETER_PAGE = 1000, 5000
MAX_RATE_PAGE = 50_000  # about 1.5 MB with 20-character names
# A page of ListParameters, ListChanges, ListPending and of a paged GetLearningRates or
# GetSchedules also ends once its rows add up to this many bytes (names are as long as the model makes them:
# 5000 names of 1000 characters would be 5 MB), so it fits a client that keeps gRPC's
# default 4 MiB receive limit. Always at least one row a page.
PAGE_BYTES = 3 * 1024 * 1024
# Wire bytes of a row besides its strings: field tags, lengths, numbers (upper bounds).
_RATE_ROW_BYTES = 64
_NAME_ROW_BYTES = 6
_PARAMETER_ROW_BYTES = 96
# A call is cheap (answered on the event loop: no thread hop, ~100-300 us less Python
# per call, measured in bench/README.md section 3b) when it has at most
# _CHEAP_SELECTORS selectors, none a regex (one may take up to its 1 s budget,
# lrctl.server.selectors), and each exact or the model small (at most _CHEAP_ROWS
# names: a glob over them, a change to all of them or a full-view page of them takes
# ~1-10 ms); without selectors (every name), when the model is small. Writes with
# schedules (piecewise points to check) and history pages never are.
_CHEAP_SELECTORS = 64
_CHEAP_ROWS = 256

def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def rows_fitting(sizes: Iterable[int], budget: int = PAGE_BYTES) -> int | None:
    """How many leading rows of these byte sizes fit in `budget` (at least one); None
    when all of them do."""
    total = list(accumulate(sizes))
    if not total or total[-1] <= budget:
        return None
    return max(1, bisect.bisect_right(total, budget))


def checked_page_size(requested: int, default: int, maximum: int) -> int:
    """The page size to use: `default` for 0, at most `maximum`; negative is refused."""
    if requested < 0:
        raise InvalidArgumentError(f"page_size {requested} is negative")
    return min(requested or default, maximum)


def encode_token(kind: str, position: int, context: str, version: int | None = None) -> str:
    """An opaque page token bound to its listing (kind) and filter, and maybe a version."""
    raw = f"{kind}:{position}:{zlib.crc32(context.encode()):08x}"
    if version is not None:
        raw += f":{version}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def decode_token(token: str, kind: str, context: str) -> tuple[int, int | None]:
    """(position, version or None) of a token of this listing; (0, None) for no token."""
    if not token:
        return 0, None
    try:
        got_kind, position, crc, *version = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        if (
            got_kind == kind
            and crc == f"{zlib.crc32(context.encode()):08x}"
            and int(position) >= 0
            and len(version) <= 1
        ):
            return int(position), int(version[0]) if version else None
    except (ValueError, binascii.Error, UnicodeDecodeError):
        pass
    raise InvalidArgumentError(
        f"page_token {token!r} is not a token of this listing (tokens are bound to the filter)"
    )


class _HyperparameterMessages:
    """A Parameter message holding only a hyperparameter map, per distinct map object.

    Parameters of one group template share one map object, so a listing merges a cached
    message (C) instead of filling a protobuf map from a dict for each parameter (about
    6 us each, 0.6 s for 100,000 parameters). Bounded; a miss just builds the message.
    """

    _LIMIT = 256

    def __init__(self) -> None:
        self._cache: dict[int, tuple[Mapping[str, float], pb.Parameter]] = {}

    def __call__(self, hyperparameters: Mapping[str, float]) -> pb.Parameter:
        hit = self._cache.get(id(hyperparameters))
        if hit is not None and hit[0] is hyperparameters:
            return hit[1]
        message = pb.Parameter(hyperparameters=hyperparameters)
        if len(self._cache) >= self._LIMIT:
            self._cache.clear()
        # Holding the map keeps its id from being reused while it is cached.
        self._cache[id(hyperparameters)] = (hyperparameters, message)
        return message

    def size(self, hyperparameters: Mapping[str, float]) -> int:
        """Wire bytes the map adds to a Parameter (0 for an empty one)."""
        return self(hyperparameters).ByteSize() if hyperparameters else 0


_PARAMETER_VIEWS = frozenset(
    {pb.PARAMETER_VIEW_UNSPECIFIED, pb.PARAMETER_VIEW_FULL, pb.PARAMETER_VIEW_NAMES}
)


def _is_exact(selector: str) -> bool:
    return not selector.startswith(REGEX_PREFIX) and not any(c in selector for c in "*?[")


def cheap_selectors(selectors: Iterable[str], num_names: int) -> bool:
    """A few exact names or globs of a small model, or every name of a small model."""
    selectors = list(selectors)
    if not selectors:
        return num_names <= _CHEAP_ROWS
    if len(selectors) > _CHEAP_SELECTORS or any(s.startswith(REGEX_PREFIX) for s in selectors):
        return False
    return num_names <= _CHEAP_ROWS or all(map(_is_exact, selectors))


class _VersionedReading:
    """A GetLearningRates or GetSchedules page: its selectors, where it starts, its size
    (None: unpaged) and the version its reading began at. Every page of one reading must
    be at one version, so the page token carries it."""

    def __init__(self, request: pb.GetLearningRatesRequest | pb.GetSchedulesRequest, kind: str) -> None:
        self.selectors = list(request.selectors)
        self.size = checked_page_size(request.page_size, MAX_RATE_PAGE, MAX_RATE_PAGE) if request.page_size else None
        self.bound_to = "\0".join(self.selectors)
        self.start, self.first_version = decode_token(request.page_token, kind, self.bound_to)
        if request.page_token and self.first_version is None:
            raise InvalidArgumentError(f"page_token {request.page_token!r} is not a token of this listing")

    def check_version(self, version: int, what: str) -> None:
        """ABORTED when a change landed since the reading's first page."""
        if self.first_version is not None and version != self.first_version:
            raise AbortedError(
                f"{what} changed (version {self.first_version} -> {version}) while reading them "
                "page by page; read again from the first page"
            )




class Reads:
    """The three reads' answers from one source: a Controller, or a ReadSnapshot (what
    either offers: filter, names_at, parameter_rows, read_page, schedules, index)."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self._hyperparameters_pb = _HyperparameterMessages()

    def of(self, source: Any) -> "Reads":
        """The same answers from another source, sharing the message cache."""
        out = Reads.__new__(Reads)
        out.source, out._hyperparameters_pb = source, self._hyperparameters_pb
        return out

    def is_cheap(self, request: Any) -> bool:
        """Whether answering `request` is cheap enough for the event loop (see _CHEAP_ROWS)."""
        n = len(self.source.index)
        if isinstance(request, pb.ListParametersRequest):
            if request.filter:
                return cheap_selectors([request.filter], n)
            rows = min(request.page_size or DEFAULT_PARAMETER_PAGE, n)
            return request.view == pb.PARAMETER_VIEW_NAMES or rows <= _CHEAP_ROWS
        return cheap_selectors(request.selectors, n)

    def answer(self, request: Any, check: Check | None = None) -> Any:
        """The answer to a ListParameters, GetLearningRates or GetSchedules request."""
        if isinstance(request, pb.GetLearningRatesRequest):
            return self.get_learning_rates(request, check)
        if isinstance(request, pb.GetSchedulesRequest):
            return self.get_schedules(request, check)
        return self.list_parameters(request, check)

    def list_parameters(self, request: pb.ListParametersRequest, check: Check | None = None) -> pb.ListParametersResponse:
        size = checked_page_size(request.page_size, DEFAULT_PARAMETER_PAGE, MAX_PARAMETER_PAGE)
        start, _ = decode_token(request.page_token, "params", request.filter)
        view = request.view
        if view not in _PARAMETER_VIEWS:
            raise InvalidArgumentError(
                f"view {view} is not a ParameterView; use PARAMETER_VIEW_FULL or PARAMETER_VIEW_NAMES"
            )
        matched = self.source.filter(request.filter, check=check)
        end = min(start + size, len(matched))
        response = pb.ListParametersResponse(total_size=len(matched))
        if view == pb.PARAMETER_VIEW_NAMES:
            names = self.source.names_at(matched[start:end])
            fit = rows_fitting(_utf8_len(n) + _NAME_ROW_BYTES for n in names)
            if fit is not None:
                names, end = names[:fit], start + fit
            response.names.extend(names)
        else:
            end = self._add_parameters(response, matched[start:end], start)
        if end < len(matched):
            response.next_page_token = encode_token("params", end, request.filter)
        return response

    def _add_parameters(self, response: pb.ListParametersResponse, positions: Sequence[int], start: int) -> int:
        """Fill a FULL page with the parameters at `positions` that fit PAGE_BYTES; returns
        the end of the page (start + rows added)."""
        rows = self.source.parameter_rows(positions)
        fit = rows_fitting(
            _utf8_len(name) + len(dtype) + len(device) + 11 * len(shape) + _PARAMETER_ROW_BYTES
            + self._hyperparameters_pb.size(hypers)
            for name, shape, _, dtype, device, _, _, _, _, hypers in rows
        )
        if fit is not None:
            rows = rows[:fit]
        # add() builds each message in place (half the cost of a list of messages).
        add, hyperparameters_pb = response.parameters.add, self._hyperparameters_pb
        for name, shape, numel, dtype, device, requires_grad, held, lr, group, hypers in rows:
            message = add(
                name=name,
                shape=shape,
                numel=numel,
                dtype=dtype,
                device=device,
                requires_grad=requires_grad,
                in_optimizer=held,
                settable=held and requires_grad,
                lr=lr,
                group=group,
            )
            if hypers:
                message.MergeFrom(hyperparameters_pb(hypers))
        return start + len(rows)

    def get_learning_rates(self, request: pb.GetLearningRatesRequest, check: Check | None = None) -> pb.GetLearningRatesResponse:
        reading = _VersionedReading(request, "rates")
        selectors, start, size, bound_to = reading.selectors, reading.start, reading.size, reading.bound_to
        rows, version, step, total = self.source.read_page(selectors, start, size, check=check)
        reading.check_version(version, "learning rates")
        if size is not None:  # a paged reading: each page fits a default client
            fit = rows_fitting(_utf8_len(r.name) + _utf8_len(r.schedule) + _RATE_ROW_BYTES for r in rows)
            if fit is not None:
                rows = rows[:fit]
        end = start + len(rows)
        response = pb.GetLearningRatesResponse(
            version=version,
            step=step,
            total_size=total,
            next_page_token=encode_token("rates", end, bound_to, version) if end < total else "",
        )
        add = response.rates.add
        for row in rows:
            add(name=row.name, lr=row.lr, group=row.group, base=row.base, factor=row.factor,
                pinned=row.pinned, schedule=row.schedule)
        return response

    def get_schedules(self, request: pb.GetSchedulesRequest, check: Check | None = None) -> pb.GetSchedulesResponse:
        reading = _VersionedReading(request, "schedules")
        selectors, start, size, bound_to = reading.selectors, reading.start, reading.size, reading.bound_to
        rows, version, step, total = self.source.schedules(selectors, start, size, check=check)
        reading.check_version(version, "schedules")
        response = pb.GetSchedulesResponse(version=version, step=step, total_size=total)
        messages: dict[int, tuple[pb.Schedule, str, int]] = {}  # one message per distinct schedule
        add = response.schedules.add
        used = 0
        for k, row in enumerate(rows):
            cached = messages.get(row.schedule_id)
            if cached is None:
                text = "" if row.schedule_id == 0 else row.schedule.describe()
                message = schedule_to_pb(row.schedule)
                cached = messages[row.schedule_id] = (message, text, message.ByteSize() + _utf8_len(text))
            used += _utf8_len(row.name) + cached[2] + _RATE_ROW_BYTES
            if size is not None and k and used > PAGE_BYTES:  # a paged reading fits a default client
                rows = rows[:k]
                break
            add(name=row.name, base=row.base, pin=row.pin, schedule=cached[0], description=cached[1])
        end = start + len(rows)
        if end < total:
            response.next_page_token = encode_token("schedules", end, bound_to, version)
        return response

