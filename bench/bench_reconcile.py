"""Load and reconciliation (issue 15, "Proof"): N client processes x M mixed requests
against a training worker process, then the history must account for every answer.

The worker is bench/training_worker.py (an MLP under lrctl, stepping every 2 ms, its
history sized so that nothing is dropped). Each client process (multiprocessing,
spawn) sends a seeded mix: reads (all rates, paged rates, paged parameter lists,
status, history pages), waiting and non-waiting absolute Sets and scales on
overlapping selectors (some at a near `at_step`, some batches of two, some that must
be rejected), and, every `--race-every` requests, an `expected_version` race: all
processes meet at a barrier, one reads the version once no change is pending, and
every process sends a waiting Set expecting that version. Each request carries its id
as `reason` and `lrctl-user`, so the history says which request made each change.

Checks, after the clients end and the queue drains:
  history complete      nothing dropped; ListChanges read to its last page
  versions              one record per version, increasing by one, no gaps, ending at
                        GetStatus.version
  acked exactly once    every acknowledged (OK) write is in the history exactly once
  acked values          a waited write's record has the version, step and old -> new
                        (rate and base, per name) its reply gave; a no-wait one the
                        names (and, for absolute sets, the new bases) its reply gave
  no phantom            no applied record without an acknowledged request (none of a
                        rejected or timed-out one)
  failed records        each record of a change that failed at its step (status set)
                        is of a waiting write refused with that status, or of a no-wait
                        write accepted before it failed; it changed nothing
  replay                each record's old values are the previous record's new ones,
                        and replaying all from the initial rates gives GetLearningRates
  training advanced     the worker's step grew over the run (and in every --window
                        seconds when given)
  one winner per race   exactly one OK per expected_version race, at that version + 1

    python bench/bench_reconcile.py                      # 10 processes x 1000 requests
    python bench/bench_reconcile.py --processes 2 --requests 100   # small (the test's size)
    python bench/bench_reconcile.py --quick              # CI smoke
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from training_worker import TrainingWorker  # noqa: E402  (bench/, this script's directory)

WRITE_KINDS = {"set_wait", "set_nowait", "scale_wait", "scale_nowait", "batch", "race", "rejected"}
TIMEOUT_S = 15.0
# Weights of the mix (races come on top, every --race-every requests).
MIX = {
    "get": 10, "get_paged": 6, "list": 4, "status": 6, "history": 6,
    "set_wait": 14, "set_nowait": 14, "scale_wait": 8, "scale_nowait": 8, "batch": 6, "rejected": 4,
}
SELECTORS = [
    "encoder.layers.1.weight", "encoder.layers.1.bias", "encoder.layers.1.*", "encoder.layers.*",
    "encoder.layers.[0-3].weight", "re:weight$", "re:^encoder\\.layers\\.[2-5]\\.", "head.*", "*.bias",
    "head.weight",
]
REJECTED = [  # each must be refused whole: none may reach the history
    ("encoder.norm.*", 1e-3),            # frozen, not in the optimizer: FAILED_PRECONDITION
    ("encoder.layers.1.wieght", 1e-3),   # NOT_FOUND
    ("head.*", float("nan")),            # INVALID_ARGUMENT
    ("re:(", 1e-3),                      # bad regex
]
SCALES = (0.5, 2.0, 0.25, 4.0)  # powers of two: exact in binary


# --- client process ---------------------------------------------------------------------

def _client(idx: int, address: str, requests: int, seed: int, race_every: int,
            barrier: Any, race_version: Any, out_path: str) -> None:
    """One client process: `requests` mixed requests, a log line per request in out_path."""
    import grpc

    from lrctl.v1 import lrctl_pb2 as pb
    from lrctl.v1 import lrctl_pb2_grpc as pb_grpc

    rng = random.Random(seed * 1000 + idx)
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.LearningRateControlStub(channel)
    log: list[dict[str, Any]] = []
    kinds, weights = zip(*MIX.items())

    def changes(reply: Any) -> list[list[Any]]:
        return [[c.name, c.old_lr, c.new_lr, c.old_base, c.new_base] for c in reply.changes]

    def set_request(rid: str, pairs: list[tuple[str, float]], mode: int, wait: bool, **extra: Any) -> Any:
        return pb.SetLearningRatesRequest(
            updates=[pb.LearningRateUpdate(selector=s, mode=mode, value=v) for s, v in pairs],
            wait=wait, reason=rid, **extra)

    def absolute() -> float:
        return rng.choice((1, 2, 5)) * 10.0 ** rng.randint(-5, -2)

    def send(kind: str, rid: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"id": rid, "kind": kind}
        meta = (("lrctl-user", rid),)
        if kind == "get":
            entry["method"] = "GetLearningRates"
            stub.GetLearningRates(pb.GetLearningRatesRequest(), timeout=TIMEOUT_S, metadata=meta)
        elif kind == "get_paged":
            entry["method"] = "GetLearningRates"
            entry["restarts"] = 0
            token = ""
            while True:
                try:
                    page = stub.GetLearningRates(pb.GetLearningRatesRequest(page_size=5, page_token=token),
                                                 timeout=TIMEOUT_S, metadata=meta)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.ABORTED or entry["restarts"] >= 20:
                        raise
                    entry["restarts"] += 1  # a change landed between pages: read again
                    token = ""
                    continue
                token = page.next_page_token
                if not token:
                    break
        elif kind == "list":
            entry["method"] = "ListParameters"
            token = ""
            while True:
                page = stub.ListParameters(pb.ListParametersRequest(page_size=7, page_token=token),
                                           timeout=TIMEOUT_S, metadata=meta)
                token = page.next_page_token
                if not token:
                    break
        elif kind == "status":
            entry["method"] = "GetStatus"
            entry["step"] = stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT_S, metadata=meta).step
        elif kind == "history":
            entry["method"] = "ListChanges"
            page = stub.ListChanges(pb.ListChangesRequest(after_version=rng.randint(0, 200), page_size=50),
                                    timeout=TIMEOUT_S, metadata=meta)
            if page.next_page_token:
                stub.ListChanges(pb.ListChangesRequest(page_token=page.next_page_token, page_size=50),
                                 timeout=TIMEOUT_S, metadata=meta)
        else:
            entry["method"] = "SetLearningRates"
            wait = kind in ("set_wait", "scale_wait", "race")
            extra: dict[str, Any] = {}
            mode = pb.UPDATE_MODE_ABSOLUTE
            if kind in ("scale_wait", "scale_nowait"):
                mode = pb.UPDATE_MODE_SCALE
                pairs = [(rng.choice(SELECTORS), rng.choice(SCALES))]
            elif kind == "batch":  # two disjoint selectors, two values
                pairs = [("encoder.layers.0.*", absolute()), ("head.*", absolute())]
            elif kind == "rejected":
                pairs = [rng.choice(REJECTED)]
            elif kind == "race":
                pairs = [(rng.choice(SELECTORS), absolute())]
                extra["expected_version"] = entry["expected"] = race_version.value
            else:
                pairs = [(rng.choice(SELECTORS), absolute())]
            if not wait and rng.random() < 0.3:
                extra["at_step"] = stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT_S).step + rng.randint(1, 3)
            entry["wait"] = wait
            entry["mode"] = "scale" if mode == pb.UPDATE_MODE_SCALE else "absolute"
            reply = stub.SetLearningRates(set_request(rid, pairs, mode, wait, **extra),
                                          timeout=TIMEOUT_S, metadata=meta)
            entry["reply"] = {"change_id": reply.change_id, "version": reply.version, "step": reply.step,
                              "applied": reply.applied, "changes": changes(reply)}
        return entry

    def timed(kind: str, rid: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            entry = send(kind, rid)
            entry["code"] = "OK"
        except grpc.RpcError as exc:
            entry = {"id": rid, "kind": kind, "method": "SetLearningRates" if kind in WRITE_KINDS else kind,
                     "code": exc.code().name, "details": (exc.details() or "")[:200]}
        entry["ms"] = (time.perf_counter() - t0) * 1e3
        entry["t"] = time.time()
        return entry

    try:
        for i in range(requests):
            rid = f"p{idx}-{i}"
            if race_every and i % race_every == race_every // 2:
                barrier.wait()  # everyone stops writing
                if idx == 0:  # the version once nothing is pending: the race's start
                    for _ in range(int(60 / 0.01)):
                        status = stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT_S)
                        if status.pending_changes == 0:
                            break
                        time.sleep(0.01)
                    race_version.value = stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT_S).version
                barrier.wait()
                entry = timed("race", rid)
                entry["round"] = i // race_every
                log.append(entry)
                barrier.wait()  # the race is over before anyone writes again
                continue
            log.append(timed(rng.choices(kinds, weights)[0], rid))
    except BaseException as exc:
        barrier.abort()  # the others must not wait for us at the next race
        log.append({"id": f"p{idx}-error", "kind": "client-error", "code": "CLIENT_ERROR",
                    "details": repr(exc)[:500], "ms": 0.0, "t": time.time()})
    finally:
        channel.close()
        Path(out_path).write_text(json.dumps(log))


# --- the run and its checks -------------------------------------------------------------

def _stub(address: str):
    import grpc

    from lrctl.v1 import lrctl_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(address)
    return channel, pb_grpc.LearningRateControlStub(channel)


def _read_rates(stub: Any) -> tuple[int, dict[str, tuple[float, float]]]:
    from lrctl.v1 import lrctl_pb2 as pb

    reply = stub.GetLearningRates(pb.GetLearningRatesRequest(), timeout=TIMEOUT_S)
    return reply.version, {r.name: (r.lr, r.base) for r in reply.rates}


def _drain(stub: Any, timeout: float = 120.0) -> None:
    from lrctl.v1 import lrctl_pb2 as pb

    end = time.monotonic() + timeout
    while stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT_S).pending_changes:
        if time.monotonic() > end:
            raise RuntimeError("changes still pending after the clients ended")
        time.sleep(0.05)


def _history(stub: Any) -> tuple[list[Any], int, int]:
    """Every record (all pages), the `dropped` count, and the number of pages read."""
    from lrctl.v1 import lrctl_pb2 as pb

    records, token, pages, dropped = [], "", 0, 0
    while True:
        page = stub.ListChanges(pb.ListChangesRequest(page_size=1000, page_token=token), timeout=60)
        records.extend(page.changes)
        dropped = max(dropped, page.dropped)
        pages += 1
        token = page.next_page_token
        if not token:
            return records, dropped, pages


class Monitor(threading.Thread):
    """Samples the worker's step (GetStatus) every `period` seconds."""

    def __init__(self, stub: Any, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.stub, self.period = stub, period
        self.samples: list[tuple[float, int]] = []
        self.failures = 0
        self._halt = threading.Event()

    def _sample(self) -> None:
        from lrctl.v1 import lrctl_pb2 as pb

        try:
            self.samples.append((time.monotonic(), self.stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT_S).step))
        except Exception:
            self.failures += 1

    def run(self) -> None:
        while not self._halt.is_set():
            self._sample()
            self._halt.wait(self.period)

    def stop(self) -> None:
        """Stop sampling; a last sample closes the run (a short run may have had one)."""
        if self._halt.is_set():
            return
        self._halt.set()
        if self.is_alive():
            self.join(30)
            self._sample()


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def reconcile(log: list[dict[str, Any]], records: list[Any], dropped: int, initial: tuple[int, dict],
              final: tuple[int, dict], final_version: int, races: int) -> dict[str, tuple[bool, str]]:
    """The checks: name -> (passed, detail)."""
    checks: dict[str, tuple[bool, str]] = {}
    version0, rates0 = initial
    acked = {e["id"]: e for e in log if e["kind"] in WRITE_KINDS and e["code"] == "OK"}
    refused = {e["id"]: e for e in log if e["kind"] in WRITE_KINDS and e["code"] != "OK"}
    checks["history complete"] = (dropped == 0, f"{len(records)} records, dropped {dropped}")
    # Changes accepted but failed at their step are recorded too, with their status and
    # the version in force: they are checked apart from the applied ones.
    failed = [r for r in records if r.status]
    records = [r for r in records if not r.status]
    unexplained = []
    for r in failed:
        e = refused.get(r.reason) or acked.get(r.reason)
        if e is None or r.changes or (e["code"] != "OK" and (not e.get("wait", True) or e["code"] != r.status)) \
                or (e["code"] == "OK" and e.get("wait", True)):
            unexplained.append((r.reason, r.status))
    checks["failed records"] = (not unexplained, f"{len(failed)} records of changes that failed at their step"
                                + (f"; unexplained: {unexplained[:3]}" if unexplained else ""))
    accepted_then_failed = {r.reason for r in failed if r.reason in acked}

    versions = [r.version for r in records]
    want = list(range(version0 + 1, final_version + 1))
    checks["versions"] = (versions == want, f"{len(versions)} versions {version0 + 1}..{final_version}"
                          + ("" if versions == want else f"; got {versions[:5]}...{versions[-5:]}"))

    by_reason: dict[str, list[Any]] = defaultdict(list)
    for r in records:
        by_reason[r.reason].append(r)
    missing = [rid for rid in acked if len(by_reason.get(rid, ())) + (rid in accepted_then_failed) != 1]
    checks["acked exactly once"] = (not missing, f"{len(acked)} acknowledged writes"
                                    + (f"; {len(missing)} not exactly once, e.g. {missing[:3]}" if missing else ""))

    wrong = []
    for rid, e in acked.items():
        recs = by_reason.get(rid)
        if rid in accepted_then_failed or not recs or len(recs) != 1:
            continue
        rec, reply = recs[0], e["reply"]
        got = [[c.name, c.old_lr, c.new_lr, c.old_base, c.new_base] for c in rec.changes]
        if rec.change_id != reply["change_id"]:
            wrong.append((rid, "change_id"))
        elif e["wait"]:
            if (rec.version, rec.step) != (reply["version"], reply["step"]) or got != reply["changes"]:
                wrong.append((rid, "values"))
        elif [g[0] for g in got] != [c[0] for c in reply["changes"]]:
            wrong.append((rid, "names"))
        elif e["mode"] == "absolute" and [g[4] for g in got] != [c[4] for c in reply["changes"]]:
            wrong.append((rid, "new bases"))
    checks["acked values"] = (not wrong, f"{len(acked)} checked" + (f"; wrong: {wrong[:5]}" if wrong else ""))

    phantoms = [r.reason for r in records if r.reason not in acked]
    refused_in = [r.reason for r in records if r.reason in refused]
    checks["no phantom"] = (not phantoms, f"{len(refused)} refused or failed writes; "
                            f"{len(phantoms)} records without an acknowledged request"
                            + (f" ({len(refused_in)} of refused ones), e.g. {phantoms[:3]}" if phantoms else ""))

    state = dict(rates0)
    breaks = 0
    for r in records:
        for c in r.changes:
            if state.get(c.name) != (c.old_lr, c.old_base):
                breaks += 1
            state[c.name] = (c.new_lr, c.new_base)
    final_rates = final[1]
    differ = [n for n in final_rates if state.get(n) != final_rates[n]]
    checks["replay"] = (not breaks and not differ,
                        f"{sum(len(r.changes) for r in records)} per-name changes replayed; "
                        f"{breaks} old values not the previous new; {len(differ)} final rates differ")

    rounds: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for e in log:
        if e["kind"] == "race":
            rounds[e["round"]].append(e)
    bad_races = []
    for k, entries in sorted(rounds.items()):
        winners = [e for e in entries if e["code"] == "OK"]
        if len(winners) != 1 or winners[0]["reply"]["version"] != winners[0]["expected"] + 1:
            bad_races.append((k, Counter(e["code"] for e in entries)))
    checks["one winner per race"] = (len(rounds) == races and not bad_races,
                                     f"{len(rounds)} races of {max((len(v) for v in rounds.values()), default=0)}"
                                     + (f"; bad: {bad_races[:3]}" if bad_races else ""))
    return checks


def run(processes: int = 10, requests: int = 1000, seed: int = 0, race_every: int = 100,
        step_delay: float = 0.002, window_s: float | None = 5.0, out: Callable[[str], None] = print) -> bool:
    """The whole benchmark; True when every check passed."""
    history_limit = max(10_000, 2 * processes * requests)
    worker = TrainingWorker("--depth", "8", "--step-delay", str(step_delay), "--history-limit", str(history_limit))
    procs: list[Any] = []
    with worker, tempfile.TemporaryDirectory() as tmp:
        channel, stub = _stub(worker.address)
        monitor = Monitor(stub)
        try:
            initial = _read_rates(stub)
            out(f"worker pid {worker.pid} on {worker.address}: {len(worker.names)} parameters, "
                f"step delay {step_delay * 1e3:.0f} ms, history_limit {history_limit}")
            out(f"{processes} client processes x {requests} requests, races every {race_every}, seed {seed}")
            ctx = mp.get_context("spawn")
            barrier = ctx.Barrier(processes, timeout=300)
            race_version = ctx.Value("q", -1)
            paths = [os.path.join(tmp, f"client{k}.json") for k in range(processes)]
            monitor.start()
            t0 = time.monotonic()
            procs = [ctx.Process(target=_client, args=(k, worker.address, requests, seed, race_every, barrier,
                                                       race_version, paths[k]), daemon=True)
                     for k in range(processes)]
            for p in procs:
                p.start()
            deadline = time.monotonic() + max(600.0, requests * 2.0)
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
            elapsed = time.monotonic() - t0
            hung = [p.pid for p in procs if p.is_alive()]
            if hung:
                raise RuntimeError(f"client processes {hung} did not finish")
            log = [e for path in paths if os.path.exists(path) for e in json.loads(Path(path).read_text())]
            _drain(stub)
            monitor.stop()
            records, dropped, pages = _history(stub)
            final = _read_rates(stub)
            from lrctl.v1 import lrctl_pb2 as pb

            final_version = stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT_S).version
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            monitor.stop()
            channel.close()
        alive = worker.alive()

    clients_failed = [e for e in log if e["kind"] == "client-error"]
    n = len([e for e in log if e["kind"] != "client-error"])
    out(f"\n{n} requests in {elapsed:.1f} s: {n / elapsed:.0f} requests/s "
        f"(history read back: {len(records)} records in {pages} page(s))")
    out(f"\n{'kind':<14}{'method':<18}{'count':>6}{'p50 ms':>9}{'p99 ms':>9}  statuses")
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in log:
        by_kind[e["kind"]].append(e)
    for kind in sorted(by_kind):
        entries = by_kind[kind]
        ms = [e["ms"] for e in entries]
        codes = Counter(e["code"] for e in entries)
        out(f"{kind:<14}{entries[0].get('method', '-'):<18}{len(entries):>6}{_pct(ms, 0.5):>9.1f}"
            f"{_pct(ms, 0.99):>9.1f}  " + ", ".join(f"{c} {k}" for c, k in codes.most_common()))
    firsts: dict[tuple[str, str], str] = {}
    for e in log:
        if e["code"] != "OK" and e["kind"] not in ("rejected", "client-error"):
            firsts.setdefault((e["kind"], e["code"]), e.get("details", ""))
    for (kind, code), text in sorted(firsts.items()):
        out(f"  e.g. {kind} {code}: {text[:110]}")
    restarts = sum(e.get("restarts", 0) for e in log)
    out(f"(get_paged: {restarts} restart(s) after ABORTED, a change between pages)")
    totals = Counter(e["code"] for e in log)
    out("status counts: " + ", ".join(f"{c} {k}" for c, k in totals.most_common()))

    races = sum(1 for i in range(requests) if race_every and i % race_every == race_every // 2)
    checks = reconcile(log, records, dropped, initial, final, final_version, races)
    steps = [s for _, s in monitor.samples]
    advanced = alive and len(steps) >= 2 and steps[-1] > steps[0]
    detail = f"steps {steps[0] if steps else '?'} -> {steps[-1] if steps else '?'}"
    if window_s and advanced:
        stalls = []
        for i, (t, s) in enumerate(monitor.samples):
            later = next((s2 for t2, s2 in monitor.samples[i:] if t2 - t >= window_s), None)
            if later is not None and later <= s:
                stalls.append(round(t - monitor.samples[0][0], 1))
        advanced = not stalls
        detail += f"; advanced in every {window_s:g} s window" if not stalls else f"; stalled at t={stalls[:3]} s"
    checks["training advanced"] = (advanced, detail + ("" if alive else "; the worker died"))
    checks["clients ran"] = (not clients_failed, f"{len(clients_failed)} client process errors"
                             + (f": {clients_failed[0]['details']}" if clients_failed else ""))
    out("")
    for name, (ok, text) in checks.items():
        out(f"{'PASS' if ok else 'FAIL'}  {name:<22}{text}")
    return all(ok for ok, _ in checks.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=10)
    parser.add_argument("--requests", type=int, default=1000, help="per process")
    parser.add_argument("--race-every", type=int, default=100, help="requests between expected_version races")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-delay", type=float, default=0.002, help="worker's seconds between steps")
    parser.add_argument("--window", type=float, default=5.0,
                        help="training must advance in every window of this many seconds (0: overall only)")
    parser.add_argument("--quick", action="store_true", help="CI smoke: 2 processes x 60 requests")
    args = parser.parse_args(argv)
    if args.quick:
        args.processes, args.requests, args.race_every, args.window = 2, 60, 20, 0
    ok = run(args.processes, args.requests, args.seed, args.race_every, args.step_delay, args.window or None)
    print("\nPASS" if ok else "\nFAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
