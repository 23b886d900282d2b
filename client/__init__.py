"""The thin lrctl client: grpcio and protobuf only, no torch."""

from lrctl.client.client import LRClient
from lrctl.client.errors import LrctlError
from lrctl.client.types import (
    CancelResult,
    ChangeRecord,
    ParameterInfo,
    PendingChange,
    RateChange,
    SetResult,
    Status,
    Update,
)

__all__ = [
    "CancelResult",
    "ChangeRecord",
    "LRClient",
    "LrctlError",
    "ParameterInfo",
    "PendingChange",
    "RateChange",
    "SetResult",
    "Status",
    "Update",
]
