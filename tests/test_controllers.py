"""The controller API (lrctl.client.control_loop) and the example controllers.

Real parts only: example controllers run as processes against a real bench worker
(task_worker digits, a few dozen steps), the API against a real served optimizer
trained on a background thread. No timing assertions.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

from conftest import PATIENCE_S, Served, Trainer, per_parameter_optimizer, seed_model
from lrctl.client.client import LRClient
from lrctl.client.control_loop import Action, BlowUpGuard, ConflictError, ControlLoop, Window
from lrctl.client.errors import InvalidArgumentError, PermissionDeniedError
from lrctl.client.types import MetricsEvent
from lrctl.server import attach
from lrctl.server.auth import ADMIN, READER, Token, Tokens

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "bench" / "task_worker.py"
EXAMPLES = ROOT / "examples" / "controllers"
ADMIN_SECRET = "admin-secret-0123456789"
READER_SECRET = "reader-secret-0123456789"


# -- a real bench worker and an example controller, as processes --------------------------

class Worker:
    """bench/task_worker.py digits, waiting for a start file, serving after the end."""

    def __init__(self, tmp: Path, peak_lr: float, steps: int, hold: float = 60.0,
                 env: Optional[dict[str, str]] = None) -> None:
        self.start_file = str(tmp / "go")
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), "--task", "digits", "--peak-lr", str(peak_lr), "--steps", str(steps),
             "--seed", "100", "--stats-every", "1", "--eval-every", str(steps),
             "--start-file", self.start_file, "--start-timeout", "120", "--hold-at-end", str(hold)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})})
        self.serving = json.loads(self.proc.stdout.readline())
        self.address = self.serving["address"]

    def result(self) -> dict[str, Any]:
        """The result line (training is over; the worker still serves for `hold` s)."""
        for line in self.proc.stdout:
            if '"event": "result"' in line:
                return json.loads(line)
        raise AssertionError(f"the worker ended without a result (exit {self.proc.wait()})")

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(PATIENCE_S)
        self.proc.stdout.close()


def start_controller(name: str, worker: Worker, *extra: str,
                     env: Optional[dict[str, str]] = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--address", worker.address,
         "--start-file", worker.start_file, *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})})


def wait_for_exit(ctl: subprocess.Popen) -> str:
    """The controller's stderr once it exited; if it does not, every thread's stack
    (faulthandler, on SIGABRT) in the failure, so that a hang says where it hangs."""
    try:
        return ctl.communicate(timeout=PATIENCE_S)[1]
    except subprocess.TimeoutExpired:
        ctl.send_signal(signal.SIGABRT)
        err = ctl.communicate(timeout=PATIENCE_S)[1]
        raise AssertionError(f"the controller did not exit within {PATIENCE_S:g}s; "
                             f"its stderr ends:\n{err[-8000:]}") from None


def run_example(tmp: Path, name: str, peak_lr: float, steps: int = 40,
                *extra: str) -> tuple[dict[str, Any], list[Any], list[Any], list[str], int]:
    """Worker + controller to the end: (result, history, schedules, controller lines, exit)."""
    worker = Worker(tmp, peak_lr, steps)
    try:
        ctl = start_controller(name, worker, "--every", "5", *extra)
        result = worker.result()
        with LRClient(worker.address) as client:
            history = list(client.iter_changes())
            schedules = client.get_schedules()
        worker.end()
        err = wait_for_exit(ctl)
        return result, history, schedules, err.splitlines(), ctl.returncode
    finally:
        worker.end()


def by_controller(history: list[Any], name: str) -> list[Any]:
    return [r for r in history if r.reason.startswith(f"{name}:") and not r.failed]


def test_layerwise_dog_pins_each_name_at_its_own_dog_rate(tmp_path: Path) -> None:
    result, history, schedules, lines, code = run_example(tmp_path, "layerwise_dog", 0.2, 40,
                                                          "--lockstep-timeout", "20")
    assert code == 0, lines
    assert result["steps"] == 40 and not result["diverged"]
    mine = by_controller(history, "layerwise_dog")
    assert mine, lines
    assert all(r.step % 5 == 0 for r in mine)  # lockstep: each lands at its held step
    last = {c.name: c.new_pin for c in mine[-1].changes}
    pins = {s.name: s.pin for s in schedules}
    assert len(pins) == 6 and all(p is not None and p > 0 for p in pins.values())
    # Layer-wise: each name its own rate; none is the starting rate any more.
    assert len({round(p, 12) for p in pins.values()}) > 1
    assert all(abs(p - 0.2) > 1e-9 for p in pins.values())
    assert {n: pins[n] for n in last} == pytest.approx(last)
    assert any(line.startswith("layerwise_dog: step") for line in lines)
    assert "layerwise_dog: done" in lines[-1]


def test_hypergradient_multiplies_bases_and_keeps_the_schedule(tmp_path: Path) -> None:
    result, history, schedules, lines, code = run_example(tmp_path, "hypergradient", 0.5, 60,
                                                          "--lockstep-timeout", "20")
    assert code == 0, lines
    mine = by_controller(history, "hypergradient")
    assert mine, lines
    bases = {s.name: s.base for s in schedules}
    assert any(abs(b - 0.5) > 1e-9 for b in bases.values())  # moved from the start
    # The worker's warmup + cosine is still every name's schedule: only bases moved.
    assert all(s.schedule is not None and s.schedule.to_dict()["kind"] == "warmup" for s in schedules)
    assert all(c.new_pin is None for r in mine for c in r.changes)


def test_plateau_cuts_every_layer_at_a_blow_up(tmp_path: Path) -> None:
    # 10x the swept best with a 1-step warmup (60 steps): the loss jumps at once. In
    # lockstep: a 60-step job can end before a controller that does not hold it decides
    # (seen once on a loaded machine).
    result, history, schedules, lines, code = run_example(tmp_path, "plateau", 2.15, 60,
                                                          "--lockstep-timeout", "20")
    assert code == 0, lines
    mine = by_controller(history, "plateau")
    assert any("blow-up" in r.reason for r in mine), lines
    assert all(s.base < 2.15 for s in schedules)



def test_probe_warmup_ramps_from_step_0_then_decays_from_the_peak_it_found(tmp_path: Path) -> None:
    # The job's own schedule is queued for step 0 too: the ramp, decided at the hold of
    # step 0, must land at step 0 after it (the turn's version counts it), not fail.
    result, history, schedules, lines, code = run_example(tmp_path, "probe_warmup", 0.2, 60,
                                                          "--lockstep-timeout", "20")
    assert code == 0, lines
    mine = by_controller(history, "probe_warmup")
    assert mine and mine[0].step == 0 and "ramp from 0.002" in mine[0].reason, lines
    assert not any(r.failed for r in history), [r.error for r in history if r.failed]
    ramp = mine[0].schedules[0].schedule.to_dict()
    assert ramp["kind"] == "exponential" and ramp["gamma"] > 1
    peak = next(r for r in mine if "peak" in r.reason)
    assert peak.step > 0 and peak.step % 5 == 0
    decay = {s.name: s.schedule.to_dict() for s in schedules}
    assert len(decay) == 6
    for d in decay.values():
        # The job's cosine to 0.1x, restarted at the step the peak was set, ending with the job.
        assert d["kind"] == "warmup" and d["decay"] == "cosine" and d["final_factor"] == 0.1
        assert d["start_step"] + d["total_steps"] == 60
    assert "probe_warmup: done" in lines[-1]

def test_ratio_warmup_probes_at_step_0_then_sets_the_same_peak_from_a_tenth_and_ten_times(tmp_path: Path) -> None:
    # 100 steps: the job's warmup is 5 steps. The controller holds every step until
    # the decision at step 5 freezes the base (step 0's statistics come at step 2's
    # hold), then every 5th.
    frozen = []
    for peak in (0.02, 2.0):
        tmp = tmp_path / str(peak)
        tmp.mkdir()
        result, history, schedules, lines, code = run_example(tmp, "ratio_warmup", peak, 100,
                                                              "--lockstep-timeout", "20")
        assert code == 0, lines
        assert not any(r.failed for r in history), [r.error for r in history if r.failed]
        mine = by_controller(history, "ratio_warmup")
        assert [r.step for r in mine] == [0, 2, 3, 4, 5], lines
        probe, peak_set = mine[0].updates[0].value, mine[-1].updates[0].value
        assert probe == pytest.approx(1e-3 * peak)
        assert "end of warmup" in mine[-1].reason
        assert any("deciding every 5 step(s) from now on (was 1)" in line for line in lines), lines
        # The job's own warmup + cosine still shapes every step: the worker ran the
        # frozen base times its factor, exactly.
        shape = {s.name: s.schedule for s in schedules}[result["rate_name"]]
        assert shape.to_dict()["kind"] == "warmup"
        for step in (5, 50, 99):
            assert result["rates"][step] == pytest.approx(peak_set * shape.factor(step), rel=1e-5)
        assert math.isfinite(result["final_val_loss"])
        frozen.append(peak_set)
    # What the probe measured does not depend on the start (SGD moves in proportion to
    # the rate), so a 100x apart start ends at the same peak.
    assert frozen[0] == pytest.approx(frozen[1], rel=0.1), frozen


def test_blow_up_guard_judges_recovery_from_the_blow_up_not_from_the_best_before_it() -> None:
    def window(*losses: float) -> Window:
        return Window(step=0, version=0, events=[MetricsEvent(i, 0.0, 0, {"loss": x}) for i, x in enumerate(losses)])

    guard = BlowUpGuard(jump=0.25)
    assert guard.check(Window(step=0, version=0, events=[])) is None  # no loss reported: no verdict
    assert guard.check(window(2.0, 1.0)) is None  # first loss 2.0: a jump is 0.5 above the best
    assert guard.check(window(1.4, 1.4)) is None  # 1.4 <= 1.5 (best 1.5 so far)
    assert guard.check(window(1.0, 1.0)) is None
    assert guard.check(window(1.6, 1.6)) == "loss 1.6 vs best 1: blow-up"
    assert guard.check(window(1.3, 1.3)) is None  # on the way down from 1.6: not another one
    assert guard.check(window(math.nan)) == "loss nan vs best 1.3: blow-up"
    assert guard.check(window(1.2)) is None  # a NaN does not move the best


def test_a_controller_killed_under_lockstep_does_not_stop_training(tmp_path: Path) -> None:
    worker = Worker(tmp_path, 0.2, 400, hold=0)
    try:
        ctl = start_controller("layerwise_dog", worker, "--every", "5", "--lockstep-timeout", "60")
        # Once it decided at least once, kill it mid-run (no goodbye).
        for line in ctl.stderr:
            if "step 5 " in line or "step 10 " in line:
                break
        ctl.kill()
        ctl.wait(PATIENCE_S)
        result = worker.result()
        assert result["steps"] == 400 and not result["stopped_early"]
    finally:
        worker.end()


def test_the_example_with_a_reader_token_is_refused_in_one_line(tmp_path: Path) -> None:
    env = {"LRCTL_ADMIN_TOKEN": ADMIN_SECRET, "LRCTL_READER_TOKEN": READER_SECRET}
    worker = Worker(tmp_path, 0.2, 30, hold=0, env=env)
    try:
        ctl = start_controller("hypergradient", worker, "--every", "5",
                               env={"LRCTL_TOKEN": READER_SECRET})
        _, err = ctl.communicate(timeout=120)
        assert ctl.returncode == 1
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines[-1].startswith("hypergradient: error:") and "admin" in lines[-1].lower(), err
        assert "Traceback" not in err
        result = worker.result()
        assert result["steps"] == 30  # training went on
        assert result["version"] == 1  # only the worker's own schedule: nothing applied
    finally:
        worker.end()


# -- the API against a served optimizer, in process ----------------------------------------

@pytest.fixture
def trained() -> Iterator[tuple[Served, Trainer]]:
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    tokens = Tokens([Token("admin", ADMIN, ADMIN_SECRET), Token("reader", READER, READER_SECRET)])
    ctl = attach(model, optimizer, address="127.0.0.1:0", tokens=tokens)
    served = Served(model, optimizer, ctl)
    trainer = Trainer(model, optimizer).start()
    try:
        trainer.wait_steps(1)
        yield served, trainer
    finally:
        trainer.stop()
        served.close()
    assert not trainer.errors


def _stop_after(loop: ControlLoop, decisions: int) -> Any:
    """Wrap loop.decide: after `decisions` calls, raise _Enough to end the test's loop."""
    decide = loop.decide

    def wrapped(window: Window) -> Optional[Action]:
        if loop.summary.decisions > decisions:
            raise _Enough
        return decide(window)
    loop.decide = wrapped
    return loop


class _Enough(Exception):
    pass


def test_racing_controllers_one_is_told_and_nothing_is_overwritten(trained) -> None:  # type: ignore[no-untyped-def]
    served, _ = trained
    seen: list[Optional[str]] = []
    with LRClient(served.ctl.address, token=ADMIN_SECRET) as a, \
            LRClient(served.ctl.address, token=ADMIN_SECRET, user="rival") as b:

        def decide(window: Window) -> Optional[Action]:
            seen.append(window.conflict)
            if len(seen) == 1:
                # Another controller gets in between this decision's reading and its act.
                b.set_learning_rates({"layer1.weight": 0.5}, reason="rival")
                return Action("first try").set_bases({"layer1.weight": 0.25})
            if len(seen) == 2:
                return Action("decided again").set_bases({"layer2.weight": 0.125})
            raise _Enough

        loop = ControlLoop(a, decide, every=2, log=lambda line: None)
        with pytest.raises(_Enough):
            loop.run()
        assert seen[0] is None and seen[1] is not None and "expected_version" in seen[1]
        assert loop.summary.conflicts == 1 and loop.summary.actions == 1
        rates = a.get_learning_rates()
        assert rates["layer1.weight"] == 0.5  # the rival's change stands
        assert rates["layer2.weight"] == 0.125
        reasons = [r.reason for r in a.iter_changes()]
        assert "controller: first try" not in reasons and "controller: decided again" in reasons

        # Policy "stop": the conflict ends the loop with ConflictError, nothing applied.
        def decide_once(window: Window) -> Optional[Action]:
            b.set_learning_rates({"layer1.bias": 0.75}, reason="rival again")
            return Action("loses").set_bases({"layer1.bias": 0.01})

        with pytest.raises(ConflictError, match="expected_version"):
            ControlLoop(a, decide_once, every=2, on_conflict="stop", log=lambda line: None).run()
        assert a.get_learning_rates("layer1.bias")["layer1.bias"] == 0.75

        # Policy "resend": decide runs once; its action goes again against the fresh version.
        calls: list[Optional[str]] = []

        def decide_keeping_state(window: Window) -> Optional[Action]:
            if calls:
                raise _Enough  # the next window's decision: the resend is done
            calls.append(window.conflict)
            b.set_learning_rates({"layer2.bias": 0.5}, reason="rival a third time")
            return Action("sent twice").set_bases({"layer1.bias": 0.02})

        loop = ControlLoop(a, decide_keeping_state, every=2, on_conflict="resend", log=lambda line: None)
        with pytest.raises(_Enough):
            loop.run()
        assert calls == [None] and loop.summary.conflicts == 1 and loop.summary.actions == 1
        rates = a.get_learning_rates()
        assert rates["layer1.bias"] == 0.02 and rates["layer2.bias"] == 0.5  # both stand


def test_the_loop_with_a_reader_token_raises_permission_denied(trained) -> None:  # type: ignore[no-untyped-def]
    served, trainer = trained
    with LRClient(served.ctl.address, token=READER_SECRET) as reader:
        before = reader.status().version
        loop = ControlLoop(reader, lambda w: Action("try").scale("*", 0.5), every=2, log=lambda line: None)
        with pytest.raises(PermissionDeniedError, match="admin"):
            loop.run()
        with pytest.raises(PermissionDeniedError):
            ControlLoop(reader, lambda w: None, every=2, lockstep_timeout=1.0, log=lambda line: None).run()
        assert reader.status().version == before
    trainer.wait_steps(2)  # training goes on


def test_lockstep_loop_acts_at_the_held_step_and_ends_when_the_worker_goes(trained) -> None:  # type: ignore[no-untyped-def]
    served, trainer = trained
    windows: list[Window] = []
    with LRClient(served.ctl.address, token=ADMIN_SECRET) as client:

        def decide(window: Window) -> Optional[Action]:
            windows.append(window)
            if len(windows) == 3:
                threading.Thread(target=served.ctl.close, kwargs={"grace": 0.5}, daemon=True).start()
            return Action(f"turn {window.step}").scale("layer2.bias", 0.5)

        summary = ControlLoop(client, decide, every=3, lockstep_timeout=30.0, log=lambda line: None).run()
        # The loop's metrics reader has ended with it (a daemon thread left inside grpc
        # can hang the process's exit).
        assert not [t for t in threading.enumerate() if t.name == "lrctl-controller-metrics"]
    assert summary.ended and len(windows) >= 3
    assert all(w.turn is not None and w.step % 3 == 0 for w in windows)
    records = [r for r in served.controller.history(0, 1000)[0] if r.reason.startswith("controller: turn")]
    assert records and all(r.step == int(r.reason.split()[-1]) for r in records)


def test_a_decision_changes_the_cadence_and_lockstep_follows_it(trained) -> None:  # type: ignore[no-untyped-def]
    served, _ = trained
    windows: list[Window] = []
    with LRClient(served.ctl.address, token=ADMIN_SECRET) as client:

        def decide(window: Window) -> Optional[Action]:
            windows.append(window)
            if len(windows) == 3:
                window.every = 4  # every step so far; every 4th from now on
            if len(windows) == 6:
                raise _Enough
            return Action(f"turn {window.step}").scale("layer2.bias", 0.5)

        loop = ControlLoop(client, decide, every=1, lockstep_timeout=30.0, log=lambda line: None)
        with pytest.raises(_Enough):
            loop.run()
        steps = [w.step for w in windows]
        assert steps[:3] == [steps[0], steps[0] + 1, steps[0] + 2], steps
        assert steps[3] > steps[2] and all(s % 4 == 0 for s in steps[3:]), steps
        assert steps[4:] == [steps[3] + 4, steps[3] + 8], steps
        assert all(w.turn is not None for w in windows) and loop.every == 4
        # The switch loses no event: the windows hold consecutive steps, once each.
        seen = [e.step for w in windows for e in w.events]
        assert seen == list(range(seen[0], seen[0] + len(seen))), seen
        records = [r for r in served.controller.history(0, 1000)[0] if r.reason.startswith("controller: turn")]
        assert len(records) == 5 and all(r.step == int(r.reason.split()[-1]) for r in records)

        # Without lockstep the windows follow the new cadence too.
        polled: list[int] = []

        def decide_polling(window: Window) -> Optional[Action]:
            polled.append(window.step)
            window.every = 3
            if len(polled) == 3:
                raise _Enough
            return None

        with pytest.raises(_Enough):
            ControlLoop(client, decide_polling, every=1, log=lambda line: None).run()
        assert polled[2] - polled[1] == 3, polled

        def decide_badly(window: Window) -> Optional[Action]:
            window.every = 0
            return None

        with pytest.raises(InvalidArgumentError, match="window.every 0"):
            ControlLoop(client, decide_badly, every=2, lockstep_timeout=30.0, log=lambda line: None).run()


def test_bad_loop_options_are_refused_naming_the_value() -> None:
    with LRClient("127.0.0.1:1") as client:
        for kwargs, fragment in (({"every": 0}, "every 0"), ({"lockstep_timeout": 0}, "lockstep_timeout 0"),
                                 ({"on_conflict": "maybe"}, "'maybe'")):
            with pytest.raises(InvalidArgumentError, match=fragment):
                ControlLoop(client, lambda w: None, **kwargs)


def test_a_worker_that_is_not_there_ends_the_loop_cleanly() -> None:
    with LRClient("127.0.0.1:1", timeout=2.0) as client:
        summary = ControlLoop(client, lambda w: None, every=2).run()
    assert "unreachable" in summary.ended
    assert math.isnan(Window(step=0, version=0, events=[]).mean("loss"))
