"""The serving process's reader of the WatchMetrics feed (serving="process").

The training thread sends the step events on the feed socket itself (a job stepping
faster than every 50 ms, several in one send: lrctl.server.watch_feed). A send to a
socket that another process is waiting on makes the kernel wake that process, and on a
VM that wakeup is paid by the sender: ~40 us of the training thread's time per send (a
`send` costs ~10 us when nobody waits on the socket; bench/README.md section 3c, "The
feed, read on a timer"). So this end does not wait on the feed while it only fans events
out to WatchMetrics streams: it reads what has come every `poll_s` (2 ms: an event
reaches the streams up to that much later; the serving process's timer wakes it on its
own core), and every 50 ms once the feed has been quiet for 0.1 s (a paused job: its
next event comes up to 50 ms late). While a Lockstep call is open (a controller that
decides at each step boundary, and may wait for that step's event), it reads on
readiness again, as soon as an event comes.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Callable

from lrctl.server import serving_wire as wire

POLL_S = 0.002
# A feed quiet for QUIET_S (a paused job, an evaluation) is read every IDLE_POLL_S: a
# stream open on a job that does not step wakes this process 20 times a second, not 500.
QUIET_S, IDLE_POLL_S = 0.1, 0.05
_CHUNK = 1 << 18


class FeedReader:
    """Frames of the feed socket, handed to `on_frame` (on the event loop's thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 on_frame: Callable[[tuple[Any, ...]], None], poll_s: float = POLL_S) -> None:
        self._loop, self._sock, self._poll_s = loop, sock, poll_s
        sock.setblocking(False)
        self._frames = wire.FrameProtocol(on_frame, self._end)  # _end: a corrupt frame
        self._streams = 0  # WatchMetrics streams open
        self._eager = 0  # Lockstep calls open
        self._timer: asyncio.TimerHandle | None = None
        self._reading = False  # registered with the loop (readiness)
        self._last_data = 0.0  # loop time of the last read that got something
        self.period = poll_s  # of the timer's reads now
        self.ended = False

    @property
    def reading_on_ready(self) -> bool:
        """True while the loop waits on the socket (a Lockstep call is open)."""
        return self._reading

    def streams(self, count: int) -> None:
        """The number of open streams changed (0: stop once what came is read)."""
        if count > self._streams:  # a new stream: its first events come soon
            self._last_data = self._loop.time()
            if self._timer is not None:  # maybe a quiet feed's long wait: read sooner
                self._timer.cancel()
                self._timer = None
        self._streams = count
        self._arm()

    def lockstep(self, delta: int) -> None:
        """A Lockstep call opened (+1) or ended (-1)."""
        self._eager += delta
        self._arm()

    def close(self) -> None:
        """The link ended: what the feed still holds is read, then nothing more."""
        if not self.ended:
            self._read()
        self._end()

    def _end(self) -> None:
        self.ended = True
        self._arm()

    def _arm(self) -> None:
        ready = not self.ended and self._streams > 0 and self._eager > 0
        if ready != self._reading:
            self._reading = ready
            if ready:
                self._loop.add_reader(self._sock.fileno(), self._read)
            else:
                self._loop.remove_reader(self._sock.fileno())
        if not self.ended and not ready and self._timer is None:
            # Also with no stream open: what was sent before the last one closed is read,
            # then the timer stops (the training process sends nothing more then).
            quiet = self._loop.time() - self._last_data > QUIET_S
            self.period = max(self._poll_s, IDLE_POLL_S) if quiet else self._poll_s
            self._timer = self._loop.call_later(self.period, self._tick)

    def _tick(self) -> None:
        self._timer = None
        got = self._read()
        if self._streams or got:
            self._arm()

    def _read(self) -> bool:
        """Read everything that has come; True if anything did."""
        got = False
        while not self.ended:
            try:
                data = self._sock.recv(_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:  # the training process is gone: the link's end ends the streams
                self._end()
                break
            got = True
            self._frames.data_received(data)
        if got:
            self._last_data = self._loop.time()
        return got
