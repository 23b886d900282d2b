"""The Dockerfile, really built and run (opt-in: LRCTL_CONTAINER_TESTS=1; needs root,
podman and minutes). Follows ../shared/container-testing.md: podman with runc, a local
Debian base image (localhost/pybase:bookworm, made with debootstrap; another with
$LRCTL_CONTAINER_BASE), torch from the machine's local CPU wheel folder (pip's
find-links). The worker runs detached on the host's network, listening on 0.0.0.0 with
an admin token; the host's CLI drives it; SIGTERM (podman stop) ends it with exit 0.

    LRCTL_CONTAINER_TESTS=1 python -m pytest -q -s tests/test_container.py
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import LRCTL

pytestmark = pytest.mark.skipif(
    os.environ.get("LRCTL_CONTAINER_TESTS") != "1",
    reason="builds and runs the container image (root, podman, minutes): set LRCTL_CONTAINER_TESTS=1",
)

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = os.environ.get("LRCTL_CONTAINER_BASE", "localhost/pybase:bookworm")
# Eventually-bounds, never asserted as durations: a cold build installs torch.
BUILD_TIMEOUT_S = 1800
HEALTHY_WITHIN_S = 300
CONTAINER_UID = 1000  # the image's lrctl user


def _find_links() -> str | None:
    """The local wheel folder pip's configuration names (find-links), if any."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(".find-links"):
            folder = value.strip().strip("'\"").split()[0]
            if os.path.isdir(folder):
                return folder
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Podman:
    """podman as this sandbox needs it: runc, cgroupfs, no ulimits or pid limit."""

    def __init__(self, work: Path) -> None:
        conf = work / "containers.conf"
        conf.write_text("[containers]\ndefault_ulimits = []\npids_limit = 0\n")
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.base = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([*self.base, *args], capture_output=True, text=True,
                                env=self.env, timeout=timeout)
        if check and result.returncode != 0:
            pytest.fail(f"podman {' '.join(args[:2])} failed ({result.returncode}): {result.stderr[-2000:]}")
        return result


def _lrctl(address: str, *args: str, token: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LRCTL_")}
    if token is not None:
        env["LRCTL_TOKEN"] = token
    return subprocess.run([*LRCTL, "--address", address, *args], capture_output=True, text=True,
                          env=env, timeout=60)


def test_the_image_builds_serves_and_stops_cleanly() -> None:
    if shutil.which("podman") is None:
        pytest.fail("LRCTL_CONTAINER_TESTS=1 but podman is not installed (apt-get install podman runc)")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="lrctl-ctr-", dir="/tmp"))
    podman = Podman(work)
    tag = f"localhost/lrctl-test:{secrets.token_hex(4)}"
    name = f"lrctl-test-{secrets.token_hex(4)}"
    token = secrets.token_urlsafe()
    port = _free_port()
    data = work / "data"
    data.mkdir()
    os.chown(data, CONTAINER_UID, CONTAINER_UID)  # the image's non-root user writes here
    try:
        build = ["build", "--format", "docker", "--isolation", "chroot", "--network", "host",
                 "-v", "/etc/ssl/certs:/etc/ssl/certs:ro", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", tag]
        links = _find_links()
        if links:
            build += ["-v", f"{links}:{links}:ro", "--build-arg", f"PIP_FIND_LINKS={links}"]
        podman(*build, str(ROOT), timeout=BUILD_TIMEOUT_S)
        built = time.monotonic()
        image = json.loads(podman("image", "inspect", tag).stdout)[0]
        assert image["Config"]["User"] == "lrctl" and image["Config"]["Entrypoint"] == ["lrctl"]
        assert image["Healthcheck"]["Test"] == ["CMD", "lrctl", "health"], image.get("Healthcheck")

        # Without a token the default command refuses 0.0.0.0, saying how to give one.
        refused = podman("run", "--rm", "--network", "host", tag,
                         "demo", "--serve", "--address", f"0.0.0.0:{port}", check=False)
        assert refused.returncode != 0
        assert f"refusing to listen on 0.0.0.0:{port} without authentication" in refused.stderr
        assert "In a container" in refused.stderr and "-e LRCTL_ADMIN_TOKEN" in refused.stderr

        podman("run", "-d", "--name", name, "--network", "host",
               "-e", f"LRCTL_ADMIN_TOKEN={token}", "-e", f"LRCTL_ADDRESS=127.0.0.1:{port}",
               "-v", f"{data}:/data", tag,
               "demo", "--serve", "--address", f"0.0.0.0:{port}", "--model", "mlp",
               "--audit-log", "/data/audit.jsonl")
        deadline = time.monotonic() + HEALTHY_WITHIN_S
        while podman("healthcheck", "run", name, check=False).returncode != 0:
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            if state != "running" or time.monotonic() > deadline:
                pytest.fail(f"never healthy (state {state}): {podman('logs', name).stdout[-2000:]}"
                            f"{podman('logs', name).stderr[-2000:]}")
            time.sleep(1)
        healthy = time.monotonic()

        address = f"127.0.0.1:{port}"
        assert _lrctl(address, "health", token=None).stdout == "SERVING\n"
        listed = _lrctl(address, "list", "--names", token=token)
        assert listed.returncode == 0, listed.stderr
        first = "head.bias"  # the mlp demo's; its encoder.norm is frozen
        assert first in listed.stdout.split(), listed.stdout
        changed = _lrctl(address, "set", f"{first}=0.0125", "--reason", "from the host", token=token)
        assert changed.returncode == 0, changed.stderr
        assert re.search(r"applied at step \d+", changed.stdout), changed.stdout
        got = _lrctl(address, "get", first, "--json", token=token)
        assert got.returncode == 0 and json.loads(got.stdout)[0]["lr"] == 0.0125, got
        refused_call = _lrctl(address, "set", f"{first}=0.5", token=None)
        assert refused_call.returncode == 5, refused_call
        # Refused: nothing changed.
        assert json.loads(_lrctl(address, "get", first, "--json", token=token).stdout)[0]["lr"] == 0.0125

        podman("stop", "-t", "10", name, timeout=60)
        assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"
        logs = podman("logs", name)
        assert "lrctl worker: stopped by signal; shutting down" in logs.stdout, logs.stdout[-2000:]
        assert "lrctl worker: stopped" in logs.stdout.splitlines()[-1]
        # The audit log outlives the container, on the host's volume.
        history = subprocess.run([*LRCTL, "history", "--file", str(data / "audit.jsonl")],
                                 capture_output=True, text=True, timeout=60)
        assert history.returncode == 0 and "from the host" in history.stdout, history
        done = time.monotonic()
        print(f"\ncontainer test: build {built - started:.0f} s, healthy after "
              f"{healthy - built:.0f} s, whole test {done - started:.0f} s")
    finally:
        podman("rm", "-f", name, check=False)
        podman("rmi", "-f", tag, check=False, timeout=300)
        shutil.rmtree(work, ignore_errors=True)
