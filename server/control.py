"""attach(): the one call that puts a training job under lrctl's control."""

from __future__ import annotations

import atexit
import logging
import os
import warnings
from typing import Any, Iterable, Literal, Mapping, Optional, Sequence, Union

import torch

from lrctl.server.admission import (
    DEFAULT_EXPENSIVE_QUEUED,
    DEFAULT_EXPENSIVE_WORKERS,
    DEFAULT_MAX_WAITING,
    DEFAULT_MAX_WAITING_PER_CONNECTION,
    DEFAULT_MAX_WAITING_PER_TOKEN,
)
from lrctl.server.adopt import AdoptedScheduler
from lrctl.server import audit as audit_log_module
from lrctl.server.audit import AuditLog
from lrctl.server.auth import Tokens
from lrctl.server.controller import Controller
from lrctl.server.controller_state import RESUME_POLICIES
from lrctl.server.queue_limits import QueueLimits
from lrctl.server.history import DEFAULT_HISTORY_LIMIT, DEFAULT_HISTORY_MAX_BYTES
from lrctl.server.resume import STATE_KEY, Resume, take_state
from lrctl.server import replay as replay_module
from lrctl.server.replay import Replayer
from lrctl.server.factory import DEFAULT_ADDRESS, BuiltServer, build_server
from lrctl.server.guardrails import Guardrails
from lrctl.server import metrics as metrics_module
from lrctl.server.metrics import MetricsServer, MetricsSource
from lrctl.server.service import LearningRateControlService
from lrctl.server.serving_process import ServingProcess, serving_mode
from lrctl.common.errors import LrctlError
from lrctl.server.param_stats import DEFAULT_STATS, ParamStats
from lrctl.server.telemetry import (
    DEFAULT_RING_BYTES,
    DEFAULT_RING_EVENTS,
    Telemetry,
    check_metric_name,
    check_metrics,
)
from lrctl.server.tls import ServerTLS
from lrctl.server.watch import WatchLimits
from lrctl.server.wrappers import named_parameters, unwrap_optimizer
from lrctl.v1 import lrctl_pb2_grpc


log = logging.getLogger("lrctl.control")


class LRControl:
    """A controller attached to one optimizer, and the gRPC server that exposes it.

    Use as a context manager, or call `close()` when training ends. Closing detaches
    the step hook (the optimizer keeps its current rates) and stops the server.
    """

    def __init__(
        self, controller: Controller, server: BuiltServer | ServingProcess | None, resume: Resume,
        audit: AuditLog | None = None, service: LearningRateControlService | None = None,
        metrics: MetricsServer | None = None, replayer: Replayer | None = None,
        stats: ParamStats | None = None, plateau: AdoptedScheduler | None = None,
    ) -> None:
        self.controller = controller
        # An adopted ReduceLROnPlateau that report() feeds (attach's plateau_metric).
        self._plateau = plateau if plateau is not None and plateau.metric is not None else None
        self.replayer = replayer
        self._stats_hooks: list[Any] = []
        if stats is not None:
            self._stats_hooks = _hook_stats(controller, stats)
        self._server = server
        self._metrics = metrics
        self._service = service
        self._resume = resume
        self.audit = audit
        self._closed = False
        atexit.register(self.close)

    def report(self, loss: Any = None, /, *, step: int | None = None, **scalars: Any) -> None:
        """Report scalars of a training step for WatchMetrics (`lrctl watch`).

        ``ctl.report(loss, accuracy=acc)``: `loss` is reported as "loss". Values are
        floats, ints, bools or 0-dim tensors on any device: a tensor is kept detached and
        converted only when someone reads it (no device sync in the training loop).
        NaN and inf are values like any other. `step` defaults to lrctl's step counter
        (``ctl.step``, the index of the next ``optimizer.step()``): report before
        ``optimizer.step()`` (right after backward) for the loss to travel with the step
        it was computed at, or pass ``step=ctl.step - 1`` after it. Names: at most 64
        printable characters, no spaces; at most 64 scalars a report and 128 a step.
        A bad name or value raises ValueError naming it (nothing of that report is kept).

        With ``attach(..., plateau_metric=NAME)``, each reported value of NAME also steps
        the adopted ReduceLROnPlateau (``scheduler.step(value)``; a tensor is read then,
        which syncs its device): a reduction takes effect at the next optimizer step.
        Report it from the training thread, once per evaluation, as you would have
        called ``scheduler.step(value)``.
        """
        if loss is not None:
            if "loss" in scalars:
                raise ValueError("metric 'loss' given twice (positionally and by name)")
            scalars["loss"] = loss
        if step is None:
            step = self.controller.step
        elif isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step {step!r} is not a non-negative int")
        checked = check_metrics(scalars)
        self.controller.telemetry.report(step, checked)
        plateau = self._plateau
        if plateau is not None and plateau.metric in checked and not self._closed:
            plateau.feed(checked[plateau.metric])

    @property
    def telemetry(self) -> Telemetry:
        """The ring of recent events (one per step) that WatchMetrics streams from."""
        return self.controller.telemetry

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
    def replay_report(self) -> list[str]:
        """Replayed changes that failed at their step or came out differently from the
        recording (attach(replay=...)); [] when all applied as recorded so far."""
        return [] if self.replayer is None else list(self.replayer.report)

    @property
    def resume_report(self) -> list[str]:
        """What the last resume could not match (names gained or lost, ...); [] if all did."""
        return list(self._resume.report)

    @property
    def tls(self) -> Optional[ServerTLS]:
        """The TLS the server speaks (None: plaintext, or serve=False)."""
        return self._server.tls if self._server is not None else None

    @property
    def service(self) -> LearningRateControlService:
        """The gRPC service: its `waiting` quota and admission `budget` counters."""
        if self._service is None:
            raise RuntimeError("this LRControl was attached with serve=False")
        return self._service

    @property
    def port(self) -> int:
        """The bound port (useful with port 0); 0 on a unix socket."""
        if self._server is None:
            raise RuntimeError("this LRControl was attached with serve=False")
        return self._server.port

    @property
    def address(self) -> str:
        """host:port the server listens on, with the bound port (or unix:/abs/path)."""
        if self._server is None:
            raise RuntimeError("this LRControl was attached with serve=False")
        return self._server.address

    @property
    def metrics_address(self) -> Optional[str]:
        """host:port of the Prometheus endpoint (/metrics), with the bound port; None when off."""
        return None if self._metrics is None else self._metrics.address

    def close(self, grace: float = 2.0) -> None:
        """Shut down: changes still queued fail (recorded as failed: FAILED_PRECONDITION,
        "the worker shut down at step S; change N was not applied", which is also what
        their waiting callers are told), the audit log is written, fsynced and closed,
        then the server stops, giving in-flight calls `grace` seconds to finish."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if self._metrics is not None:
            self._metrics.stop()
        for hook in self._stats_hooks:
            hook.remove()
        # Saving keeps working after close (checkpoints in the user's grouping, with
        # lrctl's last state); loading no longer involves lrctl.
        self._resume.remove(keep_saving=True)
        self.controller.close()
        if self.audit is not None:
            self.audit.close()  # after the controller: its failed records go in too
        if self._server is not None:
            self._server.stop(grace)
        if self._service is not None:
            self._service.close()

    def __enter__(self) -> "LRControl":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _hook_stats(controller: Controller, stats: ParamStats) -> list[Any]:
    """Step hooks that compute `stats` (after lrctl's own pre-hook, which counts the step)."""
    optimizer, telemetry = controller.optimizer, controller.telemetry

    def before(_optimizer: Any, _args: Any, _kwargs: Any) -> None:
        try:
            stats.before(controller.step - 1)
        except Exception:  # statistics must never cost a training step
            log.exception("lrctl: computing parameter statistics failed")

    def after(_optimizer: Any, _args: Any, _kwargs: Any) -> None:
        step = controller.step - 1
        try:
            done = stats.after(step)
        except Exception:
            log.exception("lrctl: computing parameter statistics failed")
            return
        if done is not None:
            telemetry.add_stats(step, *done)

    return [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)]


def _param_stats(controller: Controller, every: int, stats: Sequence[str],
                 groups: Mapping[str, str | Sequence[str]] | None) -> ParamStats:
    """The ParamStats of attach's stats_* options, over the names the optimizer holds
    and that require grad; ValueError naming a bad selector or an empty group."""
    names = controller.names
    views = controller.describe(range(len(names)))
    tracked = [i for i, v in enumerate(views) if v.settable]
    params = controller.parameters
    at = {i: k for k, i in enumerate(tracked)}
    members: dict[str, list[int]] | None = None
    if groups is not None:
        members = {}
        for label, selectors in groups.items():
            check_metric_name(label)
            chosen: set[int] = set()
            for selector in [selectors] if isinstance(selectors, str) else list(selectors):
                try:
                    chosen.update(controller.filter(selector))
                except LrctlError as exc:
                    raise ValueError(f"stats_groups[{label!r}]: {exc}") from None
            members[label] = sorted(at[i] for i in chosen if i in at)
            if not members[label]:
                raise ValueError(f"stats_groups[{label!r}] ({selectors!r}) matches no parameter "
                                 "that the optimizer holds and that requires grad")
    return ParamStats([names[i] for i in tracked], [params[i] for i in tracked], every,
                      tuple(stats), members)


def attach(
    model: torch.nn.Module | Iterable[tuple[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: Any = None,
    address: str = DEFAULT_ADDRESS,
    insecure: bool = False,
    serve: bool = True,
    history_limit: int = DEFAULT_HISTORY_LIMIT,
    history_max_bytes: int = DEFAULT_HISTORY_MAX_BYTES,
    max_workers: int = 8,
    resume: str = "checkpoint",
    start_step: int = 0,
    tokens: Tokens | None = None,
    tls: Union[Optional[ServerTLS], Literal[False]] = None,
    queue_limits: QueueLimits | None = None,
    guardrails: Guardrails | None = None,
    audit_log: str | os.PathLike[str] | None = None,
    audit_max_bytes: int = audit_log_module.DEFAULT_MAX_BYTES,
    audit_keep: int = audit_log_module.DEFAULT_KEEP,
    max_waiting: int = DEFAULT_MAX_WAITING,
    max_waiting_per_connection: int = DEFAULT_MAX_WAITING_PER_CONNECTION,
    max_waiting_per_token: int = DEFAULT_MAX_WAITING_PER_TOKEN,
    expensive_workers: int = DEFAULT_EXPENSIVE_WORKERS,
    expensive_queued: int = DEFAULT_EXPENSIVE_QUEUED,
    metrics_address: str | None = None,
    metrics_insecure: bool = False,
    metrics_selectors: Iterable[str] = (),
    replay: str | os.PathLike[str] | None = None,
    replay_window: int = replay_module.DEFAULT_WINDOW,
    stats_every: int | None = None,
    stats: Sequence[str] = DEFAULT_STATS,
    stats_groups: Mapping[str, str | Sequence[str]] | None = None,
    events: int = DEFAULT_RING_EVENTS,
    events_max_bytes: int = DEFAULT_RING_BYTES,
    watch_limits: WatchLimits | None = None,
    plateau_metric: str | None = None,
    serving: str | None = None,
) -> LRControl:
    """Attach lrctl to a model's parameters and its optimizer, and start serving.

    `model` is an ``nn.Module`` (torch.compile, DDP and DataParallel wrappers are seen
    through: names are the model's own) or an iterable of (name, parameter) pairs
    that covers every tensor the optimizer holds. `optimizer` may be wrapped
    (Accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer).

    `scheduler`, a ``torch.optim.lr_scheduler`` object of this optimizer, is adopted:
    it becomes the schedule of the names of each group it drove, your code keeps
    calling ``scheduler.step()``, and the rates are exactly what it would have given
    (see the README's "Adopting a PyTorch scheduler"). A ``ReduceLROnPlateau`` is
    adopted too: it starts from each group's rate now, whoever calls its
    ``step(metric)`` moves every name of the group (times its own base), and each move is
    recorded in the history as a change by the schedule (role "schedule") at the step it
    takes effect. `plateau_metric` names a metric of ``LRControl.report`` that feeds it
    instead (each reported value steps it once); leave it None where something else
    already calls ``scheduler.step(metric)`` (Hugging Face and Lightning trainers do).
    Its counters (best, num_bad_epochs, cooldown) ride in lrctl's checkpoint. Rate changes are applied right before
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

    `tls` (lrctl.server.tls.ServerTLS, e.g. ``ServerTLS.from_files("cert.pem", "key.pem",
    client_ca="ca.pem")``) makes the server speak TLS, and require client certificates
    signed by `client_ca` when given (mutual TLS). By default it comes from
    $LRCTL_WORKER_TLS_CERT, $LRCTL_WORKER_TLS_KEY and $LRCTL_WORKER_TLS_CLIENT_CA (paths of PEM files);
    with none set, or with ``tls=False``, the server speaks plaintext.

    `address` may also be ``unix:/path``: a socket file only this user can connect to
    (mode 0600), removed on close; the safe way to share the worker with the host or a
    sidecar. Any address others can reach (not loopback, not a unix socket) needs
    tokens or mutual TLS, or `insecure` (which warns on every start).

    `queue_limits` (lrctl.server.queue_limits.QueueLimits) bounds the queue of accepted
    changes: how far ahead `at_step` may be (1,000,000 steps), how many changes and
    bytes it holds, and each connection's and token's share (see the README).

    `guardrails` (lrctl.server.guardrails.Guardrails) bound the rates clients may set;
    by default they come from $LRCTL_GUARDRAILS and $LRCTL_MAX_FACTOR (none when unset;
    pass ``Guardrails()`` to ignore the environment).

    History: the worker keeps the newest `history_limit` records and at most
    `history_max_bytes` of them in memory (64 MiB), oldest dropped first.

    `audit_log` (default: $LRCTL_AUDIT_LOG; none if unset) is a file that every
    recorded change (applied, or failed at its step) is appended to as one JSON line,
    written and fsynced before a waiting client is answered; the training step never
    waits for it (a writer thread does the disk work). Past `audit_max_bytes` (64 MiB)
    it rotates to PATH.1 .. PATH.`audit_keep`. ``close()`` (or the ``with`` block's
    end) writes what is queued and closes it; read it with ``lrctl history --file``.

    Serving limits (see the README's "Serving"): `max_waiting` calls may wait for their
    change to apply (`max_waiting_per_connection` from one connection,
    `max_waiting_per_token` with one token); expensive calls (writes, dry runs, pattern
    reads, big pages) run on `expensive_workers` threads with up to `expensive_queued`
    more waiting for one; `max_workers` threads run synchronous handlers (none of
    lrctl's own; extra services a caller registers).

    `metrics_address` (default: $LRCTL_METRICS_ADDRESS; off when unset or "") serves
    Prometheus metrics at http://HOST:PORT/metrics (port 0: any free port, read it back
    from ``.metrics_address``): step, steps per second, config version, queued changes,
    the rate of each physical param group, changes and calls by status, and the rate
    (mean, min, max) of each selector in `metrics_selectors`. It has no authentication
    and names parameters: an address other than loopback needs `metrics_insecure`.

    `replay` (default: $LRCTL_REPLAY; none if unset) is an audit log or a `lrctl history
    --export` file of an earlier run: each change it recorded as applied is applied again
    right before the step it was applied at, as it was sent (lrctl.server.replay), with
    no client; `replay_window` bounds how many wait in the queue at once. A file this
    run cannot replay (a name it lacks, a different starting rate, a selector that
    matches other names, a step already past) raises ValueError naming it, before any
    change is queued. Changes that fail later are in ``.replay_report`` and the log.

    Watching (see the README's "Watching a job"): ``ctl.report(loss, **scalars)`` and
    the change records of each step make one event per step, kept in a ring of the
    newest `events` events and at most `events_max_bytes` (32 MiB) for WatchMetrics
    (`lrctl watch`). `watch_limits` (lrctl.server.watch.WatchLimits) caps the streams
    (64; 8 per connection, 16 per token) and each stream's queue (1024 events, 8 MiB).
    `stats_every` K (default off) adds per-parameter statistics to the events of steps
    0, K, 2K, ...: `stats` from grad_norm, param_norm, update_ratio, grad_sq_sum,
    max_dist, update_dot, descent_cos (lrctl.server.param_stats; default the first three), per name,
    or per group with `stats_groups` ({"encoder": "encoder.*", "head": ["head.*"]}).

    `serving` (default: $LRCTL_SERVING, else "inprocess"): "inprocess" runs the gRPC
    server on a thread of this process; "process" runs it in a serving process of its
    own (no torch in it; it exits with this one) that forwards the calls here
    (lrctl.server.serving_process; README "Serving"), so that grpc's per-request
    machinery does not run under the training process's GIL.
    """
    if serve:
        serving = serving_mode(serving)
    if tokens is None and serve:
        tokens = Tokens.from_env()
    if tls is None and serve:
        tls = ServerTLS.from_env()
    if audit_log is None:
        audit_log = os.environ.get(audit_log_module.ENV) or None
    if replay is None:
        replay = os.environ.get(replay_module.ENV) or None
    if resume not in RESUME_POLICIES:
        raise ValueError(f"resume {resume!r} is not one of {', '.join(map(repr, RESUME_POLICIES))}")
    if guardrails is None:
        guardrails = Guardrails.from_env()
    metrics_address = metrics_module.from_env(metrics_address)
    metrics_selectors = tuple(metrics_selectors)
    if plateau_metric is not None:
        if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise ValueError(
                f"plateau_metric {plateau_metric!r} feeds an adopted ReduceLROnPlateau, but the "
                f"scheduler is {type(scheduler).__name__ if scheduler is not None else 'None'}")
        check_metric_name(plateau_metric)
    if metrics_address is not None:  # refused before lrctl touches anything
        metrics_module.check_metrics_bind(metrics_address, metrics_insecure, warn=False)
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
    adopted = controller = checkpoints = audit = replayer = param_stats = None
    # The replayer is made after the controller (it reads its table), and the step hook
    # calls it first: each step's due changes are queued before the hook applies them.
    feeders: list[Replayer] = []
    on_step: tuple[Any, ...] = () if replay is None else (lambda: feeders[0].feed() if feeders else None,)
    try:
        if scheduler is not None:
            adopted = AdoptedScheduler(scheduler, optimizer)
            adopted.metric = plateau_metric
        controller = Controller(
            named,
            optimizer,
            history_limit=history_limit,
            history_max_bytes=history_max_bytes,
            group_schedules=None if adopted is None else adopted.groups,
            group_bases=None if adopted is None else [g.base_lr for g in adopted.groups],
            on_step=on_step + (() if adopted is None else (adopted.mark_stepped,)),
            schedule_moves=adopted.plateau_moves if adopted is not None and adopted.plateau else None,
            start_step=start_step,
            queue_limits=queue_limits,
            guardrails=guardrails,
            telemetry=Telemetry(events, events_max_bytes),
        )
        param_stats = None if stats_every is None else _param_stats(controller, stats_every, stats, stats_groups)
        checkpoints = Resume(controller, optimizer, adopted, resume)
        if loaded is not None:
            checkpoints.loaded_before_attach = True
            checkpoints.load_state_dict(loaded)
            checkpoints.loaded_before_attach = False
        if audit_log:
            audit = AuditLog(audit_log, run_id=controller.run_id, max_bytes=audit_max_bytes,
                             keep=audit_keep)
            controller.audit = audit
        if replay is not None:
            replayer = Replayer(controller, os.fspath(replay), window=replay_window)
            feeders.append(replayer)
            checkpoints.replayer = replayer
    except BaseException:
        # Leave everything as it was: no hooks, the scheduler on the optimizer, the state.
        if checkpoints is not None:
            checkpoints.remove()
        if controller is not None:
            controller.close()
        if audit is not None:
            audit.close()
        if adopted is not None:
            adopted.release()
        if loaded is not None:
            optimizer.param_groups[0][STATE_KEY] = loaded
        raise
    metrics = None
    if not serve:
        try:
            if metrics_address is not None:
                metrics = MetricsServer(metrics_address, MetricsSource(controller, metrics_selectors),
                                        insecure=metrics_insecure)
        except BaseException:
            checkpoints.remove()
            controller.close()
            if audit is not None:
                audit.close()
            raise
        return LRControl(controller, None, checkpoints, audit, metrics=metrics, replayer=replayer,
                         stats=param_stats, plateau=adopted)
    service = server = None
    try:
        service = LearningRateControlService(
            controller, max_waiting, tokens,
            max_waiting_per_connection=max_waiting_per_connection,
            max_waiting_per_token=max_waiting_per_token,
            expensive_workers=expensive_workers,
            expensive_queued=expensive_queued,
            watch_limits=watch_limits,
        )
        if serving == "process":
            server = ServingProcess(service, address=address, insecure=insecure, tokens=tokens,
                                    tls=tls or None, max_workers=max_workers)
        else:
            server = build_server(
                [lambda s: lrctl_pb2_grpc.add_LearningRateControlServicer_to_server(service, s)],
                address=address,
                insecure=insecure,
                tokens=tokens,
                tls=tls or None,
                max_workers=max_workers,
            )
        if metrics_address is not None:
            source = MetricsSource(controller, metrics_selectors, server.requests.snapshot)
            metrics = MetricsServer(metrics_address, source, insecure=metrics_insecure)
    except BaseException:
        if server is not None:
            server.stop(0)
        if service is not None:
            service.close()
        checkpoints.remove()
        controller.close()
        if audit is not None:
            audit.close()
        raise
    return LRControl(controller, server, checkpoints, audit, service, metrics, replayer,
                     stats=param_stats, plateau=adopted)
