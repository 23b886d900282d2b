"""Reproducibility: `lrctl history --export`, attach(replay=...) / LRCTL_REPLAY, `lrctl replay`.

The main test records a real job (tests/replay_worker.py, its own process, CPU, fixed
seeds) while the CLI queues changes for later steps (a schedule, a pin, a scale, an
unpin, one that fails at its step) and a small client "controller" changes rates live
at whatever step it gets; exports the history; replays it in a fresh process with no
client; and requires the per-step per-name rate tables to be identical and every final
weight bit-identical (torch.equal). Then `lrctl replay` does the same against a running
worker. Bad files and mismatching runs give one line and a non-zero exit, or ValueError
from attach, before anything is queued.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from conftest import (
    LRCTL,
    PATIENCE_S,
    Served,
    Trainer,
    assert_error,
    ok,
    per_parameter_optimizer,
    run_cli,
    seed_model,
    train_step,
    wait_for,
)
from lrctl.client.client import LRClient
from lrctl.server import attach
from lrctl.server.requests import ChangeRequest, Mode, Target, Update

WORKER = str(Path(__file__).with_name("replay_worker.py"))


class Job:
    """tests/replay_worker.py in its own process, gated by files in `dir`."""

    def __init__(self, directory: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, WORKER, str(directory), *args], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        match = re.search(r"serving on (127\.0\.0\.1:\d+)", first)
        if not match:
            self.proc.kill()
            pytest.fail(f"worker did not start: {first!r} {self.proc.stderr.read()}")  # type: ignore[union-attr]
        self.address = match.group(1)

    def touch(self, name: str) -> None:
        (self.dir / name).touch()

    def trained(self) -> bool:
        return (self.dir / "steps").exists()

    def results(self) -> tuple[list[dict[str, float]], dict[str, torch.Tensor], int]:
        wait_for(self.trained, "the job to finish training", timeout=120)
        rates = json.loads((self.dir / "rates.json").read_text())
        weights = torch.load(self.dir / "weights.pt")
        return rates, weights, int((self.dir / "steps").read_text())

    def finish(self) -> str:
        self.touch("go")
        self.touch("release")
        self.touch("exit")
        out, err = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0, err
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def jobs() -> Iterator[list[Job]]:
    started: list[Job] = []
    yield started
    for job in started:
        job.kill()


def _cli(job: Job, *args: str) -> str:
    return ok(run_cli(job.address, *args))


def _record(tmp_path: Path, jobs: list[Job]) -> tuple[Job, Path, list[dict[str, Any]]]:
    """Record a run with queued and live changes; export it; returns (job, export, history)."""
    job = Job(tmp_path / "recorded")
    jobs.append(job)
    # Queued for later steps, before the first step (the job waits for "go").
    _cli(job, "schedule", "set", "0.*", "warmup", "warmup_steps=20", "decay=cosine",
         "total_steps=200", "--at-step", "10", "--no-wait", "--reason", "warm layer 0")
    _cli(job, "set", "--pin", "4.bias=0.05", "--at-step", "25", "--no-wait")
    _cli(job, "scale", "2.*", "0.5", "--at-step", "40", "--no-wait")
    _cli(job, "unpin", "4.bias", "--at-step", "70", "--no-wait")
    # Accepted now (version 0), failed at step 50: the version moved. Not replayed.
    _cli(job, "set", "2.weight=0.3", "--at-step", "50", "--expected-version", "0", "--no-wait")
    job.touch("go")
    # A small controller: at a few points, scale a layer by what it reads (live, waits).
    with LRClient(job.address, timeout=PATIENCE_S, user="controller") as client:
        for at in (15, 35, 60):
            wait_for(lambda: client.status().step >= at, f"step {at}")
            rate = client.get_learning_rates("0.weight")["0.weight"]
            client.set_learning_rates({"4.*": rate * 0.75}, reason=f"controller saw {rate!r}")
        wait_for(lambda: client.status().step > 80, "step 80")
    job.touch("release")
    wait_for(job.trained, "the recorded job to finish", timeout=120)
    export = tmp_path / "run.jsonl"
    out = _cli(job, "history", "--export", str(export))
    assert re.match(r"exported 8 record\(s\) of run [0-9a-f]+ to .*run\.jsonl \(7 applied, "
                    r"steps 10\.\.\d+; 1 failed, not replayed\)", out), out
    history = json.loads(_cli(job, "history", "--file", str(export), "--json"))
    assert history == json.loads(_cli(job, "history", "--json"))
    return job, export, history


def test_replay_in_a_fresh_process_is_bit_identical(tmp_path: Path, jobs: list[Job]) -> None:
    job, export, history = _record(tmp_path, jobs)
    rates, weights, steps = job.results()
    job.finish()
    applied = [r for r in history if not r["status"]]
    assert len(applied) == 7 and {r["step"] for r in applied} >= {10, 25, 40, 70}
    assert rates[9] != rates[10]  # the changes show in the table (a sanity check of the test)

    # The replay: a fresh process, no client, the same number of steps.
    audit = tmp_path / "replayed-audit.jsonl"
    replayed = Job(tmp_path / "replayed", str(steps),
                   env={"LRCTL_REPLAY": str(export), "LRCTL_AUDIT_LOG": str(audit)})
    jobs.append(replayed)
    replayed.touch("go")
    rates2, weights2, steps2 = replayed.results()
    out = replayed.finish()
    assert "replay report: []" in out
    assert steps2 == steps
    assert rates2 == rates  # every step, every name, exactly
    assert weights2.keys() == weights.keys()
    for name in weights:
        assert torch.equal(weights[name], weights2[name]), name

    # The new history: each applied change once, at its step, marked as replayed.
    new = json.loads(ok(subprocess.run([*LRCTL, "history", "--file", str(audit), "--json"],
                                       capture_output=True, text=True, timeout=60)))
    assert [(r["step"], r["reason"]) for r in new] == [
        (r["step"], f"replay of change {r['change_id']}" + (f": {r['reason']}" if r["reason"] else ""))
        for r in applied]
    assert all(r["peer"] == f"replay:{export}" and not r["status"] for r in new)
    assert [r["changes"] for r in new] == [r["changes"] for r in applied]


def test_a_replay_resumed_from_a_checkpoint_goes_on_bit_identical(tmp_path: Path, jobs: list[Job]) -> None:
    """A replayed job checkpointed at step 30 and resumed in a new process with the same
    replay, its optimizer loaded after attach or before: every step from 30 on and the
    final weights bit-identical with the recorded run; the changes the checkpoint brought
    back queued apply once, the rest come from the file (a window of 2 splits them)."""
    job, export, history = _record(tmp_path, jobs)
    rates, weights, steps = job.results()
    job.finish()
    later = [(r["step"], f"replay of change {r['change_id']}" + (f": {r['reason']}" if r["reason"] else ""))
             for r in history if not r["status"] and r["step"] >= 30]
    assert len(later) >= 3  # some queued in the checkpoint (the window), some still in the file
    replay = {"LRCTL_REPLAY": str(export)}
    first = Job(tmp_path / "first", str(steps), "--window", "2", "--save-at", "30", env=replay)
    jobs.append(first)
    first.touch("go")
    rates1, _, _ = first.results()
    first.finish()
    assert rates1 == rates[:30]
    for load in ("after", "before"):
        audit = tmp_path / f"resumed-{load}.jsonl"
        resumed = Job(tmp_path / f"resumed-{load}", str(steps), "--window", "2", "--resume",
                      str(first.dir / "checkpoint.pt"), "--load", load,
                      env={**replay, "LRCTL_AUDIT_LOG": str(audit)})
        jobs.append(resumed)
        resumed.touch("go")
        rates2, weights2, steps2 = resumed.results()
        assert "replay report: []" in resumed.finish(), load
        assert steps2 == steps and rates2 == rates[30:], load
        for name in weights:
            assert torch.equal(weights[name], weights2[name]), (load, name)
        lines = [json.loads(line) for line in audit.read_text().splitlines()]
        assert [(r["step"], r["reason"]) for r in lines if not r["status"]] == later, load
        # Loaded after attach: what the replay had queued at step 0 was withdrawn by the load.
        assert [r["status"] for r in lines if r["status"]] == (["ABORTED"] * 2 if load == "after" else [])


def test_lrctl_replay_against_a_running_worker(tmp_path: Path, jobs: list[Job]) -> None:
    job, export, history = _record(tmp_path, jobs)
    rates, weights, steps = job.results()
    job.finish()
    target = Job(tmp_path / "target", str(steps))  # waits for "go": at step 0
    jobs.append(target)
    # A window of 2: the CLI feeds the 7 changes as the worker's steps pass.
    proc = subprocess.Popen([*LRCTL, "--address", target.address, "replay", str(export), "--window", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with LRClient(target.address, timeout=PATIENCE_S) as client:
        wait_for(lambda: client.list_pending(), "the first replayed changes to be queued")
        assert len(client.list_pending()) <= 2
    target.touch("go")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and err == "", err
    assert re.match(r"replayed 7 change\(s\) of run [0-9a-f]+: applied at their recorded steps 10\.\.\d+", out), out
    rates2, weights2, _ = target.results()
    assert rates2 == rates
    for name in weights:
        assert torch.equal(weights[name], weights2[name]), name
    target.finish()


def test_lrctl_replay_follows_by_polling_while_another_controller_holds_lockstep(
        served: Served, recorded: Path) -> None:
    """`lrctl replay --window 1` cannot hold the worker while another controller holds
    lockstep: it follows the worker's step by status polls instead, and still queues
    each change before its step (the holder lets a step go every 0.3 s)."""
    address = served.ctl.address
    trainer = Trainer(served.model, served.optimizer)
    held: list[int] = []
    try:
        with LRClient(address, timeout=PATIENCE_S) as holder, holder.lockstep(every=1, timeout=60) as session:
            trainer.start()  # its first step waits for the holder
            proc = subprocess.Popen([*LRCTL, "--address", address, "replay", str(recorded), "--window", "1"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for turn in session:
                held.append(turn.step)
                if turn.step == 0:  # the replay's checks need the worker before the first change
                    wait_for(lambda: served.controller.pending_count == 1 or proc.poll() is not None,
                             "the replay's first change to be queued")
                time.sleep(0.3)
                turn.decide()
                if proc.poll() is not None or turn.step > 40:
                    break
            out, err = proc.communicate(timeout=PATIENCE_S)
            assert holder.status().lockstep.peer  # the holder held lockstep throughout
    finally:
        if trainer.thread.ident is not None:  # started
            trainer.stop()
    assert proc.returncode == 0, err
    assert re.match(r"replayed 2 change\(s\) of run [0-9a-f]+: applied at their recorded steps 2\.\.4", out), out
    assert held[:6] == list(range(6))
    assert [(r.step, r.reason) for r in served.controller.history(0, 10)[0]] == [
        (2, "replay of change 1"), (4, "replay of change 2")]


# -- bad files and mismatching runs (a real server in this process, stepped by the test) --


def _write(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture
def recorded(tmp_path: Path) -> Path:
    """An audit log of the seed model: a scale at step 2, a pin at step 4."""
    log = tmp_path / "seed.jsonl"
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    with attach(model, optimizer, serve=False, audit_log=str(log)) as ctl:
        ctl.controller.submit(ChangeRequest((Update("layer1.*", 0.5, Mode.SCALE),), at_step=2))
        ctl.controller.submit(ChangeRequest((Update("layer2.bias", 0.25, Mode.ABSOLUTE, Target.PIN),), at_step=4))
        for _ in range(6):
            train_step(model, optimizer)
    return log


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_replay_cli_refuses_bad_files(served: Served, recorded: Path, tmp_path: Path) -> None:
    address = served.ctl.address
    lines = _lines(recorded)

    torn = tmp_path / "torn.jsonl"
    torn.write_text(json.dumps(lines[0]) + "\n" + json.dumps(lines[1])[:40])
    assert_error(run_cli(address, "replay", str(torn)), 2, "line 2", "torn.jsonl")

    unknown = [dict(lines[0], updates=[dict(lines[0]["updates"][0], selector="nope.*")],
                    changes=[dict(c, name="nope." + c["name"]) for c in lines[0]["changes"]]), lines[1]]
    assert_error(run_cli(address, "replay", str(_write(tmp_path / "unknown.jsonl", unknown))), 4,
                 "'nope.layer1.weight'", "not a parameter")

    other_rate = [dict(lines[0], changes=[dict(c, base=[0.123, c["base"][1]]) for c in lines[0]["changes"]]),
                  lines[1]]
    assert_error(run_cli(address, "replay", str(_write(tmp_path / "rate.jsonl", other_rate))), 4,
                 "'layer1.weight'", "0.123")

    assert_error(run_cli(address, "replay", str(tmp_path / "missing.jsonl")), 2, "missing.jsonl")

    served.step(3)  # the worker is at step 3; the first change was at step 2
    assert_error(run_cli(address, "replay", str(recorded)), 4, "step 2", "already at step 3")
    # Nothing half-applied: no change queued or made, and training goes on.
    assert served.controller.pending_count == 0 and served.controller.version == 0
    served.step(1)


def test_replay_cli_stops_and_cancels_when_a_selector_matches_other_names(
        served: Served, recorded: Path, tmp_path: Path) -> None:
    lines = _lines(recorded)
    # The recorded change touched only layer1.weight: its "layer1.*" matches two names here.
    narrowed = [dict(lines[0], changes=lines[0]["changes"][:1], num_changes=1)]
    proc = run_cli(served.ctl.address, "replay", str(_write(tmp_path / "narrow.jsonl", narrowed)))
    assert_error(proc, 4, "change 1 (step 2) touched 1 name(s)", "2 on this worker", "replay stopped")
    assert served.controller.pending_count == 0  # the queued one was cancelled
    served.step(3)
    assert served.controller.version == 0


def test_attach_replay_checks_before_training(recorded: Path, tmp_path: Path) -> None:
    def attach_with(path: Path, model: Any = None) -> Any:
        model = seed_model() if model is None else model
        return attach(model, per_parameter_optimizer(model), serve=False, replay=str(path))

    lines = _lines(recorded)
    with pytest.raises(ValueError, match=r"'layer1.weight' starts with base rate .*recorded run had 0.123"):
        attach_with(_write(tmp_path / "rate.jsonl", [
            dict(lines[0], changes=[dict(c, base=[0.123, c["base"][1]]) for c in lines[0]["changes"]])]))
    with pytest.raises(ValueError, match=r"change 1 \(step 2\) touched 1 name\(s\).*also matches 'layer1.bias'"):
        attach_with(_write(tmp_path / "narrow.jsonl", [dict(lines[0], changes=lines[0]["changes"][:1],
                                                            num_changes=1)]))
    torn = tmp_path / "torn.jsonl"
    torn.write_text(json.dumps(lines[0])[:50])
    with pytest.raises(ValueError, match="line 1 of .*torn.jsonl"):
        attach_with(torn)
    # The optimizer is left alone after a refusal; a good file replays.
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    with attach(model, optimizer, serve=False, replay=str(recorded)) as ctl:
        assert ctl.controller.pending_count == 2
        for _ in range(6):
            train_step(model, optimizer)
        assert ctl.replay_report == []
        assert ctl.controller.learning_rates()["layer2.bias"] == 0.25
        assert [(r.step, r.reason) for r in ctl.controller.history(0, 10)[0]] == [
            (2, "replay of change 1"), (4, "replay of change 2")]


def test_attach_replay_from_a_checkpoint_checks_the_state_there(recorded: Path) -> None:
    """Replaying from a checkpoint at step 3 (the recording: a scale at step 2, a pin at
    step 4): one of the replayed run goes on (the pin once, at step 4); one of a run
    without the step-2 scale is refused by attach (loaded before) or stops the replay
    (loaded after), naming the name, and training goes on."""
    def checkpoint(replay: Path | None) -> dict[str, Any]:
        model = seed_model()
        optimizer = per_parameter_optimizer(model)
        with attach(model, optimizer, serve=False, replay=None if replay is None else str(replay)):
            for _ in range(3):
                train_step(model, optimizer)
            return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

    def resumed(state: dict[str, Any], before: bool) -> tuple[Any, Any, Any]:
        model = seed_model()
        model.load_state_dict(state["model"])
        optimizer = per_parameter_optimizer(model)
        if before:
            optimizer.load_state_dict(state["optimizer"])
        ctl = attach(model, optimizer, serve=False, replay=str(recorded))
        if not before:
            optimizer.load_state_dict(state["optimizer"])
        return model, optimizer, ctl

    replayed, plain = checkpoint(recorded), checkpoint(None)
    for before in (True, False):
        model, optimizer, ctl = resumed(replayed, before)
        with ctl:
            assert ctl.step == 3 and ctl.controller.pending_count == 1  # the pin, from the checkpoint
            for _ in range(3):
                train_step(model, optimizer)
            assert ctl.replay_report == []
            assert [(r.step, r.reason) for r in ctl.controller.history(0, 10)[0]] == [
                (2, "replay of change 1"), (4, "replay of change 2")]
            assert ctl.controller.learning_rates()["layer2.bias"] == 0.25

    with pytest.raises(ValueError, match=r"'layer1.weight' starts with base rate .* the recorded run had "
                                         r".* after change 1 \(this run is at step 3"):
        resumed(plain, before=True)
    model, optimizer, ctl = resumed(plain, before=False)
    with ctl:
        assert ctl.controller.pending_count == 0  # the replay's first window was withdrawn
        assert len(ctl.replay_report) == 1 and ctl.replay_report[0].startswith(
            "replay stopped after a checkpoint load: cannot replay")
        assert "'layer1.weight'" in ctl.replay_report[0]
        for _ in range(3):
            train_step(model, optimizer)
        assert ctl.step == 6 and ctl.controller.history(0, 10)[0] == []


def test_export_refuses_a_history_that_dropped_changes(tmp_path: Path) -> None:
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    with attach(model, optimizer, address="127.0.0.1:0", history_limit=2) as ctl:
        s = Served(model, optimizer, ctl)
        for k in range(3):
            ctl.controller.submit(ChangeRequest((Update("layer1.bias", 0.1 * (k + 1)),)))
            s.step()
        path = tmp_path / "export.jsonl"
        assert_error(run_cli(ctl.address, "history", "--export", str(path)), 4,
                     "dropped its 1 oldest change(s)", "--partial")
        assert not path.exists() and not list(tmp_path.glob(".lrctl-export-*"))
        proc = run_cli(ctl.address, "history", "--export", str(path), "--partial")
        assert proc.returncode == 0, proc.stderr
        assert "exported 2 record(s)" in proc.stdout and "dropped its 1 oldest" in proc.stderr
        assert len(path.read_text().splitlines()) == 2
        assert_error(run_cli(ctl.address, "history", "--partial"), 2, "--export")
        assert_error(run_cli(ctl.address, "history", "--export", str(path), "--limit", "1"), 2, "--limit")
        s.channel.close()
