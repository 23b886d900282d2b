"""Apply strategies: how per-name learning rates physically reach the optimizer.

The controller decides *what* each parameter's rate is; a strategy decides *how* that
rate gets to the kernels. `CoalescedGroups` keeps one param group per distinct set of
hyperparameters, so PyTorch's multi-tensor (foreach/fused) kernels still see a few
large groups however many distinct names there are. A later strategy may carry
per-tensor rates in its own kernels instead; nothing outside this module assumes
param groups are how a rate arrives.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Protocol, Sequence

import torch

# Group entries that are not hyperparameters.
_NON_HYPER = frozenset({"params", "param_names", "lr"})


class ApplyStrategy(Protocol):
    """The physical layer under the controller. Called with the controller's lock held."""

    def apply(self, new_lrs: Mapping[int, float]) -> None:
        """Make parameter i train at new_lrs[i] from the next step on (training thread)."""

    def group_of(self, index: int) -> int:
        """Physical group of a held parameter, -1 for one the optimizer does not hold."""

    def groups_of(self, indices: Sequence[int]) -> list[int]:
        """group_of of each of `indices` (one call, not one per name)."""

    @property
    def num_groups(self) -> int:
        """Number of physical groups."""

    def hyperparameters(self, index: int) -> Mapping[str, float]:
        """Numeric hyperparameters other than lr of a held parameter, flattened."""

    def max_lr(self, indices: Sequence[int]) -> float:
        """The largest rate the optimizer can apply to every one of `indices` (held)."""

    @property
    def safe_lr(self) -> float:
        """A rate every held parameter can take, whatever its dtype: a check in O(1)."""


def _finite_max(dtype: torch.dtype) -> float:
    """The largest finite value of `dtype` (inf for integer dtypes)."""
    if dtype.is_floating_point or dtype.is_complex:  # finfo of a complex dtype: its parts'
        return float(torch.finfo(dtype).max)
    return float("inf")


# At most the largest value of every floating dtype torch has (float4_e2m1: 6.0), so
# rates up to it (times an Adam factor) need no look at each parameter's dtype.
_SMALLEST_FLOAT_MAX = 6.0


def _freeze(value: Any) -> Hashable:
    """A hashable stand-in for a hyperparameter value, equal iff the values are."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), tuple(value.detach().cpu().flatten().tolist()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    try:
        hash(value)
    except TypeError:
        return ("repr", repr(value))
    return value


def _numeric(hypers: Mapping[str, Any]) -> dict[str, float]:
    """Flatten numeric hyperparameters for display ("betas" -> "betas.0", "betas.1")."""
    out: dict[str, float] = {}
    for key, value in hypers.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (bool, int, float)):
            out[key] = float(value)
        elif isinstance(value, (list, tuple)) and all(
            isinstance(v, (bool, int, float)) for v in value
        ):
            out.update({f"{key}.{j}": float(v) for j, v in enumerate(value)})
    return out


def lr_value(lr: Any) -> float:
    """A group's lr as a Python float (some optimizers accept a 0-dim tensor)."""
    return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)


class CoalescedGroups:
    """One param group per distinct (other hyperparameters, lr).

    A change that keeps the partition of parameters into groups only edits group
    dicts; a change that splits or merges groups rebuilds ``optimizer.param_groups``.
    Optimizer state is keyed by the parameter tensor, so rebuilding keeps momentum
    buffers and Adam moments.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: Sequence[torch.Tensor],
        names: Sequence[str],
        lrs: list[float | None],
    ) -> None:
        self._optimizer = optimizer
        self._params = params
        self._names = names
        self._lrs = lrs  # the controller's list: read here, written by the controller
        position = {id(p): i for i, p in enumerate(params)}
        self._template_of: list[int] = [-1] * len(params)
        self._templates: list[dict[str, Any]] = []
        self._lr_like: list[torch.Tensor | None] = []
        template_ids: dict[Hashable, int] = {}
        for group in optimizer.param_groups:
            hypers = {k: v for k, v in group.items() if k not in _NON_HYPER}
            lr_like = group["lr"] if isinstance(group["lr"], torch.Tensor) else None
            key = (_freeze(hypers), None if lr_like is None else (lr_like.dtype, lr_like.device))
            if key not in template_ids:
                template_ids[key] = len(self._templates)
                self._templates.append(hypers)
                self._lr_like.append(lr_like)
            for p in group["params"]:
                self._template_of[position[id(p)]] = template_ids[key]
        self._numeric = [_numeric(t) for t in self._templates]
        self._limits: dict[tuple[int, torch.dtype], float] = {}
        # Templates are fixed from here on, so this floor is too (checked on every change).
        self._safe_lr = min(
            (self._max_lr_of_template(t, _SMALLEST_FLOAT_MAX) for t in range(len(self._templates))),
            default=float("inf"),
        )
        self._group_of: list[int] = [-1] * len(params)
        self._sizes: list[int] = []  # members per group (the lists would cost ~36 B a name)
        self._keys: list[tuple[int, float]] = []
        self._by_key: dict[tuple[int, float], int] = {}
        if not self._adopt_if_coalesced(position):
            self._rebuild()

    # -- ApplyStrategy -------------------------------------------------------------
    def group_of(self, index: int) -> int:
        return self._group_of[index]

    def groups_of(self, indices: Sequence[int]) -> list[int]:
        group_of = self._group_of
        return [group_of[i] for i in indices]

    @property
    def num_groups(self) -> int:
        return len(self._sizes)

    def hyperparameters(self, index: int) -> Mapping[str, float]:
        return self._numeric[self._template_of[index]]

    @property
    def safe_lr(self) -> float:
        return self._safe_lr

    def max_lr(self, indices: Sequence[int]) -> float:
        template_of, params = self._template_of, self._params
        if len(indices) == len(params):  # all of them: their kinds, not each one
            kinds = {(template_of[i], p.dtype) for i, p in enumerate(params) if template_of[i] >= 0}
        else:
            kinds = {(template_of[i], params[i].dtype) for i in indices}
        return min((self._max_lr(*kind) for kind in kinds), default=float("inf"))

    def _max_lr(self, template: int, dtype: torch.dtype) -> float:
        """What a step can take: the kernels turn lr into a scalar of the parameter's
        dtype (and of a tensor lr's own), and Adam-like optimizers first divide it by
        1 - beta1 (the bias correction of step 1): past that, step() raises."""
        limit = self._limits.get((template, dtype))
        if limit is None:
            limit = self._limits[(template, dtype)] = self._max_lr_of_template(template, _finite_max(dtype))
        return limit

    def _max_lr_of_template(self, template: int, dtype_max: float) -> float:
        limit = dtype_max
        like = self._lr_like[template]
        if like is not None:
            limit = min(limit, _finite_max(like.dtype))
        beta1 = self._numeric[template].get("betas.0")
        if beta1 is not None and 0 <= beta1 < 1:
            limit *= 1 - beta1
        return limit

    def apply(self, new_lrs: Mapping[int, float]) -> None:
        edits = self._in_place_edits(new_lrs)
        if edits is None:
            self._rebuild()
            return
        groups = self._optimizer.param_groups
        try:
            for g, lr in edits.items():
                del self._by_key[self._keys[g]]
            for g, lr in edits.items():
                key = (self._keys[g][0], lr)
                self._keys[g] = key
                self._by_key[key] = g
                self._set_lr(groups[g], lr)
        except BaseException:
            # Half-edited tables would fail every later change: rebuild them whole
            # from the controller's rates, then let the controller roll back.
            self._rebuild()
            raise

    # -- internals -----------------------------------------------------------------
    def _key(self, i: int) -> tuple[int, float]:
        lr = self._lrs[i]
        assert lr is not None
        return (self._template_of[i], lr)

    def _in_place_edits(self, new_lrs: Mapping[int, float]) -> dict[int, float] | None:
        """Per group, its new lr when the change keeps the partition; None otherwise."""
        edits: dict[int, float] = {}
        touched: dict[int, int] = {}
        for i, lr in new_lrs.items():
            g = self._group_of[i]
            if edits.setdefault(g, lr) != lr:
                return None  # the group splits
            touched[g] = touched.get(g, 0) + 1
        new_keys: set[tuple[int, float]] = set()
        for g, lr in edits.items():
            if touched[g] != self._sizes[g]:
                return None  # part of the group moves
            key = (self._keys[g][0], lr)
            other = self._by_key.get(key)
            if key in new_keys or (other is not None and other not in edits):
                return None  # two groups merge
            new_keys.add(key)
        return edits

    def _set_lr(self, group: dict[str, Any], lr: float) -> None:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr

    def _adopt_if_coalesced(self, position: Mapping[int, int]) -> bool:
        """Keep the optimizer's own groups if they already are one per distinct key."""
        members: list[list[int]] = []
        keys: list[tuple[int, float]] = []
        for group in self._optimizer.param_groups:
            idx = [position[id(p)] for p in group["params"]]
            group_keys = {self._key(i) for i in idx}
            if len(group_keys) != 1:
                return False
            members.append(idx)
            keys.append(group_keys.pop())
        if len(set(keys)) != len(keys):
            return False
        for g, (group, idx) in enumerate(zip(self._optimizer.param_groups, members)):
            group["param_names"] = [self._names[i] for i in idx]
            if isinstance(group["lr"], torch.Tensor):
                # torch gives every group without its own lr the one defaults["lr"]
                # tensor: editing it in place would change the others too.
                group["lr"] = group["lr"].detach().clone()
            for i in idx:
                self._group_of[i] = g
        self._sizes, self._keys = list(map(len, members)), keys
        self._by_key = {k: g for g, k in enumerate(keys)}
        return True

    def _rebuild(self) -> None:
        """Partition the held parameters by key, groups ordered by first member."""
        by_key: dict[tuple[int, float], int] = {}
        members: list[list[int]] = []
        for i, lr in enumerate(self._lrs):
            if lr is None:
                continue
            key = (self._template_of[i], lr)
            g = by_key.get(key)
            if g is None:
                g = by_key[key] = len(members)
                members.append([])
            members[g].append(i)
            self._group_of[i] = g
        groups = []
        for (template, lr), idx in zip(by_key, members):
            group = dict(self._templates[template])
            like = self._lr_like[template]
            group["lr"] = lr if like is None else torch.tensor(lr, dtype=like.dtype, device=like.device)
            group["params"] = [self._params[i] for i in idx]
            group["param_names"] = [self._names[i] for i in idx]
            groups.append(group)
        # Assign in place: callers may hold a reference to the list.
        self._optimizer.param_groups[:] = groups
        self._sizes, self._keys, self._by_key = list(map(len, members)), list(by_key), by_key
