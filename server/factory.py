"""The one server factory: bind, interceptors, health and reflection.

The attach call, the demo and the tests all build their server here, so every server
listens the same way, checks tokens the same way (lrctl.server.auth, first in the
interceptor chain) and maps errors the same way. TLS will plug in here too.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lrctl.server.auth import ENV, AuthInterceptor, Tokens
from lrctl.server.status import ErrorStatusInterceptor
from lrctl.v1 import lrctl_pb2

log = logging.getLogger("lrctl.server")

DEFAULT_ADDRESS = "127.0.0.1:50051"
SERVICE_NAME = lrctl_pb2.DESCRIPTOR.services_by_name["LearningRateControl"].full_name


def split_address(address: str) -> tuple[str, int]:
    """('host', port) of 'host:port' or '[v6]:port'; ValueError names a bad address."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"bad address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:50051")
    return host.strip("[]"), int(port)


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
    port: int

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stop(self, grace: float = 2.0) -> None:
        """Report NOT_SERVING, then stop, letting in-flight calls finish for `grace` s."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def check_bind(address: str, tokens: Tokens | None, insecure: bool) -> None:
    """Refuse a non-loopback address without tokens (ValueError saying how to give one);
    with `insecure`, warn instead, on every start."""
    host, _ = split_address(address)
    if is_loopback(host) or tokens is not None:
        return
    if not insecure:
        raise ValueError(
            f"refusing to listen on {address} without authentication: anyone who reaches "
            "that address could change the job's learning rates. Give the worker tokens "
            f"({ENV['admin'][0]} or {ENV['admin'][1]}, and {ENV['reader'][0]} or "
            f"{ENV['reader'][1]} for read-only clients; or attach(tokens=...)), listen on "
            "127.0.0.1 and tunnel, or pass insecure=True / --insecure"
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
    max_workers: int = 8,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> BuiltServer:
    """Build, bind and start a server with the lrctl services that `register` adds.

    With `tokens`, every call but the health service needs one (lrctl.server.auth).
    A non-loopback address needs tokens, or `insecure` (see check_bind).
    """
    host, _ = split_address(address)
    check_bind(address, tokens, insecure)
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
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc} (is the port already in use?)") from None
    if port == 0:
        raise OSError(f"cannot listen on {address} (is the port already in use?)")
    server.start()
    return BuiltServer(server, health_servicer, host, port)
