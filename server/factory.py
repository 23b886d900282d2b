"""The one server factory: bind, interceptors, health and reflection.

The attach call, the demo and the tests all build their server here, so every server
listens the same way, checks tokens the same way (lrctl.server.auth, first in the
interceptor chain) and maps errors the same way. Transport security is decided here
too: TLS or mutual TLS (lrctl.server.tls), and unix sockets bound owner-only
(lrctl.server.unix_socket).
"""

from __future__ import annotations

import ipaddress
import logging
import sys
from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lrctl.common.addresses import HostPort, UnixPath, parse_address
from lrctl.server import unix_socket
from lrctl.server.auth import ENV, AuthInterceptor, Tokens
from lrctl.server.status import ErrorStatusInterceptor
from lrctl.server.tls import CERT_ENV, CLIENT_CA_ENV, KEY_ENV, ServerTLS
from lrctl.v1 import lrctl_pb2

log = logging.getLogger("lrctl.server")

DEFAULT_ADDRESS = "127.0.0.1:50051"
SERVICE_NAME = lrctl_pb2.DESCRIPTOR.services_by_name["LearningRateControl"].full_name


def split_address(address: str) -> tuple[str, int]:
    """('host', port) of 'host:port' or '[v6]:port'; ValueError names a bad address
    (a missing port included) and a unix: address, which has no host and port."""
    endpoint = parse_address(address)
    if isinstance(endpoint, UnixPath):
        raise ValueError(f"{address!r} is a unix socket address, not HOST:PORT")
    return endpoint.host, endpoint.port


def is_loopback(host: str) -> bool:
    """True for names and addresses that only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class BuiltServer:
    """A started server and the address it is bound to."""

    server: grpc.Server
    health: health.HealthServicer
    host: str
    port: int  # 0 for a unix socket
    unix: Optional[unix_socket.BoundSocket] = None
    tls: Optional[ServerTLS] = None

    @property
    def address(self) -> str:
        """host:port with the bound port, or unix:/abs/path; clients connect to it as is."""
        if self.unix is not None:
            return f"unix:{self.unix.path}"
        return str(HostPort(self.host, self.port))

    def stop(self, grace: float = 2.0) -> None:
        """Report NOT_SERVING, then stop, letting in-flight calls finish for `grace` s;
        a unix socket's file is removed."""
        self.health.enter_graceful_shutdown()
        try:
            self.server.stop(grace).wait()
        finally:
            if self.unix is not None:
                self.unix.remove()


_TOKENS_HOW = (
    f"give the worker tokens ({ENV['admin'][0]} or {ENV['admin'][1]}, and {ENV['reader'][0]} or "
    f"{ENV['reader'][1]} for read-only clients; or attach(tokens=...))"
)
_CLIENT_CA_HOW = (
    f"require client certificates ({CLIENT_CA_ENV}=ca.pem, demo: --tls-client-ca; or "
    "attach(tls=ServerTLS.from_files(cert, key, client_ca=...)))"
)


def check_bind(address: str, tokens: Tokens | None, insecure: bool, tls: ServerTLS | None = None) -> None:
    """Refuse an address others can reach unless callers must authenticate.

    Loopback and unix sockets (owner-only permissions) pass. Any other address needs
    tokens or mutual TLS; TLS without a client CA encrypts but authenticates nobody
    and is refused too. The ValueError says exactly how to provide authentication;
    with `insecure`, a warning is printed instead, on every start.
    """
    endpoint = parse_address(address)
    if isinstance(endpoint, UnixPath) or is_loopback(endpoint.host):
        return
    if tokens is not None or (tls is not None and tls.mutual):
        return
    if tls is not None:
        if not insecure:
            raise ValueError(
                f"refusing to listen on {address} with TLS but no client authentication: TLS "
                "encrypts the connection but authenticates nobody, so anyone who reaches that "
                f"address could change the job's learning rates. Also {_TOKENS_HOW}, or "
                f"{_CLIENT_CA_HOW}; or pass insecure=True / --insecure"
            )
        print(
            f"lrctl: WARNING: serving with TLS but WITHOUT client authentication on {address}; "
            "anyone who can reach it can change this job's learning rates",
            file=sys.stderr,
        )
        return
    if not insecure:
        raise ValueError(
            f"refusing to listen on {address} without authentication: anyone who reaches "
            f"that address could change the job's learning rates. Either {_TOKENS_HOW}, or use "
            f"mutual TLS ({CERT_ENV}=cert.pem {KEY_ENV}=key.pem {CLIENT_CA_ENV}=ca.pem; or "
            "attach(tls=...)), listen on 127.0.0.1 or a unix:/path socket and tunnel, or pass "
            "insecure=True / --insecure"
        )
    print(
        f"lrctl: WARNING: serving WITHOUT authentication on {address}; anyone who can "
        "reach it can change this job's learning rates",
        file=sys.stderr,
    )


def build_server(
    register: Sequence[Callable[[grpc.Server], None]],
    *,
    address: str = DEFAULT_ADDRESS,
    insecure: bool = False,
    tokens: Tokens | None = None,
    tls: ServerTLS | None = None,
    max_workers: int = 8,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> BuiltServer:
    """Build, bind and start a server with the lrctl services that `register` adds.

    `address` is host:port (port 0: any free port) or unix:/path (a socket only this
    user can connect to; lrctl.server.unix_socket). With `tokens`, every call but the
    health service needs one (lrctl.server.auth); with `tls`, connections use TLS, and
    mutual TLS when it has a client CA (lrctl.server.tls). A non-loopback address needs
    tokens or mutual TLS, or `insecure` (see check_bind).
    """
    endpoint = parse_address(address)
    check_bind(address, tokens, insecure, tls)
    if isinstance(endpoint, UnixPath):
        unix_socket.check_path(endpoint.path)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="lrctl-grpc"),
        interceptors=[
            *([AuthInterceptor(tokens)] if tokens is not None else []),
            *interceptors,
            ErrorStatusInterceptor(),
        ],
        maximum_concurrent_rpcs=max_workers * 8,
        options=[("grpc.so_reuseport", 0)],
    )
    for add in register:
        add(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    credentials = tls.credentials() if tls is not None else None

    def add_port(target: str) -> int:
        if credentials is not None:
            return server.add_secure_port(target, credentials)
        return server.add_insecure_port(target)

    bound = None
    try:
        if isinstance(endpoint, UnixPath):
            bound = unix_socket.bind_private(endpoint.path, add_port)
            host, port = "", 0
        else:
            host = endpoint.host
            try:
                port = add_port(address)
            except RuntimeError as exc:
                raise OSError(f"cannot listen on {address}: {exc} (is the port already in use?)") from None
            if port == 0:
                raise OSError(f"cannot listen on {address} (is the port already in use?)")
        server.start()
    except BaseException:
        server.stop(None)
        if bound is not None:
            bound.remove()
        raise
    return BuiltServer(server, health_servicer, host, port, bound, tls)
