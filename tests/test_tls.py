"""TLS, mutual TLS and unix sockets, end to end.

Certificates are made at test time (tests/certs.py): a CA, a worker certificate for
127.0.0.1, ::1 and localhost, a client certificate, and an unrelated CA with a client
certificate of its own. Workers are real (attach on 127.0.0.1 port 0, or a unix
socket in a temporary directory), driven through LRClient and the CLI as a
subprocess; non-loopback binds are only judged (check_bind), never made.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from certs import Pki, make_pki  # noqa: E402
from conftest import Served, per_parameter_optimizer, seed_model, stepping  # noqa: E402
from lrctl.client.client import LRClient  # noqa: E402
from lrctl.client.errors import InvalidArgumentError, TLSError, UnauthenticatedError  # noqa: E402
from lrctl.server import attach  # noqa: E402
from lrctl.server.auth import ADMIN, Token, Tokens  # noqa: E402
from lrctl.server.control import LRControl  # noqa: E402
from lrctl.server.factory import check_bind, split_address  # noqa: E402
from lrctl.server.tls import ServerTLS  # noqa: E402

LRCTL = [sys.executable, "-m", "lrctl.client.cli"]
TLS_VARIABLES = ("LRCTL_WORKER_TLS_CERT", "LRCTL_WORKER_TLS_KEY", "LRCTL_WORKER_TLS_CLIENT_CA",
                 "LRCTL_TLS_CA", "LRCTL_TLS_CERT", "LRCTL_TLS_KEY", "LRCTL_TLS_SERVER_NAME")
TOKEN_VARIABLES = ("LRCTL_TOKEN", "LRCTL_TOKEN_FILE", "LRCTL_ADMIN_TOKEN", "LRCTL_ADMIN_TOKEN_FILE",
                   "LRCTL_READER_TOKEN", "LRCTL_READER_TOKEN_FILE")
ADMIN_SECRET = secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TLS or token variable leaks in from the environment running the tests."""
    for name in TLS_VARIABLES + TOKEN_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: no TLS or token variables but `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in TLS_VARIABLES + TOKEN_VARIABLES}
    return {**env, **extra}


def cli(address: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*LRCTL, "--address", address, *args], capture_output=True, text=True,
                          timeout=60, env=clean_env() if env is None else env)


def one_error_line(done: subprocess.CompletedProcess, code: int) -> str:
    """The CLI's single error line (asserting exit `code`, one line, no traceback)."""
    assert done.returncode == code, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lrctl: error: "), done.stderr
    return lines[0]


def serve(tls: ServerTLS | bool, address: str = "127.0.0.1:0", **options: Any) -> LRControl:
    model = seed_model()
    return attach(model, per_parameter_optimizer(model), address=address, tls=tls, **options)


@pytest.fixture(scope="module")
def tls_worker(pki: Pki) -> Iterator[LRControl]:
    """Server-only TLS on loopback, stepping."""
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    ctl = attach(model, optimizer, address="127.0.0.1:0",
                 tls=ServerTLS.from_files(pki.server_cert, pki.server_key))
    try:
        with stepping(optimizer):
            yield ctl
    finally:
        ctl.close(grace=0.5)


@pytest.fixture(scope="module")
def mtls_worker(pki: Pki) -> Iterator[LRControl]:
    """Mutual TLS (client certificates signed by pki.ca) on loopback, stepping."""
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    ctl = attach(model, optimizer, address="127.0.0.1:0",
                 tls=ServerTLS.from_files(pki.server_cert, pki.server_key, client_ca=pki.ca))
    try:
        with stepping(optimizer):
            yield ctl
    finally:
        ctl.close(grace=0.5)


# -- 1. TLS round trips ---------------------------------------------------------------


def test_lrclient_round_trip_over_tls(tls_worker: LRControl, pki: Pki) -> None:
    assert tls_worker.tls is not None and not tls_worker.tls.mutual
    with LRClient(tls_worker.address, tls_ca=pki.ca) as client:
        assert [p.name for p in client.list_parameters()] == list(tls_worker.controller.names)
        result = client.set_learning_rates({"layer1.bias": 0.125}, reason="over TLS")
        assert result.applied
        assert client.get_learning_rates("layer1.bias") == {"layer1.bias": 0.125}
    # PEM bytes work as well as paths.
    with LRClient(tls_worker.address, tls_ca=pki.ca.read_bytes()) as client:
        assert client.get_learning_rates("layer1.bias") == {"layer1.bias": 0.125}


def test_cli_round_trip_over_tls(tls_worker: LRControl, pki: Pki) -> None:
    tls = ("--tls-ca", str(pki.ca))
    listed = cli(tls_worker.address, *tls, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [p["name"] for p in json.loads(listed.stdout)] == list(tls_worker.controller.names)
    done = cli(tls_worker.address, *tls, "set", "layer2.bias=0.375")
    assert done.returncode == 0, done.stderr
    assert "applied at step" in done.stdout
    got = cli(tls_worker.address, "get", "layer2.bias", "--json", *tls)  # flags after the verb too
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)[0]["lr"] == 0.375


def test_server_name_override(tls_worker: LRControl, pki: Pki) -> None:
    # The certificate names localhost and 127.0.0.1: connecting by 127.0.0.1 while
    # checking "localhost" passes; a name it does not hold fails, saying what to do.
    with LRClient(tls_worker.address, tls_ca=pki.ca, tls_server_name="localhost") as client:
        assert client.status().num_parameters == 4
    with LRClient(tls_worker.address, tls_ca=pki.ca, tls_server_name="wrong.example") as client, \
            pytest.raises(TLSError, match="does not name the host.*--tls-server-name"):
        client.status()


# -- 2. refused clearly ---------------------------------------------------------------


def test_plaintext_client_at_a_tls_worker_is_told_about_tls(tls_worker: LRControl) -> None:
    with LRClient(tls_worker.address) as client, pytest.raises(TLSError) as info:
        client.status()
    assert info.value.code == "UNAVAILABLE"
    assert "--tls-ca" in str(info.value) and "Socket closed" not in str(info.value)
    line = one_error_line(cli(tls_worker.address, "status"), 3)
    assert tls_worker.address in line and "if it uses TLS, pass --tls-ca" in line
    assert "is a worker running" not in line  # the TLS hint replaces the generic one


def test_wrong_ca_is_refused(tls_worker: LRControl, pki: Pki) -> None:
    with LRClient(tls_worker.address, tls_ca=pki.other_ca) as client, pytest.raises(TLSError) as info:
        client.status()
    assert "certificate is not trusted (unable to get local issuer certificate)" in str(info.value)
    line = one_error_line(cli(tls_worker.address, "--tls-ca", str(pki.other_ca), "status"), 3)
    assert "not trusted" in line and "--tls-ca" in line


def test_tls_client_at_a_plaintext_worker(served: Served, pki: Pki) -> None:
    with LRClient(served.ctl.address, tls_ca=pki.ca) as client, pytest.raises(TLSError) as info:
        client.status()
    assert "does not speak TLS" in str(info.value)


# -- 3. mutual TLS --------------------------------------------------------------------


def test_mtls_without_a_client_certificate_is_refused(mtls_worker: LRControl, pki: Pki) -> None:
    with LRClient(mtls_worker.address, tls_ca=pki.ca) as client, pytest.raises(TLSError) as info:
        client.status()
    assert "requires a client certificate: pass --tls-cert and --tls-key" in str(info.value)
    line = one_error_line(cli(mtls_worker.address, "--tls-ca", str(pki.ca), "list"), 3)
    assert "--tls-cert" in line


def test_mtls_with_a_certificate_of_another_ca_is_refused(mtls_worker: LRControl, pki: Pki) -> None:
    with LRClient(mtls_worker.address, tls_ca=pki.ca, tls_cert=pki.other_client_cert,
                  tls_key=pki.other_client_key) as client, pytest.raises(TLSError) as info:
        client.status()
    assert "refused this client's certificate" in str(info.value)


def test_mtls_with_the_right_certificate_works(mtls_worker: LRControl, pki: Pki) -> None:
    assert mtls_worker.tls is not None and mtls_worker.tls.mutual
    with LRClient(mtls_worker.address, tls_ca=pki.ca, tls_cert=pki.client_cert,
                  tls_key=pki.client_key) as client:
        assert client.set_learning_rates({"layer1.weight": 0.0625}).applied
    flags = ("--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key))
    got = cli(mtls_worker.address, *flags, "get", "layer1.weight", "--json")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)[0]["lr"] == 0.0625


def test_tls_and_tokens_together(pki: Pki) -> None:
    tokens = Tokens([Token("alice", ADMIN, ADMIN_SECRET)])
    with serve(ServerTLS.from_files(pki.server_cert, pki.server_key), tokens=tokens) as ctl:
        with LRClient(ctl.address, tls_ca=pki.ca) as client, pytest.raises(UnauthenticatedError):
            client.status()
        with LRClient(ctl.address, tls_ca=pki.ca, token=ADMIN_SECRET) as client:
            assert client.status().num_parameters == 4
        line = one_error_line(cli(ctl.address, "--tls-ca", str(pki.ca), "status"), 5)
        assert "bearer token" in line


# -- 4. the binding rule --------------------------------------------------------------


def test_check_bind_decisions(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    server_only = ServerTLS.from_files(pki.server_cert, pki.server_key)
    mutual = ServerTLS.from_files(pki.server_cert, pki.server_key, client_ca=pki.ca)
    tokens = Tokens([Token("alice", ADMIN, ADMIN_SECRET)])
    address = "0.0.0.0:50051"
    # Authenticated callers: mutual TLS, or tokens (with or without TLS): quiet.
    for tls, toks in ((mutual, None), (server_only, tokens), (None, tokens), (mutual, tokens)):
        assert check_bind(address, toks, False, tls) is None
    assert capsys.readouterr() == ("", "")
    # Server-only TLS authenticates nobody: refused, saying so and how to fix it.
    with pytest.raises(ValueError) as info:
        check_bind(address, None, False, server_only)
    message = str(info.value)
    assert address in message and "authenticates nobody" in message
    assert "LRCTL_ADMIN_TOKEN" in message and "LRCTL_WORKER_TLS_CLIENT_CA" in message and "--insecure" in message
    # Nothing at all: refused, naming tokens and mutual TLS.
    with pytest.raises(ValueError) as info:
        check_bind(address, None, False, None)
    assert "LRCTL_ADMIN_TOKEN" in str(info.value) and "LRCTL_WORKER_TLS_CLIENT_CA" in str(info.value)
    assert capsys.readouterr() == ("", "")
    # --insecure: starts, with a warning each time.
    assert check_bind(address, None, True, server_only) is None
    assert "WITHOUT client authentication" in capsys.readouterr().err
    assert check_bind(address, None, True, None) is None
    assert "WITHOUT authentication" in capsys.readouterr().err
    # Loopback and unix sockets need nothing.
    for local in ("127.0.0.1:0", "[::1]:50051", "unix:/tmp/lrctl.sock"):
        assert check_bind(local, None, False, server_only) is None
    assert capsys.readouterr() == ("", "")


def test_a_missing_port_is_named_on_both_sides() -> None:
    expected = "port missing in address '127.0.0.1': expected HOST:PORT or unix:/path"
    with pytest.raises(ValueError, match=expected):
        split_address("127.0.0.1")
    with pytest.raises(InvalidArgumentError, match=expected):
        LRClient("127.0.0.1")
    assert expected in one_error_line(cli("127.0.0.1", "status"), 2)
    with pytest.raises(ValueError, match="abstract unix sockets have no file permissions"):
        serve(False, address="unix-abstract:lrctl")


# -- 5. configuration from the environment and bad files -----------------------------


def test_worker_and_client_from_environment(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LRCTL_WORKER_TLS_CERT", str(pki.server_cert))
    monkeypatch.setenv("LRCTL_WORKER_TLS_KEY", str(pki.server_key))
    monkeypatch.setenv("LRCTL_WORKER_TLS_CLIENT_CA", str(pki.ca))
    model = seed_model()
    with attach(model, per_parameter_optimizer(model), address="127.0.0.1:0") as ctl:
        assert ctl.tls is not None and ctl.tls.mutual
        # The client's variables (the same names carry the client's own certificate).
        client_env = {"LRCTL_TLS_CA": str(pki.ca), "LRCTL_TLS_CERT": str(pki.client_cert),
                      "LRCTL_TLS_KEY": str(pki.client_key)}
        for name, value in client_env.items():
            monkeypatch.setenv(name, value)
        with LRClient(ctl.address) as client:
            assert client.tls is not None and client.tls.mutual
            assert client.status().num_parameters == 4
        done = cli(ctl.address, "status", "--json", env=clean_env(**client_env))
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["num_parameters"] == 4
    # tls=False turns the environment's TLS off.
    with serve(False) as ctl:
        assert ctl.tls is None


def test_server_tls_bad_configuration_is_named(pki: Pki, tmp_path: Path) -> None:
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("hello\n")
    missing = tmp_path / "missing.pem"
    cases = [
        (lambda: ServerTLS.from_files(missing, pki.server_key), f"{str(missing)!r}: cannot read it"),
        (lambda: ServerTLS.from_files(not_pem, pki.server_key), "not a PEM certificate"),
        (lambda: ServerTLS.from_files(pki.server_cert, not_pem), "not a PEM private key"),
        (lambda: ServerTLS.from_files(pki.server_cert, pki.client_key), "is not the key of certificate"),
        (lambda: ServerTLS.from_files(pki.server_cert, pki.server_key, client_ca=not_pem),
         "client CA .*not a PEM certificate"),
        (lambda: ServerTLS.from_env({"LRCTL_WORKER_TLS_CERT": str(pki.server_cert)}),
         "LRCTL_WORKER_TLS_CERT is given without LRCTL_WORKER_TLS_KEY"),
        (lambda: ServerTLS.from_env({"LRCTL_WORKER_TLS_KEY": str(pki.server_key)}),
         "LRCTL_WORKER_TLS_KEY is given without LRCTL_WORKER_TLS_CERT"),
        (lambda: ServerTLS.from_env({"LRCTL_WORKER_TLS_CLIENT_CA": str(pki.ca)}),
         "LRCTL_WORKER_TLS_CLIENT_CA needs LRCTL_WORKER_TLS_CERT and LRCTL_WORKER_TLS_KEY"),
    ]
    for build, message in cases:
        with pytest.raises(ValueError, match=message):
            build()
    assert ServerTLS.from_env({}) is None
    assert "PRIVATE" not in repr(ServerTLS.from_files(pki.server_cert, pki.server_key))


def test_encrypted_key_is_refused(pki: Pki, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ValueError, match="the private key is encrypted"):
        ServerTLS.from_files(pki.server_cert, encrypted)


def test_client_bad_configuration_is_named(pki: Pki, tmp_path: Path) -> None:
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("hello\n")
    with pytest.raises(InvalidArgumentError, match="client certificate is given without its key"):
        LRClient("127.0.0.1:1", tls_cert=pki.client_cert)
    with pytest.raises(InvalidArgumentError, match="client key is given without its certificate"):
        LRClient("127.0.0.1:1", tls_key=pki.client_key)
    with pytest.raises(InvalidArgumentError, match=f"CA certificate {str(not_pem)!r}: not a PEM"):
        LRClient("127.0.0.1:1", tls_ca=not_pem)
    with pytest.raises(InvalidArgumentError, match="cannot read it"):
        LRClient("127.0.0.1:1", tls_ca=tmp_path / "missing.pem")
    # The CLI: a usage error, one line, before any connection.
    line = one_error_line(cli("127.0.0.1:1", "--tls-cert", str(pki.client_cert), "list"), 2)
    assert "--tls-key" in line
    line = one_error_line(cli("127.0.0.1:1", "--tls-ca", str(not_pem), "list"), 2)
    assert str(not_pem) in line and "not a PEM certificate" in line


# -- 6. unix sockets ------------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (a socket path has at most 107 bytes)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lrctl-", dir="/tmp") as directory:
        yield Path(directory)


def test_unix_socket_is_owner_only_and_serves_the_cli(short_dir: Path) -> None:
    path = short_dir / "worker.sock"
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    with attach(model, optimizer, address=f"unix:{path}", tls=False) as ctl, stepping(optimizer):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert ctl.address == f"unix:{path}" and ctl.port == 0
        assert not [p for p in short_dir.iterdir() if p != path]  # the private bind dir is gone
        done = cli(ctl.address, "set", "layer1.bias=0.25")
        assert done.returncode == 0, done.stderr
        got = cli(ctl.address, "get", "layer1.bias", "--json")
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout)[0]["lr"] == 0.25
    assert not path.exists()  # removed on close


def test_unix_socket_with_tokens_and_tls(short_dir: Path, pki: Pki) -> None:
    tokens = Tokens([Token("alice", ADMIN, ADMIN_SECRET)])
    tls = ServerTLS.from_files(pki.server_cert, pki.server_key, client_ca=pki.ca)
    with serve(tls, address=f"unix://{short_dir}/w.sock", tokens=tokens) as ctl:
        assert ctl.address == f"unix:{short_dir}/w.sock"
        # The name checked on a unix socket is "localhost" (the certificate holds it).
        mtls = dict(tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
        with LRClient(ctl.address, **mtls) as client, pytest.raises(UnauthenticatedError):
            client.status()
        with LRClient(ctl.address, token=ADMIN_SECRET, **mtls) as client:
            assert client.status().num_parameters == 4


def test_a_stale_socket_is_replaced(short_dir: Path) -> None:
    path = short_dir / "worker.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a killed worker leaves
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    with serve(False, address=f"unix:{path}") as ctl, LRClient(ctl.address) as client:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert client.status().num_parameters == 4


def test_a_live_socket_is_not_taken_over(short_dir: Path) -> None:
    path = short_dir / "worker.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        with pytest.raises(OSError, match="another process is listening on it"):
            serve(False, address=f"unix:{path}")
        assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_a_regular_file_is_refused_and_left_intact(short_dir: Path) -> None:
    path = short_dir / "precious.txt"
    path.write_text("do not delete\n")
    with pytest.raises(ValueError, match="exists and is not a socket.*never deletes it"):
        serve(False, address=f"unix:{path}")
    assert path.read_text() == "do not delete\n"
    assert sorted(short_dir.iterdir()) == [path]


def test_a_missing_parent_is_refused(short_dir: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        serve(False, address=f"unix:{short_dir}/nope/worker.sock")
    assert list(short_dir.iterdir()) == []


# -- 7. the demo worker over mutual TLS -----------------------------------------------


def test_demo_serves_mutual_tls(pki: Pki) -> None:
    proc = subprocess.Popen(
        [*LRCTL, "demo", "--serve", "--address", "127.0.0.1:0", "--step-delay", "0.01",
         "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "(mutual TLS)" in first, first
        address = first.split(" on ", 1)[1].split(" ", 1)[0]
        flags = ("--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key))
        done = cli(address, *flags, "set", "layer2.weight=0.002")
        assert done.returncode == 0, done.stderr
        assert "applied at step" in done.stdout
        refused = cli(address, "--tls-ca", str(pki.ca), "status")
        assert refused.returncode == 3
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--serve", "--tls-cert", "c.pem"], "--tls-cert is given without --tls-key"),
    (["--tls-cert", "c.pem", "--tls-key", "k.pem"], "--tls-cert needs --serve"),
    (["--serve", "--tls-cert", "/nonexistent/c.pem", "--tls-key", "k.pem"], "'/nonexistent/c.pem': cannot read it"),
])
def test_demo_bad_tls_flags(args: list[str], message: str) -> None:
    done = subprocess.run([*LRCTL, "demo", *args], capture_output=True, text=True, timeout=60, env=clean_env())
    assert message in one_error_line(done, 2)
