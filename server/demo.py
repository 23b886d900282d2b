"""`lrctl demo`: a worker that trains while a separate client process drives its rates.

Without --serve, it reproduces the seed example end to end: the worker trains the
two-layer model for ten steps while a client subprocess (lrctl.client.demo_driver)
schedules inverse-time decay over gRPC with at_step; the client prints the table read
back from the worker's history, and the worker checks that every optimizer step ran
with exactly those rates. With --serve, it only runs a worker for you to play with.
"""

from __future__ import annotations

import faulthandler
import math
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

import torch
from torch import nn

from lrctl.client.usage import OneLineParser
from lrctl.client.client import ADDRESS_ENV, DEFAULT_ADDRESS, default_address
from lrctl.common.addresses import HostPort, parse_address
from lrctl.server.control import attach
from lrctl.server.queue_limits import QueueLimits
from lrctl.server.auth import ADMIN, Tokens
from lrctl.server.guardrails import Guardrail, Guardrails
from lrctl.server.optim import build_optimizer
from lrctl.server.tls import ServerTLS

SEED_LRS = {"layer1.weight": 0.01, "layer1.bias": 0.1, "layer2.weight": 0.001, "layer2.bias": 1.0}


class SeedModel(nn.Module):
    """The seed example's model: layer2(layer1(x)), 10 -> 20 -> 1."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Linear(10, 20)
        self.layer2 = nn.Linear(20, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(x))


class Encoder(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.norm(x)


class DemoMLP(nn.Module):
    """A small encoder + head with names worth globbing (encoder.layers.3.*)."""

    def __init__(self, width: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.encoder = Encoder(width, depth)
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def _seed_job() -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], torch.Tensor]]:
    model = SeedModel()
    optimizer = build_optimizer(model, torch.optim.SGD, SEED_LRS, default_lr=10)
    x = torch.zeros(1, 10)
    return model, optimizer, lambda: model(x).sum()


def _mlp_job() -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], torch.Tensor]]:
    model = DemoMLP()
    model.encoder.norm.requires_grad_(False)  # frozen: listed, but cannot be set
    optimizer = build_optimizer(
        model, torch.optim.AdamW, {"encoder.*": 1e-3, "head.*": 1e-2}, weight_decay=0.01
    )

    def loss() -> torch.Tensor:
        x = torch.randn(64, 32)
        target = torch.sin(x.sum(dim=1, keepdim=True))
        return nn.functional.mse_loss(model(x), target)

    return model, optimizer, loss


JOBS = {"seed": _seed_job, "mlp": _mlp_job}


def _train_step(optimizer: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor],
                report: Callable[..., None] | None = None) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    if report is not None:
        report(loss)  # before step(): the loss travels with the step it was computed at
    optimizer.step()
    return loss.item()


def _lrs_by_name(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {n: float(g["lr"]) for g in optimizer.param_groups for n in g["param_names"]}


def run_demo(steps: int = 10, audit_log: str | None = None) -> int:
    """The seed example over gRPC; returns the exit code (0: the tables match)."""
    torch.manual_seed(0)
    model, optimizer, loss_fn = _seed_job()
    seen: list[dict[str, float]] = []
    tokens = Tokens.from_env()
    # The demo's own client gets the admin token, if the environment sets tokens.
    admin = next((t.secret for t in tokens.tokens if t.role == ADMIN), None) if tokens else None
    env = {**os.environ, **({"LRCTL_TOKEN": admin} if admin else {})}
    # Loopback and plaintext (tls=False): the worker's TLS variables are not meant for
    # this private pair, and its client must not take LRCTL_TLS_CERT for its own.
    for variable in ("LRCTL_TLS_CA", "LRCTL_TLS_CERT", "LRCTL_TLS_KEY", "LRCTL_TLS_SERVER_NAME"):
        env.pop(variable, None)
    # The driver queues one change per step from one connection, all before step 0.
    limits = QueueLimits(max_changes=max(steps, 1000), max_changes_per_connection=max(steps, 100),
                         max_changes_per_token=max(steps, 250))
    with attach(model, optimizer, address="127.0.0.1:0", tokens=tokens, tls=False,
                queue_limits=limits, audit_log=audit_log) as ctl:
        # Registered after attach, so it runs after lrctl's hook: it sees the rates
        # each step really used.
        optimizer.register_step_pre_hook(lambda opt, a, k: seen.append(_lrs_by_name(opt)))
        print(f"worker: training the seed model (SGD, 4 parameters) on {ctl.address}", flush=True)
        driver = subprocess.Popen(
            [sys.executable, "-m", "lrctl.client.demo_driver", "--address", ctl.address,
             "--steps", str(steps)],
            env=env,
        )
        try:
            # The demo's only synchronization: step 0 waits until the client has
            # scheduled every step, so the table starts at step 0 as the seed's does.
            deadline = time.monotonic() + 60
            while ctl.controller.pending_count < steps and driver.poll() is None:
                if time.monotonic() > deadline:
                    print("worker: the client scheduled nothing within 60 s", file=sys.stderr)
                    return 1
                time.sleep(0.01)
            if driver.poll() is not None:
                return driver.returncode or 1
            for _ in range(steps):
                _train_step(optimizer, loss_fn)
            code = driver.wait(timeout=60)
        finally:
            if driver.poll() is None:
                driver.kill()
        applied = {r.step: r for r in ctl.controller.history(0, steps)[0] if not r.failed}
        names = ctl.controller.names
        for step, rates in enumerate(seen):
            record = applied.get(step)
            wanted = dict(zip((names[i] for i in record.plan.indices), record.plan.new_lr)) if record else {}
            if any(rates[n] != lr for n, lr in wanted.items()):
                print(f"worker: step {step} ran with {rates}, history says {wanted}", file=sys.stderr)
                return 1
        print(f"worker: all {len(seen)} optimizer steps ran with exactly the rates in the history")
    return code


# A client cannot connect to "all interfaces"; it connects to this machine's loopback.
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def client_address(bound: str) -> str:
    """The address a client on this machine passes to reach a worker bound at `bound`:
    a wildcard host (0.0.0.0, [::]) becomes loopback; anything else is as bound."""
    try:
        endpoint = parse_address(bound)
    except ValueError:
        return bound
    if isinstance(endpoint, HostPort) and endpoint.host in _WILDCARD_HOSTS:
        return str(HostPort(_WILDCARD_HOSTS[endpoint.host], endpoint.port))
    return bound


# Seconds in-flight calls get to finish when the worker stops.
SHUTDOWN_GRACE_S = 5.0


def serve(address: str, model_name: str, steps: int, step_delay: float, insecure: bool,
          tls: ServerTLS | None = None, guardrails: Guardrails | None = None,
          audit_log: str | None = None, metrics_address: str | None = None,
          metrics_insecure: bool = False, metrics_selectors: tuple[str, ...] = ()) -> int:
    """Train a demo model until `steps` (0: forever) or SIGINT/SIGTERM, serving lrctl
    (over `tls`, else the TLS that $LRCTL_WORKER_TLS_CERT/_KEY/_CLIENT_CA configure;
    `guardrails` None: from $LRCTL_GUARDRAILS / $LRCTL_MAX_FACTOR, as attach does;
    `metrics_address` None: from $LRCTL_METRICS_ADDRESS, off when unset).

    A signal stops training at a step boundary; then close() fails the changes still
    queued (their waiting callers hear FAILED_PRECONDITION "the worker shut down at
    step S; change N was not applied", and they are recorded as failed), writes and
    fsyncs the audit log, and stops the server with a grace period. Exit code 0.
    """
    torch.manual_seed(0)
    model, optimizer, loss_fn = JOBS[model_name]()
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 PID`: every thread's stack on stderr (a stuck worker)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        ctl = attach(model, optimizer, address=address, insecure=insecure, tls=tls,
                     guardrails=guardrails, audit_log=audit_log, metrics_address=metrics_address,
                     metrics_insecure=metrics_insecure, metrics_selectors=metrics_selectors)
        try:
            n = len(ctl.controller.names)
            over = ""
            if ctl.tls is not None:
                over = " (mutual TLS)" if ctl.tls.mutual else " (TLS)"
            flags = " --tls-ca CA.pem" if ctl.tls is not None else ""
            flags += " --tls-cert CERT.pem --tls-key KEY.pem" if ctl.tls is not None and ctl.tls.mutual else ""
            target = client_address(ctl.address)
            print(
                f"lrctl worker: training the {model_name} model ({n} parameters) on {ctl.address}{over}\n"
                f"  try:  lrctl --address {target}{flags} list\n"
                f"        lrctl --address {target}{flags} set '{ctl.controller.names[0]}=0.05'\n"
                f"        lrctl --address {target}{flags} watch\n"
                + (f"        curl -s {ctl.metrics_address}/metrics | head\n" if ctl.metrics_address else "") +
                "  Ctrl-C stops it.",
                flush=True,
            )
            last_report = time.monotonic()
            step = 0
            while not stop.is_set() and (steps == 0 or step < steps):
                loss = _train_step(optimizer, loss_fn, ctl.report)
                step += 1
                now = time.monotonic()
                if now - last_report >= 2.0 or step == steps:
                    s = ctl.controller.status()
                    print(
                        f"step {s.step:>7}  loss {loss:.5g}  distinct lrs {s.num_distinct_lrs}  "
                        f"groups {s.num_param_groups}  version {s.version}",
                        flush=True,
                    )
                    last_report = now
                if step_delay > 0:
                    stop.wait(step_delay)
            reason = "stopped by signal" if stop.is_set() else f"reached {step} steps"
            print(f"lrctl worker: {reason}; shutting down", flush=True)
        finally:
            ctl.close(grace=SHUTDOWN_GRACE_S)
        print("lrctl worker: stopped", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def main(argv: list[str] | None = None) -> int:
    # The CLI's parser: its errors reach `lrctl` as one "lrctl: error: demo: ..." line.
    parser = OneLineParser(
        prog="lrctl demo",
        description="Run the seed example end to end, or (--serve) a demo worker to play with.",
    )
    parser.add_argument("--serve", action="store_true", help="only run a worker, until the steps or a signal")
    # The CLI's own default: `lrctl demo --serve` then `lrctl status` find each other.
    parser.add_argument("--address", default=default_address(),
                        help=f"with --serve: where to listen (default: ${ADDRESS_ENV} or {DEFAULT_ADDRESS})")
    parser.add_argument("--model", choices=sorted(JOBS), default=None,
                        help="with --serve: the model to train (default: seed)")
    parser.add_argument("--steps", type=int, default=None, help="steps to train (demo: 10; --serve: 0 = until stopped)")
    parser.add_argument("--step-delay", type=float, default=0.05,
                        help="with --serve: seconds between steps (default 0.05)")
    parser.add_argument("--insecure", action="store_true", help="allow a non-loopback --address without authentication")
    parser.add_argument("--tls-cert", metavar="PEM",
                        help="with --serve: serve TLS with this certificate chain (default: $LRCTL_WORKER_TLS_CERT)")
    parser.add_argument("--tls-key", metavar="PEM",
                        help="with --serve: the certificate's private key (default: $LRCTL_WORKER_TLS_KEY)")
    parser.add_argument("--tls-client-ca", metavar="PEM",
                        help="with --serve: require client certificates signed by this CA, i.e. "
                             "mutual TLS (default: $LRCTL_WORKER_TLS_CLIENT_CA)")
    parser.add_argument("--guardrail", action="append", default=[], metavar="SELECTOR=MIN..MAX",
                        help="with --serve: bound the rates of what SELECTOR matches (either side may be "
                             "empty: 'head.*=..0.1'); repeatable; replaces $LRCTL_GUARDRAILS")
    parser.add_argument("--max-factor", type=float, default=None, metavar="F",
                        help="with --serve: refuse a change that moves a rate by more than a factor F "
                             "(> 1); replaces $LRCTL_MAX_FACTOR")
    parser.add_argument("--audit-log", metavar="PATH", default=None,
                        help="append every recorded change to PATH as a JSON line, fsynced before "
                             "its client is answered (default: $LRCTL_AUDIT_LOG; none if unset)")
    parser.add_argument("--metrics-address", metavar="HOST:PORT", default=None,
                        help="with --serve: serve Prometheus metrics at http://HOST:PORT/metrics "
                             "(default: $LRCTL_METRICS_ADDRESS; off if unset)")
    parser.add_argument("--metrics-insecure", action="store_true",
                        help="allow a non-loopback --metrics-address (it has no authentication "
                             "and shows parameter names and rates)")
    parser.add_argument("--metrics-selector", action="append", default=[], metavar="SELECTOR",
                        help="with --serve: also export the rate of what SELECTOR matches "
                             "(lrctl_learning_rate_selector); repeatable")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 0:
        parser.error(f"--steps must not be negative: {args.steps}")
    if not math.isfinite(args.step_delay) or args.step_delay < 0:
        parser.error(f"--step-delay must be a finite number of seconds >= 0: {args.step_delay}")
    if not args.serve and args.model is not None:
        parser.error("--model needs --serve (the demo without it always runs the seed model)")
    tls_flags = [f for f, v in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                                ("--tls-client-ca", args.tls_client_ca)) if v is not None]
    if tls_flags and not args.serve:
        parser.error(f"{tls_flags[0]} needs --serve (the demo without it runs on loopback, in plaintext)")
    metric_flags = [f for f, v in (("--metrics-address", args.metrics_address),
                                   ("--metrics-selector", args.metrics_selector)) if v]
    if metric_flags and not args.serve:
        parser.error(f"{metric_flags[0]} needs --serve")
    guardrails = None
    if args.guardrail or args.max_factor is not None:
        if not args.serve:
            parser.error("--guardrail and --max-factor need --serve")
        try:
            guardrails = Guardrails(tuple(map(Guardrail.parse, args.guardrail)), args.max_factor)
        except ValueError as exc:
            parser.error(str(exc))
    try:
        if args.serve:
            tls = ServerTLS.from_paths(args.tls_cert, args.tls_key, args.tls_client_ca)
            return serve(args.address, args.model or "seed", args.steps or 0, args.step_delay,
                         args.insecure, tls, guardrails, args.audit_log, args.metrics_address,
                         args.metrics_insecure, tuple(args.metrics_selector))
        if args.steps == 0:
            parser.error("--steps must be at least 1 without --serve")
        return run_demo(args.steps or 10, args.audit_log)
    except (ValueError, OSError) as exc:
        print(f"lrctl: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
