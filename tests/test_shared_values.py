"""The values the training process publishes in shared memory for its serving process
(lrctl.server.serving_wire: the step and version stamp, and each version's read
snapshot) are read only as they were written: each carries a check word, and a reader
takes nothing that does not match it: a value its writer stopped half-way through, a
mix of two writes, or bytes damaged in place; and a reader of the step never waits for
its writer (two slots). Checked with the writer and a reader in two processes at once,
as they run."""

from __future__ import annotations

import marshal
import mmap
import os
import subprocess
import sys
import textwrap
import time
from typing import Iterator

import pytest

from lrctl.server import serving_wire as wire


@pytest.fixture()
def shared() -> Iterator[mmap.mmap]:
    fd = os.memfd_create("lrctl-test-shared")
    os.ftruncate(fd, wire.SHARED_BYTES)
    buffer = mmap.mmap(fd, wire.SHARED_BYTES)
    os.close(fd)
    yield buffer
    buffer.close()


def _snapshot(version: int, names: int = 8) -> tuple:
    """A body shaped like read_model.VersionedPart.to_wire(), its version first."""
    return (version, 0, version * 3, bytes(names * 8), {c: ((0, 0.1 * c, 0), 1.0) for c in range(names)},
            {}, {}, {}, bytes(names * 8), b"", 1)


def test_the_step_and_a_snapshot_read_back_as_written(shared: mmap.mmap) -> None:
    wire.write_shared(shared, 41, wire.stamp(2, 7))
    assert wire.read_shared(shared) == (41, wire.stamp(2, 7))
    assert wire.read_snapshot(shared, newer_than=0) is None  # none written yet
    assert wire.write_snapshot(shared, 5, _snapshot(5))
    assert wire.read_snapshot(shared, newer_than=4) == _snapshot(5)
    assert wire.read_snapshot(shared, newer_than=5) is None  # not newer than the reader's
    assert not wire.write_snapshot(shared, 6, (b"x" * wire.SHARED_BYTES,))  # too big: the link sends it
    assert wire.read_snapshot(shared, newer_than=4) == _snapshot(5)


def test_a_step_written_half_way_leaves_the_one_before_and_a_damaged_one_is_never_read(
        shared: mmap.mmap) -> None:
    wire.write_shared(shared, 40, 7)
    wire.write_shared(shared, 41, 7)
    last = shared[0]  # the index of the slot written last
    older = wire.SHARED_SLOTS[1 - last]
    # The writer stopped (descheduled, or killed) half-way through the next value: its
    # step in the slot the reader is not sent to, the rest not yet. Read at once: 41.
    wire.SHARED.pack_into(shared, older, 42, 0, 0)
    assert wire.read_shared(shared) == (41, 7)
    # The last value damaged in place: the reader takes the whole one beside it, never
    # the damaged one.
    wire.write_shared(shared, 42, 7)
    shared[wire.SHARED_SLOTS[shared[0]]] ^= 0x01  # 42's step -> 43, its check unchanged
    assert wire.read_shared(shared) == (41, 7)
    shared[wire.SHARED_SLOTS[1 - shared[0]]] ^= 0x01  # and 41's
    with pytest.raises(wire.TornError, match="could not be read"):
        wire.read_shared(shared)
    wire.write_shared(shared, 44, 7)  # the next write makes it readable again
    assert wire.read_shared(shared) == (44, 7)


def test_a_snapshot_written_half_way_or_damaged_is_not_taken(shared: mmap.mmap) -> None:
    assert wire.write_snapshot(shared, 5, _snapshot(5))
    start = wire.SNAPSHOT_AT + wire.SNAPSHOT_HEAD.size
    # The writer stopped after the new body, before its header: the header still says 5,
    # with 5's length and check, over 6's bytes.
    body = marshal.dumps(_snapshot(6))
    shared[start:start + len(body)] = body
    assert wire.read_snapshot(shared, newer_than=4) is None
    assert wire.write_snapshot(shared, 6, _snapshot(6))
    assert wire.read_snapshot(shared, newer_than=5) == _snapshot(6)
    shared[start + 10] ^= 0xFF  # a damaged byte
    assert wire.read_snapshot(shared, newer_than=5) is None


_READER = textwrap.dedent("""
    import mmap, sys, time
    from lrctl.server import serving_wire as wire
    buffer = mmap.mmap(int(sys.argv[1]), wire.SHARED_BYTES)
    print("ready", flush=True)
    steps = snaps = bad = 0
    seen = set()
    last = -1
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        step, stamp = wire.read_shared(buffer)
        steps += 1
        if stamp != 2 * step or step < last:  # the writer publishes (k, 2k), k growing
            bad += 1
        last = step
        body = wire.read_snapshot(buffer, newer_than=0)
        if body is not None:
            snaps += 1
            seen.add(body[0])
            if body[2] != 3 * body[0] or len(body) != 11:
                bad += 1
    print(steps, snaps, len(seen), bad, flush=True)
""")


def test_a_reader_in_another_process_takes_only_whole_values_while_they_are_written() -> None:
    fd = os.memfd_create("lrctl-test-shared-2")
    os.ftruncate(fd, wire.SHARED_BYTES)
    buffer = mmap.mmap(fd, wire.SHARED_BYTES)
    wire.write_shared(buffer, 0, 0)
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(fd), "1.5"], pass_fds=[fd],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "ready"
        k = 0
        deadline = time.monotonic() + 1.8
        while reader.poll() is None and time.monotonic() < deadline:
            k += 1
            wire.write_shared(buffer, k, 2 * k)
            # Bodies of different lengths, so that a mix of two is a different size.
            assert wire.write_snapshot(buffer, k, _snapshot(k, names=8 + k % 5))
        out, _ = reader.communicate(timeout=30)
    finally:
        reader.kill()
        buffer.close()
        os.close(fd)
    assert reader.returncode == 0, out  # a reader that took a torn body dies in marshal
    steps, snaps, versions, bad = map(int, out.split())
    assert bad == 0
    assert snaps > 100 and versions > 10  # it read while they changed
