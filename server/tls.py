"""TLS and mutual TLS for the worker's server.

A `ServerTLS` holds PEM bytes: the worker's certificate chain, its private key and,
for mutual TLS, the CA whose certificates clients must present. Build it from files
(`ServerTLS.from_files`) or from the environment (`ServerTLS.from_env`):

    LRCTL_WORKER_TLS_CERT       the worker's certificate chain (PEM file)
    LRCTL_WORKER_TLS_KEY        its unencrypted private key (PEM file)
    LRCTL_WORKER_TLS_CLIENT_CA  optional: require client certificates signed by this CA

With a client CA the server requires and verifies a client certificate on every
connection (the handshake fails without one); without, TLS encrypts but authenticates
nobody, so off loopback it must go with tokens (see factory.check_bind).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Optional

import grpc

from lrctl.common import pem

CERT_ENV, KEY_ENV, CLIENT_CA_ENV = "LRCTL_WORKER_TLS_CERT", "LRCTL_WORKER_TLS_KEY", "LRCTL_WORKER_TLS_CLIENT_CA"


@dataclass(frozen=True)
class ServerTLS:
    """The worker's TLS material, as PEM bytes. `private_key` is never shown (repr)."""

    cert_chain: bytes
    private_key: bytes = field(repr=False)
    client_ca: Optional[bytes] = None

    def __post_init__(self) -> None:
        pem.check_certificates(self.cert_chain, "the worker's certificate")
        pem.check_private_key(self.private_key, "the worker's private key")
        if self.client_ca is not None:
            pem.check_certificates(self.client_ca, "the client CA")

    @property
    def mutual(self) -> bool:
        """True when clients must present a certificate signed by `client_ca`."""
        return self.client_ca is not None

    @classmethod
    def from_files(
        cls, cert: "pem.PathLike", key: "pem.PathLike", client_ca: "pem.PathLike | None" = None
    ) -> "ServerTLS":
        """Read the PEM files; ValueError naming a file that is missing, unreadable, not
        PEM, or a key that is not the certificate's."""
        chain = pem.read_certificates(cert, "certificate")
        private_key = pem.read_private_key(key, "private key")
        pem.check_key_matches(cert, key)
        ca = pem.read_certificates(client_ca, "client CA") if client_ca is not None else None
        return cls(chain, private_key, ca)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Optional["ServerTLS"]:
        """The TLS the environment configures (module docstring), or None if it sets none."""
        cert, key, ca = (environ.get(v) or None for v in (CERT_ENV, KEY_ENV, CLIENT_CA_ENV))
        return cls.from_paths(cert, key, ca, names=(CERT_ENV, KEY_ENV, CLIENT_CA_ENV))

    @classmethod
    def from_paths(
        cls, cert: Optional[str], key: Optional[str], client_ca: Optional[str],
        names: tuple[str, str, str] = ("--tls-cert", "--tls-key", "--tls-client-ca"),
    ) -> Optional["ServerTLS"]:
        """from_files for optional paths (flags, variables named by `names`): None when
        none is given; ValueError when only some of the certificate and key are."""
        if cert is None and key is None:
            if client_ca is not None:
                raise ValueError(f"{names[2]} needs {names[0]} and {names[1]}: the worker must "
                                 "have a certificate of its own to run TLS")
            return None
        if cert is None or key is None:
            given, missing = (names[0], names[1]) if key is None else (names[1], names[0])
            raise ValueError(f"{given} is given without {missing}: TLS needs both the "
                             "worker's certificate and its private key")
        return cls.from_files(cert, key, client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        """The gRPC server credentials (requiring client certificates when mutual)."""
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.mutual,
        )
