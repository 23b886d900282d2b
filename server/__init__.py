"""The worker side of lrctl: attach a training job and serve its learning rates.

Names are imported on first use, so that `lrctl.server.controller` and the other
transport-free modules import without grpc (the serving modules need it)."""

from __future__ import annotations

from typing import Any

__all__ = ["Controller", "LRControl", "QueueLimits", "attach", "build_optimizer"]

_HOMES = {
    "Controller": "lrctl.server.controller",
    "LRControl": "lrctl.server.control",
    "QueueLimits": "lrctl.server.queue_limits",
    "attach": "lrctl.server.control",
    "build_optimizer": "lrctl.server.optim",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'lrctl.server' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(home), name)
