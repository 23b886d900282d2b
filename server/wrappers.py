"""Seeing through the wrappers users pass to attach(): the model's own names and the
torch optimizer itself.

`torch.compile` names every parameter `_orig_mod.…`, DistributedDataParallel and
DataParallel `module.…`; selectors are written for the model's own names, so attach
lists those. Accelerate and Lightning wrap the optimizer.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.optim import Optimizer

_MAX_WRAPPERS = 4
# Accelerate's AcceleratedOptimizer keeps the real optimizer in `.optimizer`, Lightning's
# LightningOptimizer in `._optimizer` (it also has an `.optimizer` property).
_WRAPPER_ATTRS = ("optimizer", "_optimizer")


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


def _wrapped(obj: object) -> object | None:
    """The optimizer `obj` wraps, or None when it wraps nothing."""
    for attr in _WRAPPER_ATTRS:
        try:
            inner = getattr(obj, attr, None)
        except Exception:  # a wrapper's property may raise; then it wraps nothing usable
            inner = None
        if inner is None or inner is obj:
            continue
        if isinstance(inner, Optimizer) or any(hasattr(inner, a) for a in _WRAPPER_ATTRS):
            return inner
    return None


def unwrap_optimizer(opt: object) -> Optimizer:
    """The torch optimizer inside `opt`, following `.optimizer` then `._optimizer`.

    Both wrappers lrctl meets in practice (Accelerate's AcceleratedOptimizer, Lightning's
    LightningOptimizer) are themselves `torch.optim.Optimizer` instances that forward
    `param_groups`, so the walk goes on while an attribute leads to another optimizer,
    not merely while the object is not an Optimizer. At most a few levels.
    """
    current = opt
    for _ in range(_MAX_WRAPPERS + 1):
        inner = _wrapped(current)
        if inner is None:
            if isinstance(current, Optimizer):
                return current
            break
        current = inner
    raise TypeError(
        f"{type(opt).__name__} is not a torch.optim.Optimizer and does not wrap one within "
        f"{_MAX_WRAPPERS} levels of .optimizer/._optimizer; pass the torch optimizer itself"
    )
