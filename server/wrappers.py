"""Seeing through the wrappers users pass to attach(): the model's own names.

`torch.compile` names every parameter `_orig_mod.…`, DistributedDataParallel and
DataParallel `module.…`; selectors are written for the model's own names, so attach
lists those. (Optimizer wrappers: lrctl.server.adopt.unwrap_optimizer.)
"""

from __future__ import annotations

from typing import Iterable

import torch

_MAX_WRAPPERS = 4


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside torch.compile / DDP / DataParallel wrappers (at most a few levels).

    The parameters are the same tensors, so the optimizer still holds exactly them.
    """
    wrappers: tuple[type, ...] = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    for _ in range(_MAX_WRAPPERS):
        inner = getattr(model, "_orig_mod", None)  # torch._dynamo's OptimizedModule
        if isinstance(inner, torch.nn.Module):
            model = inner
        elif isinstance(model, wrappers) and isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            break
    return model


def named_parameters(
    model: torch.nn.Module | Iterable[tuple[str, torch.Tensor]],
) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) pairs of the unwrapped model, or the given pairs as they are."""
    if isinstance(model, torch.nn.Module):
        return list(unwrap_model(model).named_parameters())
    return list(model)
