"""LRClient: the Python client of a worker's LearningRateControl service.

A thin layer on the generated stubs: it adds a deadline and the caller's name to every
call, turns replies into typed results (lrctl.client.types) and every gRPC error into
the matching lrctl.client.errors exception. grpcio and protobuf only; never torch.
"""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar, Union

import grpc

from lrctl.client.errors import (
    AbortedError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    LrctlError,
    TLSError,
    UnavailableError,
    error_for_status,
)
from lrctl.client.tls import ClientTLS, PemSource
if TYPE_CHECKING:
    from lrctl.client.lockstep import LockstepSession
from lrctl.client.types import (
    CancelResult,
    ChangeList,
    ChangeRecord,
    LearningRate,
    LearningRates,
    MetricsEvent,
    NameSchedule,
    ParameterInfo,
    PendingChange,
    ScheduleAssignment,
    SetResult,
    Status,
    Update,
)
from lrctl.common.addresses import CLIENT_PASSTHROUGH_SCHEMES, UnixPath, parse_address
from lrctl.common.schedule_messages import schedule_to_pb
from lrctl.common.schedules import Schedule
from lrctl.v1 import lrctl_pb2, lrctl_pb2_grpc

__all__ = ["LRClient", "ClientTLS", "DEFAULT_ADDRESS", "ADDRESS_ENV", "TOKEN_ENV", "TOKEN_FILE_ENV",
           "default_address", "default_token", "default_user"]

DEFAULT_ADDRESS = "127.0.0.1:50051"
ADDRESS_ENV = "LRCTL_ADDRESS"
# The bearer token: from the environment or a file, never from the command line
# (other users can read process arguments).
TOKEN_ENV = "LRCTL_TOKEN"
TOKEN_FILE_ENV = "LRCTL_TOKEN_FILE"
USER_METADATA_KEY = "lrctl-user"
MAX_REPLY_BYTES = 64 * 1024 * 1024

_Reply = TypeVar("_Reply")
_Message = TypeVar("_Message")
Updates = Union[Mapping[str, float], Iterable[Update]]


def _message(cls: Callable[..., _Message], **fields: Any) -> _Message:
    """cls(**fields), with a value the wire cannot carry (an int out of its field's
    range, a float for an int) as InvalidArgumentError naming the field."""
    try:
        return cls(**fields)
    except (ValueError, TypeError) as exc:
        for name, value in fields.items():
            try:
                cls(**{name: value})
            except (ValueError, TypeError) as field_exc:
                raise InvalidArgumentError(f"{name} {value!r}: {field_exc}") from None
        raise InvalidArgumentError(str(exc)) from None


_WITHDRAWN_UNLESS_APPLIED = (
    "the worker withdraws a change whose caller gave up, unless it was applied at that "
    "very step: `lrctl history` tells"
)

# A paged reading interrupted by changes this many times in a row gives up.
_PAGED_READ_ATTEMPTS = 3


def default_address() -> str:
    """The worker address to use when none is given: $LRCTL_ADDRESS, else 127.0.0.1:50051."""
    return os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS


def read_token_file(path: str) -> str:
    """The token in a file (surrounding whitespace removed); InvalidArgumentError
    naming the file if it cannot be read or is empty."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read the token file {path!r}: {exc.strerror}") from None
    if not token:
        raise InvalidArgumentError(f"the token file {path!r} is empty")
    return token


def default_token() -> Optional[str]:
    """$LRCTL_TOKEN, else the contents of $LRCTL_TOKEN_FILE, else None."""
    token = os.environ.get(TOKEN_ENV)
    if token:
        return token.strip()
    path = os.environ.get(TOKEN_FILE_ENV)
    return read_token_file(path) if path else None


def default_user() -> str:
    """"user@host" of this process, as sent in the lrctl-user metadata."""
    try:
        user = getpass.getuser()
    except Exception:  # no login name (e.g. a container uid without a passwd entry)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _metadata_value(text: str) -> str:
    """`text` made safe for an ASCII gRPC metadata value (grpc rejects anything else)."""
    ascii_text = text.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(ch if " " <= ch <= "~" else "?" for ch in ascii_text)


def create_channel(address: str, tls: Optional[ClientTLS] = None) -> grpc.Channel:
    """The channel to a worker at `address` (HOST:PORT or unix:/path), over TLS when
    `tls` is given: the one place that decides transport security.

    InvalidArgumentError for an address without a port (gRPC would quietly try 443).
    """
    unix = False
    if not address.startswith(CLIENT_PASSTHROUGH_SCHEMES):
        try:
            unix = isinstance(parse_address(address), UnixPath)
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None
    # A GetLearningRates of every name of a 100k-parameter model can pass gRPC's 4 MiB
    # default receive limit when names are long; replies are bounded by the model.
    # A local subchannel pool: each LRClient is a connection of its own (grpc would
    # otherwise share one between channels of a process), so the worker's
    # per-connection quotas count each client separately.
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", MAX_REPLY_BYTES),
                                      ("grpc.use_local_subchannel_pool", 1)]
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.credentials(), options=options + tls.channel_options(unix))


def _tls_reason(details: str, marker: str) -> str:
    """The OpenSSL reason after `marker` in grpc's text ("unable to get local issuer
    certificate", "certificate has expired"), or ""."""
    _, found, rest = details.partition(marker + ": ")
    return rest.split(":", 1)[0].strip() if found else ""


class LRClient:
    """Client of a running worker: list parameters, read and change their learning rates.

    Use it as a context manager, or call close(). Every call has a deadline (`timeout`
    seconds, overridable per call) and raises an lrctl.client.errors.LrctlError subclass
    on failure, never a raw grpc.RpcError. `token` is the worker's bearer token
    (default: $LRCTL_TOKEN, else the file $LRCTL_TOKEN_FILE names).

    `address` is HOST:PORT or unix:/path. TLS: `tls_ca` is the CA that signed the
    worker's certificate, `tls_cert` and `tls_key` this client's certificate and key
    for mutual TLS (both or neither), each a path of a PEM file or the PEM bytes; by
    default $LRCTL_TLS_CA, $LRCTL_TLS_CERT and $LRCTL_TLS_KEY. `tls_server_name`
    ($LRCTL_TLS_SERVER_NAME) is the name to check in the worker's certificate instead
    of the address's host (e.g. when connecting by IP to a certificate for a name).
    Any of these turns TLS on; with none, the channel is plaintext. A bad address or
    file raises InvalidArgumentError here; a failed handshake raises TLSError (an
    UnavailableError) at the first call, saying which side to fix.
    """

    def __init__(
        self,
        address: Optional[str] = None,
        *,
        timeout: float = 10.0,
        user: Optional[str] = None,
        token: Optional[str] = None,
        tls_ca: Optional[PemSource] = None,
        tls_cert: Optional[PemSource] = None,
        tls_key: Optional[PemSource] = None,
        tls_server_name: Optional[str] = None,
    ) -> None:
        self.address: str = address or default_address()
        self.timeout: float = timeout
        self.user: str = user or default_user()
        self._metadata: tuple[tuple[str, str], ...] = ((USER_METADATA_KEY, _metadata_value(self.user)),)
        token = token if token is not None else default_token()
        if token:
            if not token.isascii() or not token.isprintable() or " " in token:
                raise InvalidArgumentError("the token has characters a bearer token cannot carry")
            self._metadata += (("authorization", f"Bearer {token}"),)
        self.tls: Optional[ClientTLS] = ClientTLS.resolve(tls_ca, tls_cert, tls_key, tls_server_name)
        self._channel = create_channel(self.address, self.tls)
        self._stub = lrctl_pb2_grpc.LearningRateControlStub(self._channel)

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel; the client cannot be used afterwards."""
        self._channel.close()

    def __enter__(self) -> LRClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LRClient(address={self.address!r}, timeout={self.timeout!r})"

    def wait_until_ready(self, timeout: Optional[float] = None) -> None:
        """Block until the channel is connected; UnavailableError after `timeout` seconds."""
        limit = self.timeout if timeout is None else timeout
        try:
            grpc.channel_ready_future(self._channel).result(timeout=limit)
        except grpc.FutureTimeoutError:
            raise UnavailableError(
                f"no lrctl worker reachable at {self.address} within {limit:g}s"
            ) from None

    # -- the calls -------------------------------------------------------------------

    def health(self, service: str = "", *, timeout: Optional[float] = None) -> str:
        """The worker's standard gRPC health status for `service` ("" = the server):
        "SERVING", "NOT_SERVING", ... (grpc.health.v1). It needs no token and no health
        stubs. UnavailableError when nothing answers; NotFoundError for an unknown service."""
        from lrctl.client import health  # small, but only this call needs it

        check = self._channel.unary_unary(
            health.CHECK_METHOD, request_serializer=None, response_deserializer=None)
        reply = self._call(check, health.encode_request(service), timeout)
        try:
            return health.decode_status(reply)
        except ValueError as exc:
            raise InternalError(f"the server at {self.address} sent a bad health reply: {exc}") from None

    def _call(
        self,
        method: Callable[..., _Reply],
        request: Any,
        timeout: Optional[float],
        *,
        on_deadline: Optional[str] = None,
    ) -> _Reply:
        """Invoke one RPC with deadline and metadata, translating gRPC errors."""
        limit = self.timeout if timeout is None else timeout
        try:
            return method(request, timeout=limit, metadata=self._metadata)
        except grpc.RpcError as exc:
            # `from None`: the grpc internals add nothing for a user; the status does.
            raise self._error(exc, limit, on_deadline) from None

    def _error(self, exc: grpc.RpcError, limit: float, on_deadline: Optional[str]) -> LrctlError:
        """The LrctlError for a failed call, naming the address where that helps."""
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = (exc.details() if hasattr(exc, "details") else None) or str(code)
        if code == grpc.StatusCode.UNAVAILABLE:
            return self._tls_error(details) or UnavailableError(
                f"cannot reach lrctl worker at {self.address}: {details}")
        if code == grpc.StatusCode.UNIMPLEMENTED:
            # Another gRPC server, or a worker too old for this call.
            return error_for_status(code, (
                f"the server at {self.address} does not serve this lrctl call ({details}); "
                "is it an lrctl worker, of a version at least this client's?"
            ))
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and details == "Deadline Exceeded":
            # The deadline expired on this side; say what that means for this call.
            message = f"no answer from {self.address} within {limit:g}s"
            return DeadlineExceededError(f"{message}; {on_deadline}" if on_deadline else message)
        return error_for_status(code, details)

    def _tls_error(self, details: str) -> Optional[TLSError]:
        """A one-line TLSError for a connection that failed on transport security, or None.

        grpc tells these apart only in its free text (checked with grpcio 1.85):
        a server that closes a fresh connection ("Socket closed") is what a plaintext
        client meets at a TLS worker, and a TLS client without an accepted certificate
        at a mutual-TLS worker.
        """
        where = f"cannot reach lrctl worker at {self.address}"
        if self.tls is None:
            if "Socket closed" in details or "Connection reset" in details:
                return TLSError(
                    f"{where}: it closed the connection at once; if it uses TLS, pass --tls-ca "
                    "CA.pem (LRCTL_TLS_CA, LRClient(tls_ca=...)), and --tls-cert and --tls-key "
                    "if it requires client certificates")
            return None
        if "WRONG_VERSION_NUMBER" in details:
            return TLSError(f"{where}: TLS handshake failed: the worker does not speak TLS on "
                            "that address (leave out --tls-ca/--tls-cert/--tls-key and LRCTL_TLS_*)")
        if "CERTIFICATE_VERIFY_FAILED" in details:
            reason = _tls_reason(details, "CERTIFICATE_VERIFY_FAILED") or "certificate verify failed"
            return TLSError(f"{where}: TLS handshake failed: the worker's certificate is not trusted "
                            f"({reason}); pass the CA that signed it with --tls-ca (LRCTL_TLS_CA)")
        if "Hostname Verification" in details:
            return TLSError(f"{where}: TLS handshake failed: the worker's certificate does not name "
                            "the host connected to; connect by a name it holds, or pass "
                            "--tls-server-name NAME (LRCTL_TLS_SERVER_NAME)")
        if "Socket closed" in details or "Connection reset" in details:
            refused = ("the worker refused this client's certificate (not signed by the CA it "
                       "trusts for clients)" if self.tls.mutual else
                       "the worker requires a client certificate: pass --tls-cert and --tls-key "
                       "(LRCTL_TLS_CERT, LRCTL_TLS_KEY)")
            return TLSError(f"{where}: it closed the connection during the TLS handshake; "
                            f"likely {refused}")
        if "handshake" in details.lower() or "SSL_ERROR" in details:
            return TLSError(f"{where}: TLS handshake failed ({details.rsplit(': ', 1)[-1]})")
        return None

    def _pages(
        self, method: Callable[..., _Reply], request_type: Callable[..., Any],
        timeout: Optional[float], **fields: Any,
    ) -> Iterator[_Reply]:
        """Each reply of a paginated call, following next_page_token to the last page."""
        token = ""
        while True:
            reply = self._call(method, _message(request_type, page_token=token, **fields), timeout)
            yield reply
            if not reply.next_page_token:  # type: ignore[attr-defined]
                return
            if reply.next_page_token == token:  # type: ignore[attr-defined]
                # A worker bug must not loop us forever.
                raise LrctlError(f"worker at {self.address} returned the same page token twice")
            token = reply.next_page_token  # type: ignore[attr-defined]

    def _parameter_pages(
        self, pattern: str, page_size: int, view: int, timeout: Optional[float]
    ) -> Iterator[lrctl_pb2.ListParametersResponse]:
        return self._pages(self._stub.ListParameters, lrctl_pb2.ListParametersRequest, timeout,
                           filter=pattern, page_size=page_size, view=view)

    def iter_parameters(
        self, pattern: str = "", page_size: int = 0, *, timeout: Optional[float] = None
    ) -> Iterator[ParameterInfo]:
        """Every parameter matching `pattern` (all when empty), in model order, page by page.

        A pattern that matches nothing yields nothing (it is a filter, not a selector).
        """
        for reply in self._parameter_pages(pattern, page_size, lrctl_pb2.PARAMETER_VIEW_FULL, timeout):
            yield from map(ParameterInfo.from_proto, reply.parameters)

    def list_parameters(
        self, pattern: str = "", page_size: int = 0, *, timeout: Optional[float] = None
    ) -> list[ParameterInfo]:
        """All parameters matching `pattern`, as a list (see iter_parameters)."""
        return list(self.iter_parameters(pattern, page_size, timeout=timeout))

    def iter_names(
        self, pattern: str = "", page_size: int = 0, *, timeout: Optional[float] = None
    ) -> Iterator[str]:
        """The names of the parameters matching `pattern`, in model order, page by page.

        Carries only names (about a tenth of iter_parameters' bytes and time), so it is
        the way to learn the names of a very large model.
        """
        for reply in self._parameter_pages(pattern, page_size, lrctl_pb2.PARAMETER_VIEW_NAMES, timeout):
            yield from reply.names

    def list_names(
        self, pattern: str = "", page_size: int = 0, *, timeout: Optional[float] = None
    ) -> list[str]:
        """All names matching `pattern`, as a list (see iter_names)."""
        return list(self.iter_names(pattern, page_size, timeout=timeout))

    def read_learning_rates(
        self, *selectors: str, page_size: int = 0, timeout: Optional[float] = None
    ) -> LearningRates:
        """Rates, groups, config version and step for `selectors` (all held when none).

        With `page_size`, reads page by page (for clients with a small receive limit);
        the reading is still at one version (its step is the last page's): a change
        between pages restarts it, up to a few times, then raises AbortedError.
        """
        if not page_size:
            request = _message(lrctl_pb2.GetLearningRatesRequest, selectors=list(selectors))
            return LearningRates.from_proto(self._call(self._stub.GetLearningRates, request, timeout))
        for _ in range(_PAGED_READ_ATTEMPTS - 1):
            try:
                return self._read_pages(list(selectors), page_size, timeout)
            except AbortedError:
                pass  # a change landed between two pages: read again at the new version
        return self._read_pages(list(selectors), page_size, timeout)

    def _read_pages(self, selectors: list[str], page_size: int, timeout: Optional[float]) -> LearningRates:
        rates: list[LearningRate] = []
        for reply in self._pages(self._stub.GetLearningRates, lrctl_pb2.GetLearningRatesRequest,
                                 timeout, selectors=selectors, page_size=page_size):
            page = LearningRates.from_proto(reply)
            rates += page.rates
        return LearningRates(rates=rates, version=page.version, step=page.step)

    def get_learning_rates(self, *selectors: str, timeout: Optional[float] = None) -> dict[str, float]:
        """name -> rate, in model order, for `selectors` (every held parameter when none).

        Each selector must match a parameter (else NotFoundError), and one the optimizer
        holds (else FailedPreconditionError).
        """
        reading = self.read_learning_rates(*selectors, timeout=timeout)
        return {r.name: r.lr for r in reading.rates}

    def set_learning_rates(
        self,
        updates: Updates,
        *,
        dry_run: bool = False,
        at_step: Optional[int] = None,
        wait: bool = True,
        reason: str = "",
        expected_version: Optional[int] = None,
        max_reported_changes: int = 0,
        timeout: Optional[float] = None,
        schedules: Iterable[ScheduleAssignment] = (),
    ) -> SetResult:
        """Change rates as one batch, applied whole at one step boundary or not at all.

        `updates` maps selectors to new rates, or is an iterable of Update (which can
        also scale). With wait=True (default) this returns once the change is applied;
        if the deadline comes first, DeadlineExceededError says it was withdrawn.
        `max_reported_changes` caps the per-name list in the result (0: worker default).
        `schedules` are schedule assignments applied in the same batch (replay sends a
        recorded change that had both).
        """
        if isinstance(updates, Mapping):
            batch = [Update(selector, value) for selector, value in updates.items()]
        else:
            batch = list(updates)
        assignments = [lrctl_pb2.ScheduleAssignment(selector=a.selector, schedule=schedule_to_pb(a.schedule))
                       for a in schedules]
        return self._change(
            self._stub.SetLearningRates, lrctl_pb2.SetLearningRatesRequest, timeout,
            updates=[u.to_proto() for u in batch], schedules=assignments, dry_run=dry_run, wait=wait, reason=reason,
            max_reported_changes=max_reported_changes, at_step=at_step,
            expected_version=expected_version,
        )

    def _change(
        self, method: Callable[..., Any], request_type: Callable[..., Any],
        timeout: Optional[float], **fields: Any,
    ) -> SetResult:
        """One change call (set, schedules): the request from `fields`, the answer typed.

        None leaves an optional field absent ("next boundary" / "any version"); 0 is a
        meaningful value for both.
        """
        request = _message(request_type, **fields)
        waits = fields["wait"] and not fields["dry_run"]
        reply = self._call(method, request, timeout,
                           on_deadline=_WITHDRAWN_UNLESS_APPLIED if waits else None)
        return SetResult.from_proto(reply)

    def scale_learning_rates(
        self,
        selector: str,
        factor: float,
        *,
        dry_run: bool = False,
        at_step: Optional[int] = None,
        wait: bool = True,
        reason: str = "",
        expected_version: Optional[int] = None,
        max_reported_changes: int = 0,
        timeout: Optional[float] = None,
    ) -> SetResult:
        """Multiply the rates `selector` matches by `factor` (at the step it applies)."""
        return self.set_learning_rates(
            [Update(selector, factor, "scale")],
            dry_run=dry_run,
            at_step=at_step,
            wait=wait,
            reason=reason,
            expected_version=expected_version,
            max_reported_changes=max_reported_changes,
            timeout=timeout,
        )

    def pin_learning_rates(
        self, pins: Mapping[str, float], **options: Any
    ) -> SetResult:
        """Pin names at exact rates, whatever their schedule, until unpinned.

        Takes the options of set_learning_rates (wait, at_step, reason, ...).
        """
        return self.set_learning_rates(
            [Update(selector, value, "absolute", "pin") for selector, value in pins.items()], **options
        )

    def unpin(self, *selectors: str, **options: Any) -> SetResult:
        """Remove pins: the names follow base x schedule again."""
        return self.set_learning_rates([Update(s, 0.0, "unpin", "pin") for s in selectors], **options)

    def set_schedules(
        self,
        schedules: Union[Mapping[str, Optional[Schedule]], Iterable[ScheduleAssignment]],
        *,
        dry_run: bool = False,
        at_step: Optional[int] = None,
        wait: bool = True,
        reason: str = "",
        expected_version: Optional[int] = None,
        max_reported_changes: int = 0,
        timeout: Optional[float] = None,
    ) -> SetResult:
        """Give names schedules (lrctl.common.schedules; None: constant), as one batch
        applied whole at one step boundary. Bases and pins stay as they are."""
        if isinstance(schedules, Mapping):
            batch = [ScheduleAssignment(selector, spec) for selector, spec in schedules.items()]
        else:
            batch = list(schedules)
        assignments = [
            lrctl_pb2.ScheduleAssignment(selector=a.selector, schedule=schedule_to_pb(a.schedule))
            for a in batch
        ]
        return self._change(
            self._stub.SetSchedules, lrctl_pb2.SetSchedulesRequest, timeout,
            schedules=assignments, dry_run=dry_run, wait=wait, reason=reason,
            max_reported_changes=max_reported_changes, at_step=at_step,
            expected_version=expected_version,
        )

    def clear_schedules(
        self,
        *selectors: str,
        dry_run: bool = False,
        at_step: Optional[int] = None,
        wait: bool = True,
        reason: str = "",
        expected_version: Optional[int] = None,
        max_reported_changes: int = 0,
        timeout: Optional[float] = None,
    ) -> SetResult:
        """Put the names `selectors` match back on the constant schedule (rate = base)."""
        return self._change(
            self._stub.ClearSchedules, lrctl_pb2.ClearSchedulesRequest, timeout,
            selectors=list(selectors), dry_run=dry_run, wait=wait, reason=reason,
            max_reported_changes=max_reported_changes, at_step=at_step,
            expected_version=expected_version,
        )

    def get_schedules(
        self, *selectors: str, page_size: int = 0, timeout: Optional[float] = None
    ) -> list[NameSchedule]:
        """Base, pin and schedule of each name the selectors match (all held when none).

        With `page_size`, reads page by page (for clients with a small receive limit),
        at one version: a change between pages restarts the reading, up to a few
        times, then raises AbortedError.
        """
        def read() -> list[NameSchedule]:
            pages = self._pages(self._stub.GetSchedules, lrctl_pb2.GetSchedulesRequest, timeout,
                                selectors=list(selectors), page_size=page_size)
            return [NameSchedule.from_proto(m) for reply in pages for m in reply.schedules]

        for _ in range(_PAGED_READ_ATTEMPTS - 1):
            try:
                return read()
            except AbortedError:
                pass  # a change landed between two pages: read again at the new version
        return read()

    def status(self, *, timeout: Optional[float] = None) -> Status:
        """The worker's step, config version, optimizer, grouping and state."""
        reply = self._call(self._stub.GetStatus, lrctl_pb2.GetStatusRequest(), timeout)
        return Status.from_proto(reply)

    def iter_changes(
        self,
        after_version: int = 0,
        page_size: int = 0,
        *,
        max_changes_per_record: int = 0,
        timeout: Optional[float] = None,
    ) -> ChangeIterator:
        """The history after the change that made `after_version`, in order: applied
        changes and accepted changes that failed at their step (`ChangeRecord.failed`).

        Pass the last record's version to follow the history. `max_changes_per_record`
        caps each record's per-name list (0: the worker's default). The iterator's
        `gap`, `dropped` and `oldest_version` (see ChangeList) are set once its first
        page has arrived: `gap` is True when records it should have started with
        were dropped from the worker's bounded history.
        """
        return ChangeIterator(self._pages(
            self._stub.ListChanges, lrctl_pb2.ListChangesRequest, timeout, page_size=page_size,
            after_version=after_version, max_changes_per_record=max_changes_per_record,
        ))

    def list_changes(
        self,
        after_version: int = 0,
        page_size: int = 0,
        *,
        max_changes_per_record: int = 0,
        timeout: Optional[float] = None,
    ) -> ChangeList:
        """The history after `after_version`, as a list (see iter_changes) with the
        reading's `gap`, `dropped` and `oldest_version` as attributes."""
        changes = self.iter_changes(
            after_version, page_size, max_changes_per_record=max_changes_per_record, timeout=timeout
        )
        result = ChangeList(changes)
        result.gap, result.dropped, result.oldest_version = changes.gap, changes.dropped, changes.oldest_version
        return result


    def watch_metrics(
        self,
        *,
        from_step: Optional[int] = None,
        stats: bool = False,
        changes_only: bool = False,
        max_changes_per_record: int = 0,
        timeout: Optional[float] = None,
    ) -> MetricsStream:
        """Follow the job: one MetricsEvent per optimizer step (reported metrics, change
        records, config version; per-parameter statistics with `stats`), from now or
        from `from_step` if the worker still keeps it (OutOfRangeError names the oldest
        step it keeps). `changes_only`: only events with change records. A reader that
        falls behind loses the oldest events; the next event's `dropped` says how many.
        `timeout` bounds the whole stream (default: none; the client's timeout does not
        apply). Needs the reader role when the worker has tokens."""
        request = _message(lrctl_pb2.WatchMetricsRequest, from_step=from_step, include_stats=stats,
                           changes_only=changes_only, max_changes_per_record=max_changes_per_record)
        limit = timeout if timeout is not None else 0.0
        return MetricsStream(
            lambda method: method(request, timeout=timeout, metadata=self._metadata),
            self._stub, lambda exc: self._error(exc, limit, None))

    def iter_pending(self, page_size: int = 0, *, timeout: Optional[float] = None) -> Iterator[PendingChange]:
        """The accepted changes still waiting for their step, in order of acceptance,
        page by page (a change applied or cancelled meanwhile is simply absent)."""
        for reply in self._pages(self._stub.ListPending, lrctl_pb2.ListPendingRequest, timeout,
                                 page_size=page_size):
            yield from map(PendingChange.from_proto, reply.changes)

    def list_pending(self, page_size: int = 0, *, timeout: Optional[float] = None) -> list[PendingChange]:
        """All queued changes, as a list (see iter_pending)."""
        return list(self.iter_pending(page_size, timeout=timeout))

    def cancel_changes(
        self, change_ids: Iterable[int], *, reason: str = "", timeout: Optional[float] = None
    ) -> CancelResult:
        """Cancel queued changes by id: they are never applied, and a caller waiting for
        one gets AbortedError at once. Needs an admin token when the worker has tokens.
        Ids that are not queued come back in `not_found` (no error)."""
        request = _message(lrctl_pb2.CancelChangesRequest, change_ids=list(change_ids), reason=reason)
        reply = self._call(self._stub.CancelChanges, request, timeout)
        return CancelResult(cancelled=list(reply.cancelled), not_found=list(reply.not_found))

    def lockstep(self, every: int = 1, timeout: float = 1.0, *,
                 open_timeout: Optional[float] = None) -> LockstepSession:
        """Become the worker's lockstep controller: at every step S with S % every == 0
        the worker holds until the turn for S is decided or `timeout` seconds (0.001..60)
        pass; then training goes on by itself. Changes already due at S are applied
        before the hold (turn.version counts them); those decided in the turn after it.

        Returns a LockstepSession (lrctl.client.lockstep): iterate it for turns; act on a
        turn with at_step=turn.step and wait=False (they land at that step, whole), then
        call turn.decide(). Use it as a context manager: leaving it ends lockstep at once.
        Raises InvalidArgumentError for bad parameters and FailedPreconditionError when
        another controller holds lockstep (the message names it). Needs an admin token
        when the worker has tokens. `open_timeout` bounds the wait for the worker's
        answer to the open (default: the client's timeout).
        """
        from lrctl.client.lockstep import LockstepSession  # only lockstep controllers need it

        for name, value in (("every", every), ("timeout", timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    name == "every" and not isinstance(value, int)):
                raise InvalidArgumentError(f"{name} {value!r} is not a {'whole number' if name == 'every' else 'number'}")
        if not -(2**63) <= every < 2**63:
            raise InvalidArgumentError(f"every {every} is out of range")
        return LockstepSession(self, self._stub, every, float(timeout), self._metadata,
                               self.timeout if open_timeout is None else open_timeout)


class MetricsStream(Iterator[MetricsEvent]):
    """The events of a WatchMetrics stream (LRClient.watch_metrics), as they happen.

    Iterate it (it ends when the worker closes); `close()` (or a ``with`` block) ends
    the stream from this side. Errors come as LrctlError subclasses: UnavailableError
    when the worker goes away, OutOfRangeError for a from_step it no longer keeps.

    Reads WatchMetricsBatched (the events that are ready together come in one message:
    less CPU per event on both ends), or WatchMetrics from a worker without it.
    """

    def __init__(self, open_call: Callable[[Any], Any], stub: Any,
                 error: Callable[[grpc.RpcError], LrctlError]) -> None:
        self._open, self._stub = open_call, stub
        self._call = open_call(stub.WatchMetricsBatched)
        self._batched = True
        self._answered = False  # the worker sent a message: it knows the batched method
        self._events: Iterator[Any] = iter(())
        self._error = error

    def __iter__(self) -> MetricsStream:
        return self

    def __next__(self) -> MetricsEvent:
        while True:
            event = next(self._events, None)
            if event is not None:
                return MetricsEvent.from_proto(event)
            try:
                message = next(self._call)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED and self._call.cancelled():
                    raise StopIteration from None  # close() from this side
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED and self._batched and not self._answered:
                    self._call, self._batched = self._open(self._stub.WatchMetrics), False  # an older worker
                    continue
                raise self._error(exc) from None
            self._answered = True
            self._events = iter(message.events) if self._batched else iter((message,))

    def close(self) -> None:
        """Cancel the stream (the worker forgets this subscriber)."""
        self._call.cancel()

    def __enter__(self) -> MetricsStream:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class ChangeIterator(Iterator[ChangeRecord]):
    """The records of a history reading, page by page, and what the reading missed:
    `gap`, `dropped` and `oldest_version` as in ChangeList (from the first page; a
    record dropped while paging sets `gap` too)."""

    def __init__(self, pages: Iterator[lrctl_pb2.ListChangesResponse]) -> None:
        self._pages = pages
        self._records: Iterator[ChangeRecord] = iter(())
        self.gap = False
        self.dropped = 0
        self.oldest_version = 0
        self._first = True

    def __iter__(self) -> ChangeIterator:
        return self

    def __next__(self) -> ChangeRecord:
        while True:
            record = next(self._records, None)
            if record is not None:
                return record
            reply = next(self._pages)  # StopIteration ends the reading
            if self._first:
                self.dropped, self.oldest_version = reply.dropped, reply.oldest_version
                self._first = False
            self.gap = self.gap or reply.gap
            self._records = map(ChangeRecord.from_proto, reply.changes)
