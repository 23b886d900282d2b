"""The one server factory: bind, interceptors, health and reflection.

The attach call, the demo and the tests all build their server here, so every server
listens the same way, checks tokens the same way (lrctl.server.auth, first in the
interceptor chain) and maps errors the same way. Transport security is decided here
too: TLS or mutual TLS (lrctl.server.tls), and unix sockets bound owner-only
(lrctl.server.unix_socket).

The server is grpc.aio on an event loop thread of its own (started and stopped here),
so a call that waits (a waiting Set) holds no thread; see lrctl.server.service.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import sys
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lrctl.common.addresses import HostPort, UnixPath, parse_address
from lrctl.server import unix_socket
from lrctl.server.auth import ENV, AuthInterceptor, Tokens
from lrctl.server.status import ErrorStatusInterceptor, RequestCounts
from lrctl.server.tls import CERT_ENV, CLIENT_CA_ENV, KEY_ENV, ServerTLS
from lrctl.v1 import lrctl_pb2

log = logging.getLogger("lrctl.server")

DEFAULT_ADDRESS = "127.0.0.1:50051"
# Calls in progress at once (grpc refuses more with RESOURCE_EXHAUSTED): above the
# waiting calls (1,000 by default) and the budget's queue (256), with room for reads.
DEFAULT_MAX_CONCURRENT_RPCS = 2048
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
    """A started server (grpc.aio, on an event loop thread of its own) and its address.

    Every method may be called from any thread but the loop's own.
    """

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    host: str
    port: int  # 0 for a unix socket
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    thread_pool: futures.ThreadPoolExecutor  # grpc.aio runs synchronous handlers here
    unix: Optional[unix_socket.BoundSocket] = None
    tls: Optional[ServerTLS] = None
    requests: Optional[RequestCounts] = None  # calls by method and status (metrics)
    _stopped: bool = False

    @property
    def address(self) -> str:
        """host:port with the bound port, or unix:/abs/path; clients connect to it as is."""
        if self.unix is not None:
            return f"unix:{self.unix.path}"
        return str(HostPort(self.host, self.port))

    def stop(self, grace: float = 2.0) -> None:
        """Report NOT_SERVING, then stop, letting in-flight calls finish for `grace` s;
        returns once the server and its loop thread have stopped."""
        if self._stopped:
            return
        if threading.current_thread() is self.thread:
            raise RuntimeError("BuiltServer.stop() called from its own event loop thread")
        self._stopped = True

        async def stop() -> None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace)

        try:
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result()
        finally:
            stop_event_loop(self.loop, self.thread)
            self.thread_pool.shutdown(wait=False, cancel_futures=True)
            if self.unix is not None:
                self.unix.remove()


def start_event_loop() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    """A new event loop running on a thread of its own."""
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(started.set)
        loop.run_forever()

    # A daemon: Python joins other threads before it runs atexit, where LRControl's
    # close() stops it (a job that forgets close() would otherwise never exit).
    thread = threading.Thread(target=run, name="lrctl-serve", daemon=True)
    thread.start()
    started.wait()
    return loop, thread


def stop_event_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    """Cancel what start_event_loop's loop still runs, stop it and join its thread."""
    async def cancel_rest() -> None:  # tasks grpc left behind (their calls are over)
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    try:
        asyncio.run_coroutine_threadsafe(cancel_rest(), loop).result(timeout=5)
    except Exception:  # a stuck task must not keep the job from closing
        log.warning("lrctl: some server tasks did not finish at stop", exc_info=True)
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


_TOKENS_HOW = (
    f"give the worker tokens ({ENV['admin'][0]} or {ENV['admin'][1]}, and {ENV['reader'][0]} or "
    f"{ENV['reader'][1]} for read-only clients; or attach(tokens=...))"
)
_CLIENT_CA_HOW = (
    f"require client certificates ({CLIENT_CA_ENV}=ca.pem, demo: --tls-client-ca; or "
    "attach(tls=ServerTLS.from_files(cert, key, client_ca=...)))"
)


# Files Docker and Podman put in every container.
_CONTAINER_MARKERS = ("/.dockerenv", "/run/.containerenv")
_CONTAINER_HOW = (
    " In a container, pass the token in the environment or a mounted file: "
    "docker run -e LRCTL_ADMIN_TOKEN=\"$(cat admin.token)\" ..., or "
    "-v $PWD/admin.token:/run/secrets/admin.token:ro -e LRCTL_ADMIN_TOKEN_FILE=/run/secrets/admin.token; "
    "publish the port to the host's loopback only (-p 127.0.0.1:50051:50051)"
)


def _container_hint() -> str:
    return _CONTAINER_HOW if any(os.path.exists(m) for m in _CONTAINER_MARKERS) else ""


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
            "insecure=True / --insecure." + _container_hint()
        )
    print(
        f"lrctl: WARNING: serving WITHOUT authentication on {address}; anyone who can "
        "reach it can change this job's learning rates",
        file=sys.stderr,
    )


def build_server(
    register: Sequence[Callable[[grpc.aio.Server], None]],
    *,
    address: str = DEFAULT_ADDRESS,
    insecure: bool = False,
    tokens: Tokens | None = None,
    tls: ServerTLS | None = None,
    max_workers: int = 8,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS,
) -> BuiltServer:
    """Build, bind and start a server with the lrctl services that `register` adds.

    `address` is host:port (port 0: any free port) or unix:/path (a socket only this
    user can connect to; lrctl.server.unix_socket). With `tokens`, every call but the
    health service needs one (lrctl.server.auth); with `tls`, connections use TLS, and
    mutual TLS when it has a client CA (lrctl.server.tls). A non-loopback address needs
    tokens or mutual TLS, or `insecure` (see check_bind).

    The server is grpc.aio on an event loop thread of its own: coroutine handlers run
    there, synchronous ones on a pool of `max_workers` threads. Past
    `max_concurrent_rpcs` calls in progress, grpc answers RESOURCE_EXHAUSTED.
    """
    endpoint = parse_address(address)
    check_bind(address, tokens, insecure, tls)
    if isinstance(endpoint, UnixPath):
        unix_socket.check_path(endpoint.path)
    credentials = tls.credentials() if tls is not None else None
    pool = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="lrctl-grpc")
    loop, thread = start_event_loop()
    bound: list[unix_socket.BoundSocket] = []
    requests = RequestCounts()

    async def start() -> tuple[grpc.aio.Server, health.aio.HealthServicer, str, int]:
        server = grpc.aio.server(
            migration_thread_pool=pool,
            interceptors=[
                *([AuthInterceptor(tokens)] if tokens is not None else []),
                *interceptors,
                ErrorStatusInterceptor(requests),
            ],
            maximum_concurrent_rpcs=max_concurrent_rpcs,
            options=[("grpc.so_reuseport", 0)],
        )
        for add in register:
            add(server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )

        def add_port(target: str) -> int:
            if credentials is not None:
                return server.add_secure_port(target, credentials)
            return server.add_insecure_port(target)

        if isinstance(endpoint, UnixPath):
            bound.append(unix_socket.bind_private(endpoint.path, add_port))
            host, port = "", 0
        else:
            host = endpoint.host
            try:
                port = add_port(address)
            except RuntimeError as exc:
                raise OSError(f"cannot listen on {address}: {exc} (is the port already in use?)") from None
            if port == 0:
                raise OSError(f"cannot listen on {address} (is the port already in use?)")
        try:
            await server.start()
        except BaseException:
            await server.stop(None)
            raise
        return server, health_servicer, host, port

    try:
        server, health_servicer, host, port = asyncio.run_coroutine_threadsafe(start(), loop).result()
    except BaseException:
        stop_event_loop(loop, thread)
        pool.shutdown(wait=False)
        for socket_file in bound:
            socket_file.remove()
        raise
    return BuiltServer(server, health_servicer, host, port, loop, thread, pool,
                       bound[0] if bound else None, tls, requests)
