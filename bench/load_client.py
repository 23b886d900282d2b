"""A client-only load generator for the server benchmarks (3 and 4): a separate process.

It imports grpc and lrctl's generated stubs only (no torch), and is driven by the
benchmark over its stdin/stdout, one JSON object per line:

  {"cmd": "load", "address": A, "rate": R, "seconds": S, "mix": M}
      Open a fresh channel to A, wait until it is ready, then send a mixed stream of
      ListParameters (1 page), GetLearningRates and SetLearningRates (wait=false) at R
      requests per second, open loop: request k is issued at t0 + k/R whether or not
      the earlier ones have been answered. Replies {"started": true} once the stream
      runs; keeps sending until the next command ("stop"), or for S seconds if given.
      With M "echo" the stream is health Checks only: the cost of the bare gRPC server.
      With "watchers": W, W streams of the job's events (from now) are read meanwhile
      too (with rate 0, only they), with the method "watch_method" names: as
      LRClient.watch_metrics reads them, WatchMetricsBatched (the default), or
      WatchMetrics (a message per event).
  {"cmd": "stop"}
      Stop the stream, wait for answers in flight, close the channel, and reply with
      counts per kind, errors, and how late the pacer issued requests.
  {"cmd": "latency", "address": A, "rate": R, "count": N, "warmup": W, "only": K}
      Open a fresh channel and time N rounds (after W untimed ones) of four calls, one
      of each kind in a shuffled order: the health Check (grpc.health.v1.Health/Check,
      the bare echo), GetLearningRates, SetLearningRates (wait=false) and a 1-page
      ListParameters. Blocking calls, paced at R calls per second. Replies with every
      latency in microseconds, per kind. A list K of kinds ("echo", "get", "set",
      "list") restricts the rounds to those (for profiling).
  {"cmd": "quit"}

The mix of the load stream repeats every ten requests: List, Get, Set(all, value A:
the partition stays, so the worker edits group dicts in place), Get(glob), Set(all,
value B), List, Get, Set(the first parameter only: the worker splits a group, i.e.
regroups), Get, Set(all, value A: the groups merge again).

    python bench/load_client.py     # then type commands (the benchmarks do this)
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable

import grpc

from lrctl.v1 import lrctl_pb2 as pb
from lrctl.v1 import lrctl_pb2_grpc as pb_grpc

METADATA = (("lrctl-user", "bench-load-client"),)
TIMEOUT_S = 10.0
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
RATE_A, RATE_B, RATE_SPLIT = 1.0e-4, 2.0e-4, 3.0e-4


def _set(selector: str, value: float) -> pb.SetLearningRatesRequest:
    return pb.SetLearningRatesRequest(
        updates=[pb.LearningRateUpdate(selector=selector, mode=pb.UPDATE_MODE_ABSOLUTE, value=value)],
        wait=False,
        reason="bench load",
        max_reported_changes=1,
    )


class Target:
    """A fresh channel to one worker and the requests the benchmarks send it."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(self.channel).result(timeout=TIMEOUT_S)
        self.stub = pb_grpc.LearningRateControlStub(self.channel)
        # The bare echo: an empty HealthCheckRequest is b"" on the wire (service "").
        self.check = self.channel.unary_unary(
            HEALTH_CHECK, request_serializer=None, response_deserializer=None
        )
        self.list_req = pb.ListParametersRequest()  # one page of the default size
        self.get_all = pb.GetLearningRatesRequest()
        self.get_glob = pb.GetLearningRatesRequest(selectors=["*.weight"])
        # Every call of the latency mode sets the same value, so rates stay put there.
        self.set_latency = _set("*", RATE_A)

    def load_mix(self, mix: str = "mixed") -> list[tuple[str, Callable, Any]]:
        """The ten-request cycle of the load stream: (kind, method, request)."""
        s = self.stub
        if mix == "echo":
            return [("echo", self.check, b"")]
        first = s.ListParameters(pb.ListParametersRequest(page_size=1), timeout=TIMEOUT_S, metadata=METADATA)
        first_name = first.parameters[0].name
        return [
            ("list", s.ListParameters, self.list_req),
            ("get", s.GetLearningRates, self.get_all),
            ("set", s.SetLearningRates, _set("*", RATE_A)),
            ("get", s.GetLearningRates, self.get_glob),
            ("set", s.SetLearningRates, _set("*", RATE_B)),
            ("list", s.ListParameters, self.list_req),
            ("get", s.GetLearningRates, self.get_all),
            ("set-regroup", s.SetLearningRates, _set(first_name, RATE_SPLIT)),
            ("get", s.GetLearningRates, self.get_all),
            ("set-regroup", s.SetLearningRates, _set("*", RATE_A)),
        ]

    def latency_calls(self) -> dict[str, Callable[[], Any]]:
        s, md, t = self.stub, METADATA, TIMEOUT_S
        return {
            "echo": lambda: self.check(b"", timeout=t, metadata=md),
            "get": lambda: s.GetLearningRates(self.get_all, timeout=t, metadata=md),
            "set": lambda: s.SetLearningRates(self.set_latency, timeout=t, metadata=md),
            "list": lambda: s.ListParameters(self.list_req, timeout=t, metadata=md),
        }

    def close(self) -> None:
        self.channel.close()


class Watchers:
    """W streams of the job's events, each read on a thread of its own, until stop()."""

    def __init__(self, target: Target, count: int, method: str = "WatchMetricsBatched") -> None:
        if method not in ("WatchMetrics", "WatchMetricsBatched"):
            raise ValueError(f"watch_method {method!r}")
        self.batched = method == "WatchMetricsBatched"
        self.calls = [getattr(target.stub, method)(pb.WatchMetricsRequest(), metadata=METADATA)
                      for _ in range(count)]
        self.events = [0] * count
        self.dropped = 0
        self.threads = [threading.Thread(target=self._read, args=(k,), daemon=True) for k in range(count)]
        for thread in self.threads:
            thread.start()

    def _read(self, k: int) -> None:
        try:
            for message in self.calls[k]:
                for event in message.events if self.batched else (message,):
                    self.events[k] += 1
                    self.dropped += event.dropped
        except grpc.RpcError:
            pass  # cancelled by stop()

    def stop(self) -> dict[str, Any]:
        for call in self.calls:
            call.cancel()
        for thread in self.threads:
            thread.join(10)
        return {"watch_events": self.events, "watch_dropped": self.dropped}


class LoadStream:
    """Open-loop pacing on a thread: issue request k at t0 + k/rate with .future()."""

    def __init__(self, target: Target, rate: float, seconds: float | None, mix: str = "mixed") -> None:
        self.target, self.rate, self.seconds, self.mix = target, rate, seconds, mix
        self.sent: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.error_examples: list[str] = []
        self.late_s: list[float] = []
        self.failure = ""
        self._inflight: list[grpc.Future] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pacer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _done(self, kind: str) -> Callable[[grpc.Future], None]:
        def callback(future: grpc.Future) -> None:
            exc = future.exception()
            if exc is not None:
                with self._lock:
                    self.errors[kind] += 1
                    if len(self.error_examples) < 5:
                        self.error_examples.append(f"{kind}: {exc.code()} {exc.details()}")

        return callback

    def _run(self) -> None:
        try:
            self._pace()
        except Exception as exc:  # reported by stop()
            self.failure = f"{type(exc).__name__}: {exc}"

    def _pace(self) -> None:
        mix = self.target.load_mix(self.mix)
        interval = 1.0 / self.rate
        t0 = time.perf_counter()
        k = 0
        while not self._stop.is_set():
            due = t0 + k * interval
            if self.seconds is not None and due - t0 >= self.seconds:
                break
            delay = due - time.perf_counter()
            if delay > 0 and self._stop.wait(delay):
                break
            self.late_s.append(max(0.0, time.perf_counter() - due))
            kind, method, request = mix[k % len(mix)]
            future = method.future(request, timeout=TIMEOUT_S, metadata=METADATA)
            future.add_done_callback(self._done(kind))
            self.sent[kind] += 1
            self._inflight = [f for f in self._inflight if not f.done()]
            self._inflight.append(future)
            k += 1

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        for future in list(self._inflight):
            try:
                future.result()
            except grpc.RpcError:
                pass
        late = sorted(self.late_s) or [0.0]
        return {
            "sent": dict(self.sent),
            "errors": dict(self.errors),
            "error_examples": self.error_examples,
            "failure": self.failure,
            "late_p50_ms": late[len(late) // 2] * 1e3,
            "late_max_ms": late[-1] * 1e3,
        }


def measure_latency(target: Target, rate: float, count: int, warmup: int, seed: int = 0,
                    only: list[str] | None = None) -> dict[str, list[float]]:
    """Latencies (us) of `count` shuffled rounds of the four calls, paced at `rate` calls/s."""
    calls = target.latency_calls()
    kinds = [k for k in calls if not only or k in only]
    rng = random.Random(seed)
    out: dict[str, list[float]] = {k: [] for k in kinds}
    errors: Counter[str] = Counter()
    interval = 1.0 / rate
    t0 = time.perf_counter()
    k = 0
    for r in range(warmup + count):
        order = kinds[:]
        rng.shuffle(order)
        for kind in order:
            delay = t0 + k * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            k += 1
            start = time.perf_counter()
            try:
                calls[kind]()
            except grpc.RpcError:
                errors[kind] += 1
                continue
            elapsed = (time.perf_counter() - start) * 1e6
            if r >= warmup:
                out[kind].append(elapsed)
    return {"latency_us": out, "errors": dict(errors)}  # type: ignore[return-value]


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    target: Target | None = None
    stream: LoadStream | None = None
    watchers: Watchers | None = None
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        cmd = msg["cmd"]
        try:
            if cmd == "load":
                target = Target(msg["address"])
                watchers = Watchers(target, int(msg.get("watchers", 0)),
                                    msg.get("watch_method", "WatchMetricsBatched"))
                if float(msg["rate"]) > 0:  # rate 0: the watchers only
                    stream = LoadStream(target, float(msg["rate"]), msg.get("seconds"), msg.get("mix", "mixed"))
                    stream.start()
                reply({"started": True})
            elif cmd == "stop":
                stats = stream.stop() if stream is not None else {}
                if watchers is not None:
                    stats.update(watchers.stop())
                watchers = None
                if target is not None:
                    target.close()
                stream = target = None
                reply(stats)
            elif cmd == "latency":
                target = Target(msg["address"])
                result = measure_latency(
                    target, float(msg["rate"]), int(msg["count"]), int(msg.get("warmup", 20)),
                    int(msg.get("seed", 0)), msg.get("only"),
                )
                target.close()
                target = None
                reply(result)
            elif cmd == "quit":
                break
            else:
                reply({"error": f"unknown command {cmd!r}"})
        except Exception as exc:  # report to the benchmark instead of dying silently
            reply({"error": f"{type(exc).__name__}: {exc}"})
    if stream is not None:
        stream.stop()


if __name__ == "__main__":
    main()
