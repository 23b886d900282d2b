"""Benchmark 5: lrctl on a model with 100,000 parameter tensors.

The worker (this process) builds a model of tiny tensors named ``blocks.{i}.{j}.weight``
/ ``.bias`` (100 blocks), attaches lrctl, serves on 127.0.0.1:0 and steps in a
background loop (gradients are None, so a step is the optimizer's own per-parameter
loop plus lrctl's hook). A client in a separate process (LRClient, real gRPC) then:

  (a) lists every name through pagination (the names view; default page size, and
      5000), then every field of every parameter (the full view, for context);
  (b) sends Sets with wait=true that match all names (``re:^blocks\\.``, ``re:.*``,
      a scale) and times send -> acknowledged apply;
  (c) triggers regrouping: a Set that splits the names into 100 distinct rates
      (``blocks.{i}.*``), one that re-rates those groups in place, one that merges
      them back. The worker times lrctl's step pre-hook at the step each change
      applied at (a pre-hook registered before lrctl's and one after it);
  and reads GetStatus and GetLearningRates of all names (time and message size
      against gRPC's default 4 MiB receive limit).
  (d) Before serving, tracemalloc measures what attach() and a few changes allocate
      (Python objects: lrctl's tables, the rebuilt param_groups, history records);
      tensor storage is not allocated by Python and is not counted.

Targets: (a), (b), (c) each under 1 second. Every time is a measurement on this machine
(2 cores, shared), not a ratio; the worker's own step time is printed for context.

    python bench/bench_scale.py            # 100,000 tensors
    python bench/bench_scale.py --quick    # a smoke run (CI): 5,000 tensors
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from typing import Any

from submit_timing import record_submits

GRPC_DEFAULT_MAX_RECEIVE = 4 * 1024 * 1024
BLOCKS = 100


# -- the client process (no torch) -----------------------------------------------------
def _client_main(address: str, n_params: int, repeats: int, prefix: str) -> None:
    from lrctl.client.client import LRClient
    from lrctl.client.errors import LrctlError
    from lrctl.client.types import Update
    from lrctl.v1 import lrctl_pb2, lrctl_pb2_grpc

    import grpc

    out: dict[str, Any] = {"reads": {}, "sets": []}

    def timed(fn, n=repeats):
        times, result = [], None
        for _ in range(n):
            t0 = time.monotonic()
            result = fn()
            times.append(time.monotonic() - t0)
        return times, result

    with LRClient(address, timeout=120) as client:
        client.wait_until_ready(30)
        client.status()  # connect and warm up

        times, status = timed(client.status, max(repeats, 5))
        out["reads"]["GetStatus"] = {"times": times, "bytes": None}
        assert status.num_parameters == n_params, status

        # (a) the names (the target), then every field of every parameter (for context).
        for page_size in (0, 5000):
            times, names = timed(lambda: client.list_names(page_size=page_size))
            assert len(names) == n_params and len(set(names)) == n_params
            out["reads"][f"ListParameters names view, all pages, page_size {page_size or 'default (1000)'}"] = {
                "times": times, "pages": -(-n_params // (page_size or 1000)), "target": True}
        del names
        for page_size in (0, 5000):
            times, params = timed(lambda: client.list_parameters(page_size=page_size))
            assert len(params) == n_params
            out["reads"][f"ListParameters full view, all pages, page_size {page_size or 'default (1000)'}"] = {
                "times": times, "pages": -(-n_params // (page_size or 1000))}
        del params

        # Where the time goes: the RPCs alone (worker + transport + parsing the bytes),
        # then LRClient's conversion of the messages into ParameterInfo objects.
        from lrctl.client.types import ParameterInfo

        stub = lrctl_pb2_grpc.LearningRateControlStub(grpc.insecure_channel(address))

        def raw_pages() -> list:
            pages, token = [], ""
            while True:
                reply = stub.ListParameters(
                    lrctl_pb2.ListParametersRequest(page_size=5000, page_token=token), timeout=120)
                pages.append(reply)
                token = reply.next_page_token
                if not token:
                    return pages

        times, pages = timed(raw_pages)
        out["reads"]["  of which the RPCs (raw stub, full view, page_size 5000)"] = {"times": times}
        messages = [m for page in pages for m in page.parameters]
        times, _ = timed(lambda: [ParameterInfo.from_proto(m) for m in messages])
        out["reads"]["  of which LRClient's ParameterInfo.from_proto"] = {"times": times}
        del pages, messages

        try:
            times, rates = timed(lambda: client.read_learning_rates())
            assert len(rates.rates) == n_params
            del rates
            error = None
        except LrctlError as exc:  # e.g. RESOURCE_EXHAUSTED: over the 4 MiB receive limit
            times, error = [math.nan], f"{type(exc).__name__}: {exc}"
        # The wire size of that reply, read through a raw stub with no receive limit.
        with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)]) as ch:
            raw = lrctl_pb2_grpc.LearningRateControlStub(ch).GetLearningRates(
                lrctl_pb2.GetLearningRatesRequest(), timeout=120)
            size = raw.ByteSize()
            names = [r.name for r in raw.rates]
            out["mean_name_length"] = sum(map(len, names)) / len(names)
            del raw, names
        out["reads"]["GetLearningRates, all names"] = {"times": times, "bytes": size, "error": error}
        times, rates = timed(lambda: client.read_learning_rates(page_size=20_000))
        assert len(rates.rates) == n_params
        del rates
        out["reads"]["GetLearningRates, all names, page_size 20000"] = {
            "times": times, "note": f"{-(-n_params // 20_000)} pages, each under 1 MB"}

        def send(label: str, updates, **kw) -> None:
            t0 = time.monotonic()
            try:
                result = client.set_learning_rates(updates, wait=True, reason=label, **kw)
            except LrctlError as exc:  # reported as a failure, the run goes on
                out["sets"].append({"label": label, "sent": t0, "acked": time.monotonic(),
                                    "error": f"{type(exc).__name__}: {exc}"})
                return
            t1 = time.monotonic()
            out["sets"].append({"label": label, "sent": t0, "acked": t1, "step": result.step,
                                "num_changes": result.num_changes, "version": result.version})

        base = 0.01
        all_re = "re:^" + re.escape(prefix + "blocks.")
        def split(k: int) -> dict[str, float]:
            return {f"{prefix}blocks.{i}.*": base * (1 + i) / (k + 1) for i in range(BLOCKS)}

        send("(b) all, re:^blocks\\. (first use)", {all_re: 0.02})
        send("(b) all, re:.* (first use)", {"re:.*": 0.025})
        engine_re = "re:^" + re.escape(prefix + "blocks.") + "[0-9]+\\."
        send("(b) all, re:^blocks\\.[0-9]+\\. (first use)", {engine_re: 0.026})
        for r in range(repeats):
            send("(b) all, re:^blocks\\. (cached)", {all_re: 0.03 + r * 1e-3})
            send("(b) scale all x0.5, re:^blocks\\.", [Update(all_re, 0.5, "scale")])
            send("(c) split into 100 rates (regroup)", split(2 * r))
            send("(c) re-rate the 100 groups (in place)", split(2 * r + 1))
            send("(c) merge back into 1 rate (regroup)", {all_re: 0.01})
    print(json.dumps(out))


# -- the worker (this process) ---------------------------------------------------------
def make_model(n_params: int, prefix: str = ""):
    """BLOCKS blocks of leaves, each leaf a 4-element weight and a 1-element bias.

    `prefix` ("model.encoder.") nests the blocks under modules of those names.
    """
    import torch
    from torch import nn

    class Leaf(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4))
            self.bias = nn.Parameter(torch.zeros(1))

    per_block = n_params // BLOCKS // 2
    root = model = nn.Module()
    for part in filter(None, prefix.split(".")):
        model.add_module(part, nn.Module())
        model = getattr(model, part)
    model.blocks = nn.ModuleList(nn.ModuleList(Leaf() for _ in range(per_block)) for _ in range(BLOCKS))
    return root


def make_optimizer(name: str, model):
    import torch

    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=0.01)


def _split_request(scale_index: int, prefix: str):
    from lrctl.server.requests import ChangeRequest, Update

    return ChangeRequest(tuple(Update(f"{prefix}blocks.{i}.*", 0.01 * (1 + i) / (scale_index + 1))
                               for i in range(BLOCKS)), reason="bench")


def measure_memory(model, opt_name: str, prefix: str) -> dict[str, float]:
    """Bytes that attach() and then a few changes allocate, by tracemalloc."""
    from lrctl.server import attach
    from lrctl.server.requests import ChangeRequest, Update

    opt = make_optimizer(opt_name, model)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    ctl = attach(model, opt, serve=False)
    gc.collect()
    after_attach = tracemalloc.take_snapshot()
    all_re = "re:^" + re.escape(prefix + "blocks.")
    changes = [ChangeRequest((Update(all_re, 0.02),), reason="bench"),  # in place
               _split_request(0, prefix),                              # 1 -> 100 groups
               _split_request(1, prefix),                              # in place
               ChangeRequest((Update(all_re, 0.01),), reason="bench")]  # 100 -> 1
    for request in changes:
        pending = ctl.controller.submit(request)[0]
        opt.step()
        assert pending.error is None, pending.error
        del pending
    gc.collect()
    after_changes = tracemalloc.take_snapshot()
    tracemalloc.stop()
    ctl.close()

    def total(a, b) -> int:
        return sum(s.size_diff for s in b.compare_to(a, "filename"))

    def lrctl_only(a, b) -> int:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return sum(s.size_diff for s in b.compare_to(a, "filename")
                   if s.traceback[0].filename.startswith(root))

    return {
        "attach": total(before, after_attach),
        "attach_lrctl_files": lrctl_only(before, after_attach),
        "changes": total(after_attach, after_changes),
        "history_records": len(changes),
        "n": len(list(model.parameters())),
    }


class StepTimer:
    """A step pre-hook before lrctl's and one after it: lrctl's hook time, per step."""

    def __init__(self, opt) -> None:
        self.starts: list[float] = []
        self.lrctl_done: list[float] = []
        self.ends: list[float] = []
        self._first = opt.register_step_pre_hook(lambda *a: self.starts.append(time.monotonic()))

    def after_attach(self, opt) -> None:
        self._second = opt.register_step_pre_hook(lambda *a: self.lrctl_done.append(time.monotonic()))
        self._post = opt.register_step_post_hook(lambda *a: self.ends.append(time.monotonic()))

    def hook_s(self, step: int) -> float:
        return self.lrctl_done[step] - self.starts[step]

    def step_s(self, step: int) -> float:
        return self.ends[step] - self.starts[step]


def serve_and_measure(model, args) -> tuple[dict, StepTimer, list[tuple[float, float]], float]:
    from lrctl.server import attach

    opt = make_optimizer(args.optimizer, model)
    timer = StepTimer(opt)
    ctl = attach(model, opt, address="127.0.0.1:0")
    timer.after_attach(opt)

    # Record when the service's submit (selector resolution + validation) runs.
    controller = ctl.controller
    submits = record_submits(controller)

    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            while not stop.is_set():
                opt.step()
                stop.wait(args.period)
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=loop, name="bench-stepping", daemon=True)
    thread.start()
    try:
        cmd = [sys.executable, os.path.abspath(__file__), "--client", ctl.address,
               "--params", str(args.params), "--repeats", str(args.repeats), "--prefix", args.prefix]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"client process failed with exit code {proc.returncode}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        stop.set()
        thread.join(60)
        ctl.close()
    if errors:
        raise SystemExit(f"the training loop died: {errors!r}")
    applied = {s["step"] for s in result["sets"] if "step" in s}
    idle = [timer.step_s(k) for k in range(len(timer.ends)) if k not in applied]
    return result, timer, submits, statistics.median(idle)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.1f}"


def report(result: dict, timer: StepTimer, submits, idle_step_s: float, memory: dict, args) -> None:
    n = args.params
    print(f"\nreads through LRClient (separate process), {args.repeats} run(s) each: median [min, max] ms")
    print(f"{'call':<64} {'median':>8} {'min':>8} {'max':>8}  message / target")
    for label, r in result["reads"].items():
        t = r["times"]
        note = ""
        if r.get("target"):
            note = f"{r['pages']} pages; target < 1000 ms " + ("MET" if max(t) < 1 else "MISSED")
        elif "pages" in r:
            note = f"{r['pages']} pages (every field; no target)"
        elif r.get("note"):
            note = r["note"]
        elif r.get("bytes"):
            b = r["bytes"]
            per_name = b / n
            longest = GRPC_DEFAULT_MAX_RECEIVE / n - (per_name - result["mean_name_length"])
            note = (f"{b:,} bytes = {b / GRPC_DEFAULT_MAX_RECEIVE:.0%} of the 4 MiB default limit "
                    f"({per_name:.1f} bytes a name, names avg {result['mean_name_length']:.1f} chars: "
                    f"over the limit once names average > {longest:.0f} chars; page it)")
            if r.get("error"):
                note += f"; LRClient FAILED: {r['error'][:200]}"

        print(f"{label:<64} {_ms(statistics.median(t))} {_ms(min(t))} {_ms(max(t))}  {note}")

    print(f"\nSets with wait=true (separate process), each on all {n:,} names; times in ms")
    print("  total = client send -> acknowledged apply; resolve = the worker's submit (selectors,")
    print("  validation, queueing); wait = submit done -> the step began; hook = lrctl's step")
    print("  pre-hook at that step (applying, and regrouping when the partition changes);")
    print("  reply = hook done -> the client has the answer")
    print(f"{'set':<42} {'total':>8} {'resolve':>8} {'wait':>8} {'hook':>8} {'reply':>8}  target")
    by_label: dict[str, list[dict]] = {}
    failures: list[dict] = []
    for s, (sub0, sub1) in zip(result["sets"], submits):
        if "error" in s:
            failures.append(dict(s, resolve=sub1 - sub0))
            continue
        step = s["step"]
        # A hook that began while submit held the controller's lock waited for it: count
        # the hook from when it could run (the time it was blocked shows as negative wait).
        s = dict(s, resolve=sub1 - sub0, wait=timer.starts[step] - sub1,
                 hook=timer.lrctl_done[step] - max(timer.starts[step], sub1),
                 reply=s["acked"] - timer.lrctl_done[step], total=s["acked"] - s["sent"])
        by_label.setdefault(s["label"], []).append(s)
    for label, rows in by_label.items():
        med = {k: statistics.median(r[k] for r in rows) for k in ("total", "resolve", "wait", "hook", "reply")}
        worst_total = max(r["total"] for r in rows)
        worst_hook = max(r["hook"] for r in rows)
        if label.startswith("(b)"):
            verdict = "(b) < 1000 ms: " + ("MET" if worst_total < 1 else "MISSED")
        else:
            verdict = "(c) hook < 1000 ms: " + ("MET" if worst_hook < 1 else "MISSED")
        runs = f" x{len(rows)}" if len(rows) > 1 else ""
        print(f"{label + runs:<42} {_ms(med['total'])} {_ms(med['resolve'])} {_ms(med['wait'])} "
              f"{_ms(med['hook'])} {_ms(med['reply'])}  {verdict}")
    for f in failures:
        print(f"{f['label']:<42} FAILED after {(f['acked'] - f['sent']) * 1e3:.0f} ms "
              f"(submit {f['resolve'] * 1e3:.0f} ms): {f['error'][:160]}")
    print(f"(medians over the runs; the worker's step without a change: {idle_step_s * 1e3:.1f} ms, "
          f"loop period +{args.period * 1e3:.0f} ms sleep)")

    m = memory
    print(f"\n(d) memory (tracemalloc, Python allocations; tensors not included), {m['n']:,} tensors")
    print(f"{'what':<56} {'bytes':>12} {'per parameter':>14}")
    print(f"{'attach() (controller, name index, groups)':<56} {m['attach']:>12,} {m['attach'] / m['n']:>14.1f}")
    print(f"{'  of which allocated in lrctl source files':<56} {m['attach_lrctl_files']:>12,} "
          f"{m['attach_lrctl_files'] / m['n']:>14.1f}")
    label = f"then {m['history_records']} changes on all names (in history)"
    print(f"{label:<56} {m['changes']:>12,} {m['changes'] / m['n']:>14.1f}")
    print(f"  (a history record keeps 5 arrays, index, old/new rate, old/new base: 40 bytes per "
          f"name it changed, {40 * m['n'] / 1e6:.1f} MB for all names, 72 with pins and schedules;")
    print("   the history keeps at most 10 million such entries, ~400 MB, however many records)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (CI): 5,000 tensors, 1 repeat")
    parser.add_argument("--params", type=int, default=100_000, help="parameter tensors (default 100000)")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each timed call")
    parser.add_argument("--period", type=float, default=0.02, help="sleep between steps (s)")
    parser.add_argument("--prefix", default="", help="prefix of every name, e.g. 'model.encoder.'")
    parser.add_argument("--client", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        _client_main(args.client, args.params, args.repeats, args.prefix)
        return
    if args.quick:
        args.params, args.repeats = 5_000, 1
    args.params = args.params // (2 * BLOCKS) * 2 * BLOCKS

    import torch

    torch.set_num_threads(1)
    t0 = time.monotonic()
    model = make_model(args.params, args.prefix)
    print(f"bench_scale: {args.params:,} parameter tensors in {BLOCKS} blocks "
          f"('{args.prefix}blocks.{{i}}.{{j}}.weight|bias'), {args.optimizer}, torch {torch.__version__}, "
          f"{os.cpu_count()} cpu(s); model built in {time.monotonic() - t0:.1f} s")
    memory = measure_memory(model, args.optimizer, args.prefix)
    result, timer, submits, idle = serve_and_measure(model, args)
    report(result, timer, submits, idle, memory, args)


if __name__ == "__main__":
    main()
