"""A lockstep session (LRClient.lockstep): the worker holds at every K-th step until
this client has decided, or its timeout has passed.

A primitive, not a controller: it hands out turns and carries decisions. The
controller acts through the ordinary calls between the two. grpcio and protobuf only.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Optional

import grpc

from lrctl.client.errors import DeadlineExceededError, LrctlError
from lrctl.client.types import Turn
from lrctl.v1 import lrctl_pb2

if TYPE_CHECKING:
    from lrctl.client.client import LRClient

_END = None  # put in the request queue: this side of the stream ends
_THREAD_END_S = 5.0  # how long a failed open waits for its waiter thread to leave grpc


def _outgoing(requests: queue.Queue[Optional[lrctl_pb2.LockstepDecision]]) -> Iterator[lrctl_pb2.LockstepDecision]:
    """The request stream, as grpc's sending thread pulls it.

    It holds the queue, not the session, so that grpc's sending thread keeps no call of
    ours alive: at interpreter exit Python stops daemon threads wherever they are,
    possibly holding a call's lock, and a call freed after that waits for the lock in
    its __del__.
    """
    while True:
        message = requests.get()
        if message is _END:
            return
        yield message


class LockstepSession(Iterator[Turn]):
    """The turns of one lockstep controller, as they come (iterate; each turn's
    ``decide()`` releases its hold). A context manager: leaving it (or close()) ends
    lockstep at once, releasing a hold in progress.

    Errors are lrctl.client.errors exceptions: raised by LRClient.lockstep() when the
    worker refuses the open (InvalidArgumentError for bad parameters,
    FailedPreconditionError when another controller holds lockstep), later by
    iteration (the worker went away: UnavailableError). Iteration ends when the worker
    ends the stream (it shut down).
    """

    def __init__(self, client: LRClient, stub: Any, every: int, timeout: float,
                 metadata: tuple[tuple[str, str], ...], open_timeout: float) -> None:
        self._client = client
        self._requests: queue.Queue[Optional[lrctl_pb2.LockstepDecision]] = queue.Queue()
        self._requests.put(lrctl_pb2.LockstepDecision(
            open=lrctl_pb2.LockstepOpen(every=every, timeout_seconds=timeout)))
        self._closed = False
        self.every, self.timeout = every, timeout
        self._call = stub.Lockstep(_outgoing(self._requests), metadata=metadata)
        self._opened(open_timeout)

    def _opened(self, limit: float) -> None:
        """Wait for the worker's answer to the open: its headers (accepted) or an error."""
        answered = threading.Event()

        def wait() -> None:
            try:
                self._call.initial_metadata()
            finally:
                answered.set()

        waiter = threading.Thread(target=wait, name="lrctl-lockstep-open", daemon=True)
        waiter.start()
        if not answered.wait(limit):
            self.close()
            waiter.join(_THREAD_END_S)  # the cancel wakes it; see _outgoing for why wait
            raise DeadlineExceededError(
                f"no answer from {self._client.address} to the lockstep open within {limit:g}s")
        if self._call.done() and self._call.code() != grpc.StatusCode.OK:  # refused, or gone
            error = self._error()
            self.close()
            raise error

    def _error(self) -> LrctlError:
        return self._client._error(self._call, self.timeout, None)  # type: ignore[arg-type]

    def _decide(self, step: int) -> None:
        if not self._closed:
            self._requests.put(lrctl_pb2.LockstepDecision(decided=step))

    def __iter__(self) -> LockstepSession:
        return self

    def __next__(self) -> Turn:
        if self._closed:
            raise StopIteration
        try:
            message = next(self._call)
        except StopIteration:
            self.close()
            raise
        except grpc.RpcError as exc:
            self.close()
            if exc.code() == grpc.StatusCode.CANCELLED and self._cancelled_here:
                raise StopIteration from None
            raise self._client._error(exc, self.timeout, None) from None
        return Turn.from_proto(message, self._decide)

    _cancelled_here = False

    def close(self) -> None:
        """End lockstep: the worker releases a hold at once and lockstep is off."""
        if self._closed:
            return
        self._closed = True
        self._requests.put(_END)
        self._cancelled_here = True
        self._call.cancel()

    def __enter__(self) -> LockstepSession:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
