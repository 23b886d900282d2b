"""Worker addresses, parsed the same way by the worker and the client.

Two forms: ``HOST:PORT`` (``[v6]:PORT`` for an IPv6 literal) and ``unix:PATH`` (also
``unix:///abs/path``, gRPC's spelling). ``unix-abstract:`` names are refused: they have
no file and so no permissions, and any process on the host could connect to one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Union

UNIX_PREFIX = "unix:"
_EXPECTED = "expected HOST:PORT or unix:/path"
# Other gRPC target schemes: the client passes them to gRPC as they are.
CLIENT_PASSTHROUGH_SCHEMES = ("dns:", "ipv4:", "ipv6:", "vsock:")


@dataclass(frozen=True)
class HostPort:
    """A TCP address."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class UnixPath:
    """A unix-domain socket; `path` is absolute."""

    path: str

    def __str__(self) -> str:
        return UNIX_PREFIX + self.path


Endpoint = Union[HostPort, UnixPath]


def parse_address(address: str) -> Endpoint:
    """The endpoint `address` names; ValueError naming the address and what is wrong."""
    if address.startswith("unix-abstract:"):
        raise ValueError(
            f"bad address {address!r}: abstract unix sockets have no file permissions (any "
            "process on the host could connect); use unix:/path in a directory only you can write"
        )
    if address.startswith(UNIX_PREFIX):
        path = address[len(UNIX_PREFIX):]
        if path.startswith("//"):  # unix:///abs/path; unix://host/path names no host here
            if not path.startswith("///"):
                raise ValueError(f"bad address {address!r}: write unix:/abs/path or unix:///abs/path")
            path = path[2:]
        if not path:
            raise ValueError(f"bad address {address!r}: the socket path is missing ({_EXPECTED})")
        return UnixPath(os.path.abspath(path))
    if address.startswith("["):  # [v6]:port
        host, bracket, rest = address[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {address!r}: {_EXPECTED}, e.g. [::1]:50051")
        port = rest[1:]
    elif address.count(":") > 1:
        raise ValueError(f"bad address {address!r}: write an IPv6 address in brackets, e.g. [::1]:50051")
    else:
        host, _, port = address.partition(":")
    if not port:
        raise ValueError(f"port missing in address {address!r}: {_EXPECTED}")
    if not host:
        raise ValueError(f"host missing in address {address!r}: {_EXPECTED}")
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"bad port {port!r} in address {address!r}: {_EXPECTED} (port 0 to 65535)")
    return HostPort(host, int(port))
