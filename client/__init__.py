"""The thin lrctl client: grpcio and protobuf only, no torch."""

from lrctl.client.client import LRClient
from lrctl.client.errors import LrctlError
from lrctl.client.types import ChangeList, ChangeRecord, ParameterInfo, RateChange, SetResult, Status, Update

__all__ = [
    "ChangeList",
    "ChangeRecord",
    "LRClient",
    "LrctlError",
    "ParameterInfo",
    "RateChange",
    "SetResult",
    "Status",
    "Update",
]
