"""Optimizer checkpoints that survive lrctl's regrouping: pure functions on state dicts.

lrctl replaces ``optimizer.param_groups`` with groups of its own (parameters with equal
hyperparameters and rates coalesced, groups split and merged as rates change). torch's
``Optimizer.state_dict()`` follows whatever grouping is live, and
``Optimizer.load_state_dict()`` matches groups *by position and size only*, so a
checkpoint taken after a regroup no longer loads into the user's freshly built optimizer
("loaded state dict has a different number of parameter groups"). The functions here
translate between groupings by parameter *name*; the controller wires them into torch's
own hooks:

- ``Optimizer.register_state_dict_post_hook(hook)``, ``hook(optimizer, state_dict)
  -> state_dict | None``: a returned dict *replaces* the one ``state_dict()`` returns.
  The hook calls `to_layout`, so a saved checkpoint is always in the user's original
  layout and loads with plain torch, with or without lrctl attached.
- ``Optimizer.register_load_state_dict_pre_hook(hook)``, ``hook(optimizer, state_dict)
  -> state_dict | None``: gets a shallow copy of the dict passed to ``load_state_dict``;
  a returned dict is what gets loaded. The hook calls `remap_by_name`, so a checkpoint
  from any grouping (lrctl's, the user's, another run's) loads into the live grouping.
- ``Optimizer.register_load_state_dict_post_hook(hook)``, ``hook(optimizer) -> None``.

What torch does around them that matters here (torch 2.x, ``torch/optim/optimizer.py``):

- ``state_dict()`` numbers parameters 0, 1, 2, ... in order of groups, then of params
  within a group; ``"state"`` maps those ints to the optimizer's *live* per-parameter
  state dicts (not copies), and each packed group is a shallow copy of the live group
  (a tensor lr is the live tensor). So nothing here mutates what it is given.
- ``load_state_dict()`` deep-copies the saved groups and installs *them* (with the live
  ``params`` put in): the saved hyperparameters replace the live ones, and the group dict
  objects (and a tensor lr) are new after every load. Saved ``param_names`` replace
  the live ones. `remap_by_name` therefore copies every hyperparameter and the names
  from the live groups into the dict it returns.
- ``load_state_dict()`` casts state with ``Tensor.to``, which returns the same tensor
  when dtype and device already match: loaded state *shares* storage with the dict that
  was loaded. (A dict read back with ``torch.load`` owns its tensors, so this only
  matters when a dict is loaded in the process that produced it.)

Everything stays where it is: no ``.cpu()``, no copies of state tensors (only group
lists and the outer dicts are rebuilt). Imports torch, never grpc.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

__all__ = ["GroupLayout", "Layout", "NameReport", "remap_by_name", "to_layout"]

# Group entries that are not hyperparameters.
_NOT_HYPER = ("params", "param_names")

# How many names of each kind NameReport.describe lists.
_DESCRIBE_LIMIT = 5


def _freeze_value(value: Any) -> Any:
    """A private copy of a hyperparameter value: lrctl edits tensor rates in place
    (``fill_``), and the layout must keep the value as it was at attach time."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    try:
        return copy.deepcopy(value)
    except Exception:  # an exotic, uncopyable value: keep the object itself
        return value


@dataclass(frozen=True, eq=False)
class GroupLayout:
    """One group of the user's original grouping: hyperparameters and member names."""

    hyperparameters: Mapping[str, Any]
    """Every key of the group but "params"/"param_names", values as they were."""
    names: tuple[str, ...]
    """Names of the parameters the group held, in order."""


@dataclass(frozen=True, eq=False)
class Layout:
    """The user's grouping at attach time, described by parameter names.

    Frozen: the hyperparameter mappings are read-only views of private copies (tensor
    values cloned), so later in-place edits of the live groups do not reach it.
    """

    groups: tuple[GroupLayout, ...]

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer, names_by_param: Mapping[int, str]) -> "Layout":
        """Describe `optimizer`'s current grouping; `names_by_param` maps ``id(param)``
        to its name (a group's own "param_names" is used for a parameter it lacks)."""
        groups = []
        for g, group in enumerate(optimizer.param_groups):
            own = group.get("param_names")
            names = []
            for j, p in enumerate(group["params"]):
                name = names_by_param.get(id(p))
                if name is None and own is not None and j < len(own):
                    name = own[j]
                if name is None:
                    raise ValueError(
                        f"parameter {j} of optimizer group {g} has no name: "
                        "every parameter the optimizer holds must be named"
                    )
                names.append(str(name))
            hypers = {k: _freeze_value(v) for k, v in group.items() if k not in _NOT_HYPER}
            groups.append(GroupLayout(types.MappingProxyType(hypers), tuple(names)))
        return cls(tuple(groups))

    @property
    def names(self) -> tuple[str, ...]:
        """Every name, in the order torch numbers the parameters."""
        return tuple(n for group in self.groups for n in group.names)

    def __len__(self) -> int:
        return len(self.groups)


@dataclass(frozen=True)
class NameReport:
    """How a checkpoint's parameters matched the live model's by name."""

    missing_in_checkpoint: tuple[str, ...] = ()
    """Live names with no entry in the checkpoint: they start with fresh state."""
    unknown_in_checkpoint: tuple[str, ...] = ()
    """Checkpoint names the model no longer has: their state was dropped."""

    @property
    def complete(self) -> bool:
        """True when every live and every saved name matched."""
        return not self.missing_in_checkpoint and not self.unknown_in_checkpoint

    def describe(self) -> str:
        """One readable line (at most 5 names of each kind are listed)."""
        if self.complete:
            return "optimizer checkpoint matched every parameter by name"
        parts = []
        if self.missing_in_checkpoint:
            n = len(self.missing_in_checkpoint)
            parts.append(
                f"{n} parameter{'s' if n != 1 else ''} not in the checkpoint "
                f"start{'s' if n == 1 else ''} with fresh optimizer state: "
                + listing(self.missing_in_checkpoint)
            )
        if self.unknown_in_checkpoint:
            n = len(self.unknown_in_checkpoint)
            parts.append(
                f"{n} checkpoint parameter{'s' if n != 1 else ''} no longer in the model "
                f"{'were' if n != 1 else 'was'} dropped: " + listing(self.unknown_in_checkpoint)
            )
        return "; ".join(parts)


def listing(names: Sequence[str]) -> str:
    """Names for a one-line report: the first few, then how many more."""
    shown = ", ".join(names[:_DESCRIBE_LIMIT])
    rest = len(names) - _DESCRIBE_LIMIT
    return f"{shown} and {rest} more" if rest > 0 else shown


def _live_names(
    optimizer: torch.optim.Optimizer, names_by_param: Mapping[int, str]
) -> list[list[str | None]]:
    """Per live group, each parameter's name (None when it has none)."""
    out = []
    for group in optimizer.param_groups:
        own = group.get("param_names")
        names: list[str | None] = []
        for j, p in enumerate(group["params"]):
            name = names_by_param.get(id(p))
            if name is None and own is not None and j < len(own):
                name = own[j]
            names.append(name)
        out.append(names)
    return out


def _sizes(groups: Iterable[Mapping[str, Any]]) -> list[int]:
    return [len(g["params"]) for g in groups]


def _lr_like(lr: float, original: Any) -> Any:
    """`lr` in the form of the original group's lr: a float, or a tensor of its dtype
    and device."""
    if isinstance(original, torch.Tensor):
        return torch.tensor(float(lr), dtype=original.dtype, device=original.device)
    return float(lr)


def to_layout(
    state_dict: dict,
    optimizer: torch.optim.Optimizer,
    layout: Layout,
    names_by_param: Mapping[int, str],
    lr_of: Callable[[str], float],
) -> dict:
    """`state_dict`, produced by ``optimizer.state_dict()`` for the live (regrouped)
    optimizer, re-expressed in the original `layout` (for the state_dict post hook).

    The result has the layout's groups in its order, each with its original
    hyperparameters, "lr" = ``lr_of(first name of the group)`` (a float, or a tensor of
    the original lr's dtype and device if the original lr was a tensor), its "params"
    numbered as torch numbers them and its "param_names"; "state" is re-keyed to that
    numbering and shares the per-parameter state dicts and tensors. It loads with plain
    ``load_state_dict`` into a freshly built optimizer of the original grouping.

    Layout names the optimizer no longer holds are skipped (a group may end up empty,
    and then keeps its original lr). Parameters the optimizer holds but the layout does
    not know are left out, state included: to keep them, extend the layout. A group
    whose members now train at different rates is saved at its first member's rate: the
    original layout cannot say more. Other top-level keys of `state_dict` are kept.
    """
    saved_groups = state_dict["param_groups"]
    live_groups = optimizer.param_groups
    if _sizes(saved_groups) != _sizes(live_groups):
        raise ValueError(
            "state dict does not describe the live optimizer: its groups have sizes "
            f"{_sizes(saved_groups)}, the optimizer's {_sizes(live_groups)}"
        )
    # name -> number in the given dict (which follows the live grouping)
    old_id: dict[str, Any] = {}
    for saved, names in zip(saved_groups, _live_names(optimizer, names_by_param)):
        dict_names = saved.get("param_names")
        for j, (pid, name) in enumerate(zip(saved["params"], names)):
            if name is None and dict_names is not None and j < len(dict_names):
                name = dict_names[j]
            if name is not None:
                old_id.setdefault(name, pid)

    old_state = state_dict["state"]
    param_ids = {pid for g in saved_groups for pid in g["params"]}
    new_state: dict[Any, Any] = {}
    new_groups = []
    next_id = 0
    for original in layout.groups:
        group = dict(original.hyperparameters)
        params, names = [], []
        for name in original.names:
            pid = old_id.get(name)
            if pid is None:
                continue  # no longer held: skipped
            if pid in old_state:
                new_state[next_id] = old_state[pid]
            params.append(next_id)
            names.append(name)
            next_id += 1
        if "lr" in group:
            group["lr"] = (
                _lr_like(lr_of(names[0]), group["lr"]) if names else _freeze_value(group["lr"])
            )
        group["params"] = params
        group["param_names"] = names
        new_groups.append(group)
    # State not keyed by a parameter (torch keeps it as is for old checkpoints).
    for key, value in old_state.items():
        if key not in param_ids and not isinstance(key, int):
            new_state[key] = value

    out = {k: v for k, v in state_dict.items() if k not in ("state", "param_groups")}
    out["state"] = new_state
    out["param_groups"] = new_groups
    return out


def remap_by_name(
    saved: dict, optimizer: torch.optim.Optimizer, names_by_param: Mapping[int, str]
) -> tuple[dict, NameReport]:
    """A dict that loads into the live optimizer's *current* grouping, each parameter's
    state found by name in `saved` (for the load_state_dict pre hook).

    `saved` may come from any grouping whose groups carry "param_names". The result has
    the live groups' count and sizes, params numbered as torch numbers the live
    optimizer's, and each group's hyperparameters and names copied from the live group,
    so loading changes neither the grouping nor any rate. Per-parameter state is shared
    with `saved`, not copied.

    Without "param_names" in some saved group: if its group count and sizes match the
    live optimizer, `saved` is returned unchanged (torch's positional load, saved
    hyperparameters included) with an empty report; otherwise ValueError.
    """
    saved_groups = saved["param_groups"]
    live_groups = optimizer.param_groups
    if any("param_names" not in g for g in saved_groups):
        saved_sizes, live_sizes = _sizes(saved_groups), _sizes(live_groups)
        if saved_sizes == live_sizes:
            return saved, NameReport()
        raise ValueError(
            f"checkpoint has {len(saved_groups)} parameter group(s) of sizes {saved_sizes}, "
            f"the optimizer {len(live_groups)} of sizes {live_sizes}, and the checkpoint "
            "carries no parameter names (no 'param_names' in its groups) to match them by"
        )

    saved_state = saved["state"]
    by_name: dict[str, Any] = {}
    saved_order: list[str] = []
    for g, group in enumerate(saved_groups):
        names, params = group["param_names"], group["params"]
        if len(names) != len(params):
            raise ValueError(
                f"checkpoint group {g} has {len(params)} params but "
                f"{len(names)} param_names"
            )
        for name, pid in zip(names, params):
            if name in by_name:
                raise ValueError(f"checkpoint names parameter {name!r} twice")
            by_name[name] = pid
            saved_order.append(name)

    new_state: dict[Any, Any] = {}
    new_groups = []
    missing: list[str] = []
    live_seen: set[str] = set()
    next_id = 0
    for group, names in zip(live_groups, _live_names(optimizer, names_by_param)):
        packed = {k: v for k, v in group.items() if k != "params"}
        params = []
        for j, name in enumerate(names):
            if name is None:
                missing.append(f"<unnamed parameter {next_id}>")
            else:
                live_seen.add(name)
                pid = by_name.get(name)
                if pid is None:
                    missing.append(name)
                elif pid in saved_state:
                    new_state[next_id] = saved_state[pid]
            params.append(next_id)
            next_id += 1
        packed["params"] = params
        # torch installs the loaded group's names: keep the live ones (or none).
        if all(n is not None for n in names):
            packed["param_names"] = list(names)
        new_groups.append(packed)
    saved_ids = {pid for g in saved_groups for pid in g["params"]}
    for key, value in saved_state.items():
        if key not in saved_ids and not isinstance(key, int):
            new_state[key] = value
    unknown = [n for n in saved_order if n not in live_seen]

    out = {k: v for k, v in saved.items() if k not in ("state", "param_groups")}
    out["state"] = new_state
    out["param_groups"] = new_groups
    return out, NameReport(tuple(missing), tuple(unknown))
