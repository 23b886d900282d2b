"""build_optimizer(): an optimizer from per-name initial learning rates."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import math

import torch

from lrctl.common.errors import LrctlError
from lrctl.server.selectors import NameIndex, parse_selector


def build_optimizer(
    model: torch.nn.Module | Iterable[tuple[str, torch.Tensor]],
    optimizer_class: type[torch.optim.Optimizer],
    lrs: Mapping[str, float],
    *,
    default_lr: float | None = None,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """Build `optimizer_class` with per-parameter initial rates, one group per distinct rate.

    Keys of `lrs` are selectors (exact names, globs, "re:" regexes); a parameter that
    two keys match must get the same rate from both. Parameters no key matches get
    `default_lr` (required if there are any). Parameters that do not require grad are
    left out, as optimizers usually leave them. Any other keyword goes to the optimizer
    (``momentum=0.9``, ``foreach=True``, ...).
    """
    if default_lr is not None and not (math.isfinite(default_lr) and default_lr >= 0):
        raise ValueError(f"default_lr {default_lr!r} must be a finite number >= 0")
    named = list(model.named_parameters() if isinstance(model, torch.nn.Module) else model)
    index = NameIndex([name for name, _ in named])
    chosen: dict[int, tuple[str, float]] = {}
    for key, lr in lrs.items():
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"learning rate {lr!r} for {key!r} must be a finite number >= 0")
        try:
            matched = index.match(key)
        except LrctlError as exc:
            raise ValueError(str(exc)) from None
        if not matched:
            raise ValueError(str(index.not_found(parse_selector(key))))
        for i in matched:
            previous = chosen.setdefault(i, (key, lr))
            if previous[1] != lr:
                raise ValueError(
                    f"{previous[0]!r} and {key!r} give {index.names[i]!r} different rates "
                    f"({previous[1]!r} vs {lr!r})"
                )
    groups: dict[float, dict[str, list]] = {}
    for i, (name, param) in enumerate(named):
        if not param.requires_grad:
            continue
        if i in chosen:
            lr = chosen[i][1]
        elif default_lr is not None:
            lr = default_lr
        else:
            raise ValueError(f"no learning rate for {name!r}: add it to lrs or pass default_lr")
        group = groups.setdefault(lr, {"params": [], "param_names": []})
        group["params"].append(param)
        group["param_names"].append(name)
    param_groups = [{"lr": lr, **g} for lr, g in groups.items()]
    if default_lr is not None:
        optimizer_kwargs["lr"] = default_lr
    return optimizer_class(param_groups, **optimizer_kwargs)
