"""attach(): the one call that puts a training job under lrctl's control."""

from __future__ import annotations

import atexit
import warnings
from typing import Any, Iterable, Mapping

import torch

from lrctl.server.admission import (
    DEFAULT_EXPENSIVE_QUEUED,
    DEFAULT_EXPENSIVE_WORKERS,
    DEFAULT_MAX_WAITING,
    DEFAULT_MAX_WAITING_PER_CONNECTION,
    DEFAULT_MAX_WAITING_PER_TOKEN,
)
from lrctl.server.adopt import AdoptedScheduler
from lrctl.server.auth import Tokens
from lrctl.server.controller import Controller
from lrctl.server.controller_state import RESUME_POLICIES
from lrctl.server.resume import STATE_KEY, Resume, take_state
from lrctl.server.factory import DEFAULT_ADDRESS, BuiltServer, build_server
from lrctl.server.service import LearningRateControlService
from lrctl.server.wrappers import named_parameters, unwrap_optimizer
from lrctl.v1 import lrctl_pb2_grpc


class LRControl:
    """A controller attached to one optimizer, and the gRPC server that exposes it.

    Use as a context manager, or call `close()` when training ends. Closing detaches
    the step hook (the optimizer keeps its current rates) and stops the server.
    """

    def __init__(
        self, controller: Controller, server: BuiltServer | None, resume: Resume,
        service: LearningRateControlService | None = None,
    ) -> None:
        self.controller = controller
        self._server = server
        self._service = service
        self._resume = resume
        self._closed = False
        atexit.register(self.close)

    @property
    def step(self) -> int:
        """Index of the next optimizer step lrctl counts (0 before the first).

        lrctl counts calls of ``optimizer.step()``: when a GradScaler skips a step
        (inf/NaN gradients) the optimizer's step is not called and not counted, so
        this can trail a trainer's ``global_step``, which counts every update attempt.
        """
        return self.controller.step

    def state_dict(self) -> dict[str, Any]:
        """lrctl's state keyed by parameter name: bases, schedules, pins, step, version,
        run lineage, the history tail, waiting changes and an adopted scheduler's
        progress. ``optimizer.state_dict()`` carries it too (see the README)."""
        return self._resume.state_dict()

    def load_state_dict(self, state: Mapping[str, Any], policy: str | None = None) -> list[str]:
        """Restore state_dict() of an earlier run; returns (and logs) what did not match.

        `policy` overrides attach's `resume`: "checkpoint" (its rates win) or "code"."""
        return self._resume.load_state_dict(state, policy)

    @property
    def resume_report(self) -> list[str]:
        """What the last resume could not match (names gained or lost, ...); [] if all did."""
        return list(self._resume.report)

    @property
    def service(self) -> LearningRateControlService:
        """The gRPC service: its `waiting` quota and admission `budget` counters."""
        if self._service is None:
            raise RuntimeError("this LRControl was attached with serve=False")
        return self._service

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self._server is None:
            raise RuntimeError("this LRControl was attached with serve=False")
        return self._server.port

    @property
    def address(self) -> str:
        """host:port the server listens on, with the bound port."""
        if self._server is None:
            raise RuntimeError("this LRControl was attached with serve=False")
        return self._server.address

    def close(self, grace: float = 2.0) -> None:
        """Fail pending changes, stop serving (in-flight calls get `grace` seconds)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        # Saving keeps working after close (checkpoints in the user's grouping, with
        # lrctl's last state); loading no longer involves lrctl.
        self._resume.remove(keep_saving=True)
        self.controller.close()
        if self._server is not None:
            self._server.stop(grace)
        if self._service is not None:
            self._service.close()

    def __enter__(self) -> "LRControl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach(
    model: torch.nn.Module | Iterable[tuple[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: Any = None,
    address: str = DEFAULT_ADDRESS,
    insecure: bool = False,
    serve: bool = True,
    history_limit: int = 10_000,
    max_workers: int = 8,
    resume: str = "checkpoint",
    start_step: int = 0,
    tokens: Tokens | None = None,
    max_waiting: int = DEFAULT_MAX_WAITING,
    max_waiting_per_connection: int = DEFAULT_MAX_WAITING_PER_CONNECTION,
    max_waiting_per_token: int = DEFAULT_MAX_WAITING_PER_TOKEN,
    expensive_workers: int = DEFAULT_EXPENSIVE_WORKERS,
    expensive_queued: int = DEFAULT_EXPENSIVE_QUEUED,
) -> LRControl:
    """Attach lrctl to a model's parameters and its optimizer, and start serving.

    `model` is an ``nn.Module`` (torch.compile, DDP and DataParallel wrappers are seen
    through: names are the model's own) or an iterable of (name, parameter) pairs
    that covers every tensor the optimizer holds. `optimizer` may be wrapped
    (Accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer).

    `scheduler`, a ``torch.optim.lr_scheduler`` object of this optimizer, is adopted:
    it becomes the schedule of the names of each group it drove, your code keeps
    calling ``scheduler.step()``, and the rates are exactly what it would have given
    (ReduceLROnPlateau cannot be adopted yet). Rate changes are applied right before
    ``optimizer.step()``; the training loop stays as it is. `address` defaults to
    127.0.0.1:50051; port 0 picks a free port (read it back from ``.port``).
    Anything wrong is raised before lrctl touches the optimizer or the scheduler.

    Checkpoints: ``optimizer.state_dict()`` is saved in your original grouping with
    lrctl's state inside; loading it (before or after attach) restores lrctl's state.
    `resume` says whose rates win then: "checkpoint" (default, as torch restores group
    rates) or "code" (the rates this run was built with). `start_step` is where lrctl's
    step count starts when no lrctl state is restored (a trainer resuming from a
    checkpoint saved without lrctl passes its own step).

    `tokens` (lrctl.server.auth.Tokens) makes every call but health checks need a
    bearer token; by default they come from $LRCTL_ADMIN_TOKEN(_FILE) and
    $LRCTL_READER_TOKEN(_FILE), and with none set the worker is open (on loopback only).

    Serving limits (see the README's "Serving"): `max_waiting` calls may wait for their
    change to apply (`max_waiting_per_connection` from one connection,
    `max_waiting_per_token` with one token); expensive calls (writes, dry runs, pattern
    reads, big pages) run on `expensive_workers` threads with up to `expensive_queued`
    more waiting for one; `max_workers` threads run synchronous handlers (none of
    lrctl's own; extra services a caller registers).
    """
    if tokens is None and serve:
        tokens = Tokens.from_env()
    if resume not in RESUME_POLICIES:
        raise ValueError(f"resume {resume!r} is not one of {', '.join(map(repr, RESUME_POLICIES))}")
    named = named_parameters(model)
    optimizer = unwrap_optimizer(optimizer)
    # Loaded before attach: lrctl's state sits in the group dicts; it is no hyperparameter.
    loaded = take_state(optimizer.param_groups)
    if scheduler is None and any("initial_lr" in g for g in optimizer.param_groups):
        warnings.warn(
            "the optimizer's param groups have 'initial_lr': a torch LR scheduler seems to drive "
            "them. Pass it as attach(..., scheduler=...) so that lrctl adopts it; stepped "
            "on its own it fights lrctl's rates and breaks when lrctl regroups",
            stacklevel=2,
        )
    adopted = controller = checkpoints = None
    try:
        if scheduler is not None:
            adopted = AdoptedScheduler(scheduler, optimizer)
        controller = Controller(
            named,
            optimizer,
            history_limit=history_limit,
            group_schedules=None if adopted is None else adopted.groups,
            group_bases=None if adopted is None else [g.base_lr for g in adopted.groups],
            on_step=() if adopted is None else (adopted.mark_stepped,),
            start_step=start_step,
        )
        checkpoints = Resume(controller, optimizer, adopted, resume)
        if loaded is not None:
            checkpoints.loaded_before_attach = True
            checkpoints.load_state_dict(loaded)
            checkpoints.loaded_before_attach = False
    except BaseException:
        # Leave everything as it was: no hooks, the scheduler on the optimizer, the state.
        if checkpoints is not None:
            checkpoints.remove()
        if controller is not None:
            controller.close()
        if adopted is not None:
            adopted.release()
        if loaded is not None:
            optimizer.param_groups[0][STATE_KEY] = loaded
        raise
    if not serve:
        return LRControl(controller, None, checkpoints)
    service = None
    try:
        service = LearningRateControlService(
            controller, max_waiting, tokens,
            max_waiting_per_connection=max_waiting_per_connection,
            max_waiting_per_token=max_waiting_per_token,
            expensive_workers=expensive_workers,
            expensive_queued=expensive_queued,
        )
        server = build_server(
            [lambda s: lrctl_pb2_grpc.add_LearningRateControlServicer_to_server(service, s)],
            address=address,
            insecure=insecure,
            tokens=tokens,
            max_workers=max_workers,
        )
    except BaseException:
        if service is not None:
            service.close()
        checkpoints.remove()
        controller.close()
        raise
    return LRControl(controller, server, checkpoints, service)
