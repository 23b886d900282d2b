"""TLS for the client: which CA to trust, which certificate to present, which name to
check, from arguments or the environment.

    LRCTL_TLS_CA           PEM file of the CA that signed the worker's certificate
    LRCTL_TLS_CERT         PEM file of this client's certificate (mutual TLS)
    LRCTL_TLS_KEY          PEM file of its unencrypted private key
    LRCTL_TLS_SERVER_NAME  the name to check in the worker's certificate

Any of them turns TLS on (without a CA, the system's roots are trusted). grpcio only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

import grpc

from lrctl.common import pem
from lrctl.common.errors import InvalidArgumentError

CA_ENV, CERT_ENV, KEY_ENV, SERVER_NAME_ENV = (
    "LRCTL_TLS_CA", "LRCTL_TLS_CERT", "LRCTL_TLS_KEY", "LRCTL_TLS_SERVER_NAME")
# A path (str or os.PathLike) of a PEM file, or the PEM bytes themselves.
PemSource = Union[str, "os.PathLike[str]", bytes]
# The name checked for a unix: address, whose gRPC authority is made of the path.
UNIX_SERVER_NAME = "localhost"


def _load(source: PemSource, what: str, key: bool) -> bytes:
    check = pem.check_private_key if key else pem.check_certificates
    if isinstance(source, bytes):
        return check(source, what)
    read = pem.read_private_key if key else pem.read_certificates
    return read(source, what)


@dataclass(frozen=True)
class ClientTLS:
    """The client's TLS material as PEM bytes, and the server name to check."""

    ca: Optional[bytes] = None  # None: the system's root certificates
    cert: Optional[bytes] = None
    key: Optional[bytes] = field(default=None, repr=False)
    server_name: Optional[str] = None

    @classmethod
    def resolve(
        cls,
        ca: Optional[PemSource] = None,
        cert: Optional[PemSource] = None,
        key: Optional[PemSource] = None,
        server_name: Optional[str] = None,
        environ: Mapping[str, str] = os.environ,
    ) -> Optional["ClientTLS"]:
        """The TLS the arguments ask for, each falling back to its variable; None when
        neither arguments nor variables ask for TLS. InvalidArgumentError names a file
        that cannot be read or is not PEM, and a certificate given without its key."""
        ca = ca if ca is not None else environ.get(CA_ENV) or None
        cert = cert if cert is not None else environ.get(CERT_ENV) or None
        key = key if key is not None else environ.get(KEY_ENV) or None
        server_name = server_name if server_name is not None else environ.get(SERVER_NAME_ENV) or None
        if ca is None and cert is None and key is None and server_name is None:
            return None
        if (cert is None) != (key is None):
            given, missing = ("certificate", "key") if key is None else ("key", "certificate")
            raise InvalidArgumentError(
                f"a client {given} is given without its {missing}: mutual TLS needs both "
                f"(--tls-cert and --tls-key; tls_cert= and tls_key=; {CERT_ENV} and {KEY_ENV})")
        try:
            loaded = cls(
                _load(ca, "CA certificate", key=False) if ca is not None else None,
                _load(cert, "client certificate", key=False) if cert is not None else None,
                _load(key, "client key", key=True) if key is not None else None,
                server_name,
            )
            if isinstance(cert, (str, os.PathLike)) and isinstance(key, (str, os.PathLike)):
                pem.check_key_matches(cert, key)
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None
        return loaded

    @property
    def mutual(self) -> bool:
        """True when this client presents a certificate."""
        return self.cert is not None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.key, self.cert)

    def channel_options(self, unix: bool) -> list[tuple[str, str]]:
        """The name override: the one given, or `localhost` on a unix socket."""
        name = self.server_name or (UNIX_SERVER_NAME if unix else None)
        return [("grpc.ssl_target_name_override", name)] if name else []
