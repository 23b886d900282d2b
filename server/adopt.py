"""Adopt a user's `torch.optim.lr_scheduler` object as an lrctl schedule.

lrctl regroups `optimizer.param_groups`, and torch schedulers index groups by position,
so a scheduler must never write into the real groups once lrctl owns them. Adoption
re-points the scheduler (and, for SequentialLR/ChainedScheduler, every child) at a
*shadow*: a stand-in whose `param_groups` are copies of the optimizer's groups at
adoption time, with empty "params". The user's code keeps calling `scheduler.step()`;
the scheduler steps the shadow; lrctl reads each shadow group's lr (and the momentum or
betas a cycling scheduler drives) in its step pre-hook and installs them for the names
of that group. Chainable schedulers compute recursively from `group["lr"]`, and only the
scheduler writes the shadow, so the shadow holds bit for bit what torch would have put
into the real group.

``ReduceLROnPlateau`` is adopted the same way (its ``step(metric)`` writes the shadow),
but it is not a function of the step: its base rate per group is the group's rate at
adoption, it is fed a metric (by its caller, as the Hugging Face and Lightning trainers
do, or by lrctl from ``LRControl.report`` with ``plateau_metric``), and each reduction
is a change lrctl records in its history (who: the schedule), so that any step's rates
can still be computed from the history. Its counters (best, num_bad_epochs,
cooldown_counter, last_epoch) ride in `state_dict()`.

Imports torch but never grpc, so it loads and tests with grpc blocked.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from lrctl.server.wrappers import unwrap_optimizer

__all__ = ["AdoptedScheduler", "GroupSchedule", "PlateauMove", "unwrap_optimizer"]

# Never restored from or written to the shadow: the shadow holds no parameters, and
# names are the controller's business, not the scheduler's.
_NOT_STATE = ("params", "param_names")

_STATE_VERSION = 1


class _ShadowOptimizer:
    """What an adopted scheduler steps instead of the real optimizer.

    Not an Optimizer subclass: nothing may treat it as one except the scheduler, which
    only reads and writes `param_groups` (and `defaults` when constructed, which cannot
    happen here). `step` carries torch's `_wrapped_by_lr_sched` mark, and lrctl sets
    `_opt_called` on every real step, so torch's order warnings keep their meaning.
    """

    def __init__(self, real: Optimizer, opt_called: bool) -> None:
        # One deepcopy for groups and defaults together keeps their aliasing: groups that
        # inherited one default tensor lr share it, and torch's in-place fill_ then behaves
        # on the shadow exactly as it would on the real groups.
        groups = [{k: v for k, v in g.items() if k != "params"} for g in real.param_groups]
        groups, defaults = copy.deepcopy((groups, dict(real.defaults)))
        self.param_groups: list[dict[str, Any]] = [{"params": [], **g} for g in groups]
        self.defaults: dict[str, Any] = defaults
        self._opt_called = opt_called

    def step(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            "this is lrctl's shadow of an adopted scheduler's optimizer; it holds no "
            "parameters. Step the real optimizer (it is AdoptedScheduler.optimizer)"
        )

    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"<lrctl shadow optimizer, {len(self.param_groups)} groups>"


def _tree(scheduler: object) -> Iterator[Any]:
    """The scheduler and, depth first, the children of SequentialLR/ChainedScheduler."""
    yield scheduler
    for child in getattr(scheduler, "_schedulers", ()) or ():
        yield from _tree(child)


def _label(scheduler: object) -> str:
    cls = type(scheduler)
    if cls.__module__.startswith("torch."):
        return f"torch {cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _base_node(scheduler: object) -> Any:
    """The scheduler that holds the base rates; SequentialLR and ChainedScheduler have
    none, so the first child that has them speaks for the chain (they share one optimizer)."""
    for node in _tree(scheduler):
        if getattr(node, "base_lrs", None) is not None:
            return node
    raise ValueError(f"{_label(scheduler)} has no base_lrs; adopt a torch LRScheduler")


class _PlateauBases:
    """Stands in for `base_lrs` of a ReduceLROnPlateau, which has none: its rates at adoption."""

    def __init__(self, shadow: "_ShadowOptimizer") -> None:
        self.base_lrs = [_to_float(g["lr"]) for g in shadow.param_groups]


@dataclass(frozen=True)
class PlateauMove:
    """A rate change an adopted ReduceLROnPlateau made to one group since it was last seen."""

    group: "GroupSchedule"
    old_lr: float
    new_lr: float


def _last_epoch(scheduler: object) -> Any:
    for node in _tree(scheduler):  # ChainedScheduler keeps no count of its own
        if hasattr(node, "last_epoch"):
            return node.last_epoch
    return None


def _driven_keys(scheduler: object, group: dict[str, Any]) -> tuple[str, ...]:
    """Non-lr group keys the scheduler writes on every step.

    OneCycleLR and CyclicLR with `cycle_momentum` write beta1 ("betas") or "momentum";
    the test is on the attribute, so subclasses count too. Other torch schedulers touch
    only "lr". A custom scheduler that writes other keys is not detected.
    """
    keys: set[str] = set()
    for node in _tree(scheduler):
        if getattr(node, "cycle_momentum", False):
            keys.add("betas" if getattr(node, "use_beta1", "betas" in group) else "momentum")
    return tuple(sorted(keys))


def _to_float(value: Any) -> float:
    return value.item() if isinstance(value, torch.Tensor) else float(value)


def _detached(value: Any) -> Any:
    """A copy that shares no storage with the shadow (tensors cloned, tuples rebuilt)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    return copy.deepcopy(value)


class GroupSchedule:
    """One shadow group of an adopted scheduler, as an lrctl schedule.

    Duck-typed like lrctl's built-in schedules. The scheduler keeps its own step count,
    so `rate` and `factor` ignore their `step` argument and report the shadow's current
    value: read them after the scheduler has stepped for the coming optimizer step.
    """

    kind = "adopted"

    def __init__(self, owner: AdoptedScheduler, index: int, driven_keys: tuple[str, ...]) -> None:
        self._owner = owner
        self.index = index
        self.driven_keys = driven_keys

    @property
    def _group(self) -> dict[str, Any]:
        return self._owner._shadow.param_groups[self.index]

    @property
    def is_constant(self) -> bool:
        return False

    @property
    def base_lr(self) -> float:
        """The scheduler's own base rate for this group (OneCycleLR: max_lr / div_factor)."""
        # Read through the node each time: the scheduler's load_state_dict replaces the list.
        value = self._owner.base_node.base_lrs[self.index]
        return value if type(value) is float else _to_float(value)

    def current_lr(self) -> float:
        """The lr the scheduler has put into this shadow group."""
        value = self._owner._shadow.param_groups[self.index]["lr"]
        return value if type(value) is float else _to_float(value)

    def rate(self, base: float, step: int) -> float:
        """The rate for a name whose base is `base`.

        At the scheduler's own base this is exactly the lr torch would have installed;
        for another base (the name was re-based remotely) the scheduler's factor scales
        it. When the scheduler's base is 0 its factor is undefined: a zero base follows
        the scheduler, any other base stays unscheduled.
        """
        return self.rate_for(base, self.current_lr())

    def rate_for(self, base: float, current: float) -> float:
        """`rate(base, ...)` had the scheduler put `current` into this group."""
        base_lr = self.base_lr
        if base == base_lr:
            return current
        if base_lr == 0:
            return current if base == 0 else base
        return base * (current / base_lr)

    def factor(self, step: int) -> float:
        """current lr / base lr (1.0 when the base is 0)."""
        base_lr = self.base_lr
        return 1.0 if base_lr == 0 else self.current_lr() / base_lr

    def move_reason(self) -> str:
        """Why an adopted ReduceLROnPlateau moved the rate: the history record's reason."""
        plateau = self._owner.scheduler
        metric = self._owner.metric or "its metric"
        return (f"ReduceLROnPlateau: {metric} did not improve on best {getattr(plateau, 'best', '?')!r} "
                f"for more than {getattr(plateau, 'patience', '?')} evaluations; rates "
                f"x{getattr(plateau, 'factor', '?')} (evaluation {_last_epoch(plateau)})")

    def driven(self) -> dict[str, Any]:
        """Current values of the non-lr hyperparameters the scheduler drives ({} for most)."""
        group = self._group
        return {key: _detached(group[key]) for key in self.driven_keys}

    @property
    def scheduler_name(self) -> str:
        """The adopted scheduler's class name ("LambdaLR")."""
        return type(self._owner.scheduler).__name__

    def describe(self) -> str:
        owner = self._owner
        return (
            f"adopted {_label(owner.scheduler)}, group {self.index} "
            f"(last_epoch {_last_epoch(owner.scheduler)})"
        )

    def __repr__(self) -> str:
        return f"<GroupSchedule {self.describe()}>"


class AdoptedScheduler:
    """A user's torch LR scheduler, re-pointed at a shadow of the optimizer's groups.

    `scheduler` is the user's object, unchanged in identity: their loop (or HF Trainer,
    Lightning) keeps calling `scheduler.step()`. `groups` holds one GroupSchedule per
    `optimizer.param_groups` entry at adoption, in order. Call `mark_stepped()` on
    every optimizer step (lrctl's step pre-hook does) and `release()` to hand the
    scheduler back to the real optimizer.
    """

    def __init__(self, scheduler: object, optimizer: object) -> None:
        real = unwrap_optimizer(optimizer)
        nodes = list(_tree(scheduler))
        for node in nodes:
            _check_adoptable(node, scheduler)
        for node in nodes:
            if isinstance(getattr(node, "optimizer", None), _ShadowOptimizer):
                raise ValueError(
                    f"{_label(scheduler)} is already adopted by lrctl; release() it first"
                )
            if unwrap_optimizer(node.optimizer) is not real:
                raise ValueError(
                    f"{_label(scheduler)} steps a different optimizer "
                    f"({type(node.optimizer).__name__} at {id(node.optimizer):#x}) than the one "
                    f"lrctl attaches to ({type(real).__name__} at {id(real):#x}); adopt the "
                    "scheduler built on this optimizer"
                )
        n_groups = len(real.param_groups)
        self.plateau = isinstance(scheduler, ReduceLROnPlateau)
        if self.plateau and len(scheduler.min_lrs) != n_groups:
            raise ValueError(
                f"ReduceLROnPlateau was built for {len(scheduler.min_lrs)} param groups but the "
                f"optimizer has {n_groups}; build the scheduler after the last add_param_group"
            )
        base_node = None if self.plateau else _base_node(scheduler)
        if base_node is not None and len(base_node.base_lrs) != n_groups:
            raise ValueError(
                f"{_label(scheduler)} was built for {len(base_node.base_lrs)} param groups but the "
                f"optimizer has {n_groups}; build the scheduler after the last add_param_group"
            )

        self.scheduler = scheduler
        self.optimizer: Optimizer = real
        # torch's step wrapper marks the optimizer the scheduler was built on; carry the
        # mark over so an adoption between optimizer.step() and scheduler.step() is silent.
        opt_called = any(getattr(node.optimizer, "_opt_called", False) for node in nodes)
        self._shadow = _ShadowOptimizer(real, opt_called)
        # holds base_lrs (SequentialLR: its first child; ReduceLROnPlateau: the rates now)
        self.base_node = base_node if base_node is not None else _PlateauBases(self._shadow)
        # A plateau's rates as lrctl last installed them: what its next move is measured from.
        self._seen: list[float] = list(self.base_node.base_lrs) if self.plateau else []
        self.metric: str | None = None  # the reported metric that feeds a plateau (attach sets it)
        self._originals = [(node, node.optimizer) for node in nodes]
        for node in nodes:
            node.optimizer = self._shadow
        keys = _driven_keys(scheduler, real.param_groups[0]) if n_groups else ()
        self.groups: list[GroupSchedule] = [GroupSchedule(self, i, keys) for i in range(n_groups)]

    def feed(self, value: Any) -> None:
        """Step an adopted ReduceLROnPlateau with one value of its metric (a float or a
        0-dim tensor, read now: this syncs a device tensor). Its moves reach the names at
        the next optimizer step."""
        self.scheduler.step(value)  # type: ignore[attr-defined]

    def plateau_moves(self) -> list[PlateauMove]:
        """The groups whose rate the plateau moved since the last call (or load), with
        the old and new rate; [] for other schedulers. The step hook calls it."""
        if not self.plateau:
            return []
        moves = []
        for group, old in zip(self.groups, self._seen):
            new = group.current_lr()
            if new != old and not (math.isnan(new) and math.isnan(old)):
                moves.append(PlateauMove(group, old, new))
                self._seen[group.index] = new
        return moves

    def mark_stepped(self) -> None:
        """Record an optimizer step, as torch's own step wrapper would on the real one."""
        self._shadow._opt_called = True

    def release(self) -> None:
        """Point the scheduler (and its children) back at the optimizer they had.

        Nothing is copied into the real groups: the next `scheduler.step()` writes them
        again, from the shadow's lr for chainable schedulers. Calling it twice is harmless.
        """
        for node, original in self._originals:
            if node.optimizer is self._shadow:
                node.optimizer = original

    def state_dict(self) -> dict[str, Any]:
        """The shadow groups' values, copied.

        Every key but "params" and "param_names" is kept, not only lr and the driven
        keys: OneCycleLR and CyclicLR read their anchors (initial_lr, max_lr, min_lr,
        max_momentum...) from the groups on every step, so restoring exactly needs them.
        Save it beside `scheduler.state_dict()`; the scheduler's own state holds its
        counters, this holds what it last wrote.
        """
        groups = [
            {k: _detached(v) for k, v in g.items() if k not in _NOT_STATE}
            for g in self._shadow.param_groups
        ]
        state = {"version": _STATE_VERSION, "scheduler": _label(self.scheduler), "groups": groups}
        if self.plateau:
            # lrctl may be the one feeding it (plateau_metric): its counters must not depend
            # on the user saving scheduler.state_dict() too. Plain numbers and lists.
            state["plateau"] = copy.deepcopy(
                {k: v for k, v in self.scheduler.state_dict().items() if k != "optimizer"})
            # A move made after the last step (the evaluation right before a checkpoint)
            # is recorded by the resumed run, at the step it takes effect.
            state["plateau_seen"] = list(self._seen)
        return state

    def load_groups(self, groups: Sequence[Mapping[str, Any]]) -> None:
        """Take the values a plain torch checkpoint put into the optimizer's groups (same
        order and count as at adoption) into the shadow, as the scheduler would have
        continued from them."""
        self.load_state_dict({"groups": [
            {k: v for k, v in g.items() if k not in _NOT_STATE} for g in groups
        ]})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the shadow groups from `state_dict()`; tensor values stay tensors."""
        groups = state.get("groups") if isinstance(state, dict) else None
        if not isinstance(groups, list):
            raise ValueError(
                "not an AdoptedScheduler state: expected a dict with a 'groups' list, "
                f"got {type(state).__name__}"
            )
        mine = self._shadow.param_groups
        if len(groups) != len(mine):
            raise ValueError(
                f"the saved adopted {state.get('scheduler', 'scheduler')} has {len(groups)} "
                f"param groups but {_label(self.scheduler)} was adopted with {len(mine)}; "
                "build the optimizer with the same groups as when it was saved"
            )
        plateau = state.get("plateau")
        if plateau is not None and not self.plateau:
            raise ValueError(
                f"the saved state is a ReduceLROnPlateau's but {_label(self.scheduler)} was adopted")
        if plateau is not None and not isinstance(plateau, dict):
            raise ValueError(f"the saved plateau state is a {type(plateau).__name__}, not a dict")
        for group, saved in zip(mine, groups):
            for key, value in saved.items():
                if key in _NOT_STATE:
                    continue
                old = group.get(key)
                if isinstance(old, torch.Tensor) and old.numel() == 1 and not isinstance(value, (tuple, list)):
                    # Fill in place as torch does, keeping any aliasing between groups.
                    old.fill_(_to_float(value))
                else:
                    group[key] = _detached(value)
        if plateau is not None:
            self.scheduler.load_state_dict(copy.deepcopy(plateau))  # type: ignore[attr-defined]
        if self.plateau:
            seen = state.get("plateau_seen")
            if isinstance(seen, list) and len(seen) == len(self.groups):
                self._seen = [float(v) for v in seen]
            else:  # a restored rate is no move of this run's plateau
                self._seen = [g.current_lr() for g in self.groups]


def _check_adoptable(node: object, top: object) -> None:
    where = "" if node is top else f" (inside {_label(top)})"
    if isinstance(node, ReduceLROnPlateau):
        if node is top:
            return
        raise ValueError(
            f"ReduceLROnPlateau{where} cannot be adopted inside another scheduler (torch "
            "cannot chain it either); adopt it on its own"
        )
    if not isinstance(node, LRScheduler):
        hint = ""
        if hasattr(node, "scheduler") and isinstance(getattr(node, "scheduler"), LRScheduler):
            hint = " (it wraps one: pass its .scheduler, e.g. Accelerate's AcceleratedScheduler)"
        raise TypeError(
            f"{type(node).__name__}{where} is not a torch.optim.lr_scheduler.LRScheduler"
            f"{hint}; lrctl adopts only torch LR schedulers, use an lrctl schedule instead"
        )

