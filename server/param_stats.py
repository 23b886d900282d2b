"""Per-parameter statistics for WatchMetrics (attach(stats_every=K, stats=..., stats_groups=...)).

Every K steps (steps 0, K, 2K, ...), per parameter name or per selector group ("unit"):

- ``grad_norm``    ||g|| of the gradient that step S used
- ``param_norm``   ||w|| after step S
- ``update_ratio`` ||w_after - w_before|| / ||w_before|| of step S
- ``grad_sq_sum``  sum over every step so far of ||g||^2 (DoG's denominator)
- ``max_dist``     max over every step so far of ||w - w_initial|| (DoG's numerator)
- ``update_dot``   (w_S - w_{S-1}) . (w_{S-1} - w_{S-2}): the dot of successive updates
                   (the hypergradient's sign); NaN when the previous update is unknown
- ``descent_cos``  cos(-g_S, w_S - w_{S-1}): the cosine between the direction the gradient
                   of step S descends and the update step S-1 made (Baydin et al.'s
                   hypergradient, normalized: > 0 the last step was too short, < 0 it
                   overshot). Unlike update_dot it is not dominated by momentum (with
                   momentum 0.9 successive updates are ~0.9-aligned whatever the rate).
                   NaN when the previous update is unknown

A group's values are those of its names' tensors taken as one vector (its grad_norm
is the norm of all its gradients together, its max_dist the largest distance of the
whole group). Names the optimizer does not hold, or frozen ones, are left out; a name
without a gradient that step counts as a zero gradient.

Cost, only when asked: grad_sq_sum and max_dist are updated at EVERY step (a running
quantity sampled every K steps would be wrong); max_dist keeps a copy of the initial
weights, update_ratio a copy of the weights at each stats step, update_dot two.
Everything is batched per device with ``torch._foreach_*`` ops (norms, copies,
differences) and stays on the device: the values travel to the host only when read
(lrctl.server.telemetry converts them lazily), so no step waits for the device.
A dot product has no foreach op; it comes from norms: a.b = (|a+b|^2 - |a-b|^2) / 4.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

STATS = ("grad_norm", "param_norm", "update_ratio", "grad_sq_sum", "max_dist", "update_dot", "descent_cos")
DEFAULT_STATS = ("grad_norm", "param_norm", "update_ratio")
_F32 = torch.float32


def _sq_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared L2 norms of same-device tensors, stacked into one float32 vector."""
    return torch.stack(torch._foreach_norm(list(tensors), 2, dtype=_F32)) ** 2


class _Bucket:
    """The tracked parameters on one device, and where their values go in unit space."""

    def __init__(self, device: torch.device, params: list[torch.Tensor], src: torch.Tensor,
                 dst: torch.Tensor) -> None:
        self.device = device
        self.params = params
        self.src, self.dst = src, dst  # unit[dst[k]] += value[src[k]] (on the main device)
        self.zero = torch.zeros((), device=device)  # stands in for a missing gradient
        self.initial: list[torch.Tensor] | None = None
        self.before: list[torch.Tensor] | None = None  # weights before this step's update
        self.delta: list[torch.Tensor] | None = None  # w_before - w_after of the last update captured
        self.delta_step = -1
        self.prev_delta: list[torch.Tensor] | None = None
        self.prev_step = -1

    def grads(self) -> list[torch.Tensor]:
        zero = self.zero
        return [zero if p.grad is None else p.grad for p in self.params]


class StatsSnapshot:
    """One stats step's values, on the device until `resolve()` reads them."""

    def __init__(self, units: Sequence[str], values: dict[str, torch.Tensor]) -> None:
        self.units, self.values = units, values

    def on_device(self) -> bool:
        """True if the values are on a device other than the CPU (reading them waits for it)."""
        return any(t.device.type != "cpu" for t in self.values.values())

    def resolve(self) -> dict[str, dict[str, float]]:
        columns = {stat: tensor.tolist() for stat, tensor in self.values.items()}
        return {unit: {stat: column[u] for stat, column in columns.items()}
                for u, unit in enumerate(self.units)}


class ParamStats:
    """Computes the statistics of `params` (named `names`) for the step hooks.

    `groups`: label -> positions (into names) of its members; None: one unit per name.
    Call `before(step)` in the optimizer's step pre-hook and `after(step)` in its post
    hook; `after` returns (StatsSnapshot, estimated bytes) on a stats step, else None.
    """

    def __init__(self, names: Sequence[str], params: Sequence[torch.Tensor], every: int,
                 stats: Sequence[str] = DEFAULT_STATS,
                 groups: Mapping[str, Sequence[int]] | None = None) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"stats_every {every!r} must be a positive int")
        stats = tuple(dict.fromkeys(stats))
        unknown = [s for s in stats if s not in STATS]
        if unknown or not stats:
            raise ValueError(f"unknown statistic {unknown[0] if unknown else '(none given)'!r}; "
                             f"choose from {', '.join(STATS)}")
        if not params:
            raise ValueError("no parameter to compute statistics of (none is held by the optimizer "
                             "and requires grad)")
        self.every, self.stats = every, stats
        if groups is None:
            self.units: tuple[str, ...] = tuple(names)
            pairs = [(i, i) for i in range(len(names))]
        else:
            self.units = tuple(groups)
            pairs = [(i, u) for u, members in enumerate(groups.values()) for i in members]
        self.main = params[0].device
        by_device: dict[torch.device, list[int]] = {}
        for i, p in enumerate(params):
            by_device.setdefault(p.device, []).append(i)
        self._buckets = []
        for device, positions in by_device.items():
            local = {i: k for k, i in enumerate(positions)}
            mine = [(local[i], u) for i, u in pairs if i in local]
            src = torch.tensor([k for k, _ in mine], dtype=torch.long, device=self.main)
            dst = torch.tensor([u for _, u in mine], dtype=torch.long, device=self.main)
            self._buckets.append(_Bucket(device, [params[i] for i in positions], src, dst))
        n_units = len(self.units)
        self._want = set(stats)
        self._sq_sum = torch.zeros(n_units, dtype=_F32, device=self.main) if "grad_sq_sum" in self._want else None
        self._max_dist = torch.zeros(n_units, dtype=_F32, device=self.main) if "max_dist" in self._want else None
        if self._max_dist is not None:
            for b in self._buckets:
                b.initial = list(torch._foreach_mul(b.params, 1.0))  # a copy, once, at attach
        self._pending: dict[str, torch.Tensor] = {}
        self._bytes = n_units * (100 + 48 * len(stats)) + sum(len(u) for u in self.units)

    def _units(self, per_bucket: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-tensor values of each bucket summed into unit space (main device)."""
        out = torch.zeros(len(self.units), dtype=_F32, device=self.main)
        for b, values in zip(self._buckets, per_bucket):
            out.index_add_(0, b.dst, values.to(self.main, non_blocking=True)[b.src])
        return out

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def _captures(self, step: int) -> bool:
        """Does this step's update need capturing (weights before, then the difference)?"""
        want = self._want
        if "update_dot" in want and (step % self.every == 0 or (step + 1) % self.every == 0):
            return True
        if "descent_cos" in want and (step + 1) % self.every == 0:
            return True
        return "update_ratio" in want and step % self.every == 0

    @torch.no_grad()
    def before(self, step: int) -> None:
        want, due = self._want, self.due(step)
        self._pending = {}
        if (due and "grad_norm" in want) or self._sq_sum is not None:
            g2 = self._units([_sq_norms(b.grads()) for b in self._buckets])
            if self._sq_sum is not None:
                self._sq_sum += g2
            if due and "grad_norm" in want:
                self._pending["grad_norm"] = g2.sqrt()
        if due and "descent_cos" in want:
            self._pending["descent_cos"] = self._descent_cos(step)
        if self._captures(step):
            for b in self._buckets:
                if b.before is None:
                    b.before = list(torch._foreach_mul(b.params, 1.0))  # a copy, at first use only
                else:
                    torch._foreach_copy_(b.before, b.params)
            if due and "update_ratio" in want:
                self._pending["_w2_before"] = self._units([_sq_norms(b.before) for b in self._buckets])

    @torch.no_grad()
    def after(self, step: int) -> tuple[StatsSnapshot, int] | None:
        want, due = self._want, self.due(step)
        if self._max_dist is not None:
            d2 = self._units([_sq_norms(torch._foreach_sub(b.params, b.initial))
                              for b in self._buckets])
            torch.maximum(self._max_dist, d2.sqrt(), out=self._max_dist)
        if self._captures(step):
            for b in self._buckets:
                # before := before - after = -(this update); keep the last two.
                torch._foreach_sub_(b.before, b.params)
                if "update_dot" in want or "descent_cos" in want:
                    if b.delta is None:
                        b.delta = list(torch._foreach_mul(b.before, 1.0))
                    else:
                        b.prev_delta, b.delta = b.delta, b.prev_delta or list(torch._foreach_mul(b.before, 1.0))
                        torch._foreach_copy_(b.delta, b.before)
                    b.prev_step, b.delta_step = b.delta_step, step
        if not due:
            return None
        values = self._pending
        self._pending = {}
        if "param_norm" in want:
            values["param_norm"] = self._units([_sq_norms(b.params)
                                                for b in self._buckets]).sqrt()
        if "update_ratio" in want:
            d2 = self._units([_sq_norms(b.before) for b in self._buckets])
            values["update_ratio"] = d2.sqrt() / values.pop("_w2_before").sqrt()
        if "update_dot" in want:
            values["update_dot"] = self._update_dot(step)
        if self._sq_sum is not None:
            values["grad_sq_sum"] = self._sq_sum.clone()
        if self._max_dist is not None:
            values["max_dist"] = self._max_dist.clone()
        values.pop("_w2_before", None)
        ordered = {s: values[s] for s in self.stats}
        return StatsSnapshot(self.units, ordered), self._bytes

    def _descent_cos(self, step: int) -> torch.Tensor:
        """cos(g_S, delta_{S-1}) per unit, delta = w_before - w_after = -(update); read in
        `before(S)`, while the gradients are step S's."""
        b0 = self._buckets[0]
        if b0.delta is None or b0.delta_step != step - 1:
            return torch.full((len(self.units),), math.nan, dtype=_F32, device=self.main)
        plus, minus, g2, d2 = [], [], [], []
        for b in self._buckets:
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in b.params]
            total = torch._foreach_add(grads, b.delta)
            plus.append(_sq_norms(total))
            torch._foreach_sub_(total, b.delta)
            torch._foreach_sub_(total, b.delta)
            minus.append(_sq_norms(total))
            g2.append(_sq_norms(grads))
            d2.append(_sq_norms(b.delta))
        dot = (self._units(plus) - self._units(minus)) / 4
        return dot / (self._units(g2) * self._units(d2)).sqrt()

    def _update_dot(self, step: int) -> torch.Tensor:
        b0 = self._buckets[0]
        if b0.prev_delta is None or b0.prev_step != step - 1 or b0.delta_step != step:
            return torch.full((len(self.units),), math.nan, dtype=_F32, device=self.main)
        plus, minus = [], []
        for b in self._buckets:
            # Both deltas are negated updates: their dot is the updates' dot.
            total = torch._foreach_add(b.delta, b.prev_delta)
            plus.append(_sq_norms(total))
            torch._foreach_sub_(total, b.prev_delta)
            torch._foreach_sub_(total, b.prev_delta)
            minus.append(_sq_norms(total))
        return (self._units(plus) - self._units(minus)) / 4
