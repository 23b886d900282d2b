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
    """The physical layer under the controller. Called with the controller's lock held.

    The controller hands it rates, never its own tables: every held parameter belongs
    to one *rate class* (lrctl.server.rates), and the strategy makes each parameter
    train at its class's rate.
    """

    def move(self, moved: Mapping[int, int], rates: Mapping[int, float]) -> None:
        """Parameters `moved` (position -> class) now belong to those classes, whose
        rates are `rates`; from the next step on (training thread)."""

    def set_rates(self, rates: Mapping[int, float]) -> None:
        """New rates of some classes; no parameter changed class (a schedule tick)."""

    def set_hyperparameters(self, values: Mapping[int, Mapping[str, Any]]) -> None:
        """Per class, other hyperparameters an adopted scheduler drives (momentum, betas)."""

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

    def limit_of(self, index: int) -> float:
        """max_lr((index,)), cheaply: called per name when a scheduled class gains one."""

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
    """One param group per distinct (other hyperparameters, rate class).

    At attach the user's groups stay as they are (code that indexes groups by
    position keeps working) until a change needs a regroup. A change that keeps the
    partition of parameters into groups only edits group dicts; one that splits or
    merges groups rebuilds ``optimizer.param_groups``, ordered by first member.
    Optimizer state is keyed by the parameter tensor, so rebuilding keeps momentum
    buffers and Adam moments.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: Sequence[torch.Tensor],
        names: Sequence[str],
        classes: Sequence[int],
        rates: Mapping[int, float],
    ) -> None:
        self._optimizer = optimizer
        self._params = params
        self._names = names
        self._class_of = list(classes)  # copies: the controller's tables are its own
        self._rate: dict[int, float] = dict(rates)  # per class, as installed
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
        self._keys: list[tuple[int, int]] = []  # (template, class) per group
        self._by_key: dict[tuple[int, int], list[int]] = {}
        self._by_class: dict[int, list[int]] = {}
        self._tensor_lr: list[bool] = []  # per group: its lr is a tensor (filled in place)
        self._adopt(position)

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

    def limit_of(self, index: int) -> float:
        return self._max_lr(self._template_of[index], self._params[index].dtype)

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

    def move(self, moved: Mapping[int, int], rates: Mapping[int, float]) -> None:
        class_of = self._class_of
        old = {i: class_of[i] for i in moved}
        old_rates = {c: self._rate[c] for c in rates if c in self._rate}
        for i, c in moved.items():
            class_of[i] = c
        self._rate.update(rates)
        try:
            relabel = self._relabelling(moved)
            if relabel is None:
                self._rebuild()
                return
            for g, c in relabel.items():
                self._forget(g)
            for g, c in relabel.items():
                self._remember(g, (self._keys[g][0], c))
            self.set_rates({c: rates[c] for c in set(relabel.values())})
        except BaseException:
            # Half-edited tables would fail every later change: restore the classes,
            # rebuild whole, and let the controller roll back.
            for i, c in old.items():
                class_of[i] = c
            self._rate.update(old_rates)
            self._rebuild()
            raise

    def set_rates(self, rates: Mapping[int, float]) -> None:
        # Runs in the step hook on every scheduled step: plain dict writes, a tensor lr
        # (fill_) only where the group has one.
        groups, by_class, tensor_lr = self._optimizer.param_groups, self._by_class, self._tensor_lr
        self._rate.update(rates)
        for c, lr in rates.items():
            for g in by_class.get(c, ()):
                if tensor_lr[g]:
                    groups[g]["lr"].fill_(lr)
                else:
                    groups[g]["lr"] = lr

    def set_hyperparameters(self, values: Mapping[int, Mapping[str, Any]]) -> None:
        groups, by_class = self._optimizer.param_groups, self._by_class
        for c, hypers in values.items():
            for g in by_class.get(c, ()):
                groups[g].update(hypers)

    # -- internals -----------------------------------------------------------------
    def _relabelling(self, moved: Mapping[int, int]) -> dict[int, int] | None:
        """Per touched group, its new class, when the move keeps the partition; else None."""
        new_class: dict[int, int] = {}
        touched: dict[int, int] = {}
        for i, c in moved.items():
            g = self._group_of[i]
            if new_class.setdefault(g, c) != c:
                return None  # the group splits
            touched[g] = touched.get(g, 0) + 1
        new_keys: set[tuple[int, int]] = set()
        for g, c in new_class.items():
            if touched[g] != self._sizes[g]:
                return None  # part of the group moves
            key = (self._keys[g][0], c)
            if key in new_keys or any(h not in new_class for h in self._by_key.get(key, ())):
                return None  # two groups merge
            new_keys.add(key)
        return new_class

    def _forget(self, g: int) -> None:
        key = self._keys[g]
        self._by_key[key].remove(g)
        if not self._by_key[key]:
            del self._by_key[key]
        self._by_class[key[1]].remove(g)
        if not self._by_class[key[1]]:
            del self._by_class[key[1]]

    def _remember(self, g: int, key: tuple[int, int]) -> None:
        self._keys[g] = key
        self._tensor_lr[g] = isinstance(self._optimizer.param_groups[g]["lr"], torch.Tensor)
        self._by_key.setdefault(key, []).append(g)
        self._by_class.setdefault(key[1], []).append(g)

    def _adopt(self, position: Mapping[int, int]) -> None:
        """Keep the optimizer's own groups: each holds one rate class already."""
        members: list[list[int]] = []
        keys: list[tuple[int, int]] = []
        for group in self._optimizer.param_groups:
            idx = [position[id(p)] for p in group["params"]]
            group_keys = {(self._template_of[i], self._class_of[i]) for i in idx}
            if len(group_keys) > 1:
                self._rebuild()  # not one class a group: make it so
                return
            members.append(idx)
            keys.append(group_keys.pop() if group_keys else (-1, -1))
        for g, (group, idx) in enumerate(zip(self._optimizer.param_groups, members)):
            group["param_names"] = [self._names[i] for i in idx]
            if isinstance(group["lr"], torch.Tensor):
                # torch gives every group without its own lr the one defaults["lr"]
                # tensor: editing it in place would change the others too.
                group["lr"] = group["lr"].detach().clone()
            for i in idx:
                self._group_of[i] = g
        self._sizes = list(map(len, members))
        self._keys, self._by_key, self._by_class = [], {}, {}
        self._tensor_lr = [False] * len(keys)
        for g, key in enumerate(keys):
            self._keys.append(key)
            self._remember(g, key)

    def _rebuild(self) -> None:
        """Partition the held parameters by (template, class), groups ordered by first member."""
        by_key: dict[tuple[int, int], int] = {}
        members: list[list[int]] = []
        for i, c in enumerate(self._class_of):
            if c < 0:
                continue
            key = (self._template_of[i], c)
            g = by_key.get(key)
            if g is None:
                g = by_key[key] = len(members)
                members.append([])
            members[g].append(i)
            self._group_of[i] = g
        groups = []
        for (template, c), idx in zip(by_key, members):
            group = dict(self._templates[template])
            lr = self._rate[c]
            like = self._lr_like[template]
            group["lr"] = lr if like is None else torch.tensor(lr, dtype=like.dtype, device=like.device)
            group["params"] = [self._params[i] for i in idx]
            group["param_names"] = [self._names[i] for i in idx]
            groups.append(group)
        # Assign in place: callers may hold a reference to the list.
        self._optimizer.param_groups[:] = groups
        self._sizes = list(map(len, members))
        self._keys, self._by_key, self._by_class = [], {}, {}
        self._tensor_lr = [False] * len(by_key)
        for g, key in enumerate(by_key):
            self._keys.append(key)
            self._remember(g, key)
