"""Property-based fuzzing of every LearningRateControl method (issue 15, "Proof").

A real worker (a ~40-parameter model, some frozen, AdamW, a background thread stepping
it, a real gRPC server on 127.0.0.1:0) receives:
  * requests built from each method's *descriptor* by a generic strategy (every field
    kind: strings biased toward real names and selector syntax, huge, unicode and
    control text; NaN, +-inf, -0.0, huge and negative numbers; unknown enum values;
    repeated, nested, oneof and optional fields), and
  * raw bytes sent as the serialized request (random, mutated valid requests, strings
    that are not UTF-8).
The methods come from `lrctl_pb2`'s service descriptor, so RPCs and fields added later
are fuzzed without touching this file; only the public API is used (stubs, health).

Properties, for every call:
  * OK, or a status in ALLOWED with a non-empty message (never UNKNOWN or INTERNAL,
    which the README reserves for lrctl's own bugs);
  * a failed call changes nothing: same config version, same rates (a call that
    returns OK may change them); no applied history record ever names a failed call (each
    call carries a unique "lrctl-user", which the history records; a change accepted and
    then failed at its step, say on an expected_version that a change queued ahead of it
    moved, is recorded as failed, with the status its caller got);
  * the worker stays healthy (health Check SERVING), training keeps advancing, and no
    "lrctl" or "grpc" logger reports an error.

Bounded for CI: FUZZ_EXAMPLES (default 150) examples per method and test. A long run:
    LRCTL_FUZZ_EXAMPLES=3000 python -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import grpc
import pytest
import torch
from google.protobuf import descriptor as _descriptor
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lrctl.server import attach
from lrctl.v1 import lrctl_pb2 as pb
from lrctl.v1 import lrctl_pb2_grpc as pb_grpc

torch.set_num_threads(1)

FUZZ_EXAMPLES = int(os.environ.get("LRCTL_FUZZ_EXAMPLES", "150"))
settings.register_profile(
    "lrctl-fuzz",
    max_examples=FUZZ_EXAMPLES,
    deadline=None,  # a shared 2-core machine: no per-example time limit
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much, HealthCheck.large_base_example],
    print_blob=True,
)
FUZZ = settings.get_profile("lrctl-fuzz")

SERVICE = pb.DESCRIPTOR.services_by_name["LearningRateControl"]
METHODS = list(SERVICE.methods)
ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}
# Deadlines: a waiting call may wait for a far step, so it gets a short one (the worker
# withdraws the change and answers DEADLINE_EXCEEDED 0.1 s before it); others get a
# generous one that only a stuck worker reaches.
WAIT_TIMEOUT_S = 2.0
CALL_TIMEOUT_S = 20.0
# A server stream (WatchMetrics) may rightly stay quiet: changes_only with no change, a
# from_step far ahead. It is read for this long at most; a quiet one is not a failure.
STREAM_READ_S = 0.25
PATIENCE_S = 60.0
# grpc's own text for a deadline that the client hit before any answer: the outcome of
# such a call is unknown (the README's "check lrctl history" case), not a rejection.
CLIENT_DEADLINE = "Deadline Exceeded"


# --- the worker -------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(torch.relu(self.fc1(x))))


class FuzzModel(nn.Module):
    """40 named parameters: embed, 6 blocks (fc1, fc2, norm), head."""

    def __init__(self, width: int = 8, depth: int = 6) -> None:
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


NAMES = tuple(n for n, _ in FuzzModel().named_parameters())


def _fuzz_job() -> tuple[FuzzModel, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = FuzzModel()
    # blocks.0 is frozen and not in the optimizer; blocks.5.norm is frozen but held.
    model.blocks[0].requires_grad_(False)
    model.blocks[5].norm.requires_grad_(False)
    blocks = [p for n, p in model.named_parameters() if n.startswith("blocks.") and not n.startswith("blocks.0.")]
    others = [p for n, p in model.named_parameters() if not n.startswith("blocks.")]
    optimizer = torch.optim.AdamW([{"params": blocks, "lr": 1e-3}, {"params": others, "lr": 1e-2}])
    return model, optimizer


class ErrorLog(logging.Handler):
    """Keeps every ERROR (or worse) record of the loggers it is attached to."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self, start: int = 0) -> str:
        return "\n".join(self.format(r) for r in self.records[start:])


@dataclass
class Live:
    """What the strategies draw from at run time: strings the worker answered with
    (page tokens, ...), its step and its version."""

    strings: list[str] = field(default_factory=lambda: list(NAMES))
    step: int = 0
    version: int = 0

    def remember(self, message: Any) -> None:
        for text in _string_values(message):
            if text and text not in self.strings:
                self.strings.append(text)
                if len(self.strings) > 400:
                    del self.strings[len(NAMES)]


LIVE = Live()


class Worker:
    """The fuzzed worker: a model training on a background thread, served on port 0."""

    def __init__(self, log: ErrorLog) -> None:
        self.log = log  # errors logged by the worker's "lrctl" and "grpc" loggers
        self.model, self.optimizer = _fuzz_job()
        self.ctl = attach(self.model, self.optimizer, address="127.0.0.1:0")
        self.channel = grpc.insecure_channel(self.ctl.address)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.stub = pb_grpc.LearningRateControlStub(self.channel)  # for the checks' own reads
        self.steps = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._train, name="fuzz-trainer", daemon=True)
        self._thread.start()
        self._calls = itertools.count()
        self.ok_calls: set[str] = set()
        self.failed_calls: set[str] = set()
        self.unknown_calls: set[str] = set()
        self.statuses: Counter[tuple[str, str]] = Counter()  # (method, status) -> calls

    def _train(self) -> None:
        gen = torch.Generator().manual_seed(1)
        try:
            while not self._stop.is_set():
                x = torch.randn(16, 8, generator=gen)
                self.optimizer.zero_grad(set_to_none=True)
                self.model(x).pow(2).mean().backward()
                self.optimizer.step()
                self.steps += 1
                LIVE.step = self.steps
                self._stop.wait(0.001)
        except BaseException as exc:  # training must never die; the tests check this
            self.errors.append(exc)

    def call_id(self) -> str:
        return f"fuzz-{next(self._calls)}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(PATIENCE_S)
        self.channel.close()
        self.ctl.close(grace=0.5)


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    log = ErrorLog()
    loggers = [logging.getLogger("lrctl"), logging.getLogger("grpc")]
    for logger in loggers:
        logger.addHandler(log)
    w = Worker(log)
    try:
        yield w
        print(f"\nfuzz: {sum(w.statuses.values())} calls, {w.steps} training steps; status per method:")
        for name in sorted({m for m, _ in w.statuses}):
            counts = ", ".join(f"{code} {n}" for (m, code), n in sorted(w.statuses.items()) if m == name)
            print(f"  {name}: {counts}")
        # A rejected call must never show up later (a withdrawn change applied anyway).
        users = {r.user for r in _history(w) if not r.status}
        assert not users & w.failed_calls, f"rejected calls in the history: {sorted(users & w.failed_calls)}"
        assert not w.errors, f"the training loop raised: {w.errors!r}"
        assert not log.records, f"the worker logged errors:\n{log.text()}"
    finally:
        w.close()
        for logger in loggers:
            logger.removeHandler(log)


# --- calling any method with bytes ------------------------------------------------------

def _message_class(desc: _descriptor.Descriptor) -> type:
    return message_factory.GetMessageClass(desc)


def _path(method: _descriptor.MethodDescriptor) -> str:
    return f"/{SERVICE.full_name}/{method.name}"


def _identity(data: bytes) -> bytes:
    return data


@dataclass
class Result:
    code: grpc.StatusCode
    details: str
    replies: list[Any]


def call(channel: grpc.Channel, method: _descriptor.MethodDescriptor, payload: bytes,
         timeout: float, user: str) -> Result:
    """Send `payload` as is as the request of `method`; streams are read a little, then cancelled."""
    decode = _message_class(method.output_type).FromString
    metadata = (("lrctl-user", user),)
    kind = (method.client_streaming, method.server_streaming)
    try:
        if kind == (False, False):
            rpc = channel.unary_unary(_path(method), request_serializer=_identity, response_deserializer=decode)
            return Result(grpc.StatusCode.OK, "", [rpc(payload, timeout=timeout, metadata=metadata)])
        if kind == (True, False):
            rpc = channel.stream_unary(_path(method), request_serializer=_identity, response_deserializer=decode)
            return Result(grpc.StatusCode.OK, "", [rpc(iter([payload] * 2), timeout=timeout, metadata=metadata)])
        if kind == (False, True):
            rpc = channel.unary_stream(_path(method), request_serializer=_identity, response_deserializer=decode)
            stream = rpc(payload, timeout=STREAM_READ_S, metadata=metadata)
        else:
            rpc = channel.stream_stream(_path(method), request_serializer=_identity, response_deserializer=decode)
            stream = rpc(iter([payload] * 2), timeout=STREAM_READ_S, metadata=metadata)
        replies: list[Any] = []
        try:
            replies.extend(itertools.islice(stream, 3))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED or exc.details() != CLIENT_DEADLINE:
                raise
            return Result(grpc.StatusCode.OK, "", replies)  # a quiet stream: read long enough
        stream.cancel()  # a watch would go on: three replies are enough
        return Result(grpc.StatusCode.OK, "", replies)
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.CANCELLED and kind[1]:
            return Result(grpc.StatusCode.OK, "", [])  # our own cancel of a stream
        return Result(code, exc.details() or "", [])


def _is_repeated(fd: _descriptor.FieldDescriptor) -> bool:
    return bool(fd.is_repeated)


def _string_values(message: Any) -> Iterator[str]:
    """Every string in a message, nested ones included (bounded)."""
    for fd, value in message.ListFields():
        if fd.type == fd.TYPE_STRING:
            yield from (value if _is_repeated(fd) else [value])
        elif fd.type == fd.TYPE_MESSAGE and _is_repeated(fd) and not fd.message_type.GetOptions().map_entry:
            for item in list(value)[:20]:
                yield from _string_values(item)
        elif fd.type == fd.TYPE_MESSAGE and not _is_repeated(fd):
            yield from _string_values(value)


def _rates(w: Worker) -> tuple[int, dict[str, tuple]]:
    """(version, name -> what a failed call must not change). The rate in force moves
    with the step under a schedule, so it is compared only when constant or pinned."""
    reply = w.stub.GetLearningRates(pb.GetLearningRatesRequest(), timeout=CALL_TIMEOUT_S)
    LIVE.version = reply.version
    return reply.version, {
        r.name: (r.base, r.pinned, r.schedule, r.lr if (r.pinned or not r.schedule) else None)
        for r in reply.rates
    }


def _history(w: Worker, after: int = 0) -> list[pb.ChangeRecord]:
    records: list[pb.ChangeRecord] = []
    token = ""
    while True:
        page = w.stub.ListChanges(pb.ListChangesRequest(after_version=after, page_token=token, page_size=1000,
                                          max_changes_per_record=1), timeout=CALL_TIMEOUT_S)
        records.extend(page.changes)
        token = page.next_page_token
        if not token:
            return records


def _waits(payload_message: Any) -> bool:
    """Does this request ask to wait for a step? (any bool field named "wait" set)"""
    fd = payload_message.DESCRIPTOR.fields_by_name.get("wait") if payload_message is not None else None
    return bool(fd is not None and fd.type == fd.TYPE_BOOL and getattr(payload_message, "wait"))


def check_call(w: Worker, method: _descriptor.MethodDescriptor, payload: bytes, message: Any = None) -> Result:
    """Send one fuzzed request and check every property."""
    if message is None:  # raw bytes: do they decode to a waiting request?
        try:
            message = _message_class(method.input_type).FromString(payload)
        except Exception:
            message = None
    timeout = WAIT_TIMEOUT_S if _waits(message) else CALL_TIMEOUT_S
    logged = len(w.log.records)
    version, rates = _rates(w)
    user = w.call_id()
    result = call(w.channel, method, payload, timeout, user)
    w.statuses[method.name, result.code.name] += 1
    if result.code == grpc.StatusCode.OK:
        w.ok_calls.add(user)
        for reply in result.replies:
            LIVE.remember(reply)
    else:
        assert result.code in ALLOWED, (
            f"{method.name} answered {result.code.name}: {result.details!r}\nrequest: {message!r}\nbytes: {payload[:300]!r}"
        )
        assert result.details.strip(), f"{method.name} answered {result.code.name} without a message"
        if result.code == grpc.StatusCode.DEADLINE_EXCEEDED and result.details == CLIENT_DEADLINE:
            w.unknown_calls.add(user)  # the client gave up first: its outcome is unknown
        else:
            w.failed_calls.add(user)
            after_version, after_rates = _rates(w)
            if after_version == version:
                assert after_rates == rates, f"{method.name} failed ({result.code.name}) but rates changed"
            else:  # earlier accepted changes landed meanwhile: none of them may be this call
                records = _history(w, after=version)
                applied = [r for r in records if not r.status]
                assert user not in {r.user for r in applied}, (
                    f"{method.name} failed ({result.code.name}: {result.details}) but was applied"
                )
                told = {r.status for r in records if r.user == user}
                assert told <= {result.code.name}, f"{method.name} failed ({result.code.name}) but recorded {told}"
                strangers = {r.user for r in applied} - w.ok_calls - w.unknown_calls
                assert not strangers, f"changes applied that no call was told of: {strangers}"
    reply = w.health.Check(health_pb2.HealthCheckRequest(service=SERVICE.full_name), timeout=CALL_TIMEOUT_S)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert not w.errors, f"the training loop raised: {w.errors!r}"
    new = w.log.records[logged:]
    assert not new, f"{method.name}: the worker logged errors:\n{w.log.text(logged)}"
    calls = sum(w.statuses.values())
    if calls % 20 == 0:  # training keeps advancing: the step moves past where it was
        _advancing(w, w.steps)
    return result


# --- strategies from descriptors --------------------------------------------------------

_NO_SURROGATES = st.characters(blacklist_categories=("Cs",))
_SELECTOR_SAMPLES = [
    "*", "**", "?", "*.weight", "*.bias", "blocks.*", "blocks.?.fc1.*", "blocks.[1-3].*", "blocks.[!0].*",
    "blocks.0.*", "blocks.5.norm.*", "[", "*[", "[]", "[!]", "\\", "head.*", "embed.weight ", " embed.weight",
    "re:", "re:.", "re:.*", "re:(", "re:)", "re:[", "re:weight$", r"re:^blocks\.[0-9]+\.", r"re:^blocks\.0\.",
    "re:(?:a{100}){100}", "re:(?:a{1000}){1000}", "re:(a+)+$", "re:(a|aa)*b", "re:[z-a]", "re:\\", "re:(?P<x>",
    "re:a{1001}", "re:(?:(?:a{50}){50}){50}", "re:(?i)HEAD", "re:\\p{L}+", "re:(?<=x)y", "re:\\1", "re:^$",
    "re:" + "a?" * 30 + "a" * 30, "re:(?:x+x+)+y", "re:" + "(" * 200 + ")" * 200, "re:[\\d-z]", "re:\x00",
    "*" * 4096, "a" * 4097, "re:" + "." * 4093, "embed.weight\x00", "embed.weight\n", "ＥＭＢＥＤ.weight",
]


def _sized_text() -> st.SearchStrategy[str]:
    small = st.text(_NO_SURROGATES, max_size=40)
    control = st.text(st.characters(max_codepoint=0x9F, blacklist_categories=("Cs",)), max_size=40)
    # Long text costs little entropy: a short piece repeated (up to 64 KiB).
    huge = st.builds(lambda piece, n: (piece * n)[:n], st.text(_NO_SURROGATES, min_size=1, max_size=8),
                     st.integers(1, 65536))
    return st.one_of(small, control, huge, st.just(""))


@st.composite
def _live_string(draw: st.DrawFn) -> str:
    pool = LIVE.strings
    return pool[draw(st.integers(0, 10**6)) % len(pool)]


def strings() -> st.SearchStrategy[str]:
    names = st.sampled_from(NAMES)
    near_names = st.one_of(
        names.map(lambda n: n.rsplit(".", 1)[0] + ".*"),
        names.map(lambda n: "re:^" + re.escape(n) + "$"),
        names.map(lambda n: "re:" + re.escape(n.split(".")[0])),
        st.tuples(names, st.text(_NO_SURROGATES, max_size=3)).map(lambda t: t[0] + t[1]),
        names.map(lambda n: n[:-1]),
        names.map(str.upper),
    )
    return st.one_of(names, near_names, st.sampled_from(_SELECTOR_SAMPLES), _live_string(), _sized_text())


_INT_RANGES = {
    _descriptor.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    _descriptor.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    _descriptor.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    _descriptor.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    _descriptor.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    _descriptor.FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    _descriptor.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    _descriptor.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    _descriptor.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    _descriptor.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


@st.composite
def _near_live(draw: st.DrawFn, lo: int, hi: int) -> int:
    """Around the worker's step or version now: valid at_step / expected_version values.
    (Clamped, not filtered: what is drawn must not depend on the live values, or
    Hypothesis sees a different choice sequence each time it replays an example.)"""
    base = LIVE.step if draw(st.booleans()) else LIVE.version
    return min(max(base + draw(st.integers(-3, 30)), lo), hi)


def integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = [v for v in (0, 1, 2, 3, -1, 5, 10, 100, 1000, 5000, 5001, 50000, 50001, 200000, 2**31 - 1,
                         -(2**31), 2**53, 2**62, 2**62 + 1, 2**63 - 1, -(2**63), lo, hi) if lo <= v <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(max(lo, -5), min(hi, 60)),
                     _near_live(lo, hi), st.integers(lo, hi))


def doubles(width: int = 64) -> st.SearchStrategy[float]:
    specials = [0.0, -0.0, math.nan, math.inf, -math.inf, 1e-3, 1e-2, 0.1, 0.5, 1.0, 2.0, 10.0, -1.0, 1e-300,
                5e-324, 3.4e38, 3.5e38, 1e308, -1e308, 1.7976931348623157e308]
    if width == 32:
        specials = [v for v in specials if not math.isfinite(v) or abs(v) <= 3.4e38]
    return st.one_of(st.sampled_from(specials), st.floats(width=width))


def enums(enum: _descriptor.EnumDescriptor) -> st.SearchStrategy[int]:
    valid = [v.number for v in enum.values]
    return st.one_of(st.sampled_from(valid), st.integers(-(2**31), 2**31 - 1))


def scalars(fd: _descriptor.FieldDescriptor, tame: bool = False) -> st.SearchStrategy[Any]:
    """Values of one scalar field. `tame` draws plausible values (real names, small
    positive numbers, defined enum values) so that whole requests are often valid."""
    t = fd.type
    if t == fd.TYPE_STRING:
        return tame_strings() if tame else strings()
    if t == fd.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == fd.TYPE_BOOL:
        return st.booleans()
    if t in (fd.TYPE_DOUBLE, fd.TYPE_FLOAT):
        if tame:
            return st.one_of(st.floats(1e-5, 2.0), st.sampled_from([1e-3, 0.5, 1.0, 2.0]))
        return doubles(32 if t == fd.TYPE_FLOAT else 64)
    if t == fd.TYPE_ENUM:
        if tame:
            valid = [v.number for v in fd.enum_type.values]
            return st.sampled_from([v for v in valid if v] or valid)
        return enums(fd.enum_type)
    if t in _INT_RANGES:
        lo, hi = _INT_RANGES[t]
        if tame:
            return st.one_of(st.integers(1, 10), st.integers(10, 1000), _near_live(lo, hi),
                             st.builds(lambda: LIVE.version))
        return integers(lo, hi)
    raise AssertionError(f"field {fd.full_name} has a type this fuzzer does not know: {t}")


def tame_strings() -> st.SearchStrategy[str]:
    names = st.sampled_from(NAMES)
    return st.one_of(
        names,
        names.map(lambda n: n.rsplit(".", 1)[0] + ".*"),
        names.map(lambda n: "re:^" + re.escape(n.rsplit(".", 1)[0])),
        st.sampled_from(["*", "*.weight", "*.bias", "blocks.[1-4].*", "re:fc[12]", "head.*"]),
    )


MAX_DEPTH = 5


def _values(fd: _descriptor.FieldDescriptor, depth: int, tame: bool) -> st.SearchStrategy[Any]:
    if fd.type == fd.TYPE_MESSAGE:
        return messages(fd.message_type, depth + 1, tame)
    return scalars(fd, tame)


@st.composite
def _repeated(draw: st.DrawFn, fd: _descriptor.FieldDescriptor, depth: int, tame: bool) -> list[Any]:
    item = _values(fd, depth, tame)
    if tame:
        return draw(st.lists(item, min_size=1, max_size=2))
    if draw(st.integers(0, 9)) == 0:  # many copies of one item: big batches, cheaply
        return [draw(item)] * draw(st.integers(5, 300))
    return draw(st.lists(item, max_size=4))


@st.composite
def _fill(draw: st.DrawFn, desc: _descriptor.Descriptor, depth: int, tame: bool | None) -> Any:
    if tame is None:  # chosen once per request, then the same for its nested messages
        tame = draw(st.booleans())
    message = _message_class(desc)()
    if depth > MAX_DEPTH:
        return message
    chosen = {}
    for oneof in desc.oneofs:  # a real oneof: one member, or none
        if not _synthetic(oneof):
            chosen[oneof.full_name] = draw(st.sampled_from(list(oneof.fields) if tame else [None, *oneof.fields]))
    for fd in desc.fields:
        oneof = fd.containing_oneof
        if oneof is not None and oneof.full_name in chosen:
            if chosen[oneof.full_name] is not fd:
                continue
        elif not draw(st.integers(0, 9)) < _presence(fd, tame):
            continue  # absent (or the default)
        try:
            _set(message, fd, draw, depth, tame)
        except (ValueError, TypeError, OverflowError):
            pass  # a value protobuf itself refuses to hold: leave the field unset
    return message


def _presence(fd: _descriptor.FieldDescriptor, tame: bool) -> int:
    """In tenths: how often a field is set. A tame message sets most fields, but few of
    its `optional` ones (their absence is a meaning of its own: "next step", "any version")."""
    if not tame:
        return 5
    optional = fd.containing_oneof is not None and _synthetic(fd.containing_oneof)
    return 2 if optional else 9


def _synthetic(oneof: _descriptor.OneofDescriptor) -> bool:
    """A proto3 `optional` field's hidden oneof."""
    return len(oneof.fields) == 1 and oneof.name.startswith("_") and oneof.fields[0].name == oneof.name[1:]


def _set(message: Any, fd: _descriptor.FieldDescriptor, draw: st.DrawFn, depth: int, tame: bool) -> None:
    target = getattr(message, fd.name)
    if _is_repeated(fd) and fd.type == fd.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
        key_fd, value_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
        pairs = st.tuples(scalars(key_fd, tame), _values(value_fd, depth, tame))
        for key, value in draw(st.lists(pairs, max_size=4)):
            if value_fd.type == value_fd.TYPE_MESSAGE:
                target[key].CopyFrom(value)
            else:
                target[key] = value
    elif _is_repeated(fd):
        values = draw(_repeated(fd, depth, tame))
        if fd.type == fd.TYPE_MESSAGE:
            for value in values:
                target.add().CopyFrom(value)
        else:
            target.extend(values)
    elif fd.type == fd.TYPE_MESSAGE:
        target.CopyFrom(draw(messages(fd.message_type, depth + 1, tame)))
    else:
        setattr(message, fd.name, draw(scalars(fd, tame)))


_MESSAGES: dict[tuple[str, int, bool | None], st.SearchStrategy[Any]] = {}


def messages(desc: _descriptor.Descriptor, depth: int = 0, tame: bool | None = None) -> st.SearchStrategy[Any]:
    """Random messages of any type, from its descriptor alone: half of them wild, half
    tame (plausible values throughout; unset `tame` draws which)."""
    key = (desc.full_name, depth, tame)
    if key not in _MESSAGES:
        _MESSAGES[key] = st.deferred(lambda: _fill(desc, depth, tame))
    return _MESSAGES[key]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@st.composite
def raw_payloads(draw: st.DrawFn, desc: _descriptor.Descriptor) -> bytes:
    """Bytes as a serialized request: random; a valid request mutated; or a string
    field (of this type, by its number) that is not UTF-8."""
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.binary(max_size=512))
    if kind == 1:
        data = bytearray(draw(messages(desc)).SerializeToString())
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.integers(0, 3))
            # A fraction of the length: the length depends on live values (see _near_live).
            at = draw(st.integers(0, 1 << 16)) * len(data) >> 16
            if op == 0 and data:
                data[min(at, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
            elif op == 1:
                del data[at:]
            elif op == 2:
                data[at:at] = draw(st.binary(min_size=1, max_size=16))
            else:
                data += data[:at]
        return bytes(data)
    strings_fds = [fd for fd in desc.fields if fd.type == fd.TYPE_STRING] or list(desc.fields)
    fd = draw(st.sampled_from(strings_fds)) if strings_fds else None
    number = fd.number if fd is not None else 1
    bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"a\x80b", b"\xf8\x88\x80\x80\x80"]))
    return _varint(number << 3 | 2) + _varint(len(bad)) + bad + draw(st.binary(max_size=16))


# --- the tests --------------------------------------------------------------------------

_IDS = [m.name for m in METHODS]


def test_every_method_is_fuzzed() -> None:
    """The service descriptor is the list: nothing skipped, none of unknown shape."""
    assert _IDS, "no methods in the LearningRateControl descriptor"
    for method in METHODS:
        assert _message_class(method.input_type)().SerializeToString() == b""


@pytest.mark.parametrize("method", METHODS, ids=_IDS)
@FUZZ
@given(data=st.data())
def test_fuzzed_requests(worker: Worker, method: _descriptor.MethodDescriptor, data: st.DataObject) -> None:
    request = data.draw(messages(method.input_type), label="request")
    check_call(worker, method, request.SerializeToString(), request)


@pytest.mark.parametrize("method", METHODS, ids=_IDS)
@FUZZ
@given(data=st.data())
def test_raw_bytes(worker: Worker, method: _descriptor.MethodDescriptor, data: st.DataObject) -> None:
    payload = data.draw(raw_payloads(method.input_type), label="payload")
    check_call(worker, method, payload)


def _advancing(w: Worker, start: int) -> None:
    """Training still steps: the counter moves past `start` (a generous wait, no timing)."""
    deadline_step = start + 1
    stop = threading.Event()
    for _ in range(int(PATIENCE_S / 0.01)):
        if w.steps >= deadline_step or w.errors:
            break
        stop.wait(0.01)
    assert not w.errors, f"the training loop raised: {w.errors!r}"
    assert w.steps >= deadline_step, f"training stalled at step {w.steps}"


def test_rejected_writes_never_land_and_training_advanced(worker: Worker) -> None:
    """Run last in this module: every call so far was answered, training advanced past them."""
    start = worker.steps
    _advancing(worker, start)
    users = {r.user for r in _history(worker) if not r.status}
    assert not users & worker.failed_calls
    assert users <= worker.ok_calls | worker.unknown_calls | {""}, users - worker.ok_calls - worker.unknown_calls
    assert worker.steps > 0
