"""Benchmark 3: what the lrctl server costs a training loop, idle and under load.

A training loop (an MLP on random data, AdamW, torch on 1 thread, ~20 ms a step) is
timed in these configurations, interleaved round by round in a shuffled order:
  base          no lrctl
  K idle        lrctl attached with server K, serving, no client
  K 10rps       ... and a client process sending 10 requests per second
  K 100rps      ... and 100 requests per second
for the server kinds K: attach (what attach() builds: grpc.aio on an event loop thread
of its own, expensive calls on the admission budget's threads; until issue 15 it was a
synchronous grpc.server with a pool of 8, the "sync" kind of earlier tables) and forward
(a prototype: a child process owns the gRPC server and forwards each request's bytes
over a socket to one thread here that hands them to the same handlers; see
bench/forwarding_proto.py). Two more configurations bound
what the load costs:
  K echo100        the client sends bare health Checks (grpc.health.v1) at 100/s: what
                   the gRPC server costs before any lrctl handler runs (for forward, the
                   sidecar answers them alone: what its CPU costs this machine)
  other-process    the mixed stream at 100/s to an lrctl server in another process: what
                   the client and the server cost this machine's cores, without the GIL
                   (and `other-process watchW+100rps`: W WatchMetrics streams of that
                   server's events too, one per its step, ~130/s as the timed loop's)
  inline           no client: the training loop itself submits the mixed stream's Sets (40/s
                   at 100/s, through the controller's Python API, just before
                   optimizer.step) to an idle lrctl: what planning and applying the
                   changes cost with no serving at all, the floor of any server design that
                   keeps the optimizer in this process

The client is bench/load_client.py, a separate process on loopback (grpc and the stubs
only). It sends an open-loop stream (request k at t0 + k/rate, not waiting for the
answers) of 1-page ListParameters, GetLearningRates and SetLearningRates (wait=false):
in every ten requests, 2 List, 4 Get and 4 Set, of which two alternate all rates between
two values (applied in place) and two regroup (one splits a group, the next merges it).
The Sets apply in the training loop's step pre-hook, so their cost is counted too.

Every sample starts from a fresh copy of the same model and a fresh optimizer (lrctl
attached or not), warms up, then times `--steps` whole training steps (zero_grad,
forward, backward, optimizer.step) while the client sends. A sample's figure is its
mean step time: the mean, not the median, so that a step slowed down by a request
counts. Each configuration's figure is the median over rounds of its ratio to the
base sample of the same round; [lo, hi] is a 90% bootstrap interval of that median.

Two gauges explain the figures. The CPU time per request of the server's Python threads
(all of it under the GIL) and of gRPC's C threads. And where the training thread's
extra time went, from /proc/<tid>/schedstat: more time on a CPU, waiting on a run queue
(the cores were busy: the client, the server, other processes), or blocked (for a
training thread with torch on 1 thread, that is waiting for the GIL). The last line
says how busy other processes kept the cores: on a shared machine, run it again.

    python bench/bench_server_load.py            # the full run (~3.5 minutes)
    python bench/bench_server_load.py --quick    # a smoke run (CI), numbers not meaningful
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from forwarding_proto import ForwardingServed  # bench/, the script's directory
from load_client import RATE_A, RATE_B, RATE_SPLIT
from lrctl.server import attach
from lrctl.server.requests import ChangeRequest, Update

LOAD_CLIENT = Path(__file__).resolve().with_name("load_client.py")



# Server kinds: name -> how to attach a model and optimizer and serve them on a free
# loopback port; the result has .address and .close(grace).
KINDS: dict[str, Callable[[nn.Module, torch.optim.Optimizer], Any]] = {
    "attach": lambda model, opt: attach(model, opt, address="127.0.0.1:0"),
    "forward": ForwardingServed,
    "process": lambda model, opt: attach(model, opt, address="127.0.0.1:0", serving="process"),
}
TARGETS = {0: 1.01, 100: 1.03}  # rate -> the bound on the ratio to base


def helper_cpu(ctl: Any) -> float:
    """CPU seconds so far of the process that serves for `ctl`, if it is another one
    (forward's sidecar, serving="process"'s serving process); else 0."""
    if hasattr(ctl, "sidecar_cpu"):
        return ctl.sidecar_cpu()
    process = getattr(getattr(ctl, "_server", None), "process", None)
    return 0.0 if process is None else process_cpu(process.pid)


def process_cpu(pid: int) -> float:
    """CPU seconds so far of process `pid` (user + system; Linux /proc, else 0)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def inline_sets(model: nn.Module) -> Any:
    """The load client's Sets, in its order, as the controller's requests, forever."""
    first = next(name for name, _ in model.named_parameters())
    cycle = [("*", RATE_A), ("*", RATE_B), (first, RATE_SPLIT), ("*", RATE_A)]
    k = 0
    while True:
        selector, value = cycle[k % len(cycle)]
        yield ChangeRequest(updates=(Update(selector, value),), reason="bench load")
        k += 1


def make_mlp(width: int, depth: int) -> nn.Module:
    """Blocks of Linear + LayerNorm + GELU, then a linear head: 4 tensors per block."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()]
    layers.append(nn.Linear(width, width))
    return nn.Sequential(*layers)


def thread_cpu() -> tuple[float, float]:
    """CPU seconds so far of (this process's Python threads other than the main thread,
    its other threads: gRPC's C core), from /proc (Linux; zeros elsewhere). A Python
    thread runs Python code only while it holds the GIL."""
    try:
        python_ids = {t.native_id for t in threading.enumerate()}
        main_id = threading.main_thread().native_id
        py = other = 0.0
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/schedstat") as f:
                    ns = int(f.read().split()[0])
            except OSError:
                continue  # the thread ended
            if int(tid) == main_id:
                continue
            if int(tid) in python_ids:
                py += ns / 1e9
            else:
                other += ns / 1e9
        return py, other
    except OSError:
        return 0.0, 0.0


def main_thread_sched() -> tuple[float, float]:
    """(seconds on a CPU, seconds waiting on a run queue) of the calling thread so far,
    from /proc (Linux; zeros elsewhere). A thread's wall time minus these two is time it
    was blocked: for a training thread on 1 torch thread, waiting for the GIL."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
            on_cpu, runq = f.read().split()[:2]
        return int(on_cpu) / 1e9, int(runq) / 1e9
    except OSError:
        return 0.0, 0.0


class MachineLoad:
    """How busy the machine's cores were with processes other than this one and its
    children while the benchmark ran (Linux /proc/stat; a noise gauge for the reader)."""

    def __init__(self) -> None:
        self._busy0, self._ours0, self._t0 = self._busy(), self._ours(), time.monotonic()

    @staticmethod
    def _busy() -> float:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            return 0.0

    @staticmethod
    def _ours() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def others_cores(self) -> float:
        """Average number of cores that other processes kept busy (call after children exit)."""
        elapsed = time.monotonic() - self._t0
        others = (self._busy() - self._busy0) - (self._ours() - self._ours0)
        return max(0.0, others / elapsed) if elapsed > 0 else 0.0


class LoadClient:
    """bench/load_client.py in a subprocess, driven by JSON lines."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(LOAD_CLIENT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env,
        )

    def ask(self, **msg: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load client exited (code {self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"load client: {reply['error']}")
        return reply

    def close(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Config:
    label: str
    kind: str | None  # None: no lrctl
    rate: float | None  # None: no client
    mix: str = "mixed"  # or "echo": health Checks only
    watchers: int = 0  # WatchMetrics streams read meanwhile (the loop reports its loss)
    watch_events: int = 0
    inline: bool = False  # the loop submits the Sets itself (kind "attach", idle server)
    ratios: list[float] = field(default_factory=list)
    means: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    # Per round, the main thread's ms per step: (on a CPU, on a run queue, blocked).
    split: list[tuple[float, float, float]] = field(default_factory=list)
    # Per round, the main thread's CPU ms per step inside lrctl's own code: the step hook,
    # report() and (inline) submit. What lrctl itself takes from the training thread,
    # measured directly, beside what the step's time says with the machine's noise in it.
    own: list[float] = field(default_factory=list)
    sent: int = 0
    errors: int = 0
    py_cpu: float = 0.0  # server Python threads' CPU seconds during the loads
    c_cpu: float = 0.0
    sidecar_cpu: float = 0.0  # forward: the sidecar process's CPU seconds during the loads
    error_examples: list[str] = field(default_factory=list)
    load_seconds: float = 0.0
    late_max_ms: float = 0.0


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        torch.manual_seed(0)
        self.base_model = make_mlp(args.width, args.depth)
        self.batches = [
            (torch.randn(args.batch, args.width), torch.randn(args.batch, args.width)) for _ in range(4)
        ]

    _sidecar: subprocess.Popen | None = None
    _sidecar_addr: str = ""

    def sidecar_address(self) -> str:
        """The address of a server in another process (started on first use)."""
        if self._sidecar is None:
            a = self.args
            self._sidecar = subprocess.Popen(
                [sys.executable, __file__, "--serve-sidecar", "--width", str(a.width), "--depth", str(a.depth)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            assert self._sidecar.stdout is not None
            self._sidecar_addr = self._sidecar.stdout.readline().strip()
        return self._sidecar_addr

    def close(self) -> None:
        if self._sidecar is not None:
            assert self._sidecar.stdin is not None
            self._sidecar.stdin.close()
            self._sidecar.wait(30)

    def sample(self, config: Config, client: LoadClient) -> float:
        """One sample: fresh model and optimizer, maybe lrctl and load; mean step time."""
        args = self.args
        model = copy.deepcopy(self.base_model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        cpu_ns = time.thread_time_ns
        own = [0, 0, 0]  # ns in lrctl's code while timed, the hook's start, timing (0/1)

        def hook_starts(*_: Any) -> None:  # registered before attach's hook: runs just before it
            own[1] = cpu_ns()

        def hook_ends(*_: Any) -> None:  # ... and this one just after (every config has both)
            own[0] += (cpu_ns() - own[1]) * own[2]

        opt.register_step_pre_hook(hook_starts)
        ctl = None
        if config.kind in KINDS:
            ctl = KINDS[config.kind](model, opt)
        opt.register_step_pre_hook(hook_ends)
        try:
            if config.rate and not config.inline:
                address = ctl.address if ctl is not None else self.sidecar_address()
                client.ask(cmd="load", address=address, rate=config.rate, mix=config.mix,
                           watchers=config.watchers, watch_method=args.watch_method)
                load_start = time.perf_counter()
                cpu_start = thread_cpu()
                sidecar_start = helper_cpu(ctl)
            times = []
            sets = inline_sets(model) if config.inline else None
            set_every, next_set = (1.0 / (0.4 * config.rate), time.perf_counter()) if config.inline else (0, 0)
            for k in range(args.warmup + args.steps):
                if k == args.warmup:
                    sched0, wall0 = main_thread_sched(), time.perf_counter()
                    own[2] = 1
                x, y = self.batches[k % len(self.batches)]
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                t_own = cpu_ns()
                if config.watchers and ctl is not None:
                    ctl.report(loss)
                while sets is not None and time.perf_counter() >= next_set:
                    ctl.controller.submit(next(sets))
                    next_set += set_every
                    if k >= args.warmup:
                        config.sent += 1
                own[0] += (cpu_ns() - t_own) * own[2]
                opt.step()
                times.append(time.perf_counter() - t0)
            sched1, wall1 = main_thread_sched(), time.perf_counter()
            if config.inline:
                config.load_seconds += wall1 - wall0
            on_cpu, runq = sched1[0] - sched0[0], sched1[1] - sched0[1]
            per_step = 1e3 / args.steps
            config.split.append((on_cpu * per_step, runq * per_step,
                                 (wall1 - wall0 - on_cpu - runq) * per_step))
            config.own.append(own[0] / 1e6 / args.steps)
            if config.rate and not config.inline:
                cpu_end = thread_cpu()
                config.sidecar_cpu += helper_cpu(ctl) - sidecar_start
                stats = client.ask(cmd="stop")
                if stats.get("failure"):
                    raise RuntimeError(f"load client's stream failed: {stats['failure']}")
                config.py_cpu += cpu_end[0] - cpu_start[0]
                config.c_cpu += cpu_end[1] - cpu_start[1]
                config.load_seconds += time.perf_counter() - load_start
                config.sent += sum(stats["sent"].values())
                config.watch_events += sum(stats.get("watch_events", ()))
                config.errors += sum(stats["errors"].values())
                config.error_examples += stats["error_examples"][: 3 - len(config.error_examples)]
                config.late_max_ms = max(config.late_max_ms, stats["late_max_ms"])
        finally:
            if ctl is not None:
                ctl.close(grace=0.5)
        timed = times[args.warmup:]
        config.step_times += timed
        return statistics.fmean(timed)

    def run(self) -> list[Config]:
        args = self.args
        configs = [Config("base", None, None)]
        for kind in args.kinds:
            configs.append(Config(f"{kind} idle", kind, None))
            configs += [Config(f"{kind} {r:g}rps", kind, r) for r in args.rates]
            if args.watchers and kind != "forward":
                configs.append(Config(f"{kind} watch{args.watchers}+100rps", kind, 100.0, watchers=args.watchers))
            if args.echo_rate:
                configs.append(Config(f"{kind} echo{args.echo_rate:g}", kind, args.echo_rate, "echo"))
        if args.inline_rate:
            configs.append(Config(f"inline {args.inline_rate:g}rps", "attach", args.inline_rate, inline=True))
        if args.sidecar_rate:
            configs.append(Config(f"other-process {args.sidecar_rate:g}rps", "sidecar", args.sidecar_rate))
            if args.watchers:
                configs.append(Config(f"other-process watch{args.watchers}+100rps", "sidecar", 100.0,
                                      watchers=args.watchers))
        rng = random.Random(0)
        client = LoadClient()
        try:
            for r in range(args.rounds):
                order = configs[:]
                rng.shuffle(order)
                means = {c.label: self.sample(c, client) for c in order}
                for c in configs:
                    c.means.append(means[c.label])
                    c.ratios.append(means[c.label] / means["base"])
                if args.verbose:
                    print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                        f"{c.label} {c.ratios[-1]:.3f}" for c in configs[1:]), flush=True)
        finally:
            client.close()
            self.close()
        return configs


def median_ci(values: list[float], level: float = 0.90, n: int = 2000) -> tuple[float, float]:
    """A bootstrap interval of the median."""
    if len(values) < 3:
        return min(values), max(values)
    rng = random.Random(1)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    return meds[int((1 - level) / 2 * n)], meds[int((1 + level) / 2 * n) - 1]


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def report(configs: list[Config], args: argparse.Namespace) -> None:
    base = configs[0]
    base_ms = statistics.median(base.means) * 1e3
    base_p99 = percentile(base.step_times, 0.99)
    print(f"{'config':<20} {'ms/step':>8} {'vs base':>8} {'[90% CI]':>15} {'p99 step':>9} "
          f"{'req/s':>6} {'errors':>6} {'py us/req':>9} {'C us/req':>8} {'target':>12}")
    for c in configs:
        ratio = statistics.median(c.ratios)
        lo, hi = median_ci(c.ratios)
        rate = c.sent / c.load_seconds if c.load_seconds else 0.0
        per_req = (f"{c.py_cpu / c.sent * 1e6:>9.0f} {c.c_cpu / c.sent * 1e6:>8.0f}"
                   if c.sent and c.kind in KINDS and not c.inline else f"{'':>9} {'':>8}")
        target = TARGETS.get(int(c.rate or 0)) if c.kind in KINDS and c.mix == "mixed" and not c.inline else None
        verdict = ""
        if target is not None:
            verdict = f"<={target:.2f} " + ("ok" if ratio <= target else "MISS")
        print(f"{c.label:<20} {statistics.median(c.means) * 1e3:>8.2f} {ratio:>7.3f}x "
              f"{f'[{lo:.3f}, {hi:.3f}]':>15} {percentile(c.step_times, 0.99) / base_p99:>8.2f}x "
              f"{rate:>6.1f} {c.errors:>6} {per_req} {verdict:>12}")
        for example in c.error_examples:
            print(f"    error: {example}")
    print()
    print("where a step's extra time goes: the training thread's ms per step on a CPU, waiting on a "
          "run queue (cores busy), and blocked (waiting for the GIL), each minus base's in the same round "
          "(median over rounds); and of its CPU, the ms per step inside lrctl's own code (the step "
          "hook, report(), inline submits), measured directly, with its share of base's step")
    print(f"{'config':<20} {'step':>7} {'on CPU':>7} {'run queue':>9} {'GIL wait':>8} {'lrctl code':>16}")
    for c in configs:
        deltas = [[c.split[r][j] - base.split[r][j] for r in range(len(c.split))] for j in range(3)]
        total = [(m - b) * 1e3 for m, b in zip(c.means, base.means)]
        own = statistics.median(c.own) - statistics.median(base.own)
        print(f"{c.label:<20} {statistics.median(total):>+7.2f} " + " ".join(
            f"{statistics.median(d):>+{w}.2f}" for d, w in zip(deltas, (7, 9, 8)))
            + f" {own:>7.2f} ({own / base_ms * 100:>4.1f}%)")
    print(f"(base: {base_ms:.2f} ms/step. p99 step: the 99th percentile of single steps, as a ratio to "
          f"base's. req/s: the rate achieved (inline: Sets submitted per second). py us/req: CPU time "
          f"of the server's Python threads per request, all of it under the GIL; C us/req: CPU time "
          f"of gRPC's C threads per request.)")
    for c in configs:
        if c.watchers and c.load_seconds:
            steps_per_s = 1e3 / (statistics.median(c.means) * 1e3)
            print(f"{c.label}: {c.watch_events / c.load_seconds / max(c.watchers, 1):.1f} events/s per "
                  f"stream read (about {steps_per_s:.0f} steps/s)")
        if c.sidecar_cpu and c.sent:
            print(f"{c.label}: the sidecar process used {c.sidecar_cpu / c.sent * 1e6:.0f} us CPU per "
                  "request (py/C us/req above: this process's forwarding thread and the rest)")


def serve_sidecar(args: argparse.Namespace) -> None:
    """The other-process configurations' server: the same model, lrctl attached,
    stepping (without gradients) every 7.5 ms, about the timed loop's step, so that
    changes apply and its WatchMetrics streams get an event (its loss) per step as the
    timed loop's would; until stdin closes."""
    torch.set_num_threads(1)
    model = make_mlp(args.width, args.depth)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    stop = threading.Event()
    with attach(model, opt, address="127.0.0.1:0") as ctl:
        print(ctl.address, flush=True)
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
        while not stop.wait(0.0075):
            ctl.report(1.0)
            opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (CI)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per sample")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps per sample")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--kinds", default="attach,forward", help=f"comma-separated, of {sorted(KINDS)}")
    parser.add_argument("--rates", default="10,100", help="requests per second (comma-separated)")
    parser.add_argument("--echo-rate", type=float, default=100.0,
                        help="also run each kind with a stream of bare health Checks at this rate "
                        "(the floor any handler pays); 0: no such configuration")
    parser.add_argument("--watchers", type=int, default=4,
                        help="also run each kind (but forward) with this many WatchMetrics streams "
                             "read while the loop reports its loss every step, plus 100 requests/s (0: off)")
    parser.add_argument("--watch-method", default="WatchMetricsBatched",
                        choices=("WatchMetricsBatched", "WatchMetrics"),
                        help="the watchers' method: the one LRClient.watch_metrics reads (default), or "
                             "a message per event")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="sys.setswitchinterval for the whole run (default: Python's, 0.005 s)")
    parser.add_argument("--sidecar-rate", type=float, default=100.0,
                        help="also send the mixed stream at this rate to a server in another "
                        "process (what the load costs through the CPU alone, without the GIL); 0: no")
    parser.add_argument("--inline-rate", type=float, default=100.0,
                        help="also run the loop submitting, itself, the Sets of the mixed stream at "
                        "this rate to an idle lrctl (the floor: planning and applying, no serving); 0: no")
    parser.add_argument("--serve-sidecar", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--verbose", action="store_true", help="print every round's ratios")
    args = parser.parse_args()
    if args.serve_sidecar:
        return serve_sidecar(args)
    args.kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(args.kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown server kind(s) {sorted(unknown)}; choose from {sorted(KINDS)}")
    args.rates = [float(r) for r in args.rates.split(",") if r]
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 4, 2
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    n_tensors = 4 * args.depth + 2
    print(f"server load on training: MLP width {args.width}, depth {args.depth} ({n_tensors} tensors), "
          f"batch {args.batch}, AdamW, torch {torch.__version__} on 1 thread, {os.cpu_count()} cores; "
          f"{args.rounds} rounds x {args.steps} steps (+{args.warmup} warm-up) per configuration; "
          f"GIL switch interval {sys.getswitchinterval() * 1e3:g} ms; watchers read {args.watch_method}")
    machine = MachineLoad()
    configs = Bench(args).run()
    report(configs, args)
    print(f"other processes kept {machine.others_cores():.2f} of {os.cpu_count()} cores busy on average "
          "during the run (above ~0.1 the figures are noisy: run it on a quiet machine)")


if __name__ == "__main__":
    main()
