"""Bearer tokens and roles: who may read a worker's rates, who may change them.

Two roles: a *reader* may list, get, status, history and schedules (and use server
reflection); an *admin* may also change rates and schedules. Tokens travel in the
call metadata as ``authorization: Bearer <token>`` and are checked in one server
interceptor, in constant time against every known token. The standard health service
stays open (probes need it; it tells nothing about the model).

Tokens come from the environment or from files, never only from a command line
(other users of the machine can read process arguments):

    LRCTL_ADMIN_TOKEN / LRCTL_ADMIN_TOKEN_FILE     the admin token (name "admin")
    LRCTL_READER_TOKEN / LRCTL_READER_TOKEN_FILE   the reader token (name "reader")

or from code: ``attach(..., tokens=Tokens([Token("alice", ADMIN, "..."), ...]))``.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import grpc

READER, ADMIN = "reader", "admin"
ROLES = (READER, ADMIN)
MIN_TOKEN_CHARS = 16
METADATA_KEY = "authorization"
ENV = {ADMIN: ("LRCTL_ADMIN_TOKEN", "LRCTL_ADMIN_TOKEN_FILE"),
       READER: ("LRCTL_READER_TOKEN", "LRCTL_READER_TOKEN_FILE")}
# What a reader may call: every read of the lrctl service, and reflection. Everything
# else (SetLearningRates, SetSchedules, ClearSchedules, CancelChanges, and any method
# added later until it is listed here) needs an admin token.
_LRCTL = "/lrctl.v1.LearningRateControl/"
READER_METHODS = frozenset(
    _LRCTL + m for m in ("ListParameters", "GetLearningRates", "GetStatus", "ListChanges",
                         "GetSchedules", "ListPending", "WatchMetrics",
                         "WatchMetricsBatched")
)
_READER_PREFIXES = ("/grpc.reflection.",)
_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
CLIENT_HINT = "lrctl clients read it from LRCTL_TOKEN or LRCTL_TOKEN_FILE (CLI: --token-file)"


@dataclass(frozen=True)
class Token:
    """A named token and its role. `secret` is never shown (repr hides it)."""

    name: str
    role: str
    secret: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"token {self.name!r}: role {self.role!r} is not one of {', '.join(ROLES)}")
        if len(self.secret) < MIN_TOKEN_CHARS or not self.secret.isprintable() or " " in self.secret:
            raise ValueError(
                f"token {self.name!r}: a token must be at least {MIN_TOKEN_CHARS} printable "
                "characters without spaces (e.g. `python -c 'import secrets; print(secrets.token_urlsafe())'`)"
            )

    def __repr__(self) -> str:
        return f"Token(name={self.name!r}, role={self.role!r}, secret=...)"


def _read_token_file(path: str, variable: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as exc:
        raise ValueError(f"{variable}={path!r}: cannot read the token file: {exc.strerror}") from None


class Tokens:
    """The tokens a worker accepts."""

    def __init__(self, tokens: Iterable[Token]) -> None:
        self.tokens = tuple(tokens)
        if not self.tokens:
            raise ValueError("no tokens given")
        secrets = [t.secret for t in self.tokens]
        if len(set(secrets)) != len(secrets):
            raise ValueError("two tokens have the same secret; each must be distinct")
        names = [t.name for t in self.tokens]
        if len(set(names)) != len(names):
            raise ValueError("two tokens have the same name")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Optional["Tokens"]:
        """The tokens the environment gives (see the module docstring), or None."""
        found = []
        for role, (variable, file_variable) in ENV.items():
            value, path = environ.get(variable), environ.get(file_variable)
            if value and path:
                raise ValueError(f"set {variable} or {file_variable}, not both")
            if path:
                value = _read_token_file(path, file_variable)
                if not value:  # a worker meant to be locked must not run open
                    raise ValueError(f"{file_variable}={path!r}: the token file is empty")
            if value:
                found.append(Token(role, role, value))
        return cls(found) if found else None

    def identify(self, metadata: Optional[Sequence[tuple[str, Any]]]) -> Optional[Token]:
        """The token a call presents, or None. Compared with every known token in
        constant time, so neither which token nor how much of one matched leaks."""
        presented = None
        for key, value in metadata or ():
            if key == METADATA_KEY:
                text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
                scheme, _, presented = text.partition(" ")
                if scheme.lower() != "bearer":
                    presented = None
                break
        if presented is None:
            return None
        given = presented.strip().encode("utf-8", "surrogateescape")
        match = None
        for token in self.tokens:
            if hmac.compare_digest(given, token.secret.encode("utf-8")) and match is None:
                match = token
        return match

    def __repr__(self) -> str:
        return f"Tokens({list(self.tokens)!r})"


def required_role(method: str) -> Optional[str]:
    """The role a method needs; None for the open health service."""
    if method.startswith(_OPEN_PREFIXES):
        return None
    if method in READER_METHODS or method.startswith(_READER_PREFIXES):
        return READER
    return ADMIN


def _denied(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only answers `code` (a coroutine:
    grpc.aio runs it on the event loop, whatever kind the handler it replaces was)."""

    async def abort(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    kinds: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(abort, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks every call's bearer token and role before its handler runs (grpc.aio)."""

    def __init__(self, tokens: Tokens) -> None:
        self._tokens = tokens

    async def intercept_service(
        self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails
    ) -> Optional[grpc.RpcMethodHandler]:
        method = handler_call_details.method
        role = required_role(method)
        handler = await continuation(handler_call_details)
        if role is None or handler is None:
            return handler
        token = self._tokens.identify(handler_call_details.invocation_metadata)
        if token is None:
            has_header = any(k == METADATA_KEY for k, _ in handler_call_details.invocation_metadata or ())
            why = ("the bearer token is not one this worker accepts" if has_header else
                   "this worker requires a bearer token (metadata 'authorization: Bearer <token>')")
            return _denied(handler, grpc.StatusCode.UNAUTHENTICATED, f"{why}; {CLIENT_HINT}")
        if role == ADMIN and token.role != ADMIN:
            name = method.rsplit("/", 1)[-1]
            return _denied(handler, grpc.StatusCode.PERMISSION_DENIED,
                           f"token {token.name!r} has the role {token.role}; {name} needs an admin token")
        return handler
