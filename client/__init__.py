"""The thin lrctl client: grpcio and protobuf only, no torch.

The names below load on first use (PEP 562), so that `lrctl` (lrctl.client.cli) can
set up grpc's environment before grpc is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lrctl.client.client import LRClient
    from lrctl.client.errors import LrctlError
    from lrctl.client.types import (
        CancelResult, ChangeList, ChangeRecord, Guardrail, LockstepInfo, ParameterInfo, PendingChange, RateChange,
        SetResult, Status, Turn, TurnOutcome, Update,
    )

_WHERE = {
    "LRClient": "lrctl.client.client",
    "LrctlError": "lrctl.client.errors",
    **{name: "lrctl.client.types" for name in
       ("CancelResult", "ChangeList", "ChangeRecord", "Guardrail", "LockstepInfo", "ParameterInfo", "PendingChange",
        "RateChange", "SetResult", "Status", "Turn", "TurnOutcome", "Update")},
}

__all__ = [
    "CancelResult",
    "ChangeList",
    "ChangeRecord",
    "Guardrail",
    "LockstepInfo",
    "LRClient",
    "LrctlError",
    "ParameterInfo",
    "PendingChange",
    "RateChange",
    "SetResult",
    "Status",
    "Turn",
    "TurnOutcome",
    "Update",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'lrctl.client' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
