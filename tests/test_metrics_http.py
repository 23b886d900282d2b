"""The Prometheus endpoint (lrctl.server.metrics), scraped over real HTTP with urllib
from a worker that trains (real SGD, background stepping), changed through LRClient."""

from __future__ import annotations

import re
import socket
import threading
import urllib.error
import urllib.request
from typing import Iterator

import pytest

from lrctl.client import LRClient
from lrctl.client.errors import LrctlError
from lrctl.server import attach
from lrctl.server.metrics import CONTENT_TYPE, ENV, check_metrics_bind, escape_label

from conftest import PATIENCE_S, SEED_NAMES, Trainer, group_lrs, per_parameter_optimizer, seed_model, wait_for

# A selector whose text needs every escape of the format: backslash, quote, newline.
WEIRD = 're:^layer1\\.[wb]"?' + "\n?"
SET_METHOD = "lrctl.v1.LearningRateControl/SetLearningRates"

# --- a small strict parser of the text format (0.0.4) ---------------------------
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{((?:{_LABEL})(?:,{_LABEL})*)?\}})? (\S+)$")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def _unescape(value: str) -> str:
    return re.sub(r'\\([\\"n])', lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """metric name -> {sorted label pairs: value}; fails on anything the format forbids:
    a sample without HELP and TYPE before it, a family declared twice or split, a
    malformed line, a bad value, a repeated sample."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    families: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    helped: set[str] = set()
    typed: dict[str, str] = {}
    closed: set[str] = set()
    current = None
    for line in text[:-1].split("\n"):
        assert line, "an empty line in the exposition"
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert re.fullmatch(_NAME, name) and name not in helped, line
            helped.add(name)
            if current is not None and current != name:
                closed.add(current)
            current = name
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name == current and name in helped and name not in typed, f"TYPE out of place: {line!r}"
            assert kind in _TYPES, line
            typed[name] = kind
            families[name] = {}
            continue
        assert not line.startswith("#"), f"unexpected comment {line!r}"
        m = _SAMPLE.match(line)
        assert m, f"malformed sample line {line!r}"
        name, labels, value = m.groups()
        assert name == current and name in typed and name not in closed, f"sample outside its family: {line!r}"
        key = tuple(sorted((k, _unescape(v)) for k, v in _LABEL_RE.findall(labels or "")))
        assert key not in families[name], f"repeated sample {line!r}"
        families[name][key] = float(value)  # "+Inf", "NaN" parse too
    return families


def scrape(address: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=PATIENCE_S) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"] == CONTENT_TYPE
        return parse(reply.read().decode("utf-8"))


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics[name][tuple(sorted(labels.items()))]


# --- fixtures -----------------------------------------------------------------------
@pytest.fixture
def worker(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple]:
    """The seed model under lrctl with metrics on a free loopback port, training."""
    monkeypatch.delenv(ENV, raising=False)
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    ctl = attach(model, optimizer, address="127.0.0.1:0", metrics_address="127.0.0.1:0",
                 metrics_selectors=("layer1.*", "layer2.weight", WEIRD))
    trainer = Trainer(model, optimizer).start()
    try:
        trainer.wait_steps(3)
        yield ctl, model, optimizer, trainer
    finally:
        trainer.stop()
        ctl.close(grace=0.5)
    assert not trainer.errors, f"the training loop raised: {trainer.errors!r}"


# --- tests --------------------------------------------------------------------------
def test_scrape_is_valid_and_consistent_with_status_and_groups(worker: tuple) -> None:
    ctl, model, optimizer, trainer = worker
    with LRClient(ctl.address) as client:
        before = client.status()
        trainer.pause()
        try:
            metrics = scrape(ctl.metrics_address)
            status = client.status()
            lrs = group_lrs(model, optimizer)
            groups = [float(g["lr"]) for g in optimizer.param_groups]
        finally:
            trainer.resume()
    for name in ("lrctl_step", "lrctl_steps_per_second", "lrctl_config_version",
                 "lrctl_pending_changes", "lrctl_learning_rate", "lrctl_changes_total",
                 "lrctl_requests_total", "lrctl_learning_rate_selector",
                 "lrctl_learning_rate_selector_min", "lrctl_learning_rate_selector_max"):
        assert name in metrics, name
    assert value(metrics, "lrctl_step") == status.step >= before.step >= 3
    assert value(metrics, "lrctl_config_version") == status.version == 0
    assert value(metrics, "lrctl_pending_changes") == status.pending_changes == 0
    assert value(metrics, "lrctl_steps_per_second") > 0
    assert {k[0][1]: v for k, v in metrics["lrctl_learning_rate"].items()} == {
        str(g): lr for g, lr in enumerate(groups)}
    assert len(groups) == status.num_param_groups
    assert sorted(set(lrs.values())) == sorted(set(groups))
    assert value(metrics, "lrctl_changes_total", status="OK") == 0
    # GetStatus calls went through the handlers: counted with their method and code.
    assert value(metrics, "lrctl_requests_total",
                 method="lrctl.v1.LearningRateControl/GetStatus", code="OK") >= 1


def test_selector_metrics_mean_min_max_and_escaping(worker: tuple) -> None:
    ctl, model, optimizer, _ = worker
    metrics = scrape(ctl.metrics_address)
    lrs = ctl.controller.learning_rates()
    l1 = [lrs["layer1.weight"], lrs["layer1.bias"]]
    assert l1[0] != l1[1]  # the seed rates differ: the mean is reported
    assert value(metrics, "lrctl_learning_rate_selector", selector="layer1.*") == pytest.approx(sum(l1) / 2)
    assert value(metrics, "lrctl_learning_rate_selector_min", selector="layer1.*") == min(l1)
    assert value(metrics, "lrctl_learning_rate_selector_max", selector="layer1.*") == max(l1)
    for suffix in ("", "_min", "_max"):
        assert value(metrics, f"lrctl_learning_rate_selector{suffix}",
                     selector="layer2.weight") == lrs["layer2.weight"]
    # The weird selector matched layer1.*; the parser unescaped its label to the text given.
    assert value(metrics, "lrctl_learning_rate_selector_max", selector=WEIRD) == max(l1)
    with urllib.request.urlopen(f"http://{ctl.metrics_address}/metrics", timeout=PATIENCE_S) as reply:
        raw = reply.read().decode()
    assert 'selector="re:^layer1\\\\.[wb]\\"?\\n?"' in raw
    # All names of a selector share a rate after a set: the value is that rate, exactly.
    with LRClient(ctl.address) as client:
        client.set_learning_rates({"layer1.*": 0.07})
    metrics = scrape(ctl.metrics_address)
    for suffix in ("", "_min", "_max"):
        assert value(metrics, f"lrctl_learning_rate_selector{suffix}", selector="layer1.*") == 0.07


def test_escape_label() -> None:
    assert escape_label('a\\b"c\nd') == 'a\\\\b\\"c\\nd'


def test_remote_change_moves_group_rate_and_counters(worker: tuple) -> None:
    ctl, model, optimizer, trainer = worker
    before = scrape(ctl.metrics_address)
    with LRClient(ctl.address) as client:
        result = client.set_learning_rates({"layer2.bias": 0.0123}, reason="metrics test")
        trainer.wait_steps(1)
        after = scrape(ctl.metrics_address)
        status = client.status()
    assert value(after, "lrctl_changes_total", status="OK") == value(before, "lrctl_changes_total", status="OK") + 1
    assert value(after, "lrctl_config_version") == result.version == status.version
    groups = {k[0][1]: v for k, v in after["lrctl_learning_rate"].items()}
    assert 0.0123 in groups.values()
    assert 0.0123 not in {k[0][1]: v for k, v in before["lrctl_learning_rate"].items()}.values()
    assert group_lrs(model, optimizer)["layer2.bias"] == 0.0123
    assert value(after, "lrctl_requests_total", method=SET_METHOD, code="OK") == 1


def test_rejected_set_is_counted_with_its_code(worker: tuple) -> None:
    ctl, *_ = worker
    with LRClient(ctl.address) as client:
        with pytest.raises(LrctlError) as bad:
            client.set_learning_rates({"layer1.weight": -1.0})
        assert bad.value.code == "INVALID_ARGUMENT"
        with pytest.raises(LrctlError) as missing:
            client.set_learning_rates({"no.such.param": 0.1})
        assert missing.value.code == "NOT_FOUND"
    metrics = scrape(ctl.metrics_address)
    assert value(metrics, "lrctl_requests_total", method=SET_METHOD, code="INVALID_ARGUMENT") == 1
    assert value(metrics, "lrctl_requests_total", method=SET_METHOD, code="NOT_FOUND") == 1
    # Never queued: no change was recorded, nothing applied.
    assert metrics["lrctl_changes_total"] == {(("status", "OK"),): 0.0}
    assert value(metrics, "lrctl_config_version") == 0


def test_change_failed_at_its_step_is_counted_by_status(worker: tuple) -> None:
    ctl, _, _, trainer = worker
    with LRClient(ctl.address) as client:
        trainer.pause()
        try:
            queued = client.set_learning_rates({"layer1.bias": 0.02}, wait=False, at_step=ctl.step + 1000)
            client.cancel_changes([queued.change_id], reason="metrics test")
        finally:
            trainer.resume()
    metrics = scrape(ctl.metrics_address)
    assert value(metrics, "lrctl_changes_total", status="ABORTED") == 1
    assert value(metrics, "lrctl_changes_total", status="OK") == 0


def test_unknown_path_is_404(worker: tuple) -> None:
    ctl, *_ = worker
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://{ctl.metrics_address}/", timeout=PATIENCE_S)
    assert err.value.code == 404


def test_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    model = seed_model()
    ctl = attach(model, per_parameter_optimizer(model), address="127.0.0.1:0")
    try:
        assert ctl.metrics_address is None
        # No endpoint, so no listening thread and no port of its own.
        assert not [t for t in threading.enumerate() if t.name == "lrctl-metrics"]
    finally:
        ctl.close()


def test_env_turns_it_on_and_close_stops_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "127.0.0.1:0")
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    ctl = attach(model, optimizer, serve=False)
    address = ctl.metrics_address
    assert address is not None and address.startswith("127.0.0.1:")
    optimizer.step()
    metrics = scrape(address)
    assert value(metrics, "lrctl_step") == 1
    assert "lrctl_requests_total" not in metrics  # serve=False: no gRPC calls to count
    ctl.close()
    assert ctl.metrics_address == address
    assert not [t for t in threading.enumerate() if t.name == "lrctl-metrics"]
    host, port = address.rsplit(":", 1)
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=PATIENCE_S).close()


def test_empty_address_keeps_it_off_despite_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "127.0.0.1:0")
    model = seed_model()
    ctl = attach(model, per_parameter_optimizer(model), serve=False, metrics_address="")
    try:
        assert ctl.metrics_address is None
    finally:
        ctl.close()


@pytest.mark.parametrize("address", ["0.0.0.0:9108", "[::]:9108", "10.1.2.3:9108", "example.com:9108"])
def test_non_loopback_refused_without_consent(address: str) -> None:
    with pytest.raises(ValueError, match="metrics reveal parameter names") as err:
        check_metrics_bind(address, insecure=False)
    assert address in str(err.value) and "--metrics-insecure" in str(err.value)


def test_non_loopback_allowed_with_consent_warns(capsys: pytest.CaptureFixture[str]) -> None:
    endpoint = check_metrics_bind("0.0.0.0:9108", insecure=True)
    assert (endpoint.host, endpoint.port) == ("0.0.0.0", 9108)
    assert "WITHOUT authentication" in capsys.readouterr().err


@pytest.mark.parametrize("address", ["127.0.0.1:9108", "localhost:0", "[::1]:9108"])
def test_loopback_passes(address: str) -> None:
    check_metrics_bind(address, insecure=False)


@pytest.mark.parametrize("address, message", [
    ("unix:/tmp/m.sock", "must be HOST:PORT"), ("127.0.0.1", "port missing"),
])
def test_bad_metrics_address(address: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_metrics_bind(address, insecure=False)


def test_attach_refuses_before_touching_the_optimizer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    hooks = dict(optimizer._optimizer_step_pre_hooks)
    with pytest.raises(ValueError, match="refusing to serve metrics on 0.0.0.0:0"):
        attach(model, optimizer, address="127.0.0.1:0", metrics_address="0.0.0.0:0")
    with pytest.raises(ValueError, match="metrics selector 'nope.*'"):
        attach(model, optimizer, address="127.0.0.1:0", metrics_address="127.0.0.1:0",
               metrics_selectors=("nope.*",))
    assert dict(optimizer._optimizer_step_pre_hooks) == hooks  # nothing left attached


def test_demo_worker_serves_metrics() -> None:
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "lrctl.client.cli", "demo", "--serve", "--address", "127.0.0.1:0",
         "--metrics-address", "127.0.0.1:0", "--metrics-selector", "layer1.*", "--step-delay", "0.01"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = None
        for line in proc.stdout:  # type: ignore[union-attr]
            m = re.search(r"curl -s (\S+)/metrics", line)
            if m:
                address = m.group(1)
                break
        assert address, "the demo did not print the metrics address"
        metrics = wait_for(lambda: (m := scrape(address)) and value(m, "lrctl_step") > 0 and m,
                           "the demo to step")
        assert ("selector", "layer1.*") in next(iter(metrics["lrctl_learning_rate_selector"]))
        assert {k[0][1] for k in metrics["lrctl_learning_rate"]} == {"0", "1", "2", "3"}
        assert len(SEED_NAMES) == 4
    finally:
        proc.terminate()
        proc.communicate(timeout=PATIENCE_S)
    assert proc.returncode == 0
