"""The serving process's reader of the WatchMetrics feed (serving="process").

It reads the feed socket as soon as something comes (the event loop waits on it) and
hands each frame to the streams. A send to a socket that another process waits on makes
the kernel wake that process, and on a VM the sender pays that wakeup: ~40 us of the
training thread's time per send, against ~10 us when nobody waits (bench/README.md
section 3c, "The feed, read on a timer"). That is now paid at most ~20 times a second:
the training process sends a fast job's events in batches, one send per 50 ms at most
(lrctl.server.watch_feed), and a slower job's as each step ends. While every event was
a send of its own, this end read the socket on a 2 ms timer instead; once sends were
batched, that timer's 500 wakeups a second cost the serving process ~55 ms of CPU a
second with 4 streams open (section 3c, "Streams, batched on the wire"), on the core
the training thread shares with everything else, and bought nothing.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Callable

from lrctl.server import serving_wire as wire

_CHUNK = 1 << 18


class FeedReader:
    """Frames of the feed socket, handed to `on_frame` (on the event loop's thread) as
    they come, until the feed ends (the training process closed it or is gone, or a
    frame is corrupt)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 on_frame: Callable[[tuple[Any, ...]], None]) -> None:
        self._loop, self._sock = loop, sock
        sock.setblocking(False)
        self._frames = wire.FrameProtocol(on_frame, self._end)  # _end: a corrupt frame
        self.ended = False
        loop.add_reader(sock.fileno(), self._read)

    def close(self) -> None:
        """The link ended: what the feed still holds is read, then nothing more."""
        if not self.ended:
            self._read()
        self._end()

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self._loop.remove_reader(self._sock.fileno())

    def _read(self) -> None:
        """Read everything that has come."""
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
            self._frames.data_received(data)
