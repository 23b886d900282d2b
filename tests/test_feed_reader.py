"""The serving process's reader of the WatchMetrics feed (lrctl.server.feed_reader), on
a real socketpair and a real event loop: frames read on a timer while only streams
listen, on readiness while a Lockstep call is open, and what is left read at the end.
The whole path (training thread -> feed -> streams) is in test_watch.py, in both modes.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

from conftest import PATIENCE_S
from lrctl.server import serving_wire as wire
from lrctl.server.feed_reader import IDLE_POLL_S, POLL_S, QUIET_S, FeedReader


class _Fixture:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.theirs, ours = socket.socketpair()
        self.frames: list[tuple[Any, ...]] = []
        self.reader = FeedReader(self.loop, ours, self.frames.append)
        self.ours = ours

    def send(self, *frames: tuple[Any, ...]) -> None:
        self.theirs.sendall(b"".join(wire.pack(f) for f in frames))

    def run_until(self, done: Any) -> None:
        async def wait() -> None:
            deadline = time.monotonic() + PATIENCE_S
            while not done() and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
        self.loop.run_until_complete(wait())

    def run_for(self, seconds: float) -> None:
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def close(self) -> None:
        self.reader.close()
        self.theirs.close()
        self.ours.close()
        self.loop.close()


@pytest.fixture
def feed() -> Any:
    f = _Fixture()
    yield f
    f.close()


def test_streams_only_read_on_a_timer_in_order(feed: _Fixture) -> None:
    feed.reader.streams(2)
    assert not feed.reader.reading_on_ready  # a send must not wake this process
    events = [(seq, seq * 10, 0.0, 1, {"loss": 1.0 / seq}, False, 400, {}, b"") for seq in range(1, 200)]
    feed.send(*events)
    feed.run_until(lambda: len(feed.frames) == len(events))
    assert feed.frames == events


def test_a_lockstep_call_reads_on_readiness_and_back(feed: _Fixture) -> None:
    feed.reader.streams(1)
    feed.reader.lockstep(1)
    assert feed.reader.reading_on_ready
    feed.send((1, 0, 0.0, 1, {}, False, 400, {}, b""))
    feed.run_until(lambda: len(feed.frames) == 1)
    feed.reader.lockstep(-1)
    assert not feed.reader.reading_on_ready
    feed.send((2, 1, 0.0, 1, {}, False, 400, {}, b""))
    feed.run_until(lambda: len(feed.frames) == 2)
    assert [f[0] for f in feed.frames] == [1, 2]


def test_what_came_before_the_end_is_read_and_then_nothing(feed: _Fixture) -> None:
    feed.reader.streams(1)
    feed.send((1, 0, 0.0, 1, {}, False, 400, {}, b""), (2,))  # an event, then "closed"
    feed.reader.close()  # the link ended before the timer came round
    assert feed.frames == [(1, 0, 0.0, 1, {}, False, 400, {}, b""), (2,)]
    feed.send((3, 2, 0.0, 1, {}, False, 400, {}, b""))
    feed.reader.streams(1)
    feed.run_for(0.05)  # ~25 rounds of the timer, were it still running
    assert len(feed.frames) == 2 and feed.reader.ended


def test_the_feed_ending_or_a_corrupt_frame_stops_the_reader(feed: _Fixture) -> None:
    feed.reader.streams(1)
    feed.theirs.sendall(wire.LEN.pack(wire.MAX_FRAME + 1) + b"x")
    feed.run_until(lambda: feed.reader.ended)
    assert feed.reader.ended and feed.frames == []

    other = _Fixture()
    try:
        other.reader.streams(1)
        other.theirs.close()  # the training process is gone
        other.run_until(lambda: other.reader.ended)
        assert other.reader.ended
    finally:
        other.close()


def test_a_quiet_feed_is_read_less_often_and_at_once_again_when_events_come(feed: _Fixture) -> None:
    """A job that does not step (an evaluation, a pause) with a stream open: after
    QUIET_S without an event the feed is read every IDLE_POLL_S, not every POLL_S; the
    first event read brings the short period back."""
    feed.reader.streams(1)
    assert feed.reader.period == POLL_S
    feed.run_for(QUIET_S + 2 * IDLE_POLL_S)
    assert feed.reader.period == IDLE_POLL_S
    feed.send((1, 0, 0.0, 1, {}, False, 400, {}, b""))
    feed.run_until(lambda: len(feed.frames) == 1)
    feed.run_for(POLL_S / 2)
    assert feed.reader.period == POLL_S
