"""LRControlCallback in real ``transformers.Trainer`` runs (tiny GPT-2, CPU).

- A Trainer (linear warmup + decay, two param groups, with and without equal
  hyperparameters) is driven by a SEPARATE client process over gRPC (the lrctl CLI's
  verbs, each with --at-step and --no-wait so it lands at a known step). A step pre-hook
  registered after attach records the rate every name really trained at, at every step;
  each must be transformers' linear lambda at that step times the name's base in force
  (or its pin, exactly). The client reads the rates back at the end.
- Resume: a run that saves a checkpoint at step 20 and goes on to 40, then a NEW process
  resuming from checkpoint-20, ends bit-identical to it; a change queued before the
  checkpoint for step 30 still lands at step 30. resume="code" keeps the code's bases.
- Bad requests from the CLI against a running Trainer: one line, non-zero exit, and
  training goes on.

No timing assertions: every wait is bounded by PATIENCE_S and only fails the test.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.optimization import _get_linear_schedule_with_warmup_lr_lambda  # noqa: E402

from conftest import wait_for  # noqa: E402
from lrctl.integrations.huggingface import LRControlCallback  # noqa: E402
from lrctl.server.adopt import unwrap_optimizer  # noqa: E402

torch.set_num_threads(1)

HERE = Path(__file__).resolve().parent
PATIENCE_S = 120.0  # bound for "eventually" waits, never asserted as a duration
MAX_STEPS = 40
WARMUP = 5
LR = 1e-3
N_SAMPLES = 64  # 16 batches of 4: 40 steps run 2.5 epochs, the checkpoint is mid-epoch
SEQ = 16

closed_form = functools.partial(
    _get_linear_schedule_with_warmup_lr_lambda, num_warmup_steps=WARMUP, num_training_steps=MAX_STEPS
)

C_ATTN = "transformer.h.0.attn.c_attn.weight"
WPE = "transformer.wpe.weight"
H1 = "transformer.h.1.*"
C_FC = "transformer.h.0.mlp.c_fc.weight"
WTE = "transformer.wte.weight"


# -- the job -------------------------------------------------------------------------------
class RandomTokens(torch.utils.data.Dataset):
    """Fixed random token ids (labels = inputs), the same in every process."""

    def __init__(self, n: int = N_SAMPLES) -> None:
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, 64, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32))


def make_trainer(output_dir: Path, callbacks: list[Any], **overrides: Any) -> Trainer:
    """The job. Reproducible on CPU with `seed`, `data_seed`, fixed data and one torch
    thread (test_resume_in_new_process_is_bit_identical checks it first);
    `full_determinism` is not needed and would switch torch's deterministic algorithms on
    for the whole pytest process."""
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=MAX_STEPS,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=WARMUP,
        weight_decay=0.01,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=7,
        data_seed=11,
        logging_steps=10,
        save_strategy="no",
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return Trainer(model=make_model(), args=TrainingArguments(**kwargs), train_dataset=RandomTokens(),
                   callbacks=callbacks)


def final_weights(trainer: Trainer, directory: Path) -> Path:
    trainer.save_model(str(directory))
    return directory / "model.safetensors"


def assert_bit_identical(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"tensors differ: {different}"


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    env.pop("LRCTL_ADDRESS", None)
    return env


class Recorder(TrainerCallback):
    """Records the rate every name trained at, per optimizer step.

    Its hook goes on the real optimizer at the first on_step_begin, after every
    callback's on_train_begin, so it is registered after attach and runs after lrctl's
    hook: it sees what the step really uses. `at_first_step(recorder)` runs then too.
    """

    def __init__(self, lrctl_cb: LRControlCallback, at_first_step: Any = None) -> None:
        self.cb = lrctl_cb
        self.at_first_step = at_first_step
        self.rates: list[dict[str, float]] = []
        self.n_groups: list[int] = []
        self.lrctl_steps: list[int] = []
        self.logs: list[dict[str, Any]] = []
        self._hooked = False

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._hooked:
            return
        self._hooked = True
        real = unwrap_optimizer(optimizer)
        names = {id(p): n for n, p in model.named_parameters()}
        controller = self.cb.control.controller

        def record(opt: torch.optim.Optimizer, *_: Any) -> None:
            self.lrctl_steps.append(controller.step - 1)  # lrctl's hook counted this step
            self.n_groups.append(len(opt.param_groups))
            self.rates.append({names[id(p)]: float(g["lr"]) for g in opt.param_groups for p in g["params"]})

        real.register_step_pre_hook(record)
        if self.at_first_step is not None:
            self.at_first_step(self)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


# -- 1. a separate client process drives a Trainer -------------------------------------------
CHANGES = [  # (step, CLI words): split a group, scale a selector, pin, unpin, merge back
    (10, ["set", f"{C_ATTN}=3e-3"]),
    (15, ["scale", H1, "0.5"]),
    (20, ["set", "--pin", f"{WPE}=2e-4"]),
    (25, ["unpin", WPE]),
    (30, ["set", f"{C_ATTN}=1e-3"]),
]

CLIENT = textwrap.dedent("""
    import json, os, sys, time
    from lrctl.client.cli import main
    from lrctl.client.client import LRClient

    address, out, done = sys.argv[1], sys.argv[2], sys.argv[3]
    changes = json.loads(sys.argv[4])
    with LRClient(address, timeout=30) as client:
        client.wait_until_ready(60)
        for step, words in changes:
            code = main(["--address", address, *words, "--at-step", str(step), "--no-wait",
                         "--reason", f"test change at {step}"])
            if code:
                sys.exit(f"lrctl {words} exited {code}")
        # The worker says when its last step is over (scheduler stepped, rates final):
        # status().step reaches the end in the last step's pre-hook, before that.
        deadline = time.monotonic() + 120
        while not os.path.exists(done):
            if time.monotonic() > deadline:
                sys.exit("training never finished its last step")
            time.sleep(0.01)
        reading = client.read_learning_rates()
        history = client.list_changes()
    json.dump({
        "step": reading.step,
        "rates": {r.name: {"lr": r.lr, "base": r.base, "pinned": r.pinned} for r in reading.rates},
        "history": [[r.step, r.reason] for r in history],
    }, open(out, "w"))
""")


def expected_rate(name: str, step: int) -> tuple[float, str]:
    """(rate, how): "pin" exact, "exact" base == the scheduler's base, else "ratio"."""
    if 20 <= step < 25 and name == WPE:
        return 2e-4, "pin"
    base = LR
    if name == C_ATTN and 10 <= step < 30:
        base = 3e-3
    if name.startswith("transformer.h.1.") and step >= 15:
        base = LR * 0.5
    if base == LR:
        return LR * closed_form(step), "exact"
    return base * closed_form(step), "ratio"


@pytest.mark.parametrize("weight_decay", [0.01, 0.0], ids=["two-groups", "equal-groups"])
def test_remote_client_drives_trainer(tmp_path: Path, weight_decay: float) -> None:
    cb = LRControlCallback("127.0.0.1:0", report=[H1, WPE])
    out, done = tmp_path / "client.json", tmp_path / "last-step-done"
    proc: dict[str, subprocess.Popen] = {}

    def start_client(rec: Recorder) -> None:
        proc["client"] = subprocess.Popen(
            [sys.executable, "-c", CLIENT, cb.address, str(out), str(done), json.dumps(CHANGES)],
            env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        controller = cb.control.controller
        # Training waits here until every change is queued: each lands at its own step.
        wait_for(lambda: controller.pending_count == len(CHANGES) or proc["client"].poll() is not None,
                 "the client's changes", timeout=PATIENCE_S)
        assert controller.pending_count == len(CHANGES), proc["client"].communicate()

    rec = Recorder(cb, start_client)

    class WaitForClient(TrainerCallback):  # the client reads the rates before lrctl closes
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == MAX_STEPS:
                done.touch()
                stdout, stderr = proc["client"].communicate(timeout=PATIENCE_S)
                assert proc["client"].returncode == 0, (stdout, stderr)

    trainer = make_trainer(tmp_path / "out", [WaitForClient(), rec, cb], weight_decay=weight_decay)
    # As the module docstring says: first, so that the callbacks before it (report_to
    # loggers; here the Recorder) see lrctl's keys in on_log.
    trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(LRControlCallback))
    assert len(trainer.create_optimizer().param_groups) == 2  # Trainer's decay / no-decay groups
    trainer.train()

    assert trainer.state.global_step == MAX_STEPS
    assert cb.control.step == MAX_STEPS
    assert rec.lrctl_steps == list(range(MAX_STEPS))
    names = [n for n, _ in trainer.model.named_parameters()]
    for step, rates in enumerate(rec.rates):
        assert sorted(rates) == sorted(names)
        for name, lr in rates.items():
            want, how = expected_rate(name, step)
            if how == "ratio":
                assert lr == pytest.approx(want, rel=1e-12, abs=0), (step, name)
            else:
                assert lr == want, (step, name, how)
    # The base change at 10 split a group, the one at 30 merged it back.
    assert rec.n_groups[10] > rec.n_groups[9]
    assert rec.n_groups[30] < rec.n_groups[29]

    result = json.loads(out.read_text())
    assert result["step"] == MAX_STEPS
    assert [s for s, _ in result["history"]] == [s for s, _ in CHANGES]
    for name, got in result["rates"].items():
        base = LR * 0.5 if name.startswith("transformer.h.1.") else LR
        assert got == {"lr": 0.0, "base": base, "pinned": False}, name

    # on_log: lrctl's step and each name's rate for the next update (changes still
    # waiting, such as the pin due at step 20 when step 20 is logged, not included);
    # Trainer's own learning_rate is group 0's rate of the update just made.
    logged = {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}
    assert sorted(logged) == [10, 20, 30, 40]
    for step, entry in logged.items():
        assert entry["learning_rate"] == LR * closed_form(step - 1)
        assert entry["lrctl/step"] == step
        assert entry[f"lrctl/lr/{WPE}"] == LR * closed_form(step)
        h1 = entry[f"lrctl/lr/{H1}"]
        if step < 15:
            assert h1 == LR * closed_form(step)
        else:
            assert h1 == pytest.approx(0.5 * LR * closed_form(step), rel=1e-12, abs=0)
        seen = next(e for e in rec.logs if e.get("loss") == entry["loss"])  # a callback before lrctl's
        assert {k: v for k, v in seen.items() if k.startswith("lrctl/")} == {
            k: v for k, v in entry.items() if k.startswith("lrctl/")}


# -- 4. bad input through a running Trainer ---------------------------------------------------
def test_bad_cli_input_costs_the_request_not_the_job(tmp_path: Path) -> None:
    cb = LRControlCallback("127.0.0.1:0")
    runs: list[subprocess.CompletedProcess] = []

    def bad_requests(rec: Recorder) -> None:
        for words in (["set", f"{WPE}=nan"], ["set", "transformer.wpe.wieght=1e-3"]):
            runs.append(subprocess.run(
                [sys.executable, "-m", "lrctl.client.cli", "--address", cb.address, "--timeout", "30", *words],
                env=python_env(), capture_output=True, text=True, timeout=PATIENCE_S,
            ))

    rec = Recorder(cb, bad_requests)
    trainer = make_trainer(tmp_path / "out", [rec, cb])
    trainer.train()

    nan, unknown = runs
    for run in runs:
        assert run.returncode == 4, run
        assert run.stdout == ""
        lines = run.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("lrctl: error: "), run.stderr
    assert "nan" in nan.stderr.lower()
    assert "transformer.wpe.wieght" in unknown.stderr and WPE in unknown.stderr  # did you mean
    assert trainer.state.global_step == MAX_STEPS
    assert cb.control.step == MAX_STEPS
    assert cb.control.controller.version == 0  # nothing was applied
    for step, rates in enumerate(rec.rates):
        assert rates[WPE] == LR * closed_form(step)


# -- 2 and 3. exact resume in a new process ---------------------------------------------------
RESUME = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from transformers import TrainerCallback
    import test_huggingface as t
    from lrctl.integrations.huggingface import LRControlCallback

    checkpoint, out, policy = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    cb = LRControlCallback("127.0.0.1:0", resume=policy)
    seen = {}

    class AtBegin(TrainerCallback):  # after cb: lrctl is attached and resumed
        def on_train_begin(self, args, state, control, **kwargs):
            rows, version, step = cb.control.controller.read([t.C_FC, t.WTE])
            seen.update(step=step, version=version, global_step=state.global_step,
                        bases={r.name: r.base for r in rows}, lrs={r.name: r.lr for r in rows},
                        report=cb.control.resume_report)

    trainer = t.make_trainer(out / "run", [cb, AtBegin()], save_strategy="steps", save_steps=20)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    t.final_weights(trainer, out / "final")
    records, _, _ = cb.control.controller.history(0, 100)
    rows, _, _ = cb.control.controller.read([t.C_FC, t.WTE])
    seen.update(history=[[r.step, r.reason] for r in records], final_step=cb.control.step,
                final_bases={r.name: r.base for r in rows}, replay_report=cb.control.replay_report)
    (out / "seen.json").write_text(json.dumps(seen))
""")


class SubmitAtBegin(TrainerCallback):
    """After the LRControlCallback: queue changes for steps 10 and 30 from a client."""

    def __init__(self, cb: LRControlCallback) -> None:
        self.cb = cb

    def on_train_begin(self, args, state, control, **kwargs):
        from lrctl.client.client import LRClient

        with LRClient(self.cb.address, timeout=30) as client:
            client.set_learning_rates({C_FC: 3e-3}, at_step=10, wait=False, reason="at 10")
            client.set_learning_rates({WTE: 4e-3}, at_step=30, wait=False, reason="at 30")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two plain runs, and a run with changes at 10 and 30 that saves checkpoint-20
    (and an audit log, to replay)."""
    root = tmp_path_factory.mktemp("hf_resume")
    out: dict[str, Path] = {"root": root}
    for key in ("plain_a", "plain_b"):
        trainer = make_trainer(root / key, [], save_strategy="steps", save_steps=20)
        trainer.train()
        out[key] = final_weights(trainer, root / key / "final")
    out["audit"] = root / "changed-audit.jsonl"
    cb = LRControlCallback("127.0.0.1:0", audit_log=str(out["audit"]))
    trainer = make_trainer(root / "changed", [cb, SubmitAtBegin(cb)], save_strategy="steps", save_steps=20)
    trainer.train()
    out["changed"] = final_weights(trainer, root / "changed" / "final")
    records, _, _ = cb.control.controller.history(0, 100)
    assert [(r.step, r.reason) for r in records] == [(10, "at 10"), (30, "at 30")]
    out["checkpoint"] = root / "changed" / "checkpoint-20"
    assert (out["checkpoint"] / "optimizer.pt").is_file()
    return out


def resume_in_new_process(runs: dict[str, Path], policy: str, name: str = "",
                          env: dict[str, str] | None = None) -> tuple[dict[str, Any], Path]:
    out = runs["root"] / f"resumed_{name or policy}"
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", RESUME, str(runs["checkpoint"]), str(out), policy],
                          env={**python_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=PATIENCE_S)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "seen.json").read_text()), out / "final" / "model.safetensors"


def test_resume_in_new_process_is_bit_identical(runs: dict[str, Path]) -> None:
    # Plain Trainer runs are themselves reproducible (else the rest would prove nothing).
    assert_bit_identical(runs["plain_a"], runs["plain_b"])
    with pytest.raises(AssertionError):  # and the changes do change the weights
        assert_bit_identical(runs["plain_a"], runs["changed"])

    seen, final = resume_in_new_process(runs, "checkpoint")
    assert seen["global_step"] == 20 and seen["step"] == 20
    assert seen["report"] == []
    assert seen["bases"] == {C_FC: 3e-3, WTE: LR}  # the checkpoint's base for C_FC
    assert seen["lrs"][WTE] == LR * closed_form(20)
    assert seen["lrs"][C_FC] == pytest.approx(3e-3 * closed_form(20), rel=1e-12, abs=0)
    # The change queued for step 30 before the checkpoint rode in it and landed at 30.
    assert seen["history"] == [[10, "at 10"], [30, "at 30"]]
    assert seen["final_step"] == MAX_STEPS
    assert seen["final_bases"] == {C_FC: 3e-3, WTE: 4e-3}
    assert_bit_identical(final, runs["changed"])


def test_resume_with_replay_goes_on_from_the_checkpoint(runs: dict[str, Path]) -> None:
    """The recorded run's own checkpoint-20 resumed by the Trainer with LRCTL_REPLAY set
    to its audit log: the change at step 10 is in the checkpoint's state, the one queued
    for 30 rode in it and is taken as the recorded change (applied once, not fed again),
    and the weights are the recorded run's, bit for bit."""
    seen, final = resume_in_new_process(runs, "checkpoint", "replay", {"LRCTL_REPLAY": str(runs["audit"])})
    assert seen["global_step"] == 20 and seen["step"] == 20
    assert seen["history"] == [[10, "at 10"], [30, "at 30"]]
    assert seen["replay_report"] == []
    assert seen["final_bases"] == {C_FC: 3e-3, WTE: 4e-3}
    assert_bit_identical(final, runs["changed"])


def test_resume_code_keeps_the_codes_bases(runs: dict[str, Path]) -> None:
    seen, final = resume_in_new_process(runs, "code")
    assert seen["step"] == 20
    assert seen["report"] == []  # no fallback to the checkpoint's rates
    assert seen["bases"] == {C_FC: LR, WTE: LR}  # the code's base, not the checkpoint's 3e-3
    assert seen["lrs"] == {C_FC: LR * closed_form(20), WTE: LR * closed_form(20)}
    # Step, history and the waiting change are restored either way.
    assert seen["history"] == [[10, "at 10"], [30, "at 30"]]
    assert seen["final_bases"] == {C_FC: LR, WTE: 4e-3}
    with pytest.raises(AssertionError):
        assert_bit_identical(final, runs["changed"])


# -- on_train_begin on its own: what it adopts, and failures that must not be swallowed -------
def test_on_train_begin_adopts_the_inner_scheduler_and_fails_loudly(tmp_path: Path) -> None:
    from accelerate.scheduler import AcceleratedScheduler
    from transformers import TrainerControl, TrainerState, get_linear_schedule_with_warmup

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)

    def begin(cb: LRControlCallback, model: torch.nn.Module, opt: Any, sched: Any = None) -> None:
        cb.on_train_begin(args, TrainerState(), TrainerControl(), model=model, optimizer=opt,
                          lr_scheduler=sched)

    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    sched = get_linear_schedule_with_warmup(opt, WARMUP, MAX_STEPS)
    cb = LRControlCallback("127.0.0.1:0")
    with cb:
        begin(cb, model, opt, AcceleratedScheduler(sched, opt))  # Accelerate's wrapper: unwrapped
        assert sched.optimizer is not opt  # adopted: it steps lrctl's shadow of the groups
        rows, _, _ = cb.control.controller.read([WPE])
        assert "LambdaLR" in rows[0].schedule
        assert cb.port > 0 and cb.address.endswith(f":{cb.port}")

        other = make_model()
        busy = LRControlCallback(cb.address)  # the port is taken: raised, not swallowed
        with pytest.raises(RuntimeError, match="lrctl could not attach.*cannot listen"):
            begin(busy, other, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="not attached yet"):
        LRControlCallback().address

    typo = LRControlCallback("127.0.0.1:0", report=["transformer.h.9.*"])
    other = make_model()
    with pytest.raises(RuntimeError, match=r"report selector 'transformer\.h\.9\.\*'"):
        begin(typo, other, torch.optim.SGD(other.parameters(), lr=0.1))
    from lrctl.client.client import LRClient
    from lrctl.client.errors import UnavailableError

    with pytest.raises(UnavailableError):  # closed again: it no longer serves
        with LRClient(typo.address, timeout=5) as client:
            client.status()


def test_resume_from_a_checkpoint_without_lrctl(runs: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    """lrctl attached to a resumed plain run: training unchanged; with no lrctl state in
    the checkpoint, lrctl counts on from the Trainer's global_step (nothing to warn about)."""
    cb = LRControlCallback("127.0.0.1:0")
    trainer = make_trainer(runs["root"] / "plain_resumed", [cb], save_strategy="no")
    with caplog.at_level("WARNING", logger="lrctl.integrations.huggingface"):
        trainer.train(resume_from_checkpoint=str(runs["plain_a"].parent.parent / "checkpoint-20"))
    assert not any("global_step is" in r.getMessage() for r in caplog.records)
    assert cb.control.step == MAX_STEPS
    assert_bit_identical(final_weights(trainer, runs["root"] / "plain_resumed" / "final"), runs["plain_a"])
