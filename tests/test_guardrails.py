"""Guardrails: bounds on the rates clients may set, fixed by the worker (issue 15).

A real worker on a loopback port, real SGD, LRClient and the CLI as a subprocess. A
change outside the guardrails is refused whole with FAILED_PRECONDITION and a message
that names the name, the value and the bound; nothing is applied, training goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import subprocess
import threading
from typing import Iterator

import pytest
import torch

from lrctl.client import LRClient
from lrctl.common.errors import FailedPreconditionError  # what LRClient raises too
from lrctl.client.types import Guardrail as StatusGuardrail
from lrctl.common.schedules import Exponential, OneCycle, PiecewiseLinear, StepDecay, Warmup
from lrctl.server import attach
from lrctl.server.guardrails import Guardrail, Guardrails

from conftest import (LRCTL, PATIENCE_S, Served, Trainer, per_parameter_optimizer, run_cli, seed_model, start_demo_worker,
                      wait_for)


# Seed rates: layer1.weight 0.01, layer1.bias 0.1, layer2.weight 0.001, layer2.bias 1.0.
RAILS = Guardrails(
    (
        Guardrail("layer1.*", 1e-4, 0.2),
        Guardrail("*", None, 2.0),
        Guardrail("layer2.weight", None, 0.01),
        Guardrail("*.weight", 1e-5, 0.15),  # overlaps layer1.*: tighter max for layer1.weight
    ),
    max_factor=10.0,
)


@contextlib.contextmanager
def guarded(guardrails: Guardrails = RAILS) -> Iterator[tuple[Served, LRClient]]:
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    ctl = attach(model, optimizer, address="127.0.0.1:0", guardrails=guardrails)
    served = Served(model, optimizer, ctl)
    client = LRClient(ctl.address)
    try:
        yield served, client
    finally:
        client.close()
        served.close()


@contextlib.contextmanager
def training(served: Served) -> Iterator[Trainer]:
    trainer = Trainer(served.model, served.optimizer).start()
    try:
        trainer.wait_steps(1)
        yield trainer
        trainer.wait_steps(2)  # training goes on after whatever was refused
    finally:
        trainer.stop()
    assert not trainer.errors, trainer.errors


def refused(call) -> str:
    with pytest.raises(FailedPreconditionError) as info:
        call()
    return str(info.value)


# -- the model: parsing and validation ------------------------------------------------
def test_parse_compact_form() -> None:
    g = Guardrails.parse("encoder.*=1e-5..1e-2; head.*=..0.1;re:^a=b$=0.5..", max_factor="10")
    assert g.rules == (
        Guardrail("encoder.*", 1e-5, 1e-2),
        Guardrail("head.*", None, 0.1),
        Guardrail("re:^a=b$", 0.5, None),  # the selector is everything before the last '='
    )
    assert g.max_factor == 10.0
    assert [Guardrail.parse(r.text()) for r in g.rules] == list(g.rules)
    assert not Guardrails() and Guardrails.parse("", "") == Guardrails()


def test_from_env() -> None:
    env = {"LRCTL_GUARDRAILS": "layer1.*=..0.5", "LRCTL_MAX_FACTOR": "4"}
    assert Guardrails.from_env(env) == Guardrails((Guardrail("layer1.*", None, 0.5),), 4.0)
    assert Guardrails.from_env({}) == Guardrails()
    with pytest.raises(ValueError, match=r"\$LRCTL_GUARDRAILS.*'oops' is not SELECTOR=MIN..MAX"):
        Guardrails.from_env({"LRCTL_GUARDRAILS": "oops"})


@pytest.mark.parametrize(
    "text, factor, message",
    [
        ("layer1.weight", None, "'layer1.weight' is not SELECTOR=MIN..MAX"),
        ("=..1", None, "'=..1' is not SELECTOR=MIN..MAX"),
        ("a=0.1", None, "bounds '0.1' are not MIN..MAX"),
        ("a=x..1", None, "min 'x' is not a number"),
        ("a=1..y", None, "max 'y' is not a number"),
        ("a=0.2..0.1", None, "min_lr 0.2 is above max_lr 0.1"),
        ("a=-1..", None, "min_lr -1.0 is negative"),
        ("a=..-0", None, "max_lr -0.0 is negative"),
        ("a=..", None, "has neither min_lr nor max_lr"),
        ("a=nan..1", None, "min_lr nan is not a finite number"),
        ("a=..inf", None, "max_lr inf is not a finite number"),
        ("re:(=..1", None, "malformed regex in selector 're:('"),
        ("", "1", "max_factor 1.0 must be above 1"),
        ("", "0.5", "max_factor 0.5 must be above 1"),
        ("", "inf", "max_factor inf is not a finite number"),
        ("", "ten", "max_factor 'ten' is not a number"),
    ],
)
def test_parse_errors_name_the_bad_part(text: str, factor: str | None, message: str) -> None:
    with pytest.raises(ValueError) as info:
        Guardrails.parse(text, factor)
    assert message in str(info.value)


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="is not a number"):
        Guardrail("a", "0.1", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Guardrail objects"):
        Guardrails(("a=..1",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_factor 1.0 must be above 1"):
        Guardrails((), 1)


def test_attach_refuses_a_rule_that_matches_nothing_and_rules_that_leave_no_rate() -> None:
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    before = [dict(g) for g in optimizer.param_groups]
    with pytest.raises(ValueError, match=r"guardrail 'layer3\.\*': selector 'layer3\.\*' matches no parameter"):
        attach(model, optimizer, serve=False, guardrails=Guardrails.parse("layer3.*=..1"))
    with pytest.raises(ValueError, match="no parameter named 'layer1.weigth'; did you mean 'layer1.weight'"):
        attach(model, optimizer, serve=False, guardrails=Guardrails.parse("layer1.weigth=..1"))
    with pytest.raises(ValueError, match=r"guardrails 'layer1\.\*' \(min 0.5\) and '\*.bias' \(max 0.1\) "
                                         r"leave 'layer1.bias' no rate"):
        attach(model, optimizer, serve=False, guardrails=Guardrails.parse("layer1.*=0.5..;*.bias=..0.1"))
    assert [dict(g) for g in optimizer.param_groups] == before  # nothing touched
    assert not optimizer._optimizer_step_pre_hooks  # no hook left behind


def test_starting_rates_outside_are_logged_not_refused(caplog: pytest.LogCaptureFixture) -> None:
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    with caplog.at_level(logging.WARNING, logger="lrctl.controller"):
        ctl = attach(model, optimizer, serve=False, guardrails=Guardrails.parse("*.bias=..0.5", 10))
    try:
        assert "1 parameter(s) start with a rate outside their guardrails, e.g. 'layer2.bias' at 1.0" in caplog.text
        # A name outside may be brought back in, by any factor (1.0 -> 0.01 is 100)...
        ctl.controller.submit(_request("layer2.bias", 0.01))
        # ... but not left outside, nor moved by more than max_factor once inside.
        with pytest.raises(FailedPreconditionError, match="layer2.bias: base 0.6 is above the guardrail max 0.5"):
            ctl.controller.preview(_request("layer2.bias", 0.6))
        with pytest.raises(FailedPreconditionError, match="layer1.bias: rate 0.1 -> 0.001 at step 0 is a factor of 100"):
            ctl.controller.preview(_request("layer1.bias", 0.001))
    finally:
        ctl.close()


def test_an_adopted_scheduler_is_bounded_by_its_current_rate() -> None:
    """An adopted torch scheduler's future is unknown: its rate at the due step is checked."""
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    ctl = attach(model, optimizer, scheduler=scheduler, serve=False, guardrails=Guardrails.parse("layer1.*=..0.2"))
    try:
        with pytest.raises(FailedPreconditionError, match=r"layer1.bias: base 0.3 is above the guardrail max 0.2"):
            ctl.controller.preview(_request("layer1.bias", 0.3))
        assert ctl.controller.preview(_request("layer1.bias", 0.2)).changes[0].new_base == 0.2
    finally:
        ctl.close()


def _request(selector: str, value: float):
    from lrctl.server.requests import ChangeRequest, Update as ServerUpdate

    return ChangeRequest((ServerUpdate(selector, value),))


# -- rejection, whole ------------------------------------------------------------------
def test_a_batch_with_one_violating_name_changes_nothing() -> None:
    with guarded() as (served, client), training(served):
        before = client.status().version
        rates = client.get_learning_rates()
        message = refused(lambda: client.set_learning_rates({"layer1.bias": 0.05, "layer2.weight": 0.5}))
        assert message == "layer2.weight: base 0.5 is above the guardrail max 0.01 of 'layer2.weight'"
        assert client.status().version == before
        assert client.get_learning_rates() == rates
        assert list(client.iter_changes()) == []  # nothing in the history
        # Inside the bounds, the same names change.
        result = client.set_learning_rates({"layer1.bias": 0.05, "layer2.weight": 0.005})
        assert result.applied and client.status().version == before + 1


def test_dry_run_reports_the_rejection_too() -> None:
    with guarded() as (served, client):
        message = refused(lambda: client.set_learning_rates({"layer1.bias": 0.3}, dry_run=True))
        assert message == "layer1.bias: base 0.3 is above the guardrail max 0.2 of 'layer1.*'"
        assert client.set_learning_rates({"layer1.bias": 0.2}, dry_run=True).changes[0].new_lr == 0.2


def test_overlapping_rules_the_tightest_wins() -> None:
    with guarded() as (served, client):
        # layer1.weight: max 0.2 (layer1.*), 2.0 (*) and 0.15 (*.weight): 0.15 wins.
        assert "max 0.15 of '*.weight'" in refused(
            lambda: client.set_learning_rates({"layer1.weight": 0.16}, dry_run=True))
        # min 1e-4 (layer1.*) beats 1e-5 (*.weight).
        assert refused(lambda: client.set_learning_rates({"layer1.weight": 5e-5}, dry_run=True)) == (
            "layer1.weight: base 5e-05 is below the guardrail min 0.0001 of 'layer1.*'")
        # layer2.bias: only '*' (max 2.0); no min, so freezing it is allowed.
        assert "max 2.0 of '*'" in refused(lambda: client.set_learning_rates({"layer2.bias": 2.5}, dry_run=True))
        assert client.set_learning_rates({"layer2.bias": 0.0}, dry_run=True).changes[0].new_lr == 0.0


def test_scale_beyond_max_factor_is_refused() -> None:
    with guarded() as (served, client), training(served):
        version = client.status().version
        # The bounds are checked first: layer2.weight's max is 0.01.
        assert refused(lambda: client.scale_learning_rates("layer2.*", 20)) == (
            "layer2.weight: base 0.02 is above the guardrail max 0.01 of 'layer2.weight'")
        message = refused(lambda: client.scale_learning_rates("layer2.bias", 0.05))
        assert re.fullmatch(r"layer2\.bias: rate 1\.0 -> 0\.05 at step \d+ is a factor of 20, above the "
                            r"guardrail max_factor 10\.0", message), message
        assert client.status().version == version
        # Exactly the factor passes (0.1 x 10 is not exactly 1.0 in floats: a slack allows it).
        assert client.scale_learning_rates("layer2.bias", 0.1).changes[0].new_lr == pytest.approx(0.1)
        assert client.scale_learning_rates("layer1.bias", 1.5).applied
        # To 0 (freeze) and back is no factor: only the bounds apply.
        client.set_learning_rates({"layer2.bias": 0.0})
        assert client.set_learning_rates({"layer2.bias": 1.5}).applied


def test_pin_outside_the_bounds_is_refused() -> None:
    with guarded() as (served, client):
        assert refused(lambda: client.pin_learning_rates({"layer1.bias": 0.5})) == (
            "layer1.bias: pin 0.5 is above the guardrail max 0.2 of 'layer1.*'")
        assert refused(lambda: client.pin_learning_rates({"layer1.*": 0.0}, dry_run=True)).startswith(
            "layer1.weight: pin 0.0 is below the guardrail min 0.0001 of 'layer1.*'")
        # A pin inside is fine, and then the pin (not the base) is what is checked.
        client.pin_learning_rates({"layer1.bias": 0.15}, wait=False)
        served.step()
        assert client.status().version == 1


def test_schedule_whose_peak_exceeds_max_is_refused() -> None:
    with guarded() as (served, client):
        # layer1.weight: base 0.01, max 0.15: a peak factor of 20 gives 0.2.
        peak = PiecewiseLinear(points=[(0, 1.0), (100, 20.0), (200, 0.0)])
        assert refused(lambda: client.set_schedules({"layer1.weight": peak}, dry_run=True)) == (
            "layer1.weight: base 0.01 x schedule peak factor 20.0 = 0.2 is above the guardrail max "
            "0.15 of '*.weight'")
        assert "schedule peak factor inf" in refused(
            lambda: client.set_schedules({"layer2.*": Exponential(gamma=1.01)}, dry_run=True))
        assert "peak factor 4.0 = 4.0" in refused(  # layer2.bias: base 1.0, max 2.0
            lambda: client.set_schedules({"layer2.bias": StepDecay(gamma=2.0, milestones=(10, 20))}, dry_run=True))
        assert "peak factor 3.0" in refused(
            lambda: client.set_schedules({"layer2.bias": Warmup(warmup_steps=5, start_factor=3.0)}, dry_run=True))
        # Peaks at 1 (or below the bound) pass: one-cycle, a warmup from 0, a decay.
        assert client.set_schedules({"*": OneCycle(total_steps=100, div_factor=5)}, dry_run=True).num_changes == 4
        # max_factor applies to a schedule too: one-cycle's default start (base / 25) is a
        # factor of 25 from the rate in force (a warmup from 0 is no factor: it starts at 0).
        assert "is a factor of 25, above the guardrail max_factor 10.0" in refused(
            lambda: client.set_schedules({"*": OneCycle(total_steps=100)}, dry_run=True))
        assert client.set_schedules({"*": Warmup(warmup_steps=5, decay="cosine", total_steps=50)},
                                    dry_run=True).num_changes == 4
        # A base change under a schedule is checked against the schedule's peak.
        client.set_schedules({"layer1.weight": PiecewiseLinear(points=[(0, 1.0), (10, 2.0)])}, wait=False)
        served.step()
        assert "base 0.1 x schedule peak factor 2.0 = 0.2 is above" in refused(
            lambda: client.set_learning_rates({"layer1.weight": 0.1}, dry_run=True))


def test_a_queued_change_is_checked_again_when_due() -> None:
    """Accepted for step 3 (0.01 -> 0.05 is a factor of 5); by then a change moved the
    rate to 0.004, and 0.004 -> 0.05 is a factor of 12.5: refused at its step, and its
    waiting caller is told so."""
    with guarded() as (served, client):
        outcome: dict[str, object] = {}

        def waiting_set() -> None:
            with LRClient(served.ctl.address) as other:
                try:
                    outcome["result"] = other.set_learning_rates(
                        {"layer1.weight": 0.05}, at_step=3, wait=True, timeout=PATIENCE_S)
                except Exception as exc:
                    outcome["error"] = exc

        thread = threading.Thread(target=waiting_set)
        thread.start()
        wait_for(lambda: served.controller.pending_count == 1, "the at_step change to be queued")
        client.set_learning_rates({"layer1.weight": 0.004}, wait=False)
        served.step()  # step 0: the immediate change applies
        assert client.get_learning_rates("layer1.weight") == {"layer1.weight": 0.004}
        served.step(3)  # steps 1, 2, 3: the queued change is due at 3
        thread.join(PATIENCE_S)
        error = outcome.get("error")
        assert isinstance(error, FailedPreconditionError), outcome
        assert re.fullmatch(r"layer1\.weight: rate 0\.004 -> 0\.05 at step 3 is a factor of 12\.5, above the "
                            r"guardrail max_factor 10\.0; change \d+ was not applied", str(error)), str(error)
        assert client.get_learning_rates("layer1.weight") == {"layer1.weight": 0.004}
        assert client.status().version == 1


# -- reporting ---------------------------------------------------------------------------
def test_status_reports_the_guardrails() -> None:
    with guarded() as (served, client):
        status = client.status()
        assert status.guardrails == (
            StatusGuardrail("layer1.*", 1e-4, 0.2),
            StatusGuardrail("*", None, 2.0),
            StatusGuardrail("layer2.weight", None, 0.01),
            StatusGuardrail("*.weight", 1e-5, 0.15),
        )
        assert status.max_factor == 10.0
    with guarded(Guardrails()) as (served, client):
        status = client.status()
        assert status.guardrails == () and status.max_factor is None
        # Without guardrails, anything the dtype holds goes.
        assert client.set_learning_rates({"layer1.weight": 50.0}, dry_run=True).changes[0].new_lr == 50.0


def test_core_checks_without_a_server() -> None:
    """The controller refuses on its own (no grpc in the path), at preview and submit."""
    from lrctl.common.errors import FailedPreconditionError as CoreFailedPrecondition
    from lrctl.server.controller import Controller

    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    controller = Controller(model.named_parameters(), optimizer, guardrails=RAILS)
    try:
        for call in (controller.preview, controller.submit):
            with pytest.raises(CoreFailedPrecondition, match="layer2.weight: base 0.02 is above"):
                call(_request("layer2.weight", 0.02))
        assert controller.pending_count == 0
        assert controller.status().guardrails == RAILS.rules
    finally:
        controller.close()


# -- the demo worker's flags and the CLI ------------------------------------------------
def _start_demo(*extra: str) -> tuple[subprocess.Popen, str]:
    return start_demo_worker("--step-delay", "0.01", *extra)


def test_demo_worker_flags_status_and_cli_rejection() -> None:
    proc, address = _start_demo("--guardrail", "layer1.*=1e-4..0.05", "--guardrail", "*.bias=..2",
                                "--max-factor", "10")
    try:
        status = run_cli(address, "status")
        assert status.returncode == 0, status.stderr
        assert "guardrails:" in status.stdout
        assert "\n  layer1.*=0.0001..0.05\n  *.bias=..2.0\n" in status.stdout
        assert re.search(r"^max_factor: +10\.0$", status.stdout, re.M), status.stdout
        as_json = json.loads(run_cli(address, "status", "--json").stdout)
        assert as_json["guardrails"] == [
            {"selector": "layer1.*", "min_lr": 1e-4, "max_lr": 0.05},
            {"selector": "*.bias", "min_lr": None, "max_lr": 2.0},
        ]
        assert as_json["max_factor"] == 10.0

        done = run_cli(address, "set", "layer1.bias=0.5", "layer2.weight=0.002")
        assert done.returncode == 4
        assert done.stdout == ""
        assert done.stderr == ("lrctl: error: layer1.bias: base 0.5 is above the guardrail max 0.05 of "
                               "'layer1.*'\n")
        done = run_cli(address, "scale", "layer2.weight", "20")
        assert done.returncode == 4 and len(done.stderr.splitlines()) == 1, done.stderr
        assert "is a factor of 20, above the guardrail max_factor 10.0" in done.stderr
        assert json.loads(run_cli(address, "status", "--json").stdout)["version"] == 0
        assert run_cli(address, "set", "layer1.bias=0.05").returncode == 0
        assert proc.poll() is None  # the worker trains on
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert proc.returncode == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--serve", "--guardrail", "layer1.*"], "'layer1.*' is not SELECTOR=MIN..MAX"),
        (["--serve", "--guardrail", "layer1.*=1..0.5"], "min_lr 1.0 is above max_lr 0.5"),
        (["--serve", "--max-factor", "1"], "max_factor 1.0 must be above 1"),
        (["--guardrail", "layer1.*=..1"], "--guardrail and --max-factor need --serve"),
        (["--serve", "--address", "127.0.0.1:0", "--guardrail", "layer9.*=..1"],
         "guardrail 'layer9.*': selector 'layer9.*' matches no parameter"),
    ],
)
def test_demo_bad_guardrail_flags(args: list[str], message: str) -> None:
    done = subprocess.run([*LRCTL, "demo", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("lrctl: error: "), done.stderr
    assert message in done.stderr


@pytest.mark.parametrize(
    "spec",
    [
        Warmup(warmup_steps=5),
        Warmup(warmup_steps=5, start_factor=3.0),
        Warmup(warmup_steps=0, start_factor=3.0),  # no ramp: 3 never occurs
        Warmup(warmup_steps=5, decay="linear", total_steps=20, final_factor=2.5),
        Warmup(warmup_steps=5, decay="cosine", total_steps=20, num_cycles=1.5),
        StepDecay(gamma=0.5, step_size=3),
        StepDecay(gamma=2.0, milestones=(3, 7)),
        OneCycle(total_steps=20),
        OneCycle(total_steps=20, div_factor=0.5),
        OneCycle(total_steps=20, div_factor=2.0, final_div_factor=0.1, three_phase=True),
        PiecewiseLinear(points=[(0, 0.5), (5, 1.7), (10, 0.2)], start_step=3),
    ],
)
def test_peak_factor_is_the_largest_factor(spec) -> None:
    factors = [spec.factor(s) for s in range(40)]
    assert max(factors) == pytest.approx(spec.peak_factor())


def test_growing_schedules_have_no_finite_peak() -> None:
    assert Exponential(gamma=1.01).peak_factor() == math.inf
    assert StepDecay(gamma=1.5, step_size=10).peak_factor() == math.inf
    assert Exponential(gamma=0.9).peak_factor() == 1.0
