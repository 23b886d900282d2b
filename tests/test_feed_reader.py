"""The serving process's reader of the WatchMetrics feed (lrctl.server.feed_reader), on
a real socketpair and a real event loop: frames read as they come, in order, no wakeups
while nothing comes, and what is left read at the end. The whole path (training thread
-> feed -> streams) is in test_watch.py, in both modes.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

from conftest import PATIENCE_S
from lrctl.server import serving_wire as wire
from lrctl.server.feed_reader import FeedReader


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


def test_frames_are_read_as_they_come_in_order(feed: _Fixture) -> None:
    events = [(seq, seq * 10, 0.0, 1, {"loss": 1.0 / seq}, False, 400, {}, b"") for seq in range(1, 200)]
    feed.send(*events)
    feed.run_until(lambda: len(feed.frames) == len(events))
    assert feed.frames == events
    feed.send((200,))
    feed.run_until(lambda: len(feed.frames) == len(events) + 1)


def test_a_quiet_feed_does_not_wake_the_loop(feed: _Fixture) -> None:
    """The loop waits on the socket: with nothing sent it wakes only for its own timers
    (the 2 ms reading timer this replaced woke it ~50 times in 0.1 s)."""
    selector = feed.loop._selector  # type: ignore[attr-defined]
    select, calls = selector.select, [0]

    def counted(timeout: Any = None) -> Any:
        calls[0] += 1
        return select(timeout)

    selector.select = counted
    feed.run_for(0.1)
    assert calls[0] < 10, calls[0]
    feed.send((1, 0, 0.0, 1, {}, False, 400, {}, b""))
    feed.run_until(lambda: len(feed.frames) == 1)


def test_what_came_before_the_end_is_read_and_then_nothing(feed: _Fixture) -> None:
    feed.send((1, 0, 0.0, 1, {}, False, 400, {}, b""), (2,))  # an event, then "closed"
    feed.reader.close()  # the link ended before the loop read it
    assert feed.frames == [(1, 0, 0.0, 1, {}, False, 400, {}, b""), (2,)]
    feed.send((3, 2, 0.0, 1, {}, False, 400, {}, b""))
    feed.run_for(0.05)
    assert len(feed.frames) == 2 and feed.reader.ended


def test_the_feed_ending_or_a_corrupt_frame_stops_the_reader(feed: _Fixture) -> None:
    feed.theirs.sendall(wire.LEN.pack(wire.MAX_FRAME + 1) + b"x")
    feed.run_until(lambda: feed.reader.ended)
    assert feed.reader.ended and feed.frames == []

    other = _Fixture()
    try:
        other.theirs.close()  # the training process is gone
        other.run_until(lambda: other.reader.ended)
        assert other.reader.ended
    finally:
        other.close()
