"""The thin lrctl client: grpcio and protobuf only, no torch."""

from lrctl.client.client import LRClient
from lrctl.client.errors import LrctlError
from lrctl.client.types import ChangeRecord, Guardrail, ParameterInfo, RateChange, SetResult, Status, Update

__all__ = [
    "ChangeRecord",
    "Guardrail",
    "LRClient",
    "LrctlError",
    "ParameterInfo",
    "RateChange",
    "SetResult",
    "Status",
    "Update",
]
