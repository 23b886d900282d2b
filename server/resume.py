"""Exact resume: lrctl's state rides inside the optimizer's own checkpoint.

Every trainer already saves ``optimizer.state_dict()`` and loads it back, so lrctl
hooks into exactly that (torch's state-dict hooks; lrctl.server.checkpoint has the
dict surgery):

- saving: the dict is put back into the user's original grouping (it loads into a
  freshly built optimizer with plain torch, lrctl attached or not), and lrctl's own
  state (bases, schedules, pins, step, version, history tail, waiting changes, an
  adopted scheduler's progress) goes in as ``param_groups[0]["lrctl"]``: torch keeps
  unknown group keys when it loads, so the state survives even a load done before
  attach (Hugging Face and Lightning load before their callbacks run).
- loading while attached: the checkpoint is remapped by parameter name into the live
  grouping (from any grouping, with a report of names gained or lost), then lrctl's
  state is restored under the resume policy.
- attaching to an optimizer that was loaded first: attach finds the state in the group
  dicts, takes it out, and restores it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Optional

import torch

from lrctl.common.errors import InvalidArgumentError
from lrctl.server.adopt import AdoptedScheduler
from lrctl.server.checkpoint import Layout, NameReport, remap_by_name, to_layout
from lrctl.server.controller import Controller
from lrctl.server.controller_state import RESUME_POLICIES
from lrctl.server.replay import Replayer
from lrctl.server.state import FORMAT
from lrctl.server.strategy import lr_value

log = logging.getLogger("lrctl.resume")

STATE_KEY = "lrctl"


def take_state(groups: Any) -> Optional[dict[str, Any]]:
    """Remove lrctl's state from group dicts (a live optimizer's or a saved dict's)."""
    found = None
    for group in groups:
        state = group.pop(STATE_KEY, None)
        if found is None and state is not None:
            found = state
    return found


class Resume:
    """Wires lrctl's state into one optimizer's state_dict()/load_state_dict()."""

    def __init__(
        self,
        controller: Controller,
        optimizer: torch.optim.Optimizer,
        adopted: Optional[AdoptedScheduler],
        policy: str,
    ) -> None:
        if policy not in RESUME_POLICIES:
            raise ValueError(f"resume {policy!r} is not one of {', '.join(map(repr, RESUME_POLICIES))}")
        self._controller = controller
        self._optimizer = optimizer
        self._adopted = adopted
        self.policy = policy
        names = controller.names
        self._names_by_param = {id(p): names[i] for i, p in enumerate(controller.parameters)}
        # The user's grouping as attach found it: what checkpoints are saved in.
        self._layout = Layout.of(optimizer, self._names_by_param)
        self._loaded: Optional[dict[str, Any]] = None
        self.loaded_before_attach = False  # set by attach when it found lrctl's state in the groups
        self.report: list[str] = []  # what the last resume could not match
        # attach(replay=...)'s: told of a load, to go on replaying from the loaded step.
        self.replayer: Optional[Replayer] = None
        self._handles = [
            optimizer.register_state_dict_post_hook(self._after_save),
            optimizer.register_load_state_dict_pre_hook(self._before_load),
            optimizer.register_load_state_dict_post_hook(self._after_load),
        ]

    def remove(self, keep_saving: bool = False) -> None:
        """Unhook (lrctl detaching). With `keep_saving`, state dicts are still saved in
        the user's grouping (lrctl's regrouping stays in the optimizer after detach)."""
        for handle in self._handles[1:] if keep_saving else self._handles:
            handle.remove()
        self._handles = self._handles[:1] if keep_saving else []

    def state_dict(self) -> dict[str, Any]:
        """lrctl's state, plain data keyed by parameter name."""
        return {
            "controller": self._controller.export_state(),
            "scheduler": None if self._adopted is None else self._adopted.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any], policy: Optional[str] = None) -> list[str]:
        """Restore a state_dict() of an earlier run; returns what did not match (also logged)."""
        policy = policy or self.policy
        if not isinstance(state, Mapping) or "controller" not in state:
            found = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise InvalidArgumentError(
                f"not an lrctl state of format {FORMAT} (LRControl.state_dict() has 'controller' "
                f"and 'scheduler'; got {found!r})"
            )
        groups = () if self._adopted is None else self._adopted.groups
        # Everything is checked before anything changes: the scheduler's state too.
        parsed = self._controller.parse_state(state["controller"], adopted=groups)
        report: list[str] = []
        scheduler_state = state.get("scheduler")
        if scheduler_state is not None:
            if self._adopted is None:
                report.append("the checkpoint's rates came from an adopted torch scheduler; pass it "
                              "as attach(scheduler=...) to resume its progress")
            else:
                try:
                    self._adopted.load_state_dict(scheduler_state)
                except (ValueError, KeyError, TypeError) as exc:
                    raise InvalidArgumentError(f"the adopted scheduler's state does not fit: {exc}") from None
        if policy == "code" and self.loaded_before_attach:
            # torch's load already put the checkpoint's rates in the groups, so the code's
            # are lost, except for names an adopted scheduler gives their base.
            adopted_names = self._controller.adopted_positions()
            rest = [r for r in parsed.rates if r[0] not in adopted_names]
            if rest:
                report.append(
                    f"resume='code': {len(rest)} name(s) take the checkpoint's rates, since the "
                    "optimizer's state was loaded before attach and had replaced the code's "
                    "(load it after attach, or adopt a scheduler, to keep the code's)")
            parsed = dataclasses.replace(parsed, rates=rest)
            policy = "checkpoint"
        replayer = self.replayer
        if replayer is not None:
            replayer.before_load()
        try:
            report += self._controller.apply_state(parsed, policy=policy)
        finally:
            if replayer is not None:  # from the loaded step (or, had it failed, the same one)
                replayer.after_load()
        self.report = report
        return report

    # -- torch hooks -----------------------------------------------------------------
    def _after_save(self, optimizer: torch.optim.Optimizer, saved: dict) -> dict:
        rates = self._controller.learning_rates()
        out = to_layout(saved, optimizer, self._layout, self._names_by_param,
                        lambda name: rates.get(name, 0.0))
        if out["param_groups"]:
            out["param_groups"][0] = {**out["param_groups"][0], STATE_KEY: self.state_dict()}
        return out

    def _before_load(self, optimizer: torch.optim.Optimizer, saved: dict) -> dict:
        groups = [dict(g) for g in saved["param_groups"]]  # the caller's dict stays as it is
        self._loaded = take_state(groups)
        remapped, names = remap_by_name({**saved, "param_groups": groups}, optimizer,
                                        self._names_by_param)
        self._name_report: NameReport = names
        return remapped

    def _after_load(self, optimizer: torch.optim.Optimizer) -> None:
        state, self._loaded = self._loaded, None
        report = [] if self._name_report.complete else [self._name_report.describe()]
        if report:
            log.warning("lrctl: loading optimizer state: %s", report[0])
        if state is not None:
            report += self.load_state_dict(state)
        else:
            self._from_plain_checkpoint(optimizer)
        self.report = report

    def _from_plain_checkpoint(self, optimizer: torch.optim.Optimizer) -> None:
        """A checkpoint without lrctl's state was loaded (saved before lrctl was used):
        torch put its rates in the groups. While the groups are still the ones lrctl was
        attached with, they are taken as the checkpoint's: an adopted scheduler's shadow
        continues from them, as the scheduler would have; under the "checkpoint" policy
        the other names take them as bases."""
        groups = optimizer.param_groups
        if self._controller.version == 0 and len(groups) == len(self._layout):
            if self._adopted is not None:
                self._adopted.load_groups(groups)
            if self.policy == "checkpoint":
                adopted_names = self._controller.adopted_positions()
                position = {id(p): i for i, p in enumerate(self._controller.parameters)}
                self._controller.rebase({
                    position[id(p)]: lr_value(group["lr"])
                    for group in groups for p in group["params"]
                    if position[id(p)] not in adopted_names
                })
        self._controller.reinstall()
