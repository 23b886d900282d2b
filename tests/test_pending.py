"""The queue of accepted changes (issue 15: no lockouts, bounded in bytes).

ListPending / CancelChanges through the raw stubs, LRClient and the CLI as a subprocess;
the at_step horizon; quotas per connection and per token; the queue's byte bound; the
selector caches' byte bound; and reply pages that fit a client with gRPC's default 4 MiB
receive limit when names are long. Workers are real (port 0), nothing is mocked; the
tests that need nothing applied simply do not step the optimizer.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

torch = pytest.importorskip("torch")

from conftest import PATIENCE_S, SEED_LRS, Served, rpc_error, stepping, wait_for  # noqa: E402
from lrctl.client.client import LRClient  # noqa: E402
from lrctl.client.errors import (  # noqa: E402
    AbortedError,
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
)
from lrctl.common.errors import ResourceExhaustedError as CoreResourceExhausted  # noqa: E402
from lrctl.server import attach, selectors  # noqa: E402
from lrctl.server.auth import ADMIN, READER, Token, Tokens  # noqa: E402
from lrctl.server.bounded_cache import BoundedCache  # noqa: E402
from lrctl.server.controller import Controller  # noqa: E402
from lrctl.server.queue_limits import QueueLimits, estimate_bytes  # noqa: E402
from lrctl.server.requests import ChangeRequest, Update  # noqa: E402
from lrctl.server.service import PAGE_BYTES  # noqa: E402
from lrctl.v1 import lrctl_pb2 as pb  # noqa: E402
from lrctl.v1 import lrctl_pb2_grpc as pb_grpc  # noqa: E402

T = 10.0
FAR = 500_000  # a step no test reaches, within the default max_steps_ahead
DEFAULT_CLIENT_LIMIT = 4 * 1024 * 1024  # gRPC's default receive limit


def run_cli(address: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LRCTL_")}
    return subprocess.run([sys.executable, "-m", "lrctl.client.cli", "--address", address, *args],
                          capture_output=True, text=True, env={**clean, **(env or {})}, timeout=60)


def one_error_line(proc: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    assert proc.returncode == code, f"exit {proc.returncode}, wanted {code}: {proc.stderr}"
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lrctl: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def queue(client: LRClient, selector: str = "layer1.weight", value: float = 0.5, **options: Any) -> int:
    """Queue a no-wait change due at FAR (unless told otherwise); its change id."""
    options.setdefault("at_step", FAR)
    return client.set_learning_rates({selector: value}, wait=False, **options).change_id


# -- listing -------------------------------------------------------------------------


def test_list_pending_pages_through_the_queue_in_order(served: Served) -> None:
    with LRClient(served.ctl.address, user="pytest@pending") as client:
        ids = [queue(client, reason=f"r{k}", at_step=FAR + k) for k in range(7)]
        ids.append(client.set_learning_rates({"layer2.*": 0.25}, wait=False, expected_version=0).change_id)
        listed = client.list_pending(page_size=3)
    assert [p.change_id for p in listed] == ids
    first = listed[0]
    assert (first.at_step, first.reason, first.user, first.waiting, first.num_names) == (FAR, "r0", "pytest@pending", False, 1)
    assert first.peer.startswith("ipv4:127.0.0.1:") and first.expected_version is None
    assert [(u.selector, u.value) for u in first.updates] == [("layer1.weight", 0.5)]
    last = listed[-1]
    assert (last.at_step, last.num_names, last.expected_version) == (None, 2, 0)

    pages = []
    token = ""
    while True:
        reply = served.stub.ListPending(pb.ListPendingRequest(page_size=3, page_token=token), timeout=T)
        pages.append([c.change_id for c in reply.changes])
        assert reply.total_size == 8
        token = reply.next_page_token
        if not token:
            break
    assert pages == [ids[:3], ids[3:6], ids[6:]]
    assert served.controller.status().pending_changes == 8
    err = rpc_error(lambda: served.stub.ListPending(pb.ListPendingRequest(page_token="bogus"), timeout=T))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "bogus" in err.details()


# -- cancelling ----------------------------------------------------------------------


def test_a_cancelled_no_wait_change_is_never_applied(served: Served) -> None:
    with LRClient(served.ctl.address) as client:
        doomed = queue(client, at_step=2)
        kept = queue(client, "layer2.bias", 0.125, at_step=2)
        result = client.cancel_changes([doomed], reason="changed my mind")
        assert (result.cancelled, result.not_found) == ([doomed], [])
        assert [p.change_id for p in client.list_pending()] == [kept]
        served.step(4)  # past at_step 2: only the kept change applies
        rates = client.get_learning_rates()
        assert rates["layer1.weight"] == SEED_LRS["layer1.weight"] and rates["layer2.bias"] == 0.125
        # The cancelled change is recorded as failed (ABORTED, who and why), the kept applied.
        history = client.list_changes()
        assert [(r.change_id, r.status) for r in history] == [(doomed, "ABORTED"), (kept, "")]
        assert "was cancelled by" in history[0].error and "changed my mind" in history[0].error
        assert client.list_pending() == []
        # Applied, cancelled or never queued: all "not found", none an error.
        again = client.cancel_changes([doomed, kept, 424242])
        assert (again.cancelled, again.not_found) == ([], [doomed, kept, 424242])


def test_a_waiting_caller_of_a_cancelled_change_gets_aborted_at_once(served: Served) -> None:
    outcome: list[BaseException | object] = []

    def wait_for_it() -> None:
        with LRClient(served.ctl.address, user="waiter@host", timeout=PATIENCE_S * 4) as waiter:
            try:
                outcome.append(waiter.set_learning_rates({"layer1.bias": 0.75}, at_step=FAR))
            except BaseException as exc:
                outcome.append(exc)

    thread = threading.Thread(target=wait_for_it)
    thread.start()
    with LRClient(served.ctl.address, user="admin@host") as client:
        waiting = wait_for(lambda: [p for p in client.list_pending() if p.waiting], "the waiting change")
        (change,) = waiting
        assert change.user == "waiter@host" and change.at_step == FAR
        result = client.cancel_changes([change.change_id], reason="not now")
    assert result.cancelled == [change.change_id]
    # Its deadline is minutes away: only the cancel can have answered it, and with ABORTED.
    thread.join(PATIENCE_S)
    assert not thread.is_alive()
    (error,) = outcome
    assert isinstance(error, AbortedError), error
    message = str(error)
    assert f"change {change.change_id} was cancelled by admin@host" in message
    assert "before it was applied" in message and "not now" in message
    served.step(2)
    assert served.rates()["layer1.bias"] == SEED_LRS["layer1.bias"]
    (record,) = served.controller.history(0, 10)[0]
    assert (record.change_id, record.status, record.version) == (change.change_id, "ABORTED", 0)


def test_cancel_needs_ids(served: Served) -> None:
    err = rpc_error(lambda: served.stub.CancelChanges(pb.CancelChangesRequest(), timeout=T))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "change_ids" in err.details()


ADMIN_SECRET, READER_SECRET, CAROL_SECRET = (secrets.token_urlsafe(24) for _ in range(3))


@pytest.fixture
def tokened() -> Iterator[Served]:
    """The seed model served with tokens alice (admin), carol (admin) and bob (reader);
    alice may queue at most 4 changes, each connection 100."""
    from conftest import per_parameter_optimizer, seed_model

    model = seed_model()
    optimizer = per_parameter_optimizer(model)
    tokens = Tokens([Token("alice", ADMIN, ADMIN_SECRET), Token("bob", READER, READER_SECRET),
                     Token("carol", ADMIN, CAROL_SECRET)])
    ctl = attach(model, optimizer, address="127.0.0.1:0", tokens=tokens,
                 queue_limits=QueueLimits(max_changes_per_token=4))
    served = Served(model, optimizer, ctl)
    try:
        yield served
    finally:
        served.close()


def test_a_reader_lists_but_cannot_cancel(tokened: Served) -> None:
    address = tokened.ctl.address
    with LRClient(address, token=ADMIN_SECRET) as admin, LRClient(address, token=READER_SECRET) as reader:
        change_id = queue(admin)
        (listed,) = reader.list_pending()
        assert (listed.change_id, listed.role, listed.token_name) == (change_id, "admin", "alice")
        with pytest.raises(PermissionDeniedError, match="CancelChanges needs an admin token"):
            reader.cancel_changes([change_id])
        assert [p.change_id for p in admin.list_pending()] == [change_id]
    proc = run_cli(address, "pending", "--cancel", str(change_id), env={"LRCTL_TOKEN": READER_SECRET})
    one_error_line(proc, 5, "admin")
    assert tokened.controller.pending_count == 1


# -- the CLI -------------------------------------------------------------------------


def test_cli_lists_and_cancels_queued_changes(served: Served) -> None:
    address = served.ctl.address
    proc = run_cli(address, "pending")
    assert proc.returncode == 0 and proc.stdout.strip() == "no queued changes", proc
    with LRClient(address, user="cli@host") as client:
        first = queue(client, reason="nasty\x1b[2J\x1b]0;pwned\x07 reason")
        second = queue(client, "re:^layer2\\.", 2.0)
    proc = run_cli(address, "pending")
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["CHANGE", "AT_STEP", "AGE", "USER", "PEER", "WAIT", "NAMES", "UPDATES", "REASON"]
    assert lines[1].split()[:2] == [str(first), str(FAR)] and "cli@host" in lines[1]
    assert "layer1.weight=0.5" in lines[1] and "nasty\\x1b[2J" in lines[1]
    assert lines[2].split()[0] == str(second) and " 2 " in lines[2] and "re:^layer2\\.=2.0" in lines[2]

    listed = json.loads(run_cli(address, "pending", "--json").stdout)
    assert [c["change_id"] for c in listed] == [first, second]
    assert listed[0]["reason"].startswith("nasty\x1b") and listed[1]["num_names"] == 2

    proc = run_cli(address, "pending", "--cancel", str(first), "987654", "--reason", "cleanup")
    assert proc.stdout.strip() == f"cancelled change {first}: it will not be applied"
    one_error_line(proc, 4, "987654")
    assert str(first) not in proc.stderr
    proc = run_cli(address, "pending", "--cancel", str(second), "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"cancelled": [second], "not_found": []}
    assert served.controller.pending_count == 0
    one_error_line(run_cli(address, "pending", "--cancel", "x"), 2, "x")


# -- the at_step horizon -------------------------------------------------------------


def test_at_step_more_than_max_steps_ahead_is_refused(served: Served) -> None:
    bound = served.controller.queue_limits.max_steps_ahead
    assert bound == 1_000_000
    served.step(3)
    with LRClient(served.ctl.address) as client:
        with pytest.raises(InvalidArgumentError) as info:
            client.set_learning_rates({"layer1.weight": 0.5}, wait=False, at_step=3 + bound + 1)
        message = str(info.value)
        assert f"at_step {3 + bound + 1}" in message and "next step is 3" in message and str(bound) in message
        assert queue(client, at_step=3 + bound) > 0  # the bound itself is fine
    proc = run_cli(served.ctl.address, "set", "layer1.weight=0.5", "--no-wait", "--at-step", str(2**62))
    one_error_line(proc, 4, f"at_step {2**62}", "too far ahead", "next step is 3", "max_steps_ahead")
    proc = run_cli(served.ctl.address, "set", "layer1.weight=0.5", "--dry-run", "--at-step", str(2**62))
    one_error_line(proc, 4, "too far ahead")
    assert served.controller.pending_count == 1


def test_max_steps_ahead_is_an_attach_option() -> None:
    from conftest import per_parameter_optimizer, seed_model

    model = seed_model()
    with attach(model, per_parameter_optimizer(model), address="127.0.0.1:0",
                queue_limits=QueueLimits(max_steps_ahead=10)) as ctl, LRClient(ctl.address) as client:
        assert queue(client, at_step=10) > 0
        with pytest.raises(InvalidArgumentError, match="at most 10 steps past it"):
            queue(client, at_step=11)


# -- quotas ----------------------------------------------------------------------------


def test_one_connection_cannot_fill_the_queue_for_others() -> None:
    from conftest import per_parameter_optimizer, seed_model

    model = seed_model()
    limits = QueueLimits(max_changes_per_connection=5, max_changes=8)
    with attach(model, per_parameter_optimizer(model), address="127.0.0.1:0", queue_limits=limits) as ctl, \
            LRClient(ctl.address) as greedy, LRClient(ctl.address) as polite:
        for _ in range(5):
            queue(greedy)
        with pytest.raises(ResourceExhaustedError) as info:
            queue(greedy)
        message = str(info.value)
        assert "already has 5 queued changes" in message and "max_changes_per_connection 5" in message
        assert "lrctl pending --cancel" in message
        peers = {p.peer for p in polite.list_pending()}
        assert len(peers) == 1 and next(iter(peers)) in message
        # The other connection still gets in, and a waiting change of its own applies.
        for _ in range(3):
            queue(polite)
        with pytest.raises(ResourceExhaustedError, match="8 changes already wait.*max_changes 8"):
            queue(polite)
        cancelled = polite.cancel_changes([p.change_id for p in polite.list_pending()][:1]).cancelled
        assert len(cancelled) == 1
        with stepping(ctl.controller.optimizer):
            assert polite.set_learning_rates({"layer2.bias": 0.5}).applied


def test_one_token_cannot_fill_the_queue_for_other_tokens(tokened: Served) -> None:
    address = tokened.ctl.address
    # Three connections of alice's: the token quota (4) binds before any connection's (100).
    clients = [LRClient(address, token=ADMIN_SECRET) for _ in range(3)]
    try:
        for k in range(4):
            queue(clients[k % 2])
        with pytest.raises(ResourceExhaustedError) as info:
            queue(clients[2])
        assert "token 'alice' already has 4 queued changes" in str(info.value)
        assert "max_changes_per_token 4" in str(info.value) and "lrctl pending --cancel" in str(info.value)
        with LRClient(address, token=CAROL_SECRET) as carol:
            assert queue(carol) > 0
            assert len(carol.list_pending()) == 5
    finally:
        for client in clients:
            client.close()


# -- bytes ---------------------------------------------------------------------------


def _controller(**limits: int) -> Controller:
    from conftest import per_parameter_optimizer, seed_model

    model = seed_model()
    return Controller(model.named_parameters(), per_parameter_optimizer(model), queue_limits=QueueLimits(**limits))


def _request(peer: str, reason: str = "", token: str = "") -> ChangeRequest:
    return ChangeRequest(updates=(Update("layer1.weight", 0.5),), at_step=FAR, reason=reason, peer=peer,
                         token=token)


def test_the_queue_is_bounded_in_bytes_in_all_and_per_connection() -> None:
    # Each change carries a 4,000-character reason: about 6 KB in the queue.
    reason = "r" * 4000
    size, small = (estimate_bytes(_request("a", text), {0: None}) for text in (reason, ""))
    assert 4000 < size < 10_000 and small < 3000
    controller = _controller(max_bytes=10 * size, max_bytes_per_connection=2 * size + small,
                             max_bytes_per_token=40_000)
    first, _ = controller.submit(_request("a", reason))
    assert first.size == size
    controller.submit(_request("a", reason))
    with pytest.raises(CoreResourceExhausted) as info:
        controller.submit(_request("a", reason))
    message = str(info.value)
    assert "connection a's queued changes" in message and "max_bytes_per_connection" in message
    assert f"this change (about {size / 1024:.1f} KiB)" in message and "lrctl pending --cancel" in message
    # Small changes of the same connection still fit; others are not locked out.
    controller.submit(_request("a"))
    for peer in "bcdefghijklm":
        try:
            controller.submit(_request(peer, reason))
        except CoreResourceExhausted as exc:
            assert "over its bound (max_bytes" in str(exc)
            break
    else:
        pytest.fail("the queue's byte bound never refused a change")
    assert sum(v.size for v in controller.pending()) <= 10 * size
    # Per token, across connections.
    controller = _controller(max_bytes_per_token=2 * size + small)
    controller.submit(_request("a", reason, token="t"))
    controller.submit(_request("b", reason, token="t"))
    with pytest.raises(CoreResourceExhausted, match="token 't'.*max_bytes_per_token"):
        controller.submit(_request("c", reason, token="t"))
    controller.submit(_request("c", reason, token="u"))


def test_a_change_bigger_than_the_byte_bound_still_fits_an_empty_queue() -> None:
    controller = _controller(max_bytes=1000, max_bytes_per_connection=1000)
    big, _ = controller.submit(_request("a", "r" * 4000))
    assert big.size > 1000
    with pytest.raises(CoreResourceExhausted, match="connection a"):
        controller.submit(_request("a"))
    with pytest.raises(CoreResourceExhausted, match="over its bound"):
        controller.submit(_request("b"))


def test_selector_cache_is_bounded_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many distinct heavy regexes (each ~1-3 MB compiled) keep the parsed-selector
    cache under its byte bound; the match cache, too, by the bytes of its arrays."""
    cache: BoundedCache = BoundedCache(8 * 1024 * 1024, 1000)
    monkeypatch.setattr(selectors, "SELECTOR_CACHE", cache)
    index = selectors.NameIndex([f"encoder.layers.{i}.weight" for i in range(300)])
    heavy_sizes = []
    for k in range(12):
        text = f"re:(?:x{{100}}){{100}}|layers\\.{k}\\."
        assert list(index.match(text)) == [index.position[f"encoder.layers.{k}.weight"]]
        heavy_sizes.append(selectors.parse_selector(text).size)
        assert cache.bytes <= cache.max_bytes
    assert min(heavy_sizes) > 2 * 1024 * 1024  # the estimate sees the expansion
    assert 0 < len(cache) < 12
    assert cache.bytes == sum(selectors.parse_selector(t).size for t in [
        f"re:(?:x{{100}}){{100}}|layers\\.{k}\\." for k in range(12 - len(cache), 12)])
    # Exact names are not cached at all (a big batch would push patterns out).
    before = len(cache)
    index.match("encoder.layers.1.weight")
    assert len(cache) == before
    # The match cache: arrays of positions, bounded by their bytes.
    small = selectors.NameIndex([f"n{i}" for i in range(20_000)])
    monkeypatch.setattr(small, "_matches", BoundedCache(200_000, 10_000))  # ~16 KB an array here
    for k in range(40):
        assert len(small.match(f"re:^n.*[{k % 10}]$|^n{k}$")) >= 2000
        assert small._matches.bytes <= 200_000
    assert len(small._matches) < 40


def test_bounded_cache_evicts_least_recently_used() -> None:
    cache: BoundedCache = BoundedCache(100, 3)
    cache.put("a", 1, 40)
    cache.put("b", 2, 40)
    assert cache.get("a") == 1  # now b is the oldest
    cache.put("c", 3, 40)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.bytes == 80
    cache.put("huge", 4, 101)
    assert cache.get("huge") is None and cache.bytes == 80
    for k in range(5):
        cache.put(k, k, 1)
    assert len(cache) == 3 and cache.bytes == 3


# -- reply pages that fit a default client -----------------------------------------


@pytest.fixture(scope="module")
def long_names() -> Iterator[tuple[list[str], Any]]:
    """6,000 parameters with ~1,000-character names (6 MB of names), served."""
    names = [f"{'deep.' * 199}w{k:05d}" for k in range(6000)]
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in names]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    ctl = attach(list(zip(names, params)), optimizer, address="127.0.0.1:0")
    try:
        yield names, ctl
    finally:
        ctl.close(grace=0.5)


def _default_stub(address: str) -> tuple[grpc.Channel, pb_grpc.LearningRateControlStub]:
    channel = grpc.insecure_channel(address)  # gRPC's default 4 MiB receive limit
    return channel, pb_grpc.LearningRateControlStub(channel)


def _page_through(call: Any, request: Any, field: str) -> tuple[list[Any], int]:
    items: list[Any] = []
    pages = 0
    while True:
        reply = call(request, timeout=60)
        assert reply.ByteSize() <= DEFAULT_CLIENT_LIMIT
        items += list(getattr(reply, field))
        pages += 1
        if not reply.next_page_token:
            return items, pages
        request.page_token = reply.next_page_token


def test_pages_of_long_names_fit_a_default_client(long_names: tuple[list[str], Any]) -> None:
    names, ctl = long_names
    channel, stub = _default_stub(ctl.address)
    with channel:
        full, pages = _page_through(stub.ListParameters, pb.ListParametersRequest(page_size=5000), "parameters")
        assert [p.name for p in full] == names and pages >= 2
        assert full[0].hyperparameters["momentum"] == pytest.approx(0.9)
        listed, pages = _page_through(
            stub.ListParameters, pb.ListParametersRequest(page_size=5000, view=pb.PARAMETER_VIEW_NAMES), "names")
        assert listed == names and pages >= 2
        rates, pages = _page_through(stub.GetLearningRates, pb.GetLearningRatesRequest(page_size=50_000), "rates")
        assert [r.name for r in rates] == names and pages >= 2 and {r.lr for r in rates} == {0.1}
    with LRClient(ctl.address) as client:
        assert client.list_names() == names


def test_pending_pages_of_big_changes_fit_a_default_client(long_names: tuple[list[str], Any]) -> None:
    names, ctl = long_names
    channel, stub = _default_stub(ctl.address)
    with channel:
        ids = []
        for k in range(5):  # five changes of 1,000 long exact names: ~1 MB each as sent
            chunk = names[k * 1000:(k + 1) * 1000]
            request = pb.SetLearningRatesRequest(
                updates=[pb.LearningRateUpdate(selector=n, mode=pb.UPDATE_MODE_ABSOLUTE, value=0.5) for n in chunk],
                at_step=FAR)
            ids.append(stub.SetLearningRates(request, timeout=60).change_id)
        # One change bigger than a page on its own (submitted in process: no gRPC limit).
        huge, _ = ctl.controller.submit(ChangeRequest(
            updates=tuple(Update(n, 0.25) for n in names), at_step=FAR, peer="local"))
        listed, pages = _page_through(stub.ListPending, pb.ListPendingRequest(), "changes")
        assert [c.change_id for c in listed] == [*ids, huge.change_id] and pages >= 3
        assert [len(c.updates) for c in listed[:5]] == [1000] * 5
        assert listed[-1].num_names == 6000 and 0 < len(listed[-1].updates) < 6000
        assert listed[-1].ByteSize() <= PAGE_BYTES
        stub.CancelChanges(pb.CancelChangesRequest(change_ids=[*ids, huge.change_id]), timeout=T)
    assert ctl.controller.pending_count == 0
