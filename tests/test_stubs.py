"""The committed generated stubs are exactly what the committed .proto generates.

Regenerates with the pinned grpcio-tools into a temporary directory and fails on any
byte difference, so the .proto and its stubs cannot drift apart.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROTO = Path("lrctl/v1/lrctl.proto")
GENERATED = ("lrctl_pb2.py", "lrctl_pb2_grpc.py", "lrctl_pb2.pyi")


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) regenerates the stubs")
    out = tmp_path_factory.mktemp("stubs")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            "protos",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--pyi_out={out}",
            str(PROTO),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"protoc failed:\n{proc.stdout}\n{proc.stderr}"
    return out / PROTO.parent


@pytest.mark.parametrize("name", GENERATED)
def test_committed_stub_matches_regenerated(regenerated: Path, name: str) -> None:
    committed = REPO / "protos" / PROTO.parent / name
    fresh = regenerated / name
    assert fresh.exists(), f"protoc did not produce {name}"
    assert committed.exists(), f"{committed} is missing; generate and commit it"
    assert committed.read_bytes() == fresh.read_bytes(), (
        f"{committed.relative_to(REPO)} differs from what {PROTO} generates; regenerate with:\n"
        "  python -m grpc_tools.protoc -I protos --python_out=protos --grpc_python_out=protos "
        f"--pyi_out=protos protos/{PROTO}"
    )


def test_no_other_generated_files(regenerated: Path) -> None:
    """protoc produces exactly the three committed files (nothing left uncommitted)."""
    assert sorted(p.name for p in regenerated.iterdir()) == sorted(GENERATED)
