"""Reading PEM files for TLS, with errors that name the file and what is wrong.

Shared by the worker (its certificate, key and client CA) and the client (its CA,
certificate and key). grpc takes PEM bytes and reports a bad file only at the first
handshake, as an opaque failure; these checks run at start-up instead.
"""

from __future__ import annotations

import os
import re
from typing import Union

PathLike = Union[str, "os.PathLike[str]"]

_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----")
_KEY = re.compile(rb"-----BEGIN (?:(RSA|EC|ENCRYPTED) )?PRIVATE KEY-----")
MAKE_ONE = ("make one with: openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
            "-keyout key.pem -out cert.pem -days 365 -subj /CN=localhost "
            "-addext subjectAltName=DNS:localhost,IP:127.0.0.1")


def read_file(path: PathLike, what: str) -> bytes:
    """The bytes of `path`; ValueError naming `what` and the file if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"{what} {os.fspath(path)!r}: cannot read it: {exc.strerror}") from None


def check_certificates(data: bytes, what: str) -> bytes:
    """`data` if it holds at least one PEM certificate, else ValueError naming `what`."""
    if not _CERT.search(data):
        raise ValueError(f"{what}: not a PEM certificate (no '-----BEGIN CERTIFICATE-----' line)")
    return data


def check_private_key(data: bytes, what: str) -> bytes:
    """`data` if it holds an unencrypted PEM private key, else ValueError naming `what`."""
    found = _KEY.search(data)
    if not found:
        raise ValueError(f"{what}: not a PEM private key (no '-----BEGIN ... PRIVATE KEY-----' line)")
    if found.group(1) == b"ENCRYPTED" or b"Proc-Type: 4,ENCRYPTED" in data:
        raise ValueError(f"{what}: the private key is encrypted; gRPC needs it unencrypted "
                         "(openssl pkey -in KEY -out PLAIN; keep PLAIN readable by you only)")
    return data


def read_certificates(path: PathLike, what: str) -> bytes:
    """The PEM certificate(s) in `path` (ValueError naming it if unreadable or not PEM)."""
    label = f"{what} {os.fspath(path)!r}"
    return check_certificates(read_file(path, what), label)


def read_private_key(path: PathLike, what: str) -> bytes:
    """The unencrypted PEM private key in `path` (ValueError naming it otherwise)."""
    label = f"{what} {os.fspath(path)!r}"
    return check_private_key(read_file(path, what), label)


def check_key_matches(cert_path: PathLike, key_path: PathLike) -> None:
    """ValueError naming both files if the key is not the certificate's (or does not
    parse). Uses Python's ssl module, imported only here (it costs start-up time)."""
    import ssl

    def no_password() -> bytes:  # never prompt on a terminal for an encrypted key
        raise ValueError("encrypted")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(os.fspath(cert_path), os.fspath(key_path), password=no_password)
    except (ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        if reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"private key {os.fspath(key_path)!r} is not the key of certificate "
                             f"{os.fspath(cert_path)!r}") from None
        raise ValueError(f"certificate {os.fspath(cert_path)!r} with key {os.fspath(key_path)!r} "
                         f"cannot be loaded ({reason})") from None
